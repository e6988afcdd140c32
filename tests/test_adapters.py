"""Modality adapters: exact output lengths, rates, mask handling, BLSP's layer plan, gradients."""

import math

import pytest
import torch
import torch.nn.functional as F

from speechlm.errors import ConfigError
from speechlm.models.adapters import ADAPTERS, BlspAdapter, build_adapter

D_ENC, D_LLM = 12, 16


def _adapter(name, **options):
    torch.manual_seed(0)
    return build_adapter(name, D_ENC, D_LLM, input_rate=50.0, **options).eval()


def _expected_lengths(name, n, options):
    if name in ("blsp", "cif"):
        for _ in range(3 if name == "blsp" else 2):
            n = (n - 1) // 2 + 1 if n > 0 else 0  # Conv1d(k=5, s=2, p=2)
        return n
    if name == "stack":
        return math.ceil(n / options.get("stack_factor", 8))
    w = options["window_frames"]
    return math.ceil(n / w) * options.get("num_queries", 1)


SMALL_QFORMER = {"d_model": 32, "num_heads": 4, "ffn_dim": 64}
CASES = [("blsp", {}), ("stack", {}), ("stack", {"stack_factor": 3}),
         ("qformer", {"window_frames": 5, "num_queries": 2, **SMALL_QFORMER}),
         ("qformer", {"window_frames": 17, "num_queries": 1, **SMALL_QFORMER})]


@pytest.mark.parametrize("name,options", CASES)
def test_output_lengths_follow_the_formula_for_many_lengths(name, options):
    adapter = _adapter(name, **options)
    lengths = torch.arange(0, 70)
    expected = torch.tensor([_expected_lengths(name, int(n), options) for n in lengths])
    assert torch.equal(adapter.output_lengths(lengths), expected)
    x = torch.randn(len(lengths), int(lengths.max()), D_ENC)
    with torch.no_grad():
        out = adapter(x, lengths)
    assert torch.equal(out.lengths, expected)
    assert out.hidden.shape[1] == int(expected.max())
    # frames at or after each output length are exactly zero, frames before are not
    for row, n in enumerate(expected.tolist()):
        assert torch.all(out.hidden[row, n:] == 0)
        assert torch.all(out.hidden[row, :n].abs().sum(-1) > 0)


def test_output_frame_rates():
    assert _adapter("blsp").output_frame_rate(50.0) == 6.25  # BLSP: 50 Hz Whisper -> 6.25 Hz
    assert _adapter("stack").output_frame_rate(50.0) == 6.25
    assert _adapter("stack", stack_factor=4).output_frame_rate() == 12.5
    q = _adapter("qformer", window_s=0.3, num_queries=2)  # 0.3 s at 50 Hz = 15 frames
    assert q.window_frames == 15
    assert q.output_frame_rate(50.0) == pytest.approx(2 / 0.3)


@pytest.mark.parametrize("name,options", CASES)
def test_padding_frames_never_change_valid_outputs(name, options):
    adapter = _adapter(name, **options)
    torch.manual_seed(1)
    short = torch.randn(1, 23, D_ENC)
    batch = torch.randn(3, 61, D_ENC) * 5  # garbage everywhere, incl. the short item's padding
    batch[0, :23] = short[0]
    lengths = torch.tensor([23, 61, 40])
    with torch.no_grad():
        alone = adapter(short, torch.tensor([23]))
        together = adapter(batch, lengths)
    n = int(alone.lengths[0])
    assert int(together.lengths[0]) == n
    torch.testing.assert_close(together.hidden[0, :n], alone.hidden[0, :n], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name,options", CASES)
def test_gradients_reach_every_adapter_parameter(name, options):
    adapter = _adapter(name, **options).train()
    x = torch.randn(2, 40, D_ENC, requires_grad=True)
    out = adapter(x, torch.tensor([40, 25]))
    (out.hidden ** 2).sum().backward()
    for pname, p in adapter.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, pname
    # the padding frames of item 1 get no gradient: they never influence the output
    assert torch.all(x.grad[1, 25:] == 0)
    assert x.grad[1, :25].abs().sum() > 0


def test_blsp_layer_plan_matches_the_original_code():
    """cwang621/blsp Conv1dSubsampler(d_enc, 2*d_enc, d_llm, [5,5,5]) -> Adapter(d_llm, 512)
    (residual, no bias) -> LayerNorm; on an unpadded item our masking changes nothing."""
    adapter = _adapter("blsp")
    convs = adapter.convs
    assert [(c.in_channels, c.out_channels) for c in convs] == [
        (D_ENC, 2 * D_ENC), (D_ENC, 2 * D_ENC), (D_ENC, 2 * D_LLM)]
    assert all(c.kernel_size == (5,) and c.stride == (2,) and c.padding == (2,) for c in convs)
    assert adapter.fc1.bias is None and adapter.fc2.bias is None
    assert (adapter.fc1.in_features, adapter.fc1.out_features) == (D_LLM, 512)

    x = torch.randn(1, 37, D_ENC)
    with torch.no_grad():
        ref = x.transpose(1, 2)
        for conv in convs:
            ref = F.glu(conv(ref), dim=1)
        ref = ref.transpose(1, 2)
        ref = ref + adapter.fc2(F.gelu(adapter.fc1(ref)))
        ref = adapter.norm(ref)
        out = adapter(x, torch.tensor([37]))
    torch.testing.assert_close(out.hidden, ref)
    assert out.lengths.tolist() == [5]


def test_registry_and_option_errors():
    assert {"blsp", "stack", "qformer"} <= set(ADAPTERS.names())
    with pytest.raises(ConfigError, match="unknown adapter 'blps'.*did you mean 'blsp'"):
        build_adapter("blps", 4, 4)
    with pytest.raises(ConfigError, match="no option.*stack_factr.*valid: stack_factor"):
        build_adapter("stack", 4, 4, stack_factr=2)
    assert isinstance(build_adapter("blsp", 4, 6, kernel_sizes=[3, 3]), BlspAdapter)
    rebuilt = build_adapter("qformer", 4, 8, **_adapter("qformer", window_frames=7).options())
    assert rebuilt.window_frames == 7


# -- CIF (BLSP-KD's CFormer) ----------------------------------------------------------------


def _sequential_cif(alpha, values, threshold=1.0):
    """CIF's original frame-by-frame loop: accumulate weight; on reaching the threshold, fire
    the integrated values and carry the rest of the frame's weight into the next token."""
    fired, acc, state = [], 0.0, torch.zeros(values.shape[-1])
    for a, v in zip(alpha.tolist(), values, strict=True):
        if acc + a < threshold:
            acc, state = acc + a, state + a * v
            continue
        used = threshold - acc
        fired.append(state + used * v)
        acc, state = a - used, (a - used) * v
    return torch.stack(fired)


def test_cif_weights_equal_the_sequential_integrate_and_fire_loop():
    from speechlm.models.adapters import cif_weights

    gen = torch.Generator().manual_seed(0)
    alpha = torch.rand(1, 23, generator=gen) * 0.9
    values = torch.randn(23, 5, generator=gen)
    n = int(alpha.sum())  # tokens the loop fires completely
    weights = cif_weights(alpha, torch.tensor([n]))[0]
    expected = _sequential_cif(alpha[0], values)[:n]
    # each complete token integrates exactly threshold 1 of weight, so the normalised
    # matrix and the loop agree
    assert torch.allclose(weights @ values, expected, atol=1e-5)
    # conservation: with the sum rescaled to an integer, every frame's weight is spent
    scaled = alpha * (n / alpha.sum())
    w = cif_weights(scaled, torch.tensor([n]))[0]
    assert torch.allclose(w.sum(0), scaled[0], atol=1e-5)


def test_cif_fires_the_target_count_in_training_and_its_own_count_at_inference():
    adapter = _adapter("cif", num_heads=4)
    lengths = torch.tensor([64, 40, 9])
    x = torch.randn(3, 64, D_ENC)
    with torch.no_grad():
        trained = adapter(x, lengths, target_lengths=torch.tensor([7, 3, 1]))
        free = adapter(x, lengths)
    assert trained.lengths.tolist() == [7, 3, 1] and trained.hidden.shape[1] == 7
    # inference: the rounded unscaled weight sum, at least one, at most one per frame
    expected = torch.floor(free.quantity + 0.5).long().clamp(min=1)
    assert torch.equal(free.lengths, expected)
    assert bool((free.lengths <= adapter.output_lengths(lengths)).all())
    for out in (trained, free):
        for row, n in enumerate(out.lengths.tolist()):
            assert torch.all(out.hidden[row, n:] == 0)
            assert torch.all(out.hidden[row, :n].abs().sum(-1) > 0)
    # an item alone gets the same embeddings as inside the padded batch
    with torch.no_grad():
        alone = adapter(x[1:2, :40], lengths[1:2], target_lengths=torch.tensor([3]))
    assert torch.allclose(alone.hidden[0], trained.hidden[1, :3], atol=1e-5)


def test_cif_count_loss_reaches_the_firing_weights():
    adapter = _adapter("cif").train()
    out = adapter(torch.randn(2, 50, D_ENC), torch.tensor([50, 30]),
                  target_lengths=torch.tensor([5, 2]))
    (out.quantity - torch.tensor([5.0, 2.0])).abs().mean().backward()
    assert adapter.convs[-1].weight.grad is not None
    assert float(adapter.convs[-1].weight.grad.abs().sum()) > 0
