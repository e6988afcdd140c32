"""TaiLr weighting (speechlm.training.tailr) on the CTC loss: the weight formula, its
per-utterance CTC adaptation, the weighted loss and gradient, config errors."""

import math

import pytest
import torch

from speechlm.errors import ConfigError
from speechlm.models.ctc import CharVocab
from speechlm.training.objectives.ctc import CTCObjective
from speechlm.training.tailr import TaiLrConfig, ctc_label_probability, tailr_weights


def test_weight_formula_against_hand_computed_values():
    p = torch.tensor([1.0, 0.5, 0.2, 0.02, 0.0])
    # gamma 0.5: p / (0.5 + 0.5 p) -> 1, 2/3, 1/3, 0.0392 (clamped to 0.1), 0 (clamped)
    assert torch.allclose(tailr_weights(p, 0.5, 0.1),
                          torch.tensor([1.0, 2 / 3, 1 / 3, 0.1, 0.1]))
    # gamma 1: w = p (then the clamp)
    assert torch.allclose(tailr_weights(p, 1.0, 0.05), torch.tensor([1.0, 0.5, 0.2, 0.05, 0.05]))
    # gamma 0.1, no floor: 0.2 / (0.1 + 0.18) = 0.714285...
    assert tailr_weights(torch.tensor([0.2]), 0.1, 0.0).item() == pytest.approx(0.2 / 0.28)
    q = torch.tensor([0.3], requires_grad=True)
    assert not tailr_weights(q, 0.5, 0.1).requires_grad  # sg[...]


def test_ctc_probability_is_the_length_normalised_sequence_probability():
    loss = torch.tensor([2.0, 3.0], requires_grad=True)  # -log P(y|x)
    p = ctc_label_probability(loss, torch.tensor([4, 0]))
    assert p[0].item() == pytest.approx(math.exp(-0.5))
    assert p[1].item() == pytest.approx(math.exp(-3.0))  # an empty label counts as length 1
    assert not p.requires_grad


def _objective_on(log_probs, frames, tailr):
    vocab = CharVocab(["<pad>", "<unk>", "|", "a", "b", "c", "d", "e"])
    objective = CTCObjective(torch.nn.Linear(1, 1), vocab, tailr=tailr)
    objective._forward = lambda model, batch: (log_probs, frames)
    return objective


def test_training_loss_is_the_weighted_token_mean_and_weights_carry_no_gradient():
    torch.manual_seed(0)
    logits = torch.randn(2, 12, 8, requires_grad=True)
    frames = torch.tensor([12, 9])
    labels = torch.tensor([[3, 4, 5, 6], [3, 7, -100, -100]])
    lengths = torch.tensor([4, 2])
    batch = {"audio": torch.zeros(2, 1), "labels": labels, "label_lengths": lengths}
    per_item = torch.nn.functional.ctc_loss(logits.log_softmax(-1).transpose(0, 1),
                                            labels[labels >= 0], frames, lengths,
                                            reduction="none", zero_infinity=True)
    p = torch.exp(-per_item.detach() / lengths)
    w = (p / (0.5 + 0.5 * p)).clamp(0.1, 1.0)
    expected = (w * per_item).sum() / 6
    objective = _objective_on(logits.log_softmax(-1), frames, TaiLrConfig(0.5, 0.1))
    loss, metrics = objective.loss(batch)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert metrics["tailr_loss_plain"].item() == pytest.approx((per_item.sum() / 6).item(), rel=1e-6)
    assert metrics["tailr_weight_mean"].item() == pytest.approx(w.mean().item(), rel=1e-6)
    assert metrics["tailr_weight_min"].item() == pytest.approx(w.min().item(), rel=1e-6)
    grad, = torch.autograd.grad(loss, logits)
    want, = torch.autograd.grad(expected, logits)  # w a constant: sg[.]
    assert torch.allclose(grad, want, atol=1e-6)
    plain = _objective_on(logits.log_softmax(-1), frames, None)
    plain_loss, plain_metrics = plain.loss(batch)
    assert plain_loss.item() == pytest.approx(metrics["tailr_loss_plain"].item(), rel=1e-6)
    assert "tailr_weight_mean" not in plain_metrics


def test_config_errors_name_the_field_and_the_fix(tmp_path):
    with pytest.raises(ConfigError, match=r"tailr.gamma must be in \(0, 1\], got 0 \(1 weights"):
        TaiLrConfig(gamma=0)
    with pytest.raises(ConfigError, match=r"tailr.w_min must be in \[0, 1\], got 1.5"):
        TaiLrConfig(w_min=1.5)
    from speechlm.recipes import load_recipe

    with pytest.raises(ConfigError, match="tailr.gamma must be in"):
        load_recipe("recipes/tiny/ctc_es.yaml", ["loss.tailr.gamma=2.0"])
    with pytest.raises(ConfigError, match="unknown key 'loss.tailr.gama'"):
        load_recipe("recipes/tiny/ctc_es.yaml", ["loss.tailr.gama=0.5"])
    _, config = load_recipe("recipes/tiny/self_training_es.yaml",
                            ["tailr={gamma: 0.3, w_min: 0.2}"])
    assert config.tailr == TaiLrConfig(0.3, 0.2)
