"""Server-sent events for `stream: true`: text deltas that add up to the final answer.

The model thread reports the token ids of a request after each step; the
text decoded so far is turned into deltas. The final answer is trimmed
(surrounding whitespace) and cut before a stop string, so a delta never sends
the text's trailing whitespace, nor its last `hold` characters (where a stop
string may be forming), nor a half-decoded character (U+FFFD); `finish`
sends the rest. The deltas therefore concatenate to exactly the answer a
non-streamed request gets.
"""

from __future__ import annotations

import json
import logging

logger = logging.getLogger(__name__)

PARTIAL = "\ufffd"  # what a tokenizer decodes an incomplete UTF-8 sequence to


class TextDeltas:
    def __init__(self, hold: int = 0):
        self.hold = max(0, int(hold))
        self.sent = ""

    def update(self, text: str) -> str:
        """The new text safe to send, given everything decoded so far."""
        safe = text.lstrip().rstrip().rstrip(PARTIAL).rstrip()
        if self.hold:
            safe = safe[: max(0, len(safe) - self.hold)]
        if len(safe) <= len(self.sent) or not safe.startswith(self.sent):
            return ""  # nothing new, or the decode rewrote earlier text: wait for more
        delta, self.sent = safe[len(self.sent):], safe
        return delta

    def finish(self, final: str) -> str:
        """The rest of the final answer."""
        if final.startswith(self.sent):
            return final[len(self.sent):]
        logger.warning("streamed text %r is not a prefix of the answer %r", self.sent, final)
        return ""


def sse(payload: dict | str) -> str:
    """One server-sent event (`data: ...` and a blank line)."""
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {data}\n\n"
