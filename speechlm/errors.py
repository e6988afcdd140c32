"""Errors a user can act on.

Every error raised for bad input is a `SpeechLMError`: its message says what
went wrong, where (file, line, field) and what to do. The CLI prints the
message as one line and exits non-zero; anything else is a bug and keeps its
traceback.
"""


class SpeechLMError(Exception):
    """Base class for errors caused by input the user can fix."""


class ConfigError(SpeechLMError):
    """A recipe, option or override is invalid."""


class ManifestError(SpeechLMError):
    """A manifest line is malformed; the message starts with `file:line:`."""


class AudioError(SpeechLMError):
    """An audio file cannot be used. `path` and `reason` say which and why."""

    reason = "unusable"

    def __init__(self, path, detail: str = "", hint: str = ""):
        self.path = str(path)
        self.detail = detail
        msg = f"{self.path}: {self.reason}"
        if detail:
            msg += f" ({detail})"
        if hint:
            msg += f"; {hint}"
        super().__init__(msg)


class AudioMissingError(AudioError):
    reason = "file not found"


class AudioDecodeError(AudioError):
    reason = "unreadable or corrupt audio"


class AudioEmptyError(AudioError):
    reason = "audio is empty"


class AudioSilentError(AudioError):
    reason = "audio is silent"


class AudioNonFiniteError(AudioError):
    reason = "audio contains NaN or Inf samples"


class AudioTooShortError(AudioError):
    reason = "audio is shorter than the limit"


class AudioTooLongError(AudioError):
    reason = "audio is longer than the limit"


class PromptTooLongError(SpeechLMError):
    """An item's text prompt leaves no room in the LLM's context. `name` says which item."""

    def __init__(self, name, detail: str, hint: str = ""):
        self.path = str(name)
        super().__init__(f"{name}: prompt too long ({detail})" + (f"; {hint}" if hint else ""))


class TTSError(SpeechLMError):
    """The TTS engine cannot say a text or cannot load a voice."""


class WriteError(SpeechLMError):
    """Writing an output failed for lack of space (a full disk, a quota, a file-size limit)
    or another system error; `path` says which output."""

    def __init__(self, path, detail: str):
        self.path, self.detail = str(path), detail
        super().__init__(
            f"{self.path}: cannot write it ({detail}); free space on that disk (or point the "
            "output at another) and rerun: finished work is kept, and nothing half-written "
            "is used")

    def __reduce__(self):  # rebuilt from its parts when a worker process raises it
        return type(self), (self.path, self.detail)


def about(item_id, message) -> str:
    """`message` about the item `item_id`, naming it once: an audio error already starts with
    its file, which is the item's id when the input was a file."""
    message = str(message)
    return message if message.startswith(f"{item_id}:") else f"{item_id}: {message}"
