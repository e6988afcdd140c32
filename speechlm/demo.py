"""`speechlm demo`: the main job on the embedded default.

It builds (once, cached) the embedded English speech corpus, validates it and
shows its statistics and how well duration bucketing packs it; then trains (once,
cached) the embedded zoo's models and reports their held-out scores: the CTC
speech encoder, the text LLM, and BLSP, which aligns the two (continuations,
encoder-output cache, adapter training) and ends with the zero-shot transfer
table: ASR and speech translation asked of held-out speech.
"""

from __future__ import annotations

import time


def run_demo(*, jobs: int | None = None, progress: bool = True, out=print) -> int:
    from .data.manifest import iter_manifest, validate_manifest
    from .data.sampler import DurationBucketSampler, RandomBatchSampler, padding_fraction
    from .data.stats import format_stats, manifest_stats
    from .pipelines.embedded_corpus import build_embedded_corpus

    start = time.perf_counter()
    out("== Embedded speech corpus (eSpeak NG voices reading public-domain verses)")
    corpus = build_embedded_corpus("en", jobs=jobs, progress=progress)
    verb = "built" if corpus.newly_built else "cached"
    out(f"{verb} at {corpus.root} in {time.perf_counter() - start:.1f}s")

    problems = 0
    for split, manifest in corpus.manifests.items():
        report = validate_manifest(manifest, check_audio_exists=True)
        problems += len(report.problems)
        out(f"\n-- {split}: {report.n_ok}/{report.n_lines} lines valid")
        for line in report.problems[:10]:
            out(f"   {line}")
        out(format_stats(manifest_stats(manifest)))

    durations = [rec["duration"] for rec in iter_manifest(corpus.manifests["train"])]
    budget = 60.0
    bucketed = DurationBucketSampler(durations, max_batch_duration=budget, seed=0)
    random_batches = RandomBatchSampler(durations, max_batch_duration=budget, seed=0)
    out(f"\n== Batching the train split ({len(durations)} utterances, "
        f"{budget:.0f} s of padded audio per batch)")
    for name, sampler in (("duration buckets", bucketed), ("random batches", random_batches)):
        batches = list(sampler)
        out(f"{name:>17}: {len(batches):4d} batches, padding "
            f"{100 * padding_fraction(batches, durations):5.1f}% of frames")

    from .recipes import ctc, text_lm

    _zoo_member("ctc_en", "English CTC speech encoder (wav2vec2 from scratch, eSpeak voices)",
                lambda results: ctc.results_table(results, ("dev", "test")),
                "transcribe with: speechlm infer --model {model_dir} AUDIO...",
                progress=progress, out=out)
    _zoo_member("llm_en_es", "English-Spanish instruction LLM (Llama from scratch, verses)",
                text_lm.format_table, "load with: AutoModelForCausalLM.from_pretrained("
                "'{model_dir}') (chat template: the BLSP format)", progress=progress, out=out)
    from .recipes import blsp

    _zoo_member("blsp_en", "BLSP speech LLM (ctc_en encoder + adapter + llm_en_es, trained "
                "on the LLM's own continuations of the train transcripts)",
                blsp.format_results, "ask it with: speechlm infer --model {model_dir} --task "
                "asr AUDIO...   (or --task st --target-lang es)", progress=progress, out=out)
    out(f"\ndone in {time.perf_counter() - start:.1f}s")
    return 1 if problems else 0


def _zoo_member(name: str, title: str, table, usage: str, *, progress: bool, out) -> None:
    """Train (once) and report a zoo model's held-out scores."""
    from . import zoo

    out(f"\n== Zoo model: {title}")
    model = zoo.ensure(name, progress=progress, say=out)
    verb = "trained" if model.newly_trained else "cached; trained"
    out(f"{verb} in {model.seconds / 60:.1f} min; scores on held-out voices and verses:")
    out(table(model.results))
    out(usage.format(model_dir=model.model_dir))
