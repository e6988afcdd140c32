"""InSerter: samples cut from text at word boundaries (deterministic, both orders), spoken by
eSpeak into resumable shards; bad input (unsayable text, unknown voice, a JSONL line without
text, other settings in the same directory) handled with clear messages; the interleaved
template puts the loss on the text after the speech and lines the teacher up with the student;
a tiny recipe run lowers its loss, saves, and writes both evaluation tables."""

import json

import pytest
import torch

from speechlm.cli import main as cli_main
from speechlm.data.text_corpus import load_verses
from speechlm.errors import ConfigError, ManifestError, TTSError
from speechlm.models.prompts import IGNORE_INDEX, get_template
from speechlm.pipelines.inserter import (
    ORDERS,
    PlanSettings,
    build_inserter,
    iter_corpus,
    plan_samples,
    read_samples,
)
from speechlm.recipes import load_recipe

VOICES = ["en-us+m1", "en-us+f3"]


def _corpus(tmp_path, n=24, extra=()):
    path = tmp_path / "corpus.txt"
    lines = [v.en for v in load_verses()[:n]] + list(extra)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


# -- the plan -----------------------------------------------------------------------------------


def test_plan_cuts_at_word_boundaries_in_both_orders_and_is_repeatable():
    texts = [(v.ref, v.en) for v in load_verses()[:400] if len(v.en.split()) >= 5]
    texts.append(("short", "Jesus wept."))  # 2 words: fewer than 2 spoken + 3 after
    settings = PlanSettings(speech_words=(2, 6), min_after_words=3, text_first_share=0.3, seed=1)
    samples, usable, too_short = plan_samples(texts, settings)
    assert (usable, too_short) == (len(texts) - 1, 1) and len(samples) == usable
    source = dict(texts)
    for s in samples:
        parts = [p for p in (s["before"], s["text"], s["after"]) if p]
        assert " ".join(parts) == " ".join(source[s["source"]].split()[:len(" ".join(parts).split())])
        assert 2 <= len(s["text"].split()) <= 6 and len(s["after"].split()) >= 3
        assert (s["order"] == "text_speech_text") == bool(s["before"])
    share = sum(s["order"] == ORDERS[1] for s in samples) / len(samples)
    assert 0.22 < share < 0.38
    again, _, _ = plan_samples(texts, settings)
    assert again == samples
    other, _, _ = plan_samples(texts, PlanSettings(speech_words=(2, 6), min_after_words=3,
                                                   text_first_share=0.3, seed=2))
    assert other != samples
    subset, _, _ = plan_samples(texts, PlanSettings(num_samples=50, seed=1, speech_words=(2, 6),
                                                    min_after_words=3, text_first_share=0.3))
    assert len(subset) == 50 and {s["source"] for s in subset} < {s["source"] for s in samples}


def test_embedded_corpus_never_yields_held_out_books():
    from speechlm.data.instructions import heldout_books

    books = heldout_books()
    sources = [ref for ref, _ in iter_corpus("embedded:en")]
    assert len(sources) > 20000
    assert not any(ref.rsplit(" ", 1)[0] in books for ref in sources)


def test_bad_settings_and_corpora_are_rejected_clearly(tmp_path):
    with pytest.raises(ConfigError, match="speech_words"):
        PlanSettings(speech_words=(5, 2))
    with pytest.raises(ConfigError, match="min_after_words"):
        PlanSettings(min_after_words=0)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "In the beginning"}\n{"txt": "oops"}\n')
    with pytest.raises(ManifestError, match=r"bad.jsonl:2: no 'text'"):
        list(iter_corpus(str(bad)))
    with pytest.raises(ManifestError, match="corpus file not found"):
        list(iter_corpus(str(tmp_path / "missing.txt")))
    with pytest.raises(ConfigError, match="embedded:en"):
        list(iter_corpus("embedded:fr"))


# -- the job ------------------------------------------------------------------------------------


def test_build_writes_shards_skips_unsayable_text_and_resumes(tmp_path):
    corpus = _corpus(tmp_path, extra=["Привет как дела у тебя сегодня друг мой дорогой"])
    out = tmp_path / "ins"
    settings = PlanSettings(speech_words=(2, 5), seed=0)
    first = build_inserter(str(corpus), out, voices=VOICES, rate=(150, 190), settings=settings,
                           shard_size=10, progress=False)
    assert first.planned == 25 and first.failed == 1 and first.samples == 24
    assert "Привет" in first.failures[0]["reason"] or first.failures[0]["id"]
    assert [p.name for p in sorted(out.glob("samples-*.jsonl"))] == \
        ["samples-00000.jsonl", "samples-00001.jsonl", "samples-00002.jsonl"]
    records = read_samples(out)
    assert len(records) == 24 and all(r["duration"] > 0.2 for r in records)
    assert all(r["continuation"] == r["after"] and r["voice"] in VOICES for r in records)
    shards_before = {p.name: p.read_bytes() for p in out.glob("samples-*.jsonl")}

    # a killed job: the last manifest lines (and their shard) are gone, a torn line is left
    manifest = out / "manifest.jsonl"
    lines = manifest.read_text().splitlines(keepends=True)
    manifest.write_text("".join(lines[:-5]) + lines[-5][:20])
    (out / "samples-00002.jsonl").unlink()
    again = build_inserter(str(corpus), out, voices=VOICES, rate=(150, 190), settings=settings,
                           shard_size=10, progress=False)
    assert again.synthesized == 5 + 1 - 1 and again.already_done == 19
    assert {p.name: p.read_bytes() for p in out.glob("samples-*.jsonl")} == shards_before
    ids = [json.loads(line)["id"] for line in manifest.read_text().splitlines()
           if line.startswith("{") and line.endswith("}")]
    assert len(ids) == len(set(ids)) == 24

    with pytest.raises(ConfigError, match="other settings.*speech_words"):
        build_inserter(str(corpus), out, voices=VOICES, rate=(150, 190),
                       settings=PlanSettings(speech_words=(2, 6)), progress=False)


def test_unknown_voice_fails_before_any_work(tmp_path):
    with pytest.raises(TTSError, match="unknown eSpeak voice"):
        build_inserter(str(_corpus(tmp_path)), tmp_path / "ins", voices=["en-xx-nope"],
                       progress=False)
    assert not list((tmp_path / "ins").glob("samples-*.jsonl"))


def test_cli_builds_samples(tmp_path, capsys):
    out = tmp_path / "cli"
    code = cli_main(["build", "inserter", "--corpus", str(_corpus(tmp_path, n=8)), "--tts",
                     "espeak:en-us+m1,en-us+f3", "--out", str(out), "--speech-words", "2:4",
                     "--no-progress"])
    assert code == 0 and "8 in 1 shard(s)" in capsys.readouterr().out
    assert len(read_samples(out)) == 8


# -- the template and the recipe ----------------------------------------------------------------


def test_interleaved_template_learns_only_the_text_after_the_speech(tiny_ckpt):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_ckpt("llama"))
    template = get_template("interleaved")
    speech = template.encode(tok, "And God said,", response="and there was light.")
    assert speech.pieces[0][0] == tok.bos_token_id and speech.pieces[1] is None
    text = template.encode(tok, "And God said,", response="and there was light.",
                           transcript="Let there be light:")
    assert text.response == speech.response and text.response[-1] == tok.eos_token_id
    whole = tok("And God said, Let there be light: and there was light.")["input_ids"]
    assert text.pieces[0] + text.response[:-1] == whole  # what the LLM read as plain text
    from speechlm.models.prompts import build_inputs

    emb = torch.nn.Embedding(len(tok), 8)
    inputs = build_inputs([speech], emb, speech=torch.zeros(1, 5, 8),
                          speech_lengths=torch.tensor([5]), pad_id=0)
    labelled = inputs.labels[0][inputs.labels[0] != IGNORE_INDEX].tolist()
    assert labelled == speech.response


def test_tiny_inserter_run_learns_saves_and_writes_both_tables(tiny_ckpt, tmp_path,
                                                               small_corpus, capsys):
    samples = tmp_path / "ins"
    # short texts after the speech: an untrained LLM can be steered to a few tokens
    build_inserter(str(_corpus(tmp_path, n=20)), samples, voices=VOICES,
                   settings=PlanSettings(speech_words=(2, 4), max_after_words=3, seed=0),
                   progress=False)
    transfer = tmp_path / "transfer.jsonl"
    records = read_samples(samples, limit=4)
    transfer.write_text("".join(json.dumps({"id": r["id"], "audio": r["audio"],
                                            "duration": r["duration"], "text": r["text"],
                                            "translation": "es"}) + "\n" for r in records))
    llm = tiny_ckpt("llama", initializer_range=0.1)
    module, config = load_recipe("recipes/tiny/inserter.yaml", [
        f"model.encoder_path={tiny_ckpt('wav2vec2')}", f"model.llm_path={llm}",
        "model.adapter_options={bottleneck_dim: 16}", f"data.train={samples}",
        "data.dev_items=4", f"data.encoder_cache={tmp_path / 'enc'}",
        "data.max_batch_duration=6.0", "loss.kind=ce", "train.max_steps=40", "train.lr=1.0e-2",
        "train.warmup_steps=0", "train.eval_every=40", "train.save_every=40",
        "train.log_every=5", f"train.output_dir={tmp_path / 'run'}", "train.progress=true",
        "train.tensorboard=false", f"eval.transfer={transfer}", "eval.transfer_items=4",
        "eval.speech_instruct=embedded:en/test", "eval.speech_instruct_items=2",
        "eval.speech_instruct_tasks=[repeat, last_word]", "eval.generate_items=2",
        "eval.batch_size=4"])
    results = module.run(config)
    run = tmp_path / "run"
    losses = [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").open())
              if r["split"] == "train"]
    assert losses[-1] < 0.92 * losses[0], losses
    systems = {"untrained adapter", "InSerter (ce)", "cascade (reference text)"}
    assert set(results["transfer"]) == systems and set(results["speech_instruct"]) == systems
    assert set(results["speech_instruct"]["InSerter (ce)"]) == {"repeat", "last_word"}
    assert {"align_kl", "align_ce_speech"} <= set(results["alignment"])
    hyps = [json.loads(line) for line in (run / "eval_hyps.jsonl").open()]
    assert {h["setting"] for h in hyps} == {"transfer", "speech_instruct"}
    # the tables take minutes on real models: each system and task says when it is done
    out = capsys.readouterr().out
    assert "transfer: repeat" in out and "spoken instruction: last_word" in out
    assert "cascade (reference text)" in out.split("spoken instruction: repeat")[-1]
    # the saved model answers in the instruction template; init_from starts a second run there
    saved = json.loads((run / "final" / "speechlm_config.json").read_text())
    assert saved["config"]["template"] == "blsp"
    module2, config2 = load_recipe("recipes/tiny/inserter.yaml", [
        *[o for o in [f"model.encoder_path={tiny_ckpt('wav2vec2')}", f"model.llm_path={llm}",
                      "model.adapter_options={bottleneck_dim: 16}", f"data.train={samples}",
                      f"data.encoder_cache={tmp_path / 'enc'}", "data.dev_items=4"]],
        f"init_from={run / 'final'}", "train.max_steps=1", "train.eval_every=1",
        f"train.output_dir={tmp_path / 'run2'}", "train.progress=false",
        "train.tensorboard=false", "eval.transfer=null", "eval.speech_instruct=null",
        "eval.generate_items=0", "train.lr=1.0e-12", "train.warmup_steps=0"])
    second = module2.run(config2)
    assert second["alignment"]["align_ce_speech"] == pytest.approx(
        results["alignment"]["align_ce_speech"], rel=1e-3)
    with pytest.raises(ConfigError, match="does not fit this model"):
        module3, config3 = load_recipe("recipes/tiny/inserter.yaml", [
            f"model.encoder_path={tiny_ckpt('wav2vec2')}", f"model.llm_path={llm}",
            "model.adapter_options={bottleneck_dim: 8}", f"data.train={samples}",
            f"data.encoder_cache={tmp_path / 'enc'}", f"init_from={run / 'final'}",
            f"train.output_dir={tmp_path / 'run3'}", "train.progress=false",
            "eval.transfer=null", "eval.speech_instruct=null"])
        module3.run(config3)


@pytest.mark.parametrize("recipe", ["recipes/tiny/inserter.yaml", "recipes/tiny/blsp_inserter.yaml",
                                    "recipes/inserter/whisper_small_qwen2.5_1.5b.yaml"])
def test_shipped_inserter_recipes_validate(recipe):
    _, config = load_recipe(recipe)
    assert config.model.template == "blsp" and config.loss.kind == "ce"
    if "blsp_inserter" in recipe:
        assert config.init_from == "zoo:blsp_en" and set(config.eval.compare) == {
            "BLSP-KD", "InSerter"}


def test_cli_builds_samples_with_a_local_vits_checkpoint(tiny_ckpt, tmp_path, capsys):
    out = tmp_path / "vits"
    code = cli_main(["build", "inserter", "--corpus", str(_corpus(tmp_path, n=4)), "--tts",
                     f"vits:{tiny_ckpt('vits')}", "--out", str(out), "--speech-words", "2:3",
                     "--no-progress"])
    assert code == 0 and "4 in 1 shard(s)" in capsys.readouterr().out
    records = read_samples(out)
    assert all(r["speaker"].startswith("vits:") and r["duration"] > 0 for r in records)
    assert cli_main(["build", "inserter", "--corpus", str(_corpus(tmp_path, n=4)), "--tts",
                     "vits", "--out", str(tmp_path / "none")]) == 2
    assert "--tts vits: give the model directory" in capsys.readouterr().err


@pytest.mark.parametrize("recipe", ["recipes/inserter/whisper_base_smollm2_135m.yaml",
                                    "recipes/inserter/whisper_base_smollm2_135m_after_blsp.yaml"])
def test_real_model_inserter_recipes_validate(recipe):
    _, config = load_recipe(recipe)
    assert config.model.template == "chat" and config.model.adapter == "stack"
    assert config.eval.speech_instruct == "embedded:en/test"
    if "after_blsp" in recipe:
        # tabled beside the adapter it starts from
        assert config.init_from == "zoo:blsp_whisper_smollm2_kd_more"
        assert list(config.eval.compare.values()) == [config.init_from]
