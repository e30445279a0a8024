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

Two implementations compute the same function (to rounding; see the note on the fast
path's precision below):

* ``impl="plain"``: the equations written out elementwise; clear, and the
  reference for the fast path.
* ``impl="fast"``: the M-step moments and the E-step log-likelihood written as
  batched matrix products over the centred votes and their squares, routed a
  chunk of a few samples at a time (routing never mixes samples), so that no
  tensor of the batch's vote size is allocated (see :data:`CHUNK_BYTES`).
  When a gradient is needed, a hand-written backward (:class:`_FastRouting`)
  keeps only each iteration's assignments and moment sums, collects the
  gradient of the moments as rank-one factors applied in one product per chunk,
  and, for votes given as a :class:`VoteProduct`, goes straight to the
  gradients of the poses and transformation matrices. While torch.compile or
  torch.export traces, the same iterations run on the whole batch in plain
  differentiable operations.

Precision of the fast path: it forms each parent's variance as E[(V - s)^2] - mu^2 and
its E-step as a quadratic form in [V - s, (V - s)^2], with one centre s per position
(the activation-weighted mean of all its children's votes). Where a parent's children
sit d away from s with a spread sigma, that variance loses about (d / sigma)^2 units in
the last place: nothing that matters for the trained models measured (the default
small model's class activations on the 10,000 Fashion-MNIST test images differ from a
float64 plain routing by at most 2.1e-6, as the float32 plain path's do by 3.1e-6),
but tight, well separated clusters far from s (unnormalised inputs in the thousands,
many iterations) would lose whole percents of their variance, and their gradients more.
So each chunk checks every iteration's parents, and a chunk where (d / sigma)^2 passes
:data:`CANCELLATION_LIMIT` units in the last place, or where a parent gets no data
(:data:`RSUM_FLOOR`), is routed by the plain path instead, forward and backward. The
whole-batch operations that torch.compile and export trace make no such check.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache, lru_cache
from typing import NamedTuple

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

#: Lower bound of sum_i R_ij in the M-step divisions. A parent that no child feeds
#: comes near it, and so can one that every child has all but rejected (many
#: iterations, a high final lambda, large patches whose votes for one parent agree
#: closely; a trained Fashion-MNIST model's smallest sum with 3 iterations was 4e-7).
#: Below it the plain path's sum_i R_ij V_ij / RSUM_FLOOR shrinks towards 0 (and its
#: gradient with respect to the activations grows as 1 / RSUM_FLOOR); the fast path's
#: centred moments would leave such a parent near the children's activation-weighted
#: mean vote instead, so it routes a chunk where this happens as the plain path does
#: (see :func:`_needs_plain_routing`).
RSUM_FLOOR = 1e-10
#: The fast path keeps a chunk's result where its worst parent has mu^2 / sigma^2 (the
#: squared distance of the parent's mean from the centre of the votes, in units of its
#: variance) below this many units in the last place of the dtype, i.e. where its
#: variance and log-likelihoods keep a relative accuracy of about 2^-10 or better;
#: beyond it, the chunk is routed by the plain path. 8,192 in float32: the trained and
#: freshly initialised models measured on Fashion-MNIST stay below 300.
CANCELLATION_LIMIT = 2.0**-10
LOG_2PI = math.log(2 * math.pi)


@dataclass(frozen=True)
class RoutingSettings:
    """Static routing hyper-parameters (the iteration count is unrolled on export)."""

    iterations: int = 3
    final_lambda: float = 0.01
    lambda_decay: float = 0.95
    min_var: float = 0.0005
    #: None: the paper's cost, (beta_u + ln sigma_h) * sum_i R_ij. A number k scales
    #: sum_i R_ij by k * C / I (C parent types, I children per patch), so that every
    #: layer's activation logits have a similar range whatever its fan-in.
    cost_norm: float | None = None
    #: True: the learned beta_a is kept in units of the last iteration's logit (the routing
    #: uses beta_a / lambda_T-1, the last of :func:`inverse_temperatures`), so an optimiser
    #: step moves the activations at the rate of the other parameters instead of lambda_T-1
    #: times slower (about 1,000 times with 2 iterations and final_lambda 0.01).
    beta_a_logit: bool = False
    #: A fixed factor on this layer's activation cost (the model sets one per layer from
    #: ``routing.layer_cost_scales``): the cost of a convolutional capsule layer, with few
    #: children per parent, is hundreds of times smaller than the class capsules', so with
    #: one lambda for all layers its activations hardly depend on the input.
    layer_scale: float = 1.0

    def __post_init__(self) -> None:
        problems = []
        if isinstance(self.iterations, bool) or not isinstance(self.iterations, int) or self.iterations < 1:
            problems.append(f"iterations must be a whole number of at least 1, got {self.iterations!r}")
        for name in ("final_lambda", "min_var", "layer_scale"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                problems.append(f"{name} must be positive, got {value!r}")
        if self.cost_norm is not None and not (math.isfinite(self.cost_norm) and self.cost_norm > 0):
            problems.append(f"cost_norm must be positive or None, got {self.cost_norm!r}")
        if not 0.0 <= self.lambda_decay < 1.0:
            problems.append(
                f"lambda_decay must be in [0, 1) (1 makes every inverse temperature 0), got {self.lambda_decay!r}"
            )
        if problems:
            raise ValueError("RoutingSettings: " + "; ".join(problems))


def cost_scale(settings: RoutingSettings, types: int, children: int) -> float:
    """Factor on sum_i R_ij in the activation cost (``layer_scale``, times k C / I with ``cost_norm``)."""
    base = 1.0 if settings.cost_norm is None else settings.cost_norm * types / children
    return base * settings.layer_scale


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
        area = height * width
        #: (L*KK*B,) child held by each patch slot (l, k, b), numbered b * H*W + input position
        self._child = (
            self.index[:, :, None] + torch.arange(types, device=device)[None, None, :] * area
        ).reshape(-1)
        self._children = types * area
        counts = torch.zeros(area, device=device).index_add_(
            0, self.index.reshape(-1), torch.ones(self.index.numel(), device=device)
        )
        #: (L, KK): how many patch slots hold the child at each slot's position
        self.slot_counts = counts[self.index]

    def sum(self, x: Tensor) -> Tensor:
        """Sum over all slots of each child, returned at every slot: (N, L, I) -> (N, L, I)."""
        flat = x.reshape(x.shape[0], -1)  # (N, L*I)
        total = flat.new_zeros(x.shape[0], self._children).index_add_(1, self._child, flat)
        return total[:, self._child].view(x.shape)

    def max(self, x: Tensor) -> Tensor:
        """Maximum over all slots of each child (no gradient): (N, L, I) -> (N, L, I)."""
        flat = x.detach().reshape(x.shape[0], -1)  # (N, L*I)
        best = flat.new_full((x.shape[0], self._children), -torch.inf)
        best.scatter_reduce_(1, self._child.expand_as(flat), flat, reduce="amax", include_self=True)
        return best[:, self._child].view(x.shape)

    def slots_per_slot(self) -> Tensor:
        """(L, I): how many patch slots hold the slot's child (1 / it weighs each slot as one child)."""
        return self.slot_counts[:, :, None].expand(-1, -1, self.types).reshape(self.positions, -1)

    def parents_per_slot(self, parent_types: int) -> Tensor:
        """(L, I): number of parents (all patches x all types) the slot's child feeds."""
        return self.slots_per_slot() * parent_types


@lru_cache(maxsize=64)
def _cached_fold(height: int, width: int, kernel: int, stride: int, types: int, device: str) -> ChildFold:
    return ChildFold(height, width, kernel, stride, types, torch.device(device))


def child_fold(height: int, width: int, kernel: int, stride: int, types: int, device: str) -> ChildFold:
    """The :class:`ChildFold` of a layer geometry, built once per geometry and device.

    While torch.compile or torch.export traces, a fresh one is built instead, so
    that no traced (fake) tensor is ever cached and reused outside the trace.
    """
    if torch.compiler.is_compiling():
        return ChildFold(height, width, kernel, stride, types, torch.device(device))
    return _cached_fold(height, width, kernel, stride, types, device)


# --------------------------------------------------------------------------- shared pieces


def initial_assignments(n, positions, types, children, fold: ChildFold | None, dtype, device) -> Tensor:
    """r_ij = 1 / (number of parents child i feeds): (N, L, C, I)."""
    if fold is None:
        r = torch.full((positions, children), 1.0 / types, dtype=dtype, device=device)
    else:
        r = 1.0 / fold.parents_per_slot(types).to(device=device, dtype=dtype)  # (L, I)
    return r[None, :, None, :].expand(n, positions, types, children)


#: Floor of the exponent in the assignment softmax. torch.exp takes a slow path (a hundred
#: times slower) where float32 results underflow (below about -87.3), and the products of
#: such tiny assignments are denormal numbers, also slow; an assignment of exp(-80) = 2e-35
#: of a child's best one is zero for every purpose.
EXP_FLOOR = -80.0


def normalise_assignments(logits: Tensor, fold: ChildFold | None) -> Tensor:
    """Softmax of ln(a_j) + ln(p_ij) over every parent a child feeds, with a max shift."""
    if fold is None:
        return torch.softmax(logits, dim=2)
    shift = fold.max(logits.amax(dim=2))  # (N, L, I), per child over all its parents
    arg = logits - shift[:, :, None, :]  # each child's best parent -> 0
    if torch.is_grad_enabled() and arg.requires_grad:
        e = torch.exp(arg.clamp_min(EXP_FLOOR))
        return e / fold.sum(e.sum(dim=2))[:, :, None, :]
    e = arg.clamp_min_(EXP_FLOOR).exp_()  # no autograd: in place
    return e.div_(fold.sum(e.sum(dim=2))[:, :, None, :])


def parent_activation(
    rsum: Tensor, var: Tensor, beta_u: Tensor, beta_a: Tensor, lam: float, scale: float = 1.0
) -> tuple[Tensor, Tensor]:
    """cost_h = (beta_u + ln sigma_h) * sum_i R_ij; a_j = sigmoid(lambda (beta_a - sum_h cost_h)).

    Returns (a_j, ln a_j), each (N, L, C); ln a_j is computed stably for the E-step.
    """
    cost = ((beta_u[:, None] + 0.5 * torch.log(var)) * rsum[..., None]).sum(-1)  # (N, L, C)
    if scale != 1.0:
        cost = cost * scale
    logit = lam * (beta_a - cost)
    return torch.sigmoid(logit), torch.nn.functional.logsigmoid(logit)


def routing_stats(r: Tensor, act: Tensor, var: Tensor, fold: ChildFold | None) -> dict[str, Tensor]:
    """Detached statistics of the final routing state.

    ``entropy`` is the mean over children of the entropy of each child's assignments
    over every parent it feeds, divided by its maximum, ln(number of those parents):
    1 for assignments spread evenly, 0 for one parent each. With cross-position
    normalisation a child's parents are those of all the patches it appears in, so the
    value is not comparable with per-patch normalisation's, whose parents are the types
    of one patch.
    """
    r = r.detach()
    plogp = torch.where(r > 0, r * torch.log(r.clamp_min(1e-30)), torch.zeros_like(r))
    ent = -plogp.sum(2)  # (N, L, I) entropy per slot
    if fold is None:
        parents = torch.full_like(ent, float(r.shape[2]))
        share = torch.ones_like(ent)  # each slot is a child of its own
    else:
        ent = fold.sum(ent)  # each child's entropy, at every slot that holds it
        parents = fold.parents_per_slot(r.shape[2]).to(ent.dtype).expand_as(ent)
        share = 1.0 / fold.slots_per_slot().to(ent.dtype).expand_as(ent)  # a child counts once
    norm = torch.where(parents > 1, ent / torch.log(parents.clamp_min(2.0)), torch.zeros_like(ent))
    act = act.detach()
    nan = torch.full((), math.nan, device=act.device, dtype=torch.float32)
    # non-finite assignments or activations give NaN, as the means of them do, not the 0 that
    # "r > 0" and "a > 0.5" would read from them (which look like confident routing)
    entropy = (norm * share).sum() / share.sum()
    active = (act > 0.5).float().mean()
    return {
        "activation": act,
        "activation_mean": act.mean(),
        "entropy": torch.where(torch.isfinite(r).all(), entropy, nan.to(entropy.dtype)),
        "variance": var.detach().mean(),
        "active_fraction": torch.where(torch.isfinite(act).all(), active, nan),
        "finite": torch.isfinite(act).all() & torch.isfinite(var.detach()).all(),
    }


# --------------------------------------------------------------------------- plain implementation


def _em_plain(votes, act_in, beta_u, beta_a, settings, fold, want_stats, trace=None):
    mu, var, act, r = _plain_iterations(votes, act_in, beta_u, beta_a, settings, fold, trace)
    stats = routing_stats(r, act, var, fold) if want_stats else None
    return RoutingResult(mu, act, stats)


def _plain_iterations(votes, act_in, beta_u, beta_a, settings, fold, trace=None):
    """The EM iterations written out elementwise: the last iteration's mu, var, activations and r."""
    votes = votes.reshape(*votes.shape[:4], -1)  # (N, L, C, I, H)
    r = initial_assignments(*votes.shape[:4], fold, votes.dtype, votes.device)  # (N, L, C, I)
    a_in = act_in[:, :, None, :]  # (N, L, 1, I)
    lambdas = inverse_temperatures(settings)
    scale = cost_scale(settings, votes.shape[2], votes.shape[3])
    for t, lam in enumerate(lambdas):
        # M-step: R_ij = r_ij a_i, no renormalisation over parents.
        weight = r * a_in  # (N, L, C, I)
        rsum = weight.sum(-1)  # (N, L, C)
        denom = rsum.clamp_min(RSUM_FLOOR)[..., None]  # (N, L, C, 1)
        mu = (weight[..., None] * votes).sum(-2) / denom  # (N, L, C, H)
        dev = votes - mu[..., None, :]  # (N, L, C, I, H)
        var = (weight[..., None] * dev * dev).sum(-2) / denom + settings.min_var  # (N, L, C, H)
        act, log_act = parent_activation(rsum, var, beta_u, beta_a, lam, scale)
        if trace is not None:  # what iteration t saw and made, for figures
            detached = {"r": r, "mu": mu, "var": var, "act": act}
            trace.append({**{k: v.detach() for k, v in detached.items()}, "lambda": lam})
        if t < len(lambdas) - 1:
            # E-step in the log domain: ln p_ij = sum_h ln N(V_ijh; mu_jh, sigma2_jh).
            log_p = -0.5 * (dev * dev / var[..., None, :] + torch.log(var[..., None, :]) + LOG_2PI).sum(-1)
            r = normalise_assignments(log_act[..., None] + log_p, fold)  # (N, L, C, I)
    return mu, var, act, r


# --------------------------------------------------------------------------- fast implementation


class VoteProduct(NamedTuple):
    """Votes described by the product that makes them, V_ij = M_i W_ij.

    Given this instead of a vote tensor, the fast path builds its moments a few
    samples at a time (the full vote tensor never exists), takes the gradients of
    M and W straight from the gradient of the votes, and, with ``recompute``,
    rebuilds the moments in backward instead of keeping them.
    """

    poses: Tensor  # (I, N*L*P, P) pose matrix M_i of the child in each patch slot, rows sample-major
    weight: Tensor  # (I, P, C*P) transformation W_ij from each slot to each parent type
    shape: tuple[int, int, int, int]  # (N, L, C, P)
    recompute: bool = False

    def product(self, start: int, stop: int, out: Tensor | None = None) -> Tensor:
        """Votes of samples ``start:stop`` as the product lays them out: (I, n*L*P, C*P), contiguous."""
        _, positions, _, p = self.shape
        m = self.poses[:, start * positions * p : stop * positions * p]
        if out is None:
            return torch.bmm(m, self.weight)
        return torch.bmm(m, self.weight, out=_leading(out, (m.shape[0], m.shape[1], self.weight.shape[2])))

    def compute(self, start: int = 0, stop: int | None = None) -> Tensor:
        """Votes of samples ``start:stop``: (n, L, C, I, P, P), a permuted view of one product."""
        n, positions, types, p = self.shape
        stop = n if stop is None else stop
        votes = self.product(start, stop)
        return votes.view(-1, stop - start, positions, p, types, p).permute(1, 2, 4, 0, 3, 5)


def _leading(buffer: Tensor | None, shape: tuple[int, ...]) -> Tensor | None:
    """The first prod(shape) elements of a contiguous buffer, viewed as ``shape``."""
    return None if buffer is None else buffer.view(-1)[: math.prod(shape)].view(shape)


# --------------------------------------------------------------------------- per-chunk contractions
#
# Every pass of the EM iterations over a chunk's votes is one of three contractions
# with the moments [V - s, (V - s)^2] of each (sample, position, parent) row. Eager,
# they are batched matrix products over a materialised (B, I, 2H) moments tensor.
# Compiled (:func:`use_compiled_kernels`), torch.compile turns each into one loop
# that reads only D = V - s, (B, I, H), and squares it on the fly: half the bytes
# of the eager products, and the squared half is never written.

_compiled_kernels = False


def use_compiled_kernels(enabled: bool = True) -> None:
    """Route with torch.compile'd contractions (``train.compile_routing``); False: eager batched products.

    Same results to rounding; compiling takes a while on the first calls of each
    chunk shape and needs a C++ compiler on a CPU. Not used while torch.compile or
    torch.export traces the model (they see the plain operations instead).
    """
    global _compiled_kernels
    _compiled_kernels = bool(enabled)


def compiled_kernels_enabled() -> bool:
    return _compiled_kernels


def _moments_kernel(w: Tensor, d: Tensor) -> Tensor:
    """sum_i w_i [D_i, D_i^2]: (B, I) weights and (B, I, H) centred votes -> (B, 2H)."""
    wd = w.unsqueeze(-1) * d
    return torch.cat([wd.sum(1), (wd * d).sum(1)], dim=-1)


def _quadratic_kernel(coeff: Tensor, bias: Tensor, d: Tensor) -> Tensor:
    """bias + coeff . [D_i, D_i^2] for every child i: (B, 2H), (B,), (B, I, H) -> (B, I)."""
    h = d.shape[-1]
    return (d * (coeff[:, None, :h] + coeff[:, None, h:] * d)).sum(-1) + bias[:, None]


def _vote_gradient_kernel(left: Tensor, right: Tensor, d: Tensor) -> Tensor:
    """d(loss)/dD for d(loss)/d[D, D^2] = left @ right: (B, I, K), (B, K, 2H), (B, I, H) -> (B, I, H)."""
    h = d.shape[-1]
    # K is small (two pieces per iteration): unrolled, the sum is one elementwise loop over (B, I, H).
    g1 = g2 = None
    for k in range(left.shape[-1]):
        lk = left[:, :, k, None]
        t1, t2 = lk * right[:, None, k, :h], lk * right[:, None, k, h:]
        g1, g2 = (t1, t2) if g1 is None else (g1 + t1, g2 + t2)
    return g1 + 2.0 * d * g2


#: Each kernel is compiled anew for each dtype and for chunk shapes that dynamic
#: shapes cannot cover (sizes of 0 or 1 are specialised): a process that routes many
#: geometries (three layers, train and eval batches, tests) needs more than dynamo's
#: default of 8 compilations per function, after which it would fail. The setting is
#: dynamo's, for the whole process: once the kernels are built, any torch.compile in it
#: (``train.compile: true`` too) may recompile a function this many times.
KERNEL_RECOMPILE_LIMIT = 64


class _NoCudaRuntimeNote(logging.Filter):
    """Leaves out torch's note "No CUDA runtime is found, using CUDA_HOME=..." that building
    the kernels for a CPU prints where a CUDA toolkit is installed without a GPU: it is about
    CUDA extensions, which the routing does not build."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("No CUDA runtime is found")


def _quiet_cuda_runtime_note() -> None:
    logger = logging.getLogger("torch.utils.cpp_extension")
    if not any(isinstance(f, _NoCudaRuntimeNote) for f in logger.filters):
        logger.addFilter(_NoCudaRuntimeNote())


@cache
def _kernel(fn):
    import torch._dynamo

    _quiet_cuda_runtime_note()  # before torch.compile first imports torch.utils.cpp_extension
    config = torch._dynamo.config
    # recompile_limit since torch 2.7; cache_size_limit before (an alias of it after)
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    setattr(config, name, max(getattr(config, name), KERNEL_RECOMPILE_LIMIT))
    return torch.compile(fn, fullgraph=True)


class KernelCompileError(RuntimeError):
    """torch.compile could not build the routing's kernels (``train.compile_routing``)."""


@cache
def _check_kernels(device_type: str) -> None:
    """Builds and runs the compiled kernels once on tiny inputs, so a missing compiler is one clear error."""
    try:
        d = torch.zeros(1, 2, 4, device=device_type)
        _kernel(_moments_kernel)(torch.ones(1, 2, device=device_type), d)
        _kernel(_quadratic_kernel)(
            torch.zeros(1, 8, device=device_type), torch.zeros(1, device=device_type), d
        )
        _kernel(_vote_gradient_kernel)(
            torch.zeros(1, 2, 1, device=device_type), torch.zeros(1, 1, 8, device=device_type), d
        )
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        need = "a C++ compiler (g++) and the Python headers" if device_type == "cpu" else "a working Triton"
        raise KernelCompileError(
            f"train.compile_routing: torch.compile could not build the routing kernels on {device_type} "
            f"({type(e).__name__}: {first[:300]}); it needs {need}. Set train.compile_routing: false "
            "to route with the eager kernels (same results, slower)."
        ) from e


def choose_compiled_kernels(setting: bool | None, device_type: str) -> tuple[bool, str | None]:
    """What ``train.compile_routing`` means on ``device_type``: (compile the kernels?, a warning or None).

    True and False are taken as given (True fails later with :class:`KernelCompileError`
    where nothing can be compiled). None (the default) compiles on a CPU, where the
    compiled kernels are faster, provided that they can be built here; elsewhere
    (CUDA, where they are slower, and MPS) it does not.
    """
    if setting is not None:
        return bool(setting), None
    if device_type != "cpu":
        return False, None
    try:
        _check_kernels(device_type)
    except KernelCompileError as e:
        reason = str(e.__cause__ or e).strip().splitlines()
        return False, (
            "the routing's compiled kernels cannot be built here "
            f"({reason[0][:200] if reason else type(e).__name__}); routing with the eager kernels "
            "(same results, slower). Set train.compile_routing: false to skip this check."
        )
    return True, None


def _weighted_moments(w: Tensor, moments: Tensor, fused: bool) -> Tensor:
    """sum_i w_i [D_i, D_i^2] per row: (B, I) -> (B, 2H); ``moments`` is D (fused) or [D, D^2]."""
    if fused:
        return _kernel(_moments_kernel)(w, moments)
    return torch.bmm(w.unsqueeze(1), moments).squeeze(1)


def _quadratic(coeff: Tensor, bias: Tensor, moments: Tensor, fused: bool) -> Tensor:
    """bias + coeff . [D_i, D_i^2] per row and child: (B, 2H), (B,) -> (B, I)."""
    if fused:
        return _kernel(_quadratic_kernel)(coeff, bias, moments)
    return torch.baddbmm(bias[:, None, None], coeff.unsqueeze(1), moments.transpose(1, 2)).squeeze(1)


def _vote_gradient(
    left: Tensor, right: Tensor, moments: Tensor, fused: bool, out: Tensor | None = None
) -> Tensor:
    """d(loss)/dV for d(loss)/d[D, D^2] = left @ right: (B, I, H), or written into ``out`` (the votes' layout)."""
    if fused:
        g_votes = _kernel(_vote_gradient_kernel)(left, right, moments)
        return g_votes if out is None else out.copy_(g_votes.view(out.shape))
    h = moments.shape[-1] // 2
    g = torch.bmm(left, right)  # (B, I, 2H)
    # d/dV of [V - s, (V - s)^2] = [1, 2 (V - s)]
    if out is None:  # in place into the first half of g: (B, I, H) with a stride of 2H
        return g[..., :h].addcmul_(moments[..., :h], g[..., h:], value=2.0)
    shape = out.shape
    return torch.addcmul(
        g[..., :h].view(shape), moments[..., :h].view(shape), g[..., h:].view(shape), value=2.0, out=out
    )


def _moment_width(h: int, fused: bool) -> int:
    """Last dimension of a chunk's moments: [V - s, (V - s)^2], or V - s alone with compiled contractions."""
    return h if fused else 2 * h


class _Workspace:
    """Buffers reused by every chunk of one routing call.

    A chunk's moments and votes are dead once the chunk is routed; writing the
    next chunk into the same (cache-warm) memory instead of fresh allocations
    saves most of the cost of building them.
    """

    def __init__(self, votes: Tensor | VoteProduct, samples: int, moments: bool = True, fused: bool = False):
        _, positions, types, children, h = _vote_geometry(votes)
        like = votes.poses if isinstance(votes, VoteProduct) else votes
        width = _moment_width(h, fused)
        self.moments = like.new_empty(samples * positions * types * children * width) if moments else None
        self.votes = (
            like.new_empty(samples * positions * types * children * h)
            if isinstance(votes, VoteProduct)
            else None
        )


def _copy_rows(dst: Tensor, src: Tensor) -> None:
    """``dst.copy_(src)`` for two layouts whose last dimension (a pose row) is contiguous in both.

    Moving between the product layout and the routing layout is a transpose whose
    contiguous runs are single pose rows (4 floats). Reinterpreting each row as
    one 16-byte element (a bit-exact view, no arithmetic) makes the copy move
    whole rows, several times faster than element by element.
    """
    row_bytes = src.shape[-1] * src.element_size()
    if row_bytes % 16 == 0 and src.device.type == "cpu":
        try:
            units_dst, units_src = dst.view(torch.complex128), src.view(torch.complex128)
            if row_bytes == 16:  # one unit per row: drop the unit dimension, or the copy loops over it
                units_dst, units_src = units_dst.squeeze(-1), units_src.squeeze(-1)
            units_dst.copy_(units_src)
            return
        except RuntimeError:  # a stride or offset that is not a whole number of 16-byte units
            pass
    dst.copy_(src)


#: Earlier name of :class:`VoteProduct`.
LazyVotes = VoteProduct

#: The fast path routes a chunk of samples at a time (routing never mixes
#: samples), sized so that the chunk's moments [V - s, (V - s)^2] take about this
#: many bytes, and no tensor of the whole batch's vote size is ever allocated.
#: Smaller chunks keep the moments in cache across the iterations' passes over
#: them, larger ones pay the fixed cost of each small operation on the
#: per-parent statistics for more samples at once. On a 2-core CPU, with the
#: small model at batch 32 on 32x32 inputs, 32 MiB (4 samples) trained 20% and
#: inferred 17% faster than 8 MiB (one sample), for about 90 MB more peak memory.
CHUNK_BYTES = 32 << 20
#: Training chunks with the compiled contractions (:func:`use_compiled_kernels`), counted
#: like every budget here in bytes of [V - s, (V - s)^2] (those kernels keep only V - s,
#: half of it). There smaller chunks are faster as well as leaner: at batch 32 on 32x32
#: inputs, 12 MiB (one or two samples) trained up to 10% faster than 32 MiB, for 40-70 MiB
#: less peak memory, on both the paper's and the padded geometry; at batch 32 and 256 on
#: the Fashion-MNIST geometry, 10-30% faster.
FUSED_CHUNK_BYTES = 12 << 20
#: Routing without autograd (``capsnet eval``, inference in general) keeps nothing for a
#: backward, so on a CPU its chunks are larger: at batch 32 on 32x32 inputs, 256 MiB chunks
#: inferred 14% (eager) and 25% (compiled kernels, padded stem) faster than 32 MiB ones,
#: for up to a few hundred MB more while inferring. A training run evaluates with its
#: training chunks (:func:`training_chunks`), so its peak stays that of its steps.
INFERENCE_CHUNK_BYTES = 256 << 20
#: On a GPU, where each operation has a launch cost and memory is plentiful, chunks are larger.
GPU_CHUNK_BYTES = 1 << 30
_training_chunks = False


@contextlib.contextmanager
def training_chunks() -> Iterator[None]:
    """Within it, routing without autograd uses the training chunks too.

    :data:`CHUNK_BYTES`, or :data:`FUSED_CHUNK_BYTES` with the compiled contractions.
    """
    global _training_chunks
    before, _training_chunks = _training_chunks, True
    try:
        yield
    finally:
        _training_chunks = before


def _vote_geometry(votes: Tensor | VoteProduct) -> tuple[int, int, int, int, int]:
    """(N, L, C, I, H) of a vote tensor or product."""
    if isinstance(votes, VoteProduct):
        n, positions, types, p = votes.shape
        return n, positions, types, votes.poses.shape[0], p * p
    n, positions, types, children = votes.shape[:4]
    return n, positions, types, children, votes[0, 0, 0, 0].numel()


def _sample_chunks(
    geom: tuple[int, ...], like: Tensor, inference: bool = False, fused: bool = False
) -> list[tuple[int, int]]:
    """(start, stop) of each chunk of samples; ``inference``: routing without autograd; ``fused``: compiled."""
    per_sample = 2 * math.prod(geom[1:]) * like.element_size()  # bytes of [V - s, (V - s)^2] per sample
    if like.device.type != "cpu":
        budget = GPU_CHUNK_BYTES
    elif inference and not _training_chunks:
        budget = INFERENCE_CHUNK_BYTES
    else:
        budget = FUSED_CHUNK_BYTES if fused else CHUNK_BYTES
    step = max(1, budget // max(per_sample, 1))
    return [(start, min(start + step, geom[0])) for start in range(0, geom[0], step)]


def _centring_weights(act: Tensor) -> Tensor:
    """a_i / sum_i a_i over each position's children: (n, L, I); zero where every child is inactive."""
    return act / act.sum(-1, keepdim=True).clamp_min(torch.finfo(act.dtype).tiny)


def _build_moments(
    votes: Tensor | VoteProduct,
    act: Tensor,
    start: int,
    stop: int,
    out: Tensor | None = None,
    work: _Workspace | None = None,
    fused: bool = False,
) -> tuple[Tensor, Tensor]:
    """[V - s, (V - s)^2] of samples ``start:stop`` as one (B, I, 2H) tensor, and s = mean_i V_ij.

    With ``fused`` (compiled contractions), only V - s, (B, I, H). Written with
    ``out=`` and in place (no autograd), into ``out`` when given. The routing is
    invariant to a per-parent shift of its votes (so its backward treats s as a
    constant); centring keeps E[V^2] - E[V]^2 accurate in float32. s is the mean
    weighted by the children's activations ``act`` (N, L, I), not the plain mean:
    inactive children may vote hundreds of units away from the active ones that
    decide each parent's mean and variance, and a plain-mean centre would leave
    those as differences of squares of hundreds, with no correct digit left. The
    weighted mean costs one matrix product per chunk in place of the plain mean's
    reduction, and is no slower.
    """
    _, positions, types, children, h = _vote_geometry(votes)
    n = stop - start
    width = _moment_width(h, fused)
    if out is None and work is not None and work.moments is not None:
        out = _leading(work.moments, (n * positions * types, children, width))
    if isinstance(votes, VoteProduct):
        p = votes.shape[3]
        v = votes.product(
            start, stop, None if work is None else work.votes
        )  # (I, n*L*P, C*P), ours to change
        w = _centring_weights(act[start:stop]).reshape(n * positions, 1, children)
        per_position = v.view(children, n * positions, p * types * p).transpose(0, 1)  # (n*L, I, P*C*P)
        with torch.autocast(v.device.type, enabled=False):  # backward rebuilds this under any autocast
            mean = torch.bmm(w, per_position).view(1, n * positions * p, types * p)
        v.sub_(mean)  # centred in the product's layout, where it is contiguous
        both = v.new_empty(n * positions * types, children, width) if out is None else out  # (B, I, 2H)
        centred = both[..., :h].view(n, positions, types, children, p, p)
        _copy_rows(centred, v.view(children, n, positions, p, types, p).permute(1, 2, 4, 0, 3, 5))
        shift = mean.view(n, positions, p, types, p).transpose(2, 3)  # (n, L, C, P, P)
    else:
        v = votes[start:stop]  # (n, L, C, I, *pose)
        both = v.new_empty(n * positions * types, children, width) if out is None else out  # (B, I, 2H)
        w = _centring_weights(act[start:stop])  # (n, L, I)
        flat = v.reshape(n, positions, types, children, h)
        with torch.autocast(v.device.type, enabled=False):
            shift = torch.matmul(w[:, :, None, None, :], flat).view(n, positions, types, 1, *v.shape[4:])
        centred = both[..., :h].view(v.shape)
        torch.sub(v, shift, out=centred)
    if not fused:
        torch.mul(centred, centred, out=both[..., h:].view(centred.shape))
    return both, shift.reshape(n, positions, types, h)


def _traceable_moments(votes: Tensor | VoteProduct, act: Tensor) -> tuple[Tensor, Tensor]:
    """The same as :func:`_build_moments` for the whole batch, in plain differentiable operations."""
    n, positions, types, children, h = _vote_geometry(votes)
    v = votes.compute() if isinstance(votes, VoteProduct) else votes
    v = v.reshape(n, positions, types, children, h)
    w = _centring_weights(act.detach())[:, :, None, None, :]  # (N, L, 1, 1, I)
    shift = torch.matmul(w, v.detach())  # (N, L, C, 1, H)
    centred = v - shift
    both = torch.cat([centred, centred * centred], dim=-1).reshape(n * positions * types, children, 2 * h)
    return both, shift.reshape(n, positions, types, h)


class _MStep(NamedTuple):
    denom: Tensor  # (N, L, C, 1) max(sum_i R_ij, RSUM_FLOOR)
    moments: Tensor  # (N, L, C, 2H) [E[V - s], E[(V - s)^2]]
    mu: Tensor  # (N, L, C, H) centred mean
    var: Tensor  # (N, L, C, H)
    log_var_sum: Tensor  # (N, L, C) sum_h ln sigma_h^2
    unit: Tensor  # (N, L, C) sum_h (beta_u + ln sigma_h)
    logit: Tensor  # (N, L, C) lambda (beta_a - cost), cost = scale * rsum * unit


def _m_step(sums, rsum, h_beta_u, beta_a, lam, scale, min_var) -> _MStep:
    """One M-step from its moment sums (forward, and again in the hand-written backward)."""
    h = sums.shape[-1] // 2
    denom = rsum.clamp_min(RSUM_FLOOR)[..., None]
    moments = sums / denom
    mu = moments[..., :h]
    excess = torch.addcmul(moments[..., h:], mu, mu, value=-1.0)
    # excess >= 0 in exact arithmetic: the clamp only keeps rounding (a parent fed by one child,
    # whose spread is 0) from going below it, so the variance's gradient passes it unchanged;
    # masked, it would drop the variance's whole dependence on the children there
    floored = excess.clamp_min(0.0)
    if excess.requires_grad:  # autograd's path (tracing, export); the hand-written backward passes it too
        floored = excess + (floored - excess).detach()
    var = floored + min_var
    log_var_sum = torch.log(var).sum(-1)
    unit = torch.add(h_beta_u, log_var_sum, alpha=0.5)
    logit = torch.addcmul(lam * beta_a, rsum, unit, value=-lam * scale)
    return _MStep(denom, moments, mu, var, log_var_sum, unit, logit)


def _em_iterations(
    both, act_in, beta_u, beta_a, settings, fold, geom, saved: list | None = None, fused=False, check=None
):
    """The EM iterations on the moments ``both`` = [V - s, (V - s)^2] (B, I, 2H).

    M-step sums and E-step quadratic forms are batched matrix products over
    ``both`` (with ``fused``, ``both`` holds V - s alone and the contractions are
    compiled loops). Returns the centred means mu, variances, activations and the last
    assignments; ``saved`` receives, per iteration, the assignments entering it
    and its moment sums (all that the hand-written backward needs).

    The same equations as :func:`_em_plain`, grouped into fewer operations: a chunk
    is a few samples, so each operation's fixed cost counts as much as its
    arithmetic. sum_h cost_h = rsum * (H beta_u + sum_h ln sigma_h), and the E-step's
    per-parent terms (ln a_j and the constant of ln p_ij) enter the product that
    makes the quadratic form. The constant H ln(2 pi) / 2, the same for every
    parent, is left out: the normalisation over parents cancels it. ``check`` (a list)
    receives, per iteration, what :func:`_needs_plain_routing` needs.
    """
    n, positions, types, children, h = geom
    batch = n * positions * types
    r = initial_assignments(n, positions, types, children, fold, both.dtype, both.device)  # (N, L, C, I)
    a_in = act_in[:, :, None, :]  # (N, L, 1, I)
    lambdas = inverse_temperatures(settings)
    scale = cost_scale(settings, types, children)
    h_beta_u = h * beta_u  # (C,)
    for t, lam in enumerate(lambdas):
        weight = r * a_in  # (N, L, C, I)
        rsum = weight.sum(-1)  # (N, L, C)
        sums = _weighted_moments(weight.reshape(batch, children), both, fused).view(
            n, positions, types, 2 * h
        )
        if saved is not None:
            saved += [r, sums]
        m = _m_step(sums, rsum, h_beta_u, beta_a, lam, scale, settings.min_var)
        mu, var, log_var_sum, logit = m.mu, m.var, m.log_var_sum, m.logit
        act = torch.sigmoid(logit)
        if check is not None:
            check.append(torch.stack([torch.amax(mu * mu / var), -torch.amin(rsum)]))
        if t < len(lambdas) - 1:
            inv = torch.reciprocal(var)
            coeff = torch.cat([mu * inv, -0.5 * inv], dim=-1)  # (N, L, C, 2H)
            # ln a_j + ln p_ij = [ln a_j - (sum_h mu^2 / sigma^2 + ln sigma^2) / 2] + coeff_j . both_i
            inner = (mu * coeff[..., :h]).sum(-1) + log_var_sum
            bias = torch.add(torch.nn.functional.logsigmoid(logit), inner, alpha=-0.5)  # (N, L, C)
            logits = _quadratic(coeff.reshape(batch, 2 * h), bias.reshape(batch), both, fused)  # (B, I)
            r = normalise_assignments(logits.view(n, positions, types, children), fold)
    return mu, var, act, r


def _needs_plain_routing(check: list[Tensor], dtype: torch.dtype) -> bool:
    """Whether a chunk's fast routing is to be redone by the plain path: some iteration's parent
    has mu^2 / sigma^2 beyond :data:`CANCELLATION_LIMIT` units in the last place, or
    sum_i R_ij below :data:`RSUM_FLOOR` (one synchronisation per chunk)."""
    worst = torch.stack(check).amax(0)  # [max mu^2 / sigma^2, -min sum_i R_ij]
    limit = CANCELLATION_LIMIT / torch.finfo(dtype).eps
    return bool(((worst[0] > limit) | (worst[1] > -RSUM_FLOOR)).item())


def _plain_pieces(start: int, stop: int, geom: tuple[int, ...], like: Tensor) -> list[tuple[int, int]]:
    """Samples ``start:stop`` in the pieces that the plain path routes them in where a chunk falls
    back to it: its temporaries take many times the votes, so the pieces are about
    :data:`CHUNK_BYTES` of moments, whatever the chunk (on a GPU, as large as a whole batch)."""
    per_sample = 2 * math.prod(geom[1:]) * like.element_size()
    step = max(1, CHUNK_BYTES // max(per_sample, 1))
    return [(a, min(a + step, stop)) for a in range(start, stop, step)]


def _chunk_votes(votes: Tensor | VoteProduct, start: int, stop: int) -> Tensor:
    """Votes of samples ``start:stop`` as a (n, L, C, I, ...) tensor."""
    return votes.compute(start, stop) if isinstance(votes, VoteProduct) else votes[start:stop]


def _route_in_chunks(
    votes, act_in, beta_u, beta_a, settings, fold, want_final, keep=None, keep_both=True, fused=False
):
    """Routes each chunk of samples on its own; returns pose, activation and (r, var) of the last iteration.

    ``keep`` (a dict) receives what :func:`_routing_backward` needs: the
    assignments entering iterations 1.. ("r"), every iteration's moment sums
    ("sums") and, with ``keep_both``, the moments themselves ("both"); and "plain",
    the first samples of the chunks that the plain path routed instead (their
    backward is the plain path's). Everything that outlives a chunk is allocated for
    the whole batch up front, so the chunks' temporaries reuse the same memory
    instead of fragmenting the heap.
    """
    n, positions, types, children, h = geom = _vote_geometry(votes)
    iterations = settings.iterations
    new = act_in.new_empty
    pose, act = new(n, positions, types, h), new(n, positions, types)
    final = (new(n, positions, types, children), new(n, positions, types, h)) if want_final else (None, None)
    if keep is not None:
        keep["plain"] = set()
        keep["r"] = new(max(iterations - 1, 0), n, positions, types, children)
        keep["sums"] = new(iterations, n, positions, types, 2 * h)
        keep["both"] = new(n * positions * types, children, _moment_width(h, fused)) if keep_both else None
    chunks = _sample_chunks(geom, act_in, inference=keep is None, fused=fused)
    if fused:
        _check_kernels(act_in.device.type)
    kept = keep is not None and keep_both
    work = _Workspace(votes, max(b - a for a, b in chunks), moments=not kept, fused=fused)
    for start, stop in chunks:
        rows = slice(start * positions * types, stop * positions * types)
        both, shift = _build_moments(
            votes, act_in, start, stop, keep["both"][rows] if kept else None, work, fused
        )
        saved = [] if keep is not None else None
        check: list[Tensor] = []
        mu, var, a, r = _em_iterations(
            both,
            act_in[start:stop],
            beta_u,
            beta_a,
            settings,
            fold,
            (stop - start, *geom[1:]),
            saved,
            fused,
            check,
        )
        del both
        if _needs_plain_routing(check, act_in.dtype):
            for a0, a1 in _plain_pieces(start, stop, geom, act_in):
                mu, var, a, r = _plain_iterations(
                    _chunk_votes(votes, a0, a1), act_in[a0:a1], beta_u, beta_a, settings, fold
                )
                pose[a0:a1], act[a0:a1] = mu, a
                if want_final:
                    final[0][a0:a1], final[1][a0:a1] = r, var
            if keep is not None:
                keep["plain"].add(start)
        else:
            torch.add(mu, shift, out=pose[start:stop])
            act[start:stop] = a
            if want_final:
                final[0][start:stop] = r
                final[1][start:stop] = var
        if keep is not None:
            for t in range(iterations):
                keep["sums"][t, start:stop] = saved[2 * t + 1]
                if t > 0:
                    keep["r"][t - 1, start:stop] = saved[2 * t]
    return pose, act, final


def _dense_strides(t: Tensor) -> tuple[int, ...]:
    """``t``'s strides when its elements tile memory without gaps or overlaps, else the contiguous ones.

    The vote gradient is written in the votes' own layout (the routing's copies
    then move rows within it); a broadcast (stride-0) or sliced tensor has no
    such layout to write into, so its gradient is made contiguous instead.
    """
    expected = 1
    for size, stride in sorted(zip(t.shape, t.stride()), key=lambda d: d[1]):
        if size == 1:
            continue
        if stride != expected:
            return torch.empty(t.shape, device="meta").stride()
        expected *= size
    return t.stride()


class _Job:
    """Non-tensor inputs of one routing call, and its final state for the statistics."""

    def __init__(self, votes, settings, fold, want_final):
        self.product = isinstance(votes, VoteProduct)
        self.shape = votes.shape if self.product else None
        self.recompute = self.product and votes.recompute
        self.layout = None if self.product else (votes.shape, _dense_strides(votes))
        self.geom = _vote_geometry(votes)
        self.settings, self.fold, self.want_final = settings, fold, want_final
        self.fused = _compiled_kernels
        self.chunks: list[tuple[int, int]] = []
        self.plain: set[int] = set()  # first samples of the chunks routed by the plain path
        self.final: tuple[Tensor, Tensor] | None = None  # (r, var) of the last iteration


class _FastRouting(torch.autograd.Function):
    """EM routing with a hand-written backward, one chunk of samples at a time.

    Forward keeps, per chunk, each iteration's assignments and moment sums, and
    the chunk's moments ``both`` (for a :class:`VoteProduct` with ``recompute``,
    not even those: backward rebuilds them). Backward runs the iterations in
    reverse on (N, L, C, I)- and (N, L, C, H)-sized tensors; the gradient of
    ``both`` is a sum of rank-one pieces per parent (weights x moment gradients
    from the M-steps, log-likelihood gradients x E-step coefficients), applied in
    one product per chunk, followed by the product rule into M and W.
    """

    @staticmethod
    def forward(ctx, job: _Job, act_in: Tensor, beta_u: Tensor, beta_a: Tensor, *vote_inputs: Tensor):
        votes = VoteProduct(*vote_inputs, job.shape) if job.product else vote_inputs[0]
        keep: dict[str, Tensor | None] = {}
        pose, act, job.final = _route_in_chunks(
            votes,
            act_in,
            beta_u,
            beta_a,
            job.settings,
            job.fold,
            job.want_final,
            keep,
            not job.recompute,
            job.fused,
        )
        job.chunks = _sample_chunks(job.geom, act_in, fused=job.fused)
        job.plain = keep["plain"]
        ctx.job = job
        # a vote tensor is kept only where the plain path must differentiate some chunk
        inputs = vote_inputs if job.product or job.plain else ()
        kept = () if job.recompute else (keep["both"],)
        ctx.save_for_backward(act_in, beta_u, beta_a, keep["r"], keep["sums"], *inputs, *kept)
        return pose, act

    @staticmethod
    @once_differentiable
    def backward(ctx, g_pose: Tensor, g_act: Tensor):
        job: _Job = ctx.job
        act_in, beta_u, beta_a, r_saved, sums_saved, *rest = ctx.saved_tensors
        inputs = tuple(rest[:2]) if job.product else tuple(rest[:1]) if job.plain else ()
        needs = ctx.needs_input_grad
        _, positions, types, children, _ = job.geom
        g_act_in = torch.zeros_like(act_in)
        g_beta_u, g_beta_a = torch.zeros_like(beta_u), torch.zeros_like(beta_a)
        sink = _VoteGradients(job, inputs, needs[4:], act_in)
        if job.recompute:
            product = VoteProduct(*inputs, job.shape)
            work = _Workspace(product, max(b - a for a, b in job.chunks), fused=job.fused)
        for start, stop in job.chunks:
            if start in job.plain:
                for a0, a1 in _plain_pieces(start, stop, job.geom, act_in):
                    g_a, g_u, g_b = _plain_chunk_backward(
                        job, inputs, needs, act_in, beta_u, beta_a, a0, a1, g_pose, g_act, sink
                    )
                    g_act_in[a0:a1] = g_a
                    g_beta_u += g_u
                    g_beta_a += g_b
                continue
            rows = slice(start * positions * types, stop * positions * types)
            if job.recompute:
                both = _build_moments(product, act_in, start, stop, work=work, fused=job.fused)[0]
            else:
                both = rest[-1][rows]
            r0 = initial_assignments(
                stop - start, positions, types, children, job.fold, both.dtype, both.device
            )
            pairs = [
                (r0 if t == 0 else r_saved[t - 1, start:stop], sums_saved[t, start:stop])
                for t in range(sums_saved.shape[0])
            ]
            geom = (stop - start, *job.geom[1:])
            left, right, (g_a, g_u, g_b) = _routing_backward(
                both,
                act_in[start:stop],
                beta_u,
                beta_a,
                pairs,
                g_pose[start:stop],
                g_act[start:stop],
                job.settings,
                job.fold,
                geom,
                job.fused,
            )
            g_act_in[start:stop] = g_a
            g_beta_u += g_u
            g_beta_a += g_b
            # A rebuilt chunk's product-layout votes are dead once its moments exist: the
            # vote gradient is laid out in the same buffer.
            sink.add(both, left, right, start, stop, work.votes if job.recompute else None)
            del both, left, right
        return (
            None,
            g_act_in if needs[1] else None,
            g_beta_u if needs[2] else None,
            g_beta_a if needs[3] else None,
            *sink.result(),
        )


def _plain_chunk_backward(job, inputs, needs, act_in, beta_u, beta_a, start, stop, g_pose, g_act, sink):
    """Gradients of a chunk that the plain path routed: autograd through :func:`_plain_iterations`
    on the chunk's votes, rebuilt from the inputs. Returns those of act_in, beta_u and beta_a, and
    hands the votes' (or M's and W's) to ``sink``. Under any autocast, in the forward's dtype."""
    with torch.enable_grad(), torch.autocast(act_in.device.type, enabled=False):
        a = act_in[start:stop].detach().requires_grad_()
        u, b = beta_u.detach().requires_grad_(), beta_a.detach().requires_grad_()
        if job.product:
            _, positions, types, p = job.shape
            rows = slice(start * positions * p, stop * positions * p)
            leaves = [inputs[0][:, rows].detach(), inputs[1].detach()]
            leaves = [x.requires_grad_(need) for x, need in zip(leaves, needs[4:6])]
            votes = VoteProduct(*leaves, (stop - start, positions, types, p)).compute()
        else:
            leaves = [inputs[0][start:stop].detach().requires_grad_(needs[4])]
            votes = leaves[0]
        mu, _, act, _ = _plain_iterations(votes, a, u, b, job.settings, job.fold)
        wrt = [a, u, b, *(x for x in leaves if x.requires_grad)]
        grads = torch.autograd.grad(
            (mu, act), wrt, (g_pose[start:stop], g_act[start:stop]), allow_unused=True
        )
    grads = [torch.zeros_like(x) if g is None else g for x, g in zip(wrt, grads)]
    sink.add_grads(start, stop, iter(grads[3:]))
    return grads[0], grads[1], grads[2]


def _routing_backward(both, act_in, beta_u, beta_a, pairs, g_pose, g_act, settings, fold, geom, fused=False):
    """Reverse pass of :func:`_em_iterations` on one chunk of samples.

    Returns the rank-one factors of d(loss)/d(both) (``left`` (B, I, 1) and
    ``right`` (B, 1, 2H) per piece) and the gradients of act_in, beta_u, beta_a.
    """
    n, positions, types, children, h = geom
    batch = n * positions * types
    lambdas = inverse_temperatures(settings)
    scale = cost_scale(settings, types, children)
    a_in = act_in[:, :, None, :]  # (N, L, 1, I)
    g_act_in = torch.zeros_like(act_in)
    g_beta_u = torch.zeros_like(beta_u)
    g_beta_a = torch.zeros_like(beta_a)
    left: list[Tensor] = []
    right: list[Tensor] = []
    g_r = None  # d(loss)/d(assignments made by this iteration's E-step)
    last = len(lambdas) - 1
    h_beta_u = h * beta_u  # (C,)
    for t in range(last, -1, -1):
        lam = lambdas[t]
        r, sums = pairs[t]
        # This iteration's small quantities, recomputed from its saved moment sums.
        weight = r * a_in  # (N, L, C, I)
        rsum = weight.sum(-1)  # (N, L, C)
        m = _m_step(sums, rsum, h_beta_u, beta_a, lam, scale, settings.min_var)
        denom, moments, mu, unit = m.denom, m.moments, m.mu, m.unit
        inv = torch.reciprocal(m.var)
        act = torch.sigmoid(m.logit)  # (N, L, C)
        if t == last:
            g_mu = g_pose
            g_var_e = None
            g_logit = g_act * act * (1.0 - act)
        else:
            # E-step: r' = normalise(ln a_j + const_j + coeff_j . both_i) over every parent a child feeds.
            r_next = pairs[t + 1][0]
            prod = r_next * g_r
            inner = prod.sum(2)  # (N, L, I)
            if fold is not None:
                inner = fold.sum(inner)
            g_logits = torch.addcmul(prod, r_next, inner[:, :, None, :], value=-1.0)  # (N, L, C, I)
            g_sum = g_logits.sum(-1)  # (N, L, C): gradient of ln a_j and of const_j
            c1 = mu * inv
            coeff = torch.cat([c1, -0.5 * inv], dim=-1)  # (N, L, C, 2H)
            g_flat = g_logits.reshape(batch, 1, children)
            g_coeff = _weighted_moments(g_logits.reshape(batch, children), both, fused)
            g_coeff = g_coeff.view(n, positions, types, 2 * h)
            left.append(g_flat.transpose(1, 2))
            right.append(coeff.reshape(batch, 1, 2 * h))
            g_c1, g_c2 = g_coeff[..., :h], g_coeff[..., h:]
            gs = g_sum[..., None]
            g_mu = torch.addcmul(g_c1, gs, mu, value=-1.0) * inv
            # d/d var of c1 . m1 + c2 . m2 + const, times var: (g_c2 / 2 - g_c1 mu) / var + gs (mu^2 / var - 1) / 2
            g_var_e = torch.addcmul(
                torch.addcmul(0.5 * g_c2, g_c1, mu, value=-1.0) * inv, gs, c1 * mu - 1.0, value=0.5
            )
            g_logit = torch.addcmul(g_sum, g_sum, act, value=-1.0)  # d ln sigmoid(x) / dx = 1 - sigmoid(x)
        # Activation: a_j = sigmoid(lambda (beta_a - scale * rsum * sum_h (beta_u + ln sigma_h))).
        g_beta_a += lam * g_logit.sum((0, 1))
        g_cost = -lam * scale * g_logit  # (N, L, C), per unit of rsum * sum_h (...)
        g_rsum = g_cost * unit
        g_cost_r = g_cost * rsum
        g_beta_u += g_cost_r.sum((0, 1)) * h
        half = (0.5 * g_cost_r)[..., None]
        g_var = (half if g_var_e is None else g_var_e + half) * inv
        # M-step: mu = s1 / d, var = (s2 / d - mu^2) + floor, d = max(rsum, RSUM_FLOOR) (the clamp
        # of s2 / d - mu^2 at 0 guards against rounding alone: see _m_step).
        g_mu = torch.addcmul(g_mu, mu, g_var, value=-2.0)
        g_sums = torch.cat([g_mu, g_var], dim=-1) / denom  # (N, L, C, 2H)
        g_denom = (g_sums * moments).sum(-1)  # minus d(loss)/d(d)
        g_rsum = torch.where(rsum >= RSUM_FLOOR, g_rsum - g_denom, g_rsum)
        g_sums_flat = g_sums.reshape(batch, 1, 2 * h)
        g_weight = _quadratic(g_sums.reshape(batch, 2 * h), g_rsum.reshape(batch), both, fused)
        g_weight = g_weight.view(n, positions, types, children)
        left.append(weight.reshape(batch, children, 1))
        right.append(g_sums_flat)
        g_act_in += (g_weight * r).sum(2)
        if t > 0:
            g_r = g_weight * a_in
    return left, right, (g_act_in, g_beta_u, g_beta_a)


class _VoteGradients:
    """Collects d(loss)/dV = G[..., :H] + 2 (V - s) G[..., H:] chunk by chunk, G = sum of rank-one pieces.

    For a :class:`VoteProduct` each chunk's vote gradient becomes gradients of M
    and W at once (V = M W), so no tensor of the whole batch's vote size exists.
    """

    def __init__(self, job: _Job, inputs: tuple[Tensor, ...], needs: tuple[bool, ...], like: Tensor):
        self.job, self.inputs, self.needs = job, inputs, needs
        if job.product:
            self.grads = [torch.zeros_like(x) if need else None for x, need in zip(inputs, needs)]
        elif needs[0]:
            shape, stride = job.layout
            self.grads = [torch.empty_strided(shape, stride, dtype=like.dtype, device=like.device)]
        else:
            self.grads = [None]

    def add(
        self,
        both: Tensor,
        left: list[Tensor],
        right: list[Tensor],
        start: int,
        stop: int,
        spare: Tensor | None = None,
    ) -> None:
        """Adds the gradients from samples ``start:stop``; ``spare``: a free buffer of at least a chunk's votes."""
        if not any(self.needs):
            return
        job = self.job
        left_all, right_all = torch.cat(left, dim=2), torch.cat(right, dim=1)  # every iteration's pieces
        if not job.product:
            _vote_gradient(left_all, right_all, both, job.fused, out=self.grads[0][start:stop])
            return
        _, positions, types, p = job.shape
        children, n = both.shape[1], stop - start
        g_votes = _vote_gradient(left_all, right_all, both, job.fused)  # (B, I, H)
        layout = (children, n * positions * p, types * p)  # the product's layout
        flat = both.new_empty(layout) if spare is None else _leading(spare, layout)
        target = flat.view(children, n, positions, p, types, p).permute(1, 2, 4, 0, 3, 5)
        _copy_rows(target, g_votes.view(n, positions, types, children, p, p))
        poses, weight = self.inputs
        g_poses, g_weight = self.grads
        rows = slice(start * positions * p, stop * positions * p)
        if g_poses is not None:
            g_poses[:, rows] = torch.bmm(flat, weight.transpose(1, 2))
        if g_weight is not None:
            g_weight += torch.bmm(poses[:, rows].transpose(1, 2), flat)

    def add_grads(self, start: int, stop: int, grads: Iterator[Tensor]) -> None:
        """Adds the gradients of samples ``start:stop`` taken by autograd: of their votes (a tensor),
        or of their rows of M and of W (a product); one for each input whose gradient is needed."""
        if self.job.product:
            _, positions, _, p = self.job.shape
            rows = slice(start * positions * p, stop * positions * p)
            g_poses, g_weight = self.grads
            if g_poses is not None:
                g_poses[:, rows] = next(grads)
            if g_weight is not None:
                g_weight += next(grads)
        elif self.grads[0] is not None:
            self.grads[0][start:stop] = next(grads)

    def result(self) -> list[Tensor | None]:
        return self.grads


def _em_fast(votes, act_in, beta_u, beta_a, settings, fold, want_stats):
    tensors = (act_in, beta_u, beta_a, *(votes[:2] if isinstance(votes, VoteProduct) else (votes,)))
    tracing = torch.compiler.is_compiling()
    if tracing:
        # torch.compile and export trace plain differentiable operations on the whole batch.
        geom = _vote_geometry(votes)
        both, shift = _traceable_moments(votes, act_in)
        mu, var, act, r = _em_iterations(both, act_in, beta_u, beta_a, settings, fold, geom)
        pose = mu + shift
    elif torch.is_grad_enabled() and any(x.requires_grad for x in tensors):
        job = _Job(votes, settings, fold, want_stats)
        inputs = votes[:2] if job.product else (votes,)
        pose, act = _FastRouting.apply(job, act_in, beta_u, beta_a, *inputs)
        (r, var), job.final = job.final, None
    else:
        pose, act, (r, var) = _route_in_chunks(
            votes, act_in, beta_u, beta_a, settings, fold, want_stats, fused=_compiled_kernels
        )
    stats = routing_stats(r, act, var, fold) if want_stats else None
    return RoutingResult(pose, act, stats)


# --------------------------------------------------------------------------- entry point


def em_routing(
    votes: Tensor | VoteProduct,
    act_in: Tensor,
    beta_u: Tensor,
    beta_a: Tensor,
    settings: RoutingSettings,
    fold: ChildFold | None = None,
    *,
    impl: str = "fast",
    stats: bool = False,
    trace: list | None = None,
) -> RoutingResult:
    """EM routing between one layer of children and one layer of parents.

    Args:
        votes: (N, L, C, I, H) or (N, L, C, I, P, P) vote of each patch slot for each
            parent, V_ij, with any strides; or a :class:`VoteProduct` that describes
            them (the fast path then never holds the whole vote tensor, and with
            ``recompute`` rebuilds its moments in backward instead of keeping them).
        act_in: (N, L, I) activation a_i of the child in each slot.
        beta_u, beta_a: (C,) learned per parent type.
        settings: iterations, final lambda and its decay, variance floor.
        fold: child geometry of a convolutional layer; None normalises per patch.
        impl: "fast" (contractions, custom backward) or "plain" (elementwise).
        stats: also return detached routing statistics.
        trace: a list to receive, per iteration, the assignments ``r`` entering its M-step and
            the ``mu``, ``var``, ``act`` it produced (detached) and its ``lambda``; forces the
            plain path. For figures only.

    The forward routes in float32 (float64 when the child activations are float64), also
    under autocast; a backward run inside autocast computes its products in the autocast
    dtype, so run it outside, as torch advises (the trainer does).
    """
    if impl not in ("fast", "plain"):
        raise ValueError(f"em_routing: impl must be 'fast' or 'plain', got {impl!r}")
    dtype = torch.float64 if act_in.dtype == torch.float64 else torch.float32
    with torch.autocast(act_in.device.type, enabled=False):
        act_in, beta_u, beta_a = act_in.to(dtype), beta_u.to(dtype), beta_a.to(dtype)
        if settings.beta_a_logit:
            beta_a = beta_a / inverse_temperatures(settings)[-1]
        if isinstance(votes, VoteProduct):
            votes = votes._replace(poses=votes.poses.to(dtype), weight=votes.weight.to(dtype))
        else:
            votes = votes.to(dtype)
        if impl == "plain" or trace is not None:
            if isinstance(votes, VoteProduct):
                votes = votes.compute()
            _check_shapes(votes, act_in, beta_u, beta_a, fold)
            return _em_plain(votes, act_in, beta_u, beta_a, settings, fold, stats, trace)
        if not isinstance(votes, VoteProduct):
            _check_shapes(votes, act_in, beta_u, beta_a, fold)
        return _em_fast(votes, act_in, beta_u, beta_a, settings, fold, stats)


def _check_shapes(
    votes: Tensor, act_in: Tensor, beta_u: Tensor, beta_a: Tensor, fold: ChildFold | None = None
) -> None:
    if votes.dim() < 5 or act_in.shape != votes.shape[:2] + votes.shape[3:4]:
        raise ValueError(
            "em_routing: votes must be (N, L, C, I, H) or (N, L, C, I, P, P) and act_in (N, L, I); "
            f"got {tuple(votes.shape)} and {tuple(act_in.shape)}"
        )
    parents = votes.shape[2]
    if beta_u.shape != (parents,) or beta_a.shape != (parents,):
        raise ValueError(
            f"em_routing: beta_u and beta_a must be ({parents},), one per parent type of the votes; "
            f"got {tuple(beta_u.shape)} and {tuple(beta_a.shape)}"
        )
    if not _tracing() and votes.shape[0] == 0:
        raise ValueError("em_routing: the batch is empty (N = 0)")
    if (
        fold is not None
        and not _tracing()
        and votes.shape[1:2] + votes.shape[3:4]
        != (
            fold.positions,
            fold.kernel_area * fold.types,
        )
    ):
        raise ValueError(
            f"em_routing: the fold is for {fold.positions} parent positions of {fold.kernel_area * fold.types} "
            f"child slots each, but the votes have {votes.shape[1]} positions of {votes.shape[3]} slots"
        )


def _tracing() -> bool:
    """Whether torch is compiling or exporting (shapes may be symbolic: no checks that branch on them)."""
    compiler = torch.compiler
    return compiler.is_compiling() or bool(getattr(compiler, "is_exporting", lambda: False)())
