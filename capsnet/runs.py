"""A training run's identity and state: its name, its directory, what a checkpoint holds of it
and how a resumed run gets it back.

The training loop (:mod:`capsnet.trainer`) updates a :class:`Run`; this module
decides which run a command means (``--run-name``, ``--resume``), prepares its
directory, writes its checkpoints (rank 0, atomically, never a non-finite
model) and restores everything from one: model and optimiser (done by the
trainer), step, epoch, batches consumed, training images seen, best metric,
every rank's RNG states and the steps not yet logged, so that a resumed run
logs and trains exactly as one that never stopped.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import re
import shlex
import shutil
import socket
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from capsnet import __version__
from capsnet.averaging import WeightAverage
from capsnet.checkpoint import (
    BEST,
    CHECKPOINT_FORMAT,
    START_FILES,
    TEMP_FILE,
    CheckpointError,
    atomic_write_bytes,
    capture_rng,
    checkpoints_after,
    discard_after,
    has_checkpoint,
    load_checkpoint,
    pid_namespace,
    process_start,
    remove_temp_files,
    resolve_checkpoint,
    restore_rng,
    run_checkpoint,
    run_name_of,
    run_process,
    safe_child,
    save_checkpoint,
    step_checkpoints,
    step_file,
    validate_run_name,
    write_run_record,
)
from capsnet.config import Config, config_from_dict, dump_config, stored_config
from capsnet.data import Loaders, data_sizes, held_out_digest
from capsnet.distributed import (
    DistInfo,
    active,
    any_rank,
    broadcast,
    gather_to_main,
    rank_seed,
    sum_over_ranks,
)
from capsnet.model import CapsNet
from capsnet.tracking import NullWriter, TrackingError, counted, listed, truncate_metrics


class TrainingError(Exception):
    """Training cannot go on (run directory clash, non-finite steps, ...); the message says why."""


#: what Run.window sums between two logged steps: the loss and its parts (LOSS_PARTS) over the
#: steps that were not skipped, and the predictions and images of all of them
LOSS_PARTS = ("class", "recon", "distill")  # capsnet.loss.compute_loss's parts that add up to the loss
WINDOW_KEYS = ("loss", "correct", "n", "steps", *LOSS_PARTS)


def empty_window() -> dict[str, float]:
    return dict.fromkeys(WINDOW_KEYS, 0)


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
    window: dict[str, float] = field(default_factory=empty_window)
    window_start: float = field(default_factory=time.perf_counter)
    window_untimed: int = 0  # images of the window counted before a resume: not in its img/s
    #: training images this process drew (rank 0: plus the whole run's before the resume); summed over
    #: ranks, the run's images seen, which a step count cannot give once a resume changed the batch size
    images_seen: int = 0
    last_checkpoint: Path | None = None
    #: the newest checkpoint written within an epoch (logging.save_every, or the one resumed from),
    #: kept outside logging.keep's count and removed once a later checkpoint is written
    interim: Path | None = None
    ema: WeightAverage | None = None  # the moving average of the weights (train.ema)
    teacher: nn.Module | None = None  # loss.teacher's model, frozen, in eval mode
    teacher_table: Any = None  # capsnet.trainer.TeacherTable: its outputs on the training items, if fixed

    @property
    def eval_model(self) -> CapsNet:
        """The weights that are evaluated, saved as "model" and chosen as best: the average when there is one."""
        return self.ema.model if self.ema is not None else self.model

    @property
    def eval_split(self) -> str:
        return "val" if self.loaders.val is not None else "test"


# --------------------------------------------------------------------------- seeds and names


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def default_run_name(cfg: Config, prefix: str | None = None) -> str:
    """``<prefix (the config's file name) or the dataset>-<date>-<time>``, made a valid run name:
    characters a run name cannot hold become "-", leading ones are dropped."""
    stem = re.sub(r"[^A-Za-z0-9._+=@-]+", "-", prefix or cfg.data.name).replace("..", "-")
    stem = stem.lstrip("._+=@-")[:150] or "run"
    return f"{stem}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


def resume_checkpoint(resume: str, run_name: str | None, out_dir: str | Path) -> Path | None:
    """The checkpoint ``--resume`` names; None when there is nothing to resume yet.

    ``latest`` with a run name is that run's highest completed step, or None when
    the run has no checkpoint yet (a first launch, or a restart before the first
    save): one command then both starts and continues a run, which is what
    torchrun's ``--max-restarts`` and requeued cluster jobs need. Otherwise see
    :func:`~capsnet.checkpoint.resolve_checkpoint`.
    """
    if resume == "latest" and run_name is not None:
        run_dir = safe_child(out_dir, run_name)
        return run_checkpoint(run_dir) if has_checkpoint(run_dir) else None
    return resolve_checkpoint(resume, out_dir)


def config_for_resume(resume: str, overrides: list[str] | None = None, run_name: str | None = None) -> Config:
    """The config stored in the checkpoint that ``resume`` names, with ``overrides`` applied."""
    # Only logging.out_dir is needed to find the checkpoint: the other overrides are
    # checked against the checkpoint's config, not against the defaults.
    where = [o for o in overrides or [] if o.split("=", 1)[0].strip() == "logging.out_dir"]
    out_dir = config_from_dict({}, where).logging.out_dir
    path = resume_checkpoint(resume, run_name, out_dir)
    if path is None:
        raise CheckpointError(f"run {run_name} has no checkpoint in {out_dir} yet; give --config to start it")
    ckpt = load_checkpoint(path)
    return stored_config(ckpt["config"], path, overrides)


@dataclass
class RunChoice:
    """Which run a command trains, and from which checkpoint (the same on every rank)."""

    name: str
    checkpoint: dict[str, Any] | None
    checkpoint_path: Path | None
    resuming_here: bool  # continuing in the checkpoint's own run directory
    starting_named_run: bool  # --run-name R --resume latest and R has no checkpoint yet: start R
    note: str | None = None  # what the user should know about the choice


#: What resuming needs beyond the weights: the optimiser's state and the data order's random state.
RESUME_KEYS = ("optimizer", "rng")


def check_resumable(ckpt: dict[str, Any], where: Path) -> None:
    """Raises TrainingError when ``ckpt`` holds the weights but not the state a run continues from."""
    missing = [
        key for key in RESUME_KEYS if key not in ckpt and not (key == "rng" and "rng_per_rank" in ckpt)
    ]
    if missing:
        raise TrainingError(
            f"{where} holds the model's weights but not {' or '.join(missing)} state, so a run cannot "
            f"continue from it (eval and export can use it); to train on from these weights, start a "
            f"new run with -o train.init_from={where}"
        )


def refuse_an_idle_rewind(cfg: Config, ckpt: dict[str, Any], ckpt_path: Path) -> None:
    """Refuses to resume a run from one of its earlier checkpoints when the config leaves nothing to
    train from there: the resume would delete the later checkpoints and history for nothing."""
    step, epoch = int(ckpt["step"]), int(ckpt["epoch"])
    at_max = cfg.train.max_steps is not None and step >= cfg.train.max_steps
    if epoch < cfg.train.epochs and not at_max:
        return
    later = checkpoints_after(ckpt_path.parent, step)
    if not later:
        return
    key, value = ("train.max_steps", cfg.train.max_steps) if at_max else ("train.epochs", cfg.train.epochs)
    raise TrainingError(
        f"resuming {ckpt_path} (step {step}, {counted(epoch, 'epoch')} done) would train nothing, as "
        f"{key}={value} is reached there, yet it would delete the run's later checkpoints "
        f"({listed([p.name for p in later])}) and history; to train on from it, raise {key} "
        f"(-o {key}=N), or continue the run from its last checkpoint with --resume {ckpt_path.parent}"
    )


#: The run names this process holds, as open lock files: out_dir / ".NAME.lock", locked with
#: flock from the moment a start picks the name until its run ends (or the process does, which
#: releases them too). Two starts in the same second would otherwise pick the same default name,
#: or the same --run-name, and both pass the checks made before either has written run.json.
_held_names: dict[Path, tuple[Any, list[Path]]] = {}  # lock file -> (open file, folders made for it)


def _lock_path(out_dir: Path, name: str) -> Path:
    return out_dir / f".{name}.lock"


def claim_run_name(out_dir: str | Path, name: str) -> int | None:
    """Takes run ``name`` of ``out_dir`` for this process: None where it now holds it, else the
    process id of the start that holds it (0 where unknown). Where file locks are not available
    (no fcntl), the name is taken unchecked."""
    try:
        import fcntl
    except ImportError:  # Windows: the run.json checks alone
        return None
    out_dir = Path(out_dir)
    path = _lock_path(out_dir, name)
    if path in _held_names:
        return None
    made = []  # the folders made for the lock, removed with it where the run made nothing in them
    for folder in (out_dir, *out_dir.parents):
        if folder.exists():
            break
        made.append(folder)
    out_dir.mkdir(parents=True, exist_ok=True)
    while True:
        f = open(path, "a+")  # noqa: SIM115 (kept open: the lock lasts while the file is open)
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            text = f.read().strip()
            f.close()
            return int(text) if text.isdigit() else 0
        except OSError:  # a file system without locks: the run.json checks alone
            f.close()
            return None
        try:
            same = os.stat(path).st_ino == os.fstat(f.fileno()).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        f.close()  # the holder removed it as it ended: lock the file now in its place
    f.seek(0)
    f.truncate()
    f.write(str(os.getpid()))
    f.flush()
    _held_names[path] = (f, made)
    return None


def release_run_names() -> None:
    """Gives up every run name this process holds (its runs have ended) and removes their lock files,
    and the folders made for them where nothing else was put in them (a start refused early)."""
    for path, (f, made) in list(_held_names.items()):
        with contextlib.suppress(OSError):
            path.unlink()  # while still locked: a start waiting on it then locks a file of its own
        f.close()
        del _held_names[path]
        for folder in made:  # the deepest first
            with contextlib.suppress(OSError):
                folder.rmdir()


def choose_run(
    cfg: Config, run_name: str | None, resume: str | None, overwrite: bool, name_prefix: str | None
) -> RunChoice:
    """Resolves the run name and the checkpoint to resume; rank 0 decides, the other ranks follow."""
    out_dir = Path(cfg.logging.out_dir)
    ckpt, ckpt_path, note = None, None, None
    if run_name is not None:
        validate_run_name(run_name)
        if run_name in ("latest", "best"):  # --ckpt and --resume would read it as the newest run
            raise TrainingError(
                f"--run-name {run_name}: 'latest' and 'best' stand for the newest run in --ckpt and --resume, "
                "so a run of that name could not be named there; pick another name"
            )
    if resume is not None:
        ckpt_path = resume_checkpoint(resume, run_name, out_dir)
        ckpt = load_checkpoint(ckpt_path) if ckpt_path is not None else None
        if ckpt is not None:
            check_resumable(ckpt, ckpt_path)
    if run_name is not None:
        name = run_name
    elif ckpt is not None:
        # A checkpoint inside a run folder of out_dir continues in that folder, whatever the run was
        # called when it was saved (the folder may have been renamed or copied since). One from
        # elsewhere continues in out_dir: under its folder's name where that folder is a run's,
        # else under the name it carries.
        folder = Path(os.path.abspath(ckpt_path)).parent  # "--resume ." names its folder too
        in_out_dir = folder.parent.resolve() == out_dir.resolve()
        name = validate_run_name(folder.name if in_out_dir else run_name_of(ckpt_path, ckpt))
        if not in_out_dir:
            note = (
                f"note: {folder} is not in {out_dir} (logging.out_dir): the run continues in {out_dir / name}, "
                f"and {folder} is left as it is"
            )
    else:
        name = default_run_name(cfg, name_prefix)
        base, k = name, 2
        main = not active() or torch.distributed.get_rank() == 0
        # rank 0 takes the name, so that a start in the same second picks the next one
        while (out_dir / name).exists() or (main and claim_run_name(out_dir, name) is not None):
            name, k = f"{base}-{k}", k + 1
    main_choice = broadcast((name, ckpt_path))
    if main_choice != (name, ckpt_path):
        name, ckpt_path = main_choice
        ckpt = load_checkpoint(ckpt_path) if ckpt_path is not None else None
    resuming_here = ckpt is not None and safe_child(out_dir, name).resolve() == ckpt_path.parent.resolve()
    if resuming_here and overwrite:
        raise TrainingError("--overwrite with --resume into the same run would delete the run being resumed")
    if resuming_here and ckpt_path.name == BEST:  # --resume best, or the file named
        later = [path.name for step, path in step_checkpoints(ckpt_path.parent) if step > int(ckpt["step"])]
        if later:
            raise TrainingError(
                f"--resume {resume} would continue {ckpt_path.parent} from best.pt (step {int(ckpt['step'])}) and "
                f"delete its later checkpoints ({', '.join(later)}) and history; continue it with --resume "
                f"{'latest' if resume == 'best' else ckpt_path.parent}, or start a new run from best.pt's "
                f"weights with -o train.init_from={ckpt_path}"
            )
    if resuming_here:
        refuse_an_idle_rewind(cfg, ckpt, ckpt_path)
    return RunChoice(name, ckpt, ckpt_path, resuming_here, resume is not None and ckpt is None, note)


# --------------------------------------------------------------------------- the run directory


def only_start_files(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds nothing but what a run writes before its first checkpoint.

    A start killed before its first save leaves such a folder; it is started
    afresh instead of refused. Anything else in it (a checkpoint, a user's file)
    keeps the folder from being replaced without --overwrite.
    """
    return all(p.is_file() and (p.name in START_FILES or TEMP_FILE.match(p.name)) for p in run_dir.iterdir())


def refuse_a_live_run(run_dir: Path, resuming: bool) -> None:
    """Refuses to train into ``run_dir`` while the process that trains it still runs on this machine:
    two processes would write the same checkpoints, or a restart would empty the folder under it."""
    pid, running = run_process(run_dir)
    if not running:
        return
    stop = f"stop it first (Ctrl-C, or kill {pid}: it saves a checkpoint), then continue it with --resume {run_dir}"
    if resuming:
        raise TrainingError(f"{run_dir} is still being trained (process {pid}): {stop}")
    raise TrainingError(
        f"{run_dir} belongs to a run that is still being trained (process {pid}): let it run, {stop}, "
        "or pick another --run-name"
    )


def mark_run_ended(run_dir: Path) -> None:
    """Records in run.json that this process trains the run no more (it may live on, as a notebook's)."""
    try:
        write_run_record(run_dir, touch=False, ended=time.time())
    except (OSError, CheckpointError):  # a folder gone or unwritable: any error on its way says more
        pass


def check_run_dir_free(cfg: Config, choice: RunChoice, overwrite: bool) -> None:
    """Rank 0, before any slow set-up: refuses a run directory that may not be replaced.

    :func:`open_run_dir`, called later, relies on this check having passed.
    """
    run_dir = safe_child(cfg.logging.out_dir, choice.name)
    holder = claim_run_name(cfg.logging.out_dir, choice.name)
    if holder is not None:
        who = f"process {holder}" if holder else "another process"
        raise TrainingError(
            f"{run_dir} is being started or trained by {who}: let it run, stop it first, or pick another --run-name"
        )
    if run_dir.is_dir():
        refuse_a_live_run(run_dir, choice.resuming_here)
    free = overwrite or choice.resuming_here or choice.starting_named_run or not run_dir.is_dir()
    if free or only_start_files(run_dir):
        return
    if choice.checkpoint_path is not None:
        raise TrainingError(
            f"resuming {choice.checkpoint_path} would continue the run in {run_dir}, which already holds files; "
            f"give the continued run its own --run-name, resume {run_dir} itself with --resume {run_dir}, "
            "or replace it with --overwrite"
        )
    raise TrainingError(
        f"run directory {run_dir} already exists; continue it with --resume {run_dir}, "
        "replace it with --overwrite, or pick another --run-name"
    )


def open_run_dir(
    cfg: Config, choice: RunChoice, overwrite: bool, say: Callable[[str], None], total_steps: int
) -> Path:
    """Rank 0, after :func:`check_run_dir_free`: creates the run directory (emptied unless resuming
    into it) and writes config.yaml and run.json (with the run's planned ``total_steps``, which
    ``capsnet runs`` shows for a run that has saved no checkpoint yet)."""
    run_dir = safe_child(cfg.logging.out_dir, choice.name)
    tb_dir = safe_child(cfg.logging.tb_dir, choice.name)
    start_step = int(choice.checkpoint["step"]) if choice.checkpoint is not None else 0
    if run_dir.is_dir():  # again: another start may have opened it during this one's set-up
        refuse_a_live_run(run_dir, choice.resuming_here)
    leftover = run_dir.is_dir() and any(run_dir.iterdir()) and not choice.resuming_here
    if choice.starting_named_run and run_dir.exists():
        say(f"no checkpoint in {run_dir} yet: starting the run from step 0")
    elif leftover and not overwrite:
        say(
            f"note: {run_dir} holds no checkpoint (a start that stopped before its first save): starting it afresh"
        )
    if leftover:
        shutil.rmtree(run_dir)
        shutil.rmtree(tb_dir, ignore_errors=True)
    made_tb = cfg.logging.tensorboard and not tb_dir.exists()
    if cfg.logging.tensorboard:  # a TensorBoard folder that cannot be made stops the run before it has files
        tb_dir.mkdir(parents=True, exist_ok=True)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError:
        if made_tb:  # nor does a run folder that cannot be made leave an empty TensorBoard folder
            with contextlib.suppress(OSError):
                tb_dir.rmdir()
        raise
    atomic_write_bytes(dump_config(cfg).encode(), run_dir / "config.yaml")
    if choice.resuming_here:
        for dropped in discard_after(run_dir, start_step):
            say(f"note: removed {dropped.name}, past the resumed step {start_step}")
        for stale in remove_temp_files(run_dir):
            say(f"note: removed {stale.name}, left by a save that was interrupted")
    history = None  # a run continued in another folder: the history that led to its checkpoint
    elsewhere = choice.checkpoint_path is not None and not choice.resuming_here
    if elsewhere and not (run_dir / "metrics.jsonl").exists():
        history = choice.checkpoint_path.parent / "metrics.jsonl"
    truncate_metrics(run_dir / "metrics.jsonl", start_step, history)
    # "started" is kept from the first start
    write_run_record(
        run_dir,
        run=choice.name,
        step=start_step,
        total_steps=total_steps,
        pid=os.getpid(),
        pid_start=process_start(os.getpid()),
        pid_ns=pid_namespace(),
        host=socket.gethostname(),
        ended=None,
    )
    return run_dir


# --------------------------------------------------------------------------- saving and restoring


def first_non_finite(model: nn.Module) -> str | None:
    """The first parameter or buffer holding a NaN or an infinity, or None.

    "parameter NAME", or "batch-norm statistic NAME" for a buffer (a forward pass
    updates those even in a step that is then skipped).
    """
    tensors = [("parameter", *p) for p in model.named_parameters()]
    tensors += [("batch-norm statistic", *b) for b in model.named_buffers()]
    return next(
        (
            f"{kind} {n}"
            for kind, n, t in tensors
            if t.is_floating_point() and not bool(torch.isfinite(t).all())
        ),
        None,
    )


def make_checkpoint(
    run: Run, mid_epoch: bool, rng_per_rank: list[dict[str, Any]], window: list[float], images_seen: int
) -> dict[str, Any]:
    return {
        "format": CHECKPOINT_FORMAT,
        "version": __version__,
        "run": run.run_name,
        "time": time.time(),
        "model": run.eval_model.state_dict(),  # what eval, export and init_from use
        **({"train_model": run.model.state_dict()} if run.ema is not None else {}),  # what resuming trains on
        "optimizer": run.optimizer.state_dict(),
        "step": run.step,
        "epoch": run.epoch,
        "batches_done": run.batches_done if mid_epoch else 0,
        "total_steps": run.total_steps,  # the length the whole-run schedules were spread over
        "rng": rng_per_rank[0],
        "rng_per_rank": rng_per_rank,  # every rank's own state, restored when the world size is the same
        "world_size": run.dist.world_size,
        "best_metric": run.best_acc,
        "best_step": run.best_step,
        "best_split": run.eval_split,
        "skipped_steps": run.bad_total,
        "bad_in_row": run.bad_in_row,  # non-finite steps just before this one, towards train.max_bad_steps
        "log_window": dict(zip(WINDOW_KEYS, window)),  # steps since the last log, summed over ranks
        "images_seen": images_seen,  # training images drawn up to this step, summed over ranks
        "config": run.cfg.to_dict(),
        "arch": dict(run.model.hparams),
        "data_info": asdict(run.loaders.info),
        "data_sizes": data_sizes(run.loaders),  # images per split, to tell a resume on other data
        "val_digest": held_out_digest(run.loaders),  # and which images validation holds out
    }


def save_run(run: Run, mid_epoch: bool, is_best: bool = False, interim: bool = False) -> Path | None:
    """Writes a checkpoint on rank 0; every rank calls it and learns whether it worked.

    A model with a non-finite parameter is never saved (the run stops); a
    failed write (disk full, no permission) stops every rank with rank 0's
    message, the previous checkpoints being intact.
    """
    bad = first_non_finite(run.model)
    (any_bad,) = any_rank([bad is not None], run.device)  # every process stops, not only the one that saw it
    if any_bad:
        what = bad if bad is not None else "a parameter or buffer of another process's model"
        raise TrainingError(
            f"stopped at step {run.step}: {what} became non-finite, so it was not saved; "
            f"the last good checkpoint is {run.last_checkpoint or 'none'}; "
            "try a lower optim.lr or set optim.grad_clip"
        )
    rng = run.epoch_rng if mid_epoch else capture_rng(run.loaders.train_generator)
    rng_per_rank = gather_to_main(rng)
    *window, images_seen = sum_over_ranks(
        [*(float(run.window[k]) for k in WINDOW_KEYS), float(run.images_seen)], run.device
    )
    error: CheckpointError | None = None
    if run.dist.is_main:
        try:
            run.writer.flush()
            ckpt = make_checkpoint(run, mid_epoch, rng_per_rank, window, int(images_seen))
            # an interim checkpoint (``interim``: logging.save_every) pushes no epoch's out of logging.keep
            extra = int(interim) + int(run.interim is not None and run.interim.exists())
            run.last_checkpoint = save_checkpoint(run.run_dir, ckpt, run.cfg.logging.keep + extra, is_best)
            if run.interim is not None and run.interim != run.last_checkpoint:
                run.interim.unlink(missing_ok=True)  # the checkpoint just written supersedes it
            run.interim = run.last_checkpoint if interim else None
        except CheckpointError as e:
            error = e
        except TrackingError as e:  # the metrics written before the checkpoint
            error = CheckpointError(str(e))
    (failed,) = any_rank([error is not None], run.device)  # also the barrier after rank 0's save
    if failed:
        if error is None:
            raise TrainingError(f"stopped at step {run.step}: rank 0 could not save a checkpoint")
        raise CheckpointError(
            f"{error}\ntraining stopped at step {run.step}; the last complete checkpoint is "
            f"{error.written or run.last_checkpoint or 'none'}; free some space and resume with: "
            f"capsnet train --resume {shlex.quote(str(run.run_dir))}"
        )
    return run.last_checkpoint


def saved_images_seen(ckpt: dict[str, Any]) -> int:
    """The training images the run of ``ckpt`` had seen at its step, over all its processes.

    A checkpoint written before the count was kept gives the step times the global batch
    of its own config: exact unless the batch changed earlier in the run, or a short last
    batch of an epoch made a step hold fewer images.
    """
    if "images_seen" in ckpt:
        return int(ckpt["images_seen"])
    train = ckpt.get("config", {}).get("train", {})
    per_step = int(train.get("batch_size", 32)) * int(train.get("accumulate", 1))
    return int(ckpt["step"]) * per_step * max(1, int(ckpt.get("world_size", 1)))


def restore_run(run: Run, ckpt: dict[str, Any], where: Path) -> None:
    """Puts the loop's state of ``ckpt`` into ``run`` (the model and optimiser are loaded already)."""
    dist_info = run.dist
    run.step, run.epoch = int(ckpt["step"]), int(ckpt["epoch"])
    run.batches_done = int(ckpt.get("batches_done", 0))
    run.best_acc, run.best_step = ckpt.get("best_metric"), ckpt.get("best_step")
    run.bad_total = int(ckpt.get("skipped_steps", 0))
    run.bad_in_row = int(ckpt.get("bad_in_row", 0))
    if where.parent.resolve() == run.run_dir.resolve():  # what a failure before the next save names
        run.last_checkpoint = where
    resumed_file = run.run_dir / step_file(run.step)
    if run.batches_done and resumed_file.is_file():  # written within an epoch: the next save supersedes it
        run.interim = resumed_file
    saved = ckpt.get("log_window")
    if dist_info.is_main and isinstance(saved, dict):
        run.window.update({k: saved.get(k, 0) for k in WINDOW_KEYS})
        run.window_untimed = int(run.window["n"])
        for part in LOSS_PARTS:  # a checkpoint from before the parts were kept: this window's are unknown
            if part not in saved and saved.get("steps"):
                run.window[part] = math.nan
    if dist_info.is_main:  # the other ranks count only their own images from here
        run.images_seen = saved_images_seen(ckpt)
    generator = run.loaders.train_generator
    per_rank = ckpt.get("rng_per_rank")
    if isinstance(per_rank, list) and len(per_rank) == dist_info.world_size:
        run.epoch_rng = per_rank[dist_info.rank]
        restore_rng(run.epoch_rng, generator)
        return
    # another number of processes than the saved run: rank 0's state, fresh streams elsewhere
    run.echo(
        f"note: {where} was written by {counted(ckpt.get('world_size', 1), 'process', 'processes')}, "
        f"this run has {dist_info.world_size}: it continues, but not bit for bit as the first run would have"
    )
    restore_rng(ckpt["rng"], generator)
    if dist_info.rank > 0:  # its own streams, the loader workers' seeds included
        seed = rank_seed(run.cfg.train.seed + run.step, dist_info.rank)
        seed_everything(seed)
        generator.manual_seed(seed)
    run.epoch_rng = capture_rng(generator)
