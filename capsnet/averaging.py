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
import shlex
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from capsnet.checkpoint import (
    CheckpointError,
    atomic_save,
    average_file,
    check_architecture,
    is_run_checkpoint_name,
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
    #: steps of kept checkpoints written within an epoch (a stopped run's, logging.save_every's), left out
    mid_epoch_left_out: list[int] = field(default_factory=list)
    #: steps into the next epoch of the newest checkpoint, where --ckpt named one saved within an epoch
    into_epoch: int = 0

    def summary(self) -> str:
        steps = ", ".join(f"{s:,}" for s in self.steps)
        ends = self.epochs[:-1] if self.into_epoch else self.epochs
        when = []
        if ends:
            when.append(
                f"the end of epoch {ends[0]}"
                if ends[0] == ends[-1]
                else f"the ends of epochs {ends[0]}-{ends[-1]}"
            )
        if self.into_epoch:
            when.append(f"{counted(self.into_epoch, 'step')} into epoch {self.epochs[-1] + 1}")
        head = (
            f"{'replaced' if self.replaced else 'wrote'} {self.path}: the mean of the weights of "
            f"{len(self.steps)} checkpoints of {self.run_dir} (steps {steps}: {' and '.join(when)})"
        )
        lines = [head]
        if self.mid_epoch_left_out:
            left = ", ".join(f"{s:,}" for s in self.mid_epoch_left_out)
            lines.append(f"left out: step {left}, saved within an epoch (name it with --ckpt to include it)")
        lines.append(f"score it with: capsnet eval --ckpt {shlex.quote(str(self.path))}")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "checkpoint": str(self.path),
            "run_dir": str(self.run_dir),
            "steps": self.steps,
            "epochs": self.epochs,
            "mid_epoch_left_out": self.mid_epoch_left_out,
            "replaced": self.replaced,
        }


def _load_kept(path: Path) -> dict[str, Any]:
    """A run's checkpoint, or an error that says why one listed a moment ago is gone."""
    try:
        return load_checkpoint(path)
    except CheckpointError:
        if path.exists():
            raise
        raise CheckpointError(
            f"{path} was removed while it was read: the run is still being trained and prunes its older "
            "checkpoints (logging.keep); run the command again, or once the run has finished"
        ) from None


def _names_a_run(spec: str, out_dir: str | Path) -> bool:
    """Whether ``spec`` names a run (latest, its folder, its name) rather than a file of one."""
    if spec == "latest":
        return True
    path = Path(spec).expanduser()
    return path.is_dir() or (not path.is_file() and (Path(out_dir).expanduser() / path).is_dir())


def checkpoints_to_average(
    spec: str, out_dir: str | Path, last: int | None
) -> tuple[Path, list[tuple[Path, dict[str, Any]]], list[int]]:
    """The run folder ``spec`` names, the checkpoints to average (path and contents, oldest
    first) and the steps of the mid-epoch checkpoints left out.

    Taken: the ``last`` (default: all) step-numbered checkpoints the run kept up to the step
    ``spec`` stands for (a run, latest: its newest; a file of the run, such as best.pt or
    step-000123.pt: that file's), each saved at the end of an epoch; a checkpoint saved within
    an epoch (a stopped run's, logging.save_every's) only where ``spec`` names its file.
    """
    if last is not None and last < 2:
        raise CheckpointError(f"--last {last}: an average needs at least 2 checkpoints")
    path = resolve_checkpoint(spec, out_dir)
    target = path.resolve()  # the file itself, where path is a link to it
    run_dir, kept = path.parent, step_checkpoints(path.parent)
    if not kept and target.parent != run_dir:  # a link to a run's file
        run_dir, kept = target.parent, step_checkpoints(target.parent)
    if not kept:
        raise CheckpointError(
            f"{path} is not in a run folder ({run_dir} holds no step-numbered checkpoints): an average "
            "is taken over a run's checkpoints; give the run (its folder or name) or a file in it"
        )
    ckpt = _load_kept(path)
    up_to = int(ckpt["step"])
    # a file the user named is taken even if saved within an epoch (last.pt or best.pt: the step
    # file saved with it); a run's newest is not
    named = None
    if not _names_a_run(spec, out_dir):
        named = next((p for _, p in kept if p.resolve() == target), None)
        if named is None:
            named = next((p for step, p in kept if step == up_to), None)
    chosen: list[tuple[Path, dict[str, Any]]] = []
    mid_epoch: list[int] = []
    for step, p in reversed([(step, p) for step, p in kept if step <= up_to]):
        if last is not None and len(chosen) == last:
            break
        held = ckpt if p.resolve() == target else _load_kept(p)  # the named file is read already
        if int(held.get("batches_done", 0)) and p != named:
            mid_epoch.append(step)
            continue
        chosen.append((p, held))
    chosen.reverse()
    if len(chosen) < (last or 2):
        found = f"{counted(len(chosen), 'checkpoint')} from the end of an epoch up to step {up_to}"
        if chosen:
            found += f" ({', '.join(p.name for p, _ in chosen)})"
        if mid_epoch:
            found += (
                f", and {counted(len(mid_epoch), 'checkpoint')} saved within an epoch, which it leaves out"
            )
        if int(ckpt["epoch"]) == 0 and not chosen:  # the step it stands for is in the run's first epoch
            fix = (
                f"no epoch of the run had ended by step {up_to}; train it on past the end of an epoch "
                f"(capsnet train --resume {run_dir}), then average"
            )
        elif any(step > up_to for step, _ in kept):
            fix = f"name a later checkpoint of the run, or the run itself (it kept {', '.join(p.name for _, p in kept)})"
        elif len(chosen) >= 2:
            fix = f"give --last {len(chosen)}, or train with logging.keep set higher"
        else:
            fix = "train with logging.keep set higher (how many step-numbered checkpoints a run keeps)"
        raise CheckpointError(f"{run_dir} keeps {found}: too few for an average of {last or 2}; {fix}")
    return run_dir, chosen, sorted(mid_epoch)


def _first_difference(mine: dict[str, Any], theirs: dict[str, Any]) -> str | None:
    """The first tensor name that the two states do not hold alike (in one only, another shape or
    dtype), said; None where they hold the same names, shapes and dtypes."""
    for name in sorted(set(mine) | set(theirs)):
        if name not in theirs or name not in mine:
            return f"{name} is in only one of them"
        a, b = mine[name], theirs[name]
        if a.shape != b.shape or a.dtype != b.dtype:
            return f"{name} is {tuple(a.shape)} {a.dtype} in one, {tuple(b.shape)} {b.dtype} in the other"
    return None


def average_checkpoints(checkpoints: list[tuple[Path, dict[str, Any]]]) -> dict[str, Any]:
    """A checkpoint whose weights are the mean of those of ``checkpoints`` (path and contents,
    oldest first), for eval, predict, export and train.init_from; the rest (config,
    architecture, step) is the newest's.

    Floating-point tensors (weights and batch-norm statistics alike) are averaged in float64
    and stored in their own dtype; integer ones (batch-norm's step count) are the newest's.
    The optimiser's and the data order's state are left out, so the file cannot be resumed.
    With train.ema a checkpoint's ``model`` is the moving average, so that is what is averaged.
    """
    if len(checkpoints) < 2:
        raise CheckpointError("an average needs at least 2 checkpoints")
    newest_path, newest = checkpoints[-1]
    state = newest["model"]
    sums = {name: t.to(torch.float64) for name, t in state.items() if t.is_floating_point()}
    for path, ckpt in checkpoints[:-1]:
        check_architecture(ckpt["arch"], newest["arch"], path)
        theirs = ckpt["model"]
        difference = _first_difference(theirs, state)
        if difference is not None:
            raise CheckpointError(
                f"{path} and {newest_path} hold different tensors ({difference}): they cannot be averaged"
            )
        for name, total in sums.items():
            total.add_(theirs[name].to(torch.float64))
    model = dict(state)
    for name, total in sums.items():
        mean = total / len(checkpoints)
        if not torch.isfinite(mean).all():
            raise CheckpointError(
                f"the average of {name} is not finite: one of the checkpoints holds NaN or inf there"
            )
        model[name] = mean.to(state[name].dtype)
    out = {key: value for key, value in newest.items() if key not in _NOT_AVERAGED}
    out["model"] = model
    out["time"] = time.time()
    out["averaged"] = {
        "files": [p.name for p, _ in checkpoints],
        "steps": [int(c["step"]) for _, c in checkpoints],
        "epochs": [int(c["epoch"]) for _, c in checkpoints],
    }
    return out


def average_run(
    spec: str,
    out_dir: str | Path = "weights/em_capsules",
    last: int | None = None,
    out: str | Path | None = None,
    overwrite: bool = False,
) -> AverageReport:
    """Averages the weights of the checkpoints :func:`checkpoints_to_average` picks and saves
    them (default: ``average-<first step>-<last step>.pt`` in the run folder)."""
    run_dir, chosen, mid_epoch = checkpoints_to_average(spec, out_dir, last)
    name = average_file(int(chosen[0][1]["step"]), int(chosen[-1][1]["step"]))
    path = Path(out).expanduser() if out is not None else run_dir / name
    if path.is_dir():
        raise CheckpointError(f"--out {path} is a folder: give a file name, such as {path / name}")
    if path.suffix.lower() != ".pt":
        raise CheckpointError(f"--out {path}: a checkpoint's name ends in .pt")
    if is_run_checkpoint_name(path.name):  # other commands would take it for one, wherever it is
        raise CheckpointError(
            f"--out {path}: last.pt, best.pt and step-*.pt are the names of a run's own checkpoints, "
            "which other commands would take this file for: give another"
        )
    existed = path.exists()
    if existed and not overwrite:
        raise CheckpointError(f"{path} already exists; --overwrite replaces it")
    ckpt = average_checkpoints(chosen)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_save(ckpt, path)
    averaged = ckpt["averaged"]
    return AverageReport(
        path,
        run_dir,
        averaged["steps"],
        averaged["epochs"],
        replaced=existed,
        mid_epoch_left_out=mid_epoch,
        into_epoch=int(ckpt.get("batches_done", 0)),
    )
