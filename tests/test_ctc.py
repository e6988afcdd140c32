"""Character CTC: vocabulary, data checks, model loading/saving, the loss, the blank-collapse
guard, and the `task: ctc` recipe (training, results, exact resume) on eSpeak utterances."""

import json

import numpy as np
import pytest
import soundfile as sf
import torch

from speechlm.errors import ConfigError, SpeechLMError
from speechlm.models.ctc import (
    CharVocab,
    build_char_vocab,
    label_frames_needed,
    load_ctc_model,
    save_ctc_model,
    unseen_characters,
    uses_attention_mask,
    vocab_report,
)
from speechlm.training.objectives.ctc import (
    CTCCollator,
    CTCObjective,
    prepare_ctc_records,
)

TRAIN_TEXTS = ["one two three", "four five six", "seven eight nine", "a cat and a dog",
               "good night moon", "the sun is hot"]
DEV_TEXTS = ["one cat", "two dogs", "hot moon"]
VOICES = ["en-us+m1", "en-us+f1"]

# A tiny wav2vec2 (layer-norm conv stack, 50 frames/s) for fast CPU tests.
TINY = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
        "intermediate_size": 64, "conv_dim": [32, 32, 32, 32], "conv_kernel": [10, 8, 4, 4],
        "conv_stride": [5, 4, 4, 4], "num_conv_pos_embeddings": 16,
        "num_conv_pos_embedding_groups": 4}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """eSpeak train (each text by two voices, plus a bad record of each kind) and dev manifests."""
    from speechlm.pipelines.synth import synthesize_corpus

    root = tmp_path_factory.mktemp("ctc-corpus")
    items = [{"id": f"tr{i}-{v}", "text": text, "voice": voice, "lang": "en"}
             for i, text in enumerate(TRAIN_TEXTS) for v, voice in enumerate(VOICES)]
    synthesize_corpus(items, root / "train", rate=170, progress=False, strict=True)
    dev_items = [{"id": f"dev{i}", "text": text, "voice": "en-us+m3", "lang": "en"}
                 for i, text in enumerate(DEV_TEXTS)]
    synthesize_corpus(dev_items, root / "dev", rate=170, progress=False, strict=True)
    train = root / "train" / "manifest.jsonl"
    records = [json.loads(line) for line in train.read_text().splitlines()]
    good = records[0]
    # The bad records: an empty transcript, one that is only punctuation, and audio far too
    # short for its transcript (0.2 s = 9 frames for 40 characters).
    sf.write(root / "train" / "short.wav", np.sin(np.arange(3200) / 5.0) * 0.3, 16000)
    bad = [{**good, "id": "empty", "text": ""},
           {**good, "id": "dots", "text": "... !"},
           {"id": "short", "audio": "short.wav", "duration": 0.2, "lang": "en",
            "text": "this is far too much text for so little audio"}]
    (root / "train" / "with_bad.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in records + bad))
    return {"train": train, "train_with_bad": root / "train" / "with_bad.jsonl",
            "dev": root / "dev" / "manifest.jsonl", "root": root}


@pytest.fixture(scope="module")
def vocab(corpus):
    return build_char_vocab([corpus["train"]], "en")


# -- vocabulary -------------------------------------------------------------------------


def test_vocab_layout_counts_and_encoding():
    vocab = build_char_vocab(["Hello, World!", "hold"], "en")
    assert vocab.tokens[:5] == ["<pad>", "<s>", "</s>", "<unk>", "|"]
    assert vocab.chars == ["d", "e", "h", "l", "o", "r", "w"]
    assert vocab.counts["l"] == 4 and vocab.counts["h"] == 2
    ids, unknown = vocab.encode("hello zed")
    assert vocab.decode(ids) == "hello ed"  # special tokens (<unk>) are not text
    assert unknown == ["z"] and ids[6] == vocab.unk_id and ids[5] == vocab.delimiter_id
    # rare characters are left out with min_count and mapped to <unk>
    rare = build_char_vocab(["Hello, World!", "hold"], "en", min_count=2)
    assert rare.chars == ["d", "h", "l", "o"] and rare.dropped == {"e": 1, "r": 1, "w": 1}


def test_vocab_is_shared_across_languages_and_round_trips(tmp_path):
    vocab = build_char_vocab(["El niño", "the kid"], ["es", "en"])
    assert "ñ" in vocab and "k" in vocab and vocab.langs == ["es", "en"]
    vocab.save(tmp_path)
    again = CharVocab.load(tmp_path)
    assert again == vocab and again.counts == vocab.counts and again.langs == ["es", "en"]


def test_saved_tokenizer_encodes_like_the_vocab(tmp_path, vocab):
    from transformers import Wav2Vec2ForCTC, Wav2Vec2Processor

    torch.manual_seed(0)
    model = load_ctc_model("scratch", vocab, scratch_config=TINY)
    out = save_ctc_model(model, vocab, tmp_path / "model")
    processor = Wav2Vec2Processor.from_pretrained(out)
    text = "good night one"
    assert processor.tokenizer(text).input_ids == vocab.encode(text)[0]
    assert processor.feature_extractor.return_attention_mask is True  # layer-norm conv stack
    loaded = Wav2Vec2ForCTC.from_pretrained(out)
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    assert not (tmp_path / "model.tmp").exists()


def test_unseen_dev_characters_are_reported(tmp_path, corpus, vocab):
    dev = tmp_path / "dev.jsonl"
    dev.write_text(json.dumps({"id": "d1", "audio": "x.wav", "text": "Zürich quiz"}) + "\n")
    unseen = unseen_characters(vocab, [dev], "en")
    # en strips the umlaut, so ü counts as u; z and q are missing from the training text
    assert unseen["z"] == {"count": 2, "examples": ["d1"]} and "q" in unseen and "u" not in unseen
    report = vocab_report(vocab, {"dev": ([dev], "en")}, rare_below=3)
    assert "dev: 2 character(s) not in the training vocabulary" in report.summary()
    assert "'z' (2x, e.g. d1)" in report.summary()
    assert report.rare == {"c": 2, "m": 2, "w": 2, "x": 2}  # "cat", "moon", "two", "six" x2
    report.write(tmp_path / "report.json")
    assert json.loads((tmp_path / "report.json").read_text())["unseen"]["dev"]["z"]["count"] == 2


# -- data checks ----------------------------------------------------------------------------


def _frames(seconds):  # the tiny model's 320-sample hop
    from transformers import Wav2Vec2Config

    from speechlm.models.ctc import frames_for_samples

    return frames_for_samples(Wav2Vec2Config(**TINY), int(seconds * 16000))


def test_empty_and_too_short_items_are_skipped_with_counts(corpus, vocab):
    records, report = prepare_ctc_records(corpus["train_with_bad"], vocab, lang="en",
                                          frames_for_duration=_frames)
    assert report.total == 15 and report.kept == 12 and len(records) == 12
    assert report.skipped == {"empty transcript": 2, "audio too short for its transcript": 1}
    summary = report.summary()
    assert "skipped 2 empty transcript" in summary
    assert "short (0.20 s gives 9 frames, its 45 labels need 47)" in summary
    assert all(r["labels"] and r["text_norm"] for r in records)
    assert label_frames_needed([5, 5, 6, 6, 6]) == 8


def test_missing_characters_map_to_unk_or_skip(tmp_path, corpus):
    vocab = build_char_vocab(["one two three"], "en")
    records, report = prepare_ctc_records(corpus["train"], vocab, lang="en")
    assert report.kept == 12 and report.utterances_with_unk == 10
    assert report.unknown_chars["v"] == 4  # "five", "seven" by two voices
    assert "mapped to <unk> in 10 utterances" in report.summary()
    assert vocab.unk_id in records[2]["labels"]
    kept, skip_report = prepare_ctc_records(corpus["train"], vocab, lang="en", unknown="skip")
    assert skip_report.skipped == {"characters not in the vocabulary": 10} and len(kept) == 2


def test_a_manifest_where_every_item_is_bad_is_a_clear_error(tmp_path, corpus, vocab):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"id": "a", "audio": "a.wav", "duration": 1.0, "text": "?"}) + "\n")
    with pytest.raises(SpeechLMError, match=r"bad.jsonl: no usable training utterance: "
                                            r"1 empty transcript"):
        prepare_ctc_records(bad, vocab, lang="en")


# -- models ---------------------------------------------------------------------------------


def test_load_from_a_pretraining_checkpoint_keeps_the_encoder(tiny_ckpt, vocab):
    from safetensors.torch import load_file
    from transformers import Wav2Vec2ForCTC

    path = tiny_ckpt("wav2vec2")
    model = load_ctc_model(path, vocab, overrides={"mask_time_prob": 0.5, "layerdrop": 0.1})
    assert isinstance(model, Wav2Vec2ForCTC) and model.lm_head.out_features == len(vocab)
    assert model.config.mask_time_prob == 0.5 and model.config.pad_token_id == 0
    saved = load_file(str(path / "model.safetensors"))
    name = "wav2vec2.encoder.layers.0.attention.q_proj.weight"
    assert torch.equal(model.state_dict()[name], saved[name])


def test_hubert_gets_no_attention_mask(tiny_ckpt, vocab, corpus):
    from speechlm.data.dataset import AudioDataset

    model = load_ctc_model(tiny_ckpt("hubert"), vocab)
    assert type(model).__name__ == "HubertForCTC" and not uses_attention_mask(model)
    seen = []
    forward = model.forward
    model.forward = lambda *a, **k: seen.append(k.get("attention_mask")) or forward(*a, **k)
    records, _ = prepare_ctc_records(corpus["train"], vocab, lang="en")
    dataset = AudioDataset(records[:3])
    batch = CTCCollator()([dataset[i] for i in range(3)])
    loss, _ = CTCObjective(model, vocab).loss(batch)
    assert torch.isfinite(loss) and seen == [None]


def test_ctc_checkpoint_with_another_vocabulary_keeps_shared_rows(tmp_path, vocab):
    torch.manual_seed(0)
    old_vocab = build_char_vocab(["abc xyz"], "en")
    old = load_ctc_model("scratch", old_vocab, scratch_config=TINY)
    path = save_ctc_model(old, old_vocab, tmp_path / "old")
    new = load_ctc_model(path, vocab)
    assert new.lm_head.out_features == len(vocab) != len(old_vocab)
    for token in ("<pad>", "|", "a", "c"):
        assert torch.equal(new.lm_head.weight[vocab.ids[token]],
                           old.lm_head.weight[old_vocab.ids[token]]), token


def test_model_errors_are_clear(tmp_path, vocab):
    with pytest.raises(ConfigError, match="nor in the local Hugging Face cache.*never downloads"):
        load_ctc_model("nobody/no-such-model", vocab)
    with pytest.raises(ConfigError, match="directory not found"):
        load_ctc_model(str(tmp_path / "missing"), vocab)
    with pytest.raises(ConfigError, match="mask_feature_length=64 must be smaller than the "
                                          "model's hidden size 32"):
        load_ctc_model("scratch", vocab, scratch_config=TINY,
                       overrides={"mask_feature_prob": 0.25, "mask_feature_length": 64})


# -- the loss and the blank-collapse guard ----------------------------------------------------


def test_ctc_loss_reductions(vocab):
    torch.manual_seed(0)
    log_probs = torch.randn(2, 30, len(vocab)).log_softmax(-1)
    frames = torch.tensor([30, 20])
    labels = torch.tensor([[5, 6, 7, 8], [5, 6, -100, -100]])
    lengths = torch.tensor([4, 2])
    per_item = torch.nn.functional.ctc_loss(log_probs.transpose(0, 1), labels[labels >= 0],
                                            frames, lengths, reduction="none")
    objective = CTCObjective(torch.nn.Linear(1, 1), vocab)
    assert torch.allclose(objective.ctc_loss(log_probs, frames, labels, lengths)[0],
                          per_item.sum() / 6)
    objective.reduction = "mean"
    assert torch.allclose(objective.ctc_loss(log_probs, frames, labels, lengths)[0],
                          (per_item / lengths).mean())


def _dev_dataset(corpus, vocab):
    from speechlm.data.dataset import AudioDataset

    records, _ = prepare_ctc_records(corpus["dev"], vocab, lang="en", training=False)
    return AudioDataset(records)


def test_blank_collapse_guard(corpus, vocab, capfd):
    torch.manual_seed(0)
    model = load_ctc_model("scratch", vocab, scratch_config=TINY).eval()
    with torch.no_grad():
        model.lm_head.bias[0] = 100.0  # every frame is a blank
    objective = CTCObjective(model, vocab, dev=_dev_dataset(corpus, vocab), guard_from_step=10,
                             unseen_dev_chars=["ß"])

    class FakeTrainer:  # the guard is not armed before guard_from_step
        step = 3
        config = type("C", (), {"max_steps": 100})

    objective.attach(FakeTrainer())
    with torch.no_grad():
        early = objective.evaluate(model)
    assert early["blank_collapse"] == 0.0 and early["empty_frac"] == 1.0
    assert "BLANK COLLAPSE" not in capfd.readouterr().err
    FakeTrainer.step = 20
    with torch.no_grad():
        late = objective.evaluate(model)
    assert late["blank_collapse"] == 1.0 and late["wer"] == 1.0
    err = capfd.readouterr().err
    assert "BLANK COLLAPSE at step 20: 100% of the dev hypotheses are empty" in err
    for advice in ("train.lr", "model.freeze_encoder_steps", "'ß'", "mask_time_prob",
                   "train.max_steps"):
        assert advice in err


# -- the recipe ---------------------------------------------------------------------------------


def _recipe(tmp_path, corpus, *, steps, out, extra=""):
    text = f"""\
task: ctc
model:
  init: scratch
  scratch: {json.dumps(TINY)}
  freeze_feature_encoder: false
  mask_time_prob: 0.05
  mask_time_length: 4
  dropout: 0.0
  final_dropout: 0.0
data:
  train:
    - {{manifest: "{corpus['train_with_bad']}", lang: en}}
  dev: "{corpus['dev']}"
  test: "{corpus['dev']}"
  lang: en
  max_batch_duration: 6.0
  min_duration: 0.1
eval:
  examples: 1
train:
  max_steps: {steps}
  lr: 5.0e-3
  schedule: cosine
  warmup_steps: 3
  log_every: 1
  tensorboard: false
  progress: false
  best_metric: cer
  output_dir: "{out}"
{extra}"""
    path = tmp_path / f"recipe-{out.name}.yaml"
    path.write_text(text)
    return path


def _weights(run_dir):
    from safetensors.torch import load_file

    return load_file(str(run_dir / "final" / "model.safetensors"))


def test_recipe_trains_evaluates_and_saves_a_loadable_model(tmp_path, corpus, capfd):
    from speechlm.recipes import load_recipe

    out = tmp_path / "run"
    module, config = load_recipe(_recipe(tmp_path, corpus, steps=30, out=out),
                                 ["train.eval_every=15"])
    results = module.run(config)
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()
              if json.loads(line)["split"] == "train"]
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3  # batches differ: average a few
    assert len(losses) == 30 and last < 0.5 * first, losses
    assert 0.0 <= results["dev"]["cer"] <= 1.5 and results["dev"]["utterances"] == 3
    saved = json.loads((out / "results.json").read_text())
    assert saved["dev"]["cer"] == results["dev"]["cer"] and "test" in saved
    report = json.loads((out / "data_report.json").read_text())
    assert report[0]["skipped"] == {"empty transcript": 2, "audio too short for its transcript": 1}
    err = capfd.readouterr().err
    assert "train[0]" in err and "skipped 2 empty transcript" in err and "WER" in err
    hyps = [json.loads(line) for line in (out / "dev_hyps.jsonl").read_text().splitlines()]
    assert [h["id"] for h in hyps] == ["dev0", "dev1", "dev2"]
    from transformers import AutoModelForCTC

    assert AutoModelForCTC.from_pretrained(out / "final").config.vocab_size == results["vocab_size"]


def test_recipe_resumes_a_killed_run_to_the_same_weights(tmp_path, corpus, monkeypatch):
    from speechlm.recipes import load_recipe

    extra = "  save_every: 2\n"
    # SortaGrad: epoch 0 shortest first, then shuffled; 8 updates cross that boundary.
    overrides = ["eval.use_best=false", "train.eval_every=4", "data.sortagrad_epochs=1",
                 "data.num_buckets=2"]
    module, full_config = load_recipe(_recipe(tmp_path, corpus, steps=8, out=tmp_path / "full",
                                              extra=extra), overrides)
    module.run(full_config)

    cut = tmp_path / "cut"
    _, cut_config = load_recipe(_recipe(tmp_path, corpus, steps=8, out=cut, extra=extra),
                                overrides)
    real_loss, calls = CTCObjective.loss, []

    def dies_at_call_6(self, batch):
        calls.append(1)
        if len(calls) == 6:
            raise RuntimeError("simulated crash")
        return real_loss(self, batch)

    monkeypatch.setattr(CTCObjective, "loss", dies_at_call_6)
    with pytest.raises(RuntimeError, match="simulated crash"):
        module.run(cut_config)
    assert not (cut / "final").exists() and (cut / "step_000004").is_dir()
    monkeypatch.setattr(CTCObjective, "loss", real_loss)
    module.run(cut_config)
    metrics = [json.loads(line) for line in (cut / "metrics.jsonl").read_text().splitlines()]
    assert max(m.get("epoch", 0) for m in metrics) >= 1  # crossed into the shuffled epochs
    full, resumed = _weights(tmp_path / "full"), _weights(cut)
    assert full.keys() == resumed.keys()
    for name in full:
        assert torch.equal(full[name], resumed[name]), name


def test_recipe_with_tailr_resumes_a_killed_run_to_the_same_weights(tmp_path, corpus,
                                                                    monkeypatch):
    """TaiLr keeps no state of its own (its weights come from the model at each step): a
    killed run resumes to the uninterrupted run's weights, and the loss is the weighted one."""
    from speechlm.recipes import load_recipe

    overrides = ["eval.use_best=false", "train.eval_every=6", "train.save_every=2",
                 "data.num_buckets=1", "loss.tailr={gamma: 0.5, w_min: 0.1}"]
    module, full_config = load_recipe(_recipe(tmp_path, corpus, steps=6, out=tmp_path / "full"),
                                      overrides)
    module.run(full_config)
    cut = tmp_path / "cut"
    _, cut_config = load_recipe(_recipe(tmp_path, corpus, steps=6, out=cut), overrides)
    real_loss, calls = CTCObjective.loss, []

    def dies_at_call_4(self, batch):
        calls.append(1)
        if len(calls) == 4:
            raise RuntimeError("simulated crash")
        return real_loss(self, batch)

    monkeypatch.setattr(CTCObjective, "loss", dies_at_call_4)
    with pytest.raises(RuntimeError, match="simulated crash"):
        module.run(cut_config)
    assert (cut / "step_000002").is_dir() and not (cut / "step_000004").exists()
    monkeypatch.setattr(CTCObjective, "loss", real_loss)
    module.run(cut_config)
    full, resumed = _weights(tmp_path / "full"), _weights(cut)
    for name in full:
        assert torch.equal(full[name], resumed[name]), name
    rows = [json.loads(line) for line in (cut / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if r["split"] == "train"]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    for row in rows:
        assert 0.1 <= row["tailr_weight_min"] <= row["tailr_weight_mean"] <= 1.0
        assert row["loss"] <= row["tailr_loss_plain"]


def test_recipe_trains_with_sample_weighting(tmp_path, corpus):
    from speechlm.recipes import load_recipe

    out = tmp_path / "reweighted"
    module, config = load_recipe(
        _recipe(tmp_path, corpus, steps=6, out=out),
        # linupper: quadratic and extremes weight 2 items equally (both at an end)
        ["train.sample_weighting.strategy=linupper", "train.sample_weighting.warmup_steps=2",
         "eval.use_best=false", "data.num_buckets=1"])  # several utterances a batch
    module.run(config)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if r["split"] == "train"]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    for row in rows[:2]:  # warm-up: uniform, the plain token-mean CTC loss
        assert row["weight_max"] == row["weight_min"] == 1.0
        assert row["loss"] == pytest.approx(row["loss_plain"], rel=1e-6)
    # after it, batches of several utterances get unequal weights (a batch of one: 1.0)
    reweighted = [r for r in rows[2:] if r["weight_max"] != 1.0]
    assert len(reweighted) >= 3
    for row in reweighted:
        assert row["weight_max"] > 1.0 > row["weight_min"] and row["loss"] != row["loss_plain"]


def test_recipe_runs_skill_it_and_resumes_it_exactly(tmp_path, corpus, monkeypatch):
    """Two 'languages' (the same English audio under two codes), the graph probed, rounds of
    2 updates; a run killed mid-way resumes to the same weights and mixture trajectory
    without probing again."""
    from speechlm.recipes import ctc_skill_it, load_recipe
    from speechlm.training import skill_probe

    extra = "  save_every: 1\n"
    overrides = ["eval.use_best=false", "data.num_buckets=1",
                 f"data.train=[{{manifest: '{corpus['train']}', lang: en}}, "
                 f"{{manifest: '{corpus['train']}', lang: es}}]",
                 "data.mixture={strategy: skill_it, eta: 0.8, round_steps: 2, graph: probe, "
                 f"probe_steps: 3, validation: {{en: '{corpus['dev']}', es: '{corpus['dev']}'}}}}"]

    def run(name):
        module, config = load_recipe(_recipe(tmp_path, corpus, steps=6, out=tmp_path / name,
                                              extra=extra), overrides)
        return module.run(config)

    results = run("full")
    full = tmp_path / "full"
    graph = json.loads((full / ctc_skill_it.GRAPH_FILE).read_text())
    assert np.shape(graph["graph"]) == (2, 2) and max(map(max, graph["graph"])) == 1.0
    assert results["mixture"]["graph"] == graph["graph"]
    assert results["mixture"]["last_probabilities"] == pytest.approx(
        {"en": mixture_log_last(full)["p_en"], "es": mixture_log_last(full)["p_es"]})
    assert (full / ctc_skill_it.PLOT_FILE).read_text().startswith("<svg")
    rows = [json.loads(line) for line in (full / "metrics.jsonl").read_text().splitlines()]
    mixture = [r for r in rows if r["split"] == "mixture"]
    assert [r["step"] for r in mixture] == [0, 2, 4, 6]
    assert all(r["p_en"] + r["p_es"] == pytest.approx(1.0) for r in mixture)

    real_loss, calls = CTCObjective.loss, []

    def dies_at_update_4(self, batch):  # 3 x 2 probe updates come first
        calls.append(1)
        if len(calls) == 6 + 4:
            raise RuntimeError("simulated crash")
        return real_loss(self, batch)

    monkeypatch.setattr(CTCObjective, "loss", dies_at_update_4)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run("cut")
    monkeypatch.setattr(CTCObjective, "loss", real_loss)

    def no_second_probe(*args, **kwargs):
        raise AssertionError("a resumed run must read its probed graph back")

    monkeypatch.setattr(skill_probe, "probe_skills_graph", no_second_probe)
    run("cut")
    cut = tmp_path / "cut"
    full_w, cut_w = _weights(full), _weights(cut)
    for name in full_w:
        assert torch.equal(full_w[name], cut_w[name]), name
    cut_mixture = [r for r in (json.loads(line) for line in
                               (cut / "metrics.jsonl").read_text().splitlines())
                   if r["split"] == "mixture"]
    drop_time = [{k: v for k, v in r.items() if k != "time"} for r in mixture]
    assert [{k: v for k, v in r.items() if k != "time"} for r in cut_mixture] == drop_time


def mixture_log_last(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["split"] == "mixture"][-1]


def test_recipe_config_errors(tmp_path, corpus):
    from speechlm.recipes import load_recipe

    path = _recipe(tmp_path, corpus, steps=4, out=tmp_path / "x")
    with pytest.raises(ConfigError, match="unknown key 'model.mask_tme_prob'.*mask_time_prob"):
        load_recipe(path, ["model.mask_tme_prob=0.1"])
    with pytest.raises(ConfigError, match=r"model.mask_time_prob must be in \[0, 1\)"):
        load_recipe(path, ["model.mask_time_prob=1.5"])
    module, config = load_recipe(path, ["model.freeze_encoder_steps=10"])
    with pytest.raises(ConfigError, match="freeze_encoder_steps=10 >= train.max_steps=4"):
        module.run(config)


@pytest.mark.parametrize("recipe", ["recipes/tiny/ctc_en.yaml", "recipes/tiny/ctc_es.yaml",
                                    "recipes/lowres/xlsr53_ctc_ainu.yaml",
                                    "recipes/lowres/xlsr53_ctc_multilingual.yaml",
                                    "recipes/lowres/indic_ctc_multilingual.yaml"])
def test_shipped_recipes_validate(recipe):
    from pathlib import Path

    from speechlm.recipes import load_recipe

    path = Path(__file__).resolve().parents[1] / recipe
    module, config = load_recipe(path, ["train.max_steps=99999"])
    assert module.__name__ == "speechlm.recipes.ctc" and config.data.train and config.data.dev
    if "lowres" in recipe:  # the paper's fine-tuning settings
        assert (config.model.mask_time_prob, config.model.mask_feature_prob,
                config.model.mask_feature_length, config.model.layerdrop) == (0.5, 0.25, 64, 0.1)
        assert config.train.schedule == "tri_stage" and config.train.lr == 1e-4
        assert config.model.freeze_feature_encoder and config.model.freeze_encoder_steps > 0
    if "indic" in recipe:
        assert config.data.alpha == 0.7 and len(config.data.train) >= 4
