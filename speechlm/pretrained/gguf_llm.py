"""Convert a GGUF causal LM (llama.cpp's file format) into a transformers directory.

transformers reads a GGUF itself (`from_pretrained(dir, gguf_file=name)`): it
rebuilds the config and tokenizer from the file's metadata and dequantizes
the weights, un-permuting Llama's q/k projections (llama.cpp stores them in
its rotary layout). `convert_gguf` does that once, checks the result, and
saves an ordinary directory (model.safetensors, config.json,
generation_config.json, tokenizer with its chat template) that every model
path of the toolkit loads like any other, plus `speechlm_source.json` saying
which file it came from.

Before loading, the header is read with the `gguf` package, so a file that
is not GGUF, is cut short, or holds an architecture this transformers cannot
read is refused with a message naming the file, instead of a traceback from
deep inside the loader.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError, SpeechLMError
from ..jsonl import atomic_directory
from ..paths import file_sha256

SOURCE_FILE = "speechlm_source.json"
DTYPES = ("float32", "bfloat16", "float16")
INSTALL_HINT = "pip install gguf accelerate"

_MAGIC = b"GGUF"
# transformers' table spells these with "_"; llama.cpp writes them into files like this.
_FILE_SPELLING = {"qwen2_moe": "qwen2moe", "qwen3_moe": "qwen3moe", "gpt_oss": "gpt-oss",
                  "minimax_m2": "minimax-m2"}
# Entries of transformers' table that are not causal LMs (or not architectures at all).
_NOT_CAUSAL_LM = {"general", "tokenizer", "t5", "umt5", "t5encoder"}
_CONTROL = 3  # llama.cpp's token type for special (control) tokens


@dataclass(frozen=True)
class GGUFHeader:
    """What the converter needs from a GGUF's metadata, read without touching the weights."""

    path: Path
    architecture: str
    name: str | None
    tensor_types: dict[str, int]  # ggml type name -> number of tensors, e.g. {"Q4_1": 210}
    tokens: list[str]
    token_types: list[int]
    special_ids: dict[str, int]  # "bos", "eos", "pad", "unk", "eot", "eom" where the file sets them
    chat_template: str | None

    def control_tokens(self) -> dict[str, int]:
        """Tokens the file marks CONTROL (e.g. <|im_start|>), by text -> id."""
        return {self.tokens[index]: index for index, kind in enumerate(self.token_types)
                if kind == _CONTROL and index < len(self.tokens)}


def convert_gguf(file, out_dir, *, dtype: str = "float32", provenance: dict | None = None
                 ) -> Path:
    """Convert the GGUF causal LM `file` into a new transformers directory `out_dir`.

    Quantized weights are dequantized and written as `dtype` ("float32",
    "bfloat16" or "float16"). `out_dir` must not exist; it appears complete or
    not at all. Raises ConfigError for a missing, non-GGUF, truncated or
    unsupported file, and SpeechLMError when the converted model fails its
    checks (weights transformers could not place, a broken chat template).
    provenance: more fields for `speechlm_source.json` (a registry package's name,
    version and licence).
    """
    file, out_dir = Path(file), Path(out_dir)
    if dtype not in DTYPES:
        raise ConfigError(f"--dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    if out_dir.exists():
        raise ConfigError(f"{out_dir}: already exists; choose a new output directory or remove "
                          "this one")
    header = read_gguf_header(file)
    check_supported(header)
    model, tokenizer = _load(header, dtype)
    with atomic_directory(out_dir) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        _drop_load_options(tmp / "tokenizer_config.json")
        _check_tokenizer(tmp, header)
        source = {
            "format": "gguf",
            "source": str(file.resolve()),
            "sha256": file_sha256(file),
            "size_bytes": file.stat().st_size,
            "architecture": header.architecture,
            "name": header.name,
            "quantization": header.tensor_types,
            "dtype": dtype,
            "tie_word_embeddings": bool(model.config.tie_word_embeddings),
        }
        source.update(provenance or {})
        (tmp / SOURCE_FILE).write_text(json.dumps(source, indent=1) + "\n", encoding="utf-8")
    return out_dir


def import_gguf():
    """The `gguf` package (and a check for accelerate, which transformers needs to read GGUF)."""
    import importlib.util

    missing = [name for name in ("gguf", "accelerate") if importlib.util.find_spec(name) is None]
    if missing:
        raise ConfigError(f"reading GGUF files needs {' and '.join(missing)}: {INSTALL_HINT}")
    import gguf

    return gguf


def read_gguf_header(file) -> GGUFHeader:
    """The architecture, tensor types and tokenizer metadata of a GGUF file."""
    path = Path(file)
    if not path.is_file():
        raise ConfigError(f"{path}: file not found; pass the path of a .gguf model file")
    with open(path, "rb") as f:
        magic = f.read(len(_MAGIC))
    if magic != _MAGIC:
        raise ConfigError(f"{path}: not a GGUF file (it starts with {magic!r}, not {_MAGIC!r}); "
                          "pass a .gguf model file, such as llama.cpp's convert_hf_to_gguf.py "
                          "writes or a hub repo's *.gguf")
    gguf = import_gguf()
    try:
        reader = gguf.GGUFReader(path)
        tensor_types = Counter(tensor.tensor_type.name for tensor in reader.tensors)
    except (ValueError, IndexError, KeyError, OverflowError) as e:
        # GGUFReader sizes every array from the header, so a short file fails here.
        raise ConfigError(f"{path}: truncated or corrupt GGUF file ({path.stat().st_size:,} "
                          f"bytes; the reader says: {e}); download or convert it again") from None
    architecture = _string(reader, "general.architecture")
    if architecture is None:
        raise ConfigError(f"{path}: the GGUF metadata has no general.architecture; the file is "
                          "incomplete, convert it again with llama.cpp's convert_hf_to_gguf.py")
    special_ids = {}
    for name, key in (("bos", "bos_token_id"), ("eos", "eos_token_id"),
                      ("pad", "padding_token_id"), ("unk", "unknown_token_id"),
                      ("eot", "eot_token_id"), ("eom", "eom_token_id")):
        value = _int(reader, f"tokenizer.ggml.{key}")
        if value is not None:
            special_ids[name] = value
    return GGUFHeader(
        path=path,
        architecture=architecture,
        name=_string(reader, "general.name"),
        tensor_types=dict(sorted(tensor_types.items())),
        tokens=_strings(reader, "tokenizer.ggml.tokens"),
        token_types=_ints(reader, "tokenizer.ggml.token_type"),
        special_ids=special_ids,
        chat_template=_string(reader, "tokenizer.chat_template"),
    )


def supported_architectures() -> list[str]:
    """GGUF architectures the installed transformers loads as causal LMs, from its own tables."""
    names: set[str] = set()
    try:  # the per-architecture config table every transformers with GGUF support has
        from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES
        names.update(GGUF_SUPPORTED_ARCHITECTURES)
    except ImportError:
        pass
    try:  # the newer loader (transformers 5), which takes architectures the old table lacks
        from transformers.integrations.gguf import GGUF_ARCHS
        names.update(GGUF_ARCHS)
    except ImportError:
        pass
    return sorted({_FILE_SPELLING.get(name, name) for name in names - _NOT_CAUSAL_LM})


def check_supported(header: GGUFHeader) -> None:
    """Refuse, naming the file, an architecture transformers cannot load as a causal LM."""
    import transformers

    supported = supported_architectures()
    if header.architecture not in supported:
        raise ConfigError(
            f"{header.path}: GGUF architecture {header.architecture!r} cannot be converted: "
            f"transformers {transformers.__version__} reads these GGUF causal LMs: "
            f"{', '.join(supported)}; convert the original (non-GGUF) checkpoint instead, or try "
            "a newer transformers")


def _load(header: GGUFHeader, dtype: str):
    """(model, tokenizer) dequantized to `dtype`, with the generation settings from the file."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    path = header.path
    kwargs = {}
    try:  # transformers 5 can keep the weights packed; a converter wants plain tensors
        from transformers.utils.quantization_config import GgufConfig
        kwargs["quantization_config"] = GgufConfig(dequantize=True)
    except ImportError:
        pass
    try:
        # A local file: nothing is downloaded (local_files_only here would be saved with it).
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model, info = AutoModelForCausalLM.from_pretrained(
            path.parent, gguf_file=path.name, local_files_only=True, dtype=getattr(torch, dtype),
            output_loading_info=True, **kwargs)
    except (ValueError, NotImplementedError) as e:
        raise ConfigError(f"{path}: transformers cannot load this {header.architecture!r} GGUF "
                          f"({e})") from None
    missing = sorted(info.get("missing_keys", ()))
    if missing:
        # Weights transformers could not map from the file would be left random.
        raise SpeechLMError(f"{path}: {len(missing)} weight(s) of the {header.architecture!r} "
                            f"model are not in the file (e.g. {', '.join(missing[:3])}); "
                            "the GGUF does not match what transformers expects")
    config = model.config
    if getattr(config, "tie_word_embeddings", False):
        output, embed = model.get_output_embeddings(), model.get_input_embeddings()
        if output is not None and output.weight is not embed.weight:
            model.tie_weights()
    # transformers files general.name under a private key; the name is kept in SOURCE_FILE.
    if hasattr(config, "_model_name_or_path"):
        del config._model_name_or_path
    config.architectures = [type(model).__name__]
    if getattr(config, "max_position_embeddings", None):
        tokenizer.model_max_length = config.max_position_embeddings  # the file's context length
    ids = header.special_ids
    eos = list(dict.fromkeys(ids[k] for k in ("eos", "eot", "eom") if k in ids))
    model.generation_config = GenerationConfig(
        bos_token_id=ids.get("bos"),
        eos_token_id=(eos[0] if len(eos) == 1 else eos) if eos else None,
        pad_token_id=ids.get("pad"),
    )
    return model.eval(), tokenizer


def _check_tokenizer(model_dir: Path, header: GGUFHeader) -> None:
    """The saved tokenizer keeps the special ids whole and renders the file's chat template."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    where = f"{header.path}: the converted tokenizer"
    # The tokens the file names (bos, eos, ...) and the control tokens its chat template writes.
    expected = {header.tokens[i]: i for i in header.special_ids.values()
                if 0 <= i < len(header.tokens)}
    expected.update({token: i for token, i in header.control_tokens().items()
                     if header.chat_template and token in header.chat_template})
    for token, token_id in sorted(expected.items(), key=lambda item: item[1]):
        ids = tokenizer.encode(token, add_special_tokens=False)
        if ids != [token_id]:
            raise SpeechLMError(f"{where} encodes the special token {token!r} as {ids}, not as "
                                f"its id {token_id}")
    if header.chat_template is None:
        return
    if tokenizer.chat_template != header.chat_template:
        raise SpeechLMError(f"{where} lost the GGUF's chat template")
    try:
        tokenizer.apply_chat_template([{"role": "user", "content": "Hello"}], tokenize=False,
                                      add_generation_prompt=True)
    except Exception as e:  # noqa: BLE001 - any template error makes the output unusable for chat
        raise SpeechLMError(f"{where} cannot render the GGUF's chat template ({e})") from None


def _drop_load_options(tokenizer_config: Path) -> None:
    """Remove how this process loaded the tokenizer (transformers saves its from_pretrained
    options), which says nothing about the tokenizer and would be replayed on every load."""
    data = json.loads(tokenizer_config.read_text(encoding="utf-8"))
    for key in ("local_files_only", "is_local"):
        data.pop(key, None)
    tokenizer_config.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n",
                                encoding="utf-8")


def _string(reader, key: str) -> str | None:
    field = reader.fields.get(key)
    return None if field is None else bytes(field.parts[field.data[0]]).decode("utf-8")


def _strings(reader, key: str) -> list[str]:
    field = reader.fields.get(key)
    if field is None:
        return []
    return [bytes(field.parts[i]).decode("utf-8", errors="replace") for i in field.data]


def _ints(reader, key: str) -> list[int]:
    field = reader.fields.get(key)
    return [] if field is None else [int(field.parts[i][0]) for i in field.data]


def _int(reader, key: str) -> int | None:
    field = reader.fields.get(key)
    return None if field is None else int(field.parts[field.data[0]][0])



