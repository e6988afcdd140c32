"""SLTrain (sparse plus low-rank) and SPDF (sparse pre-training, dense fine-tuning) layers."""

import pytest
import torch
from torch import nn

from speechlm.errors import ConfigError
from speechlm.models.sparse_lowrank import (
    SLTrainLinear,
    SparseLowRankConfig,
    apply_sltrain,
    apply_spdf,
    drop_spdf,
    merge_sltrain,
    parameter_report,
)


def _layer(d_in=6, d_out=5, rank=2, alpha=3.0, density=0.3, seed=0, bias=True,
           dtype=torch.float32):
    torch.manual_seed(seed)
    linear = nn.Linear(d_in, d_out, bias=bias, dtype=dtype)
    return linear, SLTrainLinear.from_linear(linear, rank, alpha, density,
                                             torch.Generator().manual_seed(seed))


def _scattered(layer):
    S = torch.zeros(layer.out_features * layer.in_features, dtype=layer.values.dtype)
    S[layer.support] = layer.values.detach()
    return S.view(layer.out_features, layer.in_features)


class Block(nn.Module):
    def __init__(self, d=16):
        super().__init__()
        self.q_proj, self.up_proj, self.head = nn.Linear(d, d), nn.Linear(d, 2 * d), \
            nn.Linear(2 * d, 3)

    def forward(self, x):
        return self.head(torch.relu(self.up_proj(self.q_proj(x))))


def test_forward_is_the_hand_formula():
    _, layer = _layer()
    with torch.no_grad():
        layer.B.normal_()
    x = torch.randn(4, 3, 6)
    W = (3.0 / 2) * layer.B.detach() @ layer.A.detach() + _scattered(layer)
    expected = x @ W.T + layer.bias.detach()
    torch.testing.assert_close(layer(x), expected)


def test_at_init_it_is_the_dense_layer_on_the_support():
    linear, layer = _layer(density=0.4)
    assert torch.count_nonzero(layer.B) == 0
    assert layer.support.numel() == round(0.4 * 30)
    assert torch.equal(layer.values.detach(), linear.weight.detach().reshape(-1)[layer.support])
    masked = nn.Linear(6, 5)
    with torch.no_grad():
        masked.weight.copy_(_scattered(layer))
        masked.bias.copy_(linear.bias)
    x = torch.randn(7, 6)
    torch.testing.assert_close(layer(x), masked(x))
    bound = 1 / 6 ** 0.5
    assert layer.A.abs().max() <= bound and layer.A.std() > bound / 3


def test_gradients_match_autograd_through_the_dense_formula():
    _, layer = _layer(dtype=torch.float64)
    with torch.no_grad():
        layer.B.normal_()
    x = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    from speechlm.models.sparse_lowrank import _SparseLowRankMatmul

    torch.autograd.gradcheck(
        lambda x, A, B, v, b: _SparseLowRankMatmul.apply(x, A, B, v, layer.support, b,
                                                         layer.scale),
        (x, layer.A, layer.B, layer.values, layer.bias))
    # and against plain autograd through W = scale·B·A + S
    g = torch.randn(3, 5, dtype=torch.float64)
    (layer(x) * g).sum().backward()
    ours = [t.grad.clone() for t in (x, layer.A, layer.B, layer.values, layer.bias)]
    refs = [t.detach().clone().requires_grad_() for t in (x, layer.A, layer.B, layer.values,
                                                         layer.bias)]
    xr, Ar, Br, vr, br = refs
    S = torch.zeros(30, dtype=torch.float64).index_put((layer.support,), vr).view(5, 6)
    ((xr @ (layer.scale * Br @ Ar + S).T + br) * g).sum().backward()
    for mine, ref in zip(ours, refs, strict=True):
        torch.testing.assert_close(mine, ref.grad)


def test_under_bf16_autocast_it_trains_like_the_dense_layer():
    """In a bf16 autocast region (the BLSP adapter's training) the layer computes in bf16 as
    nn.Linear does, and each gradient comes back in its parameter's dtype."""
    _, layer = _layer(d_in=32, d_out=16, rank=4, density=0.1)
    with torch.no_grad():
        layer.B.normal_(std=0.1)
    dense = nn.Linear(32, 16)
    with torch.no_grad():
        dense.weight.copy_(layer.dense_weight())
        dense.bias.copy_(layer.bias)
    x = torch.randn(8, 32)
    grads = []
    for module in (layer, dense):
        xi = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = module(xi)
        assert out.dtype == torch.bfloat16
        out.float().square().sum().backward()
        grads.append((out.detach().float(), xi.grad, module.bias.grad))
    assert layer.A.grad.dtype == layer.B.grad.dtype == layer.values.grad.dtype == torch.float32
    for mine, ref in zip(*grads, strict=True):
        assert mine.dtype == ref.dtype
        torch.testing.assert_close(mine, ref, rtol=2e-2, atol=2e-2)
    # dL/dW through the factors equals nn.Linear's dL/dW on the support and through B·A
    grad_w = dense.weight.grad
    torch.testing.assert_close(layer.values.grad, grad_w.reshape(-1)[layer.support],
                               rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(layer.B.grad, layer.scale * grad_w @ layer.A.detach().T,
                               rtol=2e-2, atol=2e-2)


def test_backward_keeps_no_dense_weight():
    d = 512
    _, layer = _layer(d_in=d, d_out=d, rank=8, density=0.03)
    x = torch.randn(4, d, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t,
                                                  lambda t: t):
        out = layer(x)
    biggest = max(saved)
    assert sum(saved) < d * d / 5, saved  # x, A, B, the values and support: no d×d tensor
    assert biggest <= 0.03 * d * d + 1
    out.sum().backward()
    assert layer.A.grad is not None and layer.values.grad.shape == layer.values.shape


def test_parameter_count():
    _, layer = _layer(d_in=20, d_out=10, rank=3, density=0.1)
    n = sum(p.numel() for p in layer.parameters())
    assert n == 3 * (20 + 10) + 20 + 10
    _, nobias = _layer(d_in=20, d_out=10, rank=3, density=0.1, bias=False)
    assert sum(p.numel() for p in nobias.parameters()) == 3 * (20 + 10) + 20
    assert parameter_report(nobias)["trainable"] == 3 * (20 + 10) + 20


def test_support_is_fixed_across_steps_and_reproducible_from_the_seed():
    torch.manual_seed(0)
    model = Block()
    names = apply_sltrain(model, ["q_proj", "up_proj"], rank=4, alpha=4, density=0.2, seed=7)
    assert names == ["q_proj", "up_proj"] and isinstance(model.head, nn.Linear)
    support = model.q_proj.support.clone()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    for _ in range(3):
        optimizer.zero_grad()
        model(torch.randn(8, 16)).pow(2).mean().backward()
        optimizer.step()
    assert torch.equal(model.q_proj.support, support)
    assert model.q_proj.B.abs().sum() > 0  # B moved off zero
    dense = torch.zeros(16 * 16)
    dense[support] = 1
    W = model.q_proj.dense_weight().detach()
    low_rank = model.q_proj.scale * model.q_proj.B.detach() @ model.q_proj.A.detach()
    torch.testing.assert_close((W - low_rank).view(-1)[dense == 0], torch.zeros(256 - 51))
    torch.manual_seed(1)  # a different dense init: the supports and A depend on the seed alone
    again = Block()
    apply_sltrain(again, ["q_proj", "up_proj"], rank=4, alpha=4, density=0.2, seed=7)
    assert torch.equal(again.q_proj.support, support)
    assert torch.equal(again.up_proj.support, model.up_proj.support)
    other = Block()
    apply_sltrain(other, ["q_proj"], rank=4, alpha=4, density=0.2, seed=8)
    assert not torch.equal(other.q_proj.support, support)


def test_to_linear_and_merge_give_the_same_outputs_and_a_plain_state_dict():
    torch.manual_seed(0)
    model = Block()
    apply_sltrain(model, [r"(q|up)_proj$"], rank=4, alpha=8, density=0.1, seed=0)
    with torch.no_grad():
        model.q_proj.B.normal_()
        model.up_proj.B.normal_()
    x = torch.randn(5, 16)
    before = model(x)
    torch.testing.assert_close(model.q_proj.to_linear()(x), model.q_proj(x))
    assert merge_sltrain(model) == 2
    assert type(model.q_proj) is nn.Linear
    torch.testing.assert_close(model(x), before)
    plain = Block()
    plain.load_state_dict(model.state_dict())  # strict: the ordinary model's keys
    torch.testing.assert_close(plain(x), before)


def test_spdf_masked_weights_stay_zero_then_train_after_drop():
    torch.manual_seed(0)
    model = Block()
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    assert apply_spdf(model, ["q_proj", "up_proj"], sparsity=0.75, seed=3) == ["q_proj",
                                                                               "up_proj"]
    masks = {n: model.get_submodule(n).spdf_mask.clone() for n in ("q_proj", "up_proj")}
    for mask in masks.values():
        assert (~mask).sum().item() == round(0.75 * mask.numel())
    assert parameter_report(model)["spdf_masked"] == sum(int((~m).sum()) for m in masks.values())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)

    def steps(n):
        for _ in range(n):
            optimizer.zero_grad()
            model(torch.randn(8, 16)).pow(2).mean().backward()
            optimizer.step()

    steps(5)
    for name, mask in masks.items():
        weight = model.get_submodule(name).weight.detach()
        assert torch.count_nonzero(weight[~mask]) == 0
        moved = weight[mask] != start[f"{name}.weight"][mask]
        assert moved.float().mean() > 0.9
    assert torch.count_nonzero(model.head.weight) == model.head.weight.numel()
    assert drop_spdf(model) == 2 and parameter_report(model)["spdf_masked"] == 0
    steps(2)
    weight = model.q_proj.weight.detach()
    assert (weight[~masks["q_proj"]] != 0).float().mean() > 0.9


def test_spdf_model_saves_a_plain_dense_state_dict(tmp_path):
    from safetensors.torch import load_file, save_file

    torch.manual_seed(0)
    model = Block()
    apply_spdf(model, ["q_proj"], sparsity=0.5, seed=0)
    keys = set(Block().state_dict())
    assert set(model.state_dict()) == keys
    save_file(model.state_dict(), tmp_path / "m.safetensors")
    plain = Block()
    plain.load_state_dict(load_file(tmp_path / "m.safetensors"))
    assert (plain.q_proj.weight == 0).float().mean() == 0.5
    x = torch.randn(3, 16)
    torch.testing.assert_close(plain(x), model(x))
    again = Block()  # the mask is re-drawn identically from the seed (a resumed run)
    apply_spdf(again, ["q_proj"], sparsity=0.5, seed=0)
    assert torch.equal(again.q_proj.spdf_mask, model.q_proj.spdf_mask)


def test_bad_settings_are_refused_with_the_field():
    with pytest.raises(ConfigError, match="density must be in"):
        SparseLowRankConfig(density=0)
    with pytest.raises(ConfigError, match="density must be in"):
        SparseLowRankConfig(density=1.5)
    with pytest.raises(ConfigError, match="rank must be >= 1"):
        SparseLowRankConfig(rank=0)
    with pytest.raises(ConfigError, match="sparsity must be in"):
        SparseLowRankConfig(kind="spdf", sparsity=1.0)
    with pytest.raises(ConfigError, match="targets is empty"):
        SparseLowRankConfig(targets=[])
    with pytest.raises(ConfigError, match="'k_proj' match"):
        apply_sltrain(Block(), ["q_proj", "k_proj"], rank=2, alpha=2, density=0.1, seed=0)
    with pytest.raises(ConfigError, match="'mlp'"):
        apply_spdf(Block(), ["mlp"], sparsity=0.5, seed=0)
    with pytest.raises(ConfigError, match="rank must be >= 1"):
        apply_sltrain(Block(), ["q_proj"], rank=0, alpha=2, density=0.1, seed=0)


# -- in a Llama, through the Trainer: resume, and the saved model ---------------------------

VOCAB = 32


def _llama(sparse=None):
    from transformers import LlamaConfig, LlamaForCausalLM

    from speechlm.models.sparse_lowrank import apply_sparse_lowrank

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=64, vocab_size=VOCAB))
    model.set_attn_implementation("eager")
    if sparse is not None:
        apply_sparse_lowrank(model, sparse)
    return model


def _items(n=24):
    g = torch.Generator().manual_seed(0)
    ids = [torch.randint(3, VOCAB, (6 + i % 5,), generator=g).tolist() for i in range(n)]
    return [{"input_ids": x, "labels": [-100] + x[1:]} for x in ids]


def _trainer(out, sparse, fail_on_call=None):
    from speechlm.data.sampler import DurationBucketSampler
    from speechlm.models.sparse_lowrank import spdf_phase_hook
    from speechlm.training.objectives.causal_lm import (
        CausalLMCollator,
        CausalLMObjective,
        TokenDataset,
    )
    from speechlm.training.trainer import TrainConfig, Trainer

    class Crashing(CausalLMObjective):
        calls = 0

        def loss(self, batch):
            self.calls += 1
            if self.calls == fail_on_call:
                raise RuntimeError("simulated crash")
            return super().loss(batch)

    objective = Crashing(_llama(sparse))
    lengths = [len(item["input_ids"]) for item in _items()]
    sampler = DurationBucketSampler(lengths, max_batch_duration=40, num_buckets=2, seed=0)
    config = TrainConfig(max_steps=6, lr=1e-2, warmup_steps=0, weight_decay=0.1, log_every=1,
                         save_every=1, keep_last=None, output_dir=str(out), progress=False,
                         tensorboard=False)
    hook = spdf_phase_hook(objective.model, sparse, say=lambda _: None)
    trainer = Trainer(config, objective, TokenDataset(_items()), sampler,
                      collate_fn=CausalLMCollator(pad_id=0), step_hooks=[hook] if hook else ())
    objective.attach(trainer)
    return trainer


@pytest.mark.parametrize("kind", ["sltrain", "spdf"])
def test_a_killed_run_resumes_bit_exactly_and_saves_a_plain_llama(tmp_path, kind):
    from transformers import AutoModelForCausalLM

    from speechlm.models.sparse_lowrank import to_plain_dense

    sparse = SparseLowRankConfig(kind=kind, rank=4, alpha=4, density=0.1, sparsity=0.75,
                                 seed=5)
    full = _trainer(tmp_path / "full", sparse)
    full.fit()
    with pytest.raises(RuntimeError, match="simulated crash"):
        _trainer(tmp_path / "killed", sparse, fail_on_call=4).fit()
    resumed = _trainer(tmp_path / "killed", sparse)  # a new process: supports/masks re-drawn
    assert resumed.fit().step == 6
    for (name, a), (_, b) in zip(resumed.model.state_dict().items(),
                                 full.model.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    model = full.model
    q_proj = model.model.layers[0].self_attn.q_proj
    if kind == "spdf":
        assert torch.count_nonzero(q_proj.weight[~q_proj.spdf_mask]) == 0
    else:
        assert isinstance(q_proj, SLTrainLinear) and q_proj.B.abs().sum() > 0
    ids = torch.tensor([_items()[0]["input_ids"]])
    with torch.no_grad():
        before = model(ids).logits
    to_plain_dense(model).save_pretrained(tmp_path / "final")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "final")
    assert type(plain.model.layers[0].self_attn.q_proj) is nn.Linear
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).logits, before)
    if kind == "spdf":
        zeros = (plain.model.layers[0].mlp.up_proj.weight == 0).float().mean()
        assert zeros == 0.75


@pytest.mark.parametrize("killed_at", [2, 5])  # before and after the switch at update 3
def test_spdf_dense_phase_starts_at_its_update_and_survives_a_kill(tmp_path, killed_at):
    from speechlm.training.checkpoint import load_checkpoint, step_dir_name

    sparse = SparseLowRankConfig(kind="spdf", sparsity=0.75, dense_after_steps=3, seed=5)
    full = _trainer(tmp_path / "full", sparse)
    masks = {name: m.spdf_mask.clone() for name, m in full.model.named_modules()
             if getattr(m, "spdf_mask", None) is not None}
    full.fit()
    assert not any(hasattr(m, "spdf_mask") for m in full.model.modules())

    def masked_nonzero(step):
        state = load_checkpoint(tmp_path / "full" / step_dir_name(step)).model_state
        return sum(int(torch.count_nonzero(state[name + ".weight"][~mask]))
                   for name, mask in masks.items())

    assert masked_nonzero(3) == 0  # sparse through update 3
    assert masked_nonzero(4) > 0   # masked entries train from update 4
    with pytest.raises(RuntimeError, match="simulated crash"):
        _trainer(tmp_path / "killed", sparse, fail_on_call=killed_at).fit()
    resumed = _trainer(tmp_path / "killed", sparse)
    assert resumed.fit().step == 6
    for (name, a), (_, b) in zip(resumed.model.state_dict().items(),
                                 full.model.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_dense_after_steps_is_checked():
    with pytest.raises(ConfigError, match="dense_after_steps is SPDF's dense phase"):
        SparseLowRankConfig(kind="sltrain", dense_after_steps=10)
    with pytest.raises(ConfigError, match="dense_after_steps must be >= 1"):
        SparseLowRankConfig(kind="spdf", dense_after_steps=0)


def test_text_lm_recipe_validates_the_section():
    from speechlm.config import config_from_dict
    from speechlm.recipes import text_lm

    config = config_from_dict(text_lm.Config, {"model": {"sparse_lowrank": {
        "kind": "spdf", "sparsity": 0.5, "targets": ["gate_proj"]}}})
    assert config.model.sparse_lowrank.sparsity == 0.5
    with pytest.raises(ConfigError, match="sparse_lowrank.density must be in"):
        config_from_dict(text_lm.Config, {"model": {"sparse_lowrank": {"density": 2.0}}})
    with pytest.raises(ConfigError, match="sparse_lowrank.*kind"):
        config_from_dict(text_lm.Config, {"model": {"sparse_lowrank": {"kind": "lora"}}})
    with pytest.raises(ConfigError, match="not supported with train.sharding=fsdp"):
        config_from_dict(text_lm.Config, {"model": {"sparse_lowrank": {}},
                                          "train": {"sharding": "fsdp"}})
