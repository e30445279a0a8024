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
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from capsnet.checkpoint import (
    BEST,
    LAST,
    CheckpointError,
    atomic_save,
    check_architecture,
    load_checkpoint,
    resolve_checkpoint,
    step_checkpoints,
)
from capsnet.tracking import counted


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


# --------------------------------------------------------------------------- averaged checkpoints

#: What a run continues from, which an average of checkpoints has no meaning for: left out of it.
#: ("train_model": with train.ema, the weights being trained beside the average in "model".)
_NOT_AVERAGED = (
    "optimizer",
    "rng",
    "rng_per_rank",
    "log_window",
    "train_model",
    "best_metric",
    "best_step",
    "best_split",
)


@dataclass
class AverageReport:
    path: Path  # the file written
    run_dir: Path
    steps: list[int]
    epochs: list[int]
    replaced: bool = False  # an earlier file of that name was replaced (--overwrite)

    def summary(self) -> str:
        steps = ", ".join(f"{s:,}" for s in self.steps)
        epochs = (
            f"epoch {self.epochs[0]}"
            if len(set(self.epochs)) == 1
            else f"epochs {self.epochs[0]}-{self.epochs[-1]}"
        )
        return (
            f"{'replaced' if self.replaced else 'wrote'} {self.path}: the mean of the weights of "
            f"{len(self.steps)} checkpoints of {self.run_dir} (steps {steps}; {epochs})\n"
            f"score it with: capsnet eval --ckpt {self.path}"
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "checkpoint": str(self.path),
            "run_dir": str(self.run_dir),
            "steps": self.steps,
            "epochs": self.epochs,
            "replaced": self.replaced,
        }


def checkpoints_to_average(
    spec: str, out_dir: str | Path, last: int | None
) -> tuple[Path, list[tuple[int, Path]]]:
    """The run folder ``spec`` names and its step-numbered checkpoints to average: the ``last``
    (default: all) kept up to the step ``spec`` stands for (a run, latest: its newest; a file
    of the run, such as best.pt or step-000123.pt: that file's step)."""
    if last is not None and last < 2:
        raise CheckpointError(f"--last {last}: an average needs at least 2 checkpoints")
    path = resolve_checkpoint(spec, out_dir)
    run_dir = path.parent
    kept = step_checkpoints(run_dir)
    named = [step for step, p in kept if p == path]
    up_to = named[0] if named else int(load_checkpoint(path)["step"])
    candidates = [(step, p) for step, p in kept if step <= up_to]
    chosen = candidates if last is None else candidates[-last:]
    if len(chosen) < (last or 2):
        have = f"{counted(len(candidates), 'step-numbered checkpoint')} up to step {up_to}"
        if candidates:
            have += f" ({', '.join(p.name for _, p in candidates)})"
        fix = f"give --last {len(candidates)}, or " if len(candidates) >= 2 else ""
        raise CheckpointError(
            f"{run_dir} keeps {have}: too few for an average of {last or 2}; {fix}train with "
            "logging.keep set higher (how many step-numbered checkpoints a run keeps)"
        )
    return run_dir, chosen


def average_checkpoints(paths: list[Path]) -> dict[str, Any]:
    """A checkpoint whose weights are the mean of those of ``paths`` (oldest first), for eval,
    predict, export and train.init_from; the rest (config, architecture, step) is the newest's.

    Floating-point tensors (weights and batch-norm statistics alike) are averaged in float64
    and stored in their own dtype; integer ones (batch-norm's step count) are the newest's.
    The optimiser's and the data order's state are left out, so the file cannot be resumed.
    """
    if len(paths) < 2:
        raise CheckpointError("an average needs at least 2 checkpoints")
    newest = load_checkpoint(paths[-1])
    shapes = {name: (t.shape, t.dtype) for name, t in newest["model"].items()}
    sums = {name: t.to(torch.float64) for name, t in newest["model"].items() if t.is_floating_point()}
    steps, epochs = [], []
    for path in paths[:-1]:
        ckpt = load_checkpoint(path)
        check_architecture(ckpt["arch"], newest["arch"], path)
        state = ckpt["model"]
        if {name: (t.shape, t.dtype) for name, t in state.items()} != shapes:
            raise CheckpointError(f"{path} holds other tensors than {paths[-1]}: they cannot be averaged")
        for name, total in sums.items():
            total.add_(state[name].to(torch.float64))
        steps.append(int(ckpt["step"]))
        epochs.append(int(ckpt["epoch"]))
    steps.append(int(newest["step"]))
    epochs.append(int(newest["epoch"]))
    model = dict(newest["model"])
    for name, total in sums.items():
        mean = total / len(paths)
        if not torch.isfinite(mean).all():
            raise CheckpointError(
                f"the average of {name} is not finite: one of the checkpoints holds NaN or inf there"
            )
        model[name] = mean.to(shapes[name][1])
    out = {key: value for key, value in newest.items() if key not in _NOT_AVERAGED}
    out["model"] = model
    out["time"] = time.time()
    out["averaged"] = {"files": [p.name for p in paths], "steps": steps, "epochs": epochs}
    return out


def average_file_name(steps: list[int]) -> str:
    return f"average-{steps[0]:06d}-{steps[-1]:06d}.pt"


def average_run(
    spec: str,
    out_dir: str | Path = "weights/em_capsules",
    last: int | None = None,
    out: str | Path | None = None,
    overwrite: bool = False,
) -> AverageReport:
    """Averages the weights of the checkpoints :func:`checkpoints_to_average` picks and saves
    them (default: ``average-<first step>-<last step>.pt`` in the run folder)."""
    run_dir, chosen = checkpoints_to_average(spec, out_dir, last)
    name = average_file_name([step for step, _ in chosen])
    path = Path(out).expanduser() if out is not None else run_dir / name
    if path.is_dir():
        raise CheckpointError(f"--out {path} is a folder: give a file name, such as {path / name}")
    if path.suffix.lower() != ".pt":
        raise CheckpointError(f"--out {path}: a checkpoint's name ends in .pt")
    own = path.parent.resolve() == run_dir.resolve() and (
        path.name in (LAST, BEST) or path.name.startswith("step-")
    )
    if own or path.resolve() in {p.resolve() for _, p in chosen}:
        raise CheckpointError(
            f"--out {path}: that name is the run's own (last.pt, best.pt and step-*.pt are its "
            "checkpoints): give another"
        )
    existed = path.exists()
    if existed and not overwrite:
        raise CheckpointError(f"{path} already exists; --overwrite replaces it")
    ckpt = average_checkpoints([p for _, p in chosen])
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_save(ckpt, path)
    averaged = ckpt["averaged"]
    return AverageReport(path, run_dir, averaged["steps"], averaged["epochs"], replaced=existed)
