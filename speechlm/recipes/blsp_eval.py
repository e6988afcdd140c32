"""How well BLSP's speech path follows the text path: the alignment metric and the
zero-shot transfer table.

- `alignment_metrics` (every evaluation, on held-out speech with stage-1
  continuations): teacher-forced on the continuation, the per-token
  KL(text-conditioned || speech-conditioned) at T=1, how often the two pick the
  same next token, and each one's cross-entropy of the continuation; and on a
  few items, the continuation the LLM *generates* from speech compared with the
  one it wrote from the transcript (chrF, word overlap F1).
- `transfer_table` (once, at the end): the instructions the LLM learned on text
  (repeat = ASR, translate = ST, ...) asked about held-out speech, for the
  trained adapter, the untrained one (lower bound) and the cascade that gives
  the LLM the reference transcript (upper bound), scored like the text tasks.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

__all__ = ["HEARD_CASCADE", "REFERENCE_CASCADE", "WHISPER_CASCADE", "SpeechSource", "alignment_metrics",
           "cascade_texts", "encoder_transcripts", "format_transfer_table", "systems_table",
           "generate_from_speech", "generate_from_text", "task_references", "transfer_scores"]


class SpeechSource:
    """The speech of manifest records as SpeechLM arguments: cached encoder outputs when a
    cache holds them (`cache`), else the audio itself."""

    def __init__(self, cache=None, *, base_dir=None):
        self.cache = cache
        self.base_dir = base_dir

    def batch(self, records: Sequence[dict]) -> dict:
        from ..training.objectives.blsp import batch_speech

        if self.cache is not None:
            from ..pipelines.encoder_cache import CachedEncoderDataset, collate_encoder_batch

            dataset = CachedEncoderDataset(list(records), self.cache)
            batch = collate_encoder_batch([dataset[i] for i in range(len(dataset))])
        else:
            from ..data.collate import AudioCollator
            from ..data.dataset import AudioDataset

            dataset = AudioDataset(list(records), base_dir=self.base_dir)
            batch = AudioCollator()([dataset[i] for i in range(len(dataset))])
        if batch.get("skipped"):
            bad = ", ".join(s.get("id", "?") for s in batch["skipped"][:3])
            raise RuntimeError(f"evaluation items could not be loaded: {bad}")
        return batch_speech(batch)


def _chunks(items: Sequence, size: int):
    for start in range(0, len(items), size):
        yield items[start:start + size]


@torch.no_grad()
def generate_from_speech(model, source: SpeechSource, records: Sequence[dict], instruction: str,
                         *, max_new_tokens: int = 64, batch_size: int = 32) -> list[str]:
    """Greedy responses of a SpeechLM to `instruction` (a record's own `instruction` field
    wins) + each record's speech."""
    out: list[str] = []
    for chunk in _chunks(list(records), batch_size):
        own = [r.get("instruction", instruction) for r in chunk]
        out += model.generate(instructions=own, max_new_tokens=max_new_tokens,
                              **source.batch(chunk))
    return out


@torch.no_grad()
def generate_from_text(model, transcripts: Sequence[str], instruction: str, *,
                       max_new_tokens: int = 64, batch_size: int = 32) -> list[str]:
    """The cascade: the same LLM and template with the transcript text in place of speech."""
    was_training = model.training
    model.eval()
    out: list[str] = []
    try:
        for chunk in _chunks(list(transcripts), batch_size):
            inputs = model.build_text_inputs(chunk, instructions=instruction,
                                             padding_side="left")
            out += model.decode(model.generate_ids(inputs, max_new_tokens=max_new_tokens))
    finally:
        model.train(was_training)
    return out


def word_f1(ref: str, hyp: str) -> float:
    """Bag-of-words F1 of two texts (lower-cased words)."""
    from collections import Counter

    r, h = Counter(ref.lower().split()), Counter(hyp.lower().split())
    common = sum((r & h).values())
    if not common:
        return 0.0
    precision, recall = common / sum(h.values()), common / sum(r.values())
    return 2 * precision * recall / (precision + recall)


@torch.no_grad()
def alignment_metrics(model, source: SpeechSource, records: Sequence[dict], instruction: str,
                      *, generate_items: int = 16, max_new_tokens: int = 48,
                      batch_size: int = 16) -> dict[str, float]:
    """Behaviour alignment of speech vs transcript on `records` (each with `text` and its
    stage-1 `continuation`); see the module doc. Keys: align_kl, align_agreement,
    align_ce_speech, align_ce_text, align_gen_chrf, align_gen_f1."""
    from ..eval.metrics import chrf
    from ..training.objectives.blsp import response_logits

    kl_sum = agree = ce_s = ce_t = 0.0
    n = 0
    for chunk in _chunks(list(records), batch_size):
        responses = [r["continuation"] for r in chunk]
        own = [r.get("instruction", instruction) for r in chunk]  # per-item when given
        student = response_logits(model, model.build_inputs(
            instructions=own, responses=responses, **source.batch(chunk)))
        teacher = response_logits(model, model.build_text_inputs(
            [r["text"] for r in chunk], instructions=own, responses=responses),
            use_lora=False)
        log_s = F.log_softmax(student.logits, -1)
        log_t = F.log_softmax(teacher.logits, -1)
        kl_sum += float((log_t.exp() * (log_t - log_s)).sum())
        agree += float((student.logits.argmax(-1) == teacher.logits.argmax(-1)).sum())
        ce_s += float(F.cross_entropy(student.logits, student.targets, reduction="sum"))
        ce_t += float(F.cross_entropy(teacher.logits, teacher.targets, reduction="sum"))
        n += student.targets.numel()
    metrics = {"align_kl": kl_sum / max(n, 1), "align_agreement": agree / max(n, 1),
               "align_ce_speech": ce_s / max(n, 1), "align_ce_text": ce_t / max(n, 1)}
    if generate_items:
        few = list(records)[:generate_items]
        hyps = generate_from_speech(model, source, few, instruction,
                                    max_new_tokens=max_new_tokens, batch_size=batch_size)
        refs = [r["continuation"] for r in few]
        metrics["align_gen_chrf"] = chrf(refs, hyps)
        metrics["align_gen_f1"] = sum(map(word_f1, refs, hyps)) / max(len(few), 1)
    return metrics


def task_references(task, records: Sequence[dict]) -> list[str] | None:
    """The reference answers of an instruction task for speech records (None when the
    records lack what the task needs, e.g. no `translation` for translate_es)."""
    from ..data.instructions import last_word, mentions_god

    name = task.name
    if name == "repeat":
        return [r["text"] for r in records]
    if name == "translate_es":
        refs = [r.get("translation") for r in records]
        return None if any(not x for x in refs) else refs
    if name == "last_word":
        return [last_word(r["text"]) for r in records]
    if name == "mentions_god":
        return ["yes" if mentions_god(r["text"]) else "no" for r in records]
    return None


def transfer_scores(systems: dict[str, Callable[[str, int], list[str]]], records: Sequence[dict],
                    tasks: Sequence[str], *, hyps_out: list | None = None,
                    say: Callable[[str], None] | None = None) -> dict:
    """{system: {task: scores}}: each system maps (instruction, max_new_tokens) to one
    response per record; tasks are names of `speechlm.data.instructions.TASKS`. `say`, when
    given, hears one line per system and task with its time (a table takes minutes)."""
    import time

    from ..data.instructions import TASKS
    from ..errors import ConfigError

    table: dict[str, dict] = {name: {} for name in systems}
    for task_name in tasks:
        if task_name not in TASKS:
            raise ConfigError(f"eval.transfer_tasks: unknown task {task_name!r}; known: "
                              f"{', '.join(TASKS)}")
        task = TASKS[task_name]
        refs = task_references(task, records)
        if refs is None:
            raise ConfigError(f"eval.transfer_tasks: {task_name} needs fields the transfer "
                              f"manifest lacks (translate_es: `translation`); supported tasks: "
                              "repeat, translate_es, last_word, mentions_god")
        instruction = task.instructions[0]
        for system, respond in systems.items():
            start = time.perf_counter()
            hyps = respond(instruction, task.max_new_tokens)
            scores = task.score(refs, hyps, [r["text"] for r in records])
            scores["n"] = len(records)
            table[system][task_name] = scores
            if say is not None:
                say(f"  transfer: {task_name:<12} {system:<34} {len(records)} answers in "
                    f"{time.perf_counter() - start:.0f} s")
            if hyps_out is not None:
                hyps_out += [{"system": system, "task": task_name, "id": r["id"],
                              "reference": ref, "hypothesis": h}
                             for r, ref, h in zip(records, refs, hyps, strict=True)]
    return table


def systems_table(models: dict, records: Sequence[dict], tasks: Sequence[str], *,
                  untrained: bool = True, batch_size: int = 32, source: SpeechSource | None = None,
                  hyps_out: list | None = None, say: Callable[[str], None] | None = None
                  ) -> dict:
    """The transfer table of saved SpeechLMs (`models`: name -> SpeechLM) on `records`: the
    first model's adapter freshly initialised (seed 0) when `untrained`, each model, and the
    cascades read by the last model's LLM (`cascade_texts`)."""
    from ..models.speech_lm import SpeechLM

    source = source or SpeechSource()

    def speech(model):
        return lambda ins, n: generate_from_speech(model, source, records, ins,
                                                   max_new_tokens=n, batch_size=batch_size)

    systems = {}
    if untrained:
        torch.manual_seed(0)
        systems["untrained adapter"] = speech(SpeechLM.build(
            next(iter(models.values())).config).eval())
    systems.update({name: speech(model) for name, model in models.items()})
    reader = list(models.values())[-1]
    for name, texts in cascade_texts(reader, records).items():
        systems[name] = (lambda t: lambda ins, n: generate_from_text(
            reader, t, ins, max_new_tokens=n, batch_size=batch_size))(texts)
    return transfer_scores(systems, records, tasks, hyps_out=hyps_out, say=say)


_HEADLINE = {"wer": ("wer", "cer"), "bleu": ("bleu", "chrf"), "accuracy": ("accuracy", None)}


def format_transfer_table(table: dict) -> str:
    """Systems as rows, tasks as columns (WER/CER %, BLEU/chrF, accuracy %)."""
    from ..data.instructions import TASKS

    systems = list(table)
    tasks = list(next(iter(table.values()), {}))
    heads, cells = [], {s: [] for s in systems}
    for name in tasks:
        metric = TASKS[name].metric
        a, b = _HEADLINE.get(metric, (metric, None))
        if metric == "accuracy" and all("balanced_accuracy" in table[s][name] for s in systems):
            b = "balanced_accuracy"  # a fixed answer set: chance is 50% whatever the mix
        label = f"{name} {a}" + (f"/{b.replace('_accuracy', '')}" if b else "")
        heads.append(label)
        for s in systems:
            scores = table[s][name]
            scale = 100.0 if metric in ("wer", "accuracy") else 1.0
            text = f"{scale * scores[a]:.1f}"
            if b:
                text += f" / {(100.0 if metric in ('wer', 'accuracy') else 1.0) * scores[b]:.1f}"
            cells[s].append(text)
    width = max(len(s) for s in systems) + 2
    cols = [max(len(h), 14) + 2 for h in heads]
    lines = ["".ljust(width) + "".join(h.rjust(c) for h, c in zip(heads, cols, strict=True))]
    for s in systems:
        lines.append(s.ljust(width) + "".join(v.rjust(c) for v, c in zip(cells[s], cols,
                                                                          strict=True)))
    return "\n".join(lines)


REFERENCE_CASCADE = "cascade (reference text)"
HEARD_CASCADE = "cascade (the encoder's CTC transcript)"
WHISPER_CASCADE = "cascade (Whisper's own transcript)"


def cascade_texts(model, records: Sequence[dict], *, device: str = "auto") -> dict:
    """What the cascades feed the LLM of `model` (a SpeechLM) for `records`: {system name:
    texts}. The reference text always; the frozen encoder's own greedy transcript too when
    the encoder checkpoint is an ASR model (a CTC model such as the zoo's ctc_en, or a whole
    Whisper checkpoint, whose decoder the SpeechLM does not use)."""
    from ..pretrained.resolve import resolve_model_dir

    texts = {REFERENCE_CASCADE: [r["text"] for r in records]}
    encoder_dir = resolve_model_dir(model.config.encoder_path)
    heard = encoder_transcripts(encoder_dir, list(records), device=device)
    if heard is not None:
        from ..inference.transcriber import asr_kind

        name = WHISPER_CASCADE if asr_kind(encoder_dir) == "whisper" else HEARD_CASCADE
        texts[name] = heard
    return texts


def encoder_transcripts(encoder_dir: Path, records: list[dict], *, device: str = "auto"
                        ) -> list[str] | None:
    """The encoder checkpoint's own greedy transcripts of `records` when it is an ASR model
    (CTC or Whisper), else None. The LLM reading them is the realistic upper bound of an
    adapter: it has only what the encoder heard, the reference text has more."""
    from ..inference.transcriber import asr_kind, load_transcriber

    if asr_kind(encoder_dir) is None:
        return None
    rows = load_transcriber(encoder_dir, device=device).transcribe_files(
        [r["audio"] for r in records])
    return [row["text"] for row in rows]
