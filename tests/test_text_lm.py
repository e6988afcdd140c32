"""The text_lm recipe end to end on a small subset: the loss falls, the saved HF directory
reloads with the Auto classes and generates exactly what the trained model generated."""

import json

import pytest
import torch

from speechlm.config import config_from_dict
from speechlm.data import instructions as I
from speechlm.recipes import text_lm

TASKS = ["repeat", "translate_es", "continue", "mentions_god"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("text_lm")
    mp = pytest.MonkeyPatch()
    mp.setenv("SPEECHLM_CACHE", str(out / "cache"))
    config = config_from_dict(text_lm.Config, {
        "task": "text_lm",
        "tokenizer": {"vocab_size": 512, "every": 20},
        "model": {"config": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                             "num_attention_heads": 2, "num_key_value_heads": 2,
                             "max_position_embeddings": 256, "tie_word_embeddings": True}},
        "data": {"mixture": {"text": 1.0, "repeat": 1.0, "translate_es": 1.0, "continue": 1.0,
                             "mentions_god": 0.5},
                 "num_examples": 400, "max_seq_len": 128, "max_batch_tokens": 1024},
        "train": {"max_steps": 40, "lr": 5e-3, "warmup_steps": 5, "log_every": 5,
                  "eval_every": 20, "output_dir": str(out / "run"), "tensorboard": False,
                  "progress": False},
        "eval": {"max_items": 4, "dev_items": 4, "batch_size": 4, "tasks": TASKS,
                 "paraphrases": False, "examples": 0},
    })
    try:
        results = text_lm.run(config)
    finally:
        mp.undo()
    return out / "run", results, config


def test_loss_falls_and_results_are_written(trained):
    run_dir, results, _ = trained
    train = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in train if r["split"] == "train"]
    assert len(losses) == 8 and losses[-1] < losses[0] - 1.0, losses
    evals = [r for r in train if r["split"] == "eval"]
    assert [r["step"] for r in evals] == [20, 40]
    assert {f"loss_{t}" for t in TASKS} <= set(evals[-1])
    saved = json.loads((run_dir / "results.json").read_text())
    assert saved["tasks"].keys() == set(TASKS)
    assert {"wer", "exact"} <= saved["tasks"]["repeat"].keys()
    assert {"bleu", "chrf"} <= saved["tasks"]["translate_es"].keys()
    assert saved["tasks"]["mentions_god"]["chance"] == 0.5
    assert saved["tasks"]["continue"]["perplexity"] > 1
    assert saved["reload_identical"] is True
    assert results["train"]["steps"] == 40
    rows = [json.loads(line) for line in (run_dir / "test_hyps.jsonl").read_text().splitlines()]
    assert {r["task"] for r in rows} == set(TASKS)
    assert all(r["ref_id"].rsplit(" ", 1)[0] in I.heldout_books() for r in rows)


def test_saved_directory_is_a_normal_hf_checkpoint(trained):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run_dir, _, _ = trained
    final = run_dir / "final"
    names = {p.name for p in final.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
            "tokenizer_config.json", "tokenizer.model", "speechlm.json"} <= names
    model = AutoModelForCausalLM.from_pretrained(final)
    tokenizer = AutoTokenizer.from_pretrained(final)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == ("<s>", "</s>", "<pad>")
    generation = model.generation_config
    assert (generation.eos_token_id, generation.pad_token_id) == (tokenizer.eos_token_id,
                                                                  tokenizer.pad_token_id)
    assert model.config.vocab_size == len(tokenizer) == 512
    messages = [{"role": "user", "content": "Repeat the following text exactly. Amen."}]
    assert tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) \
        == I.render_prompt("Repeat the following text exactly.", "Amen.")
    meta = json.loads((final / "speechlm.json").read_text())
    assert meta["template"] == "blsp" and meta["tasks"]["repeat"]["instructions"][0] == \
        "Repeat the following text exactly."
    assert set(meta["heldout_books"]) == I.heldout_books()


def test_reloaded_model_generates_what_was_scored_and_uses_the_kv_cache(trained):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run_dir, _, config = trained
    final = run_dir / "final"
    model = AutoModelForCausalLM.from_pretrained(final).eval()
    tokenizer = AutoTokenizer.from_pretrained(final)
    rows = [json.loads(line) for line in (run_dir / "test_hyps.jsonl").read_text().splitlines()]
    repeat = [r for r in rows if r["task"] == "repeat"]
    prompts = [I.render_prompt(r["instruction"], r["input"]) for r in repeat]
    again = text_lm.generate_responses(model, tokenizer, prompts,
                                       max_new_tokens=I.TASKS["repeat"].max_new_tokens,
                                       batch_size=config.eval.batch_size)
    assert again == [r["hypothesis"] for r in repeat]
    batch = tokenizer(prompts[:1], return_tensors="pt")
    with torch.no_grad():
        cached = model.generate(**batch, max_new_tokens=12, min_new_tokens=12, do_sample=False,
                                use_cache=True)
        uncached = model.generate(**batch, max_new_tokens=12, min_new_tokens=12, do_sample=False,
                                  use_cache=False)
    assert torch.equal(cached, uncached)


def test_config_errors_name_the_field():
    from speechlm.errors import ConfigError

    with pytest.raises(ConfigError, match="data.mixture: unknown task"):
        text_lm.DataConfig(mixture={"translate_fr": 1.0})
    with pytest.raises(ConfigError, match="max_batch_tokens"):
        text_lm.DataConfig(max_seq_len=512, max_batch_tokens=256)
    tokenizer = type("T", (), {"__len__": lambda self: 10, "bos_token_id": 1, "eos_token_id": 2,
                               "pad_token_id": 3})()
    with pytest.raises(ConfigError, match="vocab_size come"):
        text_lm.build_model(text_lm.ModelConfig(config={"vocab_size": 9}), tokenizer)


def _phased(warm_batches=5):
    from speechlm.data.sampler import DurationBucketSampler

    def bucket(lengths, seed):
        return DurationBucketSampler(lengths, max_batch_duration=40, num_buckets=2, seed=seed)

    warm = [4 + i % 5 for i in range(12)]          # dataset items 0..11
    main = [6 + (i * 7) % 13 for i in range(30)]    # dataset items 12..41
    return text_lm.PhasedBatchSampler(bucket(warm, 1), bucket(main, 0),
                                      warmup_batches=warm_batches, offset=len(warm))


def test_phased_sampler_runs_the_warmup_once_then_the_main_epochs():
    sampler = _phased(warm_batches=7)  # more than one warm-up epoch's batches: it cycles
    sampler.set_epoch(0)
    first = list(sampler)
    assert len(first) == len(sampler)
    assert all(i < 12 for b in first[:7] for i in b)
    main_part = sorted(i for b in first[7:] for i in b)
    assert main_part == list(range(12, 42))          # the main data, each item once
    sampler.set_epoch(1)
    second = list(sampler)
    assert sorted(i for b in second for i in b) == list(range(12, 42))  # no warm-up again
    assert len(second) == len(sampler) == len(first) - 7


@pytest.mark.parametrize("cut", [3, 9])  # inside the warm-up, inside the main part
def test_phased_sampler_resumes_mid_epoch(cut):
    sampler = _phased()
    sampler.set_epoch(0)
    full = list(sampler)
    it = iter(sampler)
    consumed = [next(it) for _ in range(cut)]
    state = sampler.state_dict(num_consumed=cut)
    fresh = _phased()
    fresh.load_state_dict(state)
    fresh.set_epoch(0)
    assert consumed + list(fresh) == full
    with pytest.raises(ValueError, match="warmup_batches"):
        _phased(warm_batches=4).load_state_dict(state)


@pytest.mark.parametrize("kind", ["sltrain", "spdf"])
def test_sparse_lowrank_run_trains_and_saves_the_plain_dense_model(tmp_path, monkeypatch, kind):
    from transformers import AutoModelForCausalLM

    monkeypatch.setenv("SPEECHLM_CACHE", str(tmp_path / "cache"))
    config = config_from_dict(text_lm.Config, {
        "tokenizer": {"vocab_size": 512, "every": 20},
        "model": {"config": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                             "num_attention_heads": 2, "num_key_value_heads": 2,
                             "max_position_embeddings": 256, "tie_word_embeddings": True},
                  "sparse_lowrank": {"kind": kind, "rank": 16, "density": 0.05,
                                     "sparsity": 0.75}},
        "data": {"mixture": {"text": 1.0, "repeat": 1.0}, "num_examples": 200,
                 "max_seq_len": 128, "max_batch_tokens": 1024},
        "train": {"max_steps": 20, "lr": 5e-3, "warmup_steps": 2, "log_every": 5,
                  "output_dir": str(tmp_path / "run"), "tensorboard": False, "progress": False},
        "eval": {"max_items": 2, "dev_items": 2, "batch_size": 4, "tasks": ["repeat"],
                 "paraphrases": False, "examples": 0},
    })
    results = text_lm.run(config)
    losses = [json.loads(line)["loss"] for line in
              (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
              if json.loads(line)["split"] == "train"]
    assert losses[-1] < losses[0] - 1.0, losses
    assert results["reload_identical"] is True
    report = results["model"]["sparse_lowrank"]
    dense_linears = 2 * (4 * 64 * 64 + 3 * 64 * 128)
    if kind == "sltrain":  # the 14 projections hold r·(d_in + d_out) + nnz instead of d_in·d_out
        shapes = [(64, 64)] * 4 + [(64, 128)] * 3
        sltrain = 2 * sum(16 * (a + b) + round(0.05 * a * b) for a, b in shapes)
        others = 512 * 64 + 2 * 2 * 64 + 64  # tied embedding, the layers' norms, final norm
        assert report["trainable"] == others + sltrain < others + dense_linears
        assert report["spdf_masked"] == 0
    else:
        assert report["spdf_masked"] == 0.75 * dense_linears
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "final")
    assert type(model.model.layers[0].mlp.up_proj) is torch.nn.Linear
    zeros = (model.model.layers[1].mlp.down_proj.weight == 0).float().mean().item()
    assert zeros == (0.75 if kind == "spdf" else 0.0)
