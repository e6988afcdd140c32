"""Totals of a resumable inference run over a manifest (CTC transcription, SpeechLM
generation): what this call did, not the lines an earlier run already wrote."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class RunSummary:
    audio_s: float = 0.0
    wall_s: float = 0.0
    failed: int = 0
    already_done: int = 0
    out_path: Path | None = None
    failures: list[dict] = field(default_factory=list)

    @property
    def rtf(self) -> float:
        """Real-time factor: seconds of compute per second of audio (< 1 is faster)."""
        return self.wall_s / self.audio_s if self.audio_s > 0 else 0.0

    def _timing(self) -> str:
        return (f"{self.audio_s / 60:.1f} min of audio in {self.wall_s:.1f} s (real-time factor "
                f"{self.rtf:.3f}")

    def _tail(self, failed_as: str) -> str:
        text = ""
        if self.already_done:
            text += f"; {self.already_done} already in {self.out_path}"
        if self.failed:
            text += f"; {self.failed} {failed_as} (empty text written; see 'error')"
        return text
