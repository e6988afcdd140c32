"""Evaluation: WER/CER, BLEU/chrF, exact match and accuracy; scoring hypothesis files.

Importing this package is cheap; names are loaded from their modules on first use.
"""

from .._lazy import lazy_exports

_EXPORTS = {
    "wer": "metrics",
    "cer": "metrics",
    "bleu": "metrics",
    "chrf": "metrics",
    "exact_match": "metrics",
    "accuracy": "metrics",
    "edit_counts": "metrics",
    "score_manifest": "metrics",
    "ScoreResult": "metrics",
    "METRICS": "metrics",
}

__all__ = sorted(_EXPORTS)

__getattr__ = lazy_exports(__name__, _EXPORTS)
