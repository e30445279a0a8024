"""Learning curves of one or more runs from their metrics.jsonl, as one PNG.

    python scripts/plot_curves.py RUN_DIR [RUN_DIR ...] --out docs/figures/fashion_curves.png

Each RUN_DIR is a directory that ``capsnet train`` wrote (weights/em_capsules/<run>/).
The left panel shows training accuracy (a moving average of the logged windows) and
the accuracy of every end-of-epoch evaluation against images seen; the right one the
training loss. Needs matplotlib (``pip install -e '.[dev]'``).

Images seen are the count that capsnet train logs with each row (train/images_seen),
which stays right when a run was resumed with another batch size, train.accumulate or
number of processes. A metrics.jsonl written before that count was logged places its
rows at step x the run's global batch (its config.yaml's, as the run ended): right
unless the batch changed during the run. Rows before the first one with a count (a run
resumed from such an older checkpoint) go at the rate of images per step up to that row.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path


def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise SystemExit(f"error: {path} does not exist; is {run_dir} a run directory of capsnet train?")
    rows, damaged = [], 0
    with path.open() as handle:
        for line in handle:
            line = line.strip()
            if not line:
                continue
            try:
                rows.append(json.loads(line))
            except ValueError:  # a line cut short by a crash mid-write
                damaged += 1
    if damaged:
        print(f"warning: {path}: skipped {damaged} damaged line{'s' if damaged > 1 else ''}", file=sys.stderr)
    return rows


def batch_size(run_dir: Path) -> int:
    """The global batch of the run: its config.yaml's per-process batch (32 if there is none) times
    train.accumulate and the number of processes its newest checkpoint records (torchrun)."""
    from capsnet.checkpoint import CheckpointError, load_checkpoint, run_checkpoint
    from capsnet.config import load_config

    path = run_dir / "config.yaml"
    per_step = 32
    if path.is_file():
        train = load_config(path).train
        per_step = train.batch_size * train.accumulate
    try:
        processes = int(load_checkpoint(run_checkpoint(run_dir)).get("world_size", 1))
    except CheckpointError:  # no checkpoint yet: one process
        processes = 1
    return per_step * max(1, processes)


def images_seen(run_dir: Path, rows: list[dict]) -> list[float]:
    """The training images seen at each of ``rows`` of ``run_dir``'s metrics (NaN for a row without a step).

    A row's own train/images_seen where it has one; the others at their step times a
    number of images per step: that of the first counted row where there is one (the
    rows before it come from before a resume, which carried the count over), else the
    run's global batch (:func:`batch_size`).
    """
    per_step = None
    seen = []
    for row in rows:
        if "train/images_seen" in row:
            seen.append(float(row["train/images_seen"]))
            continue
        if "step" not in row:
            seen.append(math.nan)
            continue
        if per_step is None:
            first = next((r for r in rows if "train/images_seen" in r and r.get("step")), None)
            per_step = float(first["train/images_seen"]) / first["step"] if first else batch_size(run_dir)
        seen.append(row["step"] * per_step)
    return seen


def smooth(values: list[float], width: int) -> list[float]:
    """Moving average over the last ``width`` values, leaving out non-finite ones (a window of
    skipped steps logs train/loss NaN): NaN, a gap in the curve, where a window holds none."""
    out = []
    for i in range(len(values)):
        finite = [v for v in values[max(0, i - width + 1) : i + 1] if math.isfinite(v)]
        out.append(sum(finite) / len(finite) if finite else math.nan)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("runs", nargs="+", type=Path, help="run directories")
    parser.add_argument("--out", type=Path, required=True, help="PNG to write")
    parser.add_argument("--labels", nargs="*", help="one legend label per run (default: directory names)")
    parser.add_argument("--smooth", type=int, default=10, help="moving-average width over logged windows")
    args = parser.parse_args(argv)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("error: matplotlib is needed: pip install -e '.[dev]'", file=sys.stderr)
        return 2
    labels = args.labels or [run.name for run in args.runs]
    if len(labels) != len(args.runs):
        parser.error("--labels needs one label per run")
    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(11, 4))
    for run, label in zip(args.runs, labels):
        rows = read_metrics(run)
        at = images_seen(run, rows)
        train = [(x, r) for x, r in zip(at, rows) if "train/acc" in r and "step" in r]
        # float(): metrics.jsonl holds NaN and infinities as the strings "nan" and "inf"
        evals = [
            (x, float(r[k]), k.split("/")[0])
            for x, r in zip(at, rows)
            for k in ("val/acc", "test/acc")
            if k in r and "step" in r
        ]
        if train:
            seen = [x / 1000 for x, _ in train]
            (line,) = ax_acc.plot(
                seen,
                smooth([float(r["train/acc"]) for _, r in train], args.smooth),
                alpha=0.6,
                label=f"{label} train",
            )
            ax_loss.plot(
                seen,
                smooth([float(r.get("train/loss", math.nan)) for _, r in train], args.smooth),
                color=line.get_color(),
                label=label,
            )
            color = line.get_color()
        else:
            color = None
        if evals:
            split = evals[0][2]
            ax_acc.plot(
                [x / 1000 for x, _, _ in evals],
                [a for _, a, _ in evals],
                "o-",
                color=color,
                label=f"{label} {split}",
            )
    ax_acc.set_xlabel("training images seen (thousands)")
    ax_acc.set_ylabel("accuracy")
    ax_acc.grid(alpha=0.3)
    ax_acc.legend(fontsize=8)
    ax_loss.set_xlabel("training images seen (thousands)")
    ax_loss.set_ylabel("training loss")
    ax_loss.grid(alpha=0.3)
    if len(ax_loss.get_lines()) > 1:  # several runs: which loss is whose
        ax_loss.legend(fontsize=8)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
