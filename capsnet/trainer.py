"""Training: ``fit(cfg)`` builds everything in order and owns the loop.

Order: distributed set-up -> checkpoint to resume (if any) -> run directory name
-> seeds -> device -> data -> model -> optimiser -> run directory, config.yaml
-> writers -> restored RNG states -> epochs (train, evaluate, checkpoint).

The global step counts optimiser steps (a skipped non-finite step counts too,
so the step <-> epoch mapping never drifts); schedules are pure functions of it.

Resuming restores the model, optimiser, step, epoch, best metric and every RNG
state, including the training loader's shuffling generator, so on a CPU a run
resumed from a checkpoint gives bit-identical results to one that never
stopped. Checkpoints written at the end of an epoch hold the RNG state at that
point. Checkpoints written mid-epoch (``train.max_steps``, SIGINT/SIGTERM) hold
the RNG state at the start of that epoch and the number of batches consumed; a
resumed run replays the loader to that point, skipping those batches, and goes
on from there (exact with ``train.num_workers: 0``).
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import signal
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import datetime
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from capsnet import __version__
from capsnet.checkpoint import (
    CHECKPOINT_FORMAT,
    atomic_write_bytes,
    capture_rng,
    check_architecture,
    discard_after,
    load_checkpoint,
    load_model_state,
    resolve_checkpoint,
    restore_rng,
    safe_child,
    save_checkpoint,
    validate_run_name,
    write_run_record,
)
from capsnet.config import Config, ConfigError, config_from_dict, dump_config
from capsnet.data import Loaders, build_loaders
from capsnet.evaluate import EvalResult, autocast, evaluate, resolve_device
from capsnet.loss import compute_loss, lr_at, margin_at, uses_reconstruction
from capsnet.model import CapsNet, CapsOutput
from capsnet.tracking import (
    NullWriter,
    TensorBoardWriter,
    format_metrics,
    log_routing_histograms,
    progress,
    reconstruction_grid,
    routing_scalars,
    set_postfix,
    truncate_metrics,
)


class TrainingError(Exception):
    """Training cannot go on (run directory clash, non-finite steps, ...); the message says why."""


class TrainingInterrupted(Exception):
    """SIGINT or SIGTERM stopped a run after its checkpoint was saved; ``exit_code`` is 130 or 143."""

    def __init__(self, result: RunResult):
        self.result = result
        self.exit_code = result.exit_code
        super().__init__(
            f"stopped by {result.stopped} at step {result.step}; "
            f"resume with: capsnet train --resume {result.run_dir}"
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


# --------------------------------------------------------------------------- processes and devices


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str) -> DistInfo:
    """Joins the process group when started by torchrun (RANK, WORLD_SIZE, LOCAL_RANK set)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    info = DistInfo(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    use_cuda = device in ("auto", "cuda") and torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(info.local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return info


def _agree(flags: list[bool], device: torch.device) -> list[bool]:
    """Element-wise OR of boolean flags over all ranks (identity in a single process)."""
    if not (dist.is_available() and dist.is_initialized()):
        return flags
    t = torch.tensor([float(f) for f in flags], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [bool(v) for v in t.tolist()]


def _sum_over_ranks(values: list[float], device: torch.device) -> list[float]:
    if not (dist.is_available() and dist.is_initialized()):
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


class StopRequest:
    """Set by the first SIGINT/SIGTERM: stop after the current step, save, exit 130/143."""

    def __init__(self) -> None:
        self.received: int | None = None

    @property
    def name(self) -> str:
        return signal.Signals(self.received).name if self.received else ""


@contextlib.contextmanager
def catch_stop_signals() -> Iterator[StopRequest]:
    """Turns the first SIGINT/SIGTERM into a StopRequest; a second one acts as usual."""
    stop, previous = StopRequest(), {}

    def handle(signum, frame) -> None:
        stop.received = signum
        signal.signal(signum, previous.get(signum, signal.SIG_DFL))

    with contextlib.suppress(ValueError):  # not the main thread: signals stay as they are
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, handle)
    try:
        yield stop
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


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


def build_optimizer(model: nn.Module, cfg: Config) -> torch.optim.Optimizer:
    o = cfg.optim
    if o.name == "adam":
        return torch.optim.Adam(model.parameters(), lr=o.lr, weight_decay=o.weight_decay)
    if o.name == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=o.lr, weight_decay=o.weight_decay)
    return torch.optim.SGD(model.parameters(), lr=o.lr, momentum=0.9, weight_decay=o.weight_decay)


def default_run_name(cfg: Config, prefix: str | None = None) -> str:
    return f"{prefix or cfg.data.name}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


def seed_everything(seed: int) -> None:
    import random

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def config_for_resume(resume: str, overrides: list[str] | None = None) -> Config:
    """The config stored in the checkpoint that ``resume`` names, with ``overrides`` applied."""
    out_dir = config_from_dict({}, overrides).logging.out_dir
    ckpt = load_checkpoint(resolve_checkpoint(resume, out_dir))
    return config_from_dict(ckpt["config"], overrides)


def _finite_parameters(model: nn.Module) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


# --------------------------------------------------------------------------- the run


@dataclass
class Run:
    """Everything the loop reads and updates."""

    cfg: Config
    dist: DistInfo
    device: torch.device
    loaders: Loaders
    model: CapsNet  # the bare model: checkpoints, evaluation, statistics
    step_module: nn.Module  # what the loop calls: TrainStep, maybe DDP-wrapped
    optimizer: torch.optim.Optimizer
    writer: NullWriter
    run_name: str
    run_dir: Path
    steps_per_epoch: int
    total_steps: int
    echo: Callable[[str], None]
    step: int = 0
    epoch: int = 0  # completed epochs
    batches_done: int = 0  # optimiser steps taken in the current, unfinished epoch
    epoch_rng: dict[str, Any] = field(default_factory=dict)
    best_acc: float | None = None
    best_step: int | None = None
    bad_in_row: int = 0
    bad_total: int = 0
    window: dict[str, float] = field(default_factory=lambda: {"loss": 0.0, "correct": 0, "n": 0, "steps": 0})
    window_start: float = field(default_factory=time.perf_counter)
    last_checkpoint: Path | None = None

    @property
    def eval_split(self) -> str:
        return "val" if self.loaders.val is not None else "test"


def _prepare_run_dir(cfg: Config, name: str, resuming_here: bool, overwrite: bool, tb_dir: Path) -> Path:
    run_dir = safe_child(cfg.logging.out_dir, name)
    if run_dir.exists() and any(run_dir.iterdir()) and not resuming_here:
        if not overwrite:
            raise TrainingError(
                f"run directory {run_dir} already exists; continue it with --resume {run_dir}, "
                "replace it with --overwrite, or pick another --run-name"
            )
        shutil.rmtree(run_dir)
        shutil.rmtree(tb_dir, ignore_errors=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def _make_checkpoint(run: Run, mid_epoch: bool) -> dict[str, Any]:
    return {
        "format": CHECKPOINT_FORMAT,
        "version": __version__,
        "run": run.run_name,
        "time": time.time(),
        "model": run.model.state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "step": run.step,
        "epoch": run.epoch,
        "batches_done": run.batches_done if mid_epoch else 0,
        "rng": run.epoch_rng if mid_epoch else capture_rng(run.loaders.train_generator),
        "best_metric": run.best_acc,
        "best_step": run.best_step,
        "best_split": run.eval_split,
        "skipped_steps": run.bad_total,
        "config": run.cfg.to_dict(),
        "arch": dict(run.model.hparams),
        "data_info": asdict(run.loaders.info),
    }


def _save(run: Run, mid_epoch: bool, is_best: bool = False) -> Path | None:
    if run.dist.is_main:
        run.writer.flush()
        ckpt = _make_checkpoint(run, mid_epoch)
        run.last_checkpoint = save_checkpoint(run.run_dir, ckpt, run.cfg.logging.keep, is_best)
    return run.last_checkpoint


def _log_step(run: Run, lr: float, margin: float) -> None:
    loss, steps, correct, n = _sum_over_ranks(
        [run.window["loss"], run.window["steps"], run.window["correct"], run.window["n"]], run.device
    )
    elapsed = max(time.perf_counter() - run.window_start, 1e-9)
    metrics = {
        "train/loss": loss / max(steps, 1),
        "train/acc": correct / max(n, 1),
        "sched/lr": lr,
        "sched/margin": margin,
        "sched/lambda": run.model.lambdas()[-1],
        "perf/img_per_s": n / elapsed,
        "train/skipped_steps": run.bad_total,
        **routing_scalars(run.model.routing_stats),
    }
    run.writer.scalars(metrics, run.step)
    run.window = {"loss": 0.0, "correct": 0, "n": 0, "steps": 0}
    run.window_start = time.perf_counter()


def _train_step(run: Run, group: list[tuple[Tensor, Tensor]], stop: StopRequest) -> tuple[float, int, int]:
    """One optimiser step over ``group`` (``train.accumulate`` micro-batches)."""
    cfg, model = run.cfg, run.model
    lr = lr_at(run.step, cfg.optim)
    margin = margin_at(run.step, run.total_steps, cfg.loss)
    for g in run.optimizer.param_groups:
        g["lr"] = lr
    next_step = run.step + 1
    log_now = next_step % cfg.logging.log_every == 0
    hist_now = next_step % cfg.logging.hist_every == 0
    model.record_stats = log_now or hist_now
    run.optimizer.zero_grad(set_to_none=True)
    loss_sum, correct, n = torch.zeros((), device=run.device), 0, 0
    for i, (x, y) in enumerate(group):
        x, y = x.to(run.device, non_blocking=True), y.to(run.device, non_blocking=True)
        defer_sync = isinstance(run.step_module, nn.parallel.DistributedDataParallel) and i < len(group) - 1
        with run.step_module.no_sync() if defer_sync else contextlib.nullcontext():
            with autocast(run.device, cfg.train.precision):
                out, recon = run.step_module(x, y)
                loss, _ = compute_loss(out, x, y, model, cfg, run.step, run.total_steps, recon=recon)
            (loss / len(group)).backward()
        loss_sum += loss.detach() / len(group)
        correct += int((out.activations.detach().argmax(dim=1) == y).sum())
        n += len(y)
    clip = cfg.optim.grad_clip if cfg.optim.grad_clip is not None else math.inf
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    loss_value = float(loss_sum)
    bad, stopping = _agree(
        [not (math.isfinite(loss_value) and bool(torch.isfinite(grad_norm))), stop.received is not None],
        run.device,
    )
    if bad:
        run.optimizer.zero_grad(set_to_none=True)
        run.bad_in_row += 1
        run.bad_total += 1
        if run.bad_in_row >= cfg.train.max_bad_steps:
            raise TrainingError(
                f"stopped at step {run.step}: {run.bad_in_row} non-finite steps in a row "
                f"(train.max_bad_steps); {_diagnose(run, group[0][0])}; "
                "try a lower optim.lr or set optim.grad_clip"
            )
    else:
        run.optimizer.step()
        run.bad_in_row = 0
    run.step = next_step
    run.batches_done += 1
    if stopping and stop.received is None:
        stop.received = signal.SIGTERM  # another rank was signalled
    if not bad:
        run.window["loss"] += loss_value
        run.window["steps"] += 1
    run.window["correct"] += correct
    run.window["n"] += n
    if log_now:
        _log_step(run, lr, margin)
    if hist_now:
        log_routing_histograms(run.writer, model.routing_stats, run.step)
    model.record_stats = False
    return loss_value, correct, n


@torch.no_grad()
def _diagnose(run: Run, x: Tensor) -> str:
    """Names the first routing layer whose statistics are non-finite on ``x`` (the failing batch)."""
    model = run.model
    if not _finite_parameters(model):
        bad = next(n for n, p in model.named_parameters() if not bool(torch.isfinite(p).all()))
        where = f"parameter {bad} is non-finite"
    else:
        where = "all parameters are finite"
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


def _batches(run: Run) -> Iterator[list[tuple[Tensor, Tensor]]]:
    """The epoch's batches in groups of ``train.accumulate``, skipping the groups already done."""
    acc = run.cfg.train.accumulate
    it = iter(run.loaders.train)
    deque(islice(it, run.batches_done * acc), maxlen=0)  # replays the loader (and its RNG draws)
    while group := list(islice(it, acc)):
        yield group


def train_epoch(run: Run, stop: StopRequest) -> tuple[str | None, dict[str, float]]:
    """Trains until the epoch ends, ``train.max_steps`` is reached or a stop is requested."""
    if run.loaders.train_sampler is not None and hasattr(run.loaders.train_sampler, "set_epoch"):
        run.loaders.train_sampler.set_epoch(run.epoch)
    if run.batches_done == 0:
        run.epoch_rng = capture_rng(run.loaders.train_generator)
    run.model.train()
    totals = {"loss": 0.0, "correct": 0, "n": 0, "steps": 0, "start": time.perf_counter()}
    batches = _batches(run)
    bar = progress(
        batches,
        total=run.steps_per_epoch - run.batches_done,
        enabled=run.cfg.logging.progress and run.dist.is_main,
        desc=f"epoch {run.epoch + 1}",
    )
    reason = None
    for group in bar:
        loss, correct, n = _train_step(run, group, stop)
        if math.isfinite(loss):
            totals["loss"] += loss
            totals["steps"] += 1
        totals["correct"] += correct
        totals["n"] += n
        elapsed = time.perf_counter() - totals["start"]
        set_postfix(
            bar,
            loss=totals["loss"] / max(totals["steps"], 1),
            acc=totals["correct"] / max(totals["n"], 1),
            img_s=totals["n"] / max(elapsed, 1e-9),
        )
        if stop.received is not None:
            reason = stop.name
            break
        if run.cfg.train.max_steps is not None and run.step >= run.cfg.train.max_steps:
            reason = "max_steps"
            break
    if reason is None or run.batches_done >= run.steps_per_epoch:
        for _ in batches:  # run the loader to its end, as a full epoch does (the sampler draws there)
            pass
        run.epoch += 1
        run.batches_done = 0
    if bar is not batches:
        bar.close()
    elapsed = time.perf_counter() - totals["start"]
    loss, steps, correct, n = _sum_over_ranks(
        [totals["loss"], totals["steps"], totals["correct"], totals["n"]], run.device
    )
    summary = {
        "train/loss": loss / max(steps, 1),
        "train/acc": correct / max(n, 1),
        "perf/img_per_s": n / max(elapsed, 1e-9),
        "time": elapsed,
    }
    return reason, summary


def end_of_epoch(run: Run, summary: dict[str, float]) -> EvalResult:
    """Evaluates, logs, saves a checkpoint (and best.pt on a new best) and prints one line."""
    split = run.eval_split
    loader = run.loaders.val if split == "val" else run.loaders.test
    result = evaluate(
        run.model, loader, run.cfg, run.device, run.step, run.total_steps, run.loaders.info.class_names
    )
    run.writer.scalars({f"{split}/loss": result.loss, f"{split}/acc": result.acc}, run.step)
    if uses_reconstruction(run.model, run.cfg):
        _log_reconstructions(run, loader)
    improved = (
        math.isfinite(result.loss)
        and (run.best_acc is None or result.acc > run.best_acc)
        and _finite_parameters(run.model)
    )
    if improved:
        run.best_acc, run.best_step = result.acc, run.step
    path = _save(run, mid_epoch=run.batches_done > 0, is_best=improved)
    line = format_metrics(
        {
            **summary,
            f"{split}/loss": result.loss,
            f"{split}/acc": result.acc,
            "sched/lr": lr_at(max(run.step - 1, 0), run.cfg.optim),
            "sched/margin": margin_at(max(run.step - 1, 0), run.total_steps, run.cfg.loss),
        },
        ["train/loss", "train/acc", f"{split}/loss", f"{split}/acc", "sched/lr", "sched/margin"],
    )
    best = f"best {run.best_acc:.4f} @ {run.best_step}" if run.best_acc is not None else "best -"
    epochs = run.cfg.train.epochs
    epoch = (
        f"epoch {run.epoch}/{epochs}"
        if run.batches_done == 0
        else (f"epoch {run.epoch + 1}/{epochs} (partial: {run.batches_done}/{run.steps_per_epoch} steps)")
    )
    run.echo(
        f"{epoch}  step {run.step}  {line}  {best}  "
        f"{summary['perf/img_per_s']:.0f} img/s  {summary['time']:.1f}s"
        + (f"  -> {path.name}" if path is not None else "")
    )
    return result


@torch.no_grad()
def _log_reconstructions(run: Run, loader) -> None:
    if not run.dist.is_main:
        return
    x, y = next(iter(loader))
    x, y = x[:8].to(run.device), y[:8].to(run.device)
    run.model.eval()
    recon = run.model.reconstruct(run.model(x).poses, y)
    run.model.train()
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
    ``<name_prefix or data.name>-<date>-<time>``. Raises ConfigError, DataError,
    CheckpointError or TrainingError with a message meant for the user, and
    TrainingInterrupted (holding the RunResult) after SIGINT/SIGTERM once the
    checkpoint is saved.
    """
    dist_info = init_distributed(cfg.train.device)
    try:
        return _fit(cfg, dist_info, run_name, resume, overwrite, echo, name_prefix)
    finally:
        if dist_info.distributed and dist.is_initialized():
            dist.destroy_process_group()


def _fit(cfg, dist_info, run_name, resume, overwrite, echo, name_prefix) -> RunResult:
    say = echo if dist_info.is_main else (lambda _msg: None)
    out_dir = Path(cfg.logging.out_dir)
    ckpt, ckpt_path = None, None
    if resume is not None:
        ckpt_path = resolve_checkpoint(resume, out_dir)
        ckpt = load_checkpoint(ckpt_path)
    if run_name is not None:
        name = validate_run_name(run_name)
    elif ckpt is not None:
        name = validate_run_name(str(ckpt.get("run") or ckpt_path.parent.name))
    else:
        name = default_run_name(cfg, name_prefix)
        base, k = name, 2
        while (out_dir / name).exists():
            name, k = f"{base}-{k}", k + 1
    if dist_info.distributed:
        holder = [name]
        dist.broadcast_object_list(holder, src=0)
        name = holder[0]
    resuming_here = ckpt is not None and safe_child(out_dir, name).resolve() == ckpt_path.parent.resolve()
    if resuming_here and overwrite:
        raise TrainingError("--overwrite with --resume into the same run would delete the run being resumed")

    seed_everything(cfg.train.seed)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    device = resolve_device(cfg.train.device, dist_info.local_rank)
    if device.type == "cpu":
        from capsnet.runtime import tune_allocator

        tune_allocator()
    loaders = build_loaders(cfg, dist_info.rank, dist_info.world_size)
    info = loaders.info
    try:
        model = CapsNet.from_config(cfg.model, cfg.routing, info.channels, info.num_classes, info.image_size)
    except ValueError as e:
        raise ConfigError([f"model: {e}"]) from None
    if ckpt is not None:
        check_architecture(ckpt["arch"], model.hparams, ckpt_path)
        load_model_state(model, ckpt["model"], ckpt_path)
    if dist_info.distributed and cfg.train.sync_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model.to(device)
    optimizer = build_optimizer(model, cfg)
    if ckpt is not None:
        try:
            optimizer.load_state_dict(ckpt["optimizer"])
        except (ValueError, KeyError) as e:
            raise TrainingError(
                f"optimizer state in {ckpt_path} does not fit optim.name={cfg.optim.name}: {e}"
            ) from None
    forward = torch.compile(model) if cfg.train.compile else None
    step_module: nn.Module = TrainStep(model, forward, uses_reconstruction(model, cfg))
    if dist_info.distributed:
        step_module = nn.parallel.DistributedDataParallel(
            step_module,
            device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=model.decoder is not None and not uses_reconstruction(model, cfg),
        )

    steps_per_epoch = math.ceil(len(loaders.train) / cfg.train.accumulate)
    total_steps = cfg.train.epochs * steps_per_epoch
    if cfg.train.max_steps is not None:
        total_steps = min(total_steps, cfg.train.max_steps)

    tb_dir = safe_child(cfg.logging.tb_dir, name)
    writer: NullWriter = NullWriter()
    run_dir = safe_child(out_dir, name)
    start_step = int(ckpt["step"]) if ckpt is not None else 0
    if dist_info.is_main:
        run_dir = _prepare_run_dir(cfg, name, resuming_here, overwrite, tb_dir)
        atomic_write_bytes(dump_config(cfg).encode(), run_dir / "config.yaml")
        if resuming_here:
            for dropped in discard_after(run_dir, start_step):
                say(f"note: removed {dropped.name}, past the resumed step {start_step}")
        truncate_metrics(run_dir / "metrics.jsonl", start_step)
        write_run_record(run_dir, run=name, started=time.time(), step=start_step)
        writer = TensorBoardWriter(
            tb_dir if cfg.logging.tensorboard else None,
            run_dir / "metrics.jsonl",
            purge_step=start_step + 1 if ckpt is not None else None,
        )

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
    )
    if ckpt is not None:
        run.step, run.epoch, run.batches_done = (
            start_step,
            int(ckpt["epoch"]),
            int(ckpt.get("batches_done", 0)),
        )
        run.best_acc, run.best_step = ckpt.get("best_metric"), ckpt.get("best_step")
        run.bad_total = int(ckpt.get("skipped_steps", 0))
        restore_rng(ckpt["rng"], loaders.train_generator)
        run.epoch_rng = ckpt["rng"]
    try:
        return _loop(run, ckpt_path)
    finally:
        writer.close()


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
    )
    if run.loaders.val is None:
        say("no validation split (data.val_split is 0): best.pt is chosen by test accuracy")
    say(run.model.summary())
    say(
        f"device {run.device}, {torch.get_num_threads()} threads, {cfg.train.precision}, "
        f"{run.dist.world_size} process(es); {cfg.train.epochs} epochs x {run.steps_per_epoch} steps"
        + (f", stopping at step {cfg.train.max_steps}" if cfg.train.max_steps else "")
    )
    if resumed_from is not None:
        say(
            f"resumed from {resumed_from} at step {run.step} ("
            + (
                f"{run.batches_done} of {run.steps_per_epoch} steps into epoch {run.epoch + 1}"
                if run.batches_done
                else f"after epoch {run.epoch}"
            )
            + ")"
        )

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
                _save(run, mid_epoch=run.batches_done > 0)
                break
            last_eval = end_of_epoch(run, summary)
            if reason == "max_steps":
                stopped = reason
                break
            if stop.received is not None:  # a signal during evaluation or saving
                stopped = stop.name
                break
    if last_eval is not None:
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
        )
    exit_code = {"SIGINT": 130, "SIGTERM": 143}.get(stopped, 0)
    if exit_code:
        say(f"stopped by {stopped} at step {run.step}; saved {run.last_checkpoint}")
        say(f"resume with: capsnet train --resume {run.run_dir}")
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
        say(f"{what} at step {run.step}{best}; evaluate with: capsnet eval --ckpt {run.run_dir}")
    if run.bad_total:
        say(f"skipped {run.bad_total} non-finite step(s)")
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
