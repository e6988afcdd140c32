"""Helpers for tests and demos: tiny checkpoints in the real transformers format.

Import from the submodules (`speechlm.testing.tiny_checkpoints`); importing
this package stays free of torch and transformers.
"""
