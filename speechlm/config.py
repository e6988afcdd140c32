"""Recipe configs: YAML files validated into nested dataclasses, with dotted overrides.

A recipe is a tree of dataclasses (`train: TrainConfig`, `model: ...`).
`load_config(Recipe, "recipes/x.yaml", ["train.max_steps=20"])` reads the
YAML with `yaml.SafeLoader` (no `!!python` tags, so a recipe can never import
or run code), applies the overrides and checks every value against the field
types. Anything wrong is a `ConfigError` that names the key, the file and
line (or the override), and what is allowed (valid keys with the closest
match, the expected type, the choices of a Literal).

Supported field types: bool, int, float, str, pathlib.Path, Enum, Literal,
Optional / unions, list[X], tuple[X, ...], tuple[X, Y], dict[str, X], nested
dataclasses and Any. Fields that name a class or function take a *name*
looked up in an explicit `Registry`, never an import path.

Overrides use YAML scalar rules (`20`, `1e-4`, `true`, `null`, `[1, 2]`,
`{a: 1}`), except that a field typed `str` takes the text as written, so
`lang=no` is the string "no", not False.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import math
import pathlib
import types
import typing
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Generic, Literal, TypeVar, Union, get_args, get_origin

import yaml

from .errors import ConfigError
from .jsonl import atomic_write

T = TypeVar("T")
KeyPath = tuple  # tuple[str | int, ...]: a position in the config tree

__all__ = [
    "Registry", "apply_overrides", "config_from_dict", "config_to_dict", "load_config",
    "parse_override", "save_config",
]


# -- public API ----------------------------------------------------------------


def load_config(cls: type[T], path, overrides: Iterable[str] = ()) -> T:
    """Read a YAML recipe into dataclass `cls`, apply `key.sub=value` overrides, validate.

    Raises ConfigError naming the file, line and key for unknown keys, wrong
    types, missing required keys, invalid YAML and unsafe tags.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: recipe file not found")
    data, lines = _read_yaml(path)
    origins = {key_path: f"{path}:{line}" for key_path, line in lines.items()}
    origins[()] = str(path)
    source = _Source(origins)
    for text in overrides:
        _apply_override(data, cls, text, source)
    return _build(cls, data, (), source)


def config_from_dict(cls: type[T], data: Mapping, *, source: str = "config") -> T:
    """Validate a plain mapping (e.g. parsed JSON) into dataclass `cls`."""
    return _build(cls, dict(data), (), _Source({(): source}))


def apply_overrides(obj: T, overrides: Iterable[str]) -> T:
    """A new config equal to `obj` with `key.sub=value` overrides applied (obj is unchanged)."""
    overrides = list(overrides)
    if not overrides:
        return obj
    cls = type(obj)
    data = config_to_dict(obj)
    source = _Source({(): "config"})
    for text in overrides:
        _apply_override(data, cls, text, source)
    return _build(cls, data, (), source)


def config_to_dict(obj) -> Any:
    """Plain YAML/JSON-ready data: dataclasses -> dicts, tuples -> lists, Paths -> str."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: config_to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, Mapping):
        return {k: config_to_dict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [config_to_dict(v) for v in obj]
    if isinstance(obj, pathlib.PurePath):
        return str(obj)
    if isinstance(obj, enum.Enum):
        return obj.value
    return obj


def save_config(obj, path) -> None:
    """Write `obj` as YAML atomically; `load_config(type(obj), path)` gives back an equal object."""
    text = yaml.safe_dump(config_to_dict(obj), sort_keys=False, allow_unicode=True,
                          default_flow_style=None)
    with atomic_write(path) as f:
        f.write(text)


def parse_override(text: str) -> tuple[str, str]:
    """Split `a.b.c=value` into ("a.b.c", "value"); ConfigError if malformed."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override '{text}': expected key=value with a dotted key, "
                          "e.g. train.max_steps=20")
    return key, raw


class Registry(Generic[T]):
    """Names a recipe may use for a class or function (the YAML holds the name, never a path).

        ENCODERS = Registry("encoder")
        @ENCODERS.register("wav2vec2")
        class Wav2Vec2Encoder: ...
        ENCODERS.get(cfg.model.encoder)   # ConfigError listing the names if unknown
    """

    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str, obj: T | None = None):
        """Register `obj` under `name`; without `obj`, return a decorator."""
        def add(value: T) -> T:
            if name in self._items and self._items[name] is not value:
                raise ValueError(f"{self.kind} '{name}' is already registered")
            self._items[name] = value
            return value
        return add if obj is None else add(obj)

    def get(self, name: str) -> T:
        if name not in self._items:
            raise ConfigError(f"unknown {self.kind} '{name}'{_did_you_mean(name, self._items)}; "
                              f"available: {', '.join(sorted(self._items)) or '(none)'}")
        return self._items[name]

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name) -> bool:
        return name in self._items


# -- reading YAML --------------------------------------------------------------


def _read_yaml(path: Path) -> tuple[dict, dict[KeyPath, int]]:
    """Parse with SafeLoader, keeping the line of every key (1-based)."""
    text = path.read_text(encoding="utf-8")
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        lines: dict[KeyPath, int] = {}
        if node is not None:
            _collect_lines(node, (), lines, path)
        data = loader.construct_document(node) if node is not None else None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        problem = getattr(e, "problem", None) or str(e)
        if "python/" in str(e) or "could not determine a constructor" in str(e):
            problem += " (recipes may not contain !!python or other custom tags)"
        raise ConfigError(f"{where}: invalid YAML: {problem}") from None
    finally:
        loader.dispose()
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level of a recipe must be a mapping of sections "
                          f"(key: value), got {type(data).__name__}")
    return data, lines


def _collect_lines(node, key_path: KeyPath, lines: dict, path: Path) -> None:
    if isinstance(node, yaml.MappingNode):
        seen: dict[str, int] = {}
        for key_node, value_node in node.value:
            key = key_node.value
            line = key_node.start_mark.line + 1
            if isinstance(key_node, yaml.ScalarNode) and key in seen:
                dotted = _dotted(key_path + (key,))
                raise ConfigError(f"{path}:{line}: duplicate key '{dotted}' (first on line "
                                  f"{seen[key]}); keep one")
            seen[key] = line
            lines[key_path + (key,)] = line
            _collect_lines(value_node, key_path + (key,), lines, path)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            lines[key_path + (i,)] = item.start_mark.line + 1
            _collect_lines(item, key_path + (i,), lines, path)


class _Source:
    """Where each part of the data came from: 'file:line' or "override 'k=v'"."""

    def __init__(self, origins: dict[KeyPath, str]):
        self.origins = origins

    def where(self, key_path: KeyPath) -> str:
        for n in range(len(key_path), -1, -1):
            origin = self.origins.get(tuple(key_path[:n]))
            if origin is not None:
                return origin
        return "config"

    def overrides_under(self, key_path: KeyPath) -> list[str]:
        """The overrides that set something inside `key_path`, in order given."""
        n = len(key_path)
        found = [origin for path, origin in self.origins.items()
                 if origin.startswith("override ") and tuple(path[:n]) == tuple(key_path)]
        return list(dict.fromkeys(found))


# -- overrides -----------------------------------------------------------------


def _apply_override(data: dict, cls: type, text: str, source: _Source) -> None:
    """Check `key=value` against the dataclass types and write it into the raw data tree."""
    key, raw = parse_override(text)
    parts = key.split(".")
    origin = f"override '{text}'"
    node, tp = data, cls
    for i, part in enumerate(parts):
        key_path = tuple(parts[: i + 1])
        tp = _strip_optional(tp)
        if dataclasses.is_dataclass(tp):
            fields = _init_fields(tp)
            if part not in fields:
                section = _dotted(key_path[:-1])
                raise ConfigError(
                    f"{origin}: unknown key '{_dotted(key_path)}'{_did_you_mean(part, fields)}; "
                    f"valid keys{f' in {section!r}' if section else ''}: {', '.join(fields)}")
            field_tp = _type_hints(tp)[part]
        elif get_origin(tp) in (dict, Mapping):
            field_tp = (get_args(tp) or (str, Any))[1]
        else:
            raise ConfigError(f"{origin}: '{_dotted(key_path[:-1])}' is a {_type_name(tp)}, "
                              f"not a section, so it has no key '{part}'")
        if i == len(parts) - 1:
            value = _parse_override_value(raw, field_tp)
            source.origins[key_path] = origin
            _convert(value, field_tp, key_path, source)  # fail now, with this override's name
            node[part] = value
        else:
            inner = _strip_optional(field_tp)
            if not (dataclasses.is_dataclass(inner) or get_origin(inner) in (dict, Mapping)):
                raise ConfigError(f"{origin}: '{_dotted(key_path)}' is a {_type_name(field_tp)}, "
                                  f"not a section, so it has no key '{parts[i + 1]}'")
            child = node.get(part)
            if child is None:  # e.g. an Optional section that is null: start from its defaults
                child = node[part] = {}
            elif not isinstance(child, dict):
                raise ConfigError(f"{origin}: '{_dotted(key_path)}' is not a section")
            source.origins.setdefault(key_path, origin)
            node = child
        tp = field_tp


def _parse_override_value(raw: str, tp) -> Any:
    stripped = raw.strip()
    if _is_text_type(tp):
        if stripped in ("null", "~") and _allows_none(tp):
            return None
        if len(stripped) >= 2 and stripped[0] == stripped[-1] and stripped[0] in "'\"":
            return yaml.safe_load(stripped)
        return raw
    try:
        return yaml.safe_load(raw) if stripped else None
    except yaml.YAMLError:
        return raw  # not YAML: keep the text and let the type check explain


def _is_text_type(tp) -> bool:
    """str, Path, Optional of those, or a Literal of strings: take override text as written."""
    tp = _strip_optional(tp)
    if tp is str or (isinstance(tp, type) and issubclass(tp, pathlib.PurePath)):
        return True
    return get_origin(tp) is Literal and all(isinstance(c, str) for c in get_args(tp))


# -- validation ----------------------------------------------------------------


def _build(cls, value, key_path: KeyPath, source: _Source, base=None):
    """Build dataclass `cls` from a mapping, checking keys and field types. Keys the mapping
    leaves out take their values from `base` (an instance of `cls`) when given, else the
    class defaults."""
    where = source.where(key_path)
    section = _dotted(key_path)
    if not isinstance(value, Mapping):
        raise ConfigError(f"{where}: '{section or 'the recipe'}' must be a mapping of keys "
                          f"({', '.join(_init_fields(cls))}), got {_describe(value)}")
    fields = _init_fields(cls)
    hints = _type_hints(cls)
    kwargs = {}
    for key, item in value.items():
        if key not in fields:
            raise ConfigError(
                f"{source.where(key_path + (key,))}: unknown key '{_dotted(key_path + (key,))}'"
                f"{_did_you_mean(str(key), fields)}; valid keys"
                f"{f' in {section!r}' if section else ''}: {', '.join(fields)}")
        inner = _section_default(fields[key], base)
        if inner is not None and isinstance(item, Mapping) \
                and _strip_optional(hints[key]) is type(inner):
            # a section given in part keeps the defaults its parent declares for the rest
            # (a task's `train` defaults, not TrainConfig's)
            kwargs[key] = _build(type(inner), item, key_path + (key,), source, base=inner)
        else:
            kwargs[key] = _convert(item, hints[key], key_path + (key,), source)
    if base is not None:
        kwargs = {name: getattr(base, name) for name in fields if name not in kwargs} | kwargs
    missing = [name for name, f in fields.items() if name not in kwargs
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        names = ", ".join(f"'{_dotted(key_path + (m,))}'" for m in missing)
        raise ConfigError(f"{where}: missing required key{'s' if len(missing) > 1 else ''} "
                          f"{names}")
    try:
        return cls(**kwargs)
    except (ValueError, TypeError, ConfigError) as e:
        overrides = source.overrides_under(key_path)
        after = f" (after {', '.join(overrides)})" if overrides else ""
        raise ConfigError(f"{where}: invalid {f'{section!r}' if section else 'recipe'}{after}: "
                          f"{e}") from None


def _convert(value, tp, key_path: KeyPath, source: _Source):
    """`value` checked (and lightly coerced: int->float, list->tuple, str->Path) to type `tp`."""
    if tp is Any or tp is object:
        return value
    origin = get_origin(tp)
    if origin is Union or (hasattr(types, "UnionType") and origin is types.UnionType):
        args = get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise _type_error(value, tp, key_path, source)
        options = [a for a in args if a is not type(None)]
        if len(options) == 1:
            return _convert(value, options[0], key_path, source)
        for option in options:
            try:
                return _convert(value, option, key_path, source)
            except ConfigError:
                continue
        raise _type_error(value, tp, key_path, source)
    if origin is Literal:
        choices = get_args(tp)
        for choice in choices:
            if value == choice and type(value) is type(choice):
                return choice
        hint = _did_you_mean(str(value), [str(c) for c in choices]) if isinstance(value, str) else ""
        raise ConfigError(f"{source.where(key_path)}: '{_dotted(key_path)}' must be one of "
                          f"{', '.join(repr(c) for c in choices)}; got {value!r}{hint}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        return _build(tp, value, key_path, source)
    if origin in (list, Sequence) or tp is list:
        if not isinstance(value, (list, tuple)):
            raise _type_error(value, tp, key_path, source)
        (item_tp,) = get_args(tp) or (Any,)
        return [_convert(v, item_tp, key_path + (i,), source) for i, v in enumerate(value)]
    if origin is tuple or tp is tuple:
        if not isinstance(value, (list, tuple)):
            raise _type_error(value, tp, key_path, source)
        args = get_args(tp)
        if not args or (len(args) == 2 and args[1] is Ellipsis):
            item_tp = args[0] if args else Any
            return tuple(_convert(v, item_tp, key_path + (i,), source) for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"{source.where(key_path)}: '{_dotted(key_path)}' must be a list "
                              f"of {len(args)} values ({_type_name(tp)}), got {len(value)}: "
                              f"{value!r}")
        return tuple(_convert(v, a, key_path + (i,), source)
                     for i, (v, a) in enumerate(zip(value, args, strict=True)))
    if origin in (dict, Mapping) or tp is dict:
        if not isinstance(value, Mapping):
            raise _type_error(value, tp, key_path, source)
        key_tp, item_tp = get_args(tp) or (str, Any)
        out = {}
        for k, v in value.items():
            if key_tp is str and not isinstance(k, str):
                raise ConfigError(f"{source.where(key_path + (k,))}: keys of "
                                  f"'{_dotted(key_path)}' must be strings, got {k!r} "
                                  "(quote it in the YAML)")
            out[k] = _convert(v, item_tp, key_path + (k,), source)
        return out
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _type_error(value, tp, key_path, source, "use true or false")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise _type_error(value, tp, key_path, source)
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # PyYAML reads 1e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise _type_error(value, tp, key_path, source)
    if tp is str:
        if isinstance(value, str):
            return value
        raise _type_error(value, tp, key_path, source,
                          "quote it in the YAML, e.g. '\"no\"' or '\"1.0\"'")
    if isinstance(tp, type) and issubclass(tp, pathlib.PurePath):
        if isinstance(value, (str, pathlib.PurePath)):
            return tp(value)
        raise _type_error(value, tp, key_path, source)
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        for member in tp:
            if value == member.value or value == member.name:
                return member
        raise ConfigError(f"{source.where(key_path)}: '{_dotted(key_path)}' must be one of "
                          f"{', '.join(repr(m.value) for m in tp)}; got {value!r}")
    raise TypeError(f"config field '{_dotted(key_path)}' has unsupported type {tp!r}")


# -- helpers -------------------------------------------------------------------

_HINTS_CACHE: dict[type, dict[str, Any]] = {}


def _type_hints(cls) -> dict[str, Any]:
    if cls not in _HINTS_CACHE:
        _HINTS_CACHE[cls] = typing.get_type_hints(cls)
    return _HINTS_CACHE[cls]


def _section_default(field: dataclasses.Field, base):
    """The value a dataclass-typed field has when a recipe omits it (from `base`, else the
    field's default or default_factory); None when that is not a dataclass instance."""
    if base is not None:
        value = getattr(base, field.name)
    elif field.default_factory is not dataclasses.MISSING:
        value = field.default_factory()
    else:
        value = field.default
    return value if dataclasses.is_dataclass(value) and not isinstance(value, type) else None


def _init_fields(cls) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls) if f.init}


def _strip_optional(tp):
    origin = get_origin(tp)
    if origin is Union or (hasattr(types, "UnionType") and origin is types.UnionType):
        options = [a for a in get_args(tp) if a is not type(None)]
        if len(options) == 1:
            return options[0]
    return tp


def _allows_none(tp) -> bool:
    return tp is Any or type(None) in get_args(tp)


def _type_name(tp) -> str:
    if tp is type(None):
        return "null"
    origin = get_origin(tp)
    if origin is Union or (hasattr(types, "UnionType") and origin is types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(tp))
    if origin is Literal:
        return "one of " + ", ".join(repr(c) for c in get_args(tp))
    if origin is not None:
        args = ", ".join("..." if a is Ellipsis else _type_name(a) for a in get_args(tp))
        return f"{getattr(origin, '__name__', str(origin))}[{args}]"
    if dataclasses.is_dataclass(tp):
        return f"section ({tp.__name__})"
    return getattr(tp, "__name__", str(tp))


def _describe(value) -> str:
    if value is None:
        return "null"
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{type(value).__name__} {text}"


def _type_error(value, tp, key_path, source, hint: str = "") -> ConfigError:
    msg = (f"{source.where(key_path)}: '{_dotted(key_path)}' must be {_type_name(tp)}, "
           f"got {_describe(value)}")
    if isinstance(value, float) and not math.isfinite(value):
        hint = hint or "use a finite number"
    return ConfigError(msg + (f"; {hint}" if hint else ""))


def _did_you_mean(name: str, options) -> str:
    close = difflib.get_close_matches(name, [str(o) for o in options], n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _dotted(key_path: KeyPath) -> str:
    out = ""
    for part in key_path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out

