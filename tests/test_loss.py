"""Losses and schedules: hand computations, endpoints and midpoints."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from capsnet.config import LossConfig, OptimConfig, load_config
from capsnet.loss import (
    compute_loss,
    cross_entropy,
    lr_at,
    margin_at,
    margin_loss,
    reconstruction_loss,
    spread_loss,
)


def test_spread_loss_equals_a_hand_computation():
    a = torch.tensor([[0.9, 0.2, 0.5], [0.3, 0.6, 0.1]])
    y = torch.tensor([0, 0])
    # sample 0: max(0, .5 - .7)^2 + max(0, .5 - .4)^2 = 0.01
    # sample 1: max(0, .5 + .3)^2 + max(0, .5 - .2)^2 = 0.64 + 0.09
    expected = (0.01 + 0.73) / 2
    assert spread_loss(a, y, margin=0.5).item() == pytest.approx(expected, abs=1e-6)


def test_spread_loss_leaves_out_the_target_class_and_is_zero_when_the_target_wins_by_the_margin():
    a = torch.tensor([[0.95, 0.1, 0.2]])
    assert spread_loss(a, torch.tensor([0]), margin=0.7).item() == 0.0


def test_spread_loss_matches_a_naive_loop():
    torch.manual_seed(0)
    a, y, m = torch.rand(6, 5), torch.randint(0, 5, (6,)), 0.6
    naive = (
        sum(max(0.0, m - (a[n, y[n]] - a[n, i]).item()) ** 2 for n in range(6) for i in range(5) if i != y[n])
        / 6
    )
    assert spread_loss(a, y, m).item() == pytest.approx(naive, rel=1e-6)


def test_margin_loss_equals_a_hand_computation():
    a = torch.tensor([[0.8, 0.3]])
    # target: (0.9 - 0.8)^2 = 0.01; other: 0.5 * (0.3 - 0.1)^2 = 0.02
    assert margin_loss(a, torch.tensor([0])).item() == pytest.approx(0.03, abs=1e-6)


def test_cross_entropy_uses_the_logits_of_the_activations():
    a = torch.tensor([[0.7, 0.2, 0.4]])
    y = torch.tensor([0])
    assert cross_entropy(a, y).item() == pytest.approx(F.cross_entropy(torch.logit(a), y).item(), rel=1e-6)


def test_reconstruction_loss_is_the_per_sample_sum_of_squares_averaged_over_the_batch():
    x = torch.zeros(2, 1, 2, 2)
    recon = torch.ones(2, 1, 2, 2)
    recon[1] = 2.0
    assert reconstruction_loss(recon, x).item() == pytest.approx((4 * 1 + 4 * 4) / 2)


@pytest.mark.parametrize("schedule", ["linear", "sigmoid"])
def test_margin_starts_at_the_start_value_and_ends_at_the_end_value(schedule):
    cfg = LossConfig(margin_schedule=schedule, margin_start=0.2, margin_end=0.9)
    assert margin_at(0, 100, cfg) == pytest.approx(0.2)
    assert margin_at(100, 100, cfg) == pytest.approx(0.9)
    assert margin_at(250, 100, cfg) == pytest.approx(0.9)
    assert margin_at(50, 100, cfg) == pytest.approx(0.55)  # both ramps are symmetric about the middle


def test_linear_margin_rises_evenly_and_margin_steps_overrides_the_run_length():
    cfg = LossConfig(margin_steps=10)
    assert margin_at(5, 1000, cfg) == pytest.approx(0.55)
    assert margin_at(10, 1000, cfg) == pytest.approx(0.9)
    assert margin_at(25, 100, LossConfig()) == pytest.approx(0.2 + 0.7 * 0.25)


def test_sigmoid_margin_is_slow_at_the_ends_and_monotone():
    cfg = LossConfig(margin_schedule="sigmoid")
    values = [margin_at(s, 100, cfg) for s in range(101)]
    assert all(b >= a for a, b in itertools.pairwise(values))
    assert values[10] - values[0] < values[55] - values[45]


def test_learning_rate_decays_exponentially_with_the_step():
    cfg = OptimConfig(lr=0.01, decay_rate=0.5, decay_steps=100)
    assert lr_at(0, cfg) == pytest.approx(0.01)
    assert lr_at(100, cfg) == pytest.approx(0.005)
    assert lr_at(50, cfg) == pytest.approx(0.01 * math.sqrt(0.5))


def test_null_decay_steps_spread_the_decay_over_the_whole_run():
    cfg = OptimConfig(lr=0.01, decay_rate=0.1, decay_steps=None)
    assert lr_at(0, cfg, total_steps=400) == pytest.approx(0.01)
    assert lr_at(200, cfg, total_steps=400) == pytest.approx(0.01 * math.sqrt(0.1))
    assert lr_at(400, cfg, total_steps=400) == pytest.approx(0.001)
    assert lr_at(400, cfg, total_steps=800) == pytest.approx(0.01 * math.sqrt(0.1))
    with pytest.raises(ValueError, match="total_steps"):
        lr_at(10, cfg)


def test_staircase_learning_rate_drops_only_every_decay_steps():
    cfg = OptimConfig(lr=0.01, decay_rate=0.5, decay_steps=100, staircase=True)
    assert lr_at(99, cfg) == pytest.approx(0.01)
    assert lr_at(100, cfg) == pytest.approx(0.005)


def test_warmup_rises_linearly_to_the_scheduled_rate():
    cfg = OptimConfig(lr=0.01, decay_rate=1.0, warmup_steps=10)
    assert lr_at(0, cfg) == pytest.approx(0.001)
    assert lr_at(4, cfg) == pytest.approx(0.005)
    assert lr_at(10, cfg) == pytest.approx(0.01)


def test_total_loss_adds_the_weighted_reconstruction_error(tiny_config_path):
    from capsnet.model import CapsNet

    cfg = load_config(tiny_config_path, ["loss.recon_weight=0.5"])
    torch.manual_seed(0)
    model = CapsNet.from_config(cfg.model, cfg.routing, in_channels=1, num_classes=4, image_size=20)
    x, y = torch.randn(3, 1, 20, 20), torch.tensor([0, 1, 2])
    out = model(x)
    loss, parts = compute_loss(out, x, y, model, cfg, step=0, total_steps=10)
    # each part computed here from the model's outputs: the spread loss at the first step's margin of
    # 0.2, and the squared error of the target class's reconstruction
    a = out.activations.detach()
    spread = sum(
        max(0.0, 0.2 - float(a[n, y[n]] - a[n, i])) ** 2 for n in range(3) for i in range(4) if i != y[n]
    )
    recon = float((model.reconstruct(out.poses, y) - x).square().sum().detach()) / 3
    assert spread > 0 and recon > 0
    assert parts["class"].item() == pytest.approx(spread / 3, rel=1e-5)
    assert parts["recon"].item() == pytest.approx(recon, rel=1e-5)
    assert loss.item() == pytest.approx(spread / 3 + 0.5 * recon, rel=1e-5)
    assert parts["margin"] == pytest.approx(0.2)
    no_recon = load_config(tiny_config_path, ["loss.recon_weight=0"])
    loss2, parts2 = compute_loss(out, x, y, model, no_recon, step=0, total_steps=10)
    assert "recon" not in parts2 and loss2.item() == pytest.approx(parts["class"].item())


@pytest.mark.parametrize("kind", ["spread", "margin", "cross_entropy"])
def test_the_loss_kind_chooses_the_classification_loss(tiny_config_path, kind):
    from capsnet.model import CapsNet

    cfg = load_config(tiny_config_path, [f"loss.kind={kind}", "loss.recon_weight=0"])
    torch.manual_seed(0)
    model = CapsNet.from_config(cfg.model, cfg.routing, in_channels=1, num_classes=4, image_size=20)
    x, y = torch.randn(3, 1, 20, 20), torch.tensor([0, 1, 2])
    out = model(x)
    a = out.activations.detach()
    every = {
        "spread": spread_loss(a, y, margin=0.2),
        "margin": margin_loss(a, y),
        "cross_entropy": cross_entropy(a, y),
    }
    assert len({round(v.item(), 6) for v in every.values()}) == 3  # the three differ on these outputs
    loss, parts = compute_loss(out, x, y, model, cfg, step=0, total_steps=10)
    assert loss.item() == pytest.approx(every[kind].item(), rel=1e-6)
    assert parts["class"].item() == pytest.approx(every[kind].item(), rel=1e-6)


def test_cross_entropy_has_a_gradient_for_a_target_class_far_below_the_others():
    scores = torch.tensor([[-30.0, 2.0, 0.0], [5.0, -1.0, 16.0]], requires_grad=True)
    target = torch.tensor([0, 2])
    loss = cross_entropy(torch.sigmoid(scores), target)
    torch.testing.assert_close(loss, F.cross_entropy(scores, target), rtol=1e-5, atol=1e-5)
    (grad,) = torch.autograd.grad(loss, scores)
    torch.testing.assert_close(
        grad, torch.autograd.grad(F.cross_entropy(scores, target), scores)[0], rtol=1e-3, atol=1e-6
    )
    assert grad[0, 0] < -0.4  # the target at a score of -30 is pulled up


def test_the_attacks_use_the_same_class_scores_as_the_loss():
    from capsnet.attack import activation_logits
    from capsnet.loss import class_scores

    a = torch.sigmoid(torch.tensor([[-40.0, -5.0, 0.0, 3.0, 9.0]]))
    torch.testing.assert_close(activation_logits(a), class_scores(a))
    torch.testing.assert_close(
        class_scores(a), torch.tensor([[-40.0, -5.0, 0.0, 3.0, 9.0]]), rtol=1e-3, atol=1e-3
    )


def test_the_reconstruction_loss_decodes_the_target_class_not_the_predicted_one(tiny_config_path):
    from capsnet.model import CapsNet

    cfg = load_config(tiny_config_path, ["loss.recon_weight=0.5"])
    torch.manual_seed(0)
    model = CapsNet.from_config(cfg.model, cfg.routing, in_channels=1, num_classes=4, image_size=20)
    x = torch.randn(3, 1, 20, 20)
    out = model(x)
    y = out.activations.argmin(dim=1)  # never the predicted class
    assert (y != out.activations.argmax(dim=1)).all()
    _, parts = compute_loss(out, x, y, model, cfg, step=0, total_steps=10)
    want = reconstruction_loss(model.reconstruct(out.poses, y), x)
    assert parts["recon"].item() == pytest.approx(want.item(), rel=1e-6)
    predicted = reconstruction_loss(model.reconstruct(out.poses, out.activations.argmax(dim=1)), x)
    assert parts["recon"].item() != pytest.approx(predicted.item(), rel=1e-6)


def test_the_default_loss_and_routing_settings_are_the_papers():
    from capsnet.config import RoutingConfig

    loss = LossConfig()
    assert loss.kind == "spread"
    assert (loss.margin_start, loss.margin_end) == (0.2, 0.9)
    assert loss.recon_weight == 0.0005
    routing = RoutingConfig()
    assert (routing.final_lambda, routing.lambda_decay, routing.min_var) == (0.01, 0.95, 0.0005)


def test_warmup_scales_the_decayed_rate_not_the_base_rate():
    # During the warm-up the rate is the decayed schedule times (step + 1) / warmup_steps.
    cfg = OptimConfig(lr=0.01, decay_rate=0.5, decay_steps=10, warmup_steps=10)
    for step in (0, 4, 9):
        scheduled = 0.01 * 0.5 ** (step / 10)
        assert lr_at(step, cfg) == pytest.approx(scheduled * (step + 1) / 10, rel=1e-12)
    assert lr_at(15, cfg) == pytest.approx(0.01 * 0.5**1.5, rel=1e-12)  # after it: the schedule alone
    stairs = OptimConfig(lr=0.01, decay_rate=0.5, decay_steps=4, staircase=True, warmup_steps=10)
    assert lr_at(5, stairs) == pytest.approx(0.01 * 0.5 * 6 / 10, rel=1e-12)  # floor(5 / 4) = 1
