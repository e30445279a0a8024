"""Helpers shared by several test modules (pytest puts this folder on sys.path)."""

from __future__ import annotations

import json
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
