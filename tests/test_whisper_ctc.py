"""A Whisper encoder with a CTC head in the `task: ctc` recipe (tiny random Whisper, eSpeak
utterances): training lowers the loss, the freezing plan (frozen phase, then only the top
layers), the encoder-output cache, save -> `speechlm infer`, exact resume, and bad input."""

import json

import pytest
import soundfile as sf
import torch

from speechlm.errors import ConfigError
from speechlm.testing.runs import run_recipe, train_losses

TRAIN_TEXTS = ["uno dos tres", "cuatro cinco seis", "siete ocho nueve", "el gato y el perro",
               "buenas noches luna", "el sol quema"]
DEV_TEXTS = ["un gato", "dos perros"]
VOICES = ["es", "es+f2"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """eSpeak Spanish train (two voices) and dev manifests, plus a train manifest with one
    clip resampled to 22.05 kHz."""
    from speechlm.pipelines.synth import synthesize_corpus

    root = tmp_path_factory.mktemp("wctc-corpus")
    items = [{"id": f"tr{i}-{v}", "text": text, "voice": voice, "lang": "es"}
             for i, text in enumerate(TRAIN_TEXTS) for v, voice in enumerate(VOICES)]
    synthesize_corpus(items, root / "train", rate=170, progress=False, strict=True)
    dev = [{"id": f"dev{i}", "text": t, "voice": "es+m3", "lang": "es"}
           for i, t in enumerate(DEV_TEXTS)]
    synthesize_corpus(dev, root / "dev", rate=170, progress=False, strict=True)
    train = root / "train" / "manifest.jsonl"
    records = [json.loads(line) for line in train.read_text().splitlines()]
    first = records[0]
    wave, rate = sf.read(root / "train" / first["audio"], dtype="float32")
    import torchaudio.functional as AF

    resampled = AF.resample(torch.from_numpy(wave), rate, 22050).numpy()
    sf.write(root / "train" / "at22k.wav", resampled, 22050)
    mixed = [*records, {**first, "id": "at22k", "audio": "at22k.wav"}]
    (root / "train" / "mixed_rates.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in mixed))
    return {"train": train, "mixed": root / "train" / "mixed_rates.jsonl",
            "dev": root / "dev" / "manifest.jsonl", "root": root}


def _recipe(tmp_path, corpus, tiny_ckpt, *, out, steps=12, model="", data="", train=""):
    text = f"""\
task: ctc
model:
  init: "{tiny_ckpt('whisper')}"
  head_layers: 1
{model}data:
  train:
    - {{manifest: "{corpus['train']}", lang: es}}
  dev: "{corpus['dev']}"
  test: "{corpus['dev']}"
  lang: es
  max_batch_duration: 8.0
  min_duration: 0.1
  encoder_cache: "{tmp_path / 'cache'}"
{data}eval: {{examples: 0, use_best: false}}
train:
  max_steps: {steps}
  lr: 3.0e-3
  schedule: constant
  log_every: 1
  save_every: 3
  tensorboard: false
  progress: false
  output_dir: "{out}"
{train}"""
    path = tmp_path / f"recipe-{out.name}.yaml"
    path.write_text(text)
    return path


def _encoder_weights(tiny_ckpt):
    from safetensors.torch import load_file

    state = load_file(str(tiny_ckpt("whisper") / "model.safetensors"))
    return {k[len("model.encoder."):]: v for k, v in state.items()
            if k.startswith("model.encoder.")}


def _final(out):
    from safetensors.torch import load_file

    return load_file(str(out / "final" / "model.safetensors"))


def test_model_runs_whisper_on_raw_audio_and_cached_frames_give_the_same_logits(tiny_ckpt):
    from speechlm.models.ctc import build_char_vocab
    from speechlm.models.encoders import load_encoder
    from speechlm.models.whisper_ctc import load_whisper_ctc

    vocab = build_char_vocab(TRAIN_TEXTS, "es")
    torch.manual_seed(0)
    model = load_whisper_ctc(tiny_ckpt("whisper"), vocab, head_layers=1).eval()
    encoder = _encoder_weights(tiny_ckpt)
    assert torch.equal(model.encoder.backbone.layers[1].fc1.weight, encoder["layers.1.fc1.weight"])
    wave = torch.randn(2, 16000) * 0.1
    mask = torch.ones(2, 16000, dtype=torch.long)
    mask[1, 8000:] = 0
    with torch.no_grad():
        logits = model(wave, attention_mask=mask).logits
        assert logits.shape == (2, 50, len(vocab))
        assert model._get_feat_extract_output_lengths(torch.tensor([16000, 8000])).tolist() \
            == [50, 25]
        for top in (0, 1, 2):  # the hidden state under the top layers, from the cache's encoder
            layer = model.cache_layer(top)
            frames = load_encoder("whisper", tiny_ckpt("whisper"), layer=layer)(wave, [16000, 8000])
            again = model.logits_from_hidden(frames.hidden, frames.lengths, layer)
            assert torch.allclose(again[0], logits[0], atol=1e-5)
            assert torch.allclose(again[1, :25], logits[1, :25], atol=1e-5)
    # encoder_layer keeps the lower layers only
    short = load_whisper_ctc(tiny_ckpt("whisper"), vocab, encoder_layer=1)
    assert short.num_layers == 1 and short.config.source_encoder_layers == 2


def test_training_lowers_the_loss_freezes_by_phase_and_infer_loads_the_model(
        tmp_path, corpus, tiny_ckpt, capfd):
    out = tmp_path / "run"
    path = _recipe(tmp_path, corpus, tiny_ckpt, out=out, steps=12,
                   model="  freeze_encoder_steps: 6\n  unfreeze_top_layers: 1\n")
    results = run_recipe(path)
    losses = train_losses(out)
    assert len(losses) == 12 and sum(losses[-3:]) / 3 < 0.7 * sum(losses[:3]) / 3, losses
    err = capfd.readouterr().err
    assert "encoder cache: built" in err  # the bottom layer's outputs were cached

    # frozen phase (steps 1-6): no encoder weight moved; after it only the top layer did
    from speechlm.training import checkpoint

    encoder = _encoder_weights(tiny_ckpt)
    at6 = checkpoint.load_checkpoint(out / "step_000006", load_optimizer=False).model_state
    assert torch.equal(at6["encoder.backbone.layers.1.fc1.weight"], encoder["layers.1.fc1.weight"])
    assert not any(k.startswith("encoder.backbone.layers.0") for k in at6)  # frozen all run
    final = _final(out)
    assert not torch.equal(final["encoder.backbone.layers.1.fc1.weight"],
                           encoder["layers.1.fc1.weight"])
    assert not torch.equal(final["encoder.backbone.layer_norm.weight"],
                           encoder["layer_norm.weight"])
    for name in ("layers.0.fc1.weight", "layers.0.self_attn.q_proj.weight", "conv1.weight"):
        assert torch.equal(final[f"encoder.backbone.{name}"], encoder[name]), name
    assert results["dev"]["utterances"] == 2 and 0 <= results["dev"]["cer"] <= 2

    # the saved directory: AutoModelForCTC, and `speechlm infer` decodes like the recipe did
    from speechlm.cli import main

    hyps = tmp_path / "hyps.jsonl"
    assert main(["infer", "--model", str(out / "final"), "--manifest", str(corpus["dev"]),
                 "--out", str(hyps), "--quiet"]) == 0
    inferred = {r["id"]: r["text"] for r in map(json.loads, hyps.read_text().splitlines())}
    scored = {r["id"]: r["text"] for r in
              map(json.loads, (out / "dev_hyps.jsonl").read_text().splitlines())}
    assert inferred == scored
    settings = json.loads((out / "final" / "processor_config.json").read_text())
    assert settings["feature_extractor"]["do_normalize"] is False  # Whisper takes raw audio

    # ... and the n-gram LM beam search that CTC models have
    from speechlm.text.ngram import build_arpa

    build_arpa([t.lower() for t in TRAIN_TEXTS] * 3, 3, out_path=tmp_path / "es.arpa")
    beam = tmp_path / "beam.jsonl"
    assert main(["infer", "--model", str(out / "final"), "--manifest", str(corpus["dev"]),
                 "--out", str(beam), "--decoder", "beam", "--lm", str(tmp_path / "es.arpa"),
                 "--beam-size", "8", "--quiet"]) == 0
    assert sorted(r["id"] for r in map(json.loads, beam.read_text().splitlines())) \
        == sorted(scored)


def test_frozen_encoder_trains_only_the_head_and_matches_without_the_cache(
        tmp_path, corpus, tiny_ckpt):
    frozen = "  unfreeze_top_layers: 0\n"
    cached, plain = tmp_path / "cached", tmp_path / "plain"
    run_recipe(_recipe(tmp_path, corpus, tiny_ckpt, out=cached, steps=4, model=frozen))
    run_recipe(_recipe(tmp_path, corpus, tiny_ckpt, out=plain, steps=4, model=frozen),
               ["data.encoder_cache=null"])
    a, b = train_losses(cached), train_losses(plain)
    assert a[0] == pytest.approx(b[0], rel=1e-3)  # the cache stores float16 frames
    assert a == pytest.approx(b, rel=1e-2)
    encoder = _encoder_weights(tiny_ckpt)
    final = _final(cached)
    for name, tensor in encoder.items():
        if name != "embed_positions.weight":
            assert torch.equal(final[f"encoder.backbone.{name}"], tensor), name


def test_a_saved_model_is_a_starting_point_with_its_head(tmp_path, corpus, tiny_ckpt):
    from speechlm.models.ctc import CharVocab, build_char_vocab
    from speechlm.models.whisper_ctc import load_whisper_ctc

    first = tmp_path / "first"
    run_recipe(_recipe(tmp_path, corpus, tiny_ckpt, out=first, steps=2,
                       model="  unfreeze_top_layers: 1\n"))
    saved = _final(first)
    again = load_whisper_ctc(first / "final", CharVocab.load(first / "final"), head_layers=1)
    for name, tensor in again.state_dict().items():
        assert torch.equal(tensor, saved[name]), name
    other = load_whisper_ctc(first / "final", build_char_vocab(["xyz"], "es"), head_layers=1)
    assert other.lm_head.out_features == 8  # a new output layer for another vocabulary
    assert torch.equal(other.encoder.backbone.layers[1].fc1.weight,
                       saved["encoder.backbone.layers.1.fc1.weight"])
    # the recipe continues from it, caching what its own bottom layer outputs
    second = tmp_path / "second"
    path = _recipe(tmp_path, corpus, tiny_ckpt, out=second, steps=2,
                   model="  unfreeze_top_layers: 1\n")
    path.write_text(path.read_text().replace(str(tiny_ckpt("whisper")), str(first / "final")))
    results = run_recipe(path)
    assert results["step"] == 2
    assert torch.equal(_final(second)["encoder.backbone.layers.0.fc1.weight"],
                       saved["encoder.backbone.layers.0.fc1.weight"])


def test_a_killed_run_resumes_to_the_same_weights(tmp_path, corpus, tiny_ckpt, monkeypatch):
    from speechlm.training.objectives.ctc import CTCObjective

    model = "  freeze_encoder_steps: 3\n  unfreeze_top_layers: 1\n"
    full, cut = tmp_path / "full", tmp_path / "cut"
    run_recipe(_recipe(tmp_path, corpus, tiny_ckpt, out=full, steps=8, model=model))
    real_loss, calls = CTCObjective.loss, []

    def dies_at_call_7(self, batch):
        calls.append(1)
        if len(calls) == 7:
            raise RuntimeError("simulated crash")
        return real_loss(self, batch)

    path = _recipe(tmp_path, corpus, tiny_ckpt, out=cut, steps=8, model=model)
    monkeypatch.setattr(CTCObjective, "loss", dies_at_call_7)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_recipe(path)
    assert (cut / "step_000006").is_dir() and not (cut / "final").exists()
    monkeypatch.setattr(CTCObjective, "loss", real_loss)
    run_recipe(path)
    a, b = _final(full), _final(cut)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_bad_input_is_reported_not_dropped(tmp_path, corpus, tiny_ckpt, capfd):
    from speechlm.models.ctc import build_char_vocab

    # a vocabulary without 'q' and 'u': training transcripts with them are counted
    vocab = build_char_vocab(["abcdefghijklmnoprstvwxyz"], "es")
    vocab_file = vocab.save(tmp_path / "vocab")
    out = tmp_path / "bad"
    path = _recipe(tmp_path, corpus, tiny_ckpt, out=out, steps=2,
                   model="  unfreeze_top_layers: 0\n",
                   data=f'  vocab: "{vocab_file}"\n')
    text = path.read_text().replace(str(corpus["train"]), str(corpus["mixed"]))
    path.write_text(text)
    run_recipe(path)
    report = json.loads((out / "data_report.json").read_text())[0]
    assert report["unknown_chars"]["u"] >= 4 and report["utterances_with_unk"] >= 4
    assert report["kept"] == report["total"] == 13  # nothing dropped for it
    assert report["sample_rates"] == {"target": 16000, "16000": 12, "22050": 1}
    err = capfd.readouterr().err
    assert "characters not in the vocabulary: 'u' x" in err
    assert "sample rates 12 at 16000 Hz, 1 at 22050 Hz: resampled to 16000 Hz" in err


def test_option_errors_name_the_field_and_the_fix(tmp_path, corpus, tiny_ckpt):
    out = tmp_path / "x"
    path = _recipe(tmp_path, corpus, tiny_ckpt, out=out, steps=4)
    with pytest.raises(ConfigError, match="model.layerdrop is for wav2vec2-family models"):
        run_recipe(path, ["model.layerdrop=0.1"])
    with pytest.raises(ConfigError, match="unfreeze_top_layers=5: the encoder has 2 layers"):
        run_recipe(path, ["model.unfreeze_top_layers=5"])
    with pytest.raises(ConfigError, match="unfreeze_top_layers=0 keeps the encoder frozen"):
        run_recipe(path, ["model.unfreeze_top_layers=0", "model.freeze_encoder_steps=2"])
    with pytest.raises(ConfigError, match="encoder_layer=3: .* has 2 encoder layers"):
        run_recipe(path, ["model.encoder_layer=3"])
    with pytest.raises(ConfigError, match="max_hours must be > 0"):
        run_recipe(path, [f'data.train=[{{manifest: "{corpus["train"]}", lang: es, max_hours: 0}}]'])
    scratch = tmp_path / "scratch.yaml"
    scratch.write_text(path.read_text().replace(f'"{tiny_ckpt("whisper")}"', "scratch"))
    with pytest.raises(ConfigError, match="model.head_layers is for a Whisper encoder"):
        run_recipe(scratch)


def test_max_hours_takes_nested_subsets(corpus):
    from speechlm.data.manifest import read_manifest
    from speechlm.recipes.ctc import hours_subset
    from speechlm.training.objectives.ctc import CTCDataReport

    records = read_manifest(corpus["train"])
    total = sum(r["duration"] for r in records) / 3600
    small = hours_subset(records, total / 3, CTCDataReport("t", "x"))
    large = hours_subset(records, total * 2 / 3, CTCDataReport("t", "x"))
    assert 0 < len(small) < len(large) < len(records)
    assert {r["id"] for r in small} <= {r["id"] for r in large}
    assert sum(r["duration"] for r in large) <= total * 2 / 3 * 3600


@pytest.mark.parametrize("recipe", ["recipes/lowres/whisper_base_ctc_es.yaml",
                                    "recipes/lowres/whisper_base_ctc_es_en.yaml",
                                    "recipes/lowres/whisper_small_ctc_multilingual.yaml"])
def test_shipped_recipes_validate(recipe):
    from pathlib import Path

    from speechlm.recipes import load_recipe

    path = Path(__file__).resolve().parents[1] / recipe
    module, config = load_recipe(path)
    assert module.__name__ == "speechlm.recipes.ctc" and config.data.dev
    assert "whisper" in config.model.init and config.model.unfreeze_top_layers is not None
