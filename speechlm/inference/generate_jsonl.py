"""SpeechLM inference over a manifest or audio files, written as resumable JSONL; and the
`speechlm infer` options for SpeechLM checkpoints (a directory with speechlm_config.json).

    requests = requests_from_manifest("test.jsonl", TaskPrompt("st", target_lang="es"))
    summary = generate_jsonl(generator, requests, "hyp.jsonl")   # one line per id
    print(summary.summary())

Output lines: {id, task, text, audio_s, latency_s, encode_s, generate_s, n_tokens,
segments} (+ "error" for an item that could not run; see
`speechlm.inference.speech_lm.Result`). Lines are appended with
`JsonlAppender` chunk by chunk (each chunk sorted by duration inside the
generator, written back in manifest order); a rerun skips the ids already in
the file, so a killed job continues without repeating or dropping any
(`resume=False` starts the file afresh).

Per-record task fields of a manifest: asr takes `lang` (when no --lang), st
`target_lang`, sqa `question` (a text question; `--spoken-question` ignores
it: the question is in the audio), chat `messages` (a list of {role,
content} with one `<speech>` slot, filled by the record's audio) or
`question`. A record whose fields do not make a valid prompt stops the run
before anything is generated, with file:line.

This module imports only the standard library at top level, so the CLI can
build its parser without loading torch.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from .run_summary import RunSummary

# --dtype of the commands that load a speech LM (infer, serve, transfer)
WEIGHT_DTYPES = ("float32", "bfloat16", "float16")

__all__ = [
    "GenerationSummary", "SPEECH_LM_CONFIG", "add_speech_lm_arguments", "generate_jsonl",
    "is_speech_lm_dir", "requests_from_files", "requests_from_manifest",
    "run_speech_lm_inference",
]

SPEECH_LM_CONFIG = "speechlm_config.json"  # = speechlm.models.speech_lm.CONFIG_FILE


def is_speech_lm_dir(path) -> bool:
    """Whether `path` is a SpeechLM checkpoint directory (holds speechlm_config.json)."""
    return (Path(path) / SPEECH_LM_CONFIG).is_file()


@dataclass
class GenerationSummary(RunSummary):
    """Totals of one generate_jsonl call (not of lines found from earlier runs)."""

    items: int = 0
    n_tokens: int = 0
    duplicates: int = 0

    def summary(self) -> str:
        text = (f"generated {self.items} item(s), {self._timing()}, "
                f"{self.n_tokens / self.wall_s if self.wall_s else 0.0:.1f} tokens/s)")
        if self.duplicates:
            text += f"; {self.duplicates} repeated id(s) skipped"
        return text + self._tail("failed")


# -- requests ----------------------------------------------------------------------------


def _record_prompt(prompt, record: dict, spoken_question: bool):
    """The task prompt for one manifest record: CLI values first, record fields fill gaps."""
    from dataclasses import replace

    updates: dict = {}
    if prompt.task == "asr" and prompt.lang is None and record.get("lang"):
        updates["lang"] = record["lang"]
    if prompt.task == "st" and prompt.target_lang is None and record.get("target_lang"):
        updates["target_lang"] = record["target_lang"]
    if prompt.task in ("sqa", "chat") and prompt.question is None and not spoken_question \
            and record.get("question"):
        updates["question"] = record["question"]
    if prompt.task == "chat" and prompt.messages is None and record.get("messages") is not None:
        updates["messages"] = record["messages"]
    return replace(prompt, **updates) if updates else prompt


def requests_from_manifest(manifest, prompt, *, options=None, spoken_question: bool = False,
                           skip_ids: Iterable[str] = ()) -> list:
    """Requests for every record of `manifest` (audio path + offset/duration), the task
    prompt filled per record (see the module doc). Ids in `skip_ids` are left out.

    Raises ManifestError "file:line: ..." for a record whose prompt is invalid.
    """
    from ..data.manifest import AUDIO_PATH_KEY, iter_manifest_lines, no_records
    from ..errors import ConfigError, ManifestError
    from .speech_lm import Request

    skip = set(skip_ids)
    requests = []
    records_seen = 0
    for lineno, record in iter_manifest_lines(manifest):
        records_seen += 1
        rid = str(record["id"])
        if rid in skip:
            continue
        item_prompt = _record_prompt(prompt, record, spoken_question)
        try:
            item_prompt.validate()
            if item_prompt.num_speech != 1:
                raise ConfigError(f"the chat messages hold {item_prompt.num_speech} <speech> "
                                  "slots; a manifest record has one audio, so exactly one")
        except ConfigError as e:
            raise ManifestError(f"{manifest}:{lineno}: id {rid!r}: {e}") from None
        requests.append(Request(
            rid, record[AUDIO_PATH_KEY], task=item_prompt.task, lang=item_prompt.lang,
            target_lang=item_prompt.target_lang, question=item_prompt.question,
            messages=item_prompt.messages, instruction=item_prompt.instruction,
            offset=float(record.get("offset", 0.0)), duration=record.get("duration"),
            options=options))
    if not records_seen:
        raise ManifestError(no_records(manifest))
    return requests


def requests_from_files(paths: Sequence, prompt, *, options=None) -> list:
    """One request per audio file (id = the path as given); for chat with messages, one
    request whose speech slots take the files in order (id = "conversation")."""
    from .speech_lm import Request

    fields = dict(task=prompt.task, lang=prompt.lang, target_lang=prompt.target_lang,
                  question=prompt.question, messages=prompt.messages,
                  instruction=prompt.instruction, options=options)
    if prompt.task == "chat" and prompt.messages is not None:
        return [Request("conversation", [str(p) for p in paths], **fields)]
    return [Request(str(p), str(p), **fields) for p in paths]


# -- the JSONL job -----------------------------------------------------------------------


def done_ids(out_path) -> set[str]:
    """Ids already written to `out_path` (a torn last line is ignored)."""
    from ..jsonl import iter_jsonl

    out_path = Path(out_path)
    if not out_path.exists():
        return set()
    return {str(rec.get("id")) for _, rec in iter_jsonl(out_path, tolerate_torn_tail=True)}


def generate_jsonl(generator, requests: Sequence, out_path, *, resume: bool = True,
                   chunk_size: int | None = None, progress: bool = False) -> GenerationSummary:
    """Run `requests` through `generator` (a SpeechLMGenerator) and append one line per
    request to `out_path`; ids already there are skipped (resume), or the file is
    started afresh (`resume=False`). Requests repeating an id run once.

    chunk_size: requests per generate call (default 8 batches): bigger chunks sort
    by duration better, smaller ones write results sooner.
    """
    from ..jsonl import JsonlAppender

    out = Path(out_path)
    summary = GenerationSummary(out_path=out)
    done: set[str] = set()
    if out.exists():
        if resume:
            done = done_ids(out)
        else:
            out.unlink()
    todo, seen = [], set()
    for request in requests:
        rid = str(request.id)
        if rid in seen:
            summary.duplicates += 1
        elif rid in done:
            summary.already_done += 1
        else:
            todo.append(request)
        seen.add(rid)
    chunk = chunk_size or generator.batch_size * 8
    bar = None
    if progress:
        from ..progress import progress_bar

        bar = progress_bar(total=len(todo), desc="generate", unit="item", dynamic_ncols=True)
    start = time.perf_counter()
    try:
        with JsonlAppender(out) as appender:
            for first in range(0, len(todo), chunk):
                for result in generator.generate(todo[first : first + chunk]):
                    appender.write(result.to_record())
                    summary.items += 1
                    summary.audio_s += result.audio_s
                    summary.n_tokens += result.n_tokens
                    if result.error is not None:
                        summary.failed += 1
                        summary.failures.append({"id": result.id, "error": result.error})
                if bar is not None:
                    bar.update(min(chunk, len(todo) - first))
    finally:
        if bar is not None:
            bar.close()
        summary.wall_s = time.perf_counter() - start
    return summary


# -- CLI ---------------------------------------------------------------------------------


def _add(parser, *flags, **kwargs) -> None:
    """Add an option unless the parser already has it (the infer command shares some
    options, e.g. --model, --out, --device, --max-segment-s, with other model kinds)."""
    existing = getattr(parser, "_option_string_actions", {})
    if flags and flags[0].startswith("-"):
        if any(flag in existing for flag in flags):
            return
    elif any(action.dest == flags[0] for action in getattr(parser, "_actions", ())):
        return
    parser.add_argument(*flags, **kwargs)


def add_speech_lm_arguments(parser) -> None:
    """The options of `speechlm infer` for SpeechLM checkpoints (skipping any the parser
    already has)."""
    _add(parser, "--model", required=True, metavar="DIR",
         help="model directory (a SpeechLM checkpoint holds speechlm_config.json)")
    _add(parser, "audio", nargs="*", help="audio files")
    _add(parser, "--manifest", metavar="JSONL", help="run every utterance of a manifest")
    _add(parser, "--out", metavar="JSONL",
         help="write {id, task, text, audio_s, latency_s, ...} lines here (a manifest run "
              "appends and skips ids already there); default: print")
    _add(parser, "--no-resume", action="store_true",
         help="start --out afresh instead of continuing after its ids")
    _add(parser, "--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    _add(parser, "--max-segment-s", type=float, default=30.0, metavar="S",
         help="cut longer recordings into segments at silences and join the texts (asr/st; "
              "sqa/chat need the whole recording) (default 30)")
    _add(parser, "--quiet", action="store_true", help="no progress bar or summary")

    group = parser.add_argument_group("speech LM task (SpeechLM checkpoints)")
    _add(group, "--task", choices=("asr", "st", "sqa", "chat"), default="asr",
         help="asr: transcribe; st: translate (--target-lang); sqa: answer a question "
              "(--question, else spoken in the audio); chat: converse (--messages)")
    _add(group, "--lang", metavar="LANG", help="asr: language of the speech (default en, or the "
                                               "manifest's lang)")
    _add(group, "--target-lang", metavar="LANG", help="st: language to translate into, e.g. es")
    _add(group, "--question", metavar="TEXT", help="sqa/chat: a question about the audio")
    _add(group, "--spoken-question", action="store_true",
         help="sqa: the question is in the audio (ignore a manifest's question field)")
    _add(group, "--instruction", metavar="TEXT", help="asr/st/sqa: use this instruction wording")
    _add(group, "--messages", metavar="JSON",
         help="chat: a JSON file with a list of {role, content} messages; <speech> in a user "
              "turn is a speech slot, filled by the audio files in order")
    _add(group, "--encoder-path", metavar="DIR",
         help="the checkpoint's base speech encoder, when it is no longer where it was trained")
    _add(group, "--llm-path", metavar="DIR",
         help="the checkpoint's base LLM, when it is no longer where it was trained")
    _add(group, "--dtype", choices=WEIGHT_DTYPES, default="float32",
         help="weights of the encoder and LLM (bfloat16 halves GPU memory)")
    _add(group, "--trust-remote-code", action="store_true",
         help="allow model code from the base model directories (off by default)")
    _add(group, "--strict", action="store_true",
         help="stop at the first unusable audio instead of recording the error")

    gen = parser.add_argument_group("generation (SpeechLM checkpoints)")
    _add(gen, "--batch-size", type=int, default=16, help="items per batch (default 16)")
    _add(gen, "--max-batch-duration", type=float, metavar="S",
         help="most padded seconds of audio per batch (default: no limit)")
    _add(gen, "--max-new-tokens", type=int, default=128, help="default 128")
    _add(gen, "--num-beams", type=int, default=1, help="beam search with this many beams")
    _add(gen, "--do-sample", action="store_true", help="sample instead of greedy decoding")
    _add(gen, "--temperature", type=float, default=1.0, help="sampling temperature")
    _add(gen, "--top-p", type=float, default=1.0, help="nucleus sampling mass")
    _add(gen, "--top-k", type=int, help="sample among the k most likely tokens")
    _add(gen, "--repetition-penalty", type=float, help="e.g. 1.1 (default: the LLM's)")
    _add(gen, "--seed", type=int, help="seed for reproducible sampling")
    _add(gen, "--stop", action="append", default=[], metavar="STR",
         help="cut the response at this string (repeatable)")


def _load_messages(path) -> tuple:
    from ..errors import SpeechLMError

    path = Path(path)
    try:
        messages = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SpeechLMError(f"--messages {path}: file not found") from None
    except json.JSONDecodeError as e:
        raise SpeechLMError(f"--messages {path}: invalid JSON ({e})") from None
    if not isinstance(messages, list):
        raise SpeechLMError(f"--messages {path}: expected a JSON list of {{role, content}} "
                            "messages")
    return tuple(messages)


def prompt_and_options_from_args(args):
    """(TaskPrompt, GenerationOptions) from parsed `speechlm infer` arguments."""
    from .speech_lm import GenerationOptions
    from .tasks import TaskPrompt

    messages = getattr(args, "messages", None)
    prompt = TaskPrompt(getattr(args, "task", "asr"), lang=getattr(args, "lang", None),
                        target_lang=getattr(args, "target_lang", None),
                        question=getattr(args, "question", None),
                        messages=_load_messages(messages) if messages else None,
                        instruction=getattr(args, "instruction", None))
    options = GenerationOptions(
        max_new_tokens=getattr(args, "max_new_tokens", 128),
        num_beams=getattr(args, "num_beams", 1), do_sample=getattr(args, "do_sample", False),
        temperature=getattr(args, "temperature", 1.0), top_p=getattr(args, "top_p", 1.0),
        top_k=getattr(args, "top_k", None),
        repetition_penalty=getattr(args, "repetition_penalty", None),
        seed=getattr(args, "seed", None), stop=tuple(getattr(args, "stop", None) or ()))
    return prompt, options


def run_speech_lm_inference(args) -> int:
    """`speechlm infer` for a SpeechLM checkpoint. Returns the exit status (1 when an
    audio file given on the command line failed)."""
    from ..errors import SpeechLMError, about
    from ..jsonl import write_jsonl
    from .speech_lm import SpeechLMGenerator

    audio, manifest, out = getattr(args, "audio", None) or [], getattr(args, "manifest", None), \
        getattr(args, "out", None)
    if bool(audio) == bool(manifest):
        raise SpeechLMError("give audio files or --manifest M (one of the two)")
    if manifest and not out:
        raise SpeechLMError("--manifest needs --out OUT.jsonl (results are appended there, so a "
                            "killed run can continue)")
    if not is_speech_lm_dir(args.model):
        raise SpeechLMError(f"{args.model}: not a SpeechLM checkpoint (no {SPEECH_LM_CONFIG}); "
                            "give the directory SpeechLM.save_pretrained or `speechlm train` wrote")
    prompt, options = prompt_and_options_from_args(args)
    spoken = bool(getattr(args, "spoken_question", False))
    if spoken and prompt.question:
        raise SpeechLMError("--spoken-question and --question exclude each other")
    if not manifest:
        prompt.validate()  # a manifest may fill the gaps per record
    quiet = bool(getattr(args, "quiet", False))
    requests = (requests_from_manifest(manifest, prompt, options=options, spoken_question=spoken)
                if manifest else requests_from_files(audio, prompt, options=options))

    generator = SpeechLMGenerator.from_pretrained(
        args.model, encoder_path=getattr(args, "encoder_path", None),
        llm_path=getattr(args, "llm_path", None), device=getattr(args, "device", "auto"),
        dtype=getattr(args, "dtype", None), trust_remote_code=getattr(args, "trust_remote_code",
                                                                      False),
        batch_size=getattr(args, "batch_size", 16),
        max_batch_duration=getattr(args, "max_batch_duration", None),
        max_segment_s=getattr(args, "max_segment_s", 30.0), options=options,
        strict=getattr(args, "strict", False))

    if manifest:
        summary = generate_jsonl(generator, requests, out,
                                 resume=not getattr(args, "no_resume", False), progress=not quiet)
        if not quiet:
            print(summary.summary(), file=sys.stderr)
        return 0
    results = generator.generate(requests, progress=not quiet and len(requests) > 1)
    if out:
        write_jsonl(out, [r.to_record() for r in results])
    else:
        for result in results:
            if result.error is None:
                print(f"{result.id}\t{result.text}" if len(results) > 1 else result.text)
    failed = [r for r in results if r.error is not None]
    for result in failed:
        print(f"speechlm: {about(result.id, result.error)}", file=sys.stderr)
    return 1 if failed else 0
