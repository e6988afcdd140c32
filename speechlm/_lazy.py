"""Lazy package exports, so importing a package never loads torch by itself."""

import importlib


def lazy_exports(package: str, exports: dict[str, str]):
    """A module-level `__getattr__` that imports `name` from `package.<exports[name]>` on first use."""

    def __getattr__(name: str):
        if name in exports:
            return getattr(importlib.import_module(f"{package}.{exports[name]}"), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__
