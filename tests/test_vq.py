"""VQ bottleneck of the supervised speech tokenizer: codes, EMA, k-means, restarts, ranks."""

import math

import pytest
import torch
import torch.nn.functional as F

from speechlm.errors import ConfigError, SpeechLMError
from speechlm.models.vq import (
    AvgPoolDownsample,
    CausalConv1d,
    VectorQuantizer,
    bits_per_second,
    block_causal_mask,
    kmeans,
    nearest_codes,
)

DIM = 8
CLUSTERS = 16


def _centres(seed=0, spread=6.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(CLUSTERS, DIM, generator=g) * spread


def _mixture_batch(g, centres, batch=8, frames=40, pad_value=None):
    """(x [B, T, D], lengths [B], labels [B, T]) from well-separated unit Gaussians."""
    labels = torch.randint(len(centres), (batch, frames), generator=g)
    x = centres[labels] + torch.randn(batch, frames, DIM, generator=g)
    lengths = torch.randint(frames // 2, frames + 1, (batch,), generator=g)
    lengths[0] = frames
    if pad_value is not None:
        pad = torch.arange(frames)[None, :] >= lengths[:, None]
        x[pad] = pad_value
    return x, lengths, labels


def _valid(lengths, frames):
    return torch.arange(frames)[None, :] < lengths[:, None]


def _brute_force(frames, codebook):
    return ((frames[:, None, :] - codebook[None]) ** 2).sum(-1).argmin(-1)


def _purity(codes, labels):
    """Share of frames whose code's majority cluster is their own cluster."""
    hits = 0
    for code in codes.unique():
        hits += int(torch.bincount(labels[codes == code]).max())
    return hits / len(codes)


def _train(vq, centres, steps, seed=1, **batch):
    g = torch.Generator().manual_seed(seed)
    vq.train()
    for _ in range(steps):
        x, lengths, _ = _mixture_batch(g, centres, **batch)
        vq(x, lengths)
    return vq


def _states_equal(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# -- nearest neighbour --------------------------------------------------------------------


def test_chunked_nearest_codes_equal_a_brute_force_argmin():
    g = torch.Generator().manual_seed(0)
    frames, codebook = torch.randn(203, 6, generator=g), torch.randn(50, 6, generator=g)
    expected = _brute_force(frames, codebook)
    assert torch.equal(nearest_codes(frames, codebook, chunk_frames=7), expected)
    assert torch.equal(nearest_codes(frames, codebook), expected)


def test_forward_codes_are_the_nearest_code_and_minus_one_at_padding():
    torch.manual_seed(0)
    vq = VectorQuantizer(50, DIM, kmeans_init=False, chunk_frames=5).eval()
    x, lengths, _ = _mixture_batch(torch.Generator().manual_seed(1), _centres(), pad_value=1e3)
    out = vq(x, lengths)
    valid = _valid(lengths, x.shape[1])
    assert torch.equal(out.codes[valid], _brute_force(x[valid], vq.codebook))
    assert (out.codes[~valid] == -1).all() and (~valid).any()
    assert torch.equal(vq.encode(x, lengths), out.codes)
    assert torch.allclose(out.quantized[valid], vq.codebook[out.codes[valid]], atol=1e-6)
    assert (out.quantized[~valid] == 0).all()


def test_padding_frames_do_not_influence_kmeans_ema_or_restarts():
    centres = _centres()
    g = torch.Generator().manual_seed(3)
    batches = [_mixture_batch(g, centres, batch=4, frames=12) for _ in range(4)]
    runs = []
    for pad_value, extra in ((1e4, 9), (0.0, 0)):
        torch.manual_seed(0)
        vq = VectorQuantizer(64, DIM, dead_code_threshold=1.0).train()  # 64 codes: restarts happen
        codes = []
        for x, lengths, _ in batches:
            x = F.pad(x, (0, 0, 0, extra))
            x[~_valid(lengths, x.shape[1])] = pad_value
            codes.append(vq(x, lengths).codes[:, :12])
        runs.append((vq, codes))
    (a, codes_a), (b, codes_b) = runs
    assert int(a.restarts) > 0
    for key, value in a.state_dict().items():
        assert torch.allclose(value.float(), b.state_dict()[key].float(), atol=1e-5), key
    assert all(torch.equal(p, q) for p, q in zip(codes_a, codes_b, strict=True))


# -- gradients and loss -------------------------------------------------------------------


def test_straight_through_gradient_and_commitment_loss():
    torch.manual_seed(0)
    vq = VectorQuantizer(32, DIM, kmeans_init=False)
    data, lengths, _ = _mixture_batch(torch.Generator().manual_seed(2), _centres())
    valid = _valid(lengths, data.shape[1])
    for mode in (vq.train, vq.eval):
        mode()
        before = vq.codebook.clone()  # quantized uses the codebook as it was before the update
        x = data.clone().requires_grad_(True)
        out = vq(x, lengths)
        weights = torch.randn_like(x)
        (out.quantized * weights).sum().backward()
        assert torch.equal(x.grad, weights * valid[..., None])
        q = before[out.codes[valid]]
        expected = 0.25 * ((x.detach()[valid] - q) ** 2).mean()
        assert out.commit_loss.item() == pytest.approx(expected.item(), rel=1e-5)
        x.grad = None
        out.commit_loss.backward()  # the loss pulls x towards its code, never the codebook
        expected_grad = 0.25 * 2 * (x.detach() - before[out.codes.clamp(min=0)]) / (valid.sum() * DIM)
        assert torch.allclose(x.grad, expected_grad * valid[..., None], atol=1e-7)
    assert list(vq.parameters()) == []  # the codebook is a buffer: no optimizer ever sees it


# -- training dynamics --------------------------------------------------------------------


def test_ema_training_on_a_gaussian_mixture_finds_the_clusters():
    torch.manual_seed(0)
    centres = _centres()
    vq = _train(VectorQuantizer(32, DIM, kmeans_init=False, ema_decay=0.95), centres, steps=60)
    x, lengths, labels = _mixture_batch(torch.Generator().manual_seed(99), centres, batch=16)
    valid = _valid(lengths, x.shape[1])
    codes = vq.encode(x, lengths)
    assert _purity(codes[valid], labels[valid]) > 0.95
    usage = vq.codebook_usage(codes, lengths)
    assert usage["used_fraction"] > 0.75 and usage["perplexity"] > 20
    assert usage["unused"] == round((1 - usage["used_fraction"]) * 32)
    # every cluster centre has a code close by
    gaps = torch.cdist(centres, vq.codebook).min(-1).values
    assert gaps.max() < 1.5


@pytest.mark.parametrize("restarts", [True, False])
def test_dead_code_restart_rescues_a_collapsed_codebook(restarts):
    torch.manual_seed(0)
    centres = _centres()
    vq = VectorQuantizer(32, DIM, kmeans_init=False, ema_decay=0.95,
                         dead_code_threshold=1.0 if restarts else 0.0)
    vq.codebook.fill_(20.0)  # every code equal and far from the data: all frames pick code 0
    vq.ema_embed_sum.copy_(vq.codebook)
    _train(vq, centres, steps=30)
    x, lengths, labels = _mixture_batch(torch.Generator().manual_seed(99), centres, batch=16)
    usage = vq.codebook_usage(vq.encode(x, lengths), lengths)
    if restarts:
        assert usage["used_fraction"] > 0.6 and usage["perplexity"] > 15
        assert int(vq.restarts) >= 31
        valid = _valid(lengths, x.shape[1])
        assert _purity(vq.encode(x, lengths)[valid], labels[valid]) > 0.9
    else:
        assert usage["used_fraction"] == 1 / 32 and int(vq.restarts) == 0


def test_a_dead_code_restarts_on_a_valid_frame_of_the_batch():
    vq = VectorQuantizer(4, 2, kmeans_init=False, ema_decay=0.9, dead_code_threshold=1.0)
    vq.codebook.copy_(torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [99.0, 99.0]]))
    vq.ema_cluster_size.copy_(torch.tensor([100.0, 100.0, 100.0, 1.0]))
    vq.ema_embed_sum.copy_(vq.codebook * vq.ema_cluster_size[:, None])
    x = torch.tensor([[[0.5, 0.0], [10.0, 0.5], [0.0, 9.5], [99.0, 99.0]]])
    out = vq.train()(x, torch.tensor([3]))  # the padding frame sits on code 3
    assert out.codes.tolist() == [[0, 1, 2, -1]]
    assert int(vq.restarts) == 1 and int(vq.updates) == 1
    assert any(torch.equal(vq.codebook[3], frame) for frame in x[0, :3])
    assert vq.ema_cluster_size[3] == 1.0  # given one batch's worth of use to prove itself
    assert torch.equal(vq.ema_embed_sum[3], vq.codebook[3])
    assert (vq.ema_cluster_size[:3] > 1).all()


def test_dead_codes_are_counted_by_their_ema_usage():
    vq = VectorQuantizer(4, 2, kmeans_init=False, dead_code_threshold=1.0)
    vq.ema_cluster_size.copy_(torch.tensor([5.0, 0.5, 1.0, 0.0]))
    usage = vq.codebook_usage(torch.tensor([[0, 0, 2, -1]]), torch.tensor([3]))
    assert usage == {"perplexity": pytest.approx(math.exp(-(2 / 3) * math.log(2 / 3)
                                                          - (1 / 3) * math.log(1 / 3))),
                     "used_fraction": 0.5, "unused": 2, "dead": 2}


def test_kmeans_init_places_codes_on_the_cluster_centres():
    torch.manual_seed(0)
    centres = _centres()
    vq = VectorQuantizer(32, DIM, dead_code_threshold=0.0)
    assert not bool(vq.initialized)
    x, lengths, labels = _mixture_batch(torch.Generator().manual_seed(5), centres, batch=16,
                                        pad_value=-50.0)
    random_gap = torch.cdist(centres, vq.codebook).min(-1).values.max()
    vq.train()(x, lengths)
    assert bool(vq.initialized) and int(vq.updates) == 1
    # every cluster gets codes of its own (2 per cluster on average), none far from its centre
    valid = _valid(lengths, x.shape[1])
    codes = vq.codebook_usage(vq.encode(x, lengths), lengths)
    assert _purity(vq.encode(x, lengths)[valid], labels[valid]) > 0.99
    assert codes["used_fraction"] > 0.9
    gap = torch.cdist(centres, vq.codebook).min(-1).values.max()
    assert gap < 2.0 < random_gap
    assert not (vq.codebook.abs() > 40).any()  # the -50 padding frames were not clustered
    # the EMA statistics start from the clusters' sizes, so the codebook is not pulled to 0
    assert vq.ema_cluster_size.sum().item() == pytest.approx(valid.sum().item(), rel=1e-4)


def test_kmeans_with_fewer_frames_than_codes_samples_with_replacement_plus_noise():
    torch.manual_seed(0)
    frames = torch.randn(5, 3) * 4
    centres, counts = kmeans(frames, 12, iters=3)
    assert centres.shape == (12, 3) and counts.sum() == 5
    assert len({tuple(c.tolist()) for c in centres}) == 12  # the noise split the duplicates
    assert torch.cdist(centres, frames).min(-1).values.max() < 0.5
    with pytest.raises(SpeechLMError, match="no frames to cluster"):
        kmeans(frames[:0], 4)


def test_eval_mode_and_encode_never_change_the_codebook():
    torch.manual_seed(0)
    centres = _centres()
    vq = _train(VectorQuantizer(32, DIM), centres, steps=2)
    before = {k: v.clone() for k, v in vq.state_dict().items()}
    x, lengths, _ = _mixture_batch(torch.Generator().manual_seed(7), _centres(seed=5))
    vq.eval()(x, lengths)
    vq.train().encode(x, lengths)
    assert all(torch.equal(before[k], v) for k, v in vq.state_dict().items())
    fresh = VectorQuantizer(32, DIM).eval()  # uninitialised: eval does not run k-means either
    fresh(x, lengths)
    assert not bool(fresh.initialized)


def test_state_dict_round_trip_resumes_exactly_and_training_is_deterministic():
    centres = _centres()

    def run(steps, seed, vq=None):
        torch.manual_seed(seed)
        return _train(vq or VectorQuantizer(32, DIM), centres, steps, seed=seed)

    a = run(3, seed=0)
    b = run(3, seed=0)
    assert _states_equal(a, b) and int(a.updates) == 3
    torch.manual_seed(123)
    restored = VectorQuantizer(32, DIM)  # a different random codebook until loaded
    restored.load_state_dict(a.state_dict())
    x, lengths, _ = _mixture_batch(torch.Generator().manual_seed(8), centres)
    assert torch.equal(restored.encode(x, lengths), a.encode(x, lengths))
    run(2, seed=4, vq=a)
    run(2, seed=4, vq=restored)
    assert _states_equal(a, restored) and bool(restored.initialized)


def test_decode_maps_codes_back_to_vectors_and_rejects_foreign_codes():
    torch.manual_seed(0)
    vq = VectorQuantizer(10, 3, kmeans_init=False)
    vectors = vq.decode(torch.tensor([[2, 9, -1]]))
    assert torch.equal(vectors[0, :2], vq.codebook[[2, 9]]) and (vectors[0, 2] == 0).all()
    with pytest.raises(SpeechLMError, match=r"code 12 is outside the codebook \(0\.\.9\)"):
        vq.decode([1, 12])
    with pytest.raises(ConfigError, match=r"expected input \[B, T, 3\], got \[1, 2, 4\]"):
        vq(torch.zeros(1, 2, 4))
    with pytest.raises(ConfigError, match="ema_decay must be in"):
        VectorQuantizer(4, 2, ema_decay=1.0)


# -- encoder pieces -----------------------------------------------------------------------


def test_avg_pool_with_lengths_equals_manual_averaging():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 11, 5, generator=g)
    lengths = torch.tensor([11, 6, 1])
    x[1, 6:] = 1e6  # padding must not enter any average
    x[2, 1:] = -1e6
    pool = AvgPoolDownsample(kernel=4)
    out = pool(x, lengths)
    assert out.lengths.tolist() == [3, 2, 1] and out.hidden.shape == (3, 3, 5)
    for b, n in enumerate(lengths.tolist()):
        for i in range(math.ceil(n / 4)):
            expected = x[b, 4 * i:min(4 * i + 4, n)].mean(0)
            assert torch.allclose(out.hidden[b, i], expected, atol=1e-6)
        assert (out.hidden[b, math.ceil(n / 4):] == 0).all()
    assert pool.output_frame_rate(50.0) == 12.5


def test_bits_per_second():
    assert bits_per_second(16384, 12.5) == 175.0
    assert bits_per_second(2, 50) == 50.0
    with pytest.raises(ConfigError, match="frame_rate > 0"):
        bits_per_second(16384, 0)


def test_block_causal_mask():
    mask = block_causal_mask(5, 2)
    expected = torch.tensor([[1, 1, 0, 0, 0],
                             [1, 1, 0, 0, 0],
                             [1, 1, 1, 1, 0],
                             [1, 1, 1, 1, 0],
                             [1, 1, 1, 1, 1]], dtype=torch.bool)
    assert torch.equal(mask, expected)
    assert torch.equal(block_causal_mask(4, 1), torch.ones(4, 4).tril().bool())
    batched = block_causal_mask(5, 2, lengths=torch.tensor([5, 3]))
    assert batched.shape == (2, 1, 5, 5)
    assert torch.equal(batched[0, 0], expected)
    assert torch.equal(batched[1, 0], expected & torch.tensor([1, 1, 1, 0, 0]).bool())
    with pytest.raises(ConfigError, match="block must be >= 1"):
        block_causal_mask(4, 0)


@pytest.mark.parametrize("stride,dilation", [(1, 1), (2, 1), (1, 2)])
def test_causal_conv_outputs_do_not_see_future_frames(stride, dilation):
    torch.manual_seed(0)
    conv = CausalConv1d(3, 4, kernel_size=3, stride=stride, dilation=dilation)
    x = torch.randn(1, 3, 12)
    out = conv(x)
    assert out.shape[-1] == conv.output_lengths([12]).item() == math.ceil(12 / stride)
    for t in range(12):
        changed = x.clone()
        changed[..., t:] = torch.randn(1, 3, 12 - t)
        keep = math.ceil(t / stride)  # outputs that read only inputs before t
        assert torch.allclose(conv(changed)[..., :keep], out[..., :keep], atol=1e-6)
        if keep < out.shape[-1]:  # and the first output that reads frame t does change
            assert not torch.allclose(conv(changed)[..., keep:], out[..., keep:])


# -- two ranks ----------------------------------------------------------------------------


def _rank_batches(rank, steps):
    g = torch.Generator().manual_seed(100 + rank)
    return [_mixture_batch(g, _centres(), batch=3 + rank, frames=20) for _ in range(steps)]


def _ddp_worker(rank, store, out_dir, steps):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        # synced: same init seed; independent per-rank RNG for everything after
        torch.manual_seed(0)
        vq = VectorQuantizer(CLUSTERS, DIM, dead_code_threshold=0.0,
                             kmeans_max_frames=10_000).train()
        restarting = VectorQuantizer(64, DIM, kmeans_init=False).train()
        torch.manual_seed(10 + rank)
        for x, lengths, _ in _rank_batches(rank, steps):
            vq(x, lengths)
            restarting(x, lengths)
        torch.save({"vq": vq.state_dict(), "restarting": restarting.state_dict()},
                   f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_ranks_keep_one_codebook_equal_to_one_process_on_the_global_batch(tmp_path):
    import torch.multiprocessing as mp

    steps = 4
    mp.spawn(_ddp_worker, args=(str(tmp_path / "store"), str(tmp_path), steps), nprocs=2)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    for name in ("vq", "restarting"):
        for key, value in ranks[0][name].items():
            assert torch.equal(value, ranks[1][name][key]), (name, key)
    assert int(ranks[0]["restarting"]["restarts"]) > 0

    # one process on both ranks' batches together (rank 0's items first) ends where the ranks do
    torch.manual_seed(0)
    single = VectorQuantizer(CLUSTERS, DIM, dead_code_threshold=0.0,
                             kmeans_max_frames=10_000).train()
    torch.manual_seed(10)  # rank 0's RNG, which draws the k-means init
    for (x0, l0, _), (x1, l1, _) in zip(_rank_batches(0, steps), _rank_batches(1, steps),
                                        strict=True):
        single(torch.cat([x0, x1]), torch.cat([l0, l1]))
    for key, value in single.state_dict().items():
        assert torch.allclose(value.float(), ranks[0]["vq"][key].float(), atol=1e-4), key
