"""The embedded default zoo: models the toolkit trains itself on the embedded corpus.

Each member is a recipe shipped in the package (speechlm/resources/zoo/); the
first `ensure(name)` trains it into the cache, later calls return the cached
model. The cache entry is keyed by a hash of the recipe text, so editing a zoo
recipe trains a fresh model instead of reusing a stale one. A killed build
resumes from its last checkpoint (the trainer's `resume: auto`), and a file
lock keeps two processes from training the same member at once.

A member may also ship its training's result with the package
(resources/zoo/shipped/NAME: the trained weights - an adapter, LoRA - with the
run's metrics log and results): when the shipped build was made from the
member's current recipe (the same run-directory hash), `ensure` installs it in
seconds instead of training for hours; `ensure(name, retrain=True)` (`speechlm
zoo build --retrain NAME`) trains it here instead, which reproduces it.
`tools/zoo_ship.py NAME` writes a finished build's shipped copy.
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
    "speech_tokenizer_whisper_en": ("speech_tokenizer_whisper_en.yaml", "GLM-4-Voice's "
                                    "supervised VQ tokenizer on pretrained Whisper base, "
                                    "English, 12.5 units/s, 1024 codes"),
    "t2u_whisper_en": ("t2u_whisper_en.yaml", "text-to-token model: English text to "
                       "speech_tokenizer_whisper_en's units"),
    "smollm2_verses": ("smollm2_verses.yaml", "SmolLM2-135M-Instruct taught the verse tasks "
                       "from text (LoRA): repeat, last word, mentions God"),
    "blsp_whisper_smollm2_kd": ("blsp_whisper_smollm2_kd.yaml", "speech LLM: Whisper base + "
                                "BLSP adapter (KD) + smollm2_verses"),
    "blsp_whisper_smollm2_ce": ("blsp_whisper_smollm2_ce.yaml", "speech LLM: Whisper base + "
                                "BLSP adapter (CE, the paper's loss) + smollm2_verses"),
    "blsp_whisper_smollm2_kd_long": ("blsp_whisper_smollm2_kd_long.yaml", "speech LLM: "
                                     "blsp_whisper_smollm2_kd trained 900 more updates"),
    "blsp_whisper_smollm2_kd_more": ("blsp_whisper_smollm2_kd_more.yaml", "speech LLM: "
                                     "blsp_whisper_smollm2_kd_long trained 600 more updates "
                                     "on three times the speech"),
}


@dataclass(frozen=True)
class ZooModel:
    name: str
    model_dir: Path              # the saved model (`final/` of the run)
    run_dir: Path                # the whole run: metrics, checkpoints, results.json
    results: dict                # the recipe's results (dev/test scores)
    newly_trained: bool
    seconds: float               # training time (this call, or the call that trained it)
    shipped: bool = False        # installed from the package's shipped build, not trained here


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


SHIPPED_META = "shipped.json"


def shipped_build(name: str) -> Path | None:
    """The package's shipped build of `name` when it was made from the current recipe."""
    directory = resource(f"zoo/shipped/{name}")
    meta = directory / SHIPPED_META
    if not meta.is_file():
        return None
    return directory if json.loads(meta.read_text())["run"] == zoo_run_dir(name).name else None


# what every shipped build carries besides the runner's SHIPPED_FILES: the run's results and
# its training log, so the shipped numbers can be checked against a retrained build
SHIPPED_COMMON = ("results.json", "metrics.jsonl")


def _install_shipped(module, config, shipped: Path, run_dir: Path) -> None:
    """Copy a shipped build into `run_dir` and let the runner complete it (e.g. merge LoRA
    into its base model); `run_dir/final` appears whole or not at all."""
    import shutil

    from .jsonl import atomic_directory

    final = run_dir / "final"
    if final.exists():
        shutil.rmtree(final)
    with atomic_directory(final) as tmp:
        for rel in module.SHIPPED_FILES:
            target = tmp / Path(rel).relative_to("final")
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(shipped / rel, target)
        finish = getattr(module, "finish_shipped_install", None)
        if finish is not None:
            finish(config, tmp)
    for rel in SHIPPED_COMMON:
        shutil.copyfile(shipped / rel, run_dir / rel)


def ship(name: str, dest_root: Path) -> Path:
    """Write the cached, trained build of `name` as a shipped build under `dest_root/name`
    (what `tools/zoo_ship.py` calls; resources/zoo/shipped is the package's copy)."""
    import shutil

    from .jsonl import atomic_directory
    from .recipes import load_recipe

    built = cached(name)
    if built is None or built.shipped:
        raise ConfigError(f"zoo model '{name}' has no trained build in the cache to ship; run "
                          f"`speechlm zoo build --retrain {name}` first")
    module, _ = load_recipe(recipe_path(name))
    files = [*module.SHIPPED_FILES, *SHIPPED_COMMON]
    dest = Path(dest_root) / name
    if dest.exists():
        shutil.rmtree(dest)
    with atomic_directory(dest) as tmp:
        for rel in files:
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(built.run_dir / rel, tmp / rel)
        meta = {"name": name, "run": built.run_dir.name, "seconds": built.seconds,
                "files": files, "reproduce": f"speechlm zoo build --retrain {name}"}
        (tmp / SHIPPED_META).write_text(json.dumps(meta, indent=1) + "\n")
    return dest


def cached(name: str) -> ZooModel | None:
    """The zoo model `name` if the cache holds a finished build of its current recipe."""
    run_dir = zoo_run_dir(name)
    if not (run_dir / "zoo.json").is_file():
        return None
    return _finished(name, run_dir, newly_trained=False)


def ensure(name: str, *, progress: bool = True, retrain: bool = False,
           say: Callable[[str], None] = print) -> ZooModel:
    """The zoo model `name`, built now if the cache does not hold a finished one: installed
    from its shipped build when there is one for this recipe (unless `retrain`), else
    trained."""
    built = cached(name)
    if built is not None and not (retrain and built.shipped):
        return built
    run_dir = zoo_run_dir(name)
    done = run_dir / "zoo.json"
    if built is not None:  # retrain over an installed shipped build
        done.unlink()
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    from .jsonl import blocking_lock

    with blocking_lock(run_dir.with_suffix(".lock")):
        if done.is_file():  # another process finished it while we waited
            return _finished(name, run_dir, newly_trained=False)
        from .recipes import load_recipe

        module, config = load_recipe(recipe_path(name), [
            f"train.output_dir={run_dir}", "train.resume=auto",
            f"train.progress={'true' if progress else 'false'}"])
        shipped = None if retrain else shipped_build(name)
        start = time.perf_counter()
        if shipped is not None:
            say(f"installing zoo model '{name}' ({MEMBERS[name][1]}) from its shipped build "
                f"into {run_dir} (`speechlm zoo build --retrain {name}` trains it instead)")
            _install_shipped(module, config, shipped, run_dir)
            seconds = json.loads((shipped / SHIPPED_META).read_text())["seconds"]
        else:
            resuming = any(run_dir.glob("step_*"))  # the trainer's checkpoints
            say(f"training zoo model '{name}' ({MEMBERS[name][1]}) into {run_dir}"
                + (" (resuming an interrupted build)" if resuming else ""))
            results = module.run(config)
            # a resumed build's earlier sessions count too (the recipe reports their time)
            train = results.get("train", {}) if isinstance(results, dict) else {}
            seconds = max(time.perf_counter() - start,
                          sum(float(train.get(k) or 0.0)
                              for k in ("stage1_seconds", "cache_seconds", "train_seconds")))
        from .jsonl import atomic_write

        with atomic_write(done) as f:  # written last: its presence means the build finished
            json.dump({"name": name, "seconds": seconds, "finished": time.time(),
                       "shipped": shipped is not None,
                       "install_seconds": time.perf_counter() - start}, f)
    return _finished(name, run_dir, newly_trained=True)


def _finished(name: str, run_dir: Path, *, newly_trained: bool) -> ZooModel:
    meta = json.loads((run_dir / "zoo.json").read_text())
    results = json.loads((run_dir / "results.json").read_text())
    return ZooModel(name=name, model_dir=run_dir / "final", run_dir=run_dir, results=results,
                    newly_trained=newly_trained, seconds=float(meta["seconds"]),
                    shipped=bool(meta.get("shipped", False)))
