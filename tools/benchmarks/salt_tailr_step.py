"""Cost per update of SALT (text LM) and TaiLr (CTC), each against the same step without it.

Updates (forward, backward, AdamW step) on the zoo text LM's model (recipes/tiny/
llm_en_es.yaml, 1.4M parameters; 16 sequences of 128 tokens) with plain CE, with SALT
configured but past its switch (plain CE), and in SALT's KD phase (teacher: 2 layers of
width 64, 0.37M parameters); and on the tiny CTC model (recipes/tiny/ctc_es.yaml; 4
utterances of 5 s) with and without TaiLr. The arms alternate, and time is CPU time of
this process (time.process_time, one thread), so other jobs on the machine do not enter
the ratio (their cache traffic still adds noise); each round runs the arms in a rotated
order, and the value is the median over rounds.
"""

from __future__ import annotations

import statistics
import time

import torch

STUDENT = dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4,
               num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
               tie_word_embeddings=True)
TEACHER = dict(STUDENT, hidden_size=64, intermediate_size=192, num_hidden_layers=2,
               num_attention_heads=2, num_key_value_heads=2)
CTC_MODEL = dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
                 intermediate_size=512, conv_dim=[32, 64, 64, 64], conv_kernel=[10, 8, 4, 4],
                 conv_stride=[5, 4, 4, 4], num_conv_pos_embeddings=32,
                 num_conv_pos_embedding_groups=8, feat_extract_norm="layer",
                 do_stable_layer_norm=True)


def _llama(fields: dict, vocab: int = 4096):
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(**fields, vocab_size=vocab))
    model.set_attn_implementation("eager")
    return model


def _timed_update(objective, optimizer, batch) -> float:
    start = time.process_time()
    loss, _ = objective.loss(batch)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.process_time() - start


def _rounds(arms: dict, rounds: int, warmup: int = 2) -> dict[str, float]:
    times: dict[str, list[float]] = {name: [] for name in arms}
    names = list(arms)
    for r in range(warmup + rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:  # no arm always first
            seconds = arms[name]()
            if r >= warmup:
                times[name].append(seconds)
    return {name: statistics.median(values) for name, values in times.items()}


def text_lm_arms():
    from speechlm.training.objectives.causal_lm import CausalLMObjective
    from speechlm.training.salt import SALTConfig, SALTDistiller

    torch.manual_seed(0)
    ids = torch.randint(5, 4096, (16, 128))
    batch = {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}
    model = _llama(STUDENT)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    plain = CausalLMObjective(model)
    trainer = type("Step", (), {"step": 0})()
    kd = CausalLMObjective(model, salt=SALTDistiller(_llama(TEACHER),
                                                     SALTConfig(teacher="t", kd_steps=10)))
    kd.attach(trainer)
    after = CausalLMObjective(model, salt=kd.salt)
    after.attach(type("Step", (), {"step": 10})())
    return {"plain": lambda: _timed_update(plain, optimizer, batch),
            "salt_after_switch": lambda: _timed_update(after, optimizer, batch),
            "salt_kd_phase": lambda: _timed_update(kd, optimizer, batch)}


def ctc_arms():
    from speechlm.models.ctc import CharVocab, load_ctc_model
    from speechlm.training.objectives.ctc import CTCObjective
    from speechlm.training.tailr import TaiLrConfig

    torch.manual_seed(0)
    vocab = CharVocab(["<pad>", "<unk>", "|", *"abcdefghijklmnopqrstuvwxyz"])
    model = load_ctc_model("scratch", vocab, scratch_config=CTC_MODEL)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    lengths = torch.full((4,), 80000)
    labels = torch.randint(3, len(vocab.tokens), (4, 60))
    batch = {"audio": torch.randn(4, 80000) * 0.1, "audio_lengths": lengths,
             "attention_mask": torch.ones(4, 80000, dtype=torch.long), "labels": labels,
             "label_lengths": torch.full((4,), 60)}
    plain = CTCObjective(model, vocab)
    tailr = CTCObjective(model, vocab, tailr=TaiLrConfig())
    return {"plain": lambda: _timed_update(plain, optimizer, batch),
            "tailr": lambda: _timed_update(tailr, optimizer, batch)}


def run(quick: bool = False) -> list[dict]:
    torch.set_num_threads(1)
    rounds = 3 if quick else 15
    rows = []
    lm = _rounds(text_lm_arms(), rounds)
    for name in ("salt_after_switch", "salt_kd_phase"):
        rows.append({"benchmark": f"text LM update, {name}", "metric": "CPU s / update",
                     "value": lm[name], "baseline": lm["plain"],
                     "ratio": lm[name] / lm["plain"],
                     "note": "zoo text LM 1.4M, 16x128 tokens; teacher 0.37M"})
    ctc = _rounds(ctc_arms(), rounds)
    rows.append({"benchmark": "CTC update, tailr", "metric": "CPU s / update",
                 "value": ctc["tailr"], "baseline": ctc["plain"],
                 "ratio": ctc["tailr"] / ctc["plain"], "note": "tiny CTC model, 4 x 5 s"})
    return rows


if __name__ == "__main__":
    for row in run():
        print(row)
