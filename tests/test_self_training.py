"""`task: self_training`: teacher -> pseudo-labels -> student -> fine-tune, resumable by stage."""

import json

import pytest

from speechlm.errors import ConfigError
from speechlm.pipelines.pseudo_label import ctc_confidence
from speechlm.recipes import load_recipe

TINY = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
        "intermediate_size": 64, "conv_dim": [32, 32, 32, 32], "conv_kernel": [10, 8, 4, 4],
        "conv_stride": [5, 4, 4, 4], "num_conv_pos_embeddings": 16,
        "num_conv_pos_embedding_groups": 4}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from speechlm.pipelines.synth import synthesize_corpus

    root = tmp_path_factory.mktemp("st-corpus")
    texts = ["one two three", "four five six", "a cat and a dog", "good night moon"]
    synthesize_corpus([{"id": f"g{i}", "text": t, "voice": "en-us+m1", "lang": "en"}
                       for i, t in enumerate(texts)], root / "gold", rate=170, progress=False)
    synthesize_corpus([{"id": f"u{i}", "text": t, "voice": "en-us+f2", "lang": "en"}
                       for i, t in enumerate(texts + ["the sun is hot"])],
                      root / "unlabelled", rate=170, progress=False)
    return root


@pytest.fixture(scope="module")
def confident_teacher(corpus, tmp_path_factory):
    """A CTC model biased to emit 'o' on every frame: a non-empty, confident pseudo-labeller
    (a teacher trained for a few CPU steps would still output only blanks)."""
    import torch

    from speechlm.models.ctc import build_char_vocab, load_ctc_model, save_ctc_model

    vocab = build_char_vocab([corpus / "gold" / "manifest.jsonl"], "en")
    model = load_ctc_model("scratch", vocab, scratch_config=TINY)
    with torch.no_grad():
        model.lm_head.bias[vocab.tokens.index("o")] += 20.0
    return save_ctc_model(model, vocab, tmp_path_factory.mktemp("teacher") / "final")


def _recipe(tmp_path, corpus, min_confidence=0.0, teacher=None):
    path = tmp_path / "self_training.yaml"
    teacher_line = f'teacher_model: "{teacher}"\n' if teacher else ""
    path.write_text(teacher_line + f"""\
task: self_training
unlabelled: ["{corpus / 'unlabelled' / 'manifest.jsonl'}"]
unlabelled_lang: en
min_confidence: {min_confidence}
finetune_overrides: ["train.max_steps=3", "train.lr=1.0e-3"]
output_dir: "{tmp_path / 'run'}"
ctc:
  model: {{init: scratch, scratch: {json.dumps(TINY)}, freeze_feature_encoder: false,
          mask_time_prob: 0.0}}
  data:
    train: [{{manifest: "{corpus / 'gold' / 'manifest.jsonl'}", lang: en}}]
    dev: "{corpus / 'gold' / 'manifest.jsonl'}"
    lang: en
    max_batch_duration: 6.0
  train: {{max_steps: 4, lr: 3.0e-3, warmup_steps: 1, progress: false, tensorboard: false,
          log_every: 1, save_every: 2}}
""")
    return path


def test_confidence_ignores_blank_frames():
    import torch

    probs = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.4, 0.6]])  # blank = 0
    assert ctc_confidence(probs.log(), blank_id=0) == pytest.approx(0.7)
    assert ctc_confidence(torch.tensor([[0.9, 0.1]]).log(), blank_id=0) == 0.0


def test_stages_run_and_a_rerun_skips_finished_stages(tmp_path, corpus, confident_teacher):
    module, config = load_recipe(_recipe(tmp_path, corpus, min_confidence=0.5,
                                         teacher=confident_teacher))
    results = module.run(config)
    run = tmp_path / "run"
    assert "teacher" not in results  # a trained teacher was given
    for stage in ("student", "finetune"):
        assert (run / stage / "final" / "config.json").is_file()
        assert "cer" in results["summary"][stage]["dev"]
    assert (run / "finetune" / "metrics.jsonl").read_text().count('"split": "train"') == 3
    # the fine-tune stage keeps the student's vocabulary (and so its output layer)
    assert str(run / "student" / "final" / "vocab.json") in \
        (run / "finetune" / "config.yaml").read_text()
    pseudo = [json.loads(line) for line in (run / "pseudo" / "pseudo_0.jsonl").read_text().splitlines()]
    kept = results["pseudo_labels"][str(config.unlabelled[0])]["kept"]
    assert len(pseudo) == kept
    assert kept == 5 and all(r["text"] == "o" and r["confidence"] > 0.5 and r["reference_text"]
                             for r in pseudo)

    stamps = {s: (run / s / "final" / "model.safetensors").stat().st_mtime_ns
              for s in ("student", "finetune")}
    module.run(config)
    assert stamps == {s: (run / s / "final" / "model.safetensors").stat().st_mtime_ns
                      for s in stamps}


def test_teacher_is_trained_first_and_unusable_labels_stop_the_run(tmp_path, corpus):
    module, config = load_recipe(_recipe(tmp_path, corpus, min_confidence=1.0))
    with pytest.raises(ConfigError, match="no pseudo-label reached min_confidence=1.0"):
        module.run(config)
    assert (tmp_path / "run" / "teacher" / "final" / "config.json").is_file()
    report = json.loads((tmp_path / "run" / "teacher" / "results.json").read_text())
    assert report["step"] == 4


def test_tailr_weights_the_student_stage_only(tmp_path, corpus, confident_teacher):
    module, config = load_recipe(_recipe(tmp_path, corpus, min_confidence=0.5,
                                         teacher=confident_teacher),
                                 ["tailr={gamma: 0.5, w_min: 0.1}"])
    module.run(config)
    run = tmp_path / "run"
    for stage, weighted in (("student", True), ("finetune", False)):
        rows = [json.loads(line) for line in (run / stage / "metrics.jsonl").read_text()
                .splitlines() if '"split": "train"' in line]
        assert rows and all(("tailr_weight_mean" in r) == weighted for r in rows), stage
        saved = (run / stage / "config.yaml").read_text()
        assert ("gamma: 0.5" in saved) == weighted


def test_teacher_lm_is_built_without_the_excluded_sentences_and_finetune_can_be_skipped(
        tmp_path, corpus, confident_teacher):
    lm_text, held_out = tmp_path / "lm.txt", tmp_path / "held_out.txt"
    lm_text.write_text("o o o\nthe moon is bright\nzebras sleep standing\n")
    held_out.write_text("zebras sleep standing\n")
    module, config = load_recipe(
        _recipe(tmp_path, corpus, teacher=confident_teacher),
        [f'teacher_lm={{text: ["{lm_text}"], exclude: ["{held_out}"], order: 2, '
         'lm_weight: 1.0}', "finetune=false"])
    results = module.run(config)
    arpa = (tmp_path / "run" / "pseudo" / "teacher_lm.arpa").read_text()
    assert "moon" in arpa and "zebras" not in arpa
    assert "finetune" not in results and not (tmp_path / "run" / "finetune").exists()
    assert (tmp_path / "run" / "student" / "final" / "config.json").is_file()
    pseudo = (tmp_path / "run" / "pseudo" / "pseudo_0.jsonl").read_text().splitlines()
    assert pseudo and all(json.loads(line)["text"].strip() for line in pseudo)


def test_teacher_lm_needs_an_arpa_or_text(tmp_path, corpus, confident_teacher):
    with pytest.raises(ConfigError, match="teacher_lm: name an ARPA file"):
        load_recipe(_recipe(tmp_path, corpus, teacher=confident_teacher),
                    ["teacher_lm={order: 3}"])
    module, config = load_recipe(_recipe(tmp_path, corpus, teacher=confident_teacher),
                                 [f'teacher_lm={{arpa: "{tmp_path / "none.arpa"}"}}'])
    with pytest.raises(ConfigError, match="none.arpa not found; build one with speechlm build"):
        module.run(config)
