"""Losses and schedules.

Everything here is a pure function: the losses of a batch, and the learning
rate and spread-loss margin as functions of the global step. The step is stored
in every checkpoint, so a resumed run continues the schedules exactly, as long
as the run's length (train.epochs, train.max_steps) is unchanged: schedules that
span the whole run stretch or shrink with it, and the trainer says so on resume.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from capsnet.config import Config, LossConfig, OptimConfig

if TYPE_CHECKING:
    from capsnet.model import CapsNet, CapsOutput

# --------------------------------------------------------------------------- classification losses


def spread_loss(activations: Tensor, target: Tensor, margin: float) -> Tensor:
    """The paper's spread loss, averaged over the batch.

    L = sum over wrong classes i of max(0, m - (a_t - a_i))^2, where a_t is the
    activation of the target class and m the margin.
    """
    a_target = activations.gather(1, target[:, None])  # (N, 1)
    gap = (margin - (a_target - activations)).clamp(min=0).square()  # (N, E)
    wrong = torch.ones_like(gap, dtype=torch.bool).scatter_(1, target[:, None], False)  # (N, E)
    return (gap * wrong).sum(dim=1).mean()


def margin_loss(
    activations: Tensor, target: Tensor, m_plus: float = 0.9, m_minus: float = 0.1, down_weight: float = 0.5
) -> Tensor:
    """The margin loss of Sabour et al. (2017), on activations in (0, 1), averaged over the batch.

    L = T_k max(0, m+ - a_k)^2 + down_weight (1 - T_k) max(0, a_k - m-)^2, summed over classes k.
    """
    present = F.one_hot(target, activations.shape[1]).to(activations.dtype)  # (N, E)
    hit = (m_plus - activations).clamp(min=0).square()  # (N, E)
    miss = (activations - m_minus).clamp(min=0).square()  # (N, E)
    return (present * hit + down_weight * (1 - present) * miss).sum(dim=1).mean()


def class_scores(activations: Tensor) -> Tensor:
    """The scores behind class activations a = sigmoid(score): ln a - ln(1 - a), (N, E).

    Computed as such they stay exact, with a gradient, for activations down to the
    smallest positive float (a score of about -87 in float32); above, only an
    activation that has rounded to exactly 1 (a score above about 16.6) is held
    just below 1 and passes no gradient. Clamping to [eps, 1 - eps] instead would
    leave a class below eps (a score below -13.8 for eps 1e-6) without any gradient.
    """
    finfo = torch.finfo(activations.dtype)
    low = torch.log(activations.clamp_min(finfo.tiny))
    return low - torch.log1p(-activations.clamp_max(1.0 - finfo.eps / 2))


def cross_entropy(activations: Tensor, target: Tensor) -> Tensor:
    """Softmax cross-entropy with :func:`class_scores` of the activations as logits."""
    return F.cross_entropy(class_scores(activations), target)


def distillation_loss(activations: Tensor, teacher_activations: Tensor, temperature: float) -> Tensor:
    """Knowledge distillation (Hinton, Vinyals & Dean, 2015) on class activations, averaged over the batch.

    The Kullback-Leibler divergence from the teacher's softened class distribution,
    softmax(s_t / T), to the model's, softmax(s / T), with the :func:`class_scores` s of
    each model's activations as logits, times T^2 so that its gradients keep their scale
    as T changes. The teacher's side passes no gradient.
    """
    t = temperature
    log_p = F.log_softmax(class_scores(activations) / t, dim=1)  # (N, E)
    log_q = F.log_softmax(class_scores(teacher_activations.detach()) / t, dim=1)  # (N, E)
    return F.kl_div(log_p, log_q, log_target=True, reduction="batchmean") * (t * t)


def reconstruction_loss(recon: Tensor, x: Tensor) -> Tensor:
    """Sum of squared pixel errors per sample, averaged over the batch."""
    if recon.shape != x.shape:  # the decoder draws images of the size the model was built for
        raise ValueError(
            f"reconstruction_loss: the decoder drew {tuple(recon.shape)} but the images are {tuple(x.shape)}; "
            "the decoder works only at the model's image_size (train without it: loss.recon_weight 0)"
        )
    return (recon - x).square().flatten(1).sum(dim=1).mean()


# --------------------------------------------------------------------------- schedules


def _sigmoid_ramp(frac: float, sharpness: float = 12.0) -> float:
    """A logistic ramp rescaled so that it is exactly 0 at frac=0 and 1 at frac=1."""
    lo = 1 / (1 + math.exp(sharpness / 2))
    hi = 1 / (1 + math.exp(-sharpness / 2))
    mid = 1 / (1 + math.exp(-sharpness * (frac - 0.5)))
    return (mid - lo) / (hi - lo)


def uses_margin(cfg: LossConfig) -> bool:
    """Whether the loss has a margin that ``margin_at`` schedules (the spread loss; the others have none)."""
    return cfg.kind == "spread"


def margin_at(step: int, total_steps: int, cfg: LossConfig) -> float:
    """Spread-loss margin at ``step``: ``margin_start`` rising to ``margin_end``.

    The rise takes ``cfg.margin_steps`` steps (``None``: ``total_steps``, the
    whole run), linearly or along a logistic curve, and stays at the end value after.
    """
    steps = cfg.margin_steps if cfg.margin_steps is not None else total_steps
    frac = min(max(step / max(steps, 1), 0.0), 1.0)
    if cfg.margin_schedule == "sigmoid":
        frac = _sigmoid_ramp(frac)
    return cfg.margin_start + (cfg.margin_end - cfg.margin_start) * frac


def lr_at(step: int, cfg: OptimConfig, total_steps: int | None = None) -> float:
    """Learning rate at ``step``: ``lr * decay_rate ** (step / decay_steps)``.

    ``decay_steps=None`` stretches the decay over the whole run (``total_steps``),
    so the rate ends at ``lr * decay_rate`` whatever the epoch count. With
    ``staircase`` the exponent is rounded down (the rate drops every
    ``decay_steps``); during the first ``warmup_steps`` steps the rate also rises
    linearly from ``lr / warmup_steps`` to its scheduled value.
    """
    steps = cfg.decay_steps if cfg.decay_steps is not None else total_steps
    if steps is None:
        raise ValueError("optim.decay_steps is null (the whole run), so lr_at needs total_steps")
    exponent = step / max(steps, 1)
    if cfg.staircase:
        exponent = math.floor(exponent)
    lr = cfg.lr * cfg.decay_rate**exponent
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        lr *= (step + 1) / cfg.warmup_steps
    return lr


# --------------------------------------------------------------------------- the training objective


def class_loss(activations: Tensor, target: Tensor, cfg: LossConfig, margin: float) -> Tensor:
    """The classification loss that ``cfg.kind`` names."""
    if cfg.kind == "spread":
        return spread_loss(activations, target, margin)
    if cfg.kind == "margin":
        return margin_loss(activations, target)
    if cfg.kind == "cross_entropy":
        return cross_entropy(activations, target)
    raise ValueError(f"unknown loss.kind {cfg.kind!r}")


def uses_reconstruction(model: CapsNet, cfg: Config) -> bool:
    return model.decoder is not None and cfg.loss.recon_weight > 0


def compute_loss(
    out: CapsOutput,
    x: Tensor,
    y: Tensor,
    model: CapsNet,
    cfg: Config,
    step: int,
    total_steps: int,
    recon: Tensor | None = None,
    teacher_activations: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor | float]]:
    """Classification loss plus the weighted reconstruction loss (and distillation term).

    ``recon`` is the decoder's image when the caller already computed it (the
    trainer does, inside the module that DDP wraps); otherwise it is computed here
    from the target class's pose. ``teacher_activations``: the class activations of
    ``loss.teacher`` on the same images, which add ``loss.teacher_weight`` times
    :func:`distillation_loss`. Returns the loss and its detached parts: ``class``,
    ``recon`` and ``distill`` (when used) and ``margin``.
    """
    margin = margin_at(step, total_steps, cfg.loss)
    activations = out.activations.float()  # (N, E); losses in fp32 under autocast
    loss = class_loss(activations, y, cfg.loss, margin)
    parts: dict[str, Tensor | float] = {"class": loss.detach(), "margin": margin}
    if uses_reconstruction(model, cfg):
        if recon is None:
            recon = model.reconstruct(out.poses, y)  # (N, C, H, W)
        rec = reconstruction_loss(recon.float(), x.float())
        parts["recon"] = rec.detach()
        loss = loss + cfg.loss.recon_weight * rec
    if teacher_activations is not None:
        kd = distillation_loss(activations, teacher_activations.float(), cfg.loss.teacher_temperature)
        parts["distill"] = kd.detach()
        loss = loss + cfg.loss.teacher_weight * kd
    return loss, parts
