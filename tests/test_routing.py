"""EM routing against a naive reference written with explicit loops over children and parents."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from helpers import broken_compiler

from capsnet import routing
from capsnet.layers import ClassCaps, ConvCaps
from capsnet.routing import ChildFold, RoutingSettings, em_routing, inverse_temperatures

SETTINGS = RoutingSettings(iterations=3, final_lambda=0.01, lambda_decay=0.95, min_var=0.0005)


# --------------------------------------------------------------------------- naive reference


def naive_em(children, parents, links, settings, group_of):
    """EM routing over an explicit bipartite graph.

    children: {child: activation (0-dim tensor)}
    parents: {parent: (beta_u, beta_a)} (0-dim tensors)
    links: list of (child, parent, vote (16,) tensor)
    group_of(link_index) -> hashable: links whose assignments are normalised together.
    Returns {parent: (mu (16,), activation)}.
    """
    groups: dict = {}
    for idx, link in enumerate(links):
        groups.setdefault(group_of(idx), []).append(idx)
    r = [None] * len(links)
    for members in groups.values():
        for idx in members:
            r[idx] = torch.tensor(1.0 / len(members), dtype=torch.float64)
    # the paper's schedule written out here, not taken from the code under test
    lambdas = [
        settings.final_lambda * (1 - settings.lambda_decay ** (t + 1)) for t in range(settings.iterations)
    ]
    out = {}
    for t, lam in enumerate(lambdas):
        out = {}
        log_act = {}
        stats = {}
        for parent, (beta_u, beta_a) in parents.items():
            mine = [idx for idx, (_, p, _) in enumerate(links) if p == parent]
            weights = [r[idx] * children[links[idx][0]] for idx in mine]
            rsum = sum(weights)
            denom = torch.clamp(rsum, min=1e-10)
            mu = sum(w * links[idx][2] for w, idx in zip(weights, mine)) / denom
            var = (
                sum(w * (links[idx][2] - mu) ** 2 for w, idx in zip(weights, mine)) / denom + settings.min_var
            )
            cost = 0.0
            for h in range(mu.shape[0]):
                cost = cost + (beta_u + 0.5 * torch.log(var[h])) * rsum
            logit = lam * (beta_a - cost)
            out[parent] = (mu, torch.sigmoid(logit))
            log_act[parent] = torch.nn.functional.logsigmoid(logit)
            stats[parent] = (mu, var)
        if t == len(lambdas) - 1:
            break
        logits = [None] * len(links)
        for idx, (_, parent, vote) in enumerate(links):
            mu, var = stats[parent]
            log_p = 0.0
            for h in range(vote.shape[0]):
                log_p = log_p - 0.5 * ((vote[h] - mu[h]) ** 2 / var[h] + torch.log(2 * math.pi * var[h]))
            logits[idx] = log_act[parent] + log_p
        for members in groups.values():
            top = max(float(logits[idx].detach()) for idx in members)
            exps = {idx: torch.exp(logits[idx] - top) for idx in members}
            total = sum(exps.values())
            for idx in members:
                r[idx] = exps[idx] / total
    return out


def naive_convcaps(layer: ConvCaps, pose, act, cross_position: bool):
    """Reference output of a ConvCaps layer, pose (1, H, W, B, 16), act (1, H, W, B)."""
    _, h, w, b_types, _ = pose.shape
    k, s, c_types, p = layer.kernel, layer.stride, layer.out_types, layer.pose_size
    out_h, out_w = (h - k) // s + 1, (w - k) // s + 1
    weight = layer.weight.view(k, k, b_types, p, c_types, p)
    children = {(b, y, x): act[0, y, x, b] for b in range(b_types) for y in range(h) for x in range(w)}
    parents = {
        (c, oy, ox): (layer.beta_u[c], layer.beta_a[c])
        for c in range(c_types)
        for oy in range(out_h)
        for ox in range(out_w)
    }
    links, patch = [], []
    for oy in range(out_h):
        for ox in range(out_w):
            for ky in range(k):
                for kx in range(k):
                    for b in range(b_types):
                        y, x = oy * s + ky, ox * s + kx
                        m = pose[0, y, x, b].view(p, p)
                        for c in range(c_types):
                            vote = (m @ weight[ky, kx, b, :, c, :]).reshape(-1)
                            links.append(((b, y, x), (c, oy, ox), vote))
                            patch.append((oy, ox))
    if cross_position:

        def group_of(idx):
            return links[idx][0]
    else:

        def group_of(idx):
            return (links[idx][0], patch[idx])

    result = naive_em(children, parents, links, layer.settings, group_of)
    mu = torch.stack(
        [
            torch.stack(
                [torch.stack([result[(c, oy, ox)][0] for c in range(c_types)]) for ox in range(out_w)]
            )
            for oy in range(out_h)
        ]
    )
    a = torch.stack(
        [
            torch.stack(
                [torch.stack([result[(c, oy, ox)][1] for c in range(c_types)]) for ox in range(out_w)]
            )
            for oy in range(out_h)
        ]
    )
    return mu[None], a[None]


def naive_classcaps(layer: ClassCaps, pose, act, rows, cols):
    _, h, w, d_types, _ = pose.shape
    p, e = layer.pose_size, layer.out_types
    children = {(d, y, x): act[0, y, x, d] for d in range(d_types) for y in range(h) for x in range(w)}
    parents = {j: (layer.beta_u[j], layer.beta_a[j]) for j in range(e)}
    links = []
    for y in range(h):
        for x in range(w):
            for d in range(d_types):
                m = pose[0, y, x, d].view(p, p)
                for j in range(e):
                    vote = m @ layer.weight[d, :, j, :]
                    if layer.coord_add:
                        offset = torch.zeros(p, p, dtype=vote.dtype)
                        offset[0, p - 1] = rows[y]
                        offset[1, p - 1] = cols[x]
                        vote = vote + offset
                    links.append(((d, y, x), j, vote.reshape(-1)))
    result = naive_em(children, parents, links, layer.settings, lambda idx: links[idx][0])
    mu = torch.stack([result[j][0] for j in range(e)]).view(1, e, p, p)
    a = torch.stack([result[j][1] for j in range(e)]).view(1, e)
    return mu, a


def random_capsules(h, w, types, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    pose = (torch.randn(1, h, w, types, 16, generator=g, dtype=torch.float64) * scale).requires_grad_()
    act = torch.rand(1, h, w, types, generator=g, dtype=torch.float64).mul(0.9).add(0.05).requires_grad_()
    return pose, act


def randomise(layer, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.beta_u.copy_(torch.randn(layer.beta_u.shape, generator=g) * 0.5)
        layer.beta_a.copy_(torch.randn(layer.beta_a.shape, generator=g) * 0.5)
    return layer.double()


def grads(outputs, inputs):
    g = torch.Generator().manual_seed(7)
    total = sum((o * torch.randn(o.shape, generator=g, dtype=o.dtype)).sum() for o in outputs)
    return torch.autograd.grad(total, inputs)


# --------------------------------------------------------------------------- reference equality


@pytest.mark.parametrize("normalisation", ["cross_position", "per_patch"])
@pytest.mark.parametrize("impl", ["fast", "plain"])
def test_convcaps_equals_naive_reference_in_outputs_and_gradients(normalisation, impl):
    settings = RoutingSettings(iterations=3, final_lambda=0.5, lambda_decay=0.95, min_var=0.0005)
    layer = randomise(ConvCaps(2, 2, kernel=3, stride=1, settings=settings, normalisation=normalisation), 0)
    layer.impl = impl
    pose, act = random_capsules(4, 5, 2, seed=1)
    params = [pose, act, layer.weight, layer.beta_u, layer.beta_a]
    mu, a = layer(pose, act)
    ref_mu, ref_a = naive_convcaps(layer, pose, act, normalisation == "cross_position")
    torch.testing.assert_close(mu, ref_mu.view_as(mu), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a, ref_a, atol=1e-5, rtol=1e-5)
    for got, want in zip(grads([mu, a], params), grads([ref_mu.view_as(mu), ref_a], params)):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_convcaps_with_stride_two_equals_naive_reference():
    layer = randomise(ConvCaps(2, 3, kernel=3, stride=2, settings=SETTINGS), 3)
    pose, act = random_capsules(5, 5, 2, seed=4)
    mu, a = layer(pose, act)
    ref_mu, ref_a = naive_convcaps(layer, pose, act, True)
    torch.testing.assert_close(mu, ref_mu.view_as(mu), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a, ref_a, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("impl", ["fast", "plain"])
def test_class_capsules_with_coordinate_addition_equal_naive_reference(impl):
    settings = RoutingSettings(iterations=3, final_lambda=0.2, lambda_decay=0.95, min_var=0.0005)
    layer = randomise(ClassCaps(3, 4, settings=settings, coord_add=True), 5)
    layer.impl = impl
    pose, act = random_capsules(2, 3, 3, seed=6)
    rows = torch.tensor([-0.3, 0.2], dtype=torch.float64)
    cols = torch.tensor([-0.4, 0.0, 0.4], dtype=torch.float64)
    params = [pose, act, layer.weight, layer.beta_u, layer.beta_a]
    mu, a = layer(pose, act, rows, cols)
    ref_mu, ref_a = naive_classcaps(layer, pose, act, rows, cols)
    torch.testing.assert_close(mu, ref_mu, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a, ref_a, atol=1e-5, rtol=1e-5)
    for got, want in zip(grads([mu, a], params), grads([ref_mu, ref_a], params)):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_coordinate_addition_changes_only_the_right_hand_column():
    # One iteration: the means are fixed-weight averages of the votes, so only the
    # vote entries that coordinate addition touches can move.
    layer = randomise(ClassCaps(2, 3, settings=RoutingSettings(iterations=1), coord_add=False), 8)
    pose, act = random_capsules(2, 2, 2, seed=9)
    rows = torch.tensor([-0.25, 0.25], dtype=torch.float64)
    cols = torch.tensor([-0.25, 0.25], dtype=torch.float64)
    mu_off, _ = layer(pose, act, rows, cols)
    layer.coord_add = True
    mu_on, _ = layer(pose, act, rows, cols)
    diff = (mu_on - mu_off).abs().amax(dim=(0, 1))  # (4, 4)
    changed = diff > 1e-9
    assert changed[0, 3] and changed[1, 3]
    changed[0, 3] = changed[1, 3] = False
    assert not changed.any()


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_fast_path_equals_plain_path_in_float64_for_outputs_and_gradients(compiled):
    routing.use_compiled_kernels(compiled)
    try:
        _compare_fast_and_plain_routing()
    finally:
        routing.use_compiled_kernels(False)


def _compare_fast_and_plain_routing():
    g = torch.Generator().manual_seed(11)
    fold = ChildFold(5, 5, 3, 1, types=3)
    votes = torch.randn(2, 9, 4, 27, 16, generator=g, dtype=torch.float64, requires_grad=True)
    act = torch.rand(2, 9, 27, generator=g, dtype=torch.float64, requires_grad=True)
    beta_u = torch.randn(4, generator=g, dtype=torch.float64, requires_grad=True)
    beta_a = torch.randn(4, generator=g, dtype=torch.float64, requires_grad=True)
    inputs = [votes, act, beta_u, beta_a]
    settings = RoutingSettings(iterations=4, final_lambda=0.3)
    for f in (fold, None):
        fast = em_routing(votes, act, beta_u, beta_a, settings, f, impl="fast")
        plain = em_routing(votes, act, beta_u, beta_a, settings, f, impl="plain")
        torch.testing.assert_close(fast.pose, plain.pose, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(fast.activation, plain.activation, atol=1e-5, rtol=1e-5)
        got = grads([fast.pose, fast.activation], inputs)
        want = grads([plain.pose, plain.activation], inputs)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("traced", [False, True], ids=["hand-written", "autograd"])
def test_gradients_where_inactive_children_leave_a_parent_with_no_spread_match_the_plain_path(traced):
    """Three of six children inactive: from the third iteration on, a parent's weight can sit on
    one child, whose spread is 0. Its variance, computed as E[V^2] - mu^2, then rounds a hair
    below 0, where it is clamped; the gradient must still pass, as the derivative of the plain
    two-pass variance does (masked, it was 3.44 where it is 11.74). The gradient that torch's
    autograd takes through the batched path, as when exporting, must agree too."""
    g = torch.Generator().manual_seed(1)
    votes = torch.randn(1, 1, 3, 6, 16, generator=g, dtype=torch.float64)
    act = torch.rand(1, 1, 6, generator=g, dtype=torch.float64)
    act[..., :3] = 0.0
    beta_u, beta_a = (
        0.5 * torch.randn(3, generator=g, dtype=torch.float64),
        torch.randn(3, dtype=torch.float64),
    )
    weights = torch.randn(1, 1, 3, generator=g, dtype=torch.float64)
    settings = RoutingSettings(iterations=3)

    def activation_grad(impl: str) -> torch.Tensor:
        leaf = act.clone().requires_grad_()
        (em_routing(votes, leaf, beta_u, beta_a, settings, impl=impl).activation * weights).sum().backward()
        return leaf.grad

    want = activation_grad("plain")
    if traced:
        from unittest import mock

        with mock.patch.object(torch.compiler, "is_compiling", return_value=True):
            got = activation_grad("fast")
    else:
        got = activation_grad("fast")
    torch.testing.assert_close(got, want, atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("view", ["broadcast", "sliced", "permuted"])
def test_fast_path_gradients_for_votes_that_are_views_of_other_tensors(view):
    g = torch.Generator().manual_seed(17)
    act = torch.rand(3, 1, 6, generator=g, dtype=torch.float64)
    zeros = torch.zeros(2, dtype=torch.float64)
    if view == "broadcast":  # one sample's votes for the whole batch: stride 0
        base = torch.randn(1, 1, 2, 6, 16, generator=g, dtype=torch.float64, requires_grad=True)
        make = lambda: base.expand(3, -1, -1, -1, -1)
    elif view == "sliced":  # every other pose element: gaps between elements
        base = torch.randn(3, 1, 2, 6, 32, generator=g, dtype=torch.float64, requires_grad=True)
        make = lambda: base[..., ::2]
    else:  # dense, in another order
        base = torch.randn(6, 2, 1, 3, 16, generator=g, dtype=torch.float64, requires_grad=True)
        make = lambda: base.permute(3, 2, 1, 0, 4)
    results = {}
    for impl in ("fast", "plain"):
        out = em_routing(make(), act, zeros, zeros, RoutingSettings(iterations=3), impl=impl)
        (grad,) = torch.autograd.grad((out.pose.square().sum() + out.activation.sum()), base)
        results[impl] = (out.pose, grad)
    torch.testing.assert_close(results["fast"][0], results["plain"][0], atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(results["fast"][1], results["plain"][1], atol=1e-9, rtol=1e-9)


# --------------------------------------------------------------------------- properties


def final_assignments(votes, act, beta_u, beta_a, fold, settings):
    """Runs the routing with stats and recovers r via the stats' entropy inputs."""

    captured = {}
    original = routing.routing_stats

    def capture(r, a, var, f):
        captured["r"] = r
        return original(r, a, var, f)

    routing.routing_stats = capture
    try:
        em_routing(votes, act, beta_u, beta_a, settings, fold, stats=True)
    finally:
        routing.routing_stats = original
    return captured["r"]


@pytest.mark.parametrize("iterations", [1, 3, 5])
def test_every_childs_assignments_sum_to_one_over_all_parents_it_feeds(iterations):
    g = torch.Generator().manual_seed(12)
    b_types, c_types = 3, 4
    fold = ChildFold(6, 7, 3, 2, types=b_types)
    positions = fold.positions
    votes = torch.randn(2, positions, c_types, 9 * b_types, 16, generator=g)
    act = torch.rand(2, positions, 9 * b_types, generator=g)
    zeros = torch.zeros(c_types)
    r = final_assignments(votes, act, zeros, zeros, fold, RoutingSettings(iterations=iterations))
    per_child = fold.sum(r.sum(dim=2))  # (N, L, I) total over every parent of the slot's child
    torch.testing.assert_close(per_child, torch.ones_like(per_child), atol=1e-5, rtol=1e-5)
    if iterations == 1:  # initial assignments: 1 / number of parents fed, fewer at the borders
        # patches of 3x3, stride 2 on the 6x7 grid: 2x3 positions; count each child's patches by hand
        patches = {}
        for py, px, ky, kx in itertools.product(range(2), range(3), range(3), range(3)):
            child = (2 * py + ky, 2 * px + kx)
            patches[child] = patches.get(child, 0) + 1
        counts = torch.tensor(
            [
                [patches[2 * (position // 3) + k // 3, 2 * (position % 3) + k % 3] * c_types] * b_types
                for position in range(6)
                for k in range(9)
            ]
        ).reshape(6, 9 * b_types)  # slot k * B + b: kernel offset k (row-major), child type b
        torch.testing.assert_close(r[0, :, 0, :], 1.0 / counts)
        assert counts.min() == c_types and counts.max() == 4 * c_types


def test_the_logged_entropy_counts_each_child_once_over_all_the_parents_it_feeds():
    g = torch.Generator().manual_seed(5)
    b_types, c_types = 2, 3
    fold = ChildFold(5, 5, 3, 1, types=b_types)  # the centre child sits in 9 patches, a corner one in 1
    votes = torch.randn(1, fold.positions, c_types, 9 * b_types, 16, generator=g, dtype=torch.float64)
    act = torch.rand(1, fold.positions, 9 * b_types, generator=g, dtype=torch.float64)
    zeros = torch.zeros(c_types, dtype=torch.float64)
    out = em_routing(votes, act, zeros, zeros, RoutingSettings(iterations=2), fold, stats=True)
    r = final_assignments(votes, act, zeros, zeros, fold, RoutingSettings(iterations=2))[0]  # (L, C, I)
    # each child's assignments, gathered slot by slot with loops
    shares: dict[tuple[int, int], list[float]] = {}
    for position in range(fold.positions):
        for k in range(9):
            for b in range(b_types):
                child = (b, int(fold.index[position, k]))
                shares.setdefault(child, []).extend(r[position, :, k * b_types + b].tolist())
    assert len(shares) == 25 * b_types
    expected = []
    for values in shares.values():
        p = torch.tensor(values, dtype=torch.float64)
        expected.append(float(-(p * p.log()).sum() / math.log(len(values))) if len(values) > 1 else 0.0)
    assert out.stats["entropy"].item() == pytest.approx(sum(expected) / len(expected), rel=1e-9)


@pytest.mark.parametrize("grad", [False, True])
def test_assignment_softmax_matches_float64_for_logits_hundreds_apart(grad):
    """Logits far apart (exponents far below float32's range) still give the exact softmax.

    The exponent is floored at -80 to keep torch.exp off its slow underflow path; the
    assignments this changes are below 1e-34, and the in-place (no autograd) and
    differentiable branches agree.
    """
    g = torch.Generator().manual_seed(21)
    fold = ChildFold(7, 7, 3, 2, types=4)
    logits = 400.0 * torch.randn(3, fold.positions, 5, 9 * 4, generator=g)
    logits.requires_grad_(grad)
    r = routing.normalise_assignments(logits, fold)
    # float64 reference: for each child, a softmax over every (slot, parent type) it feeds
    ref = torch.zeros(logits.shape, dtype=torch.float64)
    child = fold._child.view(fold.positions, -1)  # (L, I) child id of each slot
    x = logits.detach().double()
    for n in range(x.shape[0]):
        for c in child.unique():
            slots = (child == c).nonzero()
            vals = x[n, slots[:, 0], :, slots[:, 1]]  # (slots, C)
            ref[n, slots[:, 0], :, slots[:, 1]] = torch.softmax(vals.reshape(-1), 0).view_as(vals)
    assert (x - x.amax(dim=2, keepdim=True)).min() < -1000  # far below float32's exp range
    torch.testing.assert_close(r.detach().double(), ref, atol=1e-6, rtol=1e-5)
    if grad:
        r.sum().backward()
        assert torch.isfinite(logits.grad).all()


def test_per_patch_assignments_sum_to_one_within_each_patch():
    g = torch.Generator().manual_seed(13)
    votes = torch.randn(2, 4, 3, 18, 16, generator=g)
    act = torch.rand(2, 4, 18, generator=g)
    r = final_assignments(votes, act, torch.zeros(3), torch.zeros(3), None, SETTINGS)
    torch.testing.assert_close(r.sum(dim=2), torch.ones(2, 4, 18))


@pytest.mark.parametrize("iterations", [3, 5])
@pytest.mark.parametrize("case", ["huge_votes", "tiny_votes", "all_zero_activations", "single_active_child"])
@pytest.mark.parametrize("impl", ["fast", "plain"])
def test_routing_stays_finite_with_extreme_inputs(iterations, case, impl):
    g = torch.Generator().manual_seed(14)
    fold = ChildFold(5, 5, 3, 1, types=2)
    votes = torch.randn(2, 9, 3, 18, 16, generator=g)
    act = torch.rand(2, 9, 18, generator=g)
    if case == "huge_votes":
        votes = votes * 1e4
    elif case == "tiny_votes":
        votes = votes * 1e-6
    elif case == "all_zero_activations":
        act = torch.zeros_like(act)
    else:
        act = torch.zeros_like(act)
        act[:, 4, 0] = 1.0
    votes.requires_grad_()
    act.requires_grad_()
    beta_u = torch.zeros(3, requires_grad=True)
    beta_a = torch.zeros(3, requires_grad=True)
    settings = RoutingSettings(iterations=iterations)
    out = em_routing(votes, act, beta_u, beta_a, settings, fold, impl=impl)
    assert torch.isfinite(out.pose).all() and torch.isfinite(out.activation).all()
    assert ((out.activation > 0) & (out.activation < 1)).all()
    (out.pose.sum() + out.activation.sum()).backward()
    for t in (votes, act, beta_u, beta_a):
        assert torch.isfinite(t.grad).all()


@pytest.mark.parametrize("recompute_votes", [False, True])
def test_gradcheck_of_a_small_convcaps_layer_in_float64(recompute_votes):
    settings = RoutingSettings(iterations=3, final_lambda=0.5)
    layer = ConvCaps(2, 2, kernel=2, stride=1, settings=settings, recompute_votes=recompute_votes)
    layer = randomise(layer, 15)
    pose, act = random_capsules(3, 3, 2, seed=16)

    def f(pose, act, weight):
        params = {"weight": weight, "beta_u": layer.beta_u, "beta_a": layer.beta_a}
        return torch.func.functional_call(layer, params, (pose, act))

    weight = layer.weight.detach().clone().requires_grad_()
    assert torch.autograd.gradcheck(f, (pose, act, weight), eps=1e-6, atol=1e-5)


def test_inverse_temperature_follows_the_schedule():
    lam = inverse_temperatures(RoutingSettings(iterations=3, final_lambda=0.01, lambda_decay=0.95))
    assert lam == pytest.approx([0.01 * (1 - 0.95 ** (t + 1)) for t in range(3)])


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_routing_runs_in_float32_under_bf16_autocast(compiled):
    layer = ConvCaps(2, 2, kernel=3, stride=1)
    pose = torch.randn(2, 4, 4, 2, 16).bfloat16().requires_grad_()
    act = torch.rand(2, 4, 4, 2).bfloat16()
    routing.use_compiled_kernels(compiled)
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mu, a = layer(pose, act)
        (mu.sum() + a.sum()).backward()
    finally:
        routing.use_compiled_kernels(False)
    assert mu.dtype == torch.float32 and a.dtype == torch.float32
    assert torch.isfinite(mu).all() and torch.isfinite(pose.grad).all()


@pytest.mark.parametrize("chunk_bytes", [1, 1 << 30])
def test_fast_routing_gives_the_same_result_in_any_chunking_of_the_batch(chunk_bytes, monkeypatch):
    from capsnet import routing

    settings = RoutingSettings(iterations=3, final_lambda=0.5)
    # Seeded here: with other draws of the weights a parent can end with no assigned mass
    # (sum_i R_ij below RSUM_FLOOR), whose pose mean is arbitrary in both implementations.
    torch.manual_seed(21)
    layer = randomise(ConvCaps(2, 3, kernel=2, stride=1, settings=settings), 21).double()
    pose, act = random_capsules(4, 3, 2, seed=22)
    g = torch.Generator().manual_seed(23)
    pose = pose.detach().repeat(3, 1, 1, 1, 1) + 0.3 * torch.randn(
        3, 4, 3, 2, 16, generator=g, dtype=torch.float64
    )
    act = act.detach().repeat(3, 1, 1, 1).mul(torch.rand(3, 4, 3, 2, generator=g, dtype=torch.float64))
    layer.impl = "plain"
    want = layer(pose, act)
    layer.impl = "fast"
    monkeypatch.setattr(routing, "CHUNK_BYTES", chunk_bytes)  # one sample per chunk, or the whole batch
    monkeypatch.setattr(routing, "INFERENCE_CHUNK_BYTES", chunk_bytes)
    original, chunkings = routing._sample_chunks, []

    def spy(geom, like, inference=False, fused=False):
        chunkings.append(original(geom, like, inference, fused))
        return chunkings[-1]

    monkeypatch.setattr(routing, "_sample_chunks", spy)
    params = [layer.weight, layer.beta_u, layer.beta_a]
    got = layer(pose, act)
    # the batch of 3 was routed one sample at a time, or in one piece
    split = [(0, 1), (1, 2), (2, 3)] if chunk_bytes == 1 else [(0, 3)]
    assert chunkings and all(c == split for c in chunkings), chunkings
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-9, rtol=1e-7)
    grads_got = torch.autograd.grad(got[0].sum() + got[1].sum(), params)
    layer.impl = "plain"
    want = layer(pose, act)
    grads_want = torch.autograd.grad(want[0].sum() + want[1].sum(), params)
    for g, w in zip(grads_got, grads_want):
        torch.testing.assert_close(g, w, atol=1e-9, rtol=1e-7)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fast_routing_on_cuda_matches_the_cpu_result():
    settings = RoutingSettings(iterations=3, final_lambda=0.5)
    layer = randomise(ConvCaps(2, 3, kernel=2, stride=1, settings=settings), 31)
    pose, act = random_capsules(4, 3, 2, seed=32)
    want = layer(pose, act)
    want_grads = torch.autograd.grad(want[0].sum() + want[1].sum(), [layer.weight, pose, act])
    layer.cuda()
    pose_gpu, act_gpu = pose.detach().cuda().requires_grad_(), act.detach().cuda().requires_grad_()
    got = layer(pose_gpu, act_gpu)
    got_grads = torch.autograd.grad(got[0].sum() + got[1].sum(), [layer.weight, pose_gpu, act_gpu])
    for g, w in zip([*got, *got_grads], [*want, *want_grads]):
        torch.testing.assert_close(g.cpu(), w, atol=1e-8, rtol=1e-6)


# --------------------------------------------------------------------------- compiled contractions


@pytest.fixture
def compiled_routing():
    routing.use_compiled_kernels(True)
    try:
        yield
    finally:
        routing.use_compiled_kernels(False)


def _layer_outputs_and_grads(layer, pose, act):
    out = layer(pose, act)
    params = [layer.weight, layer.beta_u, layer.beta_a]
    return [*out, *grads(list(out), [*params, pose, act])]


@pytest.mark.parametrize("recompute_votes", [False, True])
def test_compiled_contractions_equal_the_eager_ones_in_float64(recompute_votes, monkeypatch):
    settings = RoutingSettings(iterations=3, final_lambda=0.5)
    layer = randomise(ConvCaps(2, 3, kernel=2, stride=1, settings=settings), 41).double()
    layer.recompute_votes = recompute_votes
    g = torch.Generator().manual_seed(42)
    pose = (0.5 * torch.randn(3, 4, 3, 2, 16, generator=g, dtype=torch.float64)).requires_grad_()
    act = torch.rand(3, 4, 3, 2, generator=g, dtype=torch.float64).requires_grad_()
    # Two samples per chunk: chunks of 2 and 1 samples, two shapes for the compiled kernels.
    per_sample = 2 * 6 * 3 * 8 * 16 * 8  # [V - s, (V - s)^2] of one sample in bytes
    monkeypatch.setattr(routing, "CHUNK_BYTES", 2 * per_sample)
    monkeypatch.setattr(routing, "FUSED_CHUNK_BYTES", 2 * per_sample)
    monkeypatch.setattr(routing, "INFERENCE_CHUNK_BYTES", 2 * per_sample)
    want = _layer_outputs_and_grads(layer, pose, act)
    with torch.no_grad():
        want_infer = layer(pose, act)
    monkeypatch.setattr(routing, "CHUNK_BYTES", 1 << 30)  # eager training chunks do not apply
    original, training_chunks = routing._sample_chunks, []

    def spy(geom, like, inference=False, fused=False):
        chunks = original(geom, like, inference, fused)
        if not inference:
            training_chunks.append(chunks)
        return chunks

    monkeypatch.setattr(routing, "_sample_chunks", spy)
    routing.use_compiled_kernels(True)
    try:
        got = _layer_outputs_and_grads(layer, pose, act)
        with torch.no_grad():
            got_infer = layer(pose, act)
    finally:
        routing.use_compiled_kernels(False)
    assert not routing.compiled_kernels_enabled()
    assert training_chunks and all(c == [(0, 2), (2, 3)] for c in training_chunks)
    for a, b in zip([*got, *got_infer], [*want, *want_infer]):
        torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-7)


def test_a_compiler_that_fails_is_one_clear_error(compiled_routing, monkeypatch):
    monkeypatch.setattr(routing, "_kernel", broken_compiler)
    routing._check_kernels.cache_clear()
    try:
        g = torch.Generator().manual_seed(61)
        votes = torch.randn(1, 4, 2, 3, 16, generator=g)
        act = torch.rand(1, 4, 3, generator=g)
        with pytest.raises(routing.KernelCompileError, match="C\\+\\+ compiler.*compile_routing: false"):
            em_routing(votes, act, torch.zeros(2), torch.zeros(2), RoutingSettings(iterations=2), None)
    finally:
        routing._check_kernels.cache_clear()


def test_routing_without_autograd_takes_larger_chunks_except_within_training_chunks(monkeypatch):
    monkeypatch.setattr(routing, "CHUNK_BYTES", 4 << 10)
    monkeypatch.setattr(routing, "INFERENCE_CHUNK_BYTES", 64 << 10)
    geom = (10, 4, 2, 8, 16)  # one sample's [V - s, (V - s)^2]: 2 * 4 * 2 * 8 * 16 * 4 bytes = 8 KiB
    like = torch.zeros(1)
    assert routing._sample_chunks(geom, like) == [(i, i + 1) for i in range(10)]
    assert routing._sample_chunks(geom, like, inference=True) == [(0, 8), (8, 10)]
    with routing.training_chunks():
        assert routing._sample_chunks(geom, like, inference=True) == [(i, i + 1) for i in range(10)]
    assert routing._sample_chunks(geom, like, inference=True) == [(0, 8), (8, 10)]


def test_compiled_contractions_train_in_their_own_chunk_size(monkeypatch):
    monkeypatch.setattr(routing, "CHUNK_BYTES", 4 << 10)
    monkeypatch.setattr(routing, "FUSED_CHUNK_BYTES", 24 << 10)
    monkeypatch.setattr(routing, "INFERENCE_CHUNK_BYTES", 64 << 10)
    geom = (10, 4, 2, 8, 16)  # 8 KiB of [V - s, (V - s)^2] per sample
    like = torch.zeros(1)
    assert routing._sample_chunks(geom, like, fused=True) == [(0, 3), (3, 6), (6, 9), (9, 10)]
    assert routing._sample_chunks(geom, like, fused=False) == [(i, i + 1) for i in range(10)]
    assert routing._sample_chunks(geom, like, inference=True, fused=True) == [(0, 8), (8, 10)]
    with routing.training_chunks():
        assert routing._sample_chunks(geom, like, inference=True, fused=True) == [
            (0, 3),
            (3, 6),
            (6, 9),
            (9, 10),
        ]


def test_compiled_kernels_keep_working_across_many_dtypes_and_shapes():
    # Sizes of 1 and each dtype get their own compilation: 16 of them, beyond dynamo's default limit of 8.
    for dtype in (torch.float32, torch.float64):
        for b, i, h in itertools.product((1, 3), (1, 5), (1, 4)):
            g = torch.Generator().manual_seed(b * 100 + i * 10 + h)
            w = torch.rand(b, i, generator=g).to(dtype)
            d = torch.randn(b, i, h, generator=g).to(dtype)
            got = routing._weighted_moments(w, d, fused=True)
            want = torch.cat([(w[..., None] * d).sum(1), (w[..., None] * d * d).sum(1)], dim=-1)
            torch.testing.assert_close(got, want)


def _far_inactive_votes(kind, samples=2, scale=1000.0):
    """Votes where active children agree closely and inactive ones vote ``scale`` units away.

    Returns (votes for em_routing, the same votes as a float64 tensor, activations).
    Centring on the plain mean of all votes would leave the active children's
    spread (about 0.03) as the difference of two squares near ``scale``^2 in
    float32, with no correct digit left.
    """
    g = torch.Generator().manual_seed(23)
    children, types, p = 8, 2, 4
    active = torch.arange(children) < children // 2
    act = torch.where(active, 1.0, 0.0).expand(samples, 1, children).contiguous()
    if kind == "tensor":
        v = 0.03 * torch.randn(samples, 1, types, children, p * p, generator=g) + 2.0
        v[:, :, :, ~active] = -scale
        return v, v.double(), act
    # V_ij = M_i W_ij: identity-like W, poses of inactive children scaled far out.
    poses = 2.0 + 0.03 * torch.randn(children, samples * p, p, generator=g)
    poses[~active] = -scale
    weight = torch.eye(p).repeat(1, types).expand(children, p, types * p).contiguous()
    product = routing.VoteProduct(poses, weight, (samples, 1, types, p))
    return product, product.compute().double(), act


@pytest.mark.parametrize("kind", ["tensor", "product"])
@pytest.mark.parametrize("path", ["inference", "training", "compiled-kernels", "traced"])
def test_fast_routing_keeps_float32_precision_when_inactive_children_vote_far_away(kind, path, monkeypatch):
    votes, exact_votes, act = _far_inactive_votes(kind)
    zeros = torch.zeros(2)
    settings = RoutingSettings(iterations=2)
    want = em_routing(exact_votes, act.double(), zeros.double(), zeros.double(), settings, impl="plain")
    if path == "traced":  # the whole-batch operations that torch.compile and export see
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    routing.use_compiled_kernels(path == "compiled-kernels")
    try:
        if path == "inference":
            with torch.no_grad():
                got = em_routing(votes, act, zeros, zeros, settings, impl="fast")
        else:
            beta_u = zeros.clone().requires_grad_()
            got = em_routing(votes, act, beta_u, zeros, settings, impl="fast")
            (g_beta_u,) = torch.autograd.grad(got.activation.sum(), beta_u)
            assert torch.isfinite(g_beta_u).all()
    finally:
        routing.use_compiled_kernels(False)
    # The activation depends on ln(variance): 0.03^2 against about 1 for plain-mean centring.
    torch.testing.assert_close(got.activation.double(), want.activation, atol=2e-4, rtol=0)
    torch.testing.assert_close(got.pose.double(), want.pose, atol=1e-4, rtol=1e-6)


@pytest.mark.parametrize("kind", ["tensor", "product"])
def test_fast_and_plain_routing_agree_where_every_child_is_inactive(kind):
    votes, _, act = _far_inactive_votes(kind, scale=5.0)
    act = act.clone()
    act[0] = 0.0  # the first sample's children are all off; the second's half on
    zeros = torch.zeros(2)
    settings = RoutingSettings(iterations=3)
    fast = em_routing(votes, act, zeros, zeros, settings, impl="fast")
    plain = em_routing(votes, act, zeros, zeros, settings, impl="plain")
    assert torch.equal(fast.pose[0], torch.zeros_like(fast.pose[0]))
    torch.testing.assert_close(fast.pose, plain.pose, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fast.activation, plain.activation, atol=1e-6, rtol=1e-6)


def test_fast_routing_takes_child_activations_in_any_layout():
    g = torch.Generator().manual_seed(8)
    n, positions, types, children, p = 2, 3, 2, 5, 4
    poses = torch.randn(children, n * positions * p, p, generator=g)
    weight = torch.randn(children, p, types * p, generator=g)
    votes = routing.VoteProduct(poses, weight, (n, positions, types, p))
    act = torch.rand(n, positions, children, generator=g)
    strided = act.transpose(1, 2).contiguous().transpose(1, 2)  # the same values, other strides
    assert not strided.is_contiguous()
    zeros = torch.zeros(types)
    got = em_routing(votes, strided, zeros, zeros, RoutingSettings(iterations=2))
    want = em_routing(votes, act, zeros, zeros, RoutingSettings(iterations=2))
    torch.testing.assert_close(got.pose, want.pose, rtol=0, atol=0)


def test_a_recomputing_backward_under_autocast_rebuilds_the_forwards_moments_exactly():
    results = []
    for recompute in (False, True):
        torch.manual_seed(5)
        layer = randomise(
            ConvCaps(2, 3, kernel=2, stride=1, settings=RoutingSettings(iterations=2)), 5
        ).float()
        layer.recompute_votes = recompute
        g = torch.Generator().manual_seed(6)
        pose = torch.randn(2, 3, 3, 2, 16, generator=g).requires_grad_()
        act = torch.rand(2, 3, 3, 2, generator=g).requires_grad_()
        out_pose, out_act = layer(pose, act)
        loss = out_pose.square().sum() + out_act.sum()
        with torch.autocast("cpu", dtype=torch.bfloat16):  # where a caller runs backward
            results.append(torch.autograd.grad(loss, [pose, act, layer.weight]))
    for kept, rebuilt in zip(*results):
        torch.testing.assert_close(rebuilt, kept, rtol=0, atol=0)


def test_em_routing_names_betas_of_the_wrong_shape_an_empty_batch_and_a_fold_of_other_votes():
    votes, act = torch.rand(2, 3, 4, 5, 16), torch.rand(2, 3, 5)
    for impl in ("fast", "plain"):
        with pytest.raises(ValueError, match=r"beta_u and beta_a must be \(4,\).*got \(3,\) and \(4,\)"):
            em_routing(votes, act, torch.zeros(3), torch.zeros(4), RoutingSettings(), impl=impl)
        with pytest.raises(ValueError, match=r"the batch is empty \(N = 0\)"):
            em_routing(votes[:0], act[:0], torch.zeros(4), torch.zeros(4), RoutingSettings(), impl=impl)
        fold = ChildFold(5, 5, 3, 1, types=2)  # 9 positions of 18 slots, for votes of 3 of 5
        with pytest.raises(
            ValueError, match="fold is for 9 parent positions of 18 child slots each, but the votes"
        ):
            em_routing(votes, act, torch.zeros(4), torch.zeros(4), RoutingSettings(), fold, impl=impl)
    with pytest.raises(ValueError, match="iterations must be a whole number of at least 1"):
        RoutingSettings(iterations=0)


def _model_gradients(
    impl: str,
    dtype: torch.dtype,
    scale: float,
    compiled: bool = False,
    grad: bool = True,
    recompute: bool = True,
):
    """Class activations and parameter gradients (``grad``) of a small model without batch norm
    on a constant image."""
    from capsnet.model import CapsNet

    torch.manual_seed(0)
    model = CapsNet(
        in_channels=1,
        num_classes=4,
        image_size=20,
        stem_channels=[8],
        primary_types=4,
        caps_types=[4, 4],
        caps_strides=[2, 1],
        iterations=3,
        batch_norm=False,
        decoder=False,
        recompute_votes=recompute,
    ).to(dtype)
    for module in model.modules():
        if hasattr(module, "impl"):
            module.impl = impl
    routing.use_compiled_kernels(compiled)
    try:
        with torch.set_grad_enabled(grad):
            out = model(torch.full((2, 1, 20, 20), scale, dtype=dtype))
        if not grad:
            return out.activations.double(), None
        out.activations.sum().backward()
    finally:
        routing.use_compiled_kernels(False)
    grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    return out.activations.detach().double(), grads.double()


@pytest.mark.parametrize("path", ["eager", "kept-votes", "compiled", "inference"])
def test_fast_routing_stays_exact_where_parents_sit_far_from_the_votes_centre(path):
    """Without batch norm, an image of 1e4 gives votes in the thousands whose parents settle on
    tight clusters far from the centre of the votes, where E[V^2] - mu^2 and the E-step's
    expanded quadratic lose every digit in float32. The fast path's gradients were 27% off
    (relative norm against float64); it now routes such chunks by the plain path."""
    act64, want = _model_gradients("plain", torch.float64, 1e4)
    act, got = _model_gradients(
        "fast",
        torch.float32,
        1e4,
        path == "compiled",
        grad=path != "inference",
        recompute=path != "kept-votes",
    )
    torch.testing.assert_close(act, act64, atol=1e-5, rtol=0)
    if got is not None:
        assert ((got - want).norm() / want.norm()).item() < 1e-3


def test_fast_and_plain_routing_give_one_pose_to_a_parent_every_child_rejects():
    """Votes for class 0 agree closely, those for the others do not: after three iterations the
    others get sum_i R_ij below RSUM_FLOOR. The plain path's pose for them is sum_i R_ij V_ij /
    RSUM_FLOOR, near 0; the fast path's was the centre of the votes, 4 to 15 units away."""
    g = torch.Generator().manual_seed(3)
    votes = torch.randn(2, 1, 5, 64, 16, generator=g)
    votes[:, :, 0] = 1.0 + 0.05 * torch.randn(2, 1, 64, 16, generator=g)
    votes = (votes + 4.0).requires_grad_()
    act = torch.rand(2, 1, 64, generator=g).requires_grad_()
    beta_u, beta_a = torch.zeros(5, requires_grad=True), torch.zeros(5, requires_grad=True)
    inputs = [votes, act, beta_u, beta_a]
    exact = em_routing(votes.double(), act.double(), beta_u.double(), beta_a.double(), SETTINGS, impl="plain")
    plain = em_routing(*inputs, SETTINGS, impl="plain")
    fast = em_routing(*inputs, SETTINGS, impl="fast")
    assert exact.pose[:, :, 1:].abs().max() < 1e-3  # the case at hand: rejected parents, poses near 0
    torch.testing.assert_close(fast.pose.double(), exact.pose, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fast.activation.double(), exact.activation, atol=1e-6, rtol=0)
    for a, b in zip(
        grads([fast.pose, fast.activation], inputs), grads([plain.pose, plain.activation], inputs)
    ):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b)


def _rejecting_votes():
    """Votes for class 0 that agree closely, for the others not: those get sum_i R_ij below RSUM_FLOOR."""
    g = torch.Generator().manual_seed(3)
    votes = torch.randn(3, 1, 5, 64, 16, generator=g)
    votes[:, :, 0] = 1.0 + 0.05 * torch.randn(3, 1, 64, 16, generator=g)
    return (votes + 4.0).requires_grad_(), torch.rand(3, 1, 64, generator=g).requires_grad_()


def test_a_chunk_that_falls_back_is_routed_by_the_plain_path_in_pieces_of_the_training_chunk_size(
    monkeypatch,
):
    """On a GPU a chunk may be the whole batch, and the plain path's temporaries are many times
    its votes: the fallback takes CHUNK_BYTES of samples at a time, forward and backward."""
    votes, act = _rejecting_votes()
    beta_u, beta_a = torch.zeros(5, requires_grad=True), torch.zeros(5, requires_grad=True)
    inputs = [votes, act, beta_u, beta_a]
    plain = em_routing(*inputs, SETTINGS, impl="plain")
    want = grads([plain.pose, plain.activation], inputs)
    calls = []
    real = routing._plain_iterations

    def counted(votes, *args, **kwargs):
        calls.append(votes.shape[0])
        return real(votes, *args, **kwargs)

    monkeypatch.setattr(routing, "_plain_iterations", counted)
    monkeypatch.setattr(routing, "_sample_chunks", lambda geom, *a, **k: [(0, geom[0])])  # one chunk
    monkeypatch.setattr(routing, "CHUNK_BYTES", 1)  # the plain path's pieces: one sample each
    fast = em_routing(*inputs, SETTINGS, impl="fast")
    got = grads([fast.pose, fast.activation], inputs)
    assert calls == [1, 1, 1] * 2  # forward, then backward
    torch.testing.assert_close(fast.pose, plain.pose)
    torch.testing.assert_close(fast.activation, plain.activation)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


def test_a_chunk_that_falls_back_differentiates_in_the_forwards_dtype_under_autocast(monkeypatch):
    """The plain path's backward rebuilds a product's votes; under a bf16 autocast it took that
    product in bf16, and the gradients were 0.5-2% off those of a backward outside autocast."""
    g = torch.Generator().manual_seed(4)
    children, types, p = 64, 5, 4
    # every child's vote for parent type 0 (W = identity) agrees closely: the others are rejected
    poses = torch.randn(1, 2 * p, p, generator=g) + 0.05 * torch.randn(children, 2 * p, p, generator=g)
    weight = torch.randn(children, p, types * p, generator=g)
    weight[:, :, :p] = torch.eye(p)
    inputs = [poses.requires_grad_(), weight.requires_grad_(), torch.rand(2, 1, children, generator=g)]
    inputs[2].requires_grad_()
    beta = torch.zeros(types)
    calls = []
    real = routing._plain_iterations
    monkeypatch.setattr(routing, "_plain_iterations", lambda *a, **k: calls.append(1) or real(*a, **k))
    results = []
    for autocast in (False, True):
        product = routing.VoteProduct(poses, weight, (2, 1, types, p))
        out = em_routing(product, inputs[2], beta, beta, SETTINGS)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            results.append(grads([out.pose, out.activation], inputs))
    assert len(calls) == 4  # each forward and backward by the plain path
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_fast_routing_of_ordinary_votes_does_not_fall_back_to_the_plain_path(monkeypatch):
    calls = []
    monkeypatch.setattr(routing, "_plain_iterations", lambda *a, **k: calls.append(1))
    g = torch.Generator().manual_seed(11)
    fold = ChildFold(5, 5, 3, 1, types=3)
    votes = torch.randn(2, 9, 4, 27, 16, generator=g, requires_grad=True)
    act = torch.rand(2, 9, 27, generator=g, requires_grad=True)
    beta_u, beta_a = torch.randn(4, generator=g), torch.randn(4, generator=g)
    for f in (fold, None):
        out = em_routing(votes, act, beta_u, beta_a, RoutingSettings(iterations=3), f, impl="fast")
        grads([out.pose, out.activation], [votes, act])
    assert not calls


@pytest.mark.parametrize("impl", ["plain", "fast"])
@pytest.mark.parametrize("cross_position", [True, False])
def test_the_logged_variance_is_the_mean_of_the_last_iterations_parent_variances(impl, cross_position):
    """routing/<layer>/variance: the mean over parents, types and pose entries of the final M-step's
    variance, floor included, as the plain path's trace of that M-step gives it."""
    g = torch.Generator().manual_seed(5)
    fold = ChildFold(5, 5, 3, 1, types=3) if cross_position else None
    votes = 0.5 * torch.randn(2, 9, 4, 27, 16, generator=g)
    act = torch.rand(2, 9, 27, generator=g)
    beta_u, beta_a = torch.randn(4, generator=g), torch.randn(4, generator=g)
    settings = RoutingSettings(iterations=3)
    trace: list = []
    em_routing(votes, act, beta_u, beta_a, settings, fold, trace=trace)
    final = trace[-1]["var"]
    stats = em_routing(votes, act, beta_u, beta_a, settings, fold, impl=impl, stats=True).stats
    assert final.shape == (2, 9, 4, 16) and final.min() >= settings.min_var
    torch.testing.assert_close(stats["variance"], final.mean(), rtol=1e-5, atol=0)
    assert stats["variance"] < final.amax()  # a mean, not the largest


def test_the_finite_statistic_is_false_for_a_non_finite_variance_or_activation():
    r = torch.full((1, 2, 3, 4), 1 / 3)
    act, var = torch.rand(1, 2, 3), torch.rand(1, 2, 3, 16) + 0.1
    assert bool(routing.routing_stats(r, act, var, None)["finite"])
    for bad in (float("nan"), float("inf")):
        broken_var, broken_act = var.clone(), act.clone()
        broken_var[0, 1, 2, 5] = bad
        broken_act[0, 0, 1] = bad
        assert not bool(routing.routing_stats(r, act, broken_var, None)["finite"]), bad
        assert not bool(routing.routing_stats(r, broken_act, var, None)["finite"]), bad


def test_the_entropy_and_active_fraction_of_non_finite_routing_are_nan_not_confident_values():
    r = torch.full((1, 2, 3, 4), 1 / 3)
    act, var = torch.rand(1, 2, 3), torch.rand(1, 2, 3, 16) + 0.1
    stats = routing.routing_stats(r, act, var, None)
    assert 0 < float(stats["entropy"]) <= 1 and 0 <= float(stats["active_fraction"]) <= 1
    nan_r, nan_act = torch.full_like(r, float("nan")), torch.full_like(act, float("nan"))
    assert math.isnan(float(routing.routing_stats(nan_r, act, var, None)["entropy"]))
    assert math.isnan(float(routing.routing_stats(r, nan_act, var, None)["active_fraction"]))
