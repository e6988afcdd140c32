"""BLSP stage 1: continuations equal single-prompt greedy generation of the exact BLSP prompt,
bad records are skipped and counted, a killed (or torn) run resumes to the same file, two
ranks merge to the single-process output, mismatched settings and manifests are errors, and
the CLI runs it. The tiny Llama is untrained: its text is arbitrary but deterministic."""

import json
import shutil
from collections import Counter

import pytest
import torch

from speechlm.data.instructions import CONTINUE_INSTRUCTION
from speechlm.errors import ConfigError, SpeechLMError
from speechlm.inference import text_generation
from speechlm.inference.text_generation import greedy_generate
from speechlm.models.encoders import config_sha256
from speechlm.models.prompts import get_template
from speechlm.pipelines.continuations import (
    build_continuations,
    check_continuations,
    manifest_sha256,
    meta_path,
    part_path,
    skipped_path,
)

TEXTS = [
    "In the beginning God created the heaven and the earth.",
    "And the earth was without form, and void.",
    "   ",                                            # empty transcript
    "Jesus wept.",
    "And God said, Let there be light: and there was light.",
    " ".join(["and the word was with God"] * 12),    # prompt over the limit
    "Blessed are the meek: for they shall inherit the earth.",
    "En el principio creó Dios los cielos y la tierra.",
    "Love is patient, love is kind.",
]
EMPTY, LONG = "u2", "u5"
SETTINGS = dict(max_new_tokens=6, max_prompt_tokens=100, batch_size=3, chunk_size=3,
                device="cpu", say=lambda message: None)


# one torch thread: batched and one-by-one results compare bit for bit
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def llm_dir(tiny_ckpt):
    return tiny_ckpt("llama")


@pytest.fixture(scope="module")
def llm(llm_dir):
    from speechlm.models.speech_lm import load_llm

    return load_llm(llm_dir)


def _write_manifest(path, texts=TEXTS):
    path.write_text("".join(json.dumps({"id": f"u{i}", "audio": f"audio/u{i}.wav", "text": t,
                                        "speaker": "s1"}) + "\n" for i, t in enumerate(texts)))
    return path


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    return _write_manifest(tmp_path_factory.mktemp("manifest") / "train.jsonl")


@pytest.fixture(scope="module")
def reference(llm_dir, manifest, tmp_path_factory):
    """An uninterrupted single-process run: (out path, summary)."""
    out = tmp_path_factory.mktemp("reference") / "cont.jsonl"
    return out, build_continuations(llm_dir, manifest, out, **SETTINGS)


def _files(out):
    return out.read_text(), skipped_path(out).read_text()


def _single_prompt_greedy(model, ids, max_new_tokens, stops):
    """The reference: `model.generate` on one unpadded prompt, cut at the first stop id."""
    with torch.no_grad():
        row = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids),
                                                                             dtype=torch.long),
                             max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                             eos_token_id=stops, pad_token_id=stops[0])[0, len(ids):].tolist()
    return next((row[:i] for i, t in enumerate(row) if t in stops), row)


# -- greedy_generate ---------------------------------------------------------------------


def test_greedy_generate_equals_one_prompt_at_a_time_in_any_batch(llm):
    model, tok = llm
    prompts = [tok(t)["input_ids"] for t in TEXTS if t.strip()][:6]
    assert len({len(p) for p in prompts}) >= 4  # different lengths: real left padding
    alone = [_single_prompt_greedy(model, p, 8, [tok.eos_token_id]) for p in prompts]
    # A token the model emits early becomes a stop id, so rows end at different points.
    stop = alone[0][2]
    stops = [tok.eos_token_id, stop]
    expected = [next((r[:i] for i, t in enumerate(r) if t in stops), r) for r in alone]
    assert len(expected[0]) <= 2 and any(len(e) == 8 for e in expected)
    for batch_size in (1, 2, 4, 6):
        got = greedy_generate(model, prompts, pad_id=tok.eos_token_id, stop_ids=stops,
                              max_new_tokens=8, batch_size=batch_size)
        assert got == expected, batch_size
    order = [5, 0, 3, 1, 4, 2]
    shuffled = greedy_generate(model, [prompts[i] for i in order], pad_id=tok.eos_token_id,
                               stop_ids=stops, max_new_tokens=8, batch_size=3)
    assert shuffled == [expected[i] for i in order]
    with pytest.raises(ValueError, match=r"prompt\(s\) \[1\] are empty"):
        greedy_generate(model, [prompts[0], []], pad_id=0, stop_ids=stops)


# -- the job -----------------------------------------------------------------------------


def test_every_usable_record_gets_its_single_prompt_greedy_continuation(
        llm, llm_dir, manifest, tmp_path, monkeypatch):
    model, tok = llm
    template = get_template("blsp")
    seen: list[list[int]] = []
    real = text_generation.greedy_generate
    forced_empty = template.encode(tok, CONTINUE_INSTRUCTION, transcript=TEXTS[3]).prompt_ids()

    def spy(model, prompts_ids, **kwargs):
        seen.extend(prompts_ids)
        new = real(model, prompts_ids, **kwargs)
        return [[] if p == forced_empty else n for p, n in zip(prompts_ids, new, strict=True)]

    monkeypatch.setattr(text_generation, "greedy_generate", spy)
    out = tmp_path / "cont.jsonl"
    summary = build_continuations(llm_dir, manifest, out, **SETTINGS)

    prompts = {f"u{i}": template.encode(tok, CONTINUE_INSTRUCTION, transcript=t).prompt_ids()
               for i, t in enumerate(TEXTS) if t.strip()}
    assert len(prompts[LONG]) > 100 and max(len(p) for k, p in prompts.items() if k != LONG) <= 100
    assert prompts["u0"][0] == tok.bos_token_id
    shown = tok.decode(prompts["u0"])
    assert shown.startswith(f"<s> ###[Human]:{CONTINUE_INSTRUCTION} {TEXTS[0]}")
    assert shown.endswith("\n\n\n###[Assistant]:")
    usable = [k for k in prompts if k not in (LONG, "u3")]
    assert seen == [prompts[k] for k in prompts if k != LONG]  # exactly these prompts, in order

    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in lines] == usable  # manifest order
    stops = [tok.eos_token_id]
    for record in lines:
        index = int(record["id"][1:])
        ids = _single_prompt_greedy(model, prompts[record["id"]], 6, stops)
        assert record["continuation"] == tok.decode(ids, skip_special_tokens=True).strip()
        assert record["continuation"] and record["continuation_tokens"] == len(ids)
        assert {k: record[k] for k in ("audio", "text", "speaker")} == {
            "audio": f"audio/u{index}.wav", "text": TEXTS[index], "speaker": "s1"}
    skipped = [json.loads(line) for line in skipped_path(out).read_text().splitlines()]
    assert skipped == [{"id": EMPTY, "reason": "empty transcript"},
                       {"id": "u3", "reason": "empty continuation"},
                       {"id": LONG, "reason": "prompt over 100 tokens"}]
    assert summary.items == len(usable) and summary.complete
    assert summary.skipped == Counter({"empty transcript": 1, "empty continuation": 1,
                                       "prompt over 100 tokens": 1})
    assert summary.tokens == sum(r["continuation_tokens"] for r in lines)
    assert "skipped 3 (empty continuation 1, empty transcript 1, prompt over 100 tokens 1)" \
        in summary.summary()
    meta = json.loads(meta_path(out).read_text())
    assert meta == {
        "manifest": str(manifest.resolve()), "manifest_sha256": manifest_sha256(manifest),
        "llm": str(llm_dir.resolve()), "llm_config_sha256": config_sha256(llm_dir),
        "template": "blsp", "instruction": CONTINUE_INSTRUCTION, "max_new_tokens": 6,
        "max_prompt_tokens": 100, "complete": True, "items": len(usable),
        "skipped": {"empty continuation": 1, "empty transcript": 1, "prompt over 100 tokens": 1},
        "tokens": summary.tokens}
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "cont.jsonl", "cont.jsonl.meta.json", "cont.jsonl.skipped.jsonl"]  # parts removed


@pytest.mark.parametrize("torn", [False, True])
def test_a_killed_run_resumes_to_the_uninterrupted_file(llm_dir, manifest, reference, tmp_path,
                                                        monkeypatch, torn):
    real = text_generation.greedy_generate
    calls = []

    def dies_on_second_chunk(model, prompts_ids, **kwargs):
        calls.append(len(prompts_ids))
        if len(calls) == 2:
            raise RuntimeError("killed")
        return real(model, prompts_ids, **kwargs)

    out = tmp_path / "cont.jsonl"
    with monkeypatch.context() as m:
        m.setattr(text_generation, "greedy_generate", dies_on_second_chunk)
        with pytest.raises(RuntimeError, match="killed"):
            build_continuations(llm_dir, manifest, out, **SETTINGS)
    part = part_path(out, 0, 1)
    assert not out.exists() and json.loads(meta_path(out).read_text())["complete"] is False
    assert [json.loads(x)["id"] for x in part.read_text().splitlines()] == ["u0", "u1"]
    assert part_path(out, 0, 1, skipped=True).read_text() == \
        '{"id": "u2", "reason": "empty transcript"}\n'
    if torn:  # the kill cut the next line in half
        with open(part, "a") as f:
            f.write('{"id": "u3", "audio": "audio/u3.wav", "text": "Jesus')
    with pytest.raises(SpeechLMError, match="not complete"):
        check_continuations(out)

    resumed = build_continuations(llm_dir, manifest, out, **SETTINGS)
    assert resumed.already_done == 3 and resumed.complete
    assert resumed.items + sum(resumed.skipped.values()) == len(TEXTS) - 3
    assert _files(out) == _files(reference[0])
    assert json.loads(meta_path(out).read_text()) == json.loads(meta_path(reference[0]).read_text())
    assert not part.exists()


@pytest.mark.parametrize("finisher", ["rank 0", "single process"])
def test_two_ranks_merge_into_the_single_process_output(llm_dir, manifest, reference, tmp_path,
                                                        finisher):
    out = tmp_path / "cont.jsonl"
    first = build_continuations(llm_dir, manifest, out, rank=1, world_size=2, **SETTINGS)
    assert not first.complete and not out.exists() and first.remaining == 5
    assert first.summary().startswith("rank 1 of 2: continued ")
    assert "5 record(s) still to do by other ranks" in first.summary()
    ids = [json.loads(x)["id"] for x in part_path(out, 1, 2).read_text().splitlines()]
    ids += [json.loads(x)["id"] for x in part_path(out, 1, 2, skipped=True).read_text().splitlines()]
    assert sorted(ids) == ["u1", "u3", "u5", "u7"]  # records 1, 3, 5, ...
    if finisher == "rank 0":
        last = build_continuations(llm_dir, manifest, out, rank=0, world_size=2, **SETTINGS)
        assert last.items + sum(last.skipped.values()) == 5
    else:  # resumed with another world size: only the missing records are continued
        last = build_continuations(llm_dir, manifest, out, **SETTINGS)
        assert last.already_done == 4
    assert last.complete
    assert _files(out) == _files(reference[0])
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "cont.jsonl", "cont.jsonl.meta.json", "cont.jsonl.skipped.jsonl"]
    assert check_continuations(out, manifest=manifest)["items"] == reference[1].items


def test_reruns_return_at_once_and_other_settings_are_errors(llm_dir, manifest, reference,
                                                             tmp_path, monkeypatch):
    from speechlm.models import speech_lm

    out = tmp_path / "cont.jsonl"
    for path in (reference[0], skipped_path(reference[0]), meta_path(reference[0])):
        shutil.copy(path, tmp_path / path.name)

    def no_model(*args, **kwargs):
        raise AssertionError("a finished job must not load the LLM")

    monkeypatch.setattr(speech_lm, "load_llm", no_model)
    again = build_continuations(llm_dir, manifest, out, **SETTINGS)
    assert again.complete and again.items == 0 and _files(out) == _files(reference[0])

    other = _write_manifest(tmp_path / "other.jsonl", TEXTS[:4])
    with pytest.raises(SpeechLMError, match=r"continuations in .*cont\.jsonl were written for "
                       r".*train\.jsonl \(sha256 [0-9a-f]{12}\), not .*other\.jsonl \(sha256 "
                       r"[0-9a-f]{12}\); use another --out, or delete .*cont\.jsonl\*"):
        build_continuations(llm_dir, other, out, **SETTINGS)
    with pytest.raises(SpeechLMError, match="built with max_new_tokens 6, not 7; use another --out"):
        build_continuations(llm_dir, manifest, out, **{**SETTINGS, "max_new_tokens": 7})
    with pytest.raises(SpeechLMError, match="built with instruction 'Continue the following text"):
        build_continuations(llm_dir, manifest, out, instruction="Go on.", **SETTINGS)
    with pytest.raises(SpeechLMError, match="built with precision None, not 'bf16'"):
        build_continuations(llm_dir, manifest, out, **{**SETTINGS, "precision": "bf16"})
    with pytest.raises(ConfigError, match="precision must be one of fp32, bf16"):
        build_continuations(llm_dir, manifest, tmp_path / "x.jsonl",
                            **{**SETTINGS, "precision": "fp16"})
    stray = tmp_path / "stray.jsonl"
    stray.write_text('{"id": "u0"}\n')
    with pytest.raises(SpeechLMError, match=r"stray\.jsonl exists but has no stray\.jsonl\.meta"):
        build_continuations(llm_dir, manifest, stray, **SETTINGS)
    with pytest.raises(ConfigError, match="rank must be in"):
        build_continuations(llm_dir, manifest, out, rank=2, world_size=2, **SETTINGS)


def test_check_continuations_names_the_manifest_they_were_made_for(manifest, reference,
                                                                    tmp_path):
    out = reference[0]
    meta = check_continuations(out, manifest=manifest)
    assert meta["complete"] and meta["manifest_sha256"] == manifest_sha256(manifest)
    other = _write_manifest(tmp_path / "dev.jsonl", TEXTS[:3])
    with pytest.raises(SpeechLMError, match=r"continuations in .*cont\.jsonl were written for "
                       r".*train\.jsonl \(sha256 .*\), not .*dev\.jsonl \(sha256 .*\)"):
        check_continuations(out, manifest=other)
    plain = tmp_path / "plain.jsonl"
    plain.write_text(out.read_text())
    with pytest.raises(SpeechLMError, match=r"no plain\.jsonl\.meta\.json beside it"):
        check_continuations(plain)


def test_cli_builds_continuations(llm_dir, manifest, reference, tmp_path, capsys):
    from speechlm.cli import main

    out = tmp_path / "cli.jsonl"
    argv = ["build", "continuations", "--llm", str(llm_dir), "--manifest", str(manifest),
            "--out", str(out), "--max-new-tokens", "6", "--max-prompt-tokens", "100",
            "--batch-size", "3", "--device", "cpu", "--no-progress"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert f"continued {reference[1].items} record(s)" in printed and "complete:" in printed
    assert _files(out) == _files(reference[0])
    assert main([*argv, "--max-prompt-tokens", "120"]) == 2  # the last value counts
    assert "built with max_prompt_tokens 100, not 120" in capsys.readouterr().err


def test_bf16_continuations_are_recorded_as_such(llm_dir, manifest, reference,
                                                                  tmp_path):
    out = tmp_path / "bf16.jsonl"
    build_continuations(llm_dir, manifest, out, **{**SETTINGS, "precision": "bf16"})
    assert json.loads(meta_path(out).read_text())["precision"] == "bf16"
    ids = [json.loads(line)["id"] for line in out.read_text().splitlines()]
    assert ids == [json.loads(line)["id"] for line in reference[0].read_text().splitlines()]
