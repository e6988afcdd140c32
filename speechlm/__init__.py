"""speechlm: speech-text language models and their data pipelines.

Heavy dependencies (torch, transformers) are imported by the modules that need
them, never here, so `import speechlm` and `speechlm --help` stay fast.
"""

__version__ = "0.1.0"
