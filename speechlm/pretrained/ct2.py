"""CTranslate2 `model.bin` files, read with numpy alone (no ctranslate2 package).

Layout (little-endian), as CTranslate2's `ModelSpec._serialize` writes it:

    uint32 format version (6 today)
    string spec name ("WhisperSpec"), uint32 spec revision          (version >= 2)
    uint32 variable count, then per variable:
        string name, uint8 rank, uint32 per dimension,
        uint8 dtype (0 f32, 1 i8, 2 i16, 3 i32, 4 f16, 5 bf16)     (version >= 4;
            before: uint8 item size), uint32 byte count, raw data
    uint32 alias count, then per alias: string alias, string target (version >= 3)

A string is a uint16 length (counting a trailing NUL) and that many bytes.
`read_ct2_model` maps the file and returns views into it, so a 145 MB model is
not copied (bfloat16, which numpy lacks, is widened to float32). `dequantize`
undoes CTranslate2's int8/int16 weight quantization.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import ConfigError

# CTranslate2's DataType enum (include/ctranslate2/types.h), in id order.
DTYPES = ("float32", "int8", "int16", "int32", "float16", "bfloat16")
# numpy type per CT2 dtype; bfloat16 travels as its raw uint16 bits.
_NUMPY = {"float32": np.float32, "int8": np.int8, "int16": np.int16, "int32": np.int32,
          "float16": np.float16, "bfloat16": np.uint16}
_BY_ITEM_SIZE = {4: "float32", 2: "int16", 1: "int8"}  # format versions < 4
NEWEST_VERSION = 6

_DAMAGED = "the file is truncated or not a CTranslate2 model.bin; re-copy it"


@dataclass
class Ct2Model:
    """The contents of a model.bin. `variables` values are read-only views into the file
    (bfloat16 ones widened to float32); `dtypes` keeps each variable's stored type."""

    spec: str
    spec_revision: int
    version: int
    variables: dict[str, np.ndarray]
    aliases: dict[str, str] = field(default_factory=dict)
    dtypes: dict[str, str] = field(default_factory=dict)

    def resolve(self, name: str) -> np.ndarray:
        """A variable by its own name or by an alias of it."""
        return self.variables[self.aliases.get(name, name)]


def bfloat16_to_float32(bits: np.ndarray) -> np.ndarray:
    """float32 values of raw bfloat16 bits (bfloat16 is the top half of a float32)."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


def float32_to_bfloat16(values: np.ndarray) -> np.ndarray:
    """Raw bfloat16 bits (uint16) of float32 values, rounded to nearest even as torch does."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32).astype(np.uint64)
    rounded = bits + 0x7FFF + ((bits >> 16) & 1)
    return (rounded >> 16).astype(np.uint16)


class _Cursor:
    """Sequential little-endian reads over the mapped file, each bounds-checked so a short or
    garbled file fails with the offset instead of an IndexError or a wrong tensor."""

    def __init__(self, path: Path, data: np.ndarray):
        self.path, self.data, self.offset = path, data, 0

    def fail(self, what: str, offset: int | None = None):
        at = self.offset if offset is None else offset
        raise ConfigError(f"{self.path}: {what} at byte {at} (file is {len(self.data)} bytes); "
                          f"{_DAMAGED}")

    def take(self, n: int, what: str) -> int:
        if n < 0 or self.offset + n > len(self.data):
            self.fail(f"file ends while reading {what}")
        start = self.offset
        self.offset += n
        return start

    def unpack(self, fmt: str, what: str):
        start = self.take(struct.calcsize(fmt), what)
        return struct.unpack_from(fmt, self.data, start)

    def uint(self, fmt: str, what: str) -> int:
        return self.unpack(fmt, what)[0]

    def string(self, what: str) -> str:
        length = self.uint("<H", f"the length of {what}")
        start = self.take(length, what)
        raw = self.data[start:start + length].tobytes()
        if length == 0 or raw[-1] != 0:
            self.fail(f"{what} is not NUL-terminated", start)
        try:
            return raw[:-1].decode("utf-8")
        except UnicodeDecodeError:
            self.fail(f"{what} is not UTF-8", start)

    def array(self, dtype: str, shape: tuple[int, ...], num_bytes: int, name: str) -> np.ndarray:
        np_type = np.dtype(_NUMPY[dtype])
        count = int(np.prod(shape, dtype=np.int64))
        if count * np_type.itemsize != num_bytes:
            self.fail(f"variable {name!r}: {num_bytes} bytes do not hold shape {list(shape)} "
                      f"of {dtype}")
        start = self.take(num_bytes, f"the data of variable {name!r}")
        return np.frombuffer(self.data, dtype=np_type.newbyteorder("<"), count=count,
                             offset=start).reshape(shape)


def read_ct2_model(path) -> Ct2Model:
    """Read a CTranslate2 model.bin (any format version 1-6) without copying its weights."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: file not found; point at the model.bin of a CTranslate2 "
                          "model directory")
    if path.stat().st_size == 0:
        raise ConfigError(f"{path}: file is empty; {_DAMAGED}")
    cur = _Cursor(path, np.memmap(path, dtype=np.uint8, mode="r"))
    version = cur.uint("<I", "the format version")
    if not 1 <= version <= NEWEST_VERSION:
        if version < 256:  # plausibly a real, newer format rather than garbage
            raise ConfigError(f"{path}: CTranslate2 format version {version} is newer than this "
                              f"reader knows (1-{NEWEST_VERSION}); convert the model with "
                              "ctranslate2 4.x, or report the new version")
        cur.fail(f"format version {version} is not a CTranslate2 one", 0)
    spec, revision = "", 1
    if version >= 2:
        spec = cur.string("the spec name")
        revision = cur.uint("<I", "the spec revision")
    variables: dict[str, np.ndarray] = {}
    dtypes: dict[str, str] = {}
    for index in range(cur.uint("<I", "the variable count")):
        name = cur.string(f"the name of variable {index}")
        rank = cur.uint("<B", f"the rank of {name!r}")
        shape = cur.unpack(f"<{rank}I", f"the shape of {name!r}")
        if version >= 4:
            type_id = cur.uint("<B", f"the dtype of {name!r}")
            if type_id >= len(DTYPES):
                cur.fail(f"variable {name!r} has unknown dtype id {type_id}", cur.offset - 1)
            dtype = DTYPES[type_id]
            num_bytes = cur.uint("<I", f"the byte count of {name!r}")
        else:
            item_size = cur.uint("<B", f"the item size of {name!r}")
            if item_size not in _BY_ITEM_SIZE:
                cur.fail(f"variable {name!r} has item size {item_size}", cur.offset - 1)
            dtype = _BY_ITEM_SIZE[item_size]
            num_bytes = cur.uint("<I", f"the item count of {name!r}") * item_size
        if name in variables:
            cur.fail(f"variable {name!r} appears twice")
        value = cur.array(dtype, shape, num_bytes, name)
        variables[name] = bfloat16_to_float32(value) if dtype == "bfloat16" else value
        dtypes[name] = dtype
    aliases: dict[str, str] = {}
    if version >= 3:
        for index in range(cur.uint("<I", "the alias count")):
            alias = cur.string(f"the name of alias {index}")
            target = cur.string(f"the target of alias {alias!r}")
            if target not in variables:
                cur.fail(f"alias {alias!r} points at {target!r}, which is not a variable")
            aliases[alias] = target
    if cur.offset != len(cur.data):
        cur.fail(f"{len(cur.data) - cur.offset} unexpected bytes after the last alias")
    return Ct2Model(spec, revision, version, variables, aliases, dtypes)


def _as_array(name: str, value) -> tuple[np.ndarray, str]:
    """A variable's array and CT2 dtype; Python scalars and strings as CTranslate2 stores them."""
    if isinstance(value, bool):
        value = np.int8(value)
    elif isinstance(value, int):
        value = np.int32(value)
    elif isinstance(value, float):
        value = np.float32(value)
    elif isinstance(value, str):
        value = np.frombuffer(value.encode("utf-8"), dtype=np.int8)
    array = np.asarray(value)
    if array.dtype == np.uint16:  # raw bfloat16 bits (see float32_to_bfloat16)
        return array, "bfloat16"
    for dtype, np_type in _NUMPY.items():
        if array.dtype == np_type and dtype != "bfloat16":
            return array, dtype
    raise ValueError(f"variable {name!r}: dtype {array.dtype} has no CTranslate2 equivalent "
                     "(float32, int8, int16, int32, float16; uint16 for bfloat16 bits)")


def write_ct2_model(path, spec: str, spec_revision: int, variables: dict,
                    aliases: dict[str, str] | None = None, version: int = 6) -> Path:
    """Write `variables` (name -> numpy array or scalar) as a CTranslate2 model.bin.

    Used by tests and the tiny fixtures; `version` 4-6 share this layout. Pass bfloat16
    weights as `float32_to_bfloat16(values)`.
    """
    if not 4 <= version <= NEWEST_VERSION:
        raise ValueError(f"can only write format versions 4-{NEWEST_VERSION}, not {version}")
    path = Path(path)

    def string(text: str) -> bytes:
        raw = text.encode("utf-8") + b"\0"
        return struct.pack("<H", len(raw)) + raw

    with open(path, "wb") as f:
        f.write(struct.pack("<I", version) + string(spec) + struct.pack("<II", spec_revision,
                                                                           len(variables)))
        for name, value in variables.items():
            array, dtype = _as_array(name, value)
            data = np.ascontiguousarray(array).astype(array.dtype.newbyteorder("<")).tobytes()
            f.write(string(name) + struct.pack(f"<B{array.ndim}I", array.ndim, *array.shape))
            f.write(struct.pack("<BI", DTYPES.index(dtype), len(data)) + data)
        aliases = aliases or {}
        f.write(struct.pack("<I", len(aliases)))
        for alias, target in aliases.items():
            f.write(string(alias) + string(target))
    return path


def quantize_int8(weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """CTranslate2's int8 quantization of a [out, in] weight: per output row,
    scale = 127 / max|row| (127 for an all-zero row) and q = round(weight * scale)."""
    weight = np.asarray(weight, dtype=np.float32)
    amax = np.abs(weight).max(axis=1)
    amax[amax == 0] = 127.0
    scale = (127.0 / amax).astype(np.float32)
    return np.rint(weight * scale[:, None]).astype(np.int8), scale


def dequantize(variables: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], list[str]]:
    """Float32 weights in place of CTranslate2's quantized ones; returns (variables, names).

    CTranslate2 stores a quantized `<scope>/weight` as int8 with a float
    `<scope>/weight_scale` per output row (scale = 127 / max|row|, q = round(w * scale)),
    or as int16 with one scalar scale (2**10 / max|w|); either way w = q / scale. The
    scales are consumed: they are absent from the result. `names` lists the weights
    that were dequantized.
    """
    out = dict(variables)
    done = []
    for name, scale in variables.items():
        if not name.endswith("_scale"):
            continue
        base = name[: -len("_scale")]
        weight = variables.get(base)
        if weight is None or weight.dtype not in (np.int8, np.int16):
            continue  # not a quantization scale (no integer weight beside it)
        scale = np.asarray(scale, dtype=np.float32)
        divisor = scale.reshape(-1, *([1] * (weight.ndim - 1))) if scale.ndim == 1 else scale
        out[base] = weight.astype(np.float32) / divisor
        del out[name]
        done.append(base)
    return out, done
