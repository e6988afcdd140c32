"""Import public corpus layouts into speechlm JSONL manifests.

One module per format (librispeech, commonvoice, kaldi, hf_datasets,
lhotse_cuts), sharing `common.run_import`: bad items are skipped and counted
by reason (or raise with `strict`), the manifest is written atomically, and an
`ImportReport` says what happened. `import_dataset(fmt, ...)` dispatches by
name; `speechlm data import FORMAT SOURCE --out MANIFEST` is the CLI.
"""

from __future__ import annotations

import inspect

from ...errors import ConfigError
from .common import REASONS, DatasetImportError, ImportReport, run_import
from .commonvoice import import_commonvoice
from .hf_datasets import import_hf
from .kaldi import import_kaldi
from .lhotse_cuts import import_lhotse
from .librispeech import import_librispeech

FORMATS = {
    "librispeech": import_librispeech,
    "commonvoice": import_commonvoice,
    "kaldi": import_kaldi,
    "hf": import_hf,
    "lhotse": import_lhotse,
}
ALIASES = {"common_voice": "commonvoice", "cv": "commonvoice", "huggingface": "hf",
           "hf_datasets": "hf", "datasets": "hf", "lhotse_cuts": "lhotse"}
# Options every format accepts (they go to run_import).
COMMON_OPTIONS = tuple(name for name in inspect.signature(run_import).parameters
                       if name not in ("candidates", "out_manifest", "fmt", "source"))


def format_options(fmt: str) -> tuple[str, ...]:
    """The format-specific keyword options of `fmt` (besides COMMON_OPTIONS)."""
    func = FORMATS[ALIASES.get(fmt, fmt)]
    return tuple(name for name, p in inspect.signature(func).parameters.items()
                 if p.kind is inspect.Parameter.KEYWORD_ONLY)


def import_dataset(fmt: str, source, out_manifest, *, lang: str | None = None,
                   strict: bool = False, relative: bool = False, limit: int | None = None,
                   **format_options_) -> ImportReport:
    """Import `source` in format `fmt` (one of FORMATS) into the manifest `out_manifest`.

    lang overrides the corpus language; strict raises DatasetImportError on
    the first bad item; relative writes audio paths relative to the
    manifest; limit stops after that many records. Other keywords are the
    format's own options (e.g. split=, audio_column=) or run_import's
    (probe=, allow_no_text=, audio_dir=, progress=). Returns an ImportReport.
    """
    name = ALIASES.get(fmt, fmt)
    if name not in FORMATS:
        raise ConfigError(f"unknown import format {fmt!r}; choose one of {', '.join(FORMATS)}")
    allowed = set(format_options(name)) | set(COMMON_OPTIONS)
    unknown = sorted(set(format_options_) - allowed)
    if unknown:
        raise ConfigError(f"unknown option(s) {', '.join(unknown)} for format {name!r}; "
                          f"it accepts: {', '.join(sorted(allowed))}")
    return FORMATS[name](source, out_manifest, lang=lang, strict=strict, relative=relative,
                         limit=limit, **format_options_)


__all__ = ["FORMATS", "REASONS", "DatasetImportError", "ImportReport", "import_dataset",
           "import_commonvoice", "import_hf", "import_kaldi", "import_librispeech",
           "import_lhotse", "run_import", "format_options"]
