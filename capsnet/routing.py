"""EM routing as pure functions (no parameters).

Notation (paper -> code): child capsule i (``I`` per patch), parent capsule j
(``C`` types at ``L`` positions), votes ``V_ij`` (``H`` = 16 pose entries),
child activations ``a_i``, assignments ``R_ij``, parent means ``mu_j`` and
variances ``sigma2_j``, learned ``beta_u`` and ``beta_a`` per parent type,
inverse temperature ``lambda``.

Layout shared by every function here::

    votes   (N, L, C, I, H)   batch, parent positions, parent types, children per patch, pose entries
    act_in  (N, L, I)         activation of the child in each patch slot
    r       (N, L, C, I)      assignment of each patch slot to each parent

A convolutional layer sees a child several times (once per overlapping patch).
With a :class:`ChildFold` the assignments of a child over *every* parent it
feeds (all patches x all types) sum to one, as in the paper; without one they
are normalised over the parent types of each patch separately.

Two implementations compute the same function:

* ``impl="plain"``: the equations written out elementwise; clear, and the
  reference for the fast path.
* ``impl="fast"``: the M-step moments and the E-step log-likelihood written as
  batched matrix products over the centred votes and their squares. When a
  gradient is needed, a custom backward collects the per-iteration gradient
  factors of the vote tensor and applies them in one product at the end, so
  backward reads the votes about as often as forward does and stores no
  per-iteration temporaries of vote size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable, NamedTuple

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

#: Lower bound of sum_i R_ij in the M-step divisions; only a parent that no
#: child feeds at all comes near it.
RSUM_FLOOR = 1e-10
LOG_2PI = math.log(2 * math.pi)


@dataclass(frozen=True)
class RoutingSettings:
    """Static routing hyper-parameters (the iteration count is unrolled on export)."""

    iterations: int = 3
    final_lambda: float = 0.01
    lambda_decay: float = 0.95
    min_var: float = 0.0005


def inverse_temperatures(settings: RoutingSettings) -> list[float]:
    """lambda_t = final_lambda * (1 - decay ** (t + 1)) for t = 0 .. iterations - 1."""
    return [
        settings.final_lambda * (1.0 - settings.lambda_decay ** (t + 1)) for t in range(settings.iterations)
    ]


class RoutingResult(NamedTuple):
    pose: Tensor  # (N, L, C, H) parent means mu_j
    activation: Tensor  # (N, L, C) parent activations a_j
    stats: dict[str, Tensor] | None  # detached routing statistics, when asked for


# --------------------------------------------------------------------------- child geometry


class ChildFold:
    """Maps the patch slots of a convolutional capsule layer back to children.

    Patch slot ``(l, k, b)`` (parent position ``l``, kernel offset ``k`` in
    row-major K*K order, child type ``b``) holds the child of type ``b`` at input
    position ``index[l, k]``. Sums and maxima over all slots of a child are
    computed with one scatter over a precomputed index, then gathered back, so
    no Python loop runs over positions.
    """

    def __init__(self, height: int, width: int, kernel: int, stride: int, types: int, device=None):
        out_h = (height - kernel) // stride + 1
        out_w = (width - kernel) // stride + 1
        rows = torch.arange(out_h, device=device)[:, None] * stride  # (Ho, 1)
        cols = torch.arange(out_w, device=device)[None, :] * stride  # (1, Wo)
        ky = torch.arange(kernel, device=device).repeat_interleave(kernel)  # (K*K,)
        kx = torch.arange(kernel, device=device).repeat(kernel)  # (K*K,)
        y = rows[:, :, None] + ky  # (Ho, 1, KK) -> broadcast
        x = cols[:, :, None] + kx  # (1, Wo, KK)
        self.index = (y * width + x).reshape(out_h * out_w, kernel * kernel)  # (L, KK)
        self.height, self.width, self.types = height, width, types
        self.positions = out_h * out_w
        self.kernel_area = kernel * kernel
        flat = self.index.reshape(-1)
        self._flat = flat
        counts = torch.zeros(height * width, device=device).index_add_(
            0, flat, torch.ones_like(flat, dtype=torch.float32)
        )
        #: (L, KK): how many patch slots hold the child at each slot's position
        self.slot_counts = counts[self.index]

    def _to_children(self, x: Tensor) -> Tensor:
        """(N, L, KK*B) slot values -> (N, B, L*KK)."""
        n = x.shape[0]
        return x.reshape(n, self.positions * self.kernel_area, self.types).transpose(1, 2)

    def _to_slots(self, y: Tensor) -> Tensor:
        """(N, B, H*W) per-child values -> (N, L, KK*B) gathered at every slot."""
        n = y.shape[0]
        g = y[:, :, self._flat]  # (N, B, L*KK)
        return g.transpose(1, 2).reshape(n, self.positions, self.kernel_area * self.types)

    def sum(self, x: Tensor) -> Tensor:
        """Sum over all slots of each child, returned at every slot: (N, L, I) -> (N, L, I)."""
        xs = self._to_children(x)
        total = xs.new_zeros(x.shape[0], self.types, self.height * self.width)
        total = total.index_add(2, self._flat, xs)  # (N, B, H*W)
        return self._to_slots(total)

    def max(self, x: Tensor) -> Tensor:
        """Maximum over all slots of each child (no gradient): (N, L, I) -> (N, L, I)."""
        xs = self._to_children(x.detach())
        init = xs.new_full((x.shape[0], self.types, self.height * self.width), -torch.inf)
        idx = self._flat.expand(xs.shape[0], self.types, -1)
        best = init.scatter_reduce(2, idx, xs, reduce="amax", include_self=True)
        return self._to_slots(best)

    def parents_per_slot(self, parent_types: int) -> Tensor:
        """(L, I): number of parents (all patches x all types) the slot's child feeds."""
        counts = self.slot_counts[:, :, None].expand(-1, -1, self.types)
        return counts.reshape(self.positions, -1) * parent_types


@lru_cache(maxsize=64)
def child_fold(height: int, width: int, kernel: int, stride: int, types: int, device: str) -> ChildFold:
    return ChildFold(height, width, kernel, stride, types, torch.device(device))


# --------------------------------------------------------------------------- shared pieces


def initial_assignments(n, positions, types, children, fold: ChildFold | None, dtype, device) -> Tensor:
    """r_ij = 1 / (number of parents child i feeds): (N, L, C, I)."""
    if fold is None:
        r = torch.full((positions, children), 1.0 / types, dtype=dtype, device=device)
    else:
        r = 1.0 / fold.parents_per_slot(types).to(device=device, dtype=dtype)  # (L, I)
    return r[None, :, None, :].expand(n, positions, types, children)


def normalise_assignments(logits: Tensor, fold: ChildFold | None) -> Tensor:
    """Softmax of ln(a_j) + ln(p_ij) over every parent a child feeds, with a max shift."""
    if fold is None:
        return torch.softmax(logits, dim=2)
    shift = fold.max(logits.amax(dim=2))  # (N, L, I), per child over all its parents
    e = torch.exp(logits - shift[:, :, None, :])  # (N, L, C, I), each child's best parent -> 1
    total = fold.sum(e.sum(dim=2))  # (N, L, I)
    return e / total[:, :, None, :]


def parent_activation(
    rsum: Tensor, var: Tensor, beta_u: Tensor, beta_a: Tensor, lam: float
) -> tuple[Tensor, Tensor]:
    """cost_h = (beta_u + ln sigma_h) * sum_i R_ij; a_j = sigmoid(lambda (beta_a - sum_h cost_h)).

    Returns (a_j, ln a_j), each (N, L, C); ln a_j is computed stably for the E-step.
    """
    cost = ((beta_u[:, None] + 0.5 * torch.log(var)) * rsum[..., None]).sum(-1)  # (N, L, C)
    logit = lam * (beta_a - cost)
    return torch.sigmoid(logit), torch.nn.functional.logsigmoid(logit)


def routing_stats(r: Tensor, act: Tensor, var: Tensor, fold: ChildFold | None) -> dict[str, Tensor]:
    """Detached statistics of the final routing state."""
    r = r.detach()
    plogp = torch.where(r > 0, r * torch.log(r.clamp_min(1e-30)), torch.zeros_like(r))
    ent = -plogp.sum(2)  # (N, L, I) entropy per slot
    if fold is None:
        parents = torch.full_like(ent, float(r.shape[2]))
    else:
        ent = fold.sum(ent)
        parents = fold.parents_per_slot(r.shape[2]).to(ent.dtype).expand_as(ent)
    norm = torch.where(parents > 1, ent / torch.log(parents.clamp_min(2.0)), torch.zeros_like(ent))
    act = act.detach()
    return {
        "activation": act,
        "activation_mean": act.mean(),
        "entropy": norm.mean(),
        "variance": var.detach().mean(),
        "active_fraction": (act > 0.5).float().mean(),
        "finite": torch.isfinite(act).all() & torch.isfinite(var.detach()).all(),
    }


# --------------------------------------------------------------------------- plain implementation


def _em_plain(votes, act_in, beta_u, beta_a, settings, fold, want_stats):
    votes = votes.reshape(*votes.shape[:4], -1)  # (N, L, C, I, H)
    r = initial_assignments(*votes.shape[:4], fold, votes.dtype, votes.device)  # (N, L, C, I)
    a_in = act_in[:, :, None, :]  # (N, L, 1, I)
    lambdas = inverse_temperatures(settings)
    for t, lam in enumerate(lambdas):
        # M-step: R_ij = r_ij a_i, no renormalisation over parents.
        weight = r * a_in  # (N, L, C, I)
        rsum = weight.sum(-1)  # (N, L, C)
        denom = rsum.clamp_min(RSUM_FLOOR)[..., None]  # (N, L, C, 1)
        mu = (weight[..., None] * votes).sum(-2) / denom  # (N, L, C, H)
        dev = votes - mu[..., None, :]  # (N, L, C, I, H)
        var = (weight[..., None] * dev * dev).sum(-2) / denom + settings.min_var  # (N, L, C, H)
        act, log_act = parent_activation(rsum, var, beta_u, beta_a, lam)
        if t < len(lambdas) - 1:
            # E-step in the log domain: ln p_ij = sum_h ln N(V_ijh; mu_jh, sigma2_jh).
            log_p = -0.5 * (dev * dev / var[..., None, :] + torch.log(var[..., None, :]) + LOG_2PI).sum(-1)
            r = normalise_assignments(log_act[..., None] + log_p, fold)  # (N, L, C, I)
    stats = routing_stats(r, act, var, fold) if want_stats else None
    return RoutingResult(mu, act, stats)


# --------------------------------------------------------------------------- fast implementation


class LazyVotes(NamedTuple):
    """Votes described by how to compute them: ``fn(*inputs)`` -> (N, L, C, I, ...).

    Given this instead of a tensor, the fast path keeps only the (small) inputs
    for backward and recomputes the votes there, instead of holding the vote
    tensor and its squares between forward and backward.
    """

    fn: Callable[..., Tensor]
    inputs: tuple[Tensor, ...]

    def compute(self) -> Tensor:
        return self.fn(*self.inputs)


def _centred_moments(votes: Tensor, shift: Tensor) -> Tensor:
    """[V - shift, (V - shift)^2] as one (B, I, 2H) tensor, written in a single pass each.

    ``votes`` may be any strided view (the permuted output of the vote product);
    the result is contiguous in routing layout.
    """
    n, positions, types, children = votes.shape[:4]
    h = votes[0, 0, 0, 0].numel()
    both = votes.new_empty(n * positions * types, children, 2 * h)  # (B, I, 2H)
    centred = both[..., :h].view(votes.shape)
    torch.sub(votes, shift, out=centred)
    torch.mul(centred, centred, out=both[..., h:].view(votes.shape))
    return both


#: The last step of the backward pass works on this many samples at a time, so
#: the full-size gradient of [V, V^2] is never materialised at once.
BACKWARD_CHUNK = 8


class _VoteState:
    """What the custom backward of one routing call shares between its pieces.

    ``both`` = [V - s, (V - s)^2] (B, I, 2H) lives through forward; with lazy votes
    it is dropped after forward and rebuilt once when backward first needs it.
    ``left``/``right`` collect low-rank pieces of d(loss)/d(both), applied in
    one product at the end of backward.
    """

    def __init__(self, votes: Tensor | LazyVotes):
        self.lazy = votes if isinstance(votes, LazyVotes) else None
        self.both: Tensor | None = None
        self.left: list[Tensor] = []  # (B, I, 1) each
        self.right: list[Tensor] = []  # (B, 1, 2H) each

    def build(self, votes: Tensor) -> tuple[Tensor, Tensor]:
        shift = votes.detach().mean(dim=3, keepdim=True)  # (N, L, C, 1, *pose)
        self.both = _centred_moments(votes.detach(), shift)
        return self.both, shift

    def get_both(self) -> Tensor:
        if self.both is None:  # lazy votes: rebuild, bit-identical to forward
            with torch.no_grad():
                self.build(self.lazy.compute())
        return self.both


class _VoteSource(torch.autograd.Function):
    """Starts a routing call: builds [V - s, (V - s)^2]; its gradient arrives through the state.

    The shift s = mean_i V_ij carries no gradient: routing is invariant to a
    per-parent shift of the votes, so treating it as constant is exact.
    Backward writes d(loss)/dV in the votes' own memory layout (no transpose copy).
    """

    @staticmethod
    def forward(ctx, state: _VoteState, *inputs: Tensor):
        votes = state.lazy.compute() if state.lazy is not None else inputs[0]
        both, shift = state.build(votes)
        ctx.set_materialize_grads(False)
        ctx.state = state
        ctx.layout = (votes.shape, votes.stride())  # eager votes themselves are not kept
        ctx.save_for_backward(*(inputs if state.lazy is not None else ()))
        token = votes.new_zeros(())
        ctx.mark_non_differentiable(shift)
        return token, shift

    @staticmethod
    @once_differentiable
    def backward(ctx, _grad_token, _grad_shift):
        state: _VoteState = ctx.state
        inputs = ctx.saved_tensors
        nothing = (None,) * (len(ctx.needs_input_grad) - 1)
        if not state.left:
            return (None, *nothing)
        left, right = torch.cat(state.left, dim=2), torch.cat(state.right, dim=1)  # (B, I, k), (B, k, 2H)
        state.left, state.right = [], []
        both = state.get_both()
        if state.lazy is not None:
            state.both = None  # rebuilt again if backward runs again (retain_graph)
        shape, stride = ctx.layout
        h = both.shape[-1] // 2
        grad = torch.empty_strided(shape, stride, dtype=both.dtype, device=both.device)
        per_sample = both.shape[0] // shape[0]
        for start in range(0, shape[0], BACKWARD_CHUNK):
            stop = min(start + BACKWARD_CHUNK, shape[0])
            rows = slice(start * per_sample, stop * per_sample)
            g = torch.bmm(left[rows], right[rows])  # (b, I, 2H): every iteration's contribution
            part = (stop - start, *shape[1:])
            # d/dV of [V - s, (V - s)^2] = [1, 2 (V - s)]
            torch.addcmul(
                g[..., :h].view(part), both[rows, :, :h].view(part), g[..., h:].view(part),
                value=2.0, out=grad[start:stop],
            )
        del both, left, right
        if state.lazy is None:
            return None, grad
        with torch.enable_grad():
            ins = [x.detach().requires_grad_(need) for x, need in zip(inputs, ctx.needs_input_grad[1:])]
            votes = state.lazy.fn(*ins)
            wanted = [x for x in ins if x.requires_grad]
            found = iter(torch.autograd.grad(votes, wanted, grad))
        return (None, *(next(found) if x.requires_grad else None for x in ins))


class _Moments(torch.autograd.Function):
    """M-step contraction: (B, 1, I) weights @ (B, I, 2H) -> sums of R V and R V^2."""

    @staticmethod
    def forward(ctx, weight: Tensor, token: Tensor, state: _VoteState):
        ctx.save_for_backward(weight)
        ctx.state = state
        return torch.bmm(weight, state.both)  # (B, 1, 2H)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        (weight,) = ctx.saved_tensors
        state: _VoteState = ctx.state
        state.left.append(weight.transpose(1, 2))
        state.right.append(grad)
        grad_weight = torch.bmm(grad, state.get_both().transpose(1, 2))  # (B, 1, I)
        return grad_weight, grad.new_zeros(()), None


class _Project(torch.autograd.Function):
    """E-step contraction: (B, 1, 2H) coefficients . (B, I, 2H) -> (B, 1, I), one dot per vote."""

    @staticmethod
    def forward(ctx, coeff: Tensor, token: Tensor, state: _VoteState):
        ctx.save_for_backward(coeff)
        ctx.state = state
        return torch.bmm(coeff, state.both.transpose(1, 2))  # (B, 1, I)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        (coeff,) = ctx.saved_tensors
        state: _VoteState = ctx.state
        state.left.append(grad.transpose(1, 2))
        state.right.append(coeff)
        grad_coeff = torch.bmm(grad, state.get_both())  # (B, 1, 2H)
        return grad_coeff, grad.new_zeros(()), None


def _em_fast(votes, act_in, beta_u, beta_a, settings, fold, want_stats, custom_backward):
    if custom_backward:
        state = _VoteState(votes)
        inputs = votes.inputs if isinstance(votes, LazyVotes) else (votes,)
        token, shift = _VoteSource.apply(state, *inputs)
        both = state.both

        def moments(weight):
            return _Moments.apply(weight, token, state)

        def project(coeff):
            return _Project.apply(coeff, token, state)
    else:
        state = None
        if isinstance(votes, LazyVotes):
            votes = votes.compute()
        shift = votes.mean(dim=3, keepdim=True)  # (N, L, C, 1, *pose)
        both = _centred_moments(votes, shift)  # (B, I, 2H)

        def moments(weight):
            return torch.bmm(weight, both)

        def project(coeff):
            return torch.bmm(coeff, both.transpose(1, 2))

    n, positions, children = act_in.shape
    batch, _, two_h = both.shape
    types, h = batch // (n * positions), two_h // 2
    # The routing is invariant to a per-parent shift of its votes; centring keeps
    # E[V^2] - E[V]^2 accurate in float32.
    r = initial_assignments(n, positions, types, children, fold, both.dtype, both.device)  # (N, L, C, I)
    a_in = act_in[:, :, None, :]  # (N, L, 1, I)
    lambdas = inverse_temperatures(settings)
    for t, lam in enumerate(lambdas):
        weight = r * a_in  # (N, L, C, I)
        rsum = weight.sum(-1)  # (N, L, C)
        sums = moments(weight.reshape(batch, 1, children)).view(n, positions, types, 2 * h)
        denom = rsum.clamp_min(RSUM_FLOOR)[..., None]
        mu = sums[..., :h] / denom  # (N, L, C, H), centred
        var = (sums[..., h:] / denom - mu * mu).clamp_min(0.0) + settings.min_var
        act, log_act = parent_activation(rsum, var, beta_u, beta_a, lam)
        if t < len(lambdas) - 1:
            inv = 1.0 / var
            coeff = torch.cat([mu * inv, -0.5 * inv], dim=-1)  # (N, L, C, 2H)
            quad = project(coeff.reshape(batch, 1, 2 * h)).view(n, positions, types, children)
            const = -0.5 * (mu * mu * inv + torch.log(var) + LOG_2PI).sum(-1)  # (N, L, C)
            log_p = quad + const[..., None]  # (N, L, C, I)
            r = normalise_assignments(log_act[..., None] + log_p, fold)
    if state is not None and state.lazy is not None:
        state.both = None  # rebuilt in backward from the small vote inputs
    pose = mu + shift.reshape(n, positions, types, h)
    stats = routing_stats(r, act, var, fold) if want_stats else None
    return RoutingResult(pose, act, stats)


# --------------------------------------------------------------------------- entry point


def em_routing(
    votes: Tensor | LazyVotes,
    act_in: Tensor,
    beta_u: Tensor,
    beta_a: Tensor,
    settings: RoutingSettings,
    fold: ChildFold | None = None,
    *,
    impl: str = "fast",
    stats: bool = False,
) -> RoutingResult:
    """EM routing between one layer of children and one layer of parents.

    Args:
        votes: (N, L, C, I, H) or (N, L, C, I, P, P) vote of each patch slot for each
            parent, V_ij, with any strides; or a :class:`LazyVotes` that computes
            them (the fast path then recomputes the votes in backward instead of
            keeping them).
        act_in: (N, L, I) activation a_i of the child in each slot.
        beta_u, beta_a: (C,) learned per parent type.
        settings: iterations, final lambda and its decay, variance floor.
        fold: child geometry of a convolutional layer; None normalises per patch.
        impl: "fast" (contractions, custom backward) or "plain" (elementwise).
        stats: also return detached routing statistics.

    Routing runs in float32 (float64 when the child activations are float64), also under autocast.
    """
    if impl not in ("fast", "plain"):
        raise ValueError(f"em_routing: impl must be 'fast' or 'plain', got {impl!r}")
    dtype = torch.float64 if act_in.dtype == torch.float64 else torch.float32
    with torch.autocast(act_in.device.type, enabled=False):
        act_in, beta_u, beta_a = act_in.to(dtype), beta_u.to(dtype), beta_a.to(dtype)
        if isinstance(votes, LazyVotes):
            votes = LazyVotes(votes.fn, tuple(x.to(dtype) for x in votes.inputs))
            grad_votes = any(x.requires_grad for x in votes.inputs)
        else:
            votes = votes.to(dtype)
            grad_votes = votes.requires_grad
        if impl == "plain":
            if isinstance(votes, LazyVotes):
                votes = votes.compute()
            _check_shapes(votes, act_in)
            return _em_plain(votes, act_in, beta_u, beta_a, settings, fold, stats)
        custom = (
            torch.is_grad_enabled()
            and (grad_votes or act_in.requires_grad)
            and not torch.compiler.is_compiling()
        )
        if not isinstance(votes, LazyVotes):
            _check_shapes(votes, act_in)
        return _em_fast(votes, act_in, beta_u, beta_a, settings, fold, stats, custom)


def _check_shapes(votes: Tensor, act_in: Tensor) -> None:
    if votes.dim() < 5 or act_in.shape != votes.shape[:2] + votes.shape[3:4]:
        raise ValueError(
            "em_routing: votes must be (N, L, C, I, H) or (N, L, C, I, P, P) and act_in (N, L, I); "
            f"got {tuple(votes.shape)} and {tuple(act_in.shape)}"
        )
