"""The helper scripts under scripts/ that are not bash: learning-curve plots."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def fake_run(folder: Path, batch: int, rows: list[dict]) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(f"train:\n  batch_size: {batch}\n  accumulate: 2\n")
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def test_plot_curves_writes_a_png_of_train_and_eval_accuracy(tmp_path):
    plot = load_script("plot_curves")
    rows = [{"step": s, "train/loss": 1.0 / s, "train/acc": 0.1 + s / 100} for s in range(1, 40)]
    rows[19]["val/acc"] = 0.4
    rows[38]["val/acc"] = 0.6
    run = fake_run(tmp_path / "run-a", 16, rows)
    out = tmp_path / "figs" / "curves.png"
    assert plot.main([str(run), "--out", str(out), "--labels", "small"]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert plot.batch_size(run) == 32  # batch 16 x accumulate 2
    assert plot.smooth([1.0, 3.0, 5.0], 2) == [1.0, 2.0, 4.0]


def test_plot_curves_names_a_folder_that_is_not_a_run(tmp_path):
    plot = load_script("plot_curves")
    with pytest.raises(SystemExit, match="metrics.jsonl does not exist"):
        plot.main([str(tmp_path), "--out", str(tmp_path / "x.png")])
