"""Text-to-token (T2U) model: on synthetic units (each character maps to one or two fixed unit
ids) both decoders learn, beating the most-frequent-unit baseline by far on held-out texts;
MaskGIT decoding fills every slot on the cosine schedule; the saved directory reloads and
generates the same units; units files from two tokenizers or with bad units are rejected with
file:line; the runner writes final/ and results.json."""

import json
import random

import pytest
import torch

from speechlm.config import config_from_dict
from speechlm.errors import ConfigError, ManifestError
from speechlm.models.text_to_token import (
    TextToToken,
    TextToTokenConfig,
    build_vocab,
    collate_pairs,
    cosine_masked_count,
    load_text_to_token,
    save_text_to_token,
    training_mask,
)
from speechlm.recipes import load_recipe
from speechlm.recipes import text_to_token as runner

NUM_CODES = 64
TOKENIZER = "synthetic-vq-64@test"
TRAIN_LETTERS = "abcdefghijklmnoprstuvwy"  # no q, x, z: they stay unseen
_rng = random.Random(0)
# Vowels and liquids take two units, other characters one: the count depends on the character.
UNIT_MAP = {c: [_rng.randrange(NUM_CODES) for _ in range(2 if c in "aeioulmnr" else 1)]
            for c in "abcdefghijklmnopqrstuvwxyz "}
TINY = dict(d_model=64, num_heads=2, encoder_layers=2, decoder_layers=2, ff_dim=128, dropout=0.0)


def synthetic_pairs(n: int, seed: int, letters: str = TRAIN_LETTERS) -> list[tuple[str, list]]:
    rng = random.Random(seed)
    pairs = []
    for _ in range(n):
        words = ["".join(rng.choice(letters) for _ in range(rng.randint(2, 6)))
                 for _ in range(rng.randint(1, 3))]
        text = " ".join(words)
        pairs.append((text, [u for c in text for u in UNIT_MAP[c]]))
    return pairs


def write_units(path, pairs, *, tokenizer=TOKENIZER, extra=()):
    with open(path, "w", encoding="utf-8") as f:
        for i, (text, units) in enumerate(pairs):
            f.write(json.dumps({"id": f"{path.stem}-{i}", "text": text, "units": units,
                                "tokenizer": tokenizer, "num_codes": NUM_CODES,
                                "lang": "xx", "duration": len(units) / 12.5}) + "\n")
        for record in extra:
            f.write(json.dumps(record) + "\n")
    return path


def record(text="ab", units=(1, 2), tokenizer=TOKENIZER, num_codes=NUM_CODES, **kw):
    return {"id": text, "text": text, "units": list(units) if isinstance(units, tuple) else units,
            "tokenizer": tokenizer, "num_codes": num_codes, **kw}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The runner on 400 synthetic training pairs (+ an empty text and a text without units),
    both decoders on one encoder; dev: 60 other texts, one with unseen characters."""
    root = tmp_path_factory.mktemp("t2u")
    train = write_units(root / "train.jsonl", synthetic_pairs(400, seed=1), extra=[
        record(text="  ", units=(3,)), record(text="silence", units=[])])
    dev_pairs = synthetic_pairs(59, seed=2) + [("quiz", [u for c in "quiz" for u in UNIT_MAP[c]])]
    dev = write_units(root / "dev.jsonl", dev_pairs)
    config = config_from_dict(runner.Config, {
        "task": "text_to_token", "threads": 1,
        "model": {"decoder": "both", **TINY},
        "data": {"train": str(train), "dev": str(dev), "max_batch_tokens": 800},
        "train": {"max_steps": 180, "lr": 5e-3, "warmup_steps": 10, "log_every": 10,
                  "eval_every": 90, "save_every": 90, "output_dir": str(root / "run"),
                  "tensorboard": False, "progress": False},
        "eval": {"examples": 0},
    })
    results = runner.run(config)
    return root / "run", results, dev_pairs


# -- the runner, end to end ---------------------------------------------------------------------


def test_runner_writes_final_and_results_with_uer(trained):
    run_dir, results, dev_pairs = trained
    assert {p.name for p in (run_dir / "final").iterdir()} == {"config.json", "model.safetensors"}
    saved = json.loads((run_dir / "results.json").read_text())
    assert saved["tokenizer"] == TOKENIZER and saved["num_codes"] == NUM_CODES
    dev = saved["dev"]
    assert dev["scored"] == len(dev_pairs) == 60
    assert {"ar", "maskgit"} <= dev.keys() and dev["maskgit"]["steps"] == 16
    assert saved["data"]["train"]["skipped"] == {"empty_text": 1, "no_units": 1}
    assert saved["data"]["train_utterances"] == 400
    assert saved["data"]["dev_unseen_chars"] == {"q": 1, "z": 1}
    assert saved["data"]["dev_utterances_with_unseen_chars"] == 1
    assert saved["reload_identical"] is True
    hyps = [json.loads(line) for line in (run_dir / "dev_hyps.jsonl").read_text().splitlines()]
    assert len(hyps) == 60 and {"reference", "ar", "maskgit"} <= hyps[0].keys()
    assert results["dev"]["ar"]["uer"] == dev["ar"]["uer"]


def test_both_decoders_learn_and_beat_the_baseline_on_held_out_texts(trained):
    run_dir, results, _ = trained
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["split"] == "train"]
    for key in ("ar_nll", "maskgit_nll", "length_mae"):
        assert train[-1][key] < 0.3 * train[0][key], (key, train[0][key], train[-1][key])
    dev = results["dev"]
    # The baseline repeats the most frequent unit at the reference length: about 0.9 here.
    assert dev["baseline_uer"] > 0.8
    for decoder in ("ar", "maskgit"):
        assert dev[decoder]["uer"] < 0.5 * dev["baseline_uer"], (decoder, dev)
    assert dev["length"]["mae"] < 1.0 and dev["length"]["exact"] > 0.5
    evals = [r for r in rows if r["split"] == "eval"]
    assert [r["step"] for r in evals] == [90, 180]
    assert evals[-1]["ar_acc"] > 0.8 and evals[-1]["maskgit_acc"] > 0.6


# -- the saved model ----------------------------------------------------------------------------


def test_saved_model_reloads_and_generates_the_same_units(trained, tmp_path):
    run_dir, _, dev_pairs = trained
    t2u = load_text_to_token(run_dir / "final")
    assert (t2u.num_codes, t2u.tokenizer_identity) == (NUM_CODES, TOKENIZER)
    texts = [t for t, _ in dev_pairs[:20]] + [""]
    first = {m: t2u.generate(texts, method=m) for m in ("ar", "maskgit")}
    assert first["ar"][-1] == [] and all(first["ar"][:-1])
    assert all(0 <= u < NUM_CODES for row in first["maskgit"] for u in row)
    # Batching (padding) does not change what a text decodes to.
    assert first == {m: t2u.generate(texts, method=m, batch_size=3) for m in ("ar", "maskgit")}
    # Saving over an existing directory replaces it whole, leaving nothing beside it.
    out = tmp_path / "copy"
    save_text_to_token(t2u, out)
    save_text_to_token(t2u, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy"]
    again = load_text_to_token(out)
    assert first == {m: again.generate(texts, method=m) for m in ("ar", "maskgit")}
    assert t2u.generate(texts[:2]) == first["maskgit"][:2]  # method=None: maskgit when both


def test_unseen_chars_reports_characters_not_in_training_text(trained):
    t2u = load_text_to_token(trained[0] / "final")
    assert t2u.unseen_chars("a quiz, ok") == {"q", "z", ","}
    assert t2u.unseen_chars("bad dog") == set()
    assert t2u.generate(["quiz"], method="ar")[0]  # unseen characters map to <unk>, still decode


def test_a_damaged_model_directory_is_refused(trained, tmp_path):
    from speechlm.errors import SpeechLMError

    with pytest.raises(SpeechLMError, match="not a text-to-token model directory"):
        load_text_to_token(tmp_path)
    t2u = load_text_to_token(trained[0] / "final")
    out = save_text_to_token(t2u, tmp_path / "m")
    config = json.loads((out / "config.json").read_text())
    config["model"]["decoder"] = "ar"  # the weights hold both decoders
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(SpeechLMError, match="weights do not fit config.json"):
        load_text_to_token(out)


# -- MaskGIT ------------------------------------------------------------------------------------


def test_cosine_schedule_counts():
    assert [cosine_masked_count(10, t, 4) for t in range(5)] == [10, 9, 7, 3, 0]
    for length in (1, 2, 7, 40):
        for steps in (1, 2, 5, 16):
            counts = [cosine_masked_count(length, t, steps) for t in range(steps + 1)]
            assert counts[0] == length and counts[-1] == 0
            assert all(a >= b for a, b in zip(counts, counts[1:], strict=False))
            tensor = cosine_masked_count(torch.tensor([length]), 1, steps)
            assert tensor.tolist() == [counts[1]]
    with pytest.raises(ValueError):
        cosine_masked_count(10, 5, 4)


def test_training_masks_follow_the_cosine_ratio_and_spare_padding():
    lengths = torch.tensor([40] * 2000 + [1])
    masked = training_mask(lengths, 40, torch.Generator().manual_seed(0))
    counts = masked.sum(-1).float()
    assert counts.min() >= 1 and masked[-1, 1:].sum() == 0  # padding never masked
    # E[cos(pi/2 u)] = 2/pi for u ~ U(0, 1)
    assert abs(counts[:-1].mean() / 40 - 2 / torch.pi) < 0.02


def test_maskgit_decoding_fills_every_slot_on_the_schedule(trained):
    t2u = load_text_to_token(trained[0] / "final")
    texts = ["ab", "bread and butter", "pool"]
    seen = []

    def on_step(step, tokens, lengths):
        valid = torch.arange(tokens.shape[1]) < lengths[:, None]
        still = ((tokens == t2u.num_codes) & valid).sum(-1)
        seen.append((step, still.tolist(), [cosine_masked_count(int(n), step, 5)
                                            for n in lengths]))

    rows = t2u.generate(texts, method="maskgit", steps=5, on_step=on_step)
    assert [s for s, _, _ in seen] == [1, 2, 3, 4, 5]
    for _, still, expected in seen:
        assert still == expected
    assert seen[-1][1] == [0, 0, 0]
    predicted = [max(1, round(x)) for x in t2u.predict_lengths(texts)]
    assert [len(r) for r in rows] == predicted
    assert all(0 <= u < t2u.num_codes for r in rows for u in r)


# -- one decoder per model -------------------------------------------------------------------


@pytest.fixture(scope="module")
def briefly_trained():
    """(decoder, length_regulator) -> (model, per-update losses of its decoder) after 40 updates
    on 200 pairs, outside the runner; memoised."""
    done = {}

    def train(decoder: str, regulator: bool = True):
        if (decoder, regulator) in done:
            return done[decoder, regulator]
        pairs = synthetic_pairs(200, seed=3)
        vocab = build_vocab(t for t, _ in pairs)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        torch.manual_seed(0)
        config = TextToTokenConfig(decoder=decoder, length_regulator=regulator, **TINY)
        model = TextToToken(config, vocab, num_codes=NUM_CODES, tokenizer_identity=TOKENIZER)
        items = [{"text_ids": vocab.encode(t)[0], "units": u} for t, u in pairs]
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
        rng = random.Random(0)
        losses = []
        try:
            for _ in range(40):
                loss, metrics = model.loss(collate_pairs(rng.sample(items, 16)))
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                losses.append(float(metrics[f"{decoder}_nll"]))
        finally:
            torch.set_num_threads(threads)
        done[decoder, regulator] = model, losses
        return model, losses

    return train


def _mean(values):
    return sum(values) / len(values)


@pytest.mark.parametrize("decoder", ["ar", "maskgit"])
def test_a_single_decoder_model_trains_and_has_only_its_decoder(decoder, briefly_trained):
    model, losses = briefly_trained(decoder)
    assert _mean(losses[-5:]) < 0.6 * _mean(losses[:5]), losses
    other = "maskgit" if decoder == "ar" else "ar"
    assert not any(k.startswith(other) for k in model.state_dict())
    assert len(model.generate(["abc"])) == 1
    with pytest.raises(ConfigError, match=f"no '{other}' decoder"):
        model.generate(["abc"], method=other)


def test_the_length_regulator_speeds_up_learning(briefly_trained):
    """Without it MaskGIT must find the alignment by cross-attention alone: after the same 40
    updates its loss is still far above the regulated model's."""
    _, with_regulator = briefly_trained("maskgit", True)
    model, without = briefly_trained("maskgit", False)
    assert not any(k.startswith("unit_offset") for k in model.state_dict())
    assert _mean(without[-5:]) < _mean(without[:5])
    assert _mean(without[-5:]) > 1.5 * _mean(with_regulator[-5:]), (without, with_regulator)


# -- units files --------------------------------------------------------------------------------


def _read(path):
    return runner.read_units([path], runner.UnitsReport())


def test_units_from_two_tokenizers_are_rejected_with_file_and_line(tmp_path):
    path = write_units(tmp_path / "units.jsonl", synthetic_pairs(2, seed=0),
                       extra=[record(tokenizer="other-vq@2")])
    with pytest.raises(ManifestError, match=r"units\.jsonl:3: .*two tokenizers; tokenize "
                                            "everything with one"):
        _read(path)
    other_size = write_units(tmp_path / "sizes.jsonl", [], extra=[
        record(), record(num_codes=128)])
    with pytest.raises(ManifestError, match=r"sizes\.jsonl:2: num_codes 128 differs"):
        _read(other_size)
    # ... also across files: a dev file of another tokenizer than the training file
    report = runner.UnitsReport()
    runner.read_units([write_units(tmp_path / "a.jsonl", [], extra=[record()])], report)
    with pytest.raises(ManifestError, match=r"b\.jsonl:1: .*two tokenizers"):
        runner.read_units([write_units(tmp_path / "b.jsonl", [],
                                       extra=[record(tokenizer="x")])], report)


@pytest.mark.parametrize("units, message", [
    ([1, -1], r"units\[1\] = -1 is not an integer in \[0, 64\)"),
    ([64], r"units\[0\] = 64 is not an integer in \[0, 64\)"),
    ([1.5], r"units\[0\] = 1.5"),
    ([True], r"units\[0\] = True"),
    ("1 2 3", r"'units' must be a list of integers, got str"),
])
def test_bad_units_are_rejected_with_file_and_line(tmp_path, units, message):
    path = write_units(tmp_path / "units.jsonl", [("ab", [1, 2])], extra=[record(units=units)])
    with pytest.raises(ManifestError, match=r"units\.jsonl:2: " + message) as info:
        _read(path)
    assert "speechlm build tokenize" in str(info.value)


def test_lines_without_text_or_units_are_rejected_and_empty_ones_skipped(tmp_path):
    no_text = {k: v for k, v in record().items() if k != "text"}
    with pytest.raises(ManifestError, match=r"x\.jsonl:1: no 'text' field"):
        _read(write_units(tmp_path / "x.jsonl", [], extra=[no_text]))
    no_units = {k: v for k, v in record().items() if k != "units"}
    with pytest.raises(ManifestError, match=r"y\.jsonl:1: no 'units' field"):
        _read(write_units(tmp_path / "y.jsonl", [], extra=[no_units]))
    report = runner.UnitsReport()
    kept = runner.read_units([write_units(tmp_path / "z.jsonl", [], extra=[
        record(), record(text=""), record(text="ab", units=[]), record(units=[1] * 9)])],
        report, max_units=8)
    assert [u.text for u in kept] == ["ab"]
    assert report.skipped == {"empty_text": 1, "no_units": 1, "over_max_units": 1}


def test_held_out_utterances_depend_on_ids_not_on_file_order():
    utts = [runner.Utterance(f"utt{i}", "ab", [1]) for i in range(100)]
    train, dev = runner.hold_out(utts, 5)
    assert len(dev) == 5 and len(train) == 95
    assert not {u.id for u in dev} & {u.id for u in train}
    _, dev_reversed = runner.hold_out(utts[::-1], 5)
    assert {u.id for u in dev_reversed} == {u.id for u in dev}
    assert len(runner.hold_out(utts, 50)[1]) == 10  # at most a tenth


def test_unit_error_rate_and_baseline():
    assert runner.unit_error_rate([[1, 2, 3, 4]], [[1, 3, 4, 5]]) == 0.5
    assert runner.unit_error_rate([[1, 2], [3]], [[1, 2], []]) == 1 / 3
    assert runner.baseline_uer([[7, 7, 1]], [[7, 2, 3, 7]]) == 0.5


def test_tiny_recipe_loads_and_needs_units_or_a_tokenizer(tmp_path):
    module, config = load_recipe("recipes/tiny/text_to_token.yaml",
                                 [f"data.train={tmp_path / 'u.jsonl'}",
                                  f"train.output_dir={tmp_path}"])
    assert module is runner and config.data.train_files() == [str(tmp_path / "u.jsonl")]
    assert config.model.decoder == "both"
    assert config.data.tokenizer == "zoo:speech_tokenizer_en"  # the zoo's, when train is null
    _, no_data = load_recipe("recipes/tiny/text_to_token.yaml", ["data.tokenizer=null"])
    with pytest.raises(ConfigError, match="data.train: give the units JSONL"):
        runner.run(no_data)
    with pytest.raises(ConfigError, match="multiple of 2 x num_heads"):
        TextToTokenConfig(d_model=66, num_heads=4)


@pytest.mark.parametrize("sparse", [
    {"kind": "sltrain", "rank": 8, "alpha": 8, "density": 0.05},
    {"kind": "spdf", "sparsity": 0.75, "dense_after_steps": 40},
])
def test_sparse_lowrank_trains_and_saves_a_plain_model(tmp_path, sparse):
    """sparse_lowrank on the attention and feed-forward projections (runner.T2U_TARGETS):
    the loss falls, results.json reports the parameters, final/ reloads as the plain model
    (SPDF's masked entries trained after its switch to dense at update 40)."""
    from torch import nn

    from speechlm.models.sparse_lowrank import matching_linears
    from speechlm.testing.runs import train_losses

    train = write_units(tmp_path / "train.jsonl", synthetic_pairs(200, seed=1))
    config = config_from_dict(runner.Config, {
        "task": "text_to_token", "threads": 1, "sparse_lowrank": sparse,
        "model": {"decoder": "ar", **TINY},
        "data": {"train": str(train), "dev_items": 20, "max_batch_tokens": 800},
        "train": {"max_steps": 60, "lr": 5e-3, "warmup_steps": 5, "log_every": 5,
                  "eval_every": 60, "save_every": 60, "output_dir": str(tmp_path / "run"),
                  "tensorboard": False, "progress": False},
        "eval": {"examples": 0},
    })
    results = runner.run(config)
    losses = train_losses(tmp_path / "run")
    assert losses[-1] < 0.7 * losses[0], losses
    model = load_text_to_token(tmp_path / "run" / "final")
    projections = [m for _, m in matching_linears(model, runner.T2U_TARGETS)]
    assert len(projections) == 2 * 5 + 2 * 8  # per block q, kv, out, 2 ff; + cross-attention
    assert all(type(m) is nn.Linear for m in projections)
    report = results["sparse_lowrank"]
    dense = sum(p.numel() for p in model.parameters())
    if sparse["kind"] == "sltrain":
        assert report["trainable"] < 0.7 * dense
    else:
        assert report["spdf_masked"] > 0.5 * sum(m.weight.numel() for m in projections)
        zeros = sum(int((m.weight == 0).sum()) for m in projections)
        assert zeros < 0.01 * report["spdf_masked"]  # the dense phase trained them
