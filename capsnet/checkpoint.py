"""Checkpoints: atomic saves, "latest"/"best" resolution and strict, safe loading.

A run directory ``<out_dir>/<run>/`` holds::

    config.yaml        the resolved config, written before training starts
    metrics.jsonl      one JSON object per logged step
    step-000123.pt     the newest ``logging.keep`` checkpoints, named by global step
    last.pt            the newest checkpoint
    best.pt            the checkpoint with the best evaluation accuracy so far
    run.json           run bookkeeping: when it started and was last updated, last step

Every file is written to a temporary file in the same directory, flushed,
fsync'd and moved into place with ``os.replace``, so a crash or a full disk
never leaves a half-written checkpoint under a real name. Checkpoints are read
with ``torch.load(weights_only=True)``: a file that would run code is refused.

"latest" means the most recently started or updated run (by the time recorded
in its ``run.json``) and, within it, the highest completed step, read from the
step numbers and never from file times.
"""

from __future__ import annotations

import dataclasses
import errno
import io
import json
import math
import os
import pickle
import random
import re
import socket
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from capsnet.tracking import last_readable_metrics_entry, listed

#: 2: routing.beta_a_logit divides beta_a by the last routing iteration's lambda
#: (format 1 divided it by routing.final_lambda, which is not that lambda).
CHECKPOINT_FORMAT = 2
RUN_FILE = "run.json"
#: What a run folder holds from its start, before its first checkpoint.
START_FILES = frozenset({"config.yaml", RUN_FILE, "metrics.jsonl"})
LAST = "last.pt"
BEST = "best.pt"
_STEP_FILE = re.compile(r"^step-(\d+)\.pt$")
#: capsnet average's file in a run folder: the mean of the weights from its first to its last step
AVERAGE_FILE = re.compile(r"^average-(\d+)-(\d+)\.pt$")
TEMP_FILE = re.compile(r"^\..+\.tmp$")  # what atomic_write_bytes writes before the rename
_RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+=@-]*$")
#: Keys of the architecture signature that do not change the parameters or the function computed.
_RUNTIME_ONLY = {"recompute_votes"}


class CheckpointError(Exception):
    """A checkpoint cannot be written, found or loaded; the message says which file and why.

    ``written``: a complete checkpoint that the failed save did write (its step file
    and last.pt, where only best.pt failed), else None.
    """

    def __init__(self, message: str, written: Path | None = None):
        super().__init__(message)
        self.written = written


# --------------------------------------------------------------------------- names and paths


def validate_run_name(name: str) -> str:
    """Returns ``name`` when it is a safe single directory name, else raises CheckpointError."""
    if not isinstance(name, str) or not _RUN_NAME.match(name) or ".." in name or len(name) > 200:
        raise CheckpointError(
            f"invalid run name {name!r}: use ASCII letters, digits and . _ - + = @ "
            "(no path separators, no '..', starting with a letter or digit)"
        )
    return name


def safe_child(base: str | Path, name: str) -> Path:
    """``base / name`` for a validated ``name``, guaranteed not to leave ``base``."""
    validate_run_name(name)
    base = Path(base)
    child = base / name
    if child.resolve().parent != base.resolve():
        raise CheckpointError(f"path {child} escapes {base}")
    return child


def step_file(step: int) -> str:
    return f"step-{step:06d}.pt"


def average_file(first: int, last: int) -> str:
    """capsnet average's file name for the mean of the checkpoints from step ``first`` to ``last``
    (AVERAGE_FILE matches it)."""
    return f"average-{first:06d}-{last:06d}.pt"


def is_run_checkpoint_name(name: str) -> bool:
    """Whether ``name`` is one a run gives its own checkpoints: last.pt, best.pt, step-N.pt."""
    return name in (LAST, BEST) or _STEP_FILE.match(name) is not None


def step_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """The step-numbered checkpoints of a run, sorted by step."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = []
    for path in run_dir.iterdir():
        match = _STEP_FILE.match(path.name)
        if match and path.is_file():
            found.append((int(match.group(1)), path))
    return sorted(found)


# --------------------------------------------------------------------------- atomic writes


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return  # platforms without directory handles
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def current_umask() -> int:
    """The process's file-mode mask, read without changing it for longer than the call."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_bytes(data: bytes, path: str | Path) -> None:
    """Writes ``data`` to ``path`` atomically; on any error the temporary file is removed.

    Raises CheckpointError naming ``path`` (also when the disk is full); a file
    already at ``path`` is left as it was.
    """
    path = Path(path)
    tmp_name = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        if hasattr(os, "fchmod"):
            os.fchmod(fd, 0o666 & ~current_umask())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_name, path)
        tmp_name = None
        _fsync_dir(path.parent)
    except OSError as e:
        reason = "no space left on device" if e.errno == errno.ENOSPC else (e.strerror or str(e))
        raise CheckpointError(f"could not write {path}: {reason}") from e
    finally:
        if tmp_name is not None:
            try:
                os.unlink(tmp_name)
            except OSError:
                pass


def remove_temp_files(directory: str | Path) -> list[Path]:
    """Deletes the temporary files that writes killed before their rename left in ``directory``.

    Only call it while nothing else writes there (a resumed run's own directory).
    """
    directory = Path(directory)
    if not directory.is_dir():
        return []
    stale = [p for p in directory.iterdir() if TEMP_FILE.match(p.name) and p.is_file()]
    for path in stale:
        path.unlink(missing_ok=True)
    return sorted(stale)


def serialize(obj: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def atomic_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` to ``path`` atomically (see :func:`atomic_write_bytes`)."""
    atomic_write_bytes(serialize(obj), path)


# --------------------------------------------------------------------------- random number generators


def capture_rng(loader_generator: torch.Generator | None = None) -> dict[str, Any]:
    """Every RNG state a training run draws from, in a form ``weights_only`` loading accepts."""
    np_state = np.random.get_state(legacy=False)
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {
            "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    if loader_generator is not None:
        state["loader"] = loader_generator.get_state()
    return state


def restore_rng(state: dict[str, Any], loader_generator: torch.Generator | None = None) -> None:
    random.setstate(state["python"])
    npy = state["numpy"]
    np.random.set_state(
        ("MT19937", npy["key"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"], npy["gauss"])
    )
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    if loader_generator is not None and "loader" in state:
        loader_generator.set_state(state["loader"])


# --------------------------------------------------------------------------- saving


def write_run_record(run_dir: str | Path, touch: bool = True, **fields: Any) -> None:
    """Updates ``run.json`` (start time, last update time, last step) atomically; ``touch`` False
    keeps the last update time (the time of the last start or save, by which runs are ordered)."""
    path = Path(run_dir) / RUN_FILE
    record = read_run_record(run_dir) or {}
    record.update(fields)
    if touch or "updated" not in record:
        record["updated"] = time.time()
    record.setdefault("started", record["updated"])
    atomic_write_bytes((json.dumps(record, indent=1) + "\n").encode(), path)


def read_run_record(run_dir: str | Path) -> dict[str, Any] | None:
    try:
        record = json.loads((Path(run_dir) / RUN_FILE).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def save_checkpoint(run_dir: str | Path, ckpt: dict[str, Any], keep: int, is_best: bool = False) -> Path:
    """Writes ``step-<step>.pt`` and ``last.pt`` (and ``best.pt``), then prunes old step files.

    Returns the step-numbered path. The payload is serialised once and written
    atomically to each name.
    """
    run_dir = Path(run_dir)
    step = int(ckpt["step"])
    data = serialize(ckpt)
    path = run_dir / step_file(step)
    atomic_write_bytes(data, path)
    atomic_write_bytes(data, run_dir / LAST)
    failed = None
    if is_best:
        try:
            atomic_write_bytes(data, run_dir / BEST)
        except CheckpointError as e:
            failed = CheckpointError(f"{e} ({path.name} and {LAST} were written)", written=path)
    write_run_record(run_dir, run=run_dir.name, step=step, epoch=int(ckpt["epoch"]))
    for _, old in step_checkpoints(run_dir)[:-keep]:
        old.unlink(missing_ok=True)
    if failed is not None:
        raise failed
    return path


def checkpoints_after(run_dir: str | Path, step: int) -> list[Path]:
    """The checkpoints of ``run_dir`` written past ``step``, which a run resumed from ``step`` replaces.

    That includes best.pt and last.pt when they were written later than ``step``: the
    resumed run's best accuracy is the one recorded at ``step``, so a best.pt from the
    abandoned steps would otherwise stand for a model the run no longer leads to. So too
    for an average of checkpoints (capsnet average) that reaches past ``step``.
    """
    later = [path for s, path in step_checkpoints(run_dir) if s > step]
    for path in Path(run_dir).glob("average-*.pt"):
        match = AVERAGE_FILE.match(path.name)
        if match and int(match.group(2)) > step and path.is_file():
            later.append(path)
    for name in (BEST, LAST):
        path = Path(run_dir) / name
        if not path.is_file():
            continue
        try:
            if int(load_checkpoint(path).get("step", -1)) > step:
                later.append(path)
        except CheckpointError:
            continue  # unreadable: left as it is
    return later


def discard_after(run_dir: str | Path, step: int) -> list[Path]:
    """Removes the checkpoints past ``step`` (:func:`checkpoints_after`) and returns them."""
    removed = checkpoints_after(run_dir, step)
    for path in removed:
        path.unlink(missing_ok=True)
    return removed


# --------------------------------------------------------------------------- finding checkpoints


def has_checkpoint(run_dir: Path) -> bool:
    return bool(step_checkpoints(run_dir)) or (run_dir / LAST).is_file()


def is_run_folder(path: Path) -> bool:
    """Whether ``path`` is one run's folder: it holds a checkpoint, or training has opened it."""
    return path.is_dir() and (has_checkpoint(path) or (path / RUN_FILE).is_file())


def run_process(run_dir: Path, record: dict[str, Any] | None = None) -> tuple[int | None, bool | None]:
    """The id of the training process that last opened ``run_dir`` and whether it still trains it:
    run.json records the id with the process's start time, PID namespace and host, and when its
    training ended. None where that cannot be told: no id recorded, a run of another machine or
    container, a system without Linux's /proc. This process itself counts as not training it:
    it is the one asking. ``record``: its run.json where the caller has read it already."""
    record = (read_run_record(run_dir) or {}) if record is None else record
    pid = record.get("pid")
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return None, None
    if record.get("ended") is not None:  # it returned or failed; its process may live on (a notebook)
        return pid, False
    if record.get("host") != socket.gethostname() or record.get("pid_ns") != pid_namespace():
        return pid, None
    if pid == os.getpid():
        return pid, False
    found = _proc_stat(pid)
    if found is None:
        return pid, (False if _proc_stat(os.getpid()) is not None else None)  # gone, or no /proc
    state, started = found
    # a zombie has ended; a process of that id that started at another time took the id over
    return pid, state not in ("Z", "X") and started == record.get("pid_start")


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """The state and start time (clock ticks since boot) of process ``pid`` from Linux's /proc,
    or None where there is no such process or no /proc."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        fields = stat[stat.rindex(")") + 2 :].split()  # the name, in parentheses, may hold anything
        return fields[0], int(fields[19])  # fields 3 and 22
    except (OSError, ValueError, IndexError):
        return None


def process_start(pid: int) -> int | None:
    """When process ``pid`` started (clock ticks since boot), or None where that cannot be read:
    with the id it tells one process from a later one given the same id."""
    found = _proc_stat(pid)
    return found[1] if found is not None else None


def pid_namespace() -> int | None:
    """The PID namespace of this process (Linux), so that ids are compared only within one."""
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return None


def _finite(value: Any) -> float | None:
    """``value`` as a finite float, or None where it is no such number (text, NaN, missing)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def _run_time(run_dir: Path) -> float:
    record = read_run_record(run_dir)
    updated = _finite(record.get("updated")) if record else None
    if updated is not None:
        return updated
    try:  # no run.json: the wall time recorded inside last.pt
        saved = _finite(load_checkpoint(run_dir / LAST).get("time"))
    except CheckpointError:
        return 0.0
    return saved if saved is not None else 0.0


def runs_in(folder: Path) -> list[Path]:
    """The run folders directly under ``folder`` that hold a checkpoint."""
    return _run_folders(folder)[0]


def _run_folders(folder: Path) -> tuple[list[Path], list[Path]]:
    """One look at each folder directly under ``folder``: the run folders that hold a checkpoint,
    then those that training has opened (they hold run.json) with no checkpoint yet. A folder that
    cannot be read (no permission, removed while looked at) is neither."""
    saved: list[Path] = []
    started: list[Path] = []
    if not folder.is_dir():
        return saved, started
    for path in folder.iterdir():
        try:
            if not path.is_dir():
                continue
            if has_checkpoint(path):
                saved.append(path)
            elif (path / RUN_FILE).is_file():
                started.append(path)
        except OSError:
            continue
    return saved, started


#: when a run's first checkpoint is written, for the messages about runs that have none yet
FIRST_SAVE = "the first save comes at the end of the first epoch, or after logging.save_every steps"
#: what a run folder with no checkpoint may be: told so, a live run is left alone, a dead one restarted
NOT_SAVED_YET = (
    f"still in its first epoch ({FIRST_SAVE}), or stopped before its first save "
    "(then the command that started it starts it again)"
)


def _counter(value: Any) -> int | None:
    """``value`` where it is an int (not a bool), else None."""
    return int(value) if isinstance(value, int) and not isinstance(value, bool) else None


def started_runs(folder: Path) -> list[Path]:
    """The run folders directly under ``folder`` that training has opened (they hold run.json) but
    that hold no checkpoint yet: a run in its first epoch, or one stopped before its first save."""
    return _run_folders(folder)[1]


def no_runs(out_dir: str | Path, listing: bool = False) -> CheckpointError:
    """The error for a folder of runs (``--out-dir``, ``logging.out_dir``) that holds none; ``listing``:
    for ``capsnet runs``, which takes no checkpoint. A run folder given in its place, and a folder
    that does not exist, are said as such."""
    out_dir = Path(out_dir)
    above = out_dir.parent
    if is_run_folder(out_dir):
        instead = (
            f"list the runs of the folder above it with --out-dir {above}"
            if listing
            else f"name the run itself (--ckpt {out_dir}, or train --resume {out_dir}), or give the folder "
            f"above it (--out-dir {above}; for train --resume, -o logging.out_dir={above})"
        )
        return CheckpointError(f"{out_dir} is a run folder, not the folder that holds the runs: {instead}")
    missing = "" if out_dir.is_dir() else f" ({'not a folder' if out_dir.exists() else 'no such folder'})"
    where = "--out-dir" if listing else "--out-dir; for train --resume, -o logging.out_dir=..."
    started = sorted(p.name for p in started_runs(out_dir))
    if started:  # a run in its first epoch, or one that stopped before its first save
        one = len(started) == 1
        waiting = f"{listed(started)} {'has' if one else 'have'} started but saved none yet"
        return CheckpointError(
            f"no runs with checkpoints in {out_dir}: {waiting}; {'each' if not one else 'it'} is {NOT_SAVED_YET}"
        )
    return CheckpointError(
        f"no runs with checkpoints in {out_dir}{missing}; train one first (capsnet train --config ...), "
        f"or name the folder that holds them ({where})"
    )


def latest_run(out_dir: str | Path) -> Path:
    """The run directory under ``out_dir`` that was started or updated most recently."""
    out_dir = Path(out_dir)
    runs = runs_in(out_dir)
    if not runs:
        raise no_runs(out_dir)
    return max(runs, key=lambda p: (_run_time(p), p.name))


def run_checkpoint(run_dir: str | Path) -> Path:
    """The checkpoint of the highest completed step in ``run_dir``."""
    run_dir = Path(run_dir)
    steps = step_checkpoints(run_dir)
    if steps:
        return steps[-1][1]
    if (run_dir / LAST).is_file():
        return run_dir / LAST
    runs = sorted(p.name for p in runs_in(run_dir))
    if runs:
        shown = ", ".join(runs[:5]) + (f" and {len(runs) - 5} more" if len(runs) > 5 else "")
        raise CheckpointError(
            f"{run_dir} is a folder of runs ({shown}), not a run: name one of them "
            f"({run_dir / runs[0]}), or take the newest with --ckpt latest --out-dir {run_dir}"
        )
    if not any((run_dir / name).is_file() for name in START_FILES):
        raise CheckpointError(
            f"no checkpoints in {run_dir}, and it is not a run folder (none of {', '.join(sorted(START_FILES))}); "
            "give a run folder, a checkpoint file, latest or best"
        )
    pid, running = run_process(run_dir)
    if running:
        raise CheckpointError(
            f"no checkpoints in {run_dir} yet: the run is still in its first epoch, trained by process {pid} "
            f"({FIRST_SAVE})"
        )
    if running is False:
        raise CheckpointError(
            f"no checkpoints in {run_dir}: the run stopped before its first save; the command that started "
            "it starts it again"
        )
    raise CheckpointError(f"no checkpoints in {run_dir} yet: the run is {NOT_SAVED_YET}")


def resolve_checkpoint(spec: str, out_dir: str | Path) -> Path:
    """``latest`` | ``best`` | a run directory | a checkpoint file | a run name under ``out_dir``."""
    out_dir = Path(out_dir).expanduser()
    if spec == "latest":
        return run_checkpoint(latest_run(out_dir))
    if spec == "best":
        run = latest_run(out_dir)
        if not (run / BEST).is_file():
            raise CheckpointError(f"run {run} has no {BEST} yet (it is written after the first evaluation)")
        return run / BEST
    path = Path(spec).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        return run_checkpoint(path)
    # a run name, or a path inside a run, under out_dir: "small-1", "small-1/", "small-1/best.pt"
    parts = path.parts
    if parts and not path.is_absolute() and _RUN_NAME.match(parts[0]) and ".." not in parts:
        inside = out_dir / path
        if inside.is_file():
            return inside
        if inside.is_dir():
            return run_checkpoint(inside)
    runs = sorted(p.name for p in runs_in(out_dir))
    shown = listed(runs, 8)
    raise CheckpointError(
        f"checkpoint not found: {spec} (expected latest, best, a run directory, a .pt file, or the name of "
        f"a run in {out_dir}" + (f": {shown})" if runs else ", which holds no runs)")
    )


# --------------------------------------------------------------------------- loading

REQUIRED_KEYS = ("format", "model", "step", "epoch", "config", "arch")


#: Suffixes of the files ``capsnet export`` writes, which are models for other runtimes, not checkpoints.
EXPORT_SUFFIXES = (".onnx", ".pt2")
#: Suffixes of the text files beside a run's checkpoints (config.yaml, metrics.jsonl, run.json) and
#: of the configs that ``capsnet train --config`` takes: never checkpoints, so not "corrupt".
TEXT_SUFFIXES = (".yaml", ".yml", ".json", ".jsonl")


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Loads a checkpoint onto the CPU with ``weights_only=True``; raises CheckpointError."""
    path = Path(path)
    try:
        return _load_checkpoint(path)
    except CheckpointError:
        if path.suffix.lower() in EXPORT_SUFFIXES and path.is_file():
            raise CheckpointError(
                f"{path} is an exported model, not a checkpoint: commands take a run's .pt checkpoints "
                f"(a run folder, latest or best); run the export itself with "
                f"{'onnxruntime' if path.suffix.lower() == '.onnx' else 'torch.export.load'}"
            ) from None
        if path.suffix.lower() in TEXT_SUFFIXES and path.is_file():
            folder = path.parent
            if path.name in START_FILES:  # config.yaml, run.json or metrics.jsonl of a run folder
                where = f"give the run folder itself ({folder}) or one of its .pt files"
            else:
                where = "give a trained run (a run folder, a .pt checkpoint, latest or best)"
                if path.suffix.lower() in (".yaml", ".yml"):
                    where += f"; to train one from this config: capsnet train --config {path}"
            raise CheckpointError(f"{path} is a text file, not a checkpoint: {where}") from None
        raise


def _neither_zip_nor_pickle(path: Path) -> bool:
    """Whether the first bytes of ``path`` (not empty) rule out both forms torch saves in: a zip
    archive (``PK``) and, from before that, a pickle (``0x80``, the protocol byte)."""
    try:
        with open(path, "rb") as f:
            head = f.read(2)
    except OSError:
        return False
    return bool(head) and not (head.startswith(b"PK") or head[0] == 0x80)


def _intact_zip(path: Path) -> bool:
    """Whether ``path`` is a zip archive (as torch saves) whose every member reads back whole."""
    try:
        with zipfile.ZipFile(path) as archive:
            return archive.testzip() is None
    except (OSError, zipfile.BadZipFile, EOFError, RuntimeError, ValueError):
        return False


def _saved_step(path: Path) -> int | None:
    """The step recorded in the checkpoint ``path``, or None where it cannot be read."""
    try:
        step = torch.load(path, map_location="cpu", weights_only=True, mmap=True).get("step")
        return int(step) if isinstance(step, int) else None
    except (OSError, RuntimeError, EOFError, ValueError, AttributeError, pickle.UnpicklingError):
        return None


def _unreadable(path: Path, message: str) -> CheckpointError:
    """``message`` about a corrupt ``path``, naming the newest intact checkpoint beside it, if any:
    a step file, or last.pt where it is newer than any of those."""
    others = [(s, f) for s, f in reversed(step_checkpoints(path.parent)) if f.resolve() != path.resolve()]
    step, older = next(((s, f) for s, f in others if _intact_zip(f)), (-1, None))
    last = path.parent / LAST
    if last.is_file() and last.resolve() != path.resolve() and _intact_zip(last):
        last_step = _saved_step(last)
        if last_step is not None and last_step > step:
            older = last
    advice = f"; the newest intact checkpoint beside it is {older}: give that path instead" if older else ""
    return CheckpointError(f"{message}{advice}")


def _load_checkpoint(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.is_dir():
        raise CheckpointError(f"{path} is a directory; give a checkpoint file or use latest/best")
    if _neither_zip_nor_pickle(path):  # torch's own words about such a file say nothing useful
        raise _unreadable(
            path,
            f"{path} is not a readable checkpoint: it is neither a zip archive nor a pickle, the two "
            "forms torch saves in (a file of another kind, or a corrupt one)",
        )
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "GLOBAL" in str(e):  # the weights-only unpickler met a class or function to import
            raise CheckpointError(
                f"refusing to load {path}: it holds Python objects that could run code "
                "(only tensors and plain data are accepted)"
            ) from None
        raise _unreadable(path, f"{path} is not a readable checkpoint (corrupt or truncated)") from None
    except OSError as e:
        if e.errno in (errno.EACCES, errno.EPERM, errno.ENOENT, errno.EIO):
            raise CheckpointError(f"cannot read {path}: {e.strerror or e}") from None
        # a seek past the end of a cut-off archive: EINVAL
        raise _unreadable(path, f"{path} is not a readable checkpoint (corrupt or truncated)") from None
    except (
        RuntimeError,
        EOFError,
        ValueError,
        KeyError,
        IndexError,
        TypeError,
        AttributeError,
        zipfile.BadZipFile,
    ) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        first = first.split(". ")[0].rstrip(".")  # the reason, without the advice torch appends to it
        if path.stat().st_size == 0:
            first = "the file is empty"
        raise _unreadable(
            path, f"{path} is not a readable checkpoint (corrupt or truncated): {first}"
        ) from None
    if not isinstance(ckpt, dict) or any(k not in ckpt for k in REQUIRED_KEYS):
        missing = [k for k in REQUIRED_KEYS if not isinstance(ckpt, dict) or k not in ckpt]
        raise CheckpointError(f"{path} is not a capsnet checkpoint (missing: {', '.join(missing)})")
    if not isinstance(ckpt["format"], int) or isinstance(ckpt["format"], bool):
        raise CheckpointError(f"{path} is not a capsnet checkpoint (format {ckpt['format']!r})")
    if ckpt["format"] > CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"{path} was written by a newer capsnet (format {ckpt['format']}); upgrade capsnet to load it"
        )
    arch = ckpt["arch"] if isinstance(ckpt["arch"], dict) else {}
    if ckpt["format"] < 2 and arch.get("beta_a_logit"):
        raise CheckpointError(
            f"{path} was trained with routing.beta_a_logit by an older capsnet (format {ckpt['format']}), "
            "which divided beta_a by routing.final_lambda; this one divides it by the last routing "
            "iteration's lambda, so those weights would route differently: retrain it"
        )
    return ckpt


# --------------------------------------------------------------------------- architecture


def _config_key(name: str) -> str:
    if name in ("in_channels",):
        return "data.channels"
    if name in ("num_classes", "image_size"):
        return f"data.{name}"
    if name in ("final_lambda", "lambda_decay", "min_var", "cost_norm", "beta_a_logit", "layer_cost_scales"):
        return f"routing.{name}"
    return f"model.{name}"


def check_architecture(saved: dict[str, Any], current: dict[str, Any], where: str | Path) -> None:
    """Raises CheckpointError listing every architecture setting that differs."""
    ignored = set(_RUNTIME_ONLY)
    if saved.get("decoder") is False and current.get("decoder") is False:
        ignored.add("decoder_hidden")  # the widths of a decoder neither model has
    diffs = [
        f"{_config_key(k)}: {saved.get(k)!r} in the checkpoint, {current.get(k)!r} now"
        for k in sorted(set(saved) | set(current))
        if k not in ignored and saved.get(k) != current.get(k)
    ]
    if diffs:
        raise CheckpointError(f"the model in {where} does not match the config: " + "; ".join(diffs))


#: The settings that decide which training images are held out for validation, and the
#: datasets they matter for (None: every dataset).
SPLIT_KEYS = {
    "data.name": None,
    "data.val_split": None,
    "train.seed": None,
    "data.split": ("smallnorb",),
    "data.stereo": ("smallnorb",),
    "data.train_size": ("synthetic",),
}


_UNSET = object()


def _setting(config: dict[str, Any], key: str) -> Any:
    section, name = key.split(".")
    return (config.get(section) or {}).get(name, _UNSET)


def moved_split_settings(saved_config: dict[str, Any], current: dict[str, Any]) -> dict[str, str]:
    """The settings drawing the validation split that differ between ``saved_config`` and ``current``.

    Maps each such key to a line saying how it moved; empty where neither holds images
    out (data.val_split 0 on both sides).
    """
    held_out = [_setting(c, "data.val_split") for c in (saved_config, current)]
    if not any(isinstance(v, (int, float)) and v > 0 for v in held_out):
        return {}
    moved = {}
    dataset = _setting(current, "data.name")
    for key, datasets in SPLIT_KEYS.items():
        saved = _setting(saved_config, key)
        if datasets is not None and dataset not in datasets:
            continue
        if saved is not _UNSET and saved != _setting(current, key):
            moved[key] = f"{key}: {saved!r} in the checkpoint, {_setting(current, key)!r} now"
    return moved


def check_resume_settings(saved_config: dict[str, Any], current: dict[str, Any], where: str | Path) -> None:
    """Raises CheckpointError where resuming with ``current`` would not continue the run of ``saved_config``.

    The optimiser's state is kept only for an optimiser of the same state, and with a validation
    split the settings that draw it must stay: another split would hold out images the
    run has trained on, and its best model would be chosen on them.
    """
    problems = []
    before, now = _setting(saved_config, "optim.name"), _setting(current, "optim.name")
    state = {"adamw": "adam"}  # Adam and AdamW keep the same state; they differ in how they decay
    if before is not _UNSET and state.get(before, before) != state.get(now, now):
        problems.append(
            f"optim.name: {before!r} in the checkpoint, {now!r} now (its optimiser state is {before}'s)"
        )
    moved = moved_split_settings(saved_config, current)
    split_moved = bool(moved)
    problems += moved.values()
    if not problems:
        return
    why = (
        " (these settings draw the validation split: another one would hold out images the run trained on)"
        if split_moved
        else ""
    )
    raise CheckpointError(
        f"cannot resume {where} with other settings: {'; '.join(problems)}{why}; resume with the "
        f"checkpoint's values (drop the -o overrides, or the --config, that change them), or start a new "
        f"run from its weights with -o train.init_from={where}"
    )


def load_model_state(model: torch.nn.Module, state: dict[str, Any], where: str | Path) -> None:
    if not isinstance(state, dict):
        raise CheckpointError(f"{where} is not a capsnet checkpoint (its weights are not a mapping)")
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        detail = lines[1] if len(lines) > 1 else lines[0]
        raise CheckpointError(f"weights in {where} do not fit the model: {detail}") from None


def run_name_of(path: str | Path, ckpt: dict[str, Any]) -> str:
    """The name of the run that the checkpoint at ``path`` belongs to.

    Inside a run folder it is the folder's name, which follows the folder when it is
    renamed or copied; a loose checkpoint file goes by the name it was saved under.
    """
    folder = Path(os.path.abspath(path)).parent  # "." names its folder too; links are kept as named
    if any((folder / name).is_file() for name in START_FILES) and _RUN_NAME.match(folder.name):
        return folder.name
    return str(ckpt.get("run") or "") or folder.name


def trained_normalisation(ckpt: dict[str, Any]) -> tuple[list[float], list[float]] | None:
    """The per-channel (mean, std) the checkpoint's model was trained with, as its ``data_info``
    records it; None where it records none (older checkpoints; per-image standardisation)."""
    info = ckpt.get("data_info")
    if not isinstance(info, dict):
        return None
    mean, std = info.get("mean"), info.get("std")
    if not isinstance(mean, list | tuple) or not isinstance(std, list | tuple) or len(mean) != len(std):
        return None
    return [float(v) for v in mean], [float(v) for v in std]


def trained_class_names(ckpt: dict[str, Any]) -> list[str] | None:
    """The class names, in order, the checkpoint's model was trained with, as its ``data_info``
    records them; None where it records none (older checkpoints) or not as a list."""
    info = ckpt.get("data_info")
    names = info.get("class_names") if isinstance(info, dict) else None
    return [str(n) for n in names] if isinstance(names, list | tuple) else None


#: The data settings that name files, which a run's config may give relative to the folder it trained in
DATA_PATHS = ("root", "train_dir", "test_dir")


def training_folder(ckpt: dict[str, Any], path: str | Path) -> Path | None:
    """The folder the run of ``ckpt`` (read from ``path``) was trained from, where the file's place
    tells: a relative ``logging.out_dir`` in its config, and ``path`` in ``<folder>/<out_dir>/<run>/``."""
    out_dir = ((ckpt.get("config") or {}).get("logging") or {}).get("out_dir")
    if not isinstance(out_dir, str) or not out_dir:
        return None
    parts = Path(out_dir).parts
    if Path(out_dir).is_absolute() or any(p in (".", "..") for p in parts):
        return None
    runs = Path(path).resolve().parent.parent  # <folder>/<out_dir>
    if runs.parts[len(runs.parts) - len(parts) :] != parts:
        return None
    return runs.parents[len(parts) - 1]


def rebase_data_paths(cfg: Any, ckpt: dict[str, Any], path: str | Path, given: set[str]) -> None:
    """Points the relative data paths of ``cfg`` (the run's stored config) that are missing from
    here at the folder the run trained from (:func:`training_folder`), where they are found there,
    so that a run can be scored from any folder. Keys in ``given`` (set by the caller) are left
    alone."""
    base = training_folder(ckpt, path)
    if base is None:
        return
    for key in DATA_PATHS:
        value = getattr(cfg.data, key, None)
        if f"data.{key}" in given or not value or Path(value).expanduser().is_absolute():
            continue
        if not Path(value).exists() and (base / value).exists():
            setattr(cfg.data, key, str(base / value))


#: Architecture settings that a command scoring a trained model may change: no weight depends
#: on the number of routing iterations, and recomputing the votes only trades memory for time.
INFERENCE_SETTINGS = ("iterations", "recompute_votes")


def architecture_overrides(ckpt: dict[str, Any], cfg: Any, where: str | Path) -> dict[str, Any]:
    """The changes to the checkpoint's architecture that ``cfg`` (its config with a command's -o) asks for.

    Only :data:`INFERENCE_SETTINGS` may change; any other ``model.`` or ``routing.`` setting
    that differs from the checkpoint's config is refused with a CheckpointError naming it,
    since the weights were trained for the architecture they were saved with.
    """
    from capsnet.config import stored_config

    saved = stored_config(ckpt["config"], where)
    changes, fixed = {}, []
    for section in ("model", "routing"):
        before, now = getattr(saved, section), getattr(cfg, section)
        if section == "model":
            before, now = before.resolved(), now.resolved()
        for field in dataclasses.fields(now):
            if field.name == "preset":  # its sizes are compared one by one
                continue
            old, new = getattr(before, field.name), getattr(now, field.name)
            if old == new:
                continue
            if field.name in INFERENCE_SETTINGS:
                changes[field.name] = new
            else:
                fixed.append(f"{section}.{field.name} ({old!r} in the checkpoint, {new!r} asked)")
    if fixed:
        allowed = ", ".join(f"model.{k}" for k in INFERENCE_SETTINGS)
        raise CheckpointError(
            f"the weights of {where} were trained for its own architecture, which -o cannot change: "
            f"{'; '.join(fixed)}; drop those overrides (only {allowed} may change when scoring a trained model)"
        )
    return changes


def build_model_from_checkpoint(
    ckpt: dict[str, Any], where: str | Path = "checkpoint", changes: dict[str, Any] | None = None
):
    """A CapsNet built from the checkpoint's architecture signature, with its weights loaded.

    ``changes``: settings of :data:`INFERENCE_SETTINGS` to build with instead of the checkpoint's.
    """
    from capsnet.model import CapsNet

    unknown = set(changes or {}) - set(INFERENCE_SETTINGS)
    if unknown:
        raise ValueError(f"only {', '.join(INFERENCE_SETTINGS)} may change, not {', '.join(sorted(unknown))}")
    try:
        model = CapsNet(**{**ckpt["arch"], **(changes or {})})
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"cannot rebuild the model of {where}: {e}") from None
    load_model_state(model, ckpt["model"], where)
    return model


# --------------------------------------------------------------------------- listing runs


def run_summaries(out_dir: str | Path) -> list[dict[str, Any]]:
    """One summary per run folder under ``out_dir`` that holds a checkpoint, the newest first:
    its name and folder, when it was last saved, its dataset, model and parameter count, how far
    it got (steps of its planned total, epochs) and its best score. A run whose newest
    checkpoint cannot be read is listed with ``error`` saying why."""

    def text(value: Any) -> str | None:
        return value if isinstance(value, str) else None

    rows = []
    # one look at the folder, so that a run saving its first checkpoint meanwhile is listed once
    saved, started = _run_folders(Path(out_dir).expanduser())
    times = {run_dir: _run_time(run_dir) for run_dir in saved}
    # the order of latest_run: the first is the run that --ckpt latest takes
    for run_dir in sorted(times, key=lambda p: (times[p], p.name), reverse=True):
        row: dict[str, Any] = {"run": run_dir.name, "path": str(run_dir), "updated": times[run_dir] or None}
        try:
            path = run_checkpoint(run_dir)
            ckpt = load_checkpoint(path)
            for key in ("step", "epoch"):
                if _counter(ckpt[key]) is None:
                    raise CheckpointError(f"{path} is not a capsnet checkpoint ({key} {ckpt[key]!r})")
            model = build_model_from_checkpoint(ckpt, path)
        except CheckpointError as e:
            fields, _ = _process_fields(run_dir, None)
            rows.append({**row, **fields, "error": str(e).splitlines()[0]})
            continue
        config = ckpt.get("config") if isinstance(ckpt.get("config"), dict) else {}
        sections = {name: config.get(name) if isinstance(config.get(name), dict) else {} for name in config}
        row.update(
            checkpoint=str(path),
            data=text((sections.get("data") or {}).get("name")),
            preset=_preset_of(ckpt["arch"], (sections.get("model") or {}).get("preset")),
            parameters=model.num_parameters(),
            iterations=int(model.hparams["iterations"]),
            step=ckpt["step"],
            total_steps=_counter(ckpt.get("total_steps")),
            epoch=ckpt["epoch"],
            epochs=_counter((sections.get("train") or {}).get("epochs")),
            best=_finite(ckpt.get("best_metric")),
            best_step=_counter(ckpt.get("best_step")),
            best_split=text(ckpt.get("best_split")),
        )
        fields, row["total_steps"] = _process_fields(run_dir, row["total_steps"])
        row.update(fields)
        row["finished"] = (
            not row["running"] and row["total_steps"] is not None and row["step"] >= row["total_steps"]
        )
        rows.append(row)
    # after them (so that the first row stays the run --ckpt latest takes), the runs with no
    # checkpoint yet, the most recently active first
    waiting = [_started_summary(run_dir) for run_dir in started]
    return rows + sorted(waiting, key=lambda row: (row["updated"] or 0.0, row["run"]), reverse=True)


def _process_fields(
    run_dir: Path, total_steps: int | None, record: dict[str, Any] | None = None
) -> tuple[dict[str, Any], int | None]:
    """``running``: whether the process that last trained the run still runs (None: not known, as
    for a run of another machine); ``process``: its id while it runs; ``seconds_left``: while it
    runs, the time its remaining steps take at its last logged speed (evaluations not counted), and
    ``logged_step``: the step of that last logged training line, which may be past the last save.
    Also the run's planned steps: while it runs, run.json's plan (a finished run may have been
    resumed for more), else ``total_steps``. ``record``: run.json, where already read."""
    record = (read_run_record(run_dir) or {}) if record is None else record
    pid, running = run_process(run_dir, record)
    if running:
        total_steps = _counter(record.get("total_steps")) or total_steps
    left, logged = _seconds_left(run_dir / "metrics.jsonl", total_steps) if running else (None, None)
    fields = {
        "running": running,
        "process": pid if running else None,
        "seconds_left": left,
        "logged_step": logged,
    }
    return fields, total_steps


def _seconds_left(metrics: Path, total_steps: int | None) -> tuple[float | None, int | None]:
    """The remaining steps' time at the speed of the last training line of ``metrics`` (images per
    second, and images per step from the images seen so far), and that line's step; None, None
    where there is no such line."""
    if total_steps is None:
        return None, None
    try:
        lines = metrics.read_text().splitlines()
    except (OSError, ValueError):
        return None, None
    for line in reversed(lines):
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if not isinstance(entry, dict):
            continue
        step, seen = _counter(entry.get("step")), _finite(entry.get("train/images_seen"))
        speed = _finite(entry.get("perf/img_per_s"))
        if step and seen and speed and step > 0 and seen > 0 and speed > 0:
            left = max(total_steps - step, 0) * (seen / step) / speed
            return (left if math.isfinite(left) else None), step
    return None, None


def _duration(seconds: float) -> str:
    """``seconds`` as the terminal shows a time left: 2 h 05 min, 7 min, under a minute."""
    minutes = round(seconds / 60)
    if minutes < 1:
        return "under a minute"
    return f"{minutes // 60} h {minutes % 60:02d} min" if minutes >= 60 else f"{minutes} min"


def _started_summary(run_dir: Path) -> dict[str, Any]:
    """The row of a run that has saved no checkpoint: what its config.yaml, run.json and the last
    line of its metrics.jsonl say (``checkpoint`` None, ``step`` the last logged step, 0 if none)."""
    import yaml

    record = read_run_record(run_dir) or {}
    metrics = run_dir / "metrics.jsonl"
    entry = last_readable_metrics_entry(metrics)
    times = [_finite(record.get("updated"))]
    try:
        times.append(metrics.stat().st_mtime if entry is not None else None)
    except OSError:  # removed since it was read
        pass
    try:
        config = yaml.safe_load((run_dir / "config.yaml").read_text())
    except (OSError, yaml.YAMLError, ValueError):
        config = None
    sections = config if isinstance(config, dict) else {}

    def setting(section: str, key: str) -> Any:
        values = sections.get(section)
        return values.get(key) if isinstance(values, dict) else None

    known = [t for t in times if t is not None]
    data, preset = setting("data", "name"), setting("model", "preset")
    # the preset's name only where the config keeps its sizes, as for a saved run's model
    from capsnet.config import PRESETS

    sizes = PRESETS.get(preset, {}) if isinstance(preset, str) else {}
    arch = {
        key: value if setting("model", key) is None else setting("model", key) for key, value in sizes.items()
    }
    return {
        "run": run_dir.name,
        "path": str(run_dir),
        "updated": max(known) if known else None,
        "checkpoint": None,
        "data": data if isinstance(data, str) else None,
        "preset": _preset_of(arch, preset),
        "parameters": None,
        "iterations": _counter(setting("model", "iterations")),
        "step": entry["step"] if entry is not None else 0,
        "total_steps": _counter(record.get("total_steps")),
        "epoch": None,
        "epochs": _counter(setting("train", "epochs")),
        "best": None,
        "best_step": None,
        "best_split": None,
        "finished": False,
        **_process_fields(run_dir, None, record)[0],
    }


def _preset_of(arch: dict[str, Any], preset: Any) -> str | None:
    """``preset`` where the model has the preset's sizes; None where the config changed them."""
    from capsnet.config import PRESETS

    sizes = PRESETS.get(preset) if isinstance(preset, str) else None
    if sizes is None:
        return None
    same = all(
        (list(arch.get(key) or []) == list(value)) if isinstance(value, list) else arch.get(key) == value
        for key, value in sizes.items()
    )
    return preset if same else None


def runs_table(rows: list[dict[str, Any]], out_dir: str | Path) -> str:
    """:func:`run_summaries` as a table for the terminal."""
    import datetime

    def when(stamp: float | None) -> str:
        try:
            return datetime.datetime.fromtimestamp(stamp).strftime("%Y-%m-%d %H:%M") if stamp else "-"
        except (ValueError, OverflowError, OSError):  # a time no calendar date has (run.json edited)
            return "-"

    waiting = [row for row in rows if "error" not in row and row.get("checkpoint") is None]
    saved = [row for row in rows if "error" in row or row.get("checkpoint") is not None]
    table = [("run", "updated", "data", "model", "steps", "best")]
    for row in saved:
        if "error" in row:
            table.append((row["run"], when(row["updated"]), "-", "-", "-", f"unreadable: {row['error']}"))
            continue
        model = f"{row['preset'] or 'custom'}, {row['parameters']:,} parameters"
        logged = row.get("logged_step")
        ahead = bool(row["running"]) and isinstance(logged, int) and logged > row["step"]
        steps = f"{logged if ahead else row['step']:,}"  # while it runs: how far it got, and its last save
        steps += f"/{row['total_steps']:,}" if row["total_steps"] is not None else ""
        steps += f" running (saved at step {row['step']:,})" if ahead else ""
        steps += " running" if row["running"] and not ahead else " done" if row["finished"] else ""
        if not row["finished"] and row["seconds_left"] is not None:
            steps += f", {_duration(row['seconds_left'])} left"
        best = "-"
        if isinstance(row["best"], (int, float)):
            best = f"{row['best_split'] or 'val'}/acc {row['best']:.4f}"
            best += f" (step {row['best_step']:,})" if isinstance(row["best_step"], int) else ""
        table.append((row["run"], when(row["updated"]), row["data"] or "-", model, steps, best))
    widths = [max(len(r[i]) for r in table) for i in range(len(table[0]) - 1)]
    lines = []
    if saved:
        lines.append(f"{len(saved)} run{'s' if len(saved) != 1 else ''} in {out_dir}, the newest first:")
        lines += ["  ".join([*(c.ljust(w) for c, w in zip(r, widths)), r[-1]]).rstrip() for r in table]
    if waiting:
        lines.append(
            f"{'S' if not saved else 'Also s'}tarted in {out_dir}, with no checkpoint yet ({FIRST_SAVE}):"
        )
        for row in waiting:
            planned = f"/{row['total_steps']:,}" if row["total_steps"] is not None else ""
            model = row["preset"] or ("custom" if row["data"] else None)  # with a config read: its model
            what = ", ".join(filter(None, [row["data"], model]))
            left = f", {_duration(row['seconds_left'])} left" if row["seconds_left"] is not None else ""
            state = {True: f"  running (process {row['process']}{left})", False: "  not running", None: ""}
            lines.append(
                f"  {row['run']}  last active {when(row['updated'])}  step {row['step']:,}{planned} logged"
                + (f"  ({what})" if what else "")
                + state[row["running"]]
            )
    return "\n".join(lines)
