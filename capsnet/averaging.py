"""An exponential moving average (EMA) of a model's weights, kept beside the training model.

After every optimiser step ``avg <- d * avg + (1 - d) * w`` for every parameter and
floating-point buffer (batch-norm statistics), with a decay that starts low so
that the average forgets the initial weights quickly:
``d_t = min(decay, (1 + t) / (10 + t))`` at the t-th update. Integer buffers
(batch-norm's step count) are copied. The averaged model is a full copy of the
model in eval mode, so evaluating, saving and exporting it needs nothing special.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


def ema_decay_at(decay: float, updates: int) -> float:
    """Decay used by update number ``updates`` (0-based): ``min(decay, (1 + t) / (10 + t))``."""
    return min(decay, (1.0 + updates) / (10.0 + updates))


class WeightAverage:
    """The averaged copy of ``model`` (``.model``) and its update after each optimiser step."""

    def __init__(self, model: nn.Module, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay!r}")
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        # (average, source) tensor lists, built once: detached views share the weights' storage
        mine = self.model.state_dict(keep_vars=True)
        pairs = [(mine[name], src.detach()) for name, src in model.state_dict(keep_vars=True).items()]
        floats = [pair for pair in pairs if pair[1].is_floating_point()]
        self._avg = [a for a, _ in floats]
        self._src = [s for _, s in floats]
        self._other = [pair for pair in pairs if not pair[1].is_floating_point()]

    @torch.no_grad()
    def update(self, updates: int) -> None:
        """Moves the average towards the training model's current weights (update number ``updates``)."""
        if self._avg:
            torch._foreach_lerp_(self._avg, self._src, 1.0 - ema_decay_at(self.decay, updates))
        for avg, src in self._other:
            avg.copy_(src)

    @torch.no_grad()
    def reset(self) -> None:
        """Makes the average equal to the training model's weights."""
        for avg, src in [*zip(self._avg, self._src), *self._other]:
            avg.copy_(src)
