"""Export a trained model to ONNX or a torch.export ``.pt2`` archive, checked against eager.

The exported graph maps images (N, C, H, W) to class activations (N, E) and
poses (N, E, 4, 4); the decoder is left out. The batch dimension is dynamic;
the routing loop is unrolled (its iteration count is static), and the routing
is the fast path's contraction form traced whole-batch. Before an export
is reported as done, its outputs are compared with the eager model's on a batch
of real test images, and on a second, smaller batch to exercise the dynamic
batch size. A difference above the tolerance is an error.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import os
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from capsnet.checkpoint import (
    build_model_from_checkpoint,
    current_umask,
    load_checkpoint,
    resolve_checkpoint,
    safe_child,
)
from capsnet.config import stored_config

FORMATS = {"onnx": "model.onnx", "pt2": "model.pt2"}
TOLERANCE = 1e-4


class ExportError(Exception):
    """Export failed or the exported model does not match the eager one."""


@dataclass
class ExportReport:
    path: Path
    format: str
    checkpoint: Path
    max_abs_diff: float | None  # None when the check was skipped
    checked_batches: list[int]
    inputs: str  # where the parity batch came from
    note: str = ""

    def summary(self) -> str:
        if self.max_abs_diff is None:
            check = f"parity check skipped: {self.note}"
        else:
            sizes = " and ".join(str(b) for b in self.checked_batches)
            check = (
                f"parity ok: max |exported - eager| = {self.max_abs_diff:.2e} "
                f"(tolerance {TOLERANCE:g} x max(1, |eager output|)) on batches of {sizes} {self.inputs}"
            )
        return f"exported {self.checkpoint} -> {self.path} ({self.format})\n{check}"


class Classifier(nn.Module):
    """The exported function: images -> (activations, poses), without the decoder."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        out = self.model(images)
        return out.activations, out.poses  # (N, E), (N, E, P, P)


def default_export_path(run_name: str, fmt: str, base: str | Path = "exports") -> Path:
    """``exports/<run>/model.onnx`` or ``.pt2``; ``run_name`` may not leave ``base``."""
    return safe_child(base, run_name) / FORMATS[fmt]


def sample_batch(cfg, info_channels: int, size: int, batch: int) -> tuple[Tensor, str]:
    """A batch of test images, or random images when the dataset cannot be loaded."""
    from capsnet.data import DataError, build_loaders, check_channels

    try:
        loaders = build_loaders(cfg)
        check_channels(loaders.info, info_channels)
        images = []
        for x, _ in loaders.test:
            images.append(x)
            if sum(len(t) for t in images) >= batch:
                break
        if not images:
            raise DataError("the test split has no images")
        x = torch.cat(images)[:batch]
        return x, f"of {cfg.data.name} test images"
    except DataError as e:
        first = str(e).strip().splitlines()[0]
        return torch.randn(
            batch, info_channels, size, size
        ), f"of random images (test data unavailable: {first})"


def _max_diff(reference: tuple[Tensor, ...], got: tuple) -> tuple[float, float]:
    """(largest |exported - eager| over the outputs, largest of it over TOLERANCE x the output's scale).

    An output's scale is max(1, max |eager|): activations in (0, 1) are held to TOLERANCE
    itself, poses, which are not bounded, to TOLERANCE relative to their largest entry.
    The export passes when the second figure is at most 1.
    """
    diffs, ratios = [0.0], [0.0]
    for ref, out in zip(reference, got):
        out = torch.as_tensor(out)
        if out.shape != ref.shape:
            raise ExportError(f"exported output has shape {tuple(out.shape)}, eager has {tuple(ref.shape)}")
        if not ref.numel():
            continue
        diff = float((out.float() - ref.float()).abs().max())
        scale = max(1.0, float(ref.float().abs().max()))
        diffs.append(diff)
        ratios.append(diff / (TOLERANCE * scale))
    return _worst(diffs), _worst(ratios)


def _worst(values: list[float]) -> float:
    """The largest of ``values``, or NaN when one is NaN (which max() would pass over)."""
    return math.nan if any(math.isnan(v) for v in values) else max(values)


@contextlib.contextmanager
def _quiet():
    """Keeps the exporters' progress prints, warnings and logged warnings off the console."""
    loggers = [logging.getLogger(name) for name in ("onnx_ir", "onnxscript", "torch.onnx")]
    levels = [logger.level for logger in loggers]
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        for logger in loggers:
            logger.setLevel(logging.ERROR)
        try:
            yield
        finally:
            for logger, level in zip(loggers, levels):
                logger.setLevel(level)


def export_pt2(module: nn.Module, example: Tensor, path: Path) -> Callable[[Tensor], tuple]:
    batch = torch.export.Dim("batch", min=1, max=1 << 16)
    with _quiet():
        program = torch.export.export(module, (example,), dynamic_shapes={"images": {0: batch}})
        torch.export.save(program, str(path))
    loaded = torch.export.load(str(path)).module()
    return lambda x: tuple(loaded(x))


def export_onnx(module: nn.Module, example: Tensor, path: Path) -> Callable[[Tensor], tuple] | None:
    """Writes ``path``; returns an onnxruntime runner, or None when onnxruntime is missing."""
    batch = torch.export.Dim("batch", min=1, max=1 << 16)
    with _quiet():
        torch.onnx.export(
            module,
            (example,),
            str(path),
            dynamo=True,
            dynamic_shapes={"images": {0: batch}},
            input_names=["images"],
            output_names=["activations", "poses"],
            external_data=False,
        )
    try:
        import onnxruntime
    except ImportError:
        return None
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return lambda x: tuple(torch.from_numpy(o) for o in session.run(None, {"images": x.numpy()}))


def export_checkpoint(
    spec: str,
    fmt: str,
    out: str | Path | None = None,
    out_dir: str | Path = "weights/em_capsules",
    data_root: str | None = None,
    batch_size: int = 8,
    exports_dir: str | Path = "exports",
    overwrite: bool = False,
) -> ExportReport:
    """Exports the checkpoint ``spec`` names (latest | best | run dir | file) as ``fmt``.

    The file is written beside its final name and moved there only once its parity
    check passes, so an export that fails leaves whatever was there before; an
    existing file is replaced only with ``overwrite``.
    """
    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r}; choose one of: {', '.join(FORMATS)}")
    if out is not None:
        named = {Path(name).suffix: other for other, name in FORMATS.items()}.get(Path(out).suffix.lower())
        if named is not None and named != fmt:
            raise ExportError(
                f"--out {out} names a {named} file but --format is {fmt}; "
                f"give --format {named}, or an {Path(FORMATS[fmt]).suffix} name"
            )
    ckpt_path = resolve_checkpoint(spec, out_dir)
    ckpt = load_checkpoint(ckpt_path)
    # The default (fast) routing is what gets exported: while torch.export traces,
    # it runs the whole batch through plain differentiable operations (no in-place
    # writes, no custom autograd function, no cached geometry), which decompose into
    # ATen and ONNX operators under a symbolic batch size.
    model = build_model_from_checkpoint(ckpt, ckpt_path).eval()
    path = (
        Path(out) if out is not None else default_export_path(str(ckpt.get("run") or "run"), fmt, exports_dir)
    )
    if path.is_dir():
        raise ExportError(f"--out {path} is a folder: give a file name, such as {path / FORMATS[fmt]}")
    if path.exists() and not overwrite:
        raise ExportError(f"{path} already exists; --overwrite replaces it, or give another --out")
    path.parent.mkdir(parents=True, exist_ok=True)

    overrides = ["train.device=cpu"] + ([f"data.root={data_root}"] if data_root else [])
    cfg = stored_config(ckpt["config"], ckpt_path, overrides)
    arch = ckpt["arch"]
    x, source = sample_batch(cfg, arch["in_channels"], arch["image_size"], max(2, batch_size))
    batches = [x, x[: max(1, len(x) // 2 - 1)]]
    module = Classifier(model).eval()
    with torch.no_grad():
        reference = [module(b) for b in batches]  # eager first: also warms the model's caches
    handle, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix)
    os.close(handle)
    partial = Path(name)
    os.chmod(partial, 0o666 & ~current_umask())  # mkstemp makes it private; an export is an ordinary file
    try:
        try:
            runner = export_pt2(module, x, partial) if fmt == "pt2" else export_onnx(module, x, partial)
        except Exception as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise ExportError(f"{fmt} export of {ckpt_path} failed: {first[:300]}") from e
        if runner is None:
            os.replace(partial, path)
            return ExportReport(path, fmt, ckpt_path, None, [], source, "onnxruntime is not installed")
        with torch.no_grad():
            checks = [_max_diff(ref, runner(b)) for ref, b in zip(reference, batches)]
        diff, ratio = _worst([d for d, _ in checks]), _worst([r for _, r in checks])
        if not ratio <= 1.0:  # NaN fails too
            kept = f"; {path} is as it was" if path.exists() else ""
            raise ExportError(
                f"{fmt} export of {ckpt_path} differs from the eager model by {diff:.3g} "
                f"(tolerance {TOLERANCE:g} x max(1, |eager output|)); nothing was written{kept}"
            )
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    return ExportReport(path, fmt, ckpt_path, diff, [len(b) for b in batches], source)
