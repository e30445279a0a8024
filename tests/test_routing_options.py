"""The activation-cost options: ``cost_norm`` and ``beta_a_logit``."""

from __future__ import annotations

import pytest
import torch

from capsnet import CapsNet
from capsnet.routing import RoutingSettings, child_fold, em_routing, inverse_temperatures


def random_routing_problem(seed: int, n=2, positions=3, types=4, children=6, h=16):
    g = torch.Generator().manual_seed(seed)
    votes = torch.randn(n, positions, types, children, h, generator=g, dtype=torch.float64)
    act = torch.rand(n, positions, children, generator=g, dtype=torch.float64) * 0.9 + 0.05
    beta_u = torch.randn(types, generator=g, dtype=torch.float64) * 0.5
    beta_a = torch.randn(types, generator=g, dtype=torch.float64) * 0.5
    return [t.requires_grad_() for t in (votes, act, beta_u, beta_a)]


def test_one_iteration_uses_the_scaled_cost_and_the_rescaled_beta_a():
    votes, act, beta_u, beta_a = random_routing_problem(0)
    types, children = votes.shape[2], votes.shape[3]
    settings = RoutingSettings(iterations=1, final_lambda=0.3, cost_norm=50.0, beta_a_logit=True)
    result = em_routing(votes, act, beta_u, beta_a, settings, None, impl="plain")
    # By hand: per-patch normalisation starts every assignment at 1 / types.
    weight = act[:, :, None, :] / types  # (N, L, C, I)
    rsum = weight.sum(-1)
    mu = (weight[..., None] * votes).sum(-2) / rsum[..., None]
    var = (weight[..., None] * (votes - mu[..., None, :]) ** 2).sum(-2) / rsum[..., None] + settings.min_var
    scale = 50.0 * types / children
    cost = ((beta_u[:, None] + 0.5 * torch.log(var)) * (scale * rsum)[..., None]).sum(-1)
    lam = inverse_temperatures(settings)[0]
    # beta_a in units of the (only, so last) iteration's logit: the logit is beta_a - lambda * cost
    want = torch.sigmoid(beta_a - lam * cost)
    torch.testing.assert_close(result.activation, want)
    torch.testing.assert_close(result.pose, mu)


def test_without_the_options_the_cost_is_the_papers():
    votes, act, beta_u, beta_a = random_routing_problem(1)
    paper = em_routing(votes, act, beta_u, beta_a, RoutingSettings(), None, impl="plain")
    unit = em_routing(
        votes,
        act,
        beta_u,
        beta_a,
        RoutingSettings(cost_norm=votes.shape[3] / votes.shape[2]),
        None,
        impl="plain",
    )
    torch.testing.assert_close(paper.activation, unit.activation)
    scaled = em_routing(votes, act, beta_u, beta_a, RoutingSettings(cost_norm=100.0), None, impl="plain")
    assert not torch.allclose(paper.activation, scaled.activation)


def test_beta_a_logit_is_the_paper_beta_a_divided_by_the_last_iterations_lambda():
    votes, act, beta_u, beta_a = random_routing_problem(2)
    settings = RoutingSettings(final_lambda=0.02, beta_a_logit=True)
    # lambda of the last of 3 iterations: 0.02 * (1 - 0.95 ** 3), not final_lambda itself
    last = 0.02 * (1 - 0.95**3)
    assert inverse_temperatures(settings)[-1] == pytest.approx(last)
    logit_units = em_routing(votes, act, beta_u, beta_a, settings, None, impl="fast")
    paper_units = em_routing(votes, act, beta_u, beta_a / last, RoutingSettings(final_lambda=0.02), None)
    torch.testing.assert_close(logit_units.activation, paper_units.activation)
    torch.testing.assert_close(logit_units.pose, paper_units.pose)


@pytest.mark.parametrize("cross_position", [True, False])
def test_fast_equals_plain_with_both_options_in_outputs_and_gradients(cross_position):
    height = width = 5
    kernel, stride, child_types, types = 3, 1, 2, 3
    out = (height - kernel) // stride + 1
    children = kernel * kernel * child_types
    votes, act, beta_u, beta_a = random_routing_problem(
        3, positions=out * out, types=types, children=children
    )
    fold = child_fold(height, width, kernel, stride, child_types, "cpu") if cross_position else None
    settings = RoutingSettings(iterations=3, final_lambda=0.05, cost_norm=100.0, beta_a_logit=True)
    inputs = [votes, act, beta_u, beta_a]
    results = {}
    for impl in ("fast", "plain"):
        r = em_routing(votes, act, beta_u, beta_a, settings, fold, impl=impl)
        g = torch.Generator().manual_seed(9)
        total = (r.pose * torch.randn(r.pose.shape, generator=g, dtype=r.pose.dtype)).sum() + (
            r.activation * torch.randn(r.activation.shape, generator=g, dtype=r.activation.dtype)
        ).sum()
        results[impl] = (r.pose, r.activation, *torch.autograd.grad(total, inputs))
    for got, want in zip(results["fast"], results["plain"]):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_the_model_passes_the_options_from_its_config_to_every_routing_layer():
    model = CapsNet.from_preset("small", num_classes=10, image_size=28, cost_norm=100.0, beta_a_logit=True)
    layers = [*model.convcaps, model.classcaps]
    assert all(layer.settings.cost_norm == 100.0 and layer.settings.beta_a_logit for layer in layers)
    out = model(torch.rand(2, 1, 28, 28))
    assert torch.isfinite(out.activations).all() and torch.isfinite(out.poses).all()
