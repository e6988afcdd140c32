"""SALT (speechlm.training.salt): the KD formula, the data-selection score, the exact switch
to plain CE at salt.kd_steps (also across a kill), the KD phase's sampler, config errors."""

import json
import math

import pytest
import torch

from speechlm.data.sampler import DurationBucketSampler
from speechlm.data.switch_sampler import IndexMapBatchSampler, SwitchBatchSampler
from speechlm.errors import ConfigError
from speechlm.training import checkpoint
from speechlm.training.metrics_log import read_metrics
from speechlm.training.objectives.causal_lm import (
    CausalLMCollator,
    CausalLMObjective,
    TokenDataset,
)
from speechlm.training.salt import (
    SALTConfig,
    SALTDistiller,
    SelectionConfig,
    kd_token_losses,
    salt_loss,
    select_sequences,
    sequence_scores,
)
from speechlm.training.trainer import TrainConfig, Trainer

# -- formulas, against hand-computed values ----------------------------------------------


def test_kd_term_is_tau_squared_kl_of_the_softened_distributions():
    # teacher softmax([ln 3, 0]) = (0.75, 0.25); student softmax([0, 0]) = (0.5, 0.5)
    teacher = torch.tensor([[math.log(3.0), 0.0]])
    student = torch.tensor([[0.0, 0.0]])
    kl = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)  # 0.130812...
    assert kd_token_losses(student, teacher, 1.0).item() == pytest.approx(kl, rel=1e-6)
    # tau = 2: teacher softmax([ln 3 / 2, 0]) = (sqrt3, 1) / (sqrt3 + 1); student stays uniform
    p = math.sqrt(3) / (math.sqrt(3) + 1)
    kl2 = p * math.log(p / 0.5) + (1 - p) * math.log((1 - p) / 0.5)
    assert kd_token_losses(student, teacher, 2.0).item() == pytest.approx(4 * kl2, rel=1e-6)
    assert kd_token_losses(teacher, teacher, 1.0).item() == pytest.approx(0.0, abs=1e-7)


@pytest.mark.parametrize("temperature", [1.0, 2.0, 0.5])
@pytest.mark.parametrize("weight", [0.25, 1.0])
def test_fused_loss_and_its_gradient_match_autograd_through_the_definition(temperature, weight):
    # salt_loss writes its gradient out by hand; autograd through CE and kd_token_losses is
    # the reference (logits spread as a trained model's are, 3 of 64 rows very peaked)
    torch.manual_seed(0)
    student = (torch.randn(64, 300) * 3).requires_grad_()
    teacher = torch.randn(64, 300) * 4
    teacher[:3, 7] = 60.0
    targets = torch.randint(0, 300, (64,))
    loss, ce, kd = salt_loss(student, teacher, targets, weight=weight, temperature=temperature)
    (2.0 * loss).backward()
    reference = student.detach().clone().requires_grad_()
    ref_ce = torch.nn.functional.cross_entropy(reference, targets)
    ref_kd = kd_token_losses(reference, teacher, temperature).mean()
    (2.0 * ((1 - weight) * ref_ce + weight * ref_kd)).backward()
    assert ce.item() == pytest.approx(ref_ce.item(), rel=1e-5)
    assert kd.item() == pytest.approx(ref_kd.item(), rel=1e-5)
    assert torch.allclose(student.grad, reference.grad, atol=1e-7, rtol=1e-5)
    assert not ce.requires_grad and not kd.requires_grad  # metrics only


def test_a_reused_probability_buffer_changes_nothing():
    # the objective hands salt_loss one buffer for every KD-phase update, larger than a
    # batch with fewer learned tokens needs; the backward must read this update's values
    torch.manual_seed(1)
    distiller = SALTDistiller(torch.nn.Linear(1, 1), SALTConfig(teacher="t", kd_steps=1))
    for rows in (40, 25):
        student = torch.randn(rows, 50, requires_grad=True)
        teacher, targets = torch.randn(rows, 50) * 3, torch.randint(0, 50, (rows,))
        buffer = distiller.probs_buffer(rows, 50, "cpu")
        loss, _, kd = salt_loss(student, teacher, targets, weight=0.5, temperature=2.0,
                                probs_buffer=buffer)
        loss.backward()
        reference = student.detach().clone().requires_grad_()
        ref_loss, _, ref_kd = salt_loss(reference, teacher, targets, weight=0.5, temperature=2.0)
        ref_loss.backward()
        assert kd.item() == ref_kd.item()
        assert torch.equal(student.grad, reference.grad)
    assert distiller.probs_buffer(25, 50, "cpu").data_ptr() == buffer.data_ptr()  # reused
    distiller.release_buffer()
    assert distiller.probs_buffer(25, 50, "cpu").numel() == 25 * 50


def test_kd_phase_loss_mixes_ce_and_kd_by_the_weight():
    teacher = torch.tensor([[math.log(3.0), 0.0]])
    student = torch.tensor([[0.0, 0.0]], requires_grad=True)
    loss, ce, kd = salt_loss(student, teacher, torch.tensor([1]), weight=0.25, temperature=1.0)
    kl = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    assert ce.item() == pytest.approx(math.log(2), rel=1e-6)
    # the fused loss takes the teacher's log-sum-exp from its top probability: float32's
    # rounding of log p_max (1e-7 absolute) is what separates it from the hand value
    assert kd.item() == pytest.approx(kl, abs=3e-7)
    assert loss.item() == pytest.approx(0.75 * math.log(2) + 0.25 * kl, abs=3e-7)
    loss.backward()
    # d/dz of 0.75 CE(gold 1) + 0.25 KL(t || s) = 0.75 (s - onehot) + 0.25 (s - t)
    expected = 0.75 * torch.tensor([0.5, -0.5]) + 0.25 * torch.tensor([0.5 - 0.75, 0.5 - 0.25])
    assert torch.allclose(student.grad[0], expected, atol=1e-6)


def test_sequence_score_is_the_median_teacher_loss_over_learnable_tokens():
    # 3 tokens of row 0, 2 of row 1, 1 of row 2; vocabulary of 4, top_k = 2
    logits = torch.log(torch.tensor([
        [0.4, 0.3, 0.2, 0.1],   # gold 1: rank 2 -> learnable, loss -ln 0.3
        [0.1, 0.2, 0.3, 0.4],   # gold 0: rank 4 -> not learnable
        [0.25, 0.25, 0.4, 0.1],  # gold 0: tied 2nd -> learnable, loss -ln 0.25
        [0.7, 0.1, 0.1, 0.1],   # gold 0: rank 1, loss -ln 0.7
        [0.5, 0.3, 0.1, 0.1],   # gold 1: rank 2, loss -ln 0.3
        [0.1, 0.2, 0.3, 0.4],   # gold 0: not learnable -> row 2 has nothing learnable
    ]))
    targets = torch.tensor([1, 0, 0, 0, 1, 0])
    rows = torch.tensor([0, 0, 0, 1, 1, 2])
    scores = sequence_scores(logits, targets, rows, 3, top_k=2)
    assert scores[0].item() == pytest.approx((-math.log(0.3) - math.log(0.25)) / 2)
    assert scores[1].item() == pytest.approx((-math.log(0.7) - math.log(0.3)) / 2)
    assert math.isnan(scores[2].item())


def test_selection_keeps_scores_at_or_above_the_median_never_nan():
    scores = torch.tensor([1.0, 4.0, float("nan"), 2.0, 3.0])
    assert select_sequences(scores, 0.5).tolist() == [False, True, False, False, True]
    assert select_sequences(scores, 1.0).tolist() == [True, True, False, True, True]
    # 0.25 keeps the top quarter: threshold = 0.75 quantile of (1, 2, 3, 4) = 3.25
    assert select_sequences(scores, 0.25).tolist() == [False, True, False, False, False]
    assert not select_sequences(torch.tensor([float("nan")]), 0.5).any()


def test_config_errors_name_the_field_and_the_fix():
    from speechlm.recipes import text_lm

    with pytest.raises(ConfigError, match="salt.teacher is empty: name the smaller teacher"):
        SALTConfig(kd_steps=10)
    with pytest.raises(ConfigError, match=r"salt.kd_steps must be an integer >= 1.*salt: null"):
        SALTConfig(teacher="t", kd_steps=0)
    with pytest.raises(ConfigError, match=r"salt.kd_weight must be in \(0, 1\]"):
        SALTConfig(teacher="t", kd_steps=5, kd_weight=1.5)
    with pytest.raises(ConfigError, match="salt.temperature must be a number > 0"):
        SALTConfig(teacher="t", kd_steps=5, temperature=0)
    with pytest.raises(ConfigError, match="salt.selection.top_k must be an integer >= 1"):
        SALTConfig(teacher="t", kd_steps=5, selection={"top_k": 0})
    with pytest.raises(ConfigError, match=r"salt.selection.keep_fraction must be in \(0, 1\]"):
        SelectionConfig(keep_fraction=0.0)
    with pytest.raises(ConfigError, match="salt.kd_steps=1000 >= train.max_steps=1000: .* "
                                          "lower salt.kd_steps"):
        text_lm.Config(salt={"teacher": "t", "kd_steps": 1000})


def test_a_teacher_with_another_vocabulary_is_refused(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from speechlm.recipes.text_lm_salt import load_teacher

    LlamaForCausalLM(LlamaConfig(**TINY_LLAMA, vocab_size=VOCAB + 1)).save_pretrained(tmp_path)
    tokenizer = type("T", (), {"__len__": lambda self: VOCAB})()
    with pytest.raises(ConfigError, match=r"salt.teacher=.*vocabulary of 33 tokens, the "
                                          r"student's has 32; .*same tokenizer settings"):
        load_teacher(SALTConfig(teacher=str(tmp_path), kd_steps=2), tokenizer, "eager",
                     progress=False)


# -- the switch, the KD phase's sampler and resume --------------------------------------

VOCAB = 32
TINY_LLAMA = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                  num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)


def _llama(seed: int, hidden: int = 16):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(**{**TINY_LLAMA, "hidden_size": hidden}, vocab_size=VOCAB)
    model = LlamaForCausalLM(config)
    model.set_attn_implementation("eager")
    return model


def _items(n: int = 24):
    g = torch.Generator().manual_seed(0)
    items = []
    for i in range(n):
        length = 6 + i % 5
        ids = torch.randint(3, VOCAB, (length,), generator=g).tolist()
        items.append({"input_ids": ids, "labels": [-100] + ids[1:]})
    return items


def _bucket(lengths, seed=0):
    return DurationBucketSampler(lengths, max_batch_duration=40, num_buckets=2, seed=seed)


def _switch_sampler(keep):
    lengths = [len(item["input_ids"]) for item in _items()]
    kept = [i for i, flag in enumerate(keep) if flag]
    first = IndexMapBatchSampler(_bucket([lengths[i] for i in kept], seed=1), kept)
    return SwitchBatchSampler(first, _bucket(lengths), switch_batches=4)


KEEP = [i % 3 != 0 for i in range(24)]


def test_switch_sampler_draws_the_first_batches_from_the_subset_then_the_rest():
    sampler = _switch_sampler(KEEP)
    sampler.set_epoch(0)
    batches = list(sampler)
    assert all(KEEP[i] for b in batches[:4] for i in b)
    plain = _bucket([len(item["input_ids"]) for item in _items()])
    plain.set_epoch(0)
    assert batches[4:] == list(plain)[4:]      # the recipe's own batches from the switch on
    sampler.set_epoch(1)
    plain.set_epoch(1)
    assert list(sampler) == list(plain)       # later epochs are the recipe's alone


@pytest.mark.parametrize("cut", [2, 6])  # inside the KD-phase subset, after the switch
def test_switch_sampler_resumes_mid_epoch(cut):
    sampler = _switch_sampler(KEEP)
    sampler.set_epoch(0)
    full = list(sampler)
    it = iter(sampler)
    consumed = [next(it) for _ in range(cut)]
    state = json.loads(json.dumps(sampler.state_dict(num_consumed=cut)))
    fresh = _switch_sampler(KEEP)
    fresh.load_state_dict(state)
    fresh.set_epoch(0)
    assert consumed + list(fresh) == full
    with pytest.raises(ValueError, match="selected subset"):
        _switch_sampler([True] * 24).load_state_dict(state)


class _Crashing(CausalLMObjective):
    def __init__(self, *args, fail_on_call=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls, self.fail_on_call = 0, fail_on_call

    def loss(self, batch):
        self.calls += 1
        if self.calls == self.fail_on_call:
            raise RuntimeError("simulated crash")
        return super().loss(batch)


def _salt_trainer(out, *, fail_on_call=None, kd_steps=4):
    distiller = SALTDistiller(_llama(7, hidden=8), SALTConfig(teacher="t", kd_steps=kd_steps,
                                                               kd_weight=0.5, temperature=2.0))
    objective = _Crashing(_llama(0), salt=distiller, fail_on_call=fail_on_call)
    config = TrainConfig(max_steps=8, lr=3e-3, warmup_steps=0, log_every=1, save_every=1,
                         keep_last=2, output_dir=str(out), progress=False, tensorboard=False)
    trainer = Trainer(config, objective, TokenDataset(_items()), _switch_sampler(KEEP),
                      collate_fn=CausalLMCollator(pad_id=0))
    objective.attach(trainer)
    return trainer


def test_kd_stops_exactly_at_kd_steps_and_a_killed_run_resumes_bit_exactly(tmp_path):
    full = _salt_trainer(tmp_path / "full")
    full.fit()
    rows = read_metrics(tmp_path / "full", split="train")
    assert [r["salt_kd"] for r in rows] == [1.0] * 4 + [0.0] * 4
    assert all(("loss_kd" in r) == (r["step"] <= 4) for r in rows)
    kd_rows = [r for r in rows if r["step"] <= 4]
    for r in kd_rows:  # the trained loss is the mix, loss_ce the plain CE beside it
        assert r["loss"] == pytest.approx(0.5 * r["loss_ce"] + 0.5 * r["loss_kd"], rel=1e-5)
    assert all(r["loss"] == pytest.approx(r["loss_ce"]) for r in rows if r["step"] > 4)

    out = tmp_path / "killed"
    with pytest.raises(RuntimeError, match="simulated crash"):
        _salt_trainer(out, fail_on_call=4).fit()  # dies in update 4, still in the KD phase
    assert checkpoint.latest_checkpoint(out).name == "step_000003"
    resumed = _salt_trainer(out)
    assert resumed.fit().step == 8
    for (name, a), (_, b) in zip(resumed.model.state_dict().items(),
                                 full.model.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    keys = ("step", "loss", "salt_kd")
    assert [[r[k] for k in keys] for r in read_metrics(out, split="train")] == \
        [[r[k] for k in keys] for r in rows]


def test_a_different_switch_step_changes_training(tmp_path):
    # the KD term really enters the update: kd_steps=4 and kd_steps=2 part after update 2
    a, b = _salt_trainer(tmp_path / "a"), _salt_trainer(tmp_path / "b", kd_steps=2)
    a.fit()
    b.fit()
    ra, rb = read_metrics(tmp_path / "a", split="train"), read_metrics(tmp_path / "b",
                                                                        split="train")
    assert [r["loss"] for r in ra[:2]] == [r["loss"] for r in rb[:2]]
    assert ra[2]["loss"] != rb[2]["loss"]


def test_selection_is_saved_and_read_back_on_resume(tmp_path, monkeypatch):
    from speechlm.recipes import text_lm_salt

    config = SALTConfig(teacher="t", kd_steps=2, selection={"top_k": 8, "keep_fraction": 0.5})
    teacher, items = _llama(7, hidden=8), _items()
    pools = {"warm-up": range(0, 10), "main": range(10, 24)}
    keep = text_lm_salt.selection(config, teacher, items, pools, 0, tmp_path,
                                  max_batch_tokens=40, is_main=True, say=lambda m: None)
    for span in pools.values():  # about half of each pool, each selected on its own
        assert 0 < sum(keep[i] for i in span) <= len(span) // 2 + 1
    saved = json.loads((tmp_path / text_lm_salt.SELECTION_FILE).read_text())
    assert saved["keep"] == [int(k) for k in keep]

    def no_scoring(*args, **kwargs):
        raise AssertionError("scored again")

    monkeypatch.setattr(text_lm_salt, "score_items", no_scoring)
    assert text_lm_salt.selection(config, teacher, items, pools, 0, tmp_path,
                                  max_batch_tokens=40, is_main=True,
                                  say=lambda m: None) == keep
    other = SALTConfig(teacher="t", kd_steps=2, selection={"top_k": 3})
    with pytest.raises(AssertionError, match="scored again"):  # another selection: rescored
        text_lm_salt.selection(other, teacher, items, pools, 0, tmp_path, max_batch_tokens=40,
                               is_main=True, say=lambda m: None)


def test_scores_do_not_depend_on_the_batching():
    from speechlm.recipes.text_lm_salt import score_items

    teacher, items = _llama(7, hidden=8), _items()
    one_by_one = score_items(teacher, items, 0, 8, max_batch_tokens=1)
    batched = score_items(teacher, items, 0, 8, max_batch_tokens=200)
    assert torch.allclose(one_by_one, batched, equal_nan=True, atol=1e-5)


# -- the text_lm recipe end to end ----------------------------------------------------------


def _text_lm_config(out, hidden, **extra):
    from speechlm.config import config_from_dict
    from speechlm.recipes import text_lm

    return config_from_dict(text_lm.Config, {
        "task": "text_lm",
        "tokenizer": {"vocab_size": 400, "every": 40},
        "model": {"config": {"hidden_size": hidden, "intermediate_size": 2 * hidden,
                             "num_hidden_layers": 1, "num_attention_heads": 2,
                             "num_key_value_heads": 2, "max_position_embeddings": 256}},
        "data": {"mixture": {"text": 1.0, "repeat": 1.0}, "num_examples": 60,
                 "max_seq_len": 128, "max_batch_tokens": 512, "plain_text_words": 12,
                 "max_input_words": 12,
                 "warmup": {"mixture": {"repeat": 1.0}, "steps": 2, "num_examples": 40}},
        "train": {"max_steps": 8, "lr": 5e-3, "warmup_steps": 1, "log_every": 1,
                  "save_every": 4, "output_dir": str(out), "tensorboard": False,
                  "progress": False},
        "eval": {"max_items": 2, "dev_items": 2, "batch_size": 2, "tasks": ["repeat"],
                 "paraphrases": False, "examples": 0},
        **extra,
    })


def test_text_lm_run_distils_then_trains_on_ce_with_the_selection(tmp_path, monkeypatch):
    from speechlm.recipes import text_lm, text_lm_salt

    monkeypatch.setenv("SPEECHLM_CACHE", str(tmp_path / "cache"))
    text_lm.run(_text_lm_config(tmp_path / "teacher", hidden=16))
    salt = {"teacher": str(tmp_path / "teacher" / "final"), "kd_steps": 4,
            "selection": {"top_k": 20, "keep_fraction": 0.5}}
    student = tmp_path / "student"
    text_lm.run(_text_lm_config(student, hidden=32, salt=salt))
    rows = read_metrics(student, split="train")
    assert [r["salt_kd"] for r in rows] == [1.0] * 4 + [0.0] * 4
    saved = json.loads((student / text_lm_salt.SELECTION_FILE).read_text())
    # kd_steps (4) outlasts the warm-up phase (2): both pools were selected
    assert set(saved["report"]) == {"warm-up", "main"}
    main = saved["report"]["main"]
    assert main["items"] >= 40 and 0 < main["kept"] <= main["items"] // 2 + 1
    assert (student / "final" / "config.json").is_file()
