"""Tiny GGUF causal LMs, written the way llama.cpp's convert_hf_to_gguf.py writes them.

`write_tiny_gguf(path)` builds a tiny transformers Llama shaped like
SmolLM2-Instruct (the GGUF the toolkit is checked against): a GPT-2 style
byte-level BPE with the ChatML tokens first in the vocabulary
(<|endoftext|> 0, <|im_start|> 1 = bos, <|im_end|> 2 = eos and pad), a ChatML
chat template and tied embeddings. It saves that model as a transformers
directory beside `path`, then writes the same weights and tokenizer as a GGUF
file, so a test can convert the GGUF back and compare with the source.

As in llama.cpp, 1-D tensors (norms) stay F32, the q/k projections are
stored permuted for its rotary layout (transformers un-permutes them on
load), the output head is omitted when tied, and the tokenizer is metadata:
`tokenizer.ggml.model` "gpt2", tokens, token types (CONTROL for the
specials), merges, special ids, `tokenizer.chat_template`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .tiny_checkpoints import LLM_SIZE, TOKENIZER_VOCAB_SIZE, _save_model
from .tiny_tokenizers import CHATML_TEMPLATE, train_byte_level_bpe

# SmolLM2's first three tokens, in its order.
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
UNK_ID, BOS_ID, EOS_ID = 0, 1, 2
PAD_ID = EOS_ID
TENSOR_TYPES = ("F32", "F16", "Q8_0")

_CONFIG = dict(
    LLM_SIZE,
    max_position_embeddings=2048,
    rms_norm_eps=1e-5,
    rope_theta=100000.0,
    # Wider than the default 0.02, so random logits have clear winners and greedy
    # decoding is not decided by rounding noise.
    initializer_range=0.2,
)


def write_tiny_gguf(path, *, seed: int = 0, arch: str = "llama",
                    chat_template: str | None = CHATML_TEMPLATE,
                    tensor_type: str = "F32") -> tuple[Path, Path]:
    """Write a tiny SmolLM2-like GGUF to `path`; return (gguf path, source transformers dir).

    The source directory is `path` without its suffix plus "-source". `arch` is
    written as `general.architecture` (and prefixes the hyper-parameter keys), so
    a test can make a file transformers does not read; the tensors stay Llama's.
    `chat_template` None writes none. `tensor_type` is the type of the 2-D
    weights: "F32", "F16" or "Q8_0" (gguf's own quantizer).
    """
    import gguf

    if tensor_type not in TENSOR_TYPES:
        raise ValueError(f"tensor_type must be one of {', '.join(TENSOR_TYPES)}, "
                         f"got {tensor_type!r}")
    path = Path(path)
    source_dir = path.with_name(path.stem + "-source")
    tokens, merges = _vocabulary()
    model = _write_source(source_dir, tokens, merges, seed, chat_template)
    config = model.config

    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name("tiny-smollm2")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    writer.add_file_type({"F32": gguf.LlamaFileType.ALL_F32,
                          "F16": gguf.LlamaFileType.MOSTLY_F16,
                          "Q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[tensor_type])
    _add_tokenizer(writer, tokens, merges, chat_template)
    for name, array in _gguf_tensors(model):
        _add_tensor(writer, name, array, tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path, source_dir


def _vocabulary() -> tuple[list[str], list[str]]:
    """(tokens in id order, merges as "a b"): the specials, then a GPT-2 style BPE."""
    vocab, merges = train_byte_level_bpe("gpt2", TOKENIZER_VOCAB_SIZE)
    tokens = list(SPECIAL_TOKENS) + sorted(vocab, key=vocab.get)
    return tokens, [f"{a} {b}" for a, b in merges]


def _write_source(out_dir: Path, tokens: list[str], merges: list[str], seed: int,
                  chat_template: str | None):
    """The transformers original: LlamaForCausalLM + GPT2Tokenizer, as SmolLM2's repo ships."""
    from tokenizers import AddedToken
    from transformers import GenerationConfig, GPT2Tokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = GPT2Tokenizer(
        vocab={token: index for index, token in enumerate(tokens)},
        merges=[tuple(m.split(" ")) for m in merges],
        unk_token=SPECIAL_TOKENS[UNK_ID],
        bos_token=SPECIAL_TOKENS[BOS_ID],
        eos_token=SPECIAL_TOKENS[EOS_ID],
        pad_token=SPECIAL_TOKENS[PAD_ID],
        add_prefix_space=False,
        model_max_length=_CONFIG["max_position_embeddings"],
    )
    tokenizer.add_special_tokens({"additional_special_tokens": [
        AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS]})
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(out_dir)

    config = LlamaConfig(
        **{k: v for k, v in _CONFIG.items() if k != "rope_theta"},
        rope_parameters={"rope_type": "default", "rope_theta": _CONFIG["rope_theta"]},
        vocab_size=len(tokens),
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
        tie_word_embeddings=True,
    )
    config.architectures = ["LlamaForCausalLM"]
    generation = GenerationConfig(bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID)
    return _save_model(LlamaForCausalLM, config, out_dir, seed, generation)


def _add_tokenizer(writer, tokens: list[str], merges: list[str], chat_template: str | None):
    import gguf

    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.CONTROL if t in SPECIAL_TOKENS
                            else gguf.TokenType.NORMAL for t in tokens])
    writer.add_token_merges(merges)
    writer.add_bos_token_id(BOS_ID)
    writer.add_eos_token_id(EOS_ID)
    writer.add_unk_token_id(UNK_ID)
    writer.add_pad_token_id(PAD_ID)
    writer.add_add_bos_token(False)
    writer.add_add_space_prefix(False)
    if chat_template is not None:
        writer.add_chat_template(chat_template)


def llama_permute(weights: np.ndarray, n_head: int, n_head_kv: int | None = None) -> np.ndarray:
    """llama.cpp's LlamaModel.permute: reorder q/k rows from HF's rotate-half layout to the
    interleaved pairs GGML's rotary kernel expects."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2)
            .reshape(weights.shape))


def _gguf_tensors(model):
    """(GGUF name, float32 array) for every weight, named by gguf's own Llama tensor map."""
    import gguf

    config = model.config
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    for hf_name, tensor in model.state_dict().items():
        if hf_name == "lm_head.weight" and config.tie_word_embeddings:
            continue  # llama.cpp writes no output.weight for a tied head
        array = tensor.detach().float().numpy()
        if hf_name.endswith("q_proj.weight"):
            array = llama_permute(array, config.num_attention_heads)
        elif hf_name.endswith("k_proj.weight"):
            array = llama_permute(array, config.num_attention_heads, config.num_key_value_heads)
        base, suffix = hf_name.rsplit(".", 1)
        yield f"{name_map.get_name(base)}.{suffix}", array


def _add_tensor(writer, name: str, array: np.ndarray, tensor_type: str) -> None:
    import gguf

    if array.ndim == 1 or tensor_type == "F32":
        writer.add_tensor(name, array.astype(np.float32))
    elif tensor_type == "F16":
        writer.add_tensor(name, array.astype(np.float16))
    else:
        qtype = gguf.GGMLQuantizationType.Q8_0
        writer.add_tensor(name, gguf.quants.quantize(array, qtype), raw_dtype=qtype)
