"""Training: ``fit(cfg)`` builds everything in order and owns the loop.

Under torchrun every rank runs this same code (:mod:`capsnet.distributed`); rank 0
alone writes files. Order: process group -> checkpoint to resume (if any) -> run name
-> seeds -> device -> data -> model -> optimiser -> run directory, config.yaml
-> writers -> restored RNG states -> epochs (train, evaluate, checkpoint).

The global step counts optimiser steps (a skipped non-finite step counts too,
so the step <-> epoch mapping never drifts); schedules are pure functions of it.

Resuming restores the model, optimiser, step, epoch, best metric, the steps
not yet logged, the count of training images seen and every rank's RNG states
(see :mod:`capsnet.runs`); the data order is a function of the seed and the
epoch, and loader workers (``train.num_workers``) are started each epoch with
seeds drawn from the loader's generator, whose state the checkpoint holds. So on
a CPU a run resumed from a checkpoint gives bit-identical weights and metrics to
one that never stopped. Checkpoints written at the end of an epoch hold the RNG
state at that point. Checkpoints written mid-epoch (``train.max_steps``, SIGINT/SIGTERM) hold
the RNG state at the start of that epoch and the number of batches consumed; a
resumed run replays the loader to that point, skipping those batches, and goes
on from there.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import shlex
import signal
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from capsnet.averaging import WeightAverage
from capsnet.checkpoint import (
    BEST,
    CheckpointError,
    atomic_write_bytes,
    capture_rng,
    check_architecture,
    check_resume_settings,
    load_checkpoint,
    load_model_state,
    resolve_checkpoint,
    run_name_of,
    safe_child,
    step_file,
    trained_normalisation,
)
from capsnet.config import Config, ConfigError, unused_settings
from capsnet.data import (
    build_loaders,
    data_sizes,
    expected_image_size,
    held_out_digest,
    reported_data_warnings,
    size_changes,
)
from capsnet.distributed import (
    any_rank,
    broadcast,
    convert_sync_batchnorm,
    init_distributed,
    rank_seed,
    restart_count,
    share_buffers,
    shutdown,
    sum_over_ranks,
)
from capsnet.evaluate import EvalResult, EvaluationStopped, autocast, evaluate, resolve_device
from capsnet.loss import compute_loss, lr_at, margin_at, uses_margin, uses_reconstruction
from capsnet.model import CapsNet, CapsOutput
from capsnet.routing import (
    choose_compiled_kernels,
    compiled_kernels_enabled,
    training_chunks,
    use_compiled_kernels,
)
from capsnet.runs import (
    LOSS_PARTS,
    Run,
    TrainingError,
    check_run_dir_free,
    choose_run,
    config_for_resume,
    empty_window,
    first_non_finite,
    mark_run_ended,
    open_run_dir,
    release_run_names,
    restore_run,
    save_run,
    seed_everything,
)
from capsnet.signals import EXIT_CODES, StopRequest, catch_stop_signals
from capsnet.tracking import (
    NullWriter,
    TensorBoardWriter,
    TrackingError,
    counted,
    format_metrics,
    log_routing_histograms,
    progress,
    reconstruction_grid,
    routing_scalars,
    set_postfix,
)

__all__ = ["RunResult", "TrainingError", "TrainingInterrupted", "config_for_resume", "fit"]

#: How Gloo and NCCL report a peer process that went away.
_LOST_PEER = re.compile(
    r"Connection (reset|closed|refused)|Broken pipe|NCCL communicator was aborted", re.IGNORECASE
)


#: below this many validation images the choice of best.pt is noted as coarse
MIN_VAL_IMAGES = 200


class TrainingInterrupted(Exception):
    """SIGINT or SIGTERM stopped a run after its checkpoint was saved; ``exit_code`` is 130 or 143."""

    def __init__(self, result: RunResult):
        self.result = result
        self.exit_code = result.exit_code
        super().__init__(
            f"stopped by {result.stopped} at step {result.step}; "
            f"resume with: capsnet train --resume {shlex.quote(str(result.run_dir))}"
        )


@dataclass
class RunResult:
    run_name: str
    run_dir: Path
    step: int
    epoch: int
    best_acc: float | None
    best_step: int | None
    best_split: str  # "val", or "test" when there is no validation split
    last_eval: EvalResult | None
    checkpoint: Path | None  # the newest checkpoint written
    stopped: str  # "completed" | "max_steps" | "SIGINT" | "SIGTERM"
    bad_steps: int  # non-finite steps skipped so far in the run (resumes included)
    exit_code: int = 0  # 130 after SIGINT, 143 after SIGTERM


# --------------------------------------------------------------------------- building blocks


class TrainStep(nn.Module):
    """Model forward plus the reconstruction, in one module so DDP sees every parameter used."""

    def __init__(self, model: CapsNet, forward: Callable[[Tensor], CapsOutput] | None, reconstruct: bool):
        super().__init__()
        self.model = model
        self.reconstruct = reconstruct
        self.__dict__["_forward"] = (
            forward if forward is not None else model
        )  # a compiled forward, kept out of the module tree

    def forward(self, x: Tensor, y: Tensor) -> tuple[CapsOutput, Tensor | None]:
        out = self._forward(x)
        recon = self.model.reconstruct(out.poses, y) if self.reconstruct else None  # (N, C, H, W)
        return out, recon


def parameter_groups(model: nn.Module, weight_decay: float, scope: str) -> list[dict[str, Any]]:
    """The optimiser's parameter groups: with ``scope="matrices"`` only tensors of two or
    more dimensions (convolution kernels, transformation matrices, linear weights) are
    decayed; biases, batch-norm scales and the routing's beta_u / beta_a are not."""
    params = list(model.parameters())
    if scope == "all":
        return [{"params": params, "weight_decay": weight_decay}]
    decayed = [p for p in params if p.dim() >= 2]
    kept = [p for p in params if p.dim() < 2]
    return [
        {"params": decayed, "weight_decay": weight_decay},
        {"params": kept, "weight_decay": 0.0},
    ]


def build_optimizer(model: nn.Module, cfg: Config) -> torch.optim.Optimizer:
    o = cfg.optim
    groups = parameter_groups(model, o.weight_decay, o.decay_scope)
    if o.name == "adam":
        return torch.optim.Adam(groups, lr=o.lr)
    if o.name == "adamw":
        return torch.optim.AdamW(groups, lr=o.lr)
    return torch.optim.SGD(groups, lr=o.lr, momentum=0.9)


# --------------------------------------------------------------------------- the run


def _log_step(run: Run, lr: float, margin: float | None, parts: Iterable[str] = ()) -> None:
    """Logs the window of steps since the last log; ``margin``: None for a loss without one;
    ``parts``: the loss's parts this run has (LOSS_PARTS), each logged as ``train/loss_<part>``."""
    parts = [p for p in LOSS_PARTS if p in parts]
    routing = routing_scalars(run.model.routing_stats)  # of each rank's last batch: the mean is logged
    loss, steps, correct, n, untimed, seen, *sums = sum_over_ranks(
        [
            run.window["loss"],
            run.window["steps"],
            run.window["correct"],
            run.window["n"],
            run.window_untimed,
            run.images_seen,
            *(run.window[p] for p in parts),
            *routing.values(),
        ],
        run.device,
    )
    part_sums, routing_sums = sums[: len(parts)], sums[len(parts) :]
    routing = {key: total / run.dist.world_size for key, total in zip(routing, routing_sums)}
    elapsed = max(time.perf_counter() - run.window_start, 1e-9)
    # NaN, not 0, for a window whose every step was skipped as non-finite: it has no loss to report
    mean = (lambda total: total / steps) if steps else (lambda total: math.nan)
    metrics = {
        "train/loss": mean(loss),
        **{f"train/loss_{p}": mean(total) for p, total in zip(parts, part_sums)},
        "train/acc": correct / max(n, 1),
        "sched/lr": lr,
        **({"sched/margin": margin} if margin is not None else {}),
        "sched/lambda": run.model.lambdas()[-1],
        "perf/img_per_s": (n - untimed) / elapsed,
        "train/skipped_steps": run.bad_total,
        "train/images_seen": int(seen),
        **routing,
    }
    run.writer.scalars(metrics, run.step)
    run.window = empty_window()
    run.window_start, run.window_untimed = time.perf_counter(), 0


def _batch_norm_state(model: nn.Module) -> list[tuple[Tensor, Tensor]]:
    """Each batch-norm buffer with a copy of its value (a forward pass updates them in place)."""
    return [
        (buf, buf.clone())
        for module in model.modules()
        if isinstance(module, nn.modules.batchnorm._BatchNorm)
        for buf in module.buffers()
    ]


def _train_step(
    run: Run, group: list[tuple[Tensor, Tensor]], stop: StopRequest, taught: list[Tensor] | None = None
) -> tuple[float, int, int, bool]:
    """One optimiser step over ``group`` (``train.accumulate`` micro-batches).

    ``taught``: the teacher's class activations of each micro-batch, where they were
    computed ahead (:class:`TeacherTable`); else the teacher, if any, runs on the batch here.

    Returns the loss, correct predictions, images, and whether every process agrees to
    stop now (a signal reached one of them).
    """
    cfg, model = run.cfg, run.model
    lr = lr_at(run.step, cfg.optim, run.total_steps)
    margin = margin_at(run.step, run.total_steps, cfg.loss)
    for g in run.optimizer.param_groups:
        g["lr"] = lr
    next_step = run.step + 1
    log_now = next_step % cfg.logging.log_every == 0
    hist_now = run.writer.writes_events and next_step % cfg.logging.hist_every == 0
    model.record_stats = log_now or hist_now
    run.optimizer.zero_grad(set_to_none=True)
    batch_norm = _batch_norm_state(model)  # put back if the step turns out non-finite
    # the loss and its parts (LOSS_PARTS), each summed over the micro-batches by their share
    sums, correct, n = torch.zeros(1 + len(LOSS_PARTS), device=run.device), 0, 0
    parts_used: set[str] = set()
    zero = torch.zeros((), device=run.device)  # a part the run lacks
    images = sum(len(y) for _, y in group)
    for i, (x, y) in enumerate(group):
        x, y = x.to(run.device, non_blocking=True), y.to(run.device, non_blocking=True)
        defer_sync = isinstance(run.step_module, nn.parallel.DistributedDataParallel) and i < len(group) - 1
        with run.step_module.no_sync() if defer_sync else contextlib.nullcontext():
            with autocast(run.device, cfg.train.precision):
                teacher_acts = None
                if taught is not None:
                    teacher_acts = taught[i].to(run.device, non_blocking=True)  # (N, E)
                elif run.teacher is not None:
                    with torch.no_grad():
                        teacher_acts = run.teacher(x).activations  # (N, E)
                out, recon = run.step_module(x, y)
                loss, parts = compute_loss(
                    out,
                    x,
                    y,
                    model,
                    cfg,
                    run.step,
                    run.total_steps,
                    recon=recon,
                    teacher_activations=teacher_acts,
                )
            share = len(y) / images  # a short last micro-batch weighs by its images, as in one batch
            (loss * share).backward()
        parts_used.update(p for p in LOSS_PARTS if p in parts)
        terms = [loss.detach(), *(parts.get(p, zero) for p in LOSS_PARTS)]
        sums += torch.stack([t.float() for t in terms]) * share
        correct += int((out.activations.detach().argmax(dim=1) == y).sum())
        n += len(y)
    clip = cfg.optim.grad_clip if cfg.optim.grad_clip is not None else math.inf
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    loss_value, *part_values = sums.tolist()
    bad, stopping = any_rank(
        [not (math.isfinite(loss_value) and bool(torch.isfinite(grad_norm))), stop.received is not None],
        run.device,
    )
    if bad:
        run.optimizer.zero_grad(set_to_none=True)
        for buf, before in batch_norm:  # the skipped batch leaves no trace in the running statistics
            buf.copy_(before)
        run.bad_in_row += 1
        run.bad_total += 1
        if run.bad_in_row >= cfg.train.max_bad_steps:
            raise TrainingError(
                f"stopped at step {next_step}: {run.bad_in_row} non-finite steps in a row "
                f"(train.max_bad_steps); {_diagnose(run, group[0][0])}; "
                "try a lower optim.lr or set optim.grad_clip"
            )
    else:
        run.optimizer.step()
        if run.ema is not None:
            run.ema.update(run.step)
        run.bad_in_row = 0
    run.step = next_step
    run.batches_done += 1
    if stopping and stop.received is None:
        stop.received = signal.SIGTERM  # another rank was signalled
    if not bad:
        run.window["loss"] += loss_value
        run.window["steps"] += 1
        for p, value in zip(LOSS_PARTS, part_values):
            run.window[p] += value
    run.window["correct"] += correct
    run.window["n"] += n
    run.images_seen += n  # a skipped step's images too, as its step is counted
    if log_now:
        _log_step(run, lr, margin if uses_margin(cfg.loss) else None, parts_used)
    if hist_now:
        log_routing_histograms(run.writer, model.routing_stats, run.step)
    model.record_stats = False
    # a skipped step's loss is in no mean, as in the logged window: NaN leaves it out
    return math.nan if bad else loss_value, correct, n, stopping


def _find_checkpoint_setting(cfg: Config, key: str, whose: str, run_name: str) -> tuple[Path, dict[str, Any]]:
    """The checkpoint file that the setting ``key`` (``loss.teacher``, ``train.init_from``) names,
    and its contents (the same on every rank).

    The setting is set to that file (for a ``best.pt``, the file its step wrote beside it), so
    that the config this run saves (and a resumed run reads) names it: ``latest``, ``best`` or a run's newest checkpoint may be another file by
    the time the run resumes or its config is run again, the run's own checkpoints among them.
    Those are refused: the run cannot learn from, or start from, itself. ``whose`` names the
    checkpoint wanted, for the refusal ("the teacher's").
    """
    section, field = key.split(".")
    spec = getattr(getattr(cfg, section), field)
    try:
        path = resolve_checkpoint(spec, cfg.logging.out_dir)
        chosen = Path(broadcast(str(path)))  # rank 0's choice: "latest" may change while ranks look
        ckpt = load_checkpoint(chosen)
    except CheckpointError as e:
        raise CheckpointError(f"{key}: {e}") from None
    if chosen.resolve().parent == safe_child(cfg.logging.out_dir, run_name).resolve():
        itself = f"{key}: {spec} is {chosen}, a checkpoint of this run itself"
        raise ConfigError([f"{itself}; name {whose} checkpoint file (or its run) instead"])
    if chosen.name == BEST and "step" in ckpt:
        # best.pt is rewritten at that run's next best; the file its step wrote beside it is not
        own = chosen.with_name(step_file(int(ckpt["step"])))
        if own.is_file():
            chosen = own
    setattr(getattr(cfg, section), field, str(chosen))
    return chosen, ckpt


def _check_model_settings(cfg: Config, ckpt: dict[str, Any], where: Path) -> None:
    """Refuses, before the data loads and kernels compile, a checkpoint whose model the config's
    model and routing settings would not build; the sizes the data gives (channels, classes, image
    size) are taken as the checkpoint's here, and compared once the data is known."""
    arch = ckpt.get("arch")
    if not isinstance(arch, dict):
        return  # said where its weights load
    sizes = [arch.get(k) for k in ("in_channels", "num_classes", "image_size")]
    if not all(isinstance(v, int) and v > 0 for v in sizes):
        return
    try:
        probe = CapsNet.from_config(cfg.model, cfg.routing, *sizes)
    except (ValueError, TypeError):
        return  # a config that builds no model at all is refused below, with the data's image size
    check_architecture(arch, dict(probe.hparams), where)


def _names_start(cfg: Config, spec: str, started: str | None, run_name: str) -> bool:
    """Whether ``train.init_from: spec`` names the run of ``started``, the file a resumed run first
    started from (or, like ``latest`` by now, a checkpoint of the run itself, as it did when it started)."""
    if started is not None and spec == started:
        return True
    try:
        path = resolve_checkpoint(spec, cfg.logging.out_dir).resolve()
    except CheckpointError:
        return False
    if path.parent == safe_child(cfg.logging.out_dir, run_name).resolve():
        return True
    if started is None:
        return False
    # the run it names may have trained on since, and name a later checkpoint of its folder by now
    return path.parent == Path(started).resolve().parent


def load_teacher(cfg: Config, info, device: torch.device, path: Path, ckpt: dict[str, Any]) -> CapsNet:
    """The model of ``loss.teacher`` (loaded from ``path``) in eval mode on ``device``, frozen.

    Refuses, with a ConfigError naming the setting, a teacher that would see other inputs
    than the ones it was trained on: another dataset, class count or class names, channel
    count, image size or input normalisation; and, where this run holds out a validation
    split, a teacher whose training drew another one (it may have trained on those images).
    """
    from capsnet.checkpoint import build_model_from_checkpoint, moved_split_settings
    from capsnet.config import stored_config

    where = f"loss.teacher: {path}"
    saved = stored_config(ckpt["config"], path)
    taught = ckpt.get("data_info") or {}
    problems = []
    if saved.data.name != cfg.data.name:
        problems.append(f"was trained on data.name {saved.data.name!r}, this run trains on {cfg.data.name!r}")
    for key, now in (
        ("num_classes", info.num_classes),
        ("channels", info.channels),
        ("image_size", info.image_size),
    ):
        if key in taught and taught[key] != now:
            problems.append(f"was trained with {key} {taught[key]}, this run's data has {now}")
    names = taught.get("class_names")
    if names is not None and len(names) == info.num_classes and list(names) != list(info.class_names):
        problems.append(f"was trained with the classes {names}, this run's data has {info.class_names}")
    for key in ("mean", "std"):
        then, now = taught.get(key), getattr(info, key)
        if key not in taught or (then is None and now is None):
            continue
        if then is None or now is None:
            how = ["per-image standardisation" if v is None else f"{key} {v}" for v in (then, now)]
            problems.append(f"normalised its inputs by {how[0]}, this run by {how[1]}")
        elif len(then) != len(now) or not torch.allclose(
            torch.tensor(then).double(), torch.tensor(now).double(), atol=1e-2
        ):
            problems.append(f"normalised its inputs with {key} {then}, this run with {now}")
    if problems:
        raise ConfigError([f"{where} {p}; a teacher must see the inputs it was trained on" for p in problems])
    # which images are for training and which for testing: a teacher trained on other ones may
    # have trained on this run's test images (smallNORB's novel viewpoints, another folder tree)
    tests = []
    if cfg.data.name == "smallnorb" and saved.data.split != cfg.data.split:
        tests.append(f"data.split {saved.data.split!r}, this run {cfg.data.split!r}")
    if cfg.data.name == "folder":
        for key in ("train_dir", "test_dir"):
            then, now = getattr(saved.data, key), getattr(cfg.data, key)
            if (then and Path(then).resolve()) != (now and Path(now).resolve()):
                tests.append(f"data.{key} {then!r}, this run {now!r}")
    if tests:
        raise ConfigError(
            [f"{where} was trained with {t}; it may have trained on this run's test images" for t in tests]
        )
    moved = moved_split_settings(ckpt["config"], cfg.to_dict()) if cfg.data.val_split > 0 else {}
    if moved:
        drawn = f"drew its validation split with other settings ({'; '.join(moved.values())})"
        why = "so it may have trained on images this run holds out to choose its best model"
        raise ConfigError(
            [f"{where} {drawn}, {why}; use a teacher trained with the same ones, or data.val_split=0"]
        )
    # building the model draws its initial weights, which must not come from the run's random stream
    with torch.random.fork_rng(devices=[]):
        model = build_model_from_checkpoint(ckpt, path)
    if model.in_channels != info.channels or model.num_classes != info.num_classes:  # no data_info saved
        takes = f"takes {model.in_channels}-channel images into {model.num_classes} classes"
        raise ConfigError(
            [f"{where} {takes}, this run's data has {info.channels} channels and {info.num_classes} classes"]
        )
    model.requires_grad_(False)
    return model.to(device).eval()


@dataclass
class TeacherTable:
    """The teacher's class activations of every training item, in item order, with the items' labels."""

    activations: Tensor  # (N, E) float32, on the CPU
    labels: Tensor  # (N,) int64


@torch.no_grad()
def teacher_table(
    run_cfg: Config, teacher: nn.Module, dataset, device: torch.device, show: bool
) -> TeacherTable:
    """Runs the teacher once over the training items, in order, in batches of the evaluation size.

    Only for a training set whose items are the same every epoch (no augmentation): then the
    table stands in for the teacher's forward pass on every batch of every epoch. It is
    computed afresh by every run that starts or resumes, the same way each time, so a
    resumed run trains on exactly the values a run that never stopped did.
    """
    size = run_cfg.train.eval_batch_size or 2 * run_cfg.train.batch_size
    # a generator of its own: starting the loader draws a seed, which must not come from the global stream
    loader = DataLoader(dataset, batch_size=size, shuffle=False, generator=torch.Generator())
    activations, labels = [], []
    for x, y in progress(loader, total=len(loader), enabled=show, desc="teacher"):
        with autocast(device, run_cfg.train.precision):
            activations.append(teacher(x.to(device)).activations.float().cpu())
        labels.append(y)
    return TeacherTable(torch.cat(activations), torch.cat(labels))


@torch.no_grad()
def _diagnose(run: Run, x: Tensor) -> str:
    """Names the first routing layer whose statistics are non-finite on ``x`` (the failing batch)."""
    model = run.model
    bad = first_non_finite(model)
    where = f"{bad} is non-finite" if bad is not None else "all parameters are finite"
    model.record_stats = True
    try:
        with autocast(run.device, run.cfg.train.precision):
            model(x.to(run.device))
        stats = model.routing_stats
    finally:
        model.record_stats = False
    for layer, values in stats.items():
        if "finite" in values and not bool(values["finite"]):
            return f"routing layer {layer!r} is the first with non-finite statistics ({where})"
    return f"routing statistics are finite, so the loss or its gradients overflowed ({where})"


def _batches(run: Run) -> Iterator[tuple[list[tuple[Tensor, Tensor]], list[Tensor] | None]]:
    """The epoch's batches in groups of ``train.accumulate``, skipping the groups already done.

    The groups already done are replayed here, before this returns (the loader draws
    its random numbers for them), so that the caller's clocks leave the replay out.
    Each group comes with the teacher's class activations of its batches where
    ``run.teacher_table`` holds them (else None): batch k of the epoch holds the items
    at positions k*B ... k*B+B-1 of the sampler's order, B being the batch size.
    """
    acc = run.cfg.train.accumulate
    table = run.teacher_table
    order = None if table is None else torch.tensor(list(run.loaders.train_sampler))  # the epoch's items
    it = iter(run.loaders.train)
    deque(islice(it, run.batches_done * acc), maxlen=0)  # replays the loader (and its RNG draws)
    return _groups(run, it, run.batches_done * acc, order)


def _groups(
    run: Run, it: Iterator, k: int, order: Tensor | None
) -> Iterator[tuple[list[tuple[Tensor, Tensor]], list[Tensor] | None]]:
    """:func:`_batches` from batch ``k`` of the epoch on, which ``it`` gives next (``order``: the
    epoch's items in the sampler's order, where the teacher's table is used)."""
    acc, size = run.cfg.train.accumulate, run.cfg.train.batch_size
    table = run.teacher_table
    while group := list(islice(it, acc)):
        taught = None
        if order is not None:
            taught = []
            for _, y in group:
                items = order[k * size : k * size + len(y)]
                k += 1
                if not torch.equal(table.labels[items], y):
                    raise RuntimeError("the teacher's table is out of step with the training batches")
                taught.append(table.activations[items])
        yield group, taught


def train_epoch(run: Run, stop: StopRequest) -> tuple[str | None, dict[str, float]]:
    """Trains until the epoch ends, ``train.max_steps`` is reached or a stop is requested."""
    if hasattr(run.loaders.train_sampler, "set_epoch"):
        run.loaders.train_sampler.set_epoch(run.epoch)  # the epoch's order: a function of seed and epoch
    if run.batches_done == 0:
        run.epoch_rng = capture_rng(run.loaders.train_generator)
    skipped, start_step = run.batches_done, run.step  # steps of this epoch trained before a resume
    run.model.train()
    batches = _batches(run)
    totals = {"loss": 0.0, "correct": 0, "n": 0, "steps": 0, "start": time.perf_counter()}
    if skipped:  # img/s leaves out the replay of the steps trained before the resume
        run.window_start = totals["start"]
    bar = progress(
        batches,
        total=run.steps_per_epoch - run.batches_done,
        enabled=run.cfg.logging.progress and run.dist.is_main,
        desc=f"epoch {run.epoch + 1}",
    )
    reason = None
    for group, taught in bar:
        loss, correct, n, stopping = _train_step(run, group, stop, taught)
        if math.isfinite(loss):
            totals["loss"] += loss
            totals["steps"] += 1
        totals["correct"] += correct
        totals["n"] += n
        elapsed = time.perf_counter() - totals["start"]
        set_postfix(
            bar,
            **{
                "train/loss": totals["loss"] / max(totals["steps"], 1),
                "train/acc": totals["correct"] / max(totals["n"], 1),
                "perf/img_per_s": totals["n"] / max(elapsed, 1e-9),
            },
        )
        if run.cfg.train.max_steps is not None and run.step >= run.cfg.train.max_steps:
            reason = "max_steps"  # evaluated before stopping, even when a signal came on this step
            break
        if stopping:  # agreed by every process: one that stopped alone would leave the others waiting
            reason = stop.name
            break
        save_every = run.cfg.logging.save_every
        if save_every and run.step % save_every == 0 and run.batches_done < run.steps_per_epoch:
            save_run(run, mid_epoch=True, interim=True)  # a crash loses at most save_every steps
    # A signal on the epoch's last step leaves the epoch open (all its steps done): it is
    # saved as mid-epoch, and the resumed run ends it with its evaluation, as an
    # uninterrupted run would have.
    if reason is None or (reason == "max_steps" and run.batches_done >= run.steps_per_epoch):
        for _ in batches:  # run the loader to its end, as a full epoch does (the sampler draws there)
            pass
        run.epoch += 1
        run.batches_done = 0
    if bar is not batches:
        bar.close()
    elapsed = time.perf_counter() - totals["start"]
    loss, steps, correct, n = sum_over_ranks(
        [totals["loss"], totals["steps"], totals["correct"], totals["n"]], run.device
    )
    summary: dict[str, float] = {}
    if n:  # none when a resumed run only had the epoch's evaluation left: no training figures
        summary.update({"perf/img_per_s": n / max(elapsed, 1e-9), "time": elapsed})
        summary.update({"train/loss": loss / steps if steps else math.nan, "train/acc": correct / n})
        if skipped:
            summary["steps_since_resume"] = run.step - start_step
    return reason, summary


def end_of_epoch(run: Run, summary: dict[str, float], stop: StopRequest | None = None) -> EvalResult | None:
    """Evaluates, logs, saves a checkpoint (and best.pt on a new best) and prints one line.

    None when a stop signal came during the evaluation (a single process): the evaluation
    is dropped and an epoch that had ended is reopened at its last step, so that the
    checkpoint the caller saves leaves the evaluation to the resumed run, as a signal on the
    epoch's last step does.
    """
    split = run.eval_split
    loader = run.loaders.val if split == "val" else run.loaders.test
    # every rank scores its share with the model that is saved, rank 0's batch-norm statistics included
    share_buffers(run.model, *([run.ema.model] if run.ema is not None else []))
    try:
        result = evaluate(
            run.eval_model,
            loader,
            run.cfg,
            run.device,
            max(run.step - 1, 0),  # the margin of the step just trained, which the line shows too
            run.total_steps,
            run.loaders.info.class_names,
            progress_bar=run.cfg.logging.progress,  # evaluate shows it on rank 0 alone
            desc=f"{split} after epoch {run.epoch if run.batches_done == 0 else run.epoch + 1}",
            # a signal during the evaluation drops it; one before it (on a train.max_steps step) does not
            stop=stop if stop is not None and stop.received is None else None,
        )
    except EvaluationStopped:
        if run.batches_done == 0:  # the epoch had ended: all its steps done, its evaluation not
            run.epoch -= 1
            run.batches_done = run.steps_per_epoch
        return None
    (seen,) = sum_over_ranks([run.images_seen], run.device)
    # with the images seen: an evaluation may fall on a step that logs no training window
    run.writer.scalars(
        {f"{split}/loss": result.loss, f"{split}/acc": result.acc, "train/images_seen": int(seen)}, run.step
    )
    if uses_reconstruction(run.model, run.cfg):
        _log_reconstructions(run, loader)
    improved = (
        math.isfinite(result.loss)
        and (run.best_acc is None or result.acc > run.best_acc)
        and first_non_finite(run.eval_model) is None
    )
    if improved:
        run.best_acc, run.best_step = result.acc, run.step
    path = save_run(run, mid_epoch=run.batches_done > 0, is_best=improved)
    line = format_metrics(
        {
            **summary,
            f"{split}/loss": result.loss,
            f"{split}/acc": result.acc,
            "sched/lr": lr_at(max(run.step - 1, 0), run.cfg.optim, run.total_steps),
            "sched/margin": margin_at(max(run.step - 1, 0), run.total_steps, run.cfg.loss),
        },
        ["train/loss", "train/acc", f"{split}/loss", f"{split}/acc", "sched/lr"]
        + (["sched/margin"] if uses_margin(run.cfg.loss) else []),
    )
    best = f"best {run.best_acc:.4f} @ {run.best_step}" if run.best_acc is not None else "best -"
    epochs = run.cfg.train.epochs
    epoch = (
        f"epoch {run.epoch}/{epochs}"
        if run.batches_done == 0
        else (f"epoch {run.epoch + 1}/{epochs} (partial: {run.batches_done}/{run.steps_per_epoch} steps)")
    )
    if "steps_since_resume" in summary:  # the steps before the resume were trained by another process
        line += f" (train/* over the {counted(int(summary['steps_since_resume']), 'step')} since the resume)"
    speed = f"  {summary['perf/img_per_s']:.0f} img/s  {summary['time']:.1f}s" if "time" in summary else ""
    run.echo(
        f"{epoch}  step {run.step}  {line}  {best}{speed}" + (f"  -> {path.name}" if path is not None else "")
    )
    return result


@torch.no_grad()
def _log_reconstructions(run: Run, loader) -> None:
    if not run.writer.writes_events:  # other ranks, or no TensorBoard: no batch drawn for nothing
        return
    batch = next(iter(loader), None)
    if batch is None:  # this rank's share of an evaluation set smaller than the number of processes
        return
    x, y = batch
    x, y = x[:8].to(run.device), y[:8].to(run.device)
    model = run.eval_model
    training = model.training
    model.eval()
    recon = model.reconstruct(model(x).poses, y)
    model.train(training)
    run.writer.image("recon/images", reconstruction_grid(x, recon), run.step)


# --------------------------------------------------------------------------- fit


def fit(
    cfg: Config,
    run_name: str | None = None,
    resume: str | None = None,
    overwrite: bool = False,
    echo: Callable[[str], None] = print,
    name_prefix: str | None = None,
) -> RunResult:
    """Trains ``cfg``; writes ``<logging.out_dir>/<run>/`` and ``<logging.tb_dir>/<run>/``.

    ``resume``: ``latest`` | ``best`` | run directory | checkpoint file. Without
    ``run_name`` a resumed run continues in its own directory; a fresh run gets
    ``<name_prefix or data.name>-<date>-<time>``. ``run_name`` with ``latest``
    continues that run, or starts it when it has no checkpoint yet (see
    :func:`resume_checkpoint`). Under torchrun every rank calls this; rank 0's
    choices (run name, checkpoint) are used by all. Raises ConfigError, DataError,
    CheckpointError or TrainingError with a message meant for the user, and
    TrainingInterrupted (holding the RunResult) after SIGINT/SIGTERM once the
    checkpoint is saved.
    """
    try:
        dist_info = init_distributed(cfg.train.device)
    except (RuntimeError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        hint = (
            "; after a torchrun restart, launch with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 "
            "(PyTorch otherwise hands the restarted workers the previous attempt's addresses)"
            if restart_count()
            else ""
        )
        raise TrainingError(f"could not join the torchrun process group: {first}{hint}") from None
    compiled_before = compiled_kernels_enabled()
    finished = False
    try:
        result = _fit(cfg, dist_info, run_name, resume, overwrite, echo, name_prefix)
        finished = True
        return result
    except RuntimeError as e:
        if not (dist_info.distributed and _LOST_PEER.search(str(e))):
            raise
        raise TrainingError(
            "lost contact with another process of the run (it stopped or was killed); "
            "with torchrun --max-restarts N and --resume latest the run goes on from its last checkpoint"
        ) from e
    finally:
        use_compiled_kernels(compiled_before)
        release_run_names()
        if dist_info.distributed:
            shutdown(synchronise=finished)


def _choose_routing_kernels(cfg: Config, dist_info, echo: Callable[[str], None]) -> None:
    """Compiled or eager routing kernels for this run (``train.compile_routing``), said on rank 0."""
    device_type = resolve_device(cfg.train.device, dist_info.local_rank, processes=dist_info.world_size).type
    if cfg.train.compile_routing is None and device_type == "cpu" and dist_info.is_main:
        echo("routing: compiling its kernels for the CPU (train.compile_routing: null; false skips this)")
    compiled, warning = choose_compiled_kernels(cfg.train.compile_routing, device_type)
    if warning is not None and dist_info.is_main:
        echo(f"warning: {warning}")
    use_compiled_kernels(compiled)


def _fit(cfg, dist_info, run_name, resume, overwrite, echo, name_prefix) -> RunResult:
    say = echo if dist_info.is_main else (lambda _msg: None)
    choice = choose_run(cfg, run_name, resume, overwrite, name_prefix)
    ckpt, ckpt_path, name = choice.checkpoint, choice.checkpoint_path, choice.name
    if ckpt is not None:  # like the checks below, before compiling kernels and loading data
        _check_model_settings(cfg, ckpt, ckpt_path)  # first: another model cannot start from it either
        check_resume_settings(ckpt.get("config") or {}, cfg.to_dict(), ckpt_path)
    size = expected_image_size(cfg.data)
    teacher_path = teacher_ckpt = None
    if cfg.loss.teacher:  # a missing or broken teacher is said before the data loads
        teacher_path, teacher_ckpt = _find_checkpoint_setting(cfg, "loss.teacher", "the teacher's", name)
    init_path = init_ckpt = None
    if ckpt is not None:
        # a resumed run goes on from its own checkpoint, not from train.init_from: the config it
        # saves keeps the file the run first started from, not what the setting names now
        started = (ckpt.get("config") or {}).get("train", {}).get("init_from")
        if cfg.train.init_from and not _names_start(cfg, cfg.train.init_from, started, name):
            say(
                f"note: train.init_from ({cfg.train.init_from}) is not read: a resumed run goes on from its "
                f"own checkpoint, {ckpt_path}"
                + (f" (it started from {started})" if started else "")
                + "; to start a new run from those weights, leave out --resume and give a new --run-name"
            )
        cfg.train.init_from = started
    elif cfg.train.init_from:  # like the teacher: a missing or broken checkpoint is said before the data
        init_path, init_ckpt = _find_checkpoint_setting(cfg, "train.init_from", "another run's", name)
        _check_model_settings(cfg, init_ckpt, init_path)
    if size is not None:  # a model that cannot take the images is refused before they load (or download)
        try:
            CapsNet.from_config(cfg.model, cfg.routing, 1, 2, size).capsule_grid(size, size)
        except ValueError as e:
            raise ConfigError([f"model: {e} (the data gives {size}x{size} images)"]) from None
    if choice.note:  # before the check below, whose refusal it explains
        say(choice.note)
    if dist_info.is_main:
        check_run_dir_free(cfg, choice, overwrite)
    seed_everything(rank_seed(cfg.train.seed, dist_info.rank))
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    device = resolve_device(cfg.train.device, dist_info.local_rank, processes=dist_info.world_size)
    if device.type == "cpu":
        from capsnet.runtime import tune_allocator

        tune_allocator()
    # a resumed run goes on with the normalisation it started with, whatever images were added or
    # removed since (an image folder's statistics are computed from its training images)
    stats = trained_normalisation(ckpt) if ckpt is not None else None
    with reported_data_warnings(say):
        loaders = build_loaders(cfg, dist_info.rank, dist_info.world_size, stats=stats)
    # images added to or removed from the data since the checkpoint: refused before the run's
    # folder is touched where they would redraw its validation split, else said once it resumes
    sizes = data_sizes(loaders)
    data_note = data_change(ckpt.get("data_sizes"), sizes, ckpt_path) if ckpt is not None else None
    if ckpt is not None:
        check_held_out_images(ckpt.get("val_digest"), held_out_digest(loaders), ckpt_path)
    # after the data, so a missing or broken dataset is said before the seconds of compiling
    # (the kernel check draws no random numbers, so the run's streams are as they were)
    _choose_routing_kernels(cfg, dist_info, echo)
    info = loaders.info
    try:
        model = CapsNet.from_config(cfg.model, cfg.routing, info.channels, info.num_classes, info.image_size)
    except ValueError as e:
        raise ConfigError([f"model: {e}"]) from None
    for note in unused_settings(cfg):
        say(f"note: {note}")
    if cfg.train.sync_bn and not dist_info.distributed:
        say(
            "note: train.sync_bn is not used: it synchronises batch norm across torchrun's processes, and this is one"
        )
    teacher = table = None
    if teacher_ckpt is not None:
        teacher = load_teacher(cfg, info, device, teacher_path, teacher_ckpt)
        best = teacher_ckpt.get("best_metric")
        scored = f", best {teacher_ckpt.get('best_split', 'val')}/acc {best:.4f}" if best is not None else ""
        say(
            f"distilling from {teacher_path} (step {teacher_ckpt.get('step', '?')}{scored}): "
            f"weight {cfg.loss.teacher_weight:g}, temperature {cfg.loss.teacher_temperature:g}"
        )
        del teacher_ckpt
        train_set = loaders.train.dataset
        if train_set.fixed_items:
            start = time.perf_counter()
            table = teacher_table(cfg, teacher, train_set, device, cfg.logging.progress and dist_info.is_main)
            say(
                f"teacher's class activations of the {len(train_set):,} training images computed ahead "
                f"(no augmentation, so they hold for every epoch) in {time.perf_counter() - start:.1f}s"
            )
            teacher = None  # the table stands in for it: its memory is freed
    if ckpt is not None:
        check_architecture(ckpt["arch"], model.hparams, ckpt_path)
        # with train.ema, "model" holds the average and "train_model" the weights being trained
        load_model_state(model, ckpt.get("train_model", ckpt["model"]), ckpt_path)
    elif init_ckpt is not None:
        check_architecture(init_ckpt["arch"], model.hparams, init_path)
        load_model_state(model, init_ckpt["model"], init_path)
        say(
            f"model weights from {init_path} (step {init_ckpt.get('step', '?')}); "
            "optimiser and schedules start afresh"
        )
        del init_ckpt
    if dist_info.distributed and cfg.train.sync_bn:
        model = convert_sync_batchnorm(model, device)
    model.to(device)
    ema = WeightAverage(model, cfg.train.ema) if cfg.train.ema is not None else None
    resumed_average = ema is not None and ckpt is not None and "train_model" in ckpt
    if resumed_average:
        load_model_state(ema.model, ckpt["model"], ckpt_path)
    optimizer = build_optimizer(model, cfg)
    if ckpt is not None:
        # The state (moments, step counts) continues; the hyperparameters are the config's.
        settings = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
        try:
            optimizer.load_state_dict(ckpt["optimizer"])
        except (ValueError, KeyError) as e:
            raise TrainingError(
                f"optimizer state in {ckpt_path} does not fit optim.name={cfg.optim.name}, "
                f"optim.decay_scope={cfg.optim.decay_scope}: {e}"
            ) from None
        for group, own in zip(optimizer.param_groups, settings):
            group.update(own)
    forward = torch.compile(model) if cfg.train.compile else None
    step_module: nn.Module = TrainStep(model, forward, uses_reconstruction(model, cfg))
    if dist_info.distributed:
        step_module = nn.parallel.DistributedDataParallel(
            step_module,
            device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=model.decoder is not None and not uses_reconstruction(model, cfg),
        )
        if ema is not None and not resumed_average:
            ema.reset()  # DDP gave every rank rank 0's weights: so must the average start from them

    steps_per_epoch = math.ceil(len(loaders.train) / cfg.train.accumulate)
    total_steps = cfg.train.epochs * steps_per_epoch
    if cfg.train.max_steps is not None:
        total_steps = min(total_steps, cfg.train.max_steps)

    tb_dir = safe_child(cfg.logging.tb_dir, name)
    writer: NullWriter = NullWriter()
    run_dir = safe_child(cfg.logging.out_dir, name)
    if dist_info.is_main:
        run_dir = open_run_dir(cfg, choice, overwrite, say, total_steps)
    try:  # a run that fails here is marked as ended, as one that fails in the loop
        # a run continued in a new folder: its TensorBoard events start with the history that
        # open_run_dir copied into its metrics.jsonl, as that file does; written after hiding every
        # event already there (an earlier start from that checkpoint, or a deleted run of the name),
        # unless they are the source run's own (a run folder moved out of logging.out_dir and back)
        replay = (
            dist_info.is_main
            and choice.checkpoint_path is not None
            and not choice.resuming_here
            and not _source_events_are(tb_dir, ckpt, ckpt_path)
        )
        if dist_info.is_main:
            writer = TensorBoardWriter(
                tb_dir if cfg.logging.tensorboard else None,
                run_dir / "metrics.jsonl",
                # a resumed run hides the events an earlier attempt wrote past its checkpoint; a
                # fresh one all events of a run of that name whose folder was deleted by hand
                purge_step=int(ckpt["step"]) + 1 if ckpt is not None and not replay else 0,
            )
            if replay and (run_dir / "metrics.jsonl").is_file():
                writer.replay(run_dir / "metrics.jsonl")
        run = Run(
            cfg,
            dist_info,
            device,
            loaders,
            model,
            step_module,
            optimizer,
            writer,
            name,
            run_dir,
            steps_per_epoch,
            total_steps,
            say,
            ema=ema,
            teacher=teacher,
            teacher_table=table,
        )
        if ckpt is not None:
            restore_run(run, ckpt, ckpt_path)
            note = schedule_change(cfg, run.step, ckpt.get("total_steps"), total_steps)
            if note:
                say(note)
            note = batch_change(ckpt, cfg, run.batches_done, run.epoch, dist_info.world_size)
            if note:
                say(note)
            note = workers_change(ckpt, cfg)
            if note:
                say(note)
            if data_note:
                say(data_note)
                before = ckpt["data_sizes"]
                if run.best_acc is not None and before.get(run.eval_split) != sizes.get(run.eval_split):
                    say(
                        f"note: its best {run.eval_split}/acc so far ({run.best_acc:.4f}) was measured on other "
                        f"{run.eval_split} images, so best.pt is chosen afresh from here"
                    )
                    run.best_acc = run.best_step = None
            if ("train_model" in ckpt) != (ema is not None) and run.best_acc is not None:
                say(
                    f"note: train.ema was switched {'on' if ema is not None else 'off'} for this run: "
                    f"its best {run.eval_split}/acc so far ({run.best_acc:.4f}) was of the other weights, "
                    "so best.pt is chosen afresh from here"
                )
                run.best_acc = run.best_step = None
            # No best.pt beside the resumed checkpoint (one from steps past it was just removed,
            # or the run continues in a new folder): the recorded best has no file to stand for it.
            missing = broadcast(dist_info.is_main and not (run_dir / BEST).is_file())
            if missing and run.best_acc is not None:
                missing = not _carry_best_file(run, ckpt_path, ckpt, dist_info)
            elif run.best_acc is not None:
                _agree_with_best_file(run, ckpt_path, ckpt, dist_info)
            if missing and run.best_acc is not None:
                say(
                    f"note: {run_dir} holds no best.pt of the steps up to {run.step}, so best.pt is chosen "
                    f"afresh from here (the best {run.eval_split}/acc so far was {run.best_acc:.4f} at step "
                    f"{run.best_step})"
                )
                run.best_acc = run.best_step = None
    except BaseException:
        if dist_info.is_main:
            mark_run_ended(run_dir)
        raise
    done = False
    try:
        result = _loop(run, ckpt_path)
        done = True
        return result
    except TrackingError as e:
        raise _tracking_failed(run, e) from e
    finally:
        if dist_info.is_main:  # its process may live on (a notebook): it trains this run no more
            mark_run_ended(run_dir)
        try:
            writer.close()
        except TrackingError as e:
            if done:  # else the error already on its way says more
                raise _tracking_failed(run, e) from e


def _tracking_failed(run: Run, error: TrackingError) -> TrainingError:
    return TrainingError(
        f"stopped at step {run.step}: {error}; the last complete checkpoint is "
        f"{run.last_checkpoint or 'none'}; free some space (or fix the folder) and resume with: "
        f"capsnet train --resume {shlex.quote(str(run.run_dir))}"
    )


def _source_events_are(tb_dir: Path, ckpt: dict, ckpt_path: Path) -> bool:
    """Whether ``tb_dir`` is where the run that saved ``ckpt`` (at ``ckpt_path``) wrote its events."""
    stored = ((ckpt.get("config") or {}).get("logging") or {}).get("tb_dir")
    try:
        source = safe_child(stored, run_name_of(ckpt_path, ckpt))
    except (CheckpointError, TypeError, ValueError):
        return False
    return os.path.abspath(source) == os.path.abspath(tb_dir)


def _carry_best_file(run: Run, ckpt_path: Path, ckpt: dict[str, Any], dist_info) -> bool:
    """Writes the best.pt that the resumed checkpoint records, where the run's folder lacks it.

    That best is the resumed file itself where it is the best step, else the best.pt beside it
    where that still holds the recorded step (a later best of an older run does not count), else
    the step file of that step where it is still kept: a run
    continued in a new folder, or resumed from a step whose later best.pt was removed, keeps the
    best model so far. Returns whether one was written.
    """
    copied = None
    if dist_info.is_main:
        source = Path(ckpt_path)
        for candidate in (source, source.parent / BEST, source.parent / step_file(run.best_step)):
            try:  # the resumed file is loaded already
                best = ckpt if candidate == source else load_checkpoint(candidate)
            except CheckpointError:
                continue
            if (
                best.get("step") == best.get("best_step") == run.best_step
                and best.get("best_metric") == run.best_acc
                and best.get("best_split") == run.eval_split
            ):
                try:
                    atomic_write_bytes(candidate.read_bytes(), run.run_dir / BEST)
                except (OSError, CheckpointError) as e:
                    run.echo(f"note: could not copy {candidate} to best.pt: {e}")
                    break
                copied = candidate
                break
    copied = broadcast(copied)
    if copied is not None:
        run.echo(
            f"best.pt: a copy of {copied}, the best so far (step {run.best_step}, "
            f"{run.eval_split}/acc {run.best_acc:.4f})"
        )
    return copied is not None


def _agree_with_best_file(run: Run, ckpt_path: Path, ckpt: dict[str, Any], dist_info) -> None:
    """Makes best.pt and the resumed checkpoint's record of the best agree.

    A save stopped between the step file and best.pt (disk full, killed) leaves a
    checkpoint recording a best that best.pt does not hold. best.pt is then written again from
    the file that holds the recorded best (the resumed checkpoint itself, or the kept step file
    of that step); where none does, the record takes best.pt's accuracy and step, as going on
    from the record no later model that beats best.pt but not the record would replace it.
    """
    record = None
    if dist_info.is_main:
        try:
            best = load_checkpoint(run.run_dir / BEST)
            record = (
                best.get("best_metric"),
                best.get("best_step"),
                best.get("step"),
                best.get("best_split"),
            )
        except CheckpointError:
            record = (None, None, None, None)
    acc, step, saved_at, split = broadcast(record)
    if step == run.best_step and acc == run.best_acc:
        return
    if _carry_best_file(run, ckpt_path, ckpt, dist_info):
        return
    if step is not None and step == saved_at and split == run.eval_split and acc is not None:
        run.echo(
            f"note: best.pt holds step {step} ({run.eval_split}/acc {acc:.4f}), not the step {run.best_step} "
            f"({run.best_acc:.4f}) that the checkpoint records (a save stopped before writing it): "
            f"the best so far is best.pt's"
        )
        run.best_acc, run.best_step = float(acc), int(step)
    else:
        run.echo(
            f"note: best.pt is unreadable or not a best of this run, so best.pt is chosen afresh from here "
            f"(the best {run.eval_split}/acc so far was {run.best_acc:.4f} at step {run.best_step})"
        )
        run.best_acc = run.best_step = None


def batch_change(ckpt: dict, cfg: Config, batches_done: int, epoch: int, world_size: int = 1) -> str | None:
    """A note when a run resumed in the middle of an epoch now groups its images differently, else None.

    Batch sizes are per process; the image counts are over all ``world_size`` processes.
    """
    saved = ckpt.get("config", {}).get("train", {})
    before_world = int(ckpt.get("world_size", world_size))
    before = (saved.get("batch_size"), saved.get("accumulate", 1), before_world)
    now = (cfg.train.batch_size, cfg.train.accumulate, world_size)
    if not batches_done or None in before or before == now:
        return None
    images_now = batches_done * now[0] * now[1] * world_size
    images_before = batches_done * before[0] * before[1] * before_world
    if images_now == images_before:  # the same images per step, in other shares
        return None
    what = (
        f"train.batch_size x train.accumulate is {now[0]} x {now[1]} instead of {before[0]} x {before[1]}"
        if now[:2] != before[:2]
        else f"the run trains in {counted(world_size, 'process', 'processes')} instead of {before_world}"
    )
    if now[:2] != before[:2] and world_size != before_world:
        what += f", in {counted(world_size, 'process', 'processes')} instead of {before_world}"
    return (
        f"note: {what} in the middle of epoch {epoch + 1}: its first {batches_done} steps are skipped in "
        f"steps of the new size ({images_now} images instead of the {images_before} trained on), so until "
        "the epoch ends some images are seen twice or not at all"
    )


def workers_change(ckpt: dict, cfg: Config) -> str | None:
    """A note when a run with training augmentation resumes with another train.num_workers, else None:
    its random draws are made in the loader's processes (or in the training process, with none), so
    another count draws other shifts, flips and erasures from the same seeds."""
    saved = (ckpt.get("config") or {}).get("train", {}).get("num_workers")
    now = cfg.train.num_workers
    if not cfg.data.augment or not isinstance(saved, int) or saved == now:
        return None
    return (
        f"note: train.num_workers is {now} instead of {saved}: the training images' random augmentation is "
        "drawn in the loader's worker processes, so it goes on with other draws; the run continues, but "
        f"not bit for bit as it would have (-o train.num_workers={saved} keeps them)"
    )


def data_change(before: dict[str, int] | None, now: dict[str, int], where: str | Path) -> str | None:
    """A note when a run resumes on data whose splits hold other numbers of images than when its
    checkpoint ``where`` was saved (files added to or removed from an image folder), else None;
    checkpoints that record no sizes pass. Where the run has a validation split and its training
    data changed, CheckpointError instead: the split would be drawn anew from other images, and
    could hold out images the run trained on (as a changed data.val_split would)."""
    if not isinstance(before, dict) or before == now:
        return None
    moved = size_changes(before, now)
    if (before.get("val") or now["val"]) and any(before.get(k) != now[k] for k in ("train", "val")):
        raise CheckpointError(
            f"cannot resume {where} on other data (images: {moved}): its validation split would be drawn "
            "anew and could hold out images the run trained on; resume it on the data it trained on, or "
            f"start a new run from its weights with -o train.init_from={where}"
        )
    return (
        f"note: the data is not what the checkpoint was trained on (images: {moved}): the order of "
        "the epochs is drawn anew, so the run does not go on as it would have"
    )


def check_held_out_images(before: Any, now: str | None, where: str | Path) -> None:
    """Refuses a resume whose validation split holds other images than when ``where`` was saved, with
    the same image counts (files of an image folder swapped for others, or changed): best.pt would be
    chosen on images the run may have trained on. Checkpoints that record no digest pass."""
    if not isinstance(before, str) or now is None or before == now:
        return
    raise CheckpointError(
        f"cannot resume {where} on other data: its validation split holds other images than it did (the "
        "same numbers of images, other files or pixels), which could be images the run trained on; resume "
        f"it on the data it trained on, or start a new run from its weights with -o train.init_from={where}"
    )


def schedule_change(cfg: Config, step: int, before: int | None, now: int) -> str | None:
    """A note when a resumed run's length changed the schedules that span the whole run, else None."""
    if before is None or int(before) == now:
        return None
    moves = []
    if cfg.optim.decay_steps is None:
        lr0, lr1 = lr_at(step, cfg.optim, int(before)), lr_at(step, cfg.optim, now)
        moves.append(f"the learning rate from {lr0:.3g} to {lr1:.3g}")
    if uses_margin(cfg.loss) and cfg.loss.margin_steps is None:
        m0, m1 = margin_at(step, int(before), cfg.loss), margin_at(step, now, cfg.loss)
        moves.append(f"the spread-loss margin from {m0:.3f} to {m1:.3f}")
    if not moves:
        return None
    return (
        f"note: the run is now {now} steps long instead of {before} (train.epochs or train.max_steps "
        f"changed), and the schedules spread over the whole run follow: at step {step} " + " and ".join(moves)
    )


def _loop(run: Run, resumed_from: Path | None) -> RunResult:
    cfg, say = run.cfg, run.echo
    say(
        f"run {run.run_name}: checkpoints in {run.run_dir}"
        + (f", TensorBoard in {Path(cfg.logging.tb_dir) / run.run_name}" if cfg.logging.tensorboard else "")
    )
    say(
        f"data {cfg.data.name}: {len(run.loaders.train.dataset)} train, "
        + (f"{len(run.loaders.val.dataset)} val, " if run.loaders.val is not None else "")
        + f"{len(run.loaders.test.dataset)} test images of {run.loaders.info.channels}x"
        f"{run.loaders.info.image_size}x{run.loaders.info.image_size}, {run.loaders.info.num_classes} classes"
        + (f", from {run.loaders.info.source}" if run.loaders.info.source else "")
    )
    if run.loaders.val is None:
        say("no validation split (data.val_split is 0): best.pt is chosen by test accuracy")
    elif len(run.loaders.val.dataset) < MIN_VAL_IMAGES:
        say(
            f"note: the validation split holds {len(run.loaders.val.dataset)} images, which choose best.pt; "
            f"its accuracy moves in steps of {1 / len(run.loaders.val.dataset):.2g} (a larger data.val_split "
            "gives a steadier choice)"
        )
    cpus = os.cpu_count() or 1
    if cfg.train.num_workers > cpus:
        say(
            f"note: train.num_workers={cfg.train.num_workers} starts more loader processes than the {cpus} "
            f"CPUs (each holds a copy of the process's memory); {min(cpus, 4)} or fewer is usually enough"
        )
    say(run.model.summary())
    if run.ema is not None:
        say(
            f"moving average of the weights (train.ema={cfg.train.ema}): it is what is evaluated, "
            "saved as best.pt and exported"
        )
    threads = torch.get_num_threads()
    say(
        f"device {run.device}, {counted(threads, 'thread')}, {cfg.train.precision}, "
        f"{counted(run.dist.world_size, 'process', 'processes')}, "
        f"{'compiled' if compiled_kernels_enabled() else 'eager'} routing; "
        f"{counted(cfg.train.epochs, 'epoch')} x {counted(run.steps_per_epoch, 'step')}"
        + (f", stopping at step {cfg.train.max_steps}" if cfg.train.max_steps else "")
    )
    if restart_count():
        say(f"torchrun restarted the workers ({counted(restart_count(), 'time')} so far)")
    if resumed_from is not None:
        if run.batches_done >= run.steps_per_epoch:
            where = f"after the last step of epoch {run.epoch + 1}, before its evaluation"
        elif run.batches_done:
            where = f"{run.batches_done} of {counted(run.steps_per_epoch, 'step')} into epoch {run.epoch + 1}"
        else:
            where = f"after epoch {run.epoch}"
        say(f"resumed from {resumed_from} at step {run.step} ({where})")

    stopped, last_eval = "completed", None
    with catch_stop_signals() as stop:
        while run.epoch < cfg.train.epochs:
            if cfg.train.max_steps is not None and run.step >= cfg.train.max_steps:
                stopped = "max_steps"
                if resumed_from is not None and last_eval is None:
                    say(
                        f"already at train.max_steps ({cfg.train.max_steps}); to go on, resume with "
                        "-o train.max_steps=null or a larger value"
                    )
                break
            reason, summary = train_epoch(run, stop)
            if reason in ("SIGINT", "SIGTERM"):
                stopped = reason
                # within an epoch, an interim checkpoint: it pushes no epoch's out of logging.keep
                save_run(run, mid_epoch=run.batches_done > 0, interim=run.batches_done > 0)
                break
            with training_chunks():  # evaluating within the memory of a training step
                evaluated = end_of_epoch(run, summary, stop)
            if evaluated is None:  # stopped during the evaluation, which the resumed run does again
                stopped = stop.name
                save_run(run, mid_epoch=True, interim=True)
                say(f"{stopped} during the evaluation at step {run.step}: the resumed run evaluates")
                break
            last_eval = evaluated
            # the next img/s leaves out the evaluation and the save, and the images trained before them
            run.window_start, run.window_untimed = time.perf_counter(), int(run.window["n"])
            if reason == "max_steps":
                stopped = reason
                break
            signalled = any_rank([stop.received is not None], run.device)[0]  # during evaluation or saving
            if signalled and run.epoch < cfg.train.epochs:  # after the last epoch's save the run is complete
                if stop.received is None:
                    stop.received = signal.SIGTERM  # another rank was signalled
                stopped = stop.name
                break
    exit_code = EXIT_CODES.get(stopped, 0)
    # the summary of an attempt that ended as asked (its last epoch, train.max_steps); a stopped
    # one's would sit at its checkpoint's step, which the resumed run's events do not hide
    if last_eval is not None and not exit_code:
        run.writer.hparams(
            {
                "model.preset": str(cfg.model.preset),
                "model.iterations": cfg.model.iterations,
                "optim.name": cfg.optim.name,
                "optim.lr": cfg.optim.lr,
                "train.batch_size": cfg.train.batch_size,
                "loss.kind": cfg.loss.kind,
                "data.name": cfg.data.name,
            },
            {
                "hparam/best_acc": run.best_acc or 0.0,
                "hparam/last_acc": last_eval.acc,
                "hparam/last_loss": last_eval.loss,
            },
            step=run.step,
        )
    if exit_code:
        say(f"stopped by {stopped} at step {run.step}; saved {run.last_checkpoint}")
        say(f"resume with: capsnet train --resume {shlex.quote(str(run.run_dir))}")
    else:
        if resumed_from is not None and last_eval is None and stopped == "completed":
            say(
                f"nothing to train: the run already has {run.epoch} of train.epochs={cfg.train.epochs} "
                "epochs; to go on, resume with -o train.epochs=N (N larger)"
            )
        what = "reached train.max_steps" if stopped == "max_steps" else "done"
        best = (
            f"; best {run.eval_split}/acc {run.best_acc:.4f} at step {run.best_step}"
            if run.best_acc is not None
            else ""
        )
        say(
            f"{what} at step {run.step}{best}; evaluate with: capsnet eval --ckpt {shlex.quote(str(run.run_dir))}"
        )
    if run.bad_total:
        say(f"skipped {counted(run.bad_total, 'non-finite step')}")
    result = RunResult(
        run_name=run.run_name,
        run_dir=run.run_dir,
        step=run.step,
        epoch=run.epoch,
        best_acc=run.best_acc,
        best_step=run.best_step,
        best_split=run.eval_split,
        last_eval=last_eval,
        checkpoint=run.last_checkpoint,
        stopped=stopped,
        bad_steps=run.bad_total,
        exit_code=exit_code,
    )
    if exit_code:
        raise TrainingInterrupted(result)
    return result
