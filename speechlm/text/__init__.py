"""Text processing shared by training and evaluation: transcript normalisation per language.

Importing this package is cheap; names are loaded from their modules on first use.
"""

from .._lazy import lazy_exports

_EXPORTS = {
    "normalize_transcript": "normalize",
    "LanguageRules": "normalize",
    "register_language": "normalize",
    "rules_for": "normalize",
    "LANGUAGE_RULES": "normalize",
}

__all__ = sorted(_EXPORTS)

__getattr__ = lazy_exports(__name__, _EXPORTS)
