"""Modality adapters: encoder frames [B, F, D_enc] + lengths -> LLM embeddings [B, F', D_llm] + lengths'.

    adapter = build_adapter("blsp", input_dim=768, output_dim=4096)
    out = adapter(encoder_out.hidden, encoder_out.lengths)    # AdapterOutput(hidden, lengths)
    adapter.output_frame_rate(50.0)                          # 6.25

Registered adapters (ADAPTERS, chosen by name in a recipe):

- "blsp": BLSP's adapter (cwang621/blsp `Conv1dSubsampler` + `Adapter` +
  `speech_ln`): 3 × [Conv1d(kernel 5, stride 2, padding 2) -> GLU] with
  channels d_enc -> 2·d_enc (GLU: d_enc) -> 2·d_enc (d_enc) -> 2·d_llm (d_llm),
  then a residual bottleneck x + fc2(GELU(fc1(x))) (d_llm -> 512 -> d_llm,
  no bias) and a LayerNorm. Each conv maps L frames to floor((L - 1) / 2) + 1,
  so 50 Hz -> 6.25 Hz.
- "stack": Ultravox / SLAM-ASR projector: stack k consecutive frames
  (default 8, zero-padded tail) -> RMSNorm -> Linear -> SwiGLU -> Linear.
  L frames -> ceil(L / k).
- "qformer": window-level Q-Former (SALMONN): the frames are cut into windows
  of w frames (default 0.33 s); n learned queries per window cross-attend to
  the window's frames in a small Transformer decoder, then a projection to
  d_llm. L frames -> ceil(L / w) * n; rate n / (w / input_rate).

Every adapter masks what it reads by `lengths`, so the padding of a batch
never changes an item's valid outputs; output frames at or after the output
lengths are zero.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..config import Registry
from ..errors import ConfigError

__all__ = [
    "ADAPTERS", "Adapter", "AdapterOutput", "BlspAdapter", "CifAdapter", "QFormerAdapter",
    "StackAdapter", "build_adapter",
]

ADAPTERS: Registry[type[Adapter]] = Registry("adapter")


class AdapterOutput(NamedTuple):
    """LLM-space speech embeddings [B, F', D_llm] (zero at or after `lengths`) and lengths [B].

    A CIF adapter adds `quantity` [B], its unscaled firing-weight sum (the count loss), and
    `frames` [B, T, D_llm] / `frame_lengths` [B], the subsampled frames before integration
    projected into the LLM's space (an auxiliary CTC loss over LLM tokens reads them; for
    other adapters it reads `hidden` itself)."""

    hidden: torch.Tensor
    lengths: torch.Tensor
    quantity: torch.Tensor | None = None
    frames: torch.Tensor | None = None
    frame_lengths: torch.Tensor | None = None


def build_adapter(name: str, input_dim: int, output_dim: int, *, input_rate: float = 50.0,
                  **options: Any) -> Adapter:
    """Adapter `name` mapping `input_dim` encoder frames at `input_rate` Hz to `output_dim`.

    options: the adapter's own keyword arguments; an unknown one is a ConfigError
    listing the valid ones.
    """
    cls = ADAPTERS.get(name)
    import inspect

    params = inspect.signature(cls.__init__).parameters
    allowed = [p for p in params if p not in ("self", "input_dim", "output_dim", "input_rate")]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ConfigError(f"adapter '{name}' has no option(s) {', '.join(unknown)}; "
                          f"valid: {', '.join(allowed) or '(none)'}")
    return cls(input_dim, output_dim, input_rate=input_rate, **options)


def lengths_mask(lengths: torch.Tensor, width: int) -> torch.Tensor:
    """Bool [B, width]: True at valid positions (index < length)."""
    return torch.arange(width, device=lengths.device) < lengths[:, None]


def _zero_padding(x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """x [B, T, D] with positions at or after lengths set to 0."""
    return x * lengths_mask(lengths, x.shape[1])[..., None].to(x.dtype)


class Adapter(nn.Module):
    """Base class: `forward(hidden [B, F, D_in], lengths [B]) -> AdapterOutput`.

    `emits_per_token`: True when the adapter emits one embedding per text token and, in
    training, takes the tokens' count as `forward(..., target_lengths=)` (CIF)."""

    emits_per_token = False

    def __init__(self, input_dim: int, output_dim: int, input_rate: float):
        super().__init__()
        self.input_dim = int(input_dim)
        self.output_dim = int(output_dim)
        self.input_rate = float(input_rate)
        # the CTC blank's direction in the LLM space (the auxiliary token CTC loss's extra
        # class): fixed and the same in every process, so a resumed or reloaded adapter keeps it
        blank = torch.randn(self.output_dim, generator=torch.Generator().manual_seed(0))
        self.register_buffer("ctc_blank", blank / blank.norm(), persistent=False)

    def output_lengths(self, lengths: torch.Tensor | Sequence[int]) -> torch.Tensor:
        """Exact output frames for `lengths` input frames (int64)."""
        raise NotImplementedError

    def output_frame_rate(self, input_rate: float | None = None) -> float:
        """Output frames per second for input frames at `input_rate` Hz (default: the build rate)."""
        raise NotImplementedError

    def options(self) -> dict:
        """The keyword options that rebuild this adapter with `build_adapter`."""
        return dict(self._options)

    def set_output_scale(self, rms: float) -> None:
        """Start the output at per-dimension RMS `rms` (the LLM's token embeddings' scale):
        an adapter ending in a LayerNorm sets its gain. A LayerNorm's unit output is, in a
        small LLM, many times a token embedding, and the layers then barely move the speech
        positions' residual stream. Adapters without an output norm keep their init."""
        norm = getattr(self, "norm", None)
        if isinstance(norm, nn.LayerNorm) and norm.weight is not None:
            with torch.no_grad():
                norm.weight.fill_(rms)


# -- BLSP -------------------------------------------------------------------------------


def glu_convs(input_dim: int, mid: int, output_channels: int,
              kernel_sizes: Sequence[int]) -> nn.ModuleList:
    """BLSP's subsampler: Conv1d(kernel k, stride 2, padding k // 2) layers, each followed by a
    GLU (which halves the channels): input_dim -> mid -> ... -> output_channels (pre-GLU)."""
    n = len(kernel_sizes)
    return nn.ModuleList(
        nn.Conv1d(input_dim if i == 0 else mid // 2, mid if i < n - 1 else output_channels, k,
                  stride=2, padding=k // 2)
        for i, k in enumerate(kernel_sizes))


def conv_lengths(lengths: torch.Tensor, conv: nn.Conv1d) -> torch.Tensor:
    """Valid output frames of `conv` for `lengths` valid input frames (0 stays 0)."""
    (k,), (s,), (p,) = conv.kernel_size, conv.stride, conv.padding
    out = torch.div(lengths + 2 * p - k, s, rounding_mode="floor") + 1
    return torch.where(lengths > 0, out.clamp(min=0), torch.zeros_like(out))


def run_glu_convs(convs: nn.ModuleList, hidden: torch.Tensor, lengths: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """hidden [B, T, D] -> [B, T', C] and lengths', padding masked before each conv."""
    x = _zero_padding(hidden, lengths).transpose(1, 2)  # [B, D, T]
    for conv in convs:
        x = F.glu(conv(x), dim=1)
        lengths = conv_lengths(lengths, conv)
        # zero what the next conv would read beyond the valid frames, exactly as
        # the conv's own zero padding does for an item alone
        x = x * lengths_mask(lengths, x.shape[-1])[:, None, :].to(x.dtype)
    return x.transpose(1, 2), lengths


def _check_kernel_sizes(name: str, kernel_sizes, mid: int) -> list[int]:
    if mid % 2:
        raise ConfigError(f"{name} adapter: mid_channels must be even (GLU halves it), got {mid}")
    kernel_sizes = [int(k) for k in kernel_sizes]
    if not kernel_sizes:
        raise ConfigError(f"{name} adapter: kernel_sizes must name at least one conv layer")
    return kernel_sizes


class _GluConvAdapter(Adapter):
    """An adapter whose front is `self.convs` (glu_convs): each halves the frame rate. For a
    CIF adapter these are upper bounds: it fires at most one embedding per subsampled frame."""

    convs: nn.ModuleList

    def output_lengths(self, lengths):
        lengths = torch.as_tensor(lengths, dtype=torch.long)
        for conv in self.convs:
            lengths = conv_lengths(lengths, conv)
        return lengths

    def output_frame_rate(self, input_rate=None):
        rate = self.input_rate if input_rate is None else float(input_rate)
        return rate / 2 ** len(self.convs)


@ADAPTERS.register("blsp")
class BlspAdapter(_GluConvAdapter):
    """BLSP: conv subsampler (GLU) -> residual bottleneck (no bias) -> LayerNorm."""

    def __init__(self, input_dim: int, output_dim: int, *, input_rate: float = 50.0,
                 kernel_sizes: Sequence[int] = (5, 5, 5), mid_channels: int | None = None,
                 bottleneck_dim: int = 512):
        super().__init__(input_dim, output_dim, input_rate)
        mid = int(mid_channels) if mid_channels is not None else 2 * input_dim
        kernel_sizes = _check_kernel_sizes("blsp", kernel_sizes, mid)
        self._options = dict(kernel_sizes=kernel_sizes, mid_channels=mid,
                             bottleneck_dim=int(bottleneck_dim))
        self.convs = glu_convs(input_dim, mid, 2 * output_dim, kernel_sizes)
        self.fc1 = nn.Linear(output_dim, bottleneck_dim, bias=False)
        self.fc2 = nn.Linear(bottleneck_dim, output_dim, bias=False)
        self.norm = nn.LayerNorm(output_dim, eps=1e-5)

    def forward(self, hidden: torch.Tensor, lengths: torch.Tensor) -> AdapterOutput:
        x, lengths = run_glu_convs(self.convs, hidden, lengths.to(hidden.device, torch.long))
        x = x + self.fc2(F.gelu(self.fc1(x)))
        x = self.norm(x)
        return AdapterOutput(_zero_padding(x, lengths), lengths)


# -- CIF (BLSP-KD's CFormer) --------------------------------------------------------------


def cif_weights(alpha: torch.Tensor, out_lengths: torch.Tensor) -> torch.Tensor:
    """Integrate-and-fire as a matrix: W [B, K, T], the share of frame t in token k.

    alpha [B, T]: firing weights (0 on padding); token k is the span [k, k+1) of the
    running sum of alpha, and frame t covers [c_t - alpha_t, c_t), so W[k, t] is their
    overlap: a frame that crosses an integer is split between two tokens, as in CIF's
    sequential loop. Rows k >= out_lengths are 0; each other row is normalised to sum 1
    (at inference the last token may be fired from a partial weight).
    """
    end = alpha.cumsum(dim=1)[:, None, :]                     # [B, 1, T]
    start = end - alpha[:, None, :]
    k = torch.arange(int(out_lengths.max()) if out_lengths.numel() else 0,
                     device=alpha.device, dtype=alpha.dtype)[None, :, None]  # [1, K, 1]
    w = (torch.minimum(end, k + 1) - torch.maximum(start, k)).clamp(min=0)
    w = w * lengths_mask(out_lengths, w.shape[1])[..., None].to(w.dtype)
    return w / w.sum(dim=-1, keepdim=True).clamp(min=1e-6)


def _sinusoids(length: int, dim: int, device, dtype) -> torch.Tensor:
    """Fixed sinusoidal positions [length, dim] (dim even)."""
    position = torch.arange(length, device=device, dtype=torch.float32)[:, None]
    scale = torch.exp(torch.arange(0, dim, 2, device=device, dtype=torch.float32)
                      * (-math.log(10000.0) / dim))
    out = torch.zeros(length, dim, device=device)
    out[:, 0::2] = torch.sin(position * scale)
    out[:, 1::2] = torch.cos(position * scale)
    return out.to(dtype)


@ADAPTERS.register("cif")
class CifAdapter(_GluConvAdapter):
    """CFormer: GLU conv subsampler -> continuous integrate-and-fire (one embedding per text
    token) -> Transformer layers -> Linear -> LayerNorm.

    The last subsampler channel, through a sigmoid, is each frame's firing weight; the
    others are the values integrated. `forward(..., target_lengths=)` (training) rescales the
    weights so an item fires exactly that many embeddings; without it the unscaled weight
    sum, rounded (at least one), is the count.
    """

    emits_per_token = True

    def __init__(self, input_dim: int, output_dim: int, *, input_rate: float = 50.0,
                 kernel_sizes: Sequence[int] = (5, 5), mid_channels: int | None = None,
                 d_model: int | None = None, num_layers: int = 1, num_heads: int = 4,
                 ffn_dim: int | None = None, dropout: float = 0.0):
        super().__init__(input_dim, output_dim, input_rate)
        mid = int(mid_channels) if mid_channels is not None else 2 * input_dim
        kernel_sizes = _check_kernel_sizes("cif", kernel_sizes, mid)
        width = int(d_model) if d_model is not None else min(int(output_dim), 1024)
        if width % num_heads or width % 2:
            raise ConfigError(f"cif adapter: d_model {width} must be even and a multiple of "
                              f"num_heads {num_heads}")
        ffn = int(ffn_dim) if ffn_dim is not None else 4 * width
        self._options = dict(kernel_sizes=kernel_sizes, mid_channels=mid, d_model=width,
                             num_layers=int(num_layers), num_heads=int(num_heads), ffn_dim=ffn,
                             dropout=float(dropout))
        self.convs = glu_convs(input_dim, mid, 2 * (width + 1), kernel_sizes)
        layer = nn.TransformerEncoderLayer(width, num_heads, ffn, dropout=dropout,
                                           activation="gelu", batch_first=True, norm_first=True)
        self.layers = nn.TransformerEncoder(layer, int(num_layers), enable_nested_tensor=False) \
            if num_layers > 0 else None
        self.proj = nn.Linear(width, output_dim)
        self.norm = nn.LayerNorm(output_dim, eps=1e-5)

    def forward(self, hidden: torch.Tensor, lengths: torch.Tensor,
                target_lengths: torch.Tensor | None = None) -> AdapterOutput:
        x, frames = run_glu_convs(self.convs, hidden, lengths.to(hidden.device, torch.long))
        values, logit = x[..., :-1], x[..., -1]
        alpha = torch.sigmoid(logit.float()) * lengths_mask(frames, x.shape[1])
        quantity = alpha.sum(dim=1)
        if target_lengths is not None:
            target = torch.as_tensor(target_lengths, device=alpha.device).long()
            alpha = alpha * (target / quantity.clamp(min=1e-6))[:, None]
            out_lengths = torch.where(frames > 0, target, torch.zeros_like(target))
        else:
            out_lengths = torch.where(frames > 0, torch.floor(quantity + 0.5).long().clamp(min=1),
                                      torch.zeros_like(frames))
        tokens = torch.bmm(cif_weights(alpha, out_lengths).to(values.dtype), values)
        valid = lengths_mask(out_lengths, tokens.shape[1])
        if self.layers is not None and tokens.shape[1]:
            tokens = tokens + _sinusoids(tokens.shape[1], tokens.shape[-1], tokens.device,
                                         tokens.dtype)
            tokens = self.layers(tokens, src_key_padding_mask=~valid)
        out = self.norm(self.proj(tokens))
        projected = self.norm(self.proj(values)) if self.training else None
        return AdapterOutput(_zero_padding(out, out_lengths), out_lengths, quantity, projected,
                             frames)


# -- frame stacking ---------------------------------------------------------------------


@ADAPTERS.register("stack")
class StackAdapter(Adapter):
    """Ultravox-style projector: stack k frames -> RMSNorm -> Linear -> SwiGLU -> Linear."""

    def __init__(self, input_dim: int, output_dim: int, *, input_rate: float = 50.0,
                 stack_factor: int = 8, hidden_dim: int | None = None, post_norm: bool = False):
        super().__init__(input_dim, output_dim, input_rate)
        if stack_factor < 1:
            raise ConfigError(f"stack adapter: stack_factor must be >= 1, got {stack_factor}")
        hidden = int(hidden_dim) if hidden_dim is not None else 2 * output_dim
        if hidden % 2:
            raise ConfigError(f"stack adapter: hidden_dim must be even (SwiGLU halves it), got {hidden}")
        self._options = dict(stack_factor=int(stack_factor), hidden_dim=hidden,
                             post_norm=bool(post_norm))
        self.stack_factor = int(stack_factor)
        stacked = input_dim * self.stack_factor
        self.norm = nn.RMSNorm(stacked, eps=1e-6)
        self.linear_1 = nn.Linear(stacked, hidden, bias=False)
        self.linear_2 = nn.Linear(hidden // 2, output_dim, bias=False)
        self.post_norm = nn.RMSNorm(output_dim, eps=1e-6) if post_norm else None

    def output_lengths(self, lengths):
        lengths = torch.as_tensor(lengths, dtype=torch.long)
        return torch.div(lengths + self.stack_factor - 1, self.stack_factor, rounding_mode="floor")

    def output_frame_rate(self, input_rate=None):
        rate = self.input_rate if input_rate is None else float(input_rate)
        return rate / self.stack_factor

    def forward(self, hidden: torch.Tensor, lengths: torch.Tensor) -> AdapterOutput:
        lengths = lengths.to(hidden.device, torch.long)
        batch, frames, dim = hidden.shape
        k = self.stack_factor
        x = _zero_padding(hidden, lengths)
        x = F.pad(x, (0, 0, 0, (-frames) % k)).reshape(batch, -1, k * dim)
        x = self.linear_1(self.norm(x))
        value, gate = x.chunk(2, dim=-1)
        x = self.linear_2(F.silu(gate) * value)
        if self.post_norm is not None:
            x = self.post_norm(x)
        out_lengths = self.output_lengths(lengths)
        return AdapterOutput(_zero_padding(x, out_lengths), out_lengths)


# -- window-level Q-Former --------------------------------------------------------------


@ADAPTERS.register("qformer")
class QFormerAdapter(Adapter):
    """SALMONN-style window-level Q-Former: n queries per window of w frames."""

    def __init__(self, input_dim: int, output_dim: int, *, input_rate: float = 50.0,
                 window_s: float = 0.33, window_frames: int | None = None, num_queries: int = 1,
                 d_model: int = 256, num_layers: int = 2, num_heads: int = 4,
                 ffn_dim: int | None = None, dropout: float = 0.1):
        super().__init__(input_dim, output_dim, input_rate)
        w = (int(window_frames) if window_frames is not None
             else max(1, math.floor(window_s * input_rate + 0.5)))  # 0.33 s at 50 Hz: 17
        if w < 1 or num_queries < 1:
            raise ConfigError(f"qformer adapter: window_frames and num_queries must be >= 1, "
                              f"got {w} and {num_queries}")
        if d_model % num_heads:
            raise ConfigError(f"qformer adapter: d_model {d_model} is not a multiple of "
                              f"num_heads {num_heads}")
        ffn = int(ffn_dim) if ffn_dim is not None else 4 * d_model
        self._options = dict(window_frames=w, num_queries=int(num_queries), d_model=int(d_model),
                             num_layers=int(num_layers), num_heads=int(num_heads), ffn_dim=ffn,
                             dropout=float(dropout))
        self.window_frames = w
        self.num_queries = int(num_queries)
        self.input_proj = nn.Linear(input_dim, d_model)
        self.input_norm = nn.LayerNorm(d_model)
        self.window_pos = nn.Parameter(torch.zeros(w, d_model))  # position inside a window
        self.queries = nn.Parameter(torch.randn(self.num_queries, d_model) * 0.02)
        layer = nn.TransformerDecoderLayer(d_model, num_heads, ffn, dropout=dropout,
                                           activation="gelu", batch_first=True, norm_first=True)
        self.decoder = nn.TransformerDecoder(layer, num_layers, norm=nn.LayerNorm(d_model))
        self.output_proj = nn.Linear(d_model, output_dim)

    def output_lengths(self, lengths):
        lengths = torch.as_tensor(lengths, dtype=torch.long)
        windows = torch.div(lengths + self.window_frames - 1, self.window_frames,
                            rounding_mode="floor")
        return windows * self.num_queries

    def output_frame_rate(self, input_rate=None):
        rate = self.input_rate if input_rate is None else float(input_rate)
        return self.num_queries * rate / self.window_frames

    def forward(self, hidden: torch.Tensor, lengths: torch.Tensor) -> AdapterOutput:
        lengths = lengths.to(hidden.device, torch.long)
        batch, frames, _ = hidden.shape
        w, n = self.window_frames, self.num_queries
        n_windows = math.ceil(frames / w) if frames else 0
        x = F.pad(hidden, (0, 0, 0, n_windows * w - frames))
        valid = lengths_mask(lengths, n_windows * w).reshape(batch, n_windows, w)
        x = x.reshape(batch, n_windows, w, -1)
        # only windows holding at least one valid frame are run (an all-padding window
        # would have nothing to attend to)
        live = valid[..., 0]
        memory = self.input_norm(self.input_proj(x[live])) + self.window_pos
        queries = self.queries.expand(memory.shape[0], -1, -1)
        out = self.decoder(queries, memory, memory_key_padding_mask=~valid[live])
        out = self.output_proj(out)  # [N_live, n, D_llm]
        y = out.new_zeros((batch, n_windows, n, self.output_dim))
        y[live] = out
        out_lengths = self.output_lengths(lengths)
        y = y.reshape(batch, n_windows * n, self.output_dim)
        return AdapterOutput(y, out_lengths)
