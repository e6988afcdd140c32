"""Supervised speech tokenizer training: character CTC (or Whisper's own decoder loss,
`TokenizerDecoderObjective`) through the VQ, plus its commitment loss.

The CTC side (data preparation, loss, greedy dev transcripts, blank-collapse
guard) is `CTCObjective`'s; this adds the VQ: the commitment loss (already
weighted, 0.25 by default), the batch's code usage in the training log, an
optional warm-up with the VQ bypassed (a from-scratch encoder's first
features are not worth clustering: k-means runs on the first batch after
`vq_start_step`), and the codebook usage of the dev set's units at each
evaluation (perplexity, used and dead codes, bitrate).
"""

from __future__ import annotations

import torch

from .ctc import CTCCollator, CTCObjective
from .whisper_asr import WhisperASRObjective


class SpeechTokenizerObjective(CTCObjective):
    # Its loss adds the VQ commitment loss, a batch term with no per-utterance share, to
    # CTC's: CTCObjective.sample_losses would drop it, so train.sample_weighting is refused.
    sample_losses = None

    def __init__(self, model, vocab, *, vq_start_step: int = 0, usage_items: int | None = 100,
                 **kwargs):
        super().__init__(model, vocab, **kwargs)
        self.vq_start_step = int(vq_start_step)
        self.usage_items = usage_items
        self._last_vq = None

    def quantizing(self) -> bool:
        return self.step is None or self.step >= self.vq_start_step

    def _forward(self, model, batch):
        out = model(batch["audio"], batch["audio_lengths"], quantize=self.quantizing())
        self._last_vq = out.vq
        return out.log_probs, out.frames

    def loss(self, batch):
        self._last_vq = None
        return plus_commitment(super().loss(batch), self._last_vq, "ctc_loss")

    def evaluate(self, model) -> dict[str, float]:
        metrics = super().evaluate(model)
        if self.dev is not None and self.quantizing():
            stats = codebook_usage(model, self.dev, max_items=self.usage_items,
                                   batch_duration=self.eval_batch_duration)
            metrics.update({f"units_{k}": float(v) for k, v in stats.items()})
        return metrics


def plus_commitment(result, vq, name: str):
    """An objective's (loss, metrics) with the VQ's commitment loss added and the batch's code
    usage logged (the loss alone logged as `name`); as it is without a VQ pass."""
    if result is None or vq is None:
        return result
    loss, metrics = result
    metrics.update({name: loss.detach()}, commit_loss=vq.commit_loss.detach(),
                   code_perplexity=vq.perplexity, codes_used=vq.used_fraction,
                   code_restarts=float(vq.restarted))
    return loss + vq.commit_loss, metrics


def spread_indices(count: int, max_items: int | None) -> list[int]:
    """Indices of `max_items` items spread evenly over `count` (all when there are fewer)."""
    if max_items is None or count <= max_items:
        return list(range(count))
    step = count / max_items
    return [int(i * step) for i in range(max_items)]


def duration_batches(dataset, indices: list[int], batch_duration: float):
    """Collated batches (CTCCollator: audio, audio_lengths, ids, text_norm, skipped) of the
    items `indices` of an AudioDataset, shortest first, each at most `batch_duration` seconds
    of padded audio."""
    records = dataset.records
    indices = sorted(indices, key=lambda i: float(records[i].get("duration") or 0.0))
    collate = CTCCollator()
    batch: list[int] = []
    for i in indices:
        duration = max(float(records[i].get("duration") or 0.0), 1e-3)
        if batch and (len(batch) + 1) * duration > batch_duration:
            yield collate([dataset[j] for j in batch])
            batch = []
        batch.append(i)
    if batch:
        yield collate([dataset[j] for j in batch])


@torch.no_grad()
def encode_dataset(model, dataset, *, max_items: int | None = None,
                   batch_duration: float = 200.0) -> tuple[list[dict], int]:
    """([{id, text, units}] for the items of an AudioDataset, how many could not be read).
    Call with the model in eval mode."""
    device = next(model.parameters()).device
    rows, skipped = [], 0
    for data in duration_batches(dataset, spread_indices(len(dataset), max_items),
                                 batch_duration):
        skipped += len(data["skipped"])
        if data["audio"].shape[0]:
            units = model.encode(data["audio"].to(device), data["audio_lengths"].to(device))
            for rid, text, seq in zip(data["ids"], data["text_norm"], units, strict=True):
                rows.append({"id": rid, "text": text, "units": seq})
    return rows, skipped


def codebook_usage(model, dataset, *, max_items: int | None = None,
                   batch_duration: float = 200.0) -> dict:
    """Usage statistics (speechlm.models.speech_tokenizer.unit_statistics) of the units of
    `dataset`, with the codebook's dead codes. Puts the model in eval mode for the pass."""
    from ...models.speech_tokenizer import unit_statistics

    mode = model.training
    model.eval()
    try:
        rows, _ = encode_dataset(model, dataset, max_items=max_items,
                                 batch_duration=batch_duration)
    finally:
        model.train(mode)
    vq = model.vq
    dead = int((vq.ema_cluster_size < vq.dead_code_threshold).sum())
    return unit_statistics([r["units"] for r in rows], vq.num_codes, model.frame_rate, dead=dead)


class TokenizerDecoderObjective(WhisperASRObjective):
    """Head whisper_decoder: Whisper's own loss (teacher-forced cross-entropy of the transcript,
    speechlm.training.objectives.whisper_asr) through the VQ, plus the commitment loss; dev
    CER/WER of the decoder's greedy transcripts from the quantized units. Batches hold audio,
    or (`encoder_hidden`) the cached 50 Hz states of the frozen layers below the VQ."""

    sample_losses = None  # the commitment loss is a batch term with no per-utterance share

    def __init__(self, model, *, vq_start_step: int = 0, **kwargs):
        super().__init__(model, model.text_tokenizer, model.prompt, **kwargs)
        self.vq_start_step = int(vq_start_step)
        self._last_vq = None

    def quantizing(self) -> bool:
        return self.trainer is None or self.trainer.step >= self.vq_start_step

    def encoder_states(self, model, batch) -> torch.Tensor:
        if "encoder_hidden" in batch:
            states, vq = model.decoder_states_from_lower(
                batch["encoder_hidden"], batch["encoder_lengths"], quantize=self.quantizing())
        else:
            states, vq = model.decoder_states(batch["audio"], batch["audio_lengths"],
                                              quantize=self.quantizing())
        self._last_vq = vq
        return states

    def _token_loss(self, model, states, batch, reduction: str = "mean") -> torch.Tensor:
        return super()._token_loss(model.whisper, states, batch, reduction)

    def generate(self, model, states: torch.Tensor) -> list[str]:
        return super().generate(model.whisper, states)

    def loss(self, batch):
        self._last_vq = None
        return plus_commitment(super().loss(batch), self._last_vq, "asr_loss")
