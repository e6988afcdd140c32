"""The server's one error type: an HTTP status and an OpenAI-shaped JSON body.

Every bad request ends as an `APIError`; its message says what was wrong, in
which field (`param`, e.g. "messages[0].content[1].input_audio.data"), and
what to do. The body is OpenAI's, so the official client raises its own
`BadRequestError` / `AuthenticationError` / `NotFoundError` with our message.
"""

from __future__ import annotations

from ..errors import AudioTooLongError, PromptTooLongError, SpeechLMError

_TYPES = {401: "authentication_error", 404: "not_found_error", 413: "invalid_request_error"}


class APIError(Exception):
    def __init__(self, status: int, message: str, *, param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status = int(status)
        self.message = message
        self.param = param
        self.code = code

    def body(self) -> dict:
        kind = _TYPES.get(self.status, "invalid_request_error" if self.status < 500
                          else "server_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param,
                          "code": self.code}}


def error_code(error_type: str | None) -> str:
    """OpenAI-style code for a SpeechLMError class name (as a Result's `error_type`)."""
    if error_type == PromptTooLongError.__name__:
        return "context_length_exceeded"
    if error_type == AudioTooLongError.__name__:
        return "audio_too_long"
    return "invalid_audio" if error_type and error_type.startswith("Audio") else "invalid_request"


def from_speechlm_error(error: SpeechLMError, param: str | None = None) -> APIError:
    """A 400 for input the model refused (bad audio, a prompt over the context, ...)."""
    return APIError(400, str(error), param=param, code=error_code(type(error).__name__))
