"""Speech instruction following, in the spirit of SpeechInstructBench (arXiv 2503.02769):
closed-ended instructions *spoken* by TTS, answers scored automatically.

    records = spoken_instructions("embedded:en/test", ["repeat", "last_word"], 50)
    tables = evaluate_systems({"InSerter": model, ...}, SpeechSource(cache), transfer_records,
                              ["repeat", "translate_es"], records)

Two settings, each next to the cascade (the same LLM reading the text) as the
upper bound:
- "transfer": the instruction in text, the input spoken (the BLSP transfer
  table: repeat = ASR, translate_es = ST);
- "speech_instruct": instruction and input both spoken, one utterance,
  e.g. "What is the last word of the following text? And the king said ...";
  the prompt carries no text instruction at all.
Tasks are the text instructions the embedded LLM learned (repeat,
translate_es, last_word, mentions_god; `speechlm.data.instructions.TASKS`),
scored as in text: WER/CER, BLEU/chrF, exact-answer accuracy (with chance).
The spoken items use held-out verses and the held-out split's voices.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence

from ..errors import ConfigError

__all__ = ["evaluate_systems", "format_results", "spoken_instructions"]

_PREFIX = "embedded:"


def spoken_instructions(spec: str, tasks: Sequence[str], per_task: int, *, progress: bool = True,
                        say=print) -> list[dict]:
    """Records (audio, text = the spoken prompt, task, instruction, input, reference) of
    `per_task` spoken instructions per task on the held-out verses of `spec`
    (embedded:LANG/dev or /test), synthesized once into the cache (resumable)."""
    from ..data.instructions import TASKS, eval_contexts, eval_examples
    from ..paths import cache_dir
    from ..pipelines.embedded_corpus import EMBEDDED
    from ..pipelines.synth import synthesize_corpus
    from .blsp import _manifest_records

    lang, _, split = spec.removeprefix(_PREFIX).partition("/")
    if not spec.startswith(_PREFIX) or lang not in EMBEDDED or split not in ("dev", "test"):
        raise ConfigError(f"eval.speech_instruct: {spec!r} is not a held-out embedded split; use "
                          "embedded:en/test or embedded:en/dev (or null to skip)")
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ConfigError(f"eval.speech_instruct_tasks: unknown task {unknown[0]!r}; known: "
                          f"{', '.join(TASKS)}")
    contexts = eval_contexts(split, lang)
    items = []
    for name in tasks:
        task = TASKS[name]
        if task.lang != lang:
            raise ConfigError(f"eval.speech_instruct_tasks: {name} takes {task.lang} input, the "
                              f"split {spec} is {lang}")
        for i, ex in enumerate(eval_examples(task, contexts, limit=per_task)):
            items.append({"id": f"{name}-{i:04d}", "text": f"{ex.instruction} {ex.input}",
                          "task": name, "instruction_text": ex.instruction, "input": ex.input,
                          "reference": ex.response})
    voices = list(EMBEDDED[lang].splits[split].voices)
    key = hashlib.sha256(json.dumps([items, voices], sort_keys=True).encode()).hexdigest()[:12]
    out = cache_dir() / "speech_instruct" / f"{lang}-{split}-{key}"
    report = synthesize_corpus(items, out, voices=voices, rate=(150, 180), progress=progress)
    if report.done:
        say(f"spoken instructions ({out}): {report.summary()}")
    return _manifest_records(out / "manifest.jsonl")


def _speech_system(model, source, records, batch_size):
    """(instruction, max_new_tokens) -> the model's answers to the records' speech."""
    return lambda ins, n: _respond_speech(model, source, records, ins, n, batch_size)


def _respond_speech(model, source, records, instruction, max_new_tokens, batch_size):
    from .blsp_eval import generate_from_speech

    return generate_from_speech(model, source, records, instruction,
                                max_new_tokens=max_new_tokens, batch_size=batch_size)


def evaluate_systems(systems: dict, source, transfer_records: Sequence[dict],
                     transfer_tasks: Sequence[str], instruct_records: Sequence[dict], *,
                     batch_size: int = 32, hyps_out: list | None = None,
                     say: Callable[[str], None] | None = None) -> dict:
    """{"transfer": table, "speech_instruct": table} for SpeechLMs `systems` (name -> model)
    plus the cascades (the last system's LLM reading the reference text, and the encoder's
    own transcript when it is a CTC model); a table is {system: {task: scores}}. Every
    system answers in its model's own template. `say`, when given, hears one line per
    system and task with its time (the two tables take many minutes)."""
    import time

    from ..data.instructions import TASKS
    from .blsp_eval import cascade_texts, generate_from_text, transfer_scores

    if not systems:
        raise ValueError("no systems to evaluate")
    text_model = list(systems.values())[-1]
    out: dict = {}
    if transfer_records:
        bound = {name: _speech_system(m, source, transfer_records, batch_size)
                 for name, m in systems.items()}
        for name, texts in cascade_texts(text_model, transfer_records).items():
            bound[name] = lambda ins, n, texts=texts: generate_from_text(
                text_model, texts, ins, max_new_tokens=n, batch_size=batch_size)
        rows: list[dict] = []
        out["transfer"] = transfer_scores(bound, transfer_records, transfer_tasks, hyps_out=rows,
                                          say=say)
        if hyps_out is not None:
            hyps_out += [{"setting": "transfer", **r} for r in rows]
    if instruct_records:
        cascades = cascade_texts(text_model, instruct_records)
        table: dict[str, dict] = {name: {} for name in [*systems, *cascades]}
        for name in dict.fromkeys(r["task"] for r in instruct_records):
            task = TASKS[name]
            picked = [i for i, r in enumerate(instruct_records) if r["task"] == name]
            recs = [instruct_records[i] for i in picked]
            refs = [r["reference"] for r in recs]
            answers = {}
            for system in table:
                start = time.perf_counter()
                if system in systems:
                    answers[system] = _respond_speech(systems[system], source, recs, "",
                                                      task.max_new_tokens, batch_size)
                else:
                    answers[system] = generate_from_text(
                        text_model, [cascades[system][i] for i in picked], "",
                        max_new_tokens=task.max_new_tokens, batch_size=batch_size)
                if say is not None:
                    say(f"  spoken instruction: {name:<12} {system:<34} {len(recs)} answers in "
                        f"{time.perf_counter() - start:.0f} s")
            for system, hyps in answers.items():
                scores = task.score(refs, hyps, [r["input"] for r in recs])
                scores["n"] = len(recs)
                table[system][name] = scores
                if hyps_out is not None:
                    hyps_out += [{"setting": "speech_instruct", "system": system, "task": name,
                                  "id": r["id"], "reference": ref, "hypothesis": h}
                                 for r, ref, h in zip(recs, refs, hyps, strict=True)]
        out["speech_instruct"] = table
    return out


def format_results(results: dict) -> str:
    """Both tables (and the final alignment metrics) as text."""
    from .blsp_eval import format_transfer_table

    lines = []
    if results.get("transfer"):
        lines += ["instruction in text, input spoken (WER/CER %, BLEU/chrF, accuracy %):",
                  format_transfer_table(results["transfer"])]
    if results.get("speech_instruct"):
        lines += ["instruction and input spoken (WER/CER %, BLEU/chrF, accuracy %):",
                  format_transfer_table(results["speech_instruct"])]
    align = results.get("alignment") or {}
    if align:
        lines.append("alignment on held-out samples (speech vs text): " + ", ".join(
            f"{k.removeprefix('align_')} {v:.3g}" for k, v in align.items()))
    return "\n".join(lines)
