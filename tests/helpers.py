"""Helpers shared by several test modules (pytest puts this folder on sys.path)."""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import sys
from pathlib import Path

from capsnet.config import Config, load_config

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny.yaml"


def tiny(tmp_path: Path, *overrides: str) -> Config:
    """configs/tiny.yaml with its run and TensorBoard folders under ``tmp_path``, plus ``overrides``."""
    base = [f"logging.out_dir={tmp_path / 'weights'}", f"logging.tb_dir={tmp_path / 'runs'}"]
    return load_config(TINY, base + list(overrides))


def logged(run_dir: Path) -> list[dict]:
    """The lines of a run's metrics.jsonl, in order."""
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def broken_compiler(fn):
    """Stands in for capsnet.routing._kernel where torch.compile cannot build anything."""

    def call(*args):
        raise RuntimeError("CppCompileError: g++: not found\nmore lines")

    return call


def record_kernel_choice(monkeypatch) -> list[bool]:
    """Notes, at every routing call, whether the compiled kernels are in use; returns the notes so far."""
    from capsnet import routing

    seen: list[bool] = []
    original = routing._route_in_chunks

    def spy(*args, **kwargs):
        seen.append(routing.compiled_kernels_enabled())
        return original(*args, **kwargs)

    monkeypatch.setattr(routing, "_route_in_chunks", spy)
    return seen


@contextlib.contextmanager
def other_process():
    """A second process, idle while the block runs (a training process, as run.json sees it); killed
    and reaped when the block ends."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait()


def trained_by(run_dir: Path, pid: int, **fields) -> dict:
    """Rewrites run_dir's run.json as the process ``pid`` of this machine writes it while it trains the
    run (its id, start time, PID namespace, host, not ended), plus ``fields``; returns the record."""
    from capsnet.checkpoint import pid_namespace, process_start, read_run_record

    record = {
        **(read_run_record(run_dir) or {}),
        "pid": pid,
        "pid_start": process_start(pid),
        "pid_ns": pid_namespace(),
        "host": socket.gethostname(),
        "ended": None,
        **fields,
    }
    (run_dir / "run.json").write_text(json.dumps(record))
    return record
