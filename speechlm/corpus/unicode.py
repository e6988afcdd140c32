"""Unicode repair: datatrove's FTFYFormatter, counting the documents it changed (for the report)."""

from __future__ import annotations

from datatrove.pipeline.formatters import FTFYFormatter

__all__ = ["CountingFTFYFormatter"]


class CountingFTFYFormatter(FTFYFormatter):
    def format(self, text: str) -> str:
        fixed = super().format(text)
        if fixed != text:
            self.stat_update("changed")
            self.stat_update("chars_delta", value=len(text) - len(fixed))
        return fixed
