"""GLM-4-Voice interleaved data: spans become speech at the set share, packed sequences decode
back to the documents (text tokenized as running text, unit runs equal to the T2U's output),
every row is seq_len ids, a killed or damaged job reruns to byte-identical shards, other
settings / T2U / tokenizer are refused by name, unseen characters stay text and are counted,
and the command runs end to end (with a fake T2U loader: the real T2U lives elsewhere)."""

import json
import sys
import types

import numpy as np
import pytest
from transformers import AutoTokenizer

from speechlm.cli import main as cli_main
from speechlm.data.text_corpus import load_verses
from speechlm.errors import ConfigError
from speechlm.models.unit_vocab import UnitVocab, add_unit_tokens
from speechlm.pipelines.interleave import (
    InterleaveSettings,
    build_interleave,
    iter_interleaved_shards,
)


class FakeT2U:
    """Units are the characters' code points (invertible, so a test can read the spoken text
    back); it has seen ASCII only."""

    num_codes = 128
    tokenizer_identity = "fake-ascii-t2u"

    def __init__(self, fail_on_call=None):
        self.batches: list[int] = []
        self.fail_on_call = fail_on_call

    def unseen_chars(self, text):
        return {c for c in text if ord(c) >= 128}

    def generate(self, texts, method=None):
        self.batches.append(len(texts))
        if self.fail_on_call == len(self.batches):
            raise KeyboardInterrupt("killed")
        return [[ord(c) for c in t] for t in texts]


def _ascii_verses(n, start=0):
    return [v.en.encode("ascii", "ignore").decode() for v in load_verses()[start:start + n]]


def _corpus(tmp_path, texts, name="corpus.jsonl"):
    path = tmp_path / name
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def llama_tok(tiny_ckpt):
    return tiny_ckpt("llama")


def _tok(path):
    return AutoTokenizer.from_pretrained(path)


def _files(out):
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.name != ".interleave.lock"}


def _docs_of_shard(block, eos_id):
    """The complete documents at the start of a shard's rows (the last is cut by packing)."""
    stream = block.reshape(-1).tolist()
    docs, start = [], 0
    for i, token in enumerate(stream):
        if token == eos_id:
            docs.append(stream[start:i])
            start = i + 1
    return docs


def _pieces(doc, vocab):
    """[("text", ids) | ("speech", units)] of one packed document."""
    pieces, i = [], 0
    while i < len(doc):
        if doc[i] == vocab.begin_id:
            end = doc.index(vocab.end_id, i)
            pieces.append(("speech", [vocab.code_of(t) for t in doc[i + 1:end]]))
            i = end + 1
        else:
            j = i
            while j < len(doc) and doc[j] != vocab.begin_id:
                j += 1
            pieces.append(("text", doc[i:j]))
            i = j
    return pieces


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_speech_share_and_packed_sequences_decode_back(tiny_ckpt, tmp_path, kind):
    texts = _ascii_verses(300)
    texts[7] = ""  # an empty document: skipped and counted
    tok = _tok(tiny_ckpt(kind))
    t2u = FakeT2U()
    settings = InterleaveSettings(speech_share=0.3, span_words=(2, 6), seq_len=64,
                                  docs_per_shard=100, seed=3)
    out = tmp_path / "il"
    summary = build_interleave(_corpus(tmp_path, texts), out, t2u=t2u, tokenizer=tok,
                               settings=settings, t2u_batch=16, progress=False)

    c = summary.counts
    assert (c.docs, c.empty, c.unseen_char_spans) == (299, 1, 0)
    assert c.speech_spans == sum(t2u.batches) and c.spans > 1000
    assert abs(c.speech_spans / c.spans - 0.3) < 0.04
    assert max(t2u.batches) == 16 and len(t2u.batches) < c.speech_spans / 4  # batched
    blocks = list(iter_interleaved_shards(out))
    assert [b.shape[1] for b in blocks] == [64] * len(blocks) and len(blocks) == 4
    assert all(b.dtype == np.uint32 for b in blocks)
    assert sum(len(b) for b in blocks) == summary.sequences
    assert summary.sequences * 64 + summary.dropped_tokens == c.tokens  # only the last bit lost
    assert summary.dropped_tokens < 64 and 0.15 < summary.unit_share < 0.6

    vocab = UnitVocab.load(out)
    # the ids training gets when it extends the LLM's own tokenizer
    assert vocab == add_unit_tokens(None, _tok(tiny_ckpt(kind)), FakeT2U.num_codes,
                                    tokenizer_identity=FakeT2U.tokenizer_identity)
    eos = tok.eos_token_id
    checked = speech_seen = 0
    for shard, block in enumerate(blocks[:3]):
        docs = [t for t in texts[shard * 100:(shard + 1) * 100] if t]
        for packed, text in zip(_docs_of_shard(block, eos), docs, strict=False):
            running = tok(text, add_special_tokens=False)["input_ids"]
            parts = []
            for kind_, ids in _pieces(packed, vocab):
                if kind_ == "speech":
                    spoken = "".join(map(chr, ids))
                    assert t2u.generate([spoken])[0] == ids and 1 <= len(spoken.split()) <= 6
                    parts.append(spoken)
                    speech_seen += 1
                else:
                    # each text span is a slice of the document tokenized as running text
                    assert any(running[k:k + len(ids)] == ids for k in range(len(running)))
                    parts.append(tok.decode(ids).strip())
            assert " ".join(parts) == " ".join(text.split())
            checked += 1
    assert checked > 150 and speech_seen > 100


def test_killed_or_damaged_job_reruns_to_identical_shards(llama_tok, tmp_path):
    corpus = _corpus(tmp_path, _ascii_verses(230))
    settings = InterleaveSettings(span_words=(2, 8), seq_len=48, docs_per_shard=50)
    reference = tmp_path / "reference"
    build_interleave(corpus, reference, t2u=FakeT2U(), tokenizer=_tok(llama_tok),
                     settings=settings, t2u_batch=8, progress=False)
    expected = _files(reference)
    assert {"shard-00004.npy", "shard-tail.npy", "unit_vocab.json"} <= set(expected)

    out = tmp_path / "killed"
    with pytest.raises(KeyboardInterrupt):  # killed while generating the third shard
        build_interleave(corpus, out, t2u=FakeT2U(fail_on_call=15), tokenizer=_tok(llama_tok),
                         settings=settings, t2u_batch=8, progress=False)
    assert (out / "shard-00000.json").exists() and not (out / "shard-00004.npy").exists()
    with pytest.raises(ConfigError, match="did not finish"):
        next(iter_interleaved_shards(out))
    again = build_interleave(corpus, out, t2u=FakeT2U(), tokenizer=_tok(llama_tok),
                             settings=settings, t2u_batch=8, progress=False)
    assert again.shards_kept >= 1 and again.shards_kept + again.shards_written == 5
    assert _files(out) == expected

    # damage: a shard's array gone, another's sidecar gone, a stray temporary file left
    (out / "shard-00001.npy").unlink()
    (out / "shard-00003.json").unlink()
    (out / ".shard-00002.npy.x1y2.tmp").write_bytes(b"half a shard")
    t2u = FakeT2U()
    again = build_interleave(corpus, out, t2u=t2u, tokenizer=_tok(llama_tok), settings=settings,
                             t2u_batch=8, progress=False)
    assert (again.shards_written, again.shards_kept) == (2, 3)
    assert _files(out) == expected  # byte-identical, no duplicates, temp file gone
    rewritten = sum(json.loads(expected[f"shard-0000{i}.json"])["speech_spans"] for i in (1, 3))
    assert sum(t2u.batches) == rewritten  # only the damaged shards were spoken again


def test_other_settings_t2u_or_tokenizer_are_refused_by_name(tiny_ckpt, llama_tok, tmp_path):
    corpus = _corpus(tmp_path, _ascii_verses(20))
    out = tmp_path / "il"
    settings = InterleaveSettings(seq_len=32, docs_per_shard=10)
    build_interleave(corpus, out, t2u=FakeT2U(), tokenizer=_tok(llama_tok), settings=settings,
                     progress=False)
    before = _files(out)
    with pytest.raises(ConfigError, match=r"other settings \(seq_len: 32 there, 64 now\)"):
        build_interleave(corpus, out, t2u=FakeT2U(), tokenizer=_tok(llama_tok),
                         settings=InterleaveSettings(seq_len=64, docs_per_shard=10),
                         progress=False)
    other_t2u = FakeT2U()
    other_t2u.tokenizer_identity = "another-vq"
    with pytest.raises(ConfigError, match="t2u_tokenizer_identity"):
        build_interleave(corpus, out, t2u=other_t2u, tokenizer=_tok(llama_tok),
                         settings=settings, progress=False)
    with pytest.raises(ConfigError, match="llm_tokenizer"):
        build_interleave(corpus, out, t2u=FakeT2U(), tokenizer=_tok(tiny_ckpt("qwen2")),
                         settings=settings, progress=False)
    assert _files(out) == before
    with pytest.raises(ConfigError, match="speech_share"):
        InterleaveSettings(speech_share=1.5)
    with pytest.raises(ConfigError, match="not an interleaved-data directory"):
        next(iter_interleaved_shards(tmp_path))


def test_unseen_characters_stay_text_and_are_counted(llama_tok, tmp_path):
    texts = ["In the beginning God created", "", "Привет мир and then more words", "   "]
    tok = _tok(llama_tok)
    out = tmp_path / "il"
    summary = build_interleave(_corpus(tmp_path, texts), out, t2u=FakeT2U(), tokenizer=tok,
                               settings=InterleaveSettings(speech_share=1.0, span_words=(2, 2),
                                                           seq_len=8),
                               progress=False)
    c = summary.counts
    assert (c.docs, c.empty, c.spans, c.unseen_char_spans, c.speech_spans) == (2, 2, 6, 1, 5)
    assert set(c.unseen_chars) == set("Приветмир") and repr(c.unseen_chars) in summary.summary()
    side = json.loads((out / "shard-00000.json").read_text())
    assert side["unseen_char_spans"] == 1 and side["empty"] == 2
    vocab = UnitVocab.load(out)
    ids = np.concatenate(list(iter_interleaved_shards(out))).reshape(-1).tolist()
    second = ids[ids.index(tok.eos_token_id) + 1:]
    assert tok.decode(second[:second.index(vocab.begin_id)]).strip() == "Привет мир"


def test_cli_builds_and_refuses(llama_tok, tmp_path, capsys, monkeypatch):
    fake_module = types.ModuleType("speechlm.models.text_to_token")
    fake_module.load_text_to_token = lambda path: FakeT2U()
    monkeypatch.setitem(sys.modules, "speechlm.models.text_to_token", fake_module)
    t2u_dir = tmp_path / "t2u"
    t2u_dir.mkdir()
    corpus = _corpus(tmp_path, _ascii_verses(40))
    out = tmp_path / "cli"

    def args(**changed):
        options = {"corpus": corpus, "t2u": str(t2u_dir), "llm": str(llama_tok), "out": str(out),
                   "span-words": "2:6", "seq-len": "64", "docs-per-shard": "16", **changed}
        return ["build", "interleave", *(x for k, v in options.items() for x in (f"--{k}", v)),
                "--no-progress"]

    assert cli_main(args()) == 0
    printed = capsys.readouterr().out
    assert "documents: 40" in printed and "sequences of 64 in 4 shard(s)" in printed
    assert sum(len(b) for b in iter_interleaved_shards(out)) > 0
    assert cli_main(args(**{"seq-len": "32"})) == 2
    assert "seq_len: 64 there, 32 now" in capsys.readouterr().err
    assert cli_main(args(t2u=str(tmp_path / "none"))) == 2
    assert "--t2u model directory not found" in capsys.readouterr().err
    assert cli_main(args(**{"span-words": "6:2"})) == 2
    assert "span_words" in capsys.readouterr().err


class StepsT2U(FakeT2U):
    """A MaskGIT-like T2U: records the iterations each call asked for."""

    def __init__(self):
        super().__init__()
        self.steps: list = []

    def generate(self, texts, method=None, steps=None):
        self.steps.append(steps)
        return super().generate(texts, method)


def test_t2u_steps_reach_the_model_and_fix_the_output_directory(llama_tok, tmp_path):
    corpus = _corpus(tmp_path, _ascii_verses(20))
    settings = InterleaveSettings(seq_len=32, docs_per_shard=10)
    default, chosen = StepsT2U(), StepsT2U()
    build_interleave(corpus, tmp_path / "default", t2u=default, tokenizer=_tok(llama_tok),
                     settings=settings, progress=False)
    build_interleave(corpus, tmp_path / "two", t2u=chosen, tokenizer=_tok(llama_tok),
                     settings=settings, t2u_steps=2, progress=False)
    assert default.steps and set(default.steps) == {None}  # the model's own default
    assert chosen.steps and set(chosen.steps) == {2}
    with pytest.raises(ConfigError, match=r"other settings \(t2u_steps: 2 there, 4 now\)"):
        build_interleave(corpus, tmp_path / "two", t2u=StepsT2U(), tokenizer=_tok(llama_tok),
                         settings=settings, t2u_steps=4, progress=False)
    with pytest.raises(ConfigError, match=r"other settings \(t2u_steps: 2 there, None now\)"):
        build_interleave(corpus, tmp_path / "two", t2u=StepsT2U(), tokenizer=_tok(llama_tok),
                         settings=settings, progress=False)
    with pytest.raises(ConfigError, match="t2u_steps must be >= 1"):
        build_interleave(corpus, tmp_path / "zero", t2u=StepsT2U(), tokenizer=_tok(llama_tok),
                         settings=settings, t2u_steps=0, progress=False)
