"""Hugging Face `datasets` saved with `save_to_disk` (a Dataset, or a DatasetDict + split).

The audio column is read raw, with `Audio(decode=False)`: each value is
{"bytes": ..., "path": ...}, so nothing is decoded (decoding would need
torchcodec). `save_to_disk` embeds the audio bytes; those are written once
to `<audio_dir>/<id>.<ext>` (default `audio/` beside the manifest) and the
manifest points there. A value with a path but no bytes is used in place
when the file exists. A string column of paths works too.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

from ...errors import ConfigError
from .common import Candidate, ImportReport, Skip, run_import

TEXT_COLUMNS = ("text", "sentence", "transcription", "normalized_text", "transcript")
ID_COLUMNS = ("id", "utt_id", "segment_id", "audio_id")
SPEAKER_COLUMNS = ("speaker_id", "speaker", "client_id")
LANG_COLUMNS = ("lang", "language", "locale")
SPLIT_ALIASES = {"dev": "validation", "valid": "validation", "validation": "dev"}
BATCH_SIZE = 64

# Leading bytes -> extension, for embedded audio whose path has no usable suffix.
_MAGIC = ((b"RIFF", "wav"), (b"fLaC", "flac"), (b"OggS", "ogg"), (b"ID3", "mp3"),
          (b"FORM", "aiff"))


def sniff_extension(data: bytes, path: str | None) -> str:
    """The file extension for encoded audio bytes: from `path` if it has one, else from the magic."""
    suffix = Path(path).suffix.lstrip(".").lower() if path else ""
    if suffix and suffix.isalnum():
        return suffix
    for magic, ext in _MAGIC:
        if data.startswith(magic):
            return ext
    if len(data) > 1 and data[0] == 0xFF and data[1] & 0xE0 == 0xE0:  # MPEG frame sync
        return "mp3"
    return "bin"


def _load(source, split: str | None):
    try:
        import datasets
    except ImportError:
        raise ConfigError("importing a Hugging Face dataset needs the `datasets` package: "
                          "pip install datasets") from None
    if isinstance(source, (datasets.Dataset, datasets.DatasetDict)):
        ds, name = source, "dataset"
    else:
        path = Path(source)
        if not path.exists():
            raise ConfigError(f"{path}: not found; expected a directory written by "
                              "Dataset.save_to_disk or DatasetDict.save_to_disk")
        try:
            ds = datasets.load_from_disk(str(path))
        except FileNotFoundError as e:
            raise ConfigError(f"{path}: not a dataset saved with save_to_disk ({e})") from None
        name = str(path)
    if isinstance(ds, datasets.DatasetDict):
        splits = list(ds.keys())
        if split is None:
            if len(splits) != 1:
                raise ConfigError(f"{name}: a DatasetDict with splits {', '.join(splits)}; "
                                  "choose one with --split")
            split = splits[0]
        elif split not in ds and SPLIT_ALIASES.get(split) in ds:
            split = SPLIT_ALIASES[split]
        if split not in ds:
            raise ConfigError(f"{name}: no split {split!r}; splits: {', '.join(splits)}")
        ds = ds[split]
    return ds, name, split


def _pick_column(columns: list[str], given: str | None, defaults: tuple[str, ...], what: str,
                 name: str, required: bool) -> str | None:
    if given is not None:
        if given not in columns:
            raise ConfigError(f"{name}: no {what} column {given!r}; columns: {', '.join(columns)}")
        return given
    found = next((c for c in defaults if c in columns), None)
    if found is None and required:
        raise ConfigError(f"{name}: no {what} column (tried {', '.join(defaults)}); columns: "
                          f"{', '.join(columns)}; name it with --{what}-column")
    return found


def _cell(batch: dict, column: str | None, row: int) -> str | None:
    value = batch[column][row] if column else None
    return None if value is None else str(value)


def iter_hf(ds, name: str, split: str | None, *, audio_column: str, text_column: str | None,
            id_column: str | None, speaker_column: str | None, lang_column: str | None,
            base_dir: Path | None) -> Iterator[Candidate | Skip]:
    """Candidates of an in-memory/on-disk Dataset, in row order (read in small batches)."""
    import datasets

    feature = ds.features[audio_column]
    if isinstance(feature, datasets.Audio):
        ds = ds.cast_column(audio_column, datasets.Audio(decode=False))
    elif not (isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string")):
        raise ConfigError(f"{name}: column {audio_column!r} is {feature}, not an Audio feature "
                          "or a string of paths; name the audio column with --audio-column")
    columns = [c for c in (audio_column, text_column, id_column, speaker_column, lang_column) if c]
    ds = ds.select_columns(list(dict.fromkeys(columns)))
    label = f"{name}[{split}]" if split else name
    prefix = f"{split}-" if split else ""
    index = 0
    for batch in ds.iter(batch_size=BATCH_SIZE):
        for row in range(len(batch[audio_column])):
            where = f"{label} row {index}"
            value = batch[audio_column][row]
            utt_id = _cell(batch, id_column, row) or f"{prefix}{index:08d}"
            index += 1
            fields = dict(text=_cell(batch, text_column, row),
                          speaker=_cell(batch, speaker_column, row),
                          lang=_cell(batch, lang_column, row))
            if isinstance(value, str):
                value = {"bytes": None, "path": value}
            if not value or (not value.get("bytes") and not value.get("path")):
                yield Skip("missing_audio", where, f"utterance {utt_id!r}: the {audio_column!r} "
                           "value has neither bytes nor a path")
                continue
            if value.get("bytes"):
                yield Candidate(id=utt_id, where=where, audio_bytes=value["bytes"],
                                audio_ext=sniff_extension(value["bytes"], value.get("path")),
                                **fields)
                continue
            path = Path(os.path.expanduser(value["path"]))
            if not path.is_absolute() and base_dir is not None:
                path = base_dir / path
            yield Candidate(id=utt_id, where=where, audio=path, **fields)


def import_hf(source, out_manifest, *, split: str | None = None, audio_column: str = "audio",
              text_column: str | None = None, id_column: str | None = None,
              speaker_column: str | None = None, lang_column: str | None = None,
              **options) -> ImportReport:
    """Import a `datasets` Dataset (a save_to_disk directory, or the object itself).

    text_column defaults to the first of TEXT_COLUMNS present; id_column to
    the first of ID_COLUMNS (else "<split>-<row>"); speaker/lang likewise.
    `options` are those of `run_import` (audio_dir says where embedded audio
    bytes are written; default `audio/` beside the manifest).
    """
    ds, name, split = _load(source, split)
    columns = list(ds.column_names)
    if audio_column not in columns:
        raise ConfigError(f"{name}: no audio column {audio_column!r}; columns: "
                          f"{', '.join(columns)}; name it with --audio-column")
    text_column = _pick_column(columns, text_column, TEXT_COLUMNS, "text", name,
                               required=not options.get("allow_no_text"))
    id_column = _pick_column(columns, id_column, ID_COLUMNS, "id", name, required=False)
    speaker_column = _pick_column(columns, speaker_column, SPEAKER_COLUMNS, "speaker", name,
                                  required=False)
    lang_column = _pick_column(columns, lang_column, LANG_COLUMNS, "lang", name, required=False)
    base_dir = Path(source).absolute() if isinstance(source, (str, os.PathLike)) else None
    candidates = iter_hf(ds, name, split, audio_column=audio_column, text_column=text_column,
                         id_column=id_column, speaker_column=speaker_column,
                         lang_column=lang_column, base_dir=base_dir)
    return run_import(candidates, out_manifest, fmt="hf", source=name, **options)
