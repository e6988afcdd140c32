"""`task: whisper_lora` on the tiny random Whisper and eSpeak Spanish: the loss falls, only LoRA
trains, a killed run resumes to the uninterrupted run's loss, the saved directory is a plain
Whisper that `speechlm infer` decodes, the encoder cache holds full 30 s windows, and bad
input is refused with the field and the fix."""

import json
import shutil

import pytest
import torch

from speechlm.errors import ConfigError, ManifestError
from speechlm.testing.runs import run_recipe, train_losses, whisper_decoder_sections

# The tiny Whisper's embeddings (its output layer, tied) are larger than the default init's
# (std 0.02): with those, LoRA behind the decoder's final layer norm can hardly move a logit.
INIT_STD = 0.3

@pytest.fixture
def corpus(es_speech_corpus):
    return es_speech_corpus


def _recipe(tmp_path, corpus, init, *, out, steps=8, every=4, extra="", lora="", data=""):
    text = f"""\
task: whisper_lora
model:
  init: "{init}"
  language: es
lora:
  r: 4
  alpha: 8
  dropout: 0.0
{lora}""" + whisper_decoder_sections(corpus, tmp_path / "cache", out, steps=steps,
                                       every=every, data=data) + extra
    path = tmp_path / f"recipe-{out.name}.yaml"
    path.write_text(text)
    return path


def test_lora_trains_the_decoder_only_and_the_saved_dir_decodes(tmp_path, corpus, tiny_ckpt,
                                                               one_torch_thread):
    from safetensors.torch import load_file

    from speechlm.cli import main

    init = tiny_ckpt("whisper", init_std=INIT_STD)
    out = tmp_path / "run"
    results = run_recipe(_recipe(tmp_path, corpus, init, out=out, steps=12, every=12))
    losses = train_losses(out)
    assert len(losses) == 12 and sum(losses[-3:]) / 3 < 0.7 * sum(losses[:3]) / 3
    # only LoRA matrices are in the checkpoint: everything else stayed frozen
    from speechlm.training import checkpoint

    state = checkpoint.load_checkpoint(out / "step_000012", load_optimizer=False).model_state
    assert state and all("lora_" in k for k in state)
    assert any(".decoder." in k for k in state) and not any(".encoder." in k for k in state)
    # the final directory is a plain Whisper: no LoRA keys; the encoder is the original,
    # the decoder changed (LoRA merged into it)
    final = load_file(str(out / "final" / "model.safetensors"))
    original = load_file(str(init / "model.safetensors"))
    assert not any("lora" in k for k in final)
    assert torch.equal(final["model.encoder.layers.1.fc1.weight"],
                       original["model.encoder.layers.1.fc1.weight"])
    assert not torch.equal(final["model.decoder.layers.0.fc1.weight"],
                           original["model.decoder.layers.0.fc1.weight"])
    assert set(results) >= {"dev", "test"} and 0 <= results["test"]["cer"]
    rows = [json.loads(line) for line in (out / "test_hyps.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == ["dev0", "dev1"] and rows[0]["ref"] == "un gato"
    # `speechlm infer --lang es` loads and decodes it (the same texts the recipe scored)
    hyps = tmp_path / "infer.jsonl"
    assert main(["infer", "--model", str(out / "final"), "--manifest", str(corpus["dev"]),
                 "--lang", "es", "--out", str(hyps), "--quiet"]) == 0
    inferred = {json.loads(x)["id"]: json.loads(x)["text"]
                for x in hyps.read_text().splitlines()}
    assert inferred == {r["id"]: r["raw"] for r in rows}
    assert main(["eval", "--hyp", str(hyps), "--ref", str(corpus["dev"]), "--lang", "es"]) == 0


def test_killed_run_resumes_to_the_uninterrupted_loss(tmp_path, corpus, tiny_ckpt, monkeypatch,
                                                      one_torch_thread):
    from speechlm.training import checkpoint
    from speechlm.training.objectives.whisper_asr import WhisperASRObjective

    init = tiny_ckpt("whisper", init_std=INIT_STD)
    lora = "  encoder_top_layers: 1\n"  # LoRA on the top encoder layer too, above the cache
    full, cut = tmp_path / "full", tmp_path / "cut"
    run_recipe(_recipe(tmp_path, corpus, init, out=full, lora=lora))
    real_loss, calls = WhisperASRObjective.loss, []

    def dies_at_call_6(self, batch):
        calls.append(1)
        if len(calls) == 6:
            raise RuntimeError("simulated crash")
        return real_loss(self, batch)

    path = _recipe(tmp_path, corpus, init, out=cut, lora=lora)
    monkeypatch.setattr(WhisperASRObjective, "loss", dies_at_call_6)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_recipe(path)
    assert (cut / "step_000004").is_dir() and not (cut / "final").exists()
    monkeypatch.setattr(WhisperASRObjective, "loss", real_loss)
    run_recipe(path)
    assert train_losses(cut)[-4:] == pytest.approx(train_losses(full)[-4:], rel=1e-6)
    a = checkpoint.load_checkpoint(full / "step_000008", load_optimizer=False).model_state
    b = checkpoint.load_checkpoint(cut / "step_000008", load_optimizer=False).model_state
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(".encoder.layers.1." in k for k in a)  # the top encoder layer has LoRA ...
    assert not any(".encoder.layers.0." in k for k in a)  # ... the cached one below has not


def test_the_cache_holds_full_windows_and_matches_the_audio_path(tmp_path, corpus, tiny_ckpt):
    from speechlm.data.dataset import AudioDataset
    from speechlm.data.manifest import read_manifest
    from speechlm.models import whisper_lora
    from speechlm.models.encoders import load_encoder
    from speechlm.pipelines.encoder_cache import EncoderCache

    init = tiny_ckpt("whisper", init_std=INIT_STD)
    records = read_manifest(corpus["dev"])
    encoder = load_encoder("whisper", init, layer=1, full_window=True)
    cache = EncoderCache.for_encoder(tmp_path / "c", encoder, init)
    cache.fill(encoder, records)
    cached = cache.get(records[0])
    assert cached.shape == (1500, 64)
    model, _ = whisper_lora.load_whisper(init)
    item = AudioDataset(records)[0]
    with torch.no_grad():
        from_audio = whisper_lora.states_from_audio(model, item["audio"][None],
                                                    torch.tensor([item["audio"].shape[-1]]))
        from_cache = whisper_lora.states_from_cache(model, cached[None], 1)
    assert torch.allclose(from_audio, from_cache, atol=2e-2)  # float16 storage
    own = load_encoder("whisper", init, layer=1)  # the CTC recipe's: its own length
    assert EncoderCache.for_encoder(tmp_path / "c", own, init).directory != cache.directory


@pytest.fixture(scope="module")
def english_only(tiny_ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("en-only") / "w"
    shutil.copytree(tiny_ckpt("whisper"), out)
    generation = json.loads((out / "generation_config.json").read_text())
    generation["is_multilingual"] = False
    for key in ("lang_to_id", "task_to_id"):
        generation.pop(key, None)
    (out / "generation_config.json").write_text(json.dumps(generation))
    return out


def test_bad_input_is_refused_with_the_field_and_the_fix(tmp_path, corpus, tiny_ckpt,
                                                         english_only):
    init = tiny_ckpt("whisper", init_std=INIT_STD)
    out = tmp_path / "bad"
    recipe = _recipe(tmp_path, corpus, init, out=out)
    with pytest.raises(ConfigError, match=r"model.language='xx' is not one of .*"
                                          r"lang_to_id in .*generation_config.json"):
        run_recipe(recipe, ["model.language=xx"])
    with pytest.raises(ConfigError, match="'spanish' is a language name; its code is 'es'"):
        run_recipe(recipe, ["model.language=spanish"])
    with pytest.raises(ConfigError, match="English-only Whisper checkpoint.*multilingual"):
        run_recipe(_recipe(tmp_path, corpus, english_only, out=tmp_path / "bad_en"))
    with pytest.raises(ConfigError, match="data.max_duration=40.0: Whisper's decoder sees one"):
        run_recipe(recipe, ["data.max_duration=40"])
    with pytest.raises(ConfigError, match="lora.encoder_top_layers=3: the encoder has 2"):
        run_recipe(recipe, ["lora.encoder_top_layers=3"])
    with pytest.raises(ConfigError, match="not a Whisper checkpoint with its decoder"):
        run_recipe(_recipe(tmp_path, corpus, tiny_ckpt("wav2vec2"), out=tmp_path / "bad_w2v"))
    with pytest.raises(ConfigError, match="unknown|lora.rank"):
        run_recipe(recipe, ["lora.rank=4"])
    assert not (out / "metrics.jsonl").exists()


def test_transcripts_longer_than_the_decoder_window_are_skipped_or_refused(tmp_path, corpus,
                                                                           tiny_ckpt):
    from speechlm.data.manifest import AUDIO_PATH_KEY, read_manifest
    from speechlm.models import whisper_lora
    from speechlm.training.objectives.whisper_asr import TOO_LONG, prepare_whisper_records

    init = tiny_ckpt("whisper", init_std=INIT_STD)
    model, tokenizer = whisper_lora.load_whisper(init)
    prompt = whisper_lora.asr_prompt(model.generation_config, "es", init)
    records = read_manifest(corpus["train"])
    long = {**records[1], "id": "long", "text": " ".join(["palabra"] * 500)}
    manifest = tmp_path / "long.jsonl"
    manifest.write_text("".join(
        json.dumps({**{k: v for k, v in r.items() if k != AUDIO_PATH_KEY},
                    "audio": r[AUDIO_PATH_KEY]}) + "\n" for r in [records[0], long]))
    kept, report = prepare_whisper_records(manifest, tokenizer, prompt, lang="es")
    assert [r["id"] for r in kept] == [records[0]["id"]] and report.skipped[TOO_LONG] == 1
    assert f"{manifest}:2 long" in report.examples[TOO_LONG][0]
    assert "more than Whisper's 448" in report.summary() or TOO_LONG in report.summary()
    with pytest.raises(ManifestError, match=rf"{manifest}:2: text: 'long' takes \d+ decoder "
                                            r"positions.*448.*data.strict=false"):
        prepare_whisper_records(manifest, tokenizer, prompt, lang="es", strict=True)
    # the prompt and labels: text + EOT labelled, the prompt not
    inputs, labels = prompt.sequence([7, 8])
    assert inputs == [*prompt.prefix, 7, 8]
    assert labels == [-100, -100, -100, 7, 8, prompt.eot]


def test_gpu_recipe_loads(tmp_path):
    from speechlm.recipes import load_recipe

    for name, init in (("whisper_base_lora_es", "models:whisper-base"),
                       ("whisper_small_lora_multilingual", "openai/whisper-small")):
        module, config = load_recipe(f"recipes/lowres/{name}.yaml")
        assert module.__name__.endswith("whisper_lora") and config.model.init == init
        assert config.model.language and config.train.best_metric == "cer"


def test_a_new_language_token_trains_its_embedding_only_and_the_saved_model_answers_to_it(
        tmp_path, corpus, tiny_ckpt, one_torch_thread):
    import soundfile as sf
    import torchaudio.functional as AF
    from safetensors.torch import load_file
    from transformers import WhisperTokenizerFast

    from speechlm.cli import main
    from speechlm.training import checkpoint

    # the training manifest mixes sample rates: one clip again at 22.05 kHz
    records = [json.loads(line) for line in corpus["train"].read_text().splitlines()]
    wave, rate = sf.read(corpus["root"] / "train" / records[0]["audio"], dtype="float32")
    sf.write(tmp_path / "at22k.wav", AF.resample(torch.from_numpy(wave), rate, 22050).numpy(),
             22050)
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text("".join(json.dumps({**r, "audio": str(corpus["root"] / "train" / r["audio"])})
                             + "\n" for r in records)
                     + json.dumps({**records[0], "id": "at22k", "audio": str(tmp_path / "at22k.wav")})
                     + "\n")
    init = tiny_ckpt("whisper", init_std=INIT_STD)
    out = tmp_path / "new_lang"
    recipe = _recipe(tmp_path, corpus, init, out=out, steps=6, every=6)
    recipe.write_text(recipe.read_text().replace(str(corpus["train"]), str(mixed)))
    results = run_recipe(recipe, ["model.language=null",
                                  "model.new_language={code: xx, init_from: es}"])
    report = json.loads((out / "data_report.json").read_text())[0]
    assert report["sample_rates"] == {"target": 16000, "16000": 4, "22050": 1}
    assert report["kept"] == report["total"] == 5  # nothing dropped for it
    state = checkpoint.load_checkpoint(out / "step_000006", load_optimizer=False).model_state
    assert "model.decoder.embed_tokens.rows" in state
    assert all("lora_" in k for k in state if k != "model.decoder.embed_tokens.rows")
    tokenizer = WhisperTokenizerFast.from_pretrained(out / "final")
    new_id = tokenizer.convert_tokens_to_ids("<|xx|>")
    es_id = tokenizer.convert_tokens_to_ids("<|es|>")
    generation = json.loads((out / "final" / "generation_config.json").read_text())
    assert generation["lang_to_id"]["<|xx|>"] == new_id
    final = load_file(str(out / "final" / "model.safetensors"))["model.decoder.embed_tokens.weight"]
    original = load_file(str(init / "model.safetensors"))["model.decoder.embed_tokens.weight"]
    assert final.shape[0] >= new_id + 1
    # the new row started as <|es|> and trained; the rows Whisper had are untouched
    assert not torch.equal(final[new_id], original[es_id])
    assert torch.equal(final[: original.shape[0]][torch.arange(original.shape[0]) != new_id],
                       original[torch.arange(original.shape[0]) != new_id])
    rows = [json.loads(line) for line in (out / "test_hyps.jsonl").read_text().splitlines()]
    assert "cer" in results["test"] and len(rows) == 2
    hyps = tmp_path / "infer_xx.jsonl"
    assert main(["infer", "--model", str(out / "final"), "--manifest", str(corpus["dev"]),
                 "--lang", "xx", "--out", str(hyps), "--quiet"]) == 0
    assert {json.loads(x)["id"]: json.loads(x)["text"] for x in hyps.read_text().splitlines()} \
        == {r["id"]: r["raw"] for r in rows}


def test_a_new_language_token_is_refused_with_the_fix(tmp_path, corpus, tiny_ckpt):
    init = tiny_ckpt("whisper", init_std=INIT_STD)
    recipe = _recipe(tmp_path, corpus, init, out=tmp_path / "bad_new")
    with pytest.raises(ConfigError, match=r"<\|es\|> is already a language of this Whisper; "
                                          "reuse it with model.language: es"):
        run_recipe(recipe, ["model.language=null", "model.new_language={code: es}"])
    with pytest.raises(ConfigError, match="init_from='esp' is not a language of this Whisper "
                                          r"\(did you mean es"):
        run_recipe(recipe, ["model.language=null",
                            "model.new_language={code: xx, init_from: esp}"])
    with pytest.raises(ConfigError, match="model.language=es and model.new_language.code=xx"):
        run_recipe(recipe, ["model.new_language={code: xx}"])
