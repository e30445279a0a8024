"""Experiment tracking: TensorBoard events, ``metrics.jsonl`` and the progress bar.

One metric vocabulary everywhere (TensorBoard tags, ``metrics.jsonl`` keys, the
progress bar and the epoch summary)::

    train/loss  train/acc  train/skipped_steps  train/images_seen
    val/loss  val/acc  test/loss  test/acc
    train/loss_class  train/loss_recon  train/loss_distill   (the parts of train/loss a run has)
    sched/lr  sched/margin (spread loss only)  sched/lambda  perf/img_per_s
    routing/<layer>/entropy  routing/<layer>/activation_mean
    routing/<layer>/variance  routing/<layer>/active_fraction
    routing/<layer>/activation   (histogram)
    recon/images                 (image: inputs above their reconstructions)

Only rank 0 writes: the trainer builds ``TensorBoardWriter`` there and a
``NullWriter`` elsewhere, and calls either without checking the rank.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor


class TrackingError(OSError):
    """A metrics or TensorBoard file could not be written (disk full, permissions); names the file."""


ROUTING_SCALARS = ("entropy", "activation_mean", "variance", "active_fraction")


def _to_float(value: Any) -> float:
    if isinstance(value, Tensor):
        return float(value.detach().float().mean().item())
    return float(value)


def _json_value(value: float) -> float | str:
    return value if math.isfinite(value) else str(value)  # JSON has no NaN or inf


def _finite_or_none(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_none(v) for v in value]
    return value


def strict_json(value: Any, indent: int | None = None) -> str:
    """``value`` as standard JSON: a NaN or infinity (an accuracy over no images) becomes null."""
    return json.dumps(_finite_or_none(value), indent=indent, allow_nan=False)


class MetricsFile:
    """Appends one JSON object per logged step to ``metrics.jsonl``.

    Metrics logged for the same step are merged into one line, written when a
    later step arrives or on ``flush``.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._step: int | None = None
        self._pending: dict[str, float | str] = {}
        # The file's last line, which a resumed run may add to (the evaluation that a stop on an
        # epoch's last step left to it): merged into that line, not written as a second one.
        self._tail: dict[str, Any] | None = last_metrics_entry(self.path)
        self._rewrite = False

    def add(self, metrics: Mapping[str, float], step: int) -> None:
        if self._step is not None and step != self._step:
            self.flush()
        if self._step is None and self._tail is not None and self._tail.get("step") == step:
            self._pending = {k: v for k, v in self._tail.items() if k != "step"}
            self._rewrite = True
        self._tail = None
        self._step = step
        self._pending.update({k: _json_value(v) for k, v in metrics.items()})

    def flush(self) -> None:
        if self._step is None or not self._pending:
            return
        line = json.dumps({"step": self._step, **self._pending})
        try:
            self._write(line)
        except OSError as e:
            raise TrackingError(f"could not write {self.path}: {e.strerror or e}") from e
        self._step, self._pending = None, {}

    def _write(self, line: str) -> None:
        if self._rewrite:  # the merged line replaces the last one, atomically: a kill keeps the old file
            from capsnet.checkpoint import CheckpointError, atomic_write_bytes

            lines = self.path.read_text().splitlines()
            try:
                atomic_write_bytes("".join(f"{kept}\n" for kept in [*lines[:-1], line]).encode(), self.path)
            except CheckpointError as e:  # "could not write <file>: <why>", as a TrackingError
                raise TrackingError(str(e)) from e
            self._rewrite = False
        else:
            with self.path.open("a") as f:
                f.write(line + "\n")


def last_metrics_entry(path: Path) -> dict[str, Any] | None:
    """The last line of a metrics file, parsed; None for no file, no lines or a damaged last line."""
    try:
        lines = path.read_text().splitlines()
        entry = json.loads(lines[-1]) if lines else None
    except (OSError, ValueError):
        return None
    return entry if isinstance(entry, dict) and isinstance(entry.get("step"), int) else None


def last_readable_metrics_entry(path: Path) -> dict[str, Any] | None:
    """The last line of a metrics file that parses, skipping a damaged end (a crash mid-write);
    None for no file or no such line."""
    try:
        lines = path.read_text().splitlines()
    except (OSError, ValueError):
        return None
    for line in reversed(lines):
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict) and isinstance(entry.get("step"), int):
            return entry
    return None


def truncate_metrics(path: str | Path, after_step: int, source: str | Path | None = None) -> None:
    """Drops lines past ``after_step`` (a resumed run rewrites that part of the history).

    With ``source``, writes that file's lines up to ``after_step`` to ``path`` instead: a run
    continued in another folder keeps the history that led to its checkpoint.
    """
    path = Path(path)
    source = path if source is None else Path(source)
    if not source.is_file():
        return
    kept = []
    for line in source.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= after_step:
                kept.append(line)
        except (ValueError, KeyError, TypeError):
            continue
    from capsnet.checkpoint import atomic_write_bytes  # a kill while rewriting keeps the old file

    atomic_write_bytes("".join(f"{line}\n" for line in kept).encode(), path)


class NullWriter:
    """Accepts every tracking call and does nothing (ranks other than 0, tracking off)."""

    #: whether histograms and images reach anything (else the work of making them is skipped)
    writes_events = False

    def scalar(self, tag: str, value: float | Tensor, step: int) -> None:
        pass

    def scalars(self, metrics: Mapping[str, float | Tensor], step: int) -> None:
        pass

    def histogram(self, tag: str, values: Tensor, step: int) -> None:
        pass

    def image(self, tag: str, image: Tensor, step: int) -> None:
        pass

    def text(self, tag: str, text: str, step: int) -> None:
        pass

    def hparams(self, hparams: Mapping[str, Any], metrics: Mapping[str, float], step: int = 0) -> None:
        pass

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


class TensorBoardWriter(NullWriter):
    """Writes TensorBoard events to ``log_dir`` (None: none) and scalars to ``metrics_path``.

    ``purge_step`` hides events at or past that step that an earlier, interrupted
    attempt of the same run wrote (a resumed run writes them again).
    """

    def __init__(
        self,
        log_dir: str | Path | None,
        metrics_path: str | Path | None = None,
        purge_step: int | None = None,
    ):
        self.tb, self.log_dir = None, log_dir
        if log_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(log_dir=str(log_dir), purge_step=purge_step)
        self.metrics = MetricsFile(metrics_path) if metrics_path is not None else None

    @property
    def writes_events(self) -> bool:
        return self.tb is not None

    @contextlib.contextmanager
    def _writing(self):
        try:
            yield
        except OSError as e:
            raise TrackingError(
                f"could not write TensorBoard events to {self.log_dir}: {e.strerror or e}"
            ) from e

    def scalar(self, tag: str, value: float | Tensor, step: int) -> None:
        self.scalars({tag: value}, step)

    def scalars(self, metrics: Mapping[str, float | Tensor], step: int) -> None:
        values = {tag: _to_float(v) for tag, v in metrics.items()}
        if self.tb is not None:
            with self._writing():
                for tag, v in values.items():
                    self.tb.add_scalar(tag, v, step)
        if self.metrics is not None:
            self.metrics.add(values, step)

    def replay(self, history: str | Path) -> None:
        """Writes the scalars of a metrics file into the TensorBoard events alone: the history of a
        run continued in another folder, whose metrics.jsonl starts with it (histograms and images
        of those steps are not in that file, so they stay with the first run)."""
        if self.tb is None:
            return
        with self._writing():
            for line in Path(history).read_text().splitlines():
                try:
                    entry = json.loads(line)
                except ValueError:
                    continue
                step = entry.get("step") if isinstance(entry, dict) else None
                if not isinstance(step, int):
                    continue
                for tag, value in entry.items():
                    if tag != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                        self.tb.add_scalar(tag, value, step)

    def histogram(self, tag: str, values: Tensor, step: int) -> None:
        if self.tb is not None:
            values = values.detach().float().flatten().cpu()
            values = values[torch.isfinite(values)]
            with self._writing():
                if values.numel():
                    self.tb.add_histogram(tag, values, step)

    def image(self, tag: str, image: Tensor, step: int) -> None:
        """``image`` is (C, H, W) with values in [0, 1]; a non-finite pixel is drawn black (inf: white)."""
        if self.tb is not None:
            image = torch.nan_to_num(image.detach().float(), nan=0.0, posinf=1.0, neginf=0.0)
            with self._writing():
                self.tb.add_image(tag, image.clamp(0, 1).cpu(), step)

    def text(self, tag: str, text: str, step: int) -> None:
        """Plain text, shown verbatim (TensorBoard reads markdown: each line is indented as code)."""
        if self.tb is not None:
            with self._writing():
                self.tb.add_text(tag, "\n".join(f"    {line}" for line in text.splitlines()), step)

    def hparams(self, hparams: Mapping[str, Any], metrics: Mapping[str, float], step: int = 0) -> None:
        """Written at ``step``, the attempt's last: each attempt that ends as asked (its last epoch, or
        train.max_steps) leaves its summary at its own last step; one stopped by a signal writes none."""
        if self.tb is not None:
            clean = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in hparams.items()}
            metric_values = {k: float(v) for k, v in metrics.items()}
            with self._writing():
                self.tb.add_hparams(clean, metric_values, run_name=".", global_step=step)

    def flush(self) -> None:
        if self.metrics is not None:
            self.metrics.flush()
        if self.tb is not None:
            with self._writing():
                self.tb.flush()

    def close(self) -> None:
        try:
            self.flush()
        finally:  # the event file is closed (its thread stopped) even when a write failed
            if self.tb is not None:
                with self._writing():
                    self.tb.close()


# --------------------------------------------------------------------------- routing statistics and images


def routing_scalars(stats: Mapping[str, Mapping[str, Tensor]]) -> dict[str, float]:
    """``routing/<layer>/<stat>`` scalars from ``CapsNet.routing_stats``."""
    return {
        f"routing/{layer}/{key}": _to_float(values[key])
        for layer, values in stats.items()
        for key in ROUTING_SCALARS
        if key in values
    }


def log_routing_histograms(writer: NullWriter, stats: Mapping[str, Mapping[str, Tensor]], step: int) -> None:
    for layer, values in stats.items():
        if "activation" in values:
            writer.histogram(f"routing/{layer}/activation", values["activation"], step)


def reconstruction_grid(x: Tensor, recon: Tensor, max_images: int = 8) -> Tensor:
    """Inputs (top row) above their reconstructions (bottom row), scaled to [0, 1]: (C, H', W')."""
    from torchvision.utils import make_grid

    x, recon = x[:max_images].detach().float().cpu(), recon[:max_images].detach().float().cpu()
    if x.shape[1] not in (1, 3):  # e.g. stereo pairs: show the first view
        x, recon = x[:, :1], recon[:, :1]
    both = torch.cat([x, recon])  # (2n, C, H, W)
    lo, hi = both.amin(), both.amax()
    both = (both - lo) / (hi - lo).clamp(min=1e-8)
    return make_grid(both, nrow=x.shape[0], padding=1, pad_value=1.0)


# --------------------------------------------------------------------------- console


def progress(iterable: Iterable, total: int | None, enabled: bool, desc: str = ""):
    """A tqdm bar on stderr when enabled and stderr is a terminal, else the plain iterable."""
    if not enabled or not sys.stderr.isatty():
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, leave=False, dynamic_ncols=True, file=sys.stderr)


def set_postfix(bar: Any, **values: float) -> None:
    if hasattr(bar, "set_postfix"):
        bar.set_postfix({k: f"{v:.4g}" for k, v in values.items()}, refresh=False)


def counted(n: int, noun: str, plural: str | None = None) -> str:
    """``"1 step"``, ``"2 steps"``: ``n`` and the noun in its number (``plural``: when not noun + "s")."""
    return f"{n} {noun if n == 1 else plural or noun + 's'}"


def averaged_steps_text(steps: Iterable[int]) -> str:
    """``"the mean of the weights at steps 3,376, 3,587"``: how eval and predict name an averaged
    checkpoint (``capsnet average``) where they would give its step."""
    return f"the mean of the weights at steps {', '.join(f'{s:,}' for s in steps)}"


def listed(items, most: int = 3) -> str:
    """``"a, b, c, ..."``: the first ``most`` items, then ``...`` where there are more."""
    items = [str(item) for item in items]
    return ", ".join(items[:most]) + (", ..." if len(items) > most else "")


def format_metrics(metrics: Mapping[str, float], keys: Iterable[str]) -> str:
    """``"train/loss 0.512  val/acc 0.7031"`` for the keys present."""
    parts = []
    for key in keys:
        if key in metrics:
            v = metrics[key]
            parts.append(f"{key} {v:.3g}" if key.startswith("sched/lr") else f"{key} {v:.4f}")
    return "  ".join(parts)
