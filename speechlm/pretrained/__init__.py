"""Pretrained models by name: registry packages, converters (CTranslate2 Whisper, GGUF), and the one
resolver of model names."""
