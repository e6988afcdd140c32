"""BLSP stage 2: make the LLM continue *speech* the way it continues the transcript.

    objective = BlspObjective(speech_lm, loss="ce+kd", temperature=2.0)
    loss, metrics = objective.loss(batch)   # batch: encoder_hidden/encoder_lengths (cached
                                            # encoder outputs) or audio/audio_lengths, plus
                                            # the transcripts and their stage-1 continuations

Losses (BLSP, arXiv 2309.00916; BLSP-KD, arXiv 2405.19041):
- `ce`: cross-entropy of the continuation tokens (and the closing EOS) given
  `###[Human]:{instruction}` + speech + `\\n\\n\\n###[Assistant]:`. Every other
  position (prompt, speech, padding) carries no label.
- `kd`: KL(teacher || student) per response token, at temperature T (2 by
  default), averaged over response tokens ("batchmean" over the flattened
  tokens). The teacher is the same frozen LLM reading the transcript text in
  the same template (LoRA off), run under no_grad; the student reads speech.
  Response tokens are the same ids in both prompts, so the i-th response
  position of a row lines up in the two passes.
- `ce+kd`: their weighted sum.
- `ctc_weight`: an auxiliary token CTC of the transcript over the adapter's
  frames (token_ctc_loss), with any adapter.
- With a CIF adapter (one embedding per token, `adapter.emits_per_token`), the
  speech of each item fires exactly its transcript's token count, so the
  student's response sits where the teacher's does, and an L1 loss on the
  unscaled count (|sum of firing weights - tokens|, weight `count_weight`)
  teaches the adapter to fire that many at inference (BLSP-KD).

The LM head runs only on response positions (the prompt and speech are most of
the sequence, and a real LLM's vocabulary makes full logits costly), and the
template's opening, the same in every row, runs once per batch
(`speechlm.models.shared_prefix`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ...errors import ConfigError
from ...models.shared_prefix import cache_kwarg, prefix_cache, shared_prefix_length
from ...models.speech_lm import causal_lm_of

__all__ = ["LOSSES", "BlspObjective", "ResponseLogits", "batch_speech", "kd_loss",
           "response_logits"]

LOSSES = ("ce", "kd", "ce+kd")


@dataclass
class ResponseLogits:
    """Logits predicting each response token [N, V] (rows in order), the tokens [N] and the
    batch row of each [N]."""

    logits: torch.Tensor
    targets: torch.Tensor
    rows: torch.Tensor


def response_logits(model, inputs, *, use_lora: bool = True, share_prefix: bool = True
                    ) -> ResponseLogits:
    """The LLM of `model` (a SpeechLM) on `inputs`, logits at the positions that predict
    response tokens only (position t predicts labels[t + 1]). share_prefix: run the opening
    every row has in common once (False: in every row, as reference code does)."""
    from .causal_lm import _selective_head_ok

    targets = inputs.labels[:, 1:]
    learned = targets != -100
    causal = causal_lm_of(model.llm)
    with model._llm_context(inputs, use_lora):
        if _selective_head_ok(causal):
            base = getattr(causal, causal.base_model_prefix)
            # the template's opening is the same in every row: run it once (shared_prefix)
            shared = shared_prefix_length(inputs) if share_prefix and model._plora is None else 0
            extra = {cache_kwarg(base): prefix_cache(base, inputs, shared)} if shared else {}
            hidden = base(inputs_embeds=inputs.inputs_embeds[:, shared:],
                          attention_mask=inputs.attention_mask, use_cache=bool(shared),
                          **extra).last_hidden_state
            logits = causal.get_output_embeddings()(hidden[:, :-1][learned[:, shared:]])
        else:
            logits = model.llm(inputs_embeds=inputs.inputs_embeds,
                               attention_mask=inputs.attention_mask,
                               use_cache=False).logits[:, :-1][learned]
    return ResponseLogits(logits.float(), targets[learned], learned.nonzero()[:, 0])


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 2.0
            ) -> torch.Tensor:
    """KL(teacher || student) of [N, V] logits at `temperature`, mean over the N tokens."""
    return F.kl_div(F.log_softmax(student / temperature, dim=-1),
                    F.log_softmax(teacher / temperature, dim=-1),
                    log_target=True, reduction="batchmean")


def batch_speech(batch: dict) -> dict:
    """The speech arguments of SpeechLM.build_inputs for a batch: cached encoder outputs
    (`encoder_hidden`/`encoder_lengths`) when present, else `audio`/`audio_lengths`."""
    from ...models.encoders import EncoderOutput

    if batch.get("encoder_hidden") is not None:
        return {"encoder_output": EncoderOutput(batch["encoder_hidden"], batch["encoder_lengths"])}
    return {"audio": batch["audio"], "audio_lengths": batch["audio_lengths"]}


def transcript_token_ids(model, transcripts: Sequence[str]) -> list[list[int]]:
    """The tokens each transcript is in the text prompt, after the instruction and a space:
    their count is what a per-token (CIF) adapter must fire for the student to line up with
    the teacher, their embeddings what the embedding loss pulls its outputs towards."""
    from ...models.prompts import encode_continuing

    return [encode_continuing(model.tokenizer, " " + t.strip()) for t in transcripts]


EMBED_LOSSES = ("mse", "ce", "mse+ce")
COSINE_TEMPERATURE = 0.1


def embedding_loss(speech, token_ids: Sequence[Sequence[int]], embed, kind: str = "mse+ce"
                   ) -> torch.Tensor:
    """How far each fired speech embedding e is from its token's LLM input embedding t.

    mse: sum ||e - t||^2 / sum ||t||^2 over the batch's tokens (relative, so the LLM's
    embedding scale does not matter); pulls e to t but, under doubt, towards the mean of
    the likely tokens, i.e. frequent function words. ce: cross-entropy of the token among the
    whole vocabulary scored against the LLM's embedding matrix, which makes e pick one
    token (by cosine at temperature 0.1: the LLM normalises its inputs first, so the
    direction is what it reads). mse+ce: both.
    """
    hidden = speech.hidden
    ids = torch.tensor([t for row in token_ids for t in row], device=hidden.device)
    rows = torch.tensor([i for i, row in enumerate(token_ids) for _ in row], device=hidden.device)
    cols = torch.tensor([j for row in token_ids for j in range(len(row))], device=hidden.device)
    fired = hidden[rows, cols].float()
    table = embed.weight.detach().float()
    total = fired.new_zeros(())
    if kind in ("mse", "mse+ce"):
        target = table[ids]
        total = total + ((fired - target) ** 2).sum() / (target ** 2).sum().clamp(min=1e-6)
    if kind in ("ce", "mse+ce"):
        total = total + F.cross_entropy(_cosine_logits(fired, table), ids)
    return total


def _cosine_logits(vectors: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """[..., V]: each vector's cosine with each row of `table`, at COSINE_TEMPERATURE."""
    return F.normalize(vectors, dim=-1) @ F.normalize(table, dim=-1).T / COSINE_TEMPERATURE


def token_ctc_loss(speech, token_ids: Sequence[Sequence[int]], embed, blank: torch.Tensor
                   ) -> torch.Tensor:
    """CTC of the transcript tokens over the adapter's frames: a CIF adapter's subsampled
    frames before integration (`speech.frames`), any other adapter's outputs themselves,
    each frame scored against the LLM's embedding matrix plus a blank direction by cosine
    at temperature 0.1 (as the embedding loss). It teaches the frames which token they
    hold and where, which CIF's count loss alone does not: the standard CIF + CTC pairing.
    On a frame-rate adapter it pulls the speech positions toward the transcript's own token
    embeddings, in order (an auxiliary ASR objective beside BLSP's)."""
    if speech.frames is None:
        speech = speech._replace(frames=speech.hidden, frame_lengths=speech.lengths)
    frames = speech.frames.float()
    table = torch.cat([embed.weight.detach().float(), blank.float()[None]], dim=0)
    log_probs = F.log_softmax(_cosine_logits(frames, table), dim=-1).transpose(0, 1)
    targets = torch.tensor([t for row in token_ids for t in row], device=frames.device)
    target_lengths = torch.tensor([len(row) for row in token_ids], device=frames.device)
    return F.ctc_loss(log_probs, targets, speech.frame_lengths, target_lengths,
                      blank=table.shape[0] - 1, reduction="mean", zero_infinity=True)


def batch_transcripts(batch: dict) -> list[str]:
    texts = batch.get("texts", batch.get("text"))
    if texts is None:
        raise KeyError("the batch has no transcripts (texts)")
    return list(texts)


class BlspObjective:
    """The BLSP stage-2 loss for the Trainer (see the module doc).

    loss: "ce", "kd" or "ce+kd"; ce_weight / kd_weight weigh the two in "ce+kd".
    instruction: what the prompt says before the speech (default: the model's); a batch
    `instruction` field (one per item) wins.
    template: the prompt template of the training data when it is not the model's own (InSerter
    trains on plain interleaved text, "interleaved", and answers in "blsp").
    evaluate_fn(model) -> dict: the behaviour-alignment evaluation (optional).
    share_prefix: the prompt opening every row has in common runs once per batch (the same
    logits; False only to measure against loops that do not).
    """

    def __init__(self, model, *, loss: str = "ce", temperature: float = 2.0,
                 ce_weight: float = 1.0, kd_weight: float = 1.0, count_weight: float = 1.0,
                 embed_weight: float = 0.0, embed_loss: str = "mse+ce", ctc_weight: float = 0.0,
                 instruction: str | None = None,
                 template: str | None = None,
                 evaluate_fn: Callable[[torch.nn.Module], dict] | None = None,
                 share_prefix: bool = True):
        if loss not in LOSSES:
            raise ConfigError(f"loss.kind must be one of {', '.join(LOSSES)}, got {loss!r}")
        if temperature <= 0:
            raise ConfigError(f"loss.temperature must be > 0, got {temperature}")
        self.model = model
        self.kind = loss
        self.temperature = float(temperature)
        self.ce_weight, self.kd_weight = float(ce_weight), float(kd_weight)
        self.count_weight, self.embed_weight = float(count_weight), float(embed_weight)
        self.ctc_weight = float(ctc_weight)
        if embed_loss not in EMBED_LOSSES:
            raise ConfigError(f"loss.embed_loss must be one of {', '.join(EMBED_LOSSES)}, "
                              f"got {embed_loss!r}")
        self.embed_loss = embed_loss
        if self.embed_weight and not getattr(model.adapter, "emits_per_token", False):
            raise ConfigError("loss.embed_weight needs an adapter that emits one embedding per "
                              "token: set model.adapter: cif, or set the weight to 0")
        self.instruction = instruction
        self.template = template
        self.evaluate_fn = evaluate_fn
        self.share_prefix = share_prefix

    def instructions(self, batch: dict):
        """Per-item `instruction` fields of the batch (e.g. InSerter's text before the speech)
        when it has them, else the objective's (or the model's) one instruction."""
        own = batch.get("instruction")
        return list(own) if own is not None else self.instruction

    def student_inputs(self, batch: dict, responses: Sequence[str]):
        """The speech-path inputs, and the adapter's own losses: for a per-token adapter
        `count` (L1 on the firing count) and `embed` (embedding_loss) when its weight is set;
        for any adapter `ctc` (token_ctc_loss) when its weight is set; else {}."""
        speech, extra = None, {}
        per_token = getattr(self.model.adapter, "emits_per_token", False)
        if per_token or self.ctc_weight:
            ids = transcript_token_ids(self.model, batch_transcripts(batch))
            target = torch.tensor([len(row) for row in ids], dtype=torch.long)
            speech = self.model.encode_speech(**batch_speech(batch),
                                              **({"target_lengths": target} if per_token else {}))
            if per_token:
                extra["count"] = (speech.quantity - target.to(speech.quantity.device)).abs().mean()
            if self.embed_weight:
                extra["embed"] = embedding_loss(speech, ids, self.model.llm.get_input_embeddings(),
                                                self.embed_loss)
            if self.ctc_weight and (speech.frames is not None or not per_token):
                extra["ctc"] = token_ctc_loss(speech, ids, self.model.llm.get_input_embeddings(),
                                              self.model.adapter.ctc_blank)
        inputs = self.model.build_inputs(instructions=self.instructions(batch),
                                         responses=responses, speech=speech,
                                         **batch_speech(batch))
        return inputs, extra

    def teacher_inputs(self, batch: dict, responses: Sequence[str]):
        return self.model.build_text_inputs(batch_transcripts(batch),
                                            instructions=self.instructions(batch),
                                            responses=responses)

    def loss(self, batch: dict):
        responses = batch.get("continuation")
        if not responses:
            return None  # every item of the batch was skipped
        with self.model.with_template(self.template):
            return self._loss(batch, responses)

    def _loss(self, batch: dict, responses: Sequence[str]):
        inputs, extra = self.student_inputs(batch, responses)
        student = response_logits(self.model, inputs, share_prefix=self.share_prefix)
        metrics: dict[str, float] = {"response_tokens": float(student.targets.numel())}
        total = student.logits.new_zeros(())
        weights = {"count": self.count_weight, "embed": self.embed_weight, "ctc": self.ctc_weight}
        for name, value in extra.items():
            metrics[f"{name}_loss"] = float(value.detach())
            total = total + weights[name] * value
        if self.kind in ("ce", "ce+kd"):
            ce = F.cross_entropy(student.logits, student.targets)
            metrics["ce"] = float(ce.detach())
            total = total + (self.ce_weight if self.kind == "ce+kd" else 1.0) * ce
        predicted = student.logits.argmax(-1)
        metrics["token_accuracy"] = float((predicted == student.targets).float().mean())
        if self.kind in ("kd", "ce+kd"):
            with torch.no_grad():
                teacher = response_logits(self.model, self.teacher_inputs(batch, responses),
                                          use_lora=False, share_prefix=self.share_prefix)
            if teacher.targets.shape != student.targets.shape or \
                    not torch.equal(teacher.targets, student.targets):
                raise RuntimeError("teacher and student response tokens differ; the template "
                                   "must tokenize the response the same way in both prompts")
            kd = kd_loss(student.logits, teacher.logits, self.temperature)
            metrics["kd"] = float(kd.detach())
            metrics["teacher_agreement"] = float(
                (predicted == teacher.logits.argmax(-1)).float().mean())
            total = total + (self.kd_weight if self.kind == "ce+kd" else 1.0) * kd
        return total, metrics

    def evaluate(self, model) -> dict[str, float]:
        return self.evaluate_fn(model) if self.evaluate_fn is not None else {}
