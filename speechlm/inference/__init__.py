"""Inference: CTC transcription (greedy and beam-search decoding); later speech-LLM tasks.

Importing this package is cheap; names are loaded from their modules on first use.
"""

from .._lazy import lazy_exports

_EXPORTS = {
    "CTCTranscriber": "ctc",
    "GreedyCTCDecoder": "ctc",
    "TranscribeSummary": "ctc",
    "BeamSearchCTCDecoder": "ctc_beam",
    "tune_lm_weights": "lm_tuning",
    "TuneResult": "lm_tuning",
    "SpeechLMGenerator": "speech_lm",
    "Request": "speech_lm",
    "Result": "speech_lm",
    "GenerationOptions": "speech_lm",
    "Clip": "speech_lm",
    "TaskPrompt": "tasks",
    "generate_jsonl": "generate_jsonl",
    "GenerationSummary": "generate_jsonl",
}

__all__ = sorted(_EXPORTS)

__getattr__ = lazy_exports(__name__, _EXPORTS)
