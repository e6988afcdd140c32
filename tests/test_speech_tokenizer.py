"""Supervised speech tokenizer (Whisper encoder + pool + VQ + CTC head): batching-safe and
causal units, 30 s windows, save/load identity, the `task: speech_tokenizer` recipe (loss
falls, codebook stays healthy, exact resume), and `speechlm build tokenize` (skips, resume,
tokenizer identity checks)."""

import json

import numpy as np
import pytest
import soundfile as sf
import torch

from speechlm.errors import ConfigError, ManifestError, SpeechLMError
from speechlm.models.ctc import CharVocab
from speechlm.models.speech_tokenizer import (
    SETTINGS_FILE,
    SpeechTokenizer,
    TokenizerSettings,
    load_speech_tokenizer,
    save_speech_tokenizer,
    unit_statistics,
)

TINY = {"d_model": 32, "encoder_layers": 3, "encoder_attention_heads": 2, "encoder_ffn_dim": 64,
        "num_mel_bins": 80, "max_source_positions": 1500, "decoder_layers": 1,
        "decoder_attention_heads": 2, "decoder_ffn_dim": 32}
TEXTS = ["one two three", "four five six", "seven eight nine", "a cat and a dog",
         "good night moon", "the sun is hot"]
VOICES = ["en-us+m1", "en-us+f1"]


def _tokenizer(seed=0, **settings) -> SpeechTokenizer:
    torch.manual_seed(seed)
    vocab = CharVocab(list("abcdefghijklmnopqrstuvwxyz'"))
    return SpeechTokenizer.build("scratch", vocab,
                                 TokenizerSettings(vq_layer=2, num_codes=16, **settings),
                                 scratch_config=TINY)


def _speech_like(seconds: float, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(int(seconds * 16000)) / 16000
    return (0.3 * torch.sin(2 * np.pi * 220 * t) * (1 + torch.sin(2 * np.pi * 3 * t))
            + 0.05 * torch.randn(len(t), generator=g))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """eSpeak train (each text by two voices) and dev manifests, plus bad records."""
    from speechlm.pipelines.synth import synthesize_corpus

    root = tmp_path_factory.mktemp("tok-corpus")
    items = [{"id": f"tr{i}-{v}", "text": text, "voice": voice, "lang": "en"}
             for i, text in enumerate(TEXTS) for v, voice in enumerate(VOICES)]
    synthesize_corpus(items, root / "train", rate=170, progress=False, strict=True)
    dev = [{"id": f"dev{i}", "text": text, "voice": "en-us+m3", "lang": "en"}
           for i, text in enumerate(TEXTS[:3])]
    synthesize_corpus(dev, root / "dev", rate=170, progress=False, strict=True)
    train = root / "train" / "manifest.jsonl"
    records = [json.loads(line) for line in train.read_text().splitlines()]
    sf.write(root / "train" / "blip.wav", np.zeros(800) + 0.1, 16000)   # 50 ms: under one unit
    (root / "train" / "broken.wav").write_bytes(b"RIFF not really a wav")
    bad = [{"id": "blip", "audio": "blip.wav", "text": "a", "lang": "en"},
           {"id": "broken", "audio": "broken.wav", "text": "a", "lang": "en"}]
    (root / "train" / "with_bad.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in records[:4] + bad))
    return {"train": train, "with_bad": root / "train" / "with_bad.jsonl",
            "dev": root / "dev" / "manifest.jsonl"}


# -- the model ----------------------------------------------------------------------------


@pytest.mark.parametrize("options", [{}, {"causal_conv": True, "attention_block": 20}])
def test_an_items_units_do_not_depend_on_its_batch(options):
    tok = _tokenizer(**options).eval()
    short, long = _speech_like(1.37, seed=1), _speech_like(3.0, seed=2)
    batch = torch.zeros(2, len(long))
    batch[0, : len(short)], batch[1] = short, long
    together = tok.encode(batch, torch.tensor([len(short), len(long)]))
    alone = tok.encode(short[None], torch.tensor([len(short)]))
    assert together[0] == alone[0]
    assert len(alone[0]) == int(tok.units_for_samples(len(short))) == 18  # ceil(ceil(68.5)/4)
    assert len(together[1]) == 38


def test_causal_tokenizer_units_do_not_see_later_audio():
    """Causal convolutions + block-causal attention: the units of whole blocks are final once
    their audio has been heard (later, quieter audio keeps the log-mel's loudness floor)."""
    block = 20                                             # 50 Hz frames = 5 units
    tok = _tokenizer(causal_conv=True, attention_block=block).eval()
    first = _speech_like(2.0, seed=3)
    later = 0.3 * _speech_like(1.0, seed=4)
    whole = tok.encode(torch.cat([first, later])[None], torch.tensor([len(first) + len(later)]))
    prefix = tok.encode(first[None], torch.tensor([len(first)]))
    complete_blocks = (len(prefix[0]) * 4 // block) * block // 4
    assert complete_blocks == 25
    assert whole[0][:complete_blocks - 1] == prefix[0][:complete_blocks - 1]
    # the hidden states below the VQ, not just the coarse codes: equal with the causal
    # encoder, changed by the later audio with full attention
    for model, causal in ((tok, True), (_tokenizer(), False)):
        whole_hidden, _ = model._lower(torch.cat([first, later])[None],
                                       torch.tensor([len(first) + len(later)]))
        prefix_hidden, frames = model._lower(first[None], torch.tensor([len(first)]))
        n = complete_blocks * 4
        same = torch.allclose(whole_hidden[0, :n], prefix_hidden[0, :n], atol=1e-5)
        assert same == causal


def test_long_audio_is_tokenized_in_30_second_windows():
    tok = _tokenizer().eval()
    audio = _speech_like(65.0, seed=5)
    units = tok.encode(audio[None], torch.tensor([len(audio)]))[0]
    window = 30 * 16000
    expected = 2 * int(tok.units_for_samples(window)) + int(tok.units_for_samples(5 * 16000))
    assert len(units) == expected == 813
    head = tok.encode(audio[None, :window], torch.tensor([window]))[0]
    assert units[: len(head)] == head
    with pytest.raises(SpeechLMError, match="call .eval"):
        tok.train().encode(audio[None], torch.tensor([len(audio)]))


def test_save_and_load_keep_the_units_and_the_identity(tmp_path):
    tok = _tokenizer(causal_conv=True).eval()
    audio = _speech_like(2.0)
    units = tok.encode(audio[None], torch.tensor([len(audio)]))
    save_speech_tokenizer(tok, tmp_path / "tok")
    again = load_speech_tokenizer(tmp_path / "tok")
    assert again.identity == tok.identity and again.settings == tok.settings
    assert again.encode(audio[None], torch.tensor([len(audio)])) == units
    assert _tokenizer(seed=1).identity != tok.identity
    # a codebook changed after saving is caught: its units would mean something else
    from safetensors.torch import load_file, save_file

    state = load_file(str(tmp_path / "tok" / "model.safetensors"))
    state["vq.codebook"] = state["vq.codebook"] + 1.0
    save_file(state, str(tmp_path / "tok" / "model.safetensors"))
    with pytest.raises(SpeechLMError, match="does not match the identity"):
        load_speech_tokenizer(tmp_path / "tok")
    with pytest.raises(ConfigError, match=f"no {SETTINGS_FILE}"):
        load_speech_tokenizer(tmp_path)


def test_settings_errors():
    with pytest.raises(ConfigError, match="at least one layer above it"):
        _tokenizer().__class__.build("scratch", CharVocab(["a"]),
                                     TokenizerSettings(vq_layer=3, num_codes=8),
                                     scratch_config=TINY)
    with pytest.raises(ConfigError, match="vq_layer must be >= 1"):
        TokenizerSettings(vq_layer=0)


def test_unit_statistics():
    stats = unit_statistics([[0, 1, 2, 3], [0, 1, 2, 3]], num_codes=8, frame_rate=12.5)
    assert stats["perplexity"] == pytest.approx(4.0) and stats["used_codes"] == 4
    assert stats["unused_codes"] == 4 and stats["bits_per_second"] == pytest.approx(37.5)
    assert stats["entropy_bits_per_second"] == pytest.approx(25.0)


# -- the recipe ---------------------------------------------------------------------------


def _recipe(tmp_path, corpus, *, steps, out, extra="") -> str:
    text = f"""\
task: speech_tokenizer
model:
  init: scratch
  scratch: {json.dumps(TINY)}
  vq_layer: 2
  num_codes: 32
  vq_start_step: 2
data:
  train: [{{manifest: "{corpus['train']}", lang: en}}]
  dev: "{corpus['dev']}"
  lang: en
  max_batch_duration: 12.0
eval: {{usage_items: 10}}
train:
  max_steps: {steps}
  lr: 3.0e-3
  warmup_steps: 1
  eval_every: 100
  log_every: 1
  tensorboard: false
  output_dir: "{out}"
{extra}"""
    path = tmp_path / f"tok_{steps}.yaml"
    path.write_text(text)
    return str(path)


def test_recipe_loss_falls_codebook_stays_healthy_and_final_dir_loads(tmp_path, corpus, capfd):
    from speechlm.recipes import load_recipe

    out = tmp_path / "run"
    module, config = load_recipe(_recipe(tmp_path, corpus, steps=40, out=out),
                                 ["train.eval_every=20"])
    results = module.run(config)
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [m["ctc_loss"] for m in metrics if m["split"] == "train" and "ctc_loss" in m]
    assert len(losses) == 38 and sum(losses[-5:]) < 0.7 * sum(losses[:5]), losses
    # the codebook is initialised by k-means at update 3, then kept alive by restarts: the dev
    # units use many of the 32 codes, not a collapsed handful
    dev_usage = [m for m in metrics if "units_perplexity" in m]
    assert dev_usage and all(m["units_used_fraction"] >= 0.5 for m in dev_usage), dev_usage
    usage = results["dev"]["usage"]
    assert usage["perplexity"] > 8 and usage["used_codes"] >= 16, usage
    assert usage["bits_per_second"] == pytest.approx(5 * 12.5)
    assert results["dev"]["utterances"] == 3 and 0 <= results["dev"]["cer"] <= 1.5
    tok = load_speech_tokenizer(out / "final")
    assert tok.identity == results["identity"]
    assert "text recovered from the units" in capfd.readouterr().err


def test_recipe_resumes_a_killed_run_to_the_same_codebook_and_weights(tmp_path, corpus,
                                                                        monkeypatch):
    from speechlm.recipes import load_recipe
    from speechlm.training.objectives.speech_tokenizer import SpeechTokenizerObjective

    extra = "  save_every: 3\n"
    module, full = load_recipe(_recipe(tmp_path, corpus, steps=6, out=tmp_path / "full",
                                       extra=extra), ["eval.use_best=false"])
    module.run(full)
    cut = tmp_path / "cut"
    _, cut_config = load_recipe(_recipe(tmp_path, corpus, steps=6, out=cut, extra=extra),
                                ["eval.use_best=false"])
    real_loss, calls = SpeechTokenizerObjective.loss, []

    def dies_at_call_5(self, batch):
        calls.append(1)
        if len(calls) == 5:
            raise RuntimeError("simulated crash")
        return real_loss(self, batch)

    monkeypatch.setattr(SpeechTokenizerObjective, "loss", dies_at_call_5)
    with pytest.raises(RuntimeError, match="simulated crash"):
        module.run(cut_config)
    monkeypatch.setattr(SpeechTokenizerObjective, "loss", real_loss)
    module.run(cut_config)
    from safetensors.torch import load_file

    a = load_file(str(tmp_path / "full" / "final" / "model.safetensors"))
    b = load_file(str(cut / "final" / "model.safetensors"))
    assert a.keys() == b.keys() and "vq.codebook" in a
    for name in a:
        assert torch.equal(a[name], b[name]), name


@pytest.mark.parametrize("sparse", ["{kind: sltrain, rank: 8, alpha: 8, density: 0.05}",
                                    "{kind: spdf, sparsity: 0.75, dense_after_steps: 5}"])
def test_sparse_lowrank_encoder_trains_and_the_best_checkpoint_saves_plain(tmp_path, corpus,
                                                                          sparse):
    """sparse_lowrank on the encoder's projections: the loss falls; the best dev checkpoint
    (SLTrain's factors, or SPDF's weights) loads back and is saved as the plain tokenizer."""
    from torch import nn

    from speechlm.models.sparse_lowrank import matching_linears
    from speechlm.recipes import load_recipe
    from speechlm.recipes.speech_tokenizer import TOKENIZER_TARGETS

    out = tmp_path / "run"
    module, config = load_recipe(_recipe(tmp_path, corpus, steps=30, out=out),
                                 ["train.eval_every=10", f"sparse_lowrank={sparse}"])
    results = module.run(config)
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [m["ctc_loss"] for m in metrics if m["split"] == "train" and "ctc_loss" in m]
    assert sum(losses[-5:]) < 0.8 * sum(losses[:5]), losses
    assert results["weights"].startswith("best") and results["sparse_lowrank"]["trainable"] > 0
    tok = load_speech_tokenizer(out / "final")
    layers = matching_linears(tok, TOKENIZER_TARGETS)
    assert len(layers) == 6 * TINY["encoder_layers"]
    assert all(type(m) is nn.Linear for _, m in layers)
    if "spdf" in sparse:  # dense from update 5, before any dev check: masked entries trained
        zeros = sum(int((m.weight == 0).sum()) for _, m in layers)
        assert zeros < 0.01 * results["sparse_lowrank"]["spdf_masked"]


def test_recipe_config_errors(tmp_path, corpus):
    from speechlm.recipes import load_recipe

    path = _recipe(tmp_path, corpus, steps=4, out=tmp_path / "x")
    module, config = load_recipe(path, ["model.vq_start_step=4"])
    with pytest.raises(ConfigError, match="vq_start_step=4 >= train.max_steps=4"):
        module.run(config)
    module, config = load_recipe(path, ["data.max_duration=45"])
    with pytest.raises(ConfigError, match="max_duration must be <= 30"):
        module.run(config)


@pytest.mark.parametrize("recipe", ["recipes/tiny/speech_tokenizer.yaml",
                                    "recipes/tokenizer/whisper_large_v3_12hz.yaml"])
def test_shipped_recipes_validate(recipe):
    from speechlm.recipes import load_recipe

    module, config = load_recipe(recipe)
    assert config.model.pool == 4 and config.model.settings().frame_rate == 12.5


# -- speechlm build tokenize --------------------------------------------------------------


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("toks")
    a, b = _tokenizer(seed=0).eval(), _tokenizer(seed=1).eval()
    return {"a": save_speech_tokenizer(a, root / "a"), "b": save_speech_tokenizer(b, root / "b"),
            "identity": a.identity}


def test_tokenize_writes_units_skips_bad_audio_and_reports_usage(tmp_path, corpus, saved, capsys):
    from speechlm.cli import main
    from speechlm.pipelines.tokenize import read_units

    out = tmp_path / "units.jsonl"
    assert main(["build", "tokenize", "--tokenizer", str(saved["a"]), "--manifest",
                 str(corpus["with_bad"]), "--out", str(out), "--no-progress",
                 "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "tokenized 4 record(s)" in printed and "perplexity" in printed
    assert "shorter than one unit 1" in printed and "unreadable audio 1" in printed
    records = read_units(out, tokenizer=saved["a"])
    assert len(records) == 4 and all(r["tokenizer"] == saved["identity"] for r in records)
    tok = load_speech_tokenizer(saved["a"])
    for record in records:
        wave, rate = sf.read(corpus["train"].parent / record["audio"], dtype="float32")
        assert record["units"] == tok.encode(torch.as_tensor(wave)[None],
                                             torch.tensor([len(wave)]))[0]
        assert record["num_codes"] == 16 and record["frame_rate"] == 12.5
    skipped = [json.loads(line) for line in
               (tmp_path / "units.jsonl.skipped.jsonl").read_text().splitlines()]
    assert {s["id"]: s["reason"] for s in skipped} == {"blip": "shorter than one unit",
                                                       "broken": "unreadable audio"}


def test_tokenize_resumes_a_killed_job_and_refuses_another_tokenizer(tmp_path, corpus, saved):
    from speechlm.pipelines.tokenize import build_tokenize, check_units, read_units

    whole = tmp_path / "whole.jsonl"
    build_tokenize(saved["a"], corpus["train"], whole, chunk_size=4, device="cpu", say=str)
    out = tmp_path / "units.jsonl"
    calls = []
    import speechlm.pipelines.tokenize as tokenize_module

    real_run = tokenize_module._Tokenizer.run

    def dies_on_chunk_2(self, records):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_run(self, records)

    tokenize_module._Tokenizer.run = dies_on_chunk_2
    try:
        with pytest.raises(KeyboardInterrupt):
            build_tokenize(saved["a"], corpus["train"], out, chunk_size=4, device="cpu", say=str)
    finally:
        tokenize_module._Tokenizer.run = real_run
    part = tmp_path / "units.jsonl.part-r0-of-1.jsonl"
    with open(part, "a") as f:
        f.write('{"id": "tr5-0", "units": [1, 2')            # a torn last line
    with pytest.raises(SpeechLMError, match="not complete"):
        check_units(out)
    summary = build_tokenize(saved["a"], corpus["train"], out, chunk_size=4, device="cpu",
                             say=str)
    assert summary.complete and summary.already_done == 4 and summary.items == 8
    assert out.read_bytes() == whole.read_bytes()
    # units made by another tokenizer are refused, by the job and by readers
    with pytest.raises(SpeechLMError, match="tokenizer_identity"):
        build_tokenize(saved["b"], corpus["train"], out, device="cpu", say=str)
    with pytest.raises(ManifestError, match="made by tokenizer .* not .*tokenize the audio again"):
        check_units(out, tokenizer=saved["b"])
    lines = out.read_text().splitlines()
    lines[2] = lines[2].replace(saved["identity"], "0123456789abcdef")
    out.write_text("\n".join(lines) + "\n")
    with pytest.raises(ManifestError, match=r"units\.jsonl:3: units of tokenizer '0123456789abcdef'"):
        read_units(out)
