"""The embedded default zoo: models the toolkit trains itself on the embedded corpus.

Each member is a recipe shipped in the package (speechlm/resources/zoo/); the
first `ensure(name)` trains it into the cache, later calls return the cached
model. The cache entry is keyed by a hash of the recipe text, so editing a zoo
recipe trains a fresh model instead of reusing a stale one. A killed build
resumes from its last checkpoint (the trainer's `resume: auto`), and a file
lock keeps two processes from training the same member at once.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .errors import ConfigError
from .paths import cache_dir, resource
from .pretrained.resolve import ZOO_PREFIX  # `zoo:llm_en_es` names a zoo model

# name -> (recipe file under resources/zoo, what it is)
MEMBERS: dict[str, tuple[str, str]] = {
    "ctc_en": ("ctc_en.yaml", "small wav2vec2 CTC model, English, trained from scratch"),
    "llm_en_es": ("llm_en_es.yaml", "small Llama instruction LLM, English and Spanish text"),
    "blsp_en": ("blsp_en.yaml", "speech LLM: ctc_en's encoder + BLSP adapter + llm_en_es"),
    "inserter_en": ("inserter_en.yaml", "speech LLM: the same parts, InSerter interleaved "
                    "pre-training"),
    "blsp_inserter_en": ("blsp_inserter_en.yaml", "speech LLM: blsp_en trained further with "
                         "InSerter"),
    "speech_tokenizer_en": ("speech_tokenizer_en.yaml", "supervised VQ speech tokenizer, "
                            "English, 12.5 units/s, 512 codes"),
    "t2u_en": ("t2u_en.yaml", "text-to-token model: English text to speech_tokenizer_en's "
               "units"),
}


@dataclass(frozen=True)
class ZooModel:
    name: str
    model_dir: Path              # the saved model (`final/` of the run)
    run_dir: Path                # the whole run: metrics, checkpoints, results.json
    results: dict                # the recipe's results (dev/test scores)
    newly_trained: bool
    seconds: float               # training time (this call, or the call that trained it)


def check_name(name: str) -> None:
    if name not in MEMBERS:
        raise ConfigError(f"unknown zoo model '{name}'; known: {', '.join(MEMBERS)}")


def recipe_path(name: str) -> Path:
    check_name(name)
    return resource(f"zoo/{MEMBERS[name][0]}")


def zoo_run_dir(name: str) -> Path:
    """cache/zoo/<name>-<hash of its recipe>: a changed recipe gets a fresh directory. The hash
    is of the parsed recipe, so editing its comments keeps the cached model."""
    import yaml

    parsed = yaml.safe_load(recipe_path(name).read_text(encoding="utf-8"))
    # a member built on other members (`zoo:NAME` in its recipe) is keyed by theirs too
    needs = sorted(dependencies(name))
    canonical = json.dumps([parsed, [zoo_run_dir(n).name for n in needs]], sort_keys=True,
                           ensure_ascii=False)
    digest = hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:12]
    return cache_dir() / "zoo" / f"{name}-{digest}"


def dependencies(name: str) -> set[str]:
    """The zoo members a member's recipe uses (`zoo:NAME` values)."""
    import re

    text = recipe_path(name).read_text(encoding="utf-8")
    found = set(re.findall(re.escape(ZOO_PREFIX) + r"([A-Za-z0-9_]+)", text))
    return {n for n in found if n in MEMBERS and n != name}


def cached(name: str) -> ZooModel | None:
    """The zoo model `name` if the cache holds a finished build of its current recipe."""
    run_dir = zoo_run_dir(name)
    if not (run_dir / "zoo.json").is_file():
        return None
    return _finished(name, run_dir, newly_trained=False)


def ensure(name: str, *, progress: bool = True,
           say: Callable[[str], None] = print) -> ZooModel:
    """The zoo model `name`, trained now if the cache does not hold a finished one."""
    built = cached(name)
    if built is not None:
        return built
    run_dir = zoo_run_dir(name)
    done = run_dir / "zoo.json"
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    from .jsonl import blocking_lock

    with blocking_lock(run_dir.with_suffix(".lock")):
        if done.is_file():  # another process finished it while we waited
            return _finished(name, run_dir, newly_trained=False)
        from .recipes import load_recipe

        resuming = any(run_dir.glob("step_*"))  # the trainer's checkpoints
        say(f"training zoo model '{name}' ({MEMBERS[name][1]}) into {run_dir}"
            + (" (resuming an interrupted build)" if resuming else ""))
        module, config = load_recipe(recipe_path(name), [
            f"train.output_dir={run_dir}", "train.resume=auto",
            f"train.progress={'true' if progress else 'false'}"])
        start = time.perf_counter()
        module.run(config)
        seconds = time.perf_counter() - start
        from .jsonl import atomic_write

        with atomic_write(done) as f:  # written last: its presence means the build finished
            json.dump({"name": name, "seconds": seconds, "finished": time.time()}, f)
    return _finished(name, run_dir, newly_trained=True)


def _finished(name: str, run_dir: Path, *, newly_trained: bool) -> ZooModel:
    meta = json.loads((run_dir / "zoo.json").read_text())
    results = json.loads((run_dir / "results.json").read_text())
    return ZooModel(name=name, model_dir=run_dir / "final", run_dir=run_dir, results=results,
                    newly_trained=newly_trained, seconds=float(meta["seconds"]))
