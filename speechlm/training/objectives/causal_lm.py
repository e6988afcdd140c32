"""Causal language modelling on token ids with a label mask (instruction tuning, plain text).

Items are `{"input_ids": [...], "labels": [...]}` with labels -100 where
nothing is learned (the prompt, under instruction tuning); `CausalLMCollator`
right-pads them. `CausalLMObjective.loss` is the mean next-token
cross-entropy over the learned positions of the batch. It runs the LM head
only on those positions (`selective_head`): with a prompt that is most of
the sequence that saves most of the output-layer work, and gives the same
loss as `model(..., labels=...)`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from ..salt import salt_loss

__all__ = ["CausalLMCollator", "CausalLMObjective", "TokenDataset", "learned_logits",
           "token_losses"]


class TokenDataset(torch.utils.data.Dataset):
    """A list of encoded examples (dicts with input_ids, labels, and any other fields)."""

    def __init__(self, items: Sequence[dict]):
        self.items = list(items)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        return self.items[index]

    def lengths(self) -> list[int]:
        return [len(item["input_ids"]) for item in self.items]


class CausalLMCollator:
    """Right-pad `input_ids` (pad_id), `labels` (-100) and build `attention_mask`.

    Other fields are passed through as lists (e.g. `task`).
    """

    def __init__(self, pad_id: int, *, pad_to_multiple_of: int | None = None):
        self.pad_id = int(pad_id)
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, items: Sequence[dict]) -> dict:
        longest = max((len(item["input_ids"]) for item in items), default=0)
        if self.pad_to_multiple_of:
            m = self.pad_to_multiple_of
            longest = (longest + m - 1) // m * m
        batch_size = len(items)
        input_ids = torch.full((batch_size, longest), self.pad_id, dtype=torch.long)
        labels = torch.full((batch_size, longest), -100, dtype=torch.long)
        mask = torch.zeros((batch_size, longest), dtype=torch.long)
        for row, item in enumerate(items):
            n = len(item["input_ids"])
            if len(item["labels"]) != n:
                raise ValueError(f"item {row}: {n} input_ids but {len(item['labels'])} labels")
            input_ids[row, :n] = torch.as_tensor(item["input_ids"], dtype=torch.long)
            labels[row, :n] = torch.as_tensor(item["labels"], dtype=torch.long)
            mask[row, :n] = 1
        batch = {"input_ids": input_ids, "labels": labels, "attention_mask": mask}
        for key in items[0] if items else ():
            if key not in batch:
                batch[key] = [item.get(key) for item in items]
        return batch


def _selective_head_ok(model) -> bool:
    """The LM head can be applied to selected hidden states alone (no logit scaling/capping).
    Not under FSDP: a sharded root gathers its own weights (embeddings, head) only in its
    forward, so the base model and the head cannot be called apart."""
    from torch.distributed.fsdp import FSDPModule

    config = getattr(model, "config", None)
    return (not isinstance(model, FSDPModule) and hasattr(model, "base_model_prefix") and hasattr(model, "get_output_embeddings")
            and model.get_output_embeddings() is not None
            and not getattr(config, "final_logit_softcapping", None)
            and getattr(config, "logit_scale", None) in (None, 1, 1.0))


def learned_logits(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   labels: torch.Tensor, *, selective_head: bool = True
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(float32 logits [N, V], targets [N], row of each [N]) at the learned positions.

    Position t predicts labels[t + 1]; N counts the labels that are not -100.
    """
    targets = labels[:, 1:]
    learned = targets != -100
    rows = learned.nonzero()[:, 0]
    if hasattr(model, "get_base_model"):  # peft: LoRA is injected in place, so the
        model = model.get_base_model()     # transformers model beneath runs it too
    if selective_head and _selective_head_ok(model):
        base = getattr(model, model.base_model_prefix)
        hidden = base(input_ids=input_ids, attention_mask=attention_mask,
                      use_cache=False).last_hidden_state
        logits = model.get_output_embeddings()(hidden[:, :-1][learned])
    else:
        logits = model(input_ids=input_ids, attention_mask=attention_mask,
                       use_cache=False).logits[:, :-1][learned]
    return logits.float(), targets[learned], rows


def token_losses(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 labels: torch.Tensor, *, selective_head: bool = True
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(per-token loss [N], predicted ids [N], row of each [N]) over the learned positions."""
    logits, targets, rows = learned_logits(model, input_ids, attention_mask, labels,
                                           selective_head=selective_head)
    losses = F.cross_entropy(logits, targets, reduction="none")
    return losses, logits.argmax(-1), rows


class CausalLMObjective:
    """Mean next-token cross-entropy on the learned positions; optional `evaluate_fn(model)`.

    salt: a `speechlm.training.salt.SALTDistiller`: while it is active (the first kd_steps
    updates; call `attach(trainer)` so the objective knows the update count) the loss is
    SALT's CE + KD mix with the teacher's logits at the same positions, then plain CE. With
    it the metrics also carry `loss_ce` (the plain CE) and `salt_kd` (1 during KD, else 0).
    """

    def __init__(self, model, *, evaluate_fn: Callable[[torch.nn.Module], dict] | None = None,
                 selective_head: bool = True, salt=None):
        self.model = model
        self.evaluate_fn = evaluate_fn
        self.selective_head = selective_head
        self.salt = salt
        self.trainer = None

    def attach(self, trainer) -> None:
        """Let the loss know the update count (SALT's switch from KD to plain CE)."""
        self.trainer = trainer

    def to(self, device) -> None:
        if self.salt is not None:
            self.salt.to(device)

    def loss(self, batch):
        labels = batch["labels"]
        if labels.numel() == 0 or not bool((labels[:, 1:] != -100).any()):
            return None  # nothing to learn in this batch
        inputs = (batch["input_ids"], batch["attention_mask"], labels)
        logits, targets, _ = learned_logits(self.model, *inputs,
                                            selective_head=self.selective_head)
        accuracy = (logits.detach().argmax(-1) == targets).float().mean()
        metrics = {"token_accuracy": accuracy, "label_tokens": float(targets.numel())}
        if self.salt is None or not self.salt.active(self._step()):
            loss = F.cross_entropy(logits, targets, reduction="none").mean()
            if self.salt is None:
                return loss, metrics
            self.salt.release_buffer()  # past the switch the teacher is not run again
            return loss, {**metrics, "loss_ce": loss.detach(), "salt_kd": 0.0}
        with torch.no_grad():
            teacher_logits, _, _ = learned_logits(self.salt.teacher, *inputs,
                                                  selective_head=self.selective_head)
        cfg = self.salt.config
        buffer = self.salt.probs_buffer(*teacher_logits.shape, teacher_logits.device)
        loss, ce, kd = salt_loss(logits, teacher_logits, targets, weight=cfg.kd_weight,
                                 temperature=cfg.temperature, probs_buffer=buffer)
        return loss, {**metrics, "loss_ce": ce.detach(), "loss_kd": kd.detach(), "salt_kd": 1.0}

    def _step(self) -> int:
        if self.trainer is None:
            raise RuntimeError("CausalLMObjective with salt needs attach(trainer) before "
                               "training: the switch from KD to CE follows the update count")
        return int(self.trainer.step)

    def evaluate(self, model) -> dict[str, float]:
        return self.evaluate_fn(model) if self.evaluate_fn is not None else {}
