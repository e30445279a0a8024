"""Learning curves of one or more runs from their metrics.jsonl, as one PNG.

    python scripts/plot_curves.py RUN_DIR [RUN_DIR ...] --out docs/figures/fashion_curves.png

Each RUN_DIR is a directory that ``capsnet train`` wrote (weights/em_capsules/<run>/).
The left panel shows training accuracy (a moving average of the logged windows) and
the accuracy of every end-of-epoch evaluation against images seen; the right one the
training loss. Needs matplotlib (``pip install -e '.[dev]'``).
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
    rows = []
    with path.open() as handle:
        for line in handle:
            line = line.strip()
            if line:
                rows.append(json.loads(line))
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
        per_step = batch_size(run)
        train = [r for r in rows if "train/acc" in r and "step" in r]
        # float(): metrics.jsonl holds NaN and infinities as the strings "nan" and "inf"
        evals = [
            (r["step"], float(r[k]), k.split("/")[0]) for r in rows for k in ("val/acc", "test/acc") if k in r
        ]
        if train:
            seen = [r["step"] * per_step / 1000 for r in train]
            (line,) = ax_acc.plot(
                seen,
                smooth([float(r["train/acc"]) for r in train], args.smooth),
                alpha=0.6,
                label=f"{label} train",
            )
            ax_loss.plot(
                seen,
                smooth([float(r.get("train/loss", math.nan)) for r in train], args.smooth),
                color=line.get_color(),
                label=label,
            )
            color = line.get_color()
        else:
            color = None
        if evals:
            split = evals[0][2]
            ax_acc.plot(
                [s * per_step / 1000 for s, _, _ in evals],
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
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
