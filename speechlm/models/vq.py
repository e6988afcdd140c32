"""Vector-quantisation bottleneck of the supervised speech tokenizer (GLM-4-Voice style).

GLM-4-Voice inserts an average pooling layer (kernel 4: 50 Hz -> 12.5 Hz) and a
nearest-neighbour VQ (16384 codes, 14 bits x 12.5 Hz = 175 bps) after a middle
layer of a Whisper encoder, trains it with the ASR loss plus a commitment loss
(0.25), updates the codebook by EMA and restarts dead codes from random encoder
frames gathered from all ranks. This module holds those pieces; they are pure
torch and work on any encoder's hidden states [B, T, D] + lengths [B].

    pool = AvgPoolDownsample(kernel=4)                 # padding excluded from the averages
    vq = VectorQuantizer(num_codes=16384, dim=1280)   # k-means init on the first training batch
    pooled = pool(hidden, lengths)                     # AdapterOutput(hidden [B, ceil(T/4), D], lengths)
    out = vq(pooled.hidden, pooled.lengths)            # VQOutput; EMA + restarts in train() only
    loss = asr_loss + out.commit_loss                  # the 0.25 is already applied
    codes = vq.encode(pooled.hidden, pooled.lengths)   # [B, T'] long, -1 at padding
    vectors = vq.decode(codes)                         # [B, T', D], zero at padding
    bits_per_second(16384, 12.5)                       # 175.0

The codebook is a buffer, never a parameter: the optimizer does not see it and
it travels in the state_dict with its EMA statistics, so a resumed run goes on
exactly where it stopped. Under torch.distributed every rank keeps the same
codebook: the EMA statistics are all-reduced, the k-means init is computed on
rank 0 (from frames all-gathered across ranks) and broadcast, and dead-code
restarts use frames all-gathered across ranks, chosen on rank 0 and broadcast.
Every rank must call forward() in step (as DDP does anyway).

Differences from GLM-4-Voice's released code, on purpose: the pooling averages
only the valid frames of a window and keeps a partial last window
(ceil(T / k) outputs), so a batch's padding never changes an item's codes.

Encoder options the issue names, kept here because they are small:
`CausalConv1d` (left-padded: no output sees a later input) and
`block_causal_mask(T, block)` (frame i attends to frame j iff j // block <= i // block;
the released model uses blocks of 200 frames).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError, SpeechLMError
from .adapters import AdapterOutput, lengths_mask

__all__ = [
    "AvgPoolDownsample", "CausalConv1d", "VQOutput", "VectorQuantizer", "bits_per_second",
    "block_causal_mask", "kmeans", "nearest_codes",
]

# distances are computed for at most this many (frame, code) pairs at a time:
# 2**24 float32 = 64 MiB, i.e. 1024 frames against 16384 codes
_DISTANCE_BUDGET = 2 ** 24


def bits_per_second(num_codes: int, frame_rate: float) -> float:
    """Bitrate of a code stream: log2(num_codes) bits per frame x frames per second."""
    if num_codes < 1 or frame_rate <= 0:
        raise ConfigError(f"bits_per_second: num_codes must be >= 1 and frame_rate > 0, "
                          f"got {num_codes} and {frame_rate}")
    return math.log2(num_codes) * float(frame_rate)


# -- encoder pieces ---------------------------------------------------------------------


class AvgPoolDownsample(nn.Module):
    """Average k consecutive frames: [B, T, D] + lengths -> [B, ceil(T/k), D] + ceil(lengths/k).

    Only valid frames enter an average (a partial last window averages what it
    has); output frames at or after the output lengths are zero.
    """

    def __init__(self, kernel: int = 4):
        super().__init__()
        if kernel < 1:
            raise ConfigError(f"AvgPoolDownsample: kernel must be >= 1, got {kernel}")
        self.kernel = int(kernel)

    def output_lengths(self, lengths: torch.Tensor | Sequence[int]) -> torch.Tensor:
        lengths = torch.as_tensor(lengths, dtype=torch.long)
        return torch.div(lengths + self.kernel - 1, self.kernel, rounding_mode="floor")

    def output_frame_rate(self, input_rate: float) -> float:
        return float(input_rate) / self.kernel

    def forward(self, hidden: torch.Tensor, lengths: torch.Tensor | None = None) -> AdapterOutput:
        batch, frames, dim = hidden.shape
        if lengths is None:
            lengths = torch.full((batch,), frames, dtype=torch.long)
        lengths = lengths.to(hidden.device, torch.long)
        k = self.kernel
        pad = (-frames) % k
        valid = F.pad(lengths_mask(lengths, frames), (0, pad))  # [B, T + pad]
        x = F.pad(hidden, (0, 0, 0, pad)) * valid[..., None].to(hidden.dtype)
        sums = x.reshape(batch, -1, k, dim).sum(2)
        counts = valid.reshape(batch, -1, k).sum(-1)
        pooled = sums / counts.clamp(min=1)[..., None].to(hidden.dtype)  # empty window -> 0
        return AdapterOutput(pooled, self.output_lengths(lengths).to(hidden.device))


class CausalConv1d(nn.Conv1d):
    """Conv1d over [B, C, T] padded on the left only: output t sees inputs <= t * stride.

    T frames -> ceil(T / stride) frames; right padding of a batch never changes
    an item's valid outputs.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 dilation: int = 1, groups: int = 1, bias: bool = True):
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=0,
                         dilation=dilation, groups=groups, bias=bias)
        self.left_padding = (int(kernel_size) - 1) * int(dilation)

    def output_lengths(self, lengths: torch.Tensor | Sequence[int]) -> torch.Tensor:
        lengths = torch.as_tensor(lengths, dtype=torch.long)
        (s,) = self.stride
        return torch.div(lengths + s - 1, s, rounding_mode="floor")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(F.pad(x, (self.left_padding, 0)))


def block_causal_mask(frames: int, block: int, lengths: torch.Tensor | None = None,
                      device: torch.device | str | None = None) -> torch.Tensor:
    """Bool attention mask, True where attention is allowed (SDPA convention).

    Frame i may attend to frame j iff j // block <= i // block: full attention
    inside a block, causal between blocks. Without `lengths`: [T, T]; with
    lengths [B]: [B, 1, T, T] with keys at or after an item's length masked too.
    """
    if block < 1:
        raise ConfigError(f"block_causal_mask: block must be >= 1 frame, got {block}")
    if lengths is not None:
        device = lengths.device
    index = torch.arange(frames, device=device) // block
    mask = index[None, :] <= index[:, None]
    if lengths is None:
        return mask
    keys = lengths_mask(lengths.to(torch.long), frames)  # [B, T]
    return mask[None, None] & keys[:, None, None, :]


# -- nearest neighbour and k-means --------------------------------------------------------


@torch.no_grad()
def nearest_codes(frames: torch.Tensor, codebook: torch.Tensor,
                  chunk_frames: int | None = None) -> torch.Tensor:
    """Index [N] of the nearest code (squared L2) of each frame [N, D] in codebook [K, D].

    Computed `chunk_frames` frames at a time (default: 2**24 // K), in float32
    even under autocast, so memory stays bounded for large codebooks.
    """
    num_codes = codebook.shape[0]
    chunk = chunk_frames or max(1, _DISTANCE_BUDGET // num_codes)
    out = torch.empty(frames.shape[0], dtype=torch.long, device=frames.device)
    with torch.autocast(device_type=frames.device.type, enabled=False):
        codebook = codebook.float()
        code_sq = codebook.pow(2).sum(-1)
        for start in range(0, frames.shape[0], chunk):
            x = frames[start:start + chunk].float()
            # ||x - c||² = ||x||² - 2 x·c + ||c||²; ||x||² does not change the argmin
            distances = torch.addmm(code_sq, x, codebook.t(), alpha=-2.0)
            out[start:start + chunk] = distances.argmin(-1)
    return out


def _cluster_sums(frames: torch.Tensor, codes: torch.Tensor, num_codes: int):
    counts = torch.bincount(codes, minlength=num_codes).to(frames.dtype)
    sums = frames.new_zeros((num_codes, frames.shape[1])).index_add_(0, codes, frames)
    return counts, sums


def _kmeans_plus_plus(frames: torch.Tensor, num_codes: int) -> torch.Tensor:
    """Greedy k-means++ seeding (as in scikit-learn).

    Each next centre: draw 2 + ln K candidate frames with probability ∝ D² to
    the centres chosen so far and keep the one that lowers the total D² most.
    """
    n = frames.shape[0]
    trials = 2 + int(math.log(num_codes))
    frame_sq = frames.pow(2).sum(-1)

    def sq_distances(points: torch.Tensor) -> torch.Tensor:  # [N, P]
        return (frame_sq[:, None] - 2 * frames @ points.t() + points.pow(2).sum(-1)).clamp(min=0)

    centres = frames.new_empty((num_codes, frames.shape[1]))
    centres[0] = frames[torch.randint(n, (), device=frames.device)]
    nearest = sq_distances(centres[:1])[:, 0]
    for i in range(1, num_codes):
        # inverse-CDF draw (torch.multinomial caps the number of categories at 2**24);
        # the tiny floor keeps a pool whose every D² is 0 drawable
        cdf = (nearest + 1e-30).cumsum(0)
        draws = torch.rand(trials, device=frames.device) * cdf[-1]
        candidates = frames[torch.searchsorted(cdf, draws).clamp(max=n - 1)]
        d2 = sq_distances(candidates)
        best = torch.minimum(nearest[:, None], d2).sum(0).argmin()
        centres[i] = candidates[best]
        nearest = torch.minimum(nearest, d2[:, best])
    return centres


@torch.no_grad()
def kmeans(frames: torch.Tensor, num_codes: int, iters: int = 10,
           chunk_frames: int | None = None, noise: float = 1e-2):
    """Lloyd's k-means on frames [N, D] -> (centres [K, D], cluster sizes [K]).

    Seeded by k-means++ when there are at least K frames; with fewer frames
    than codes, from frames drawn with replacement plus small noise (`noise` x
    the frames' std) so duplicates can separate. An empty cluster keeps its centre.
    """
    frames = frames.float()
    n = frames.shape[0]
    if n == 0:
        raise SpeechLMError("kmeans: no frames to cluster (every item has length 0)")
    if n >= num_codes:
        centres = _kmeans_plus_plus(frames, num_codes)
    else:
        centres = frames[torch.randint(n, (num_codes,), device=frames.device)]
        scale = float(frames.std()) if n > 1 else float(frames.abs().mean())
        centres = centres + noise * (scale or 1.0) * torch.randn_like(centres)
    for _ in range(iters):
        counts, sums = _cluster_sums(frames, nearest_codes(frames, centres, chunk_frames),
                                     num_codes)
        centres = torch.where(counts[:, None] > 0, sums / counts.clamp(min=1)[:, None], centres)
    counts, _ = _cluster_sums(frames, nearest_codes(frames, centres, chunk_frames), num_codes)
    return centres, counts


# -- collectives (no-ops in a single process) ---------------------------------------------
# models import nothing from training (layering), hence these few lines of torch.distributed


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _is_rank0() -> bool:
    return not _distributed() or dist.get_rank() == 0


def _all_reduce_sum_(tensor: torch.Tensor) -> torch.Tensor:
    if _distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def _broadcast_(tensor: torch.Tensor) -> torch.Tensor:
    if _distributed():
        dist.broadcast(tensor, src=0)
    return tensor


def _all_gather_rows(rows: torch.Tensor) -> torch.Tensor:
    """Rows [N_r, D] of every rank r, concatenated in rank order (N_r may differ)."""
    if not _distributed():
        return rows
    size = torch.tensor([rows.shape[0]], dtype=torch.long, device=rows.device)
    sizes = [torch.zeros_like(size) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, size)
    sizes = [int(s) for s in sizes]
    width = max(sizes)
    if width == 0:
        return rows
    padded = rows.new_zeros((width, rows.shape[1]))
    padded[:rows.shape[0]] = rows
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    return torch.cat([part[:n] for part, n in zip(parts, sizes, strict=True)])


# -- the quantizer ------------------------------------------------------------------------


class VQOutput(NamedTuple):
    """What `VectorQuantizer.forward` returns.

    quantized: [B, T, D] codebook vectors with a straight-through gradient to the
    input (zero at padding); codes: [B, T] long, -1 at padding; commit_loss:
    commitment x mean squared error between the input and the (stop-gradient)
    codes over valid frames; perplexity and used_fraction: code usage of this
    batch on this rank (detached scalars); restarted: codes restarted by this
    call (dead-code restarts; many per update means the threshold is above what
    a batch gives a code: see `dead_code_threshold`).
    """

    quantized: torch.Tensor
    codes: torch.Tensor
    commit_loss: torch.Tensor
    perplexity: torch.Tensor
    used_fraction: torch.Tensor
    restarted: int = 0


def _usage(counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(perplexity, used fraction) of a code histogram [K]."""
    total = counts.sum()
    if total <= 0:
        zero = counts.new_zeros(())
        return zero, zero
    p = counts / total
    entropy = -(p * torch.log(p.clamp(min=1e-12))).sum()
    return entropy.exp(), (counts > 0).float().mean()


class VectorQuantizer(nn.Module):
    """Nearest-neighbour VQ with an EMA codebook, k-means init and dead-code restarts.

    num_codes, dim: codebook size K and vector width D.
    commitment: weight of ||x - sg(q)||² in `commit_loss` (GLM-4-Voice: 0.25).
    ema_decay, eps: EMA of cluster sizes and sums; eps is the Laplace smoothing.
    kmeans_init, kmeans_iters: initialise the codebook by k-means (k-means++
        seeding, then Lloyd iterations) on the valid frames of the first
        training batch (at most `kmeans_max_frames` frames, default 4 x K,
        gathered from all ranks); False: random normal codes.
    dead_code_threshold: a code whose EMA cluster size (in frames per global
        batch) is below this is dead; 0 turns restarts off. Keep it well below a
        code's even share (frames per batch / num_codes): above it most codes
        count as dead and are restarted at every update.
    restart_every: look for dead codes every this many training updates.
    chunk_frames: frames per distance chunk (default 2**24 // K).
    """

    def __init__(self, num_codes: int, dim: int, *, commitment: float = 0.25,
                 ema_decay: float = 0.99, eps: float = 1e-5, kmeans_init: bool = True,
                 kmeans_iters: int = 10, kmeans_max_frames: int | None = None,
                 dead_code_threshold: float = 1.0, restart_every: int = 1,
                 chunk_frames: int | None = None):
        super().__init__()
        if num_codes < 1 or dim < 1:
            raise ConfigError(f"VectorQuantizer: num_codes and dim must be >= 1, "
                              f"got {num_codes} and {dim}")
        if not 0.0 <= ema_decay < 1.0:
            raise ConfigError(f"VectorQuantizer: ema_decay must be in [0, 1), got {ema_decay}")
        if commitment < 0 or eps <= 0 or dead_code_threshold < 0:
            raise ConfigError("VectorQuantizer: commitment and dead_code_threshold must be "
                              f">= 0 and eps > 0, got {commitment}, {dead_code_threshold}, {eps}")
        if restart_every < 1 or kmeans_iters < 0 or (chunk_frames is not None and chunk_frames < 1):
            raise ConfigError("VectorQuantizer: restart_every and chunk_frames must be >= 1 and "
                              f"kmeans_iters >= 0, got {restart_every}, {chunk_frames}, "
                              f"{kmeans_iters}")
        self.num_codes = int(num_codes)
        self.dim = int(dim)
        self.commitment = float(commitment)
        self.ema_decay = float(ema_decay)
        self.eps = float(eps)
        self.kmeans_iters = int(kmeans_iters)
        self.kmeans_max_frames = int(kmeans_max_frames or 4 * num_codes)
        self.dead_code_threshold = float(dead_code_threshold)
        self.restart_every = int(restart_every)
        self.chunk_frames = chunk_frames
        codebook = torch.randn(num_codes, dim)
        self.register_buffer("codebook", codebook)
        # one frame per code: a random code unused for one update falls below the default threshold
        self.register_buffer("ema_cluster_size", torch.ones(num_codes))
        self.register_buffer("ema_embed_sum", codebook.clone())
        self.register_buffer("initialized", torch.tensor(not kmeans_init))
        self.register_buffer("updates", torch.zeros((), dtype=torch.long))
        self.register_buffer("restarts", torch.zeros((), dtype=torch.long))

    def extra_repr(self) -> str:
        return (f"num_codes={self.num_codes}, dim={self.dim}, commitment={self.commitment}, "
                f"ema_decay={self.ema_decay}, dead_code_threshold={self.dead_code_threshold}")

    # -- public API ------------------------------------------------------------------------

    def forward(self, x: torch.Tensor, lengths: torch.Tensor | None = None) -> VQOutput:
        """Quantize x [B, T, D]; in training mode also init / update / restart the codebook."""
        mask = self._mask(x, lengths)
        frames = x.detach()[mask].float()
        if self.training and not bool(self.initialized):
            self._kmeans_init(frames)
        flat_codes = nearest_codes(frames, self.codebook, self.chunk_frames)
        flat_q = self.codebook[flat_codes]  # a copy: the updates below do not change it
        counts = torch.bincount(flat_codes, minlength=self.num_codes).float()
        restarts_before = int(self.restarts)
        if self.training:
            self._ema_update(frames, flat_codes, counts)
            self._restart_dead_codes(frames)

        codes = torch.full(mask.shape, -1, dtype=torch.long, device=x.device)
        codes[mask] = flat_codes
        q = torch.zeros_like(x)
        q[mask] = flat_q.to(x.dtype)
        quantized = torch.where(mask[..., None], x + (q - x).detach(), torch.zeros_like(x))
        if frames.shape[0]:
            commit = self.commitment * F.mse_loss(x[mask].float(), flat_q)
        else:
            commit = (x * 0).sum().float()  # keeps the graph when no frame is valid
        perplexity, used = _usage(counts)
        return VQOutput(quantized, codes, commit, perplexity, used,
                        int(self.restarts) - restarts_before)

    @torch.no_grad()
    def encode(self, x: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """Codes [B, T] long (-1 at padding); never changes the codebook, in any mode."""
        mask = self._mask(x, lengths)
        codes = torch.full(mask.shape, -1, dtype=torch.long, device=x.device)
        codes[mask] = nearest_codes(x[mask], self.codebook, self.chunk_frames)
        return codes

    @torch.no_grad()
    def decode(self, codes: torch.Tensor | Sequence) -> torch.Tensor:
        """Codebook vectors [..., D] of codes [...]; negative codes (padding) decode to zeros."""
        codes = torch.as_tensor(codes, dtype=torch.long, device=self.codebook.device)
        too_big = codes >= self.num_codes
        if too_big.any():
            raise SpeechLMError(
                f"VectorQuantizer.decode: code {int(codes[too_big][0])} is outside the codebook "
                f"(0..{self.num_codes - 1}); were these codes made by a tokenizer with a larger "
                "codebook?")
        vectors = self.codebook[codes.clamp(min=0)]
        return vectors * (codes >= 0)[..., None].to(vectors.dtype)

    @torch.no_grad()
    def codebook_usage(self, codes: torch.Tensor, lengths: torch.Tensor | None = None) -> dict:
        """Usage of codes [B, T] (or [N]; -1 and positions at or after lengths ignored).

        perplexity: exp(entropy) of the code histogram; used_fraction and
        unused: codes that occur / do not; dead: codes whose EMA usage is below
        the restart threshold (those the next restart would replace).
        """
        codes = torch.as_tensor(codes, dtype=torch.long)
        valid = codes >= 0
        if lengths is not None:
            valid &= lengths_mask(torch.as_tensor(lengths, device=codes.device), codes.shape[-1])
        values = codes[valid]
        if values.numel() and int(values.max()) >= self.num_codes:
            raise SpeechLMError(f"codebook_usage: code {int(values.max())} is outside the "
                                f"codebook (0..{self.num_codes - 1})")
        counts = torch.bincount(values.cpu(), minlength=self.num_codes).float()
        perplexity, used = _usage(counts)
        return {"perplexity": float(perplexity), "used_fraction": float(used),
                "unused": int((counts == 0).sum()),
                "dead": int((self.ema_cluster_size < self.dead_code_threshold).sum())}

    # -- training-time updates -------------------------------------------------------------

    def _mask(self, x: torch.Tensor, lengths: torch.Tensor | None) -> torch.Tensor:
        if x.dim() != 3 or x.shape[-1] != self.dim:
            raise ConfigError(f"VectorQuantizer: expected input [B, T, {self.dim}], got "
                              f"{list(x.shape)}; set dim to the width of the encoder layer it "
                              "follows")
        if lengths is None:
            return torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
        return lengths_mask(lengths.to(x.device, torch.long), x.shape[1])

    @torch.no_grad()
    def _kmeans_init(self, frames: torch.Tensor) -> None:
        total = _all_reduce_sum_(torch.tensor(float(frames.shape[0]), device=frames.device))
        if total <= 0:
            return  # no valid frame anywhere: try again on the next batch
        world = dist.get_world_size() if _distributed() else 1
        per_rank = math.ceil(self.kmeans_max_frames / world)
        if frames.shape[0] > per_rank:
            frames = frames[torch.randperm(frames.shape[0], device=frames.device)[:per_rank]]
        pool = _all_gather_rows(frames)
        if _is_rank0():
            centres, counts = kmeans(pool, self.num_codes, self.kmeans_iters, self.chunk_frames)
            counts = counts * (total / pool.shape[0])  # in frames per global batch, like the EMA
        else:
            centres = torch.empty_like(self.codebook)
            counts = torch.empty_like(self.ema_cluster_size)
        _broadcast_(centres)
        _broadcast_(counts)
        self.codebook.copy_(centres)
        self.ema_cluster_size.copy_(counts)
        self.ema_embed_sum.copy_(centres * counts[:, None])
        self.initialized.fill_(True)

    @torch.no_grad()
    def _ema_update(self, frames: torch.Tensor, codes: torch.Tensor, counts: torch.Tensor) -> None:
        counts, sums = counts.clone(), self.ema_embed_sum.new_zeros(self.ema_embed_sum.shape)
        sums.index_add_(0, codes, frames.to(sums.dtype))
        _all_reduce_sum_(counts)  # every rank sees the global batch: same codebook everywhere
        _all_reduce_sum_(sums)
        if counts.sum() <= 0:
            return
        decay = self.ema_decay
        self.ema_cluster_size.mul_(decay).add_(counts, alpha=1 - decay)
        self.ema_embed_sum.mul_(decay).add_(sums, alpha=1 - decay)
        n = self.ema_cluster_size.sum()
        smoothed = (self.ema_cluster_size + self.eps) / (n + self.num_codes * self.eps) * n
        self.codebook.copy_(self.ema_embed_sum / smoothed[:, None])
        self.updates += 1

    @torch.no_grad()
    def _restart_dead_codes(self, frames: torch.Tensor) -> None:
        if self.dead_code_threshold <= 0 or int(self.updates) % self.restart_every:
            return
        dead = self.ema_cluster_size < self.dead_code_threshold  # same on every rank
        n_dead = int(dead.sum())
        if n_dead == 0:
            return
        if frames.shape[0] > n_dead:  # no rank needs to send more than n_dead candidates
            frames = frames[torch.randperm(frames.shape[0], device=frames.device)[:n_dead]]
        pool = _all_gather_rows(frames)
        if pool.shape[0] == 0:
            return
        if _is_rank0():
            pick = (torch.randperm(pool.shape[0], device=pool.device)[:n_dead]
                    if pool.shape[0] >= n_dead
                    else torch.randint(pool.shape[0], (n_dead,), device=pool.device))
            new = pool[pick].to(self.codebook.dtype)
        else:
            new = self.codebook.new_empty((n_dead, self.dim))
        _broadcast_(new)
        self.codebook[dead] = new
        self.ema_cluster_size[dead] = self.dead_code_threshold
        self.ema_embed_sum[dead] = new * self.dead_code_threshold
        self.restarts += n_dead
