"""`speechlm infer` and `speechlm eval` on a saved tiny CTC model, greedy decoding, long audio."""

import json

import numpy as np
import pytest
import soundfile as sf
import torch

from speechlm.cli import main
from speechlm.inference.ctc import CTCTranscriber, GreedyCTCDecoder
from speechlm.inference.transcriber import fixed_windows
from speechlm.models.ctc import build_char_vocab, load_ctc_model, save_ctc_model

TEXTS = ["one two three", "a cat and a dog", "good night moon", "the sun is hot"]
TINY = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
        "intermediate_size": 64, "conv_dim": [32, 32, 32, 32], "conv_kernel": [10, 8, 4, 4],
        "conv_stride": [5, 4, 4, 4], "num_conv_pos_embeddings": 16,
        "num_conv_pos_embedding_groups": 4}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A synthesized manifest and a saved tiny CTC model whose output varies frame by frame."""
    from speechlm.pipelines.synth import synthesize_corpus

    root = tmp_path_factory.mktemp("infer")
    items = [{"id": f"u{i}", "text": t, "voice": "en-us+m1", "lang": "en"}
             for i, t in enumerate(TEXTS)]
    synthesize_corpus(items, root / "data", rate=170, progress=False, strict=True)
    manifest = root / "data" / "manifest.jsonl"
    vocab = build_char_vocab([manifest], "en")
    torch.manual_seed(0)
    model = load_ctc_model("scratch", vocab, scratch_config=TINY)
    with torch.no_grad():
        torch.nn.init.normal_(model.lm_head.weight, std=1.0)
        model.lm_head.bias[1:4] = -100.0  # never <s>, </s>, <unk>: HF's decode would spell them
    model_dir = save_ctc_model(model, vocab, root / "model")
    return {"root": root, "manifest": manifest, "model": model_dir, "vocab": vocab}


def _hf_greedy(model_dir, path):
    """What transformers' own pipeline (processor + model + batch_decode) transcribes."""
    from transformers import AutoModelForCTC, Wav2Vec2Processor

    processor = Wav2Vec2Processor.from_pretrained(model_dir)
    model = AutoModelForCTC.from_pretrained(model_dir).eval()
    wave, sr = sf.read(path, dtype="float32")
    inputs = processor(wave, sampling_rate=sr, return_tensors="pt")
    with torch.no_grad():
        ids = model(**inputs).logits.argmax(-1)
    return " ".join(processor.batch_decode(ids)[0].split())


def _read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_greedy_decoder_merges_repeats_and_drops_blanks():
    tokens = ["<pad>", "<s>", "</s>", "<unk>", "|", "a", "b"]
    decoder = GreedyCTCDecoder(tokens)
    frames = [5, 5, 0, 5, 6, 4, 4, 6, 6, 3, 0, 4]  # a a _ a b | | b b <unk> _ |
    scores = torch.nn.functional.one_hot(torch.tensor([frames, frames]), len(tokens)).float()
    assert decoder.decode(scores, torch.tensor([12, 5])) == ["aab b", "aab"]
    assert decoder.decode_ids([0, 0, 4, 0]) == ""
    with pytest.raises(ValueError, match="blank token"):
        GreedyCTCDecoder(["a", "b"])


def test_fixed_windows_cover_the_audio():
    assert fixed_windows(100, 10, 20.0) == [(0, 100)]
    windows = fixed_windows(1000, 100, 3.0)  # 10 s in windows of at most 3 s
    assert windows == [(0, 250), (250, 500), (500, 750), (750, 1000)]


def test_infer_manifest_matches_transformers_and_eval_scores_it(setup, capsys):
    out = setup["root"] / "hyps.jsonl"
    assert main(["infer", "--model", str(setup["model"]), "--manifest", str(setup["manifest"]),
                 "--out", str(out), "--batch-duration", "0.5", "--quiet"]) == 0
    rows = _read(out)
    assert sorted(r["id"] for r in rows) == ["u0", "u1", "u2", "u3"]
    audio_dir = setup["root"] / "data" / "audio"
    for row in rows:
        assert set(row) == {"id", "text", "audio_s", "decode_s"} and row["audio_s"] > 0.5
        assert row["text"] == _hf_greedy(setup["model"], audio_dir / f"{row['id']}.flac")
    assert any(row["text"] for row in rows)

    from speechlm.eval.metrics import cer, wer

    refs = {f"u{i}": t for i, t in enumerate(TEXTS)}
    capsys.readouterr()
    assert main(["eval", "--hyp", str(out), "--ref", str(setup["manifest"]), "--json"]) == 0
    scores = json.loads(capsys.readouterr().out)
    hyps = {row["id"]: row["text"] for row in rows}
    ids = sorted(refs)
    assert scores["scores"]["wer"] == pytest.approx(wer([refs[i] for i in ids],
                                                        [hyps[i] for i in ids], lang="en"))
    assert scores["scores"]["cer"] == pytest.approx(cer([refs[i] for i in ids],
                                                        [hyps[i] for i in ids], lang="en"))
    assert scores["num_scored"] == 4 and scores["num_missing"] == 0

    # Perfect hypotheses: the table shows 0 % WER.
    perfect = setup["root"] / "perfect.jsonl"
    perfect.write_text("".join(json.dumps({"id": i, "text": t.upper() + "."}) + "\n"
                               for i, t in refs.items()))
    assert main(["eval", "--hyp", str(perfect), "--ref", str(setup["manifest"]),
                 "--metric", "wer", "cer", "bleu"]) == 0
    table = capsys.readouterr().out
    assert "wer" in table and "0.00%" in table and "bleu" in table


def test_infer_resumes_and_reports_unreadable_audio(setup, capsys):
    manifest = setup["root"] / "data" / "with_missing.jsonl"
    records = _read(setup["manifest"])
    records.append({"id": "gone", "audio": "audio/nope.flac", "duration": 1.0, "text": "x"})
    manifest.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = setup["root"] / "resumed.jsonl"
    transcriber = CTCTranscriber(setup["model"])
    summary = transcriber.transcribe_manifest(manifest, out, progress=False)
    assert summary.utterances == 5 and summary.failed == 1 and summary.rtf > 0
    assert "1 could not be read" in summary.summary()
    rows = _read(out)
    gone = next(r for r in rows if r["id"] == "gone")
    assert gone["text"] == "" and "file not found" in gone["error"]
    # A killed run: drop the last two lines (one torn), rerun: only those ids are added.
    lines = out.read_text().splitlines(keepends=True)
    out.write_text("".join(lines[:-2]) + lines[-2][:7])
    again = transcriber.transcribe_manifest(manifest, out, progress=False)
    assert again.already_done == 3 and again.utterances == 2
    assert sorted(r["id"] for r in _read(out)) == sorted(r["id"] for r in rows)


def test_a_chunk_of_only_unreadable_audio_is_reported_not_fatal(setup, tmp_path):
    manifest = tmp_path / "unreadable.jsonl"
    (tmp_path / "text.wav").write_text("not audio")
    manifest.write_text(json.dumps({"id": "t", "audio": str(tmp_path / "text.wav"),
                                    "duration": 1.0, "text": "x"}) + "\n")
    out = tmp_path / "hyps.jsonl"
    summary = CTCTranscriber(setup["model"]).transcribe_manifest(manifest, out, progress=False)
    assert summary.utterances == 1 and summary.failed == 1
    assert "unreadable or corrupt audio" in _read(out)[0]["error"]


def test_an_empty_manifest_is_an_error_not_zero_transcripts(setup, tmp_path, capsys):
    from speechlm.errors import ManifestError
    from speechlm.inference.generate_jsonl import requests_from_manifest
    from speechlm.inference.tasks import TaskPrompt

    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    assert main(["infer", "--model", str(setup["model"]), "--manifest", str(empty),
                 "--out", str(tmp_path / "o.jsonl")]) == 2
    assert "empty.jsonl: no records (empty, or blank lines only)" in capsys.readouterr().err
    with pytest.raises(ManifestError, match="empty.jsonl: no records"):
        requests_from_manifest(empty, TaskPrompt("asr"))


def test_infer_files_prints_texts_and_long_audio_is_stitched(setup, capsys):
    audio_dir = setup["root"] / "data" / "audio"
    files = [str(audio_dir / "u0.flac"), str(audio_dir / "u1.flac")]
    assert main(["infer", "--model", str(setup["model"]), *files]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split("\t")[0] for line in lines] == files

    # 3 utterances back to back (with silence between) transcribed in pieces of <= 2 s.
    waves = [sf.read(audio_dir / f"u{i}.flac", dtype="float32")[0] for i in range(3)]
    gap = np.zeros(8000, dtype=np.float32)
    long = np.concatenate([waves[0], gap, waves[1], gap, waves[2]])
    sf.write(setup["root"] / "long.wav", long, 16000)
    transcriber = CTCTranscriber(setup["model"], max_segment_s=2.0)
    row = transcriber.transcribe_files([setup["root"] / "long.wav"])[0]
    from speechlm.inference.transcriber import segment_ranges

    ranges = segment_ranges(torch.from_numpy(long), 16000, 2.0)
    assert len(ranges) >= 2 and all(b - a <= 2 * 16000 for a, b in ranges)
    pieces, _ = transcriber.transcribe_waves([torch.from_numpy(long[a:b]) for a, b in ranges])
    assert row["text"] == " ".join(p for p in pieces if p)
    assert row["audio_s"] == pytest.approx(len(long) / 16000, abs=1e-3)


def test_infer_with_the_beam_search_decoder(setup, capsys):
    pytest.importorskip("flashlight.lib.text")
    audio = str(setup["root"] / "data" / "audio" / "u0.flac")
    assert main(["infer", "--model", str(setup["model"]), "--decoder", "beam",
                 "--beam-size", "8", audio]) == 0
    beam_text = capsys.readouterr().out.strip()
    assert main(["infer", "--model", str(setup["model"]), audio]) == 0
    greedy_text = capsys.readouterr().out.strip()
    from speechlm.eval.metrics import cer

    # Lexicon-free beam search over the same emissions stays close to the best path.
    assert beam_text and cer([greedy_text], [beam_text]) < 0.5


def test_infer_errors_are_clear(setup, tiny_ckpt, tmp_path, capsys):
    assert main(["infer", "--model", str(tiny_ckpt("wav2vec2")), "x.wav"]) == 2
    assert "Wav2Vec2ForPreTraining model; speechlm infer runs CTC models" in capsys.readouterr().err
    assert main(["infer", "--model", str(tmp_path), "x.wav"]) == 2
    assert "not a model directory (no config.json)" in capsys.readouterr().err
    assert main(["infer", "--model", str(setup["model"])]) == 2
    assert "give audio files or --manifest" in capsys.readouterr().err
    assert main(["infer", "--model", str(setup["model"]), "--lm", "x.arpa", "a.wav"]) == 2
    assert "--decoder beam" in capsys.readouterr().err
    assert main(["infer", "--model", str(setup["model"]), "--manifest",
                 str(setup["manifest"])]) == 2
    assert "--manifest needs --out" in capsys.readouterr().err


def test_tune_lm_grid_reports_greedy_and_the_best_pair(setup, tmp_path, capsys):
    pytest.importorskip("flashlight.lib.text")
    text = tmp_path / "lm.txt"
    text.write_text("\n".join(TEXTS * 3) + "\n")
    lm, lexicon, out = tmp_path / "lm.arpa", tmp_path / "lex.txt", tmp_path / "tune.json"
    assert main(["build", "lm", "--text", str(text), "--order", "2", "--out", str(lm),
                 "--lexicon-out", str(lexicon), "--tokens", str(setup["model"])]) == 0
    assert main(["tune", "lm", "--model", str(setup["model"]), "--manifest",
                 str(setup["manifest"]), "--lm", str(lm), "--lexicon", str(lexicon),
                 "--lm-weights", "0", "2", "--word-scores", "-1", "1", "--beam-size", "8",
                 "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "WER % (rows lm_weight, columns word_score)" in printed and "greedy: WER" in printed
    result = json.loads(out.read_text())
    assert result["utterances"] == len(TEXTS) and len(result["grid"]) == 4
    best = min(result["grid"], key=lambda g: (g["wer"], g["cer"]))
    assert (result["lm_weight"], result["word_score"], result["wer"]) == \
        (best["lm_weight"], best["word_score"], best["wer"])
    # The greedy baseline is what `speechlm infer` transcribes, scored the same way.
    from speechlm.eval.metrics import wer

    paths = [str(setup["root"] / "data" / "audio" / f"u{i}.flac") for i in range(len(TEXTS))]
    greedy = [row["text"] for row in CTCTranscriber(setup["model"]).transcribe_files(paths)]
    assert result["greedy_wer"] == pytest.approx(wer(TEXTS, greedy))
    assert main(["tune", "lm", "--model", str(setup["model"]), "--manifest",
                 str(setup["manifest"]), "--lm", str(tmp_path / "missing.arpa")]) == 2
    assert "missing.arpa: file not found" in capsys.readouterr().err


def test_infer_and_eval_take_an_embedded_split(setup, small_corpus, tmp_path, capsys):
    from speechlm.cli import main

    out = tmp_path / "hyps.jsonl"
    assert main(["infer", "--model", str(setup["model"]), "--manifest", "embedded:en/test",
                 "--out", str(out), "--quiet"]) == 0
    assert len(_read(out)) == 4  # the small corpus's test split
    capsys.readouterr()
    assert main(["eval", "--hyp", str(out), "--ref", "embedded:en/test", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["num_scored"] == 4 and result["num_missing"] == 0
