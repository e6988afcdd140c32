"""Kaldi data directory: wav.scp, text, and optional segments, utt2spk, utt2lang, utt2dur.

- wav.scp: "<recording-id> <rxfilename>". Only plain file paths can be used;
  a pipe ("sox ... - |") or an extended filename ("feats.ark:1234") is
  skipped and counted as unsupported_audio with a hint to extract files first.
- segments (optional): "<utt-id> <recording-id> <start> <end>" in seconds;
  end -1 means "to the end of the recording". Without it each recording is
  one utterance whose id is the recording id.
- text: "<utt-id> <transcript>"; utt2spk: "<utt-id> <speaker>";
  utt2lang: "<utt-id> <lang>"; utt2dur: "<utt-id> <seconds>" (used when
  headers are not probed). spk2gender and the rest are ignored.
Relative paths in wav.scp are relative to the directory Kaldi ran in (the
recipe's s5/): tried against `audio_root` if given, else the current
directory, the data dir's grandparent (data/train -> s5) and the data dir.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

from ...errors import ConfigError
from .common import Candidate, ImportReport, Skip, require_dir, resolve_relative, run_import
from .common import split_key_value as _split

# "foo.ark:1234" or "foo.ark:1234[0:100]" style extended filenames.
_EXTENDED_FILENAME = re.compile(r":\d+(\[[^\]]*\])?$")
_HINT = ("extract it to an audio file first (e.g. run the command with sox/ffmpeg, or Kaldi's "
         "`wav-copy scp:wav.scp ark,scp:...` then list plain .wav paths in wav.scp)")


def _read_table(path: Path) -> dict[str, tuple[str, int]]:
    """'key value...' lines -> {key: (value, line)}; missing file -> {}."""
    table: dict[str, tuple[str, int]] = {}
    if not path.is_file():
        return table
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            key, value = _split(line)
            if key and key not in table:
                table[key] = (value, lineno)
    return table


def classify_rxfilename(value: str) -> str | None:
    """Why a wav.scp entry is not a plain file path, or None when it is one."""
    if not value:
        return "empty wav.scp entry"
    if value.endswith("|") or value.startswith("|"):
        return f"pipe command {value!r} is not supported; {_HINT}"
    if value == "-" or value.startswith(("ark:", "scp:")):
        return f"Kaldi stream {value!r} is not supported; {_HINT}"
    if _EXTENDED_FILENAME.search(value) and not Path(value).exists():
        return f"extended filename {value!r} (offset into an archive) is not supported; {_HINT}"
    return None


def iter_kaldi(data_dir: Path, audio_bases: list[Path]) -> Iterator[Candidate | Skip]:
    """Candidates of a Kaldi data dir: one per segment, or one per recording without segments."""
    wav_scp = data_dir / "wav.scp"
    recordings = _read_table(wav_scp)
    texts = _read_table(data_dir / "text")
    speakers = _read_table(data_dir / "utt2spk")
    langs = _read_table(data_dir / "utt2lang")
    durations = _read_table(data_dir / "utt2dur")
    segments_file = data_dir / "segments"
    used: set[str] = set()

    def recording_audio(rec_id: str) -> tuple[Path | None, str | None]:
        value = recordings[rec_id][0]
        problem = classify_rxfilename(value)
        if problem:
            return None, problem
        return resolve_relative(value, audio_bases), None

    def candidate(utt_id: str, where: str, audio: Path, offset=None, duration=None) -> Candidate:
        used.add(utt_id)
        text = texts.get(utt_id, (None, 0))[0]
        if duration is None and offset is None and utt_id in durations:
            try:
                duration = float(durations[utt_id][0])
            except ValueError:
                duration = None
        return Candidate(id=utt_id, where=where, audio=audio, text=text, offset=offset,
                         duration=duration, speaker=speakers.get(utt_id, (None, 0))[0] or None,
                         lang=langs.get(utt_id, (None, 0))[0] or None)

    if segments_file.is_file():
        with open(segments_file, encoding="utf-8") as f:
            for lineno, line in enumerate(f, start=1):
                fields = line.split()
                if not fields:
                    continue
                where = f"{segments_file}:{lineno}"
                if len(fields) != 4:
                    yield Skip("malformed_line", where, f"expected '<utt-id> <recording-id> "
                               f"<start> <end>', got {line.strip()!r}")
                    continue
                utt_id, rec_id, start_text, end_text = fields
                used.add(utt_id)
                try:
                    start, end = float(start_text), float(end_text)
                except ValueError:
                    yield Skip("malformed_line", where, f"start/end are not numbers: {line.strip()!r}")
                    continue
                if rec_id not in recordings:
                    yield Skip("missing_audio", where, f"recording {rec_id!r} is not in {wav_scp}")
                    continue
                audio, problem = recording_audio(rec_id)
                if problem:
                    yield Skip("unsupported_audio", where, f"recording {rec_id!r} "
                               f"({wav_scp}:{recordings[rec_id][1]}): {problem}")
                    continue
                if end != -1 and end <= start:
                    yield Skip("bad_segment", where, f"end {end} s is not after start {start} s")
                    continue
                yield candidate(utt_id, where, audio, offset=start,
                                duration=None if end == -1 else end - start)
    else:
        for rec_id, (_, lineno) in recordings.items():
            where = f"{wav_scp}:{lineno}"
            audio, problem = recording_audio(rec_id)
            if problem:
                used.add(rec_id)
                yield Skip("unsupported_audio", where, problem)
                continue
            yield candidate(rec_id, where, audio)

    # Transcripts whose utterance has no audio would otherwise vanish silently.
    listing = "segments" if segments_file.is_file() else "wav.scp"
    for utt_id, (_, lineno) in texts.items():
        if utt_id not in used:
            yield Skip("missing_audio", f"{data_dir / 'text'}:{lineno}",
                       f"utterance {utt_id!r} has a transcript but is not in {listing}")


def import_kaldi(data_dir, out_manifest, *, audio_root=None, **options) -> ImportReport:
    """Import a Kaldi data directory (see the module docstring for the files read).

    `options` are those of `run_import`; `lang` overrides utt2lang.
    """
    data_dir = require_dir(data_dir, "a Kaldi data directory with wav.scp and text")
    if not (data_dir / "wav.scp").is_file():
        raise ConfigError(f"{data_dir}: no wav.scp; a Kaldi data directory needs wav.scp "
                          "('<recording-id> <path>' lines) and text")
    if not (data_dir / "text").is_file() and not options.get("allow_no_text"):
        raise ConfigError(f"{data_dir}: no text file with transcripts; add one or allow "
                          "utterances without text (--allow-no-text)")
    if audio_root is not None:
        bases = [Path(audio_root).absolute()]
    else:
        here = data_dir.absolute()
        bases = [Path.cwd(), here.parent.parent, here]
    return run_import(iter_kaldi(data_dir, bases), out_manifest, fmt="kaldi", source=data_dir,
                      **options)
