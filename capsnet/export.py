"""Export a trained model to ONNX or a torch.export ``.pt2`` archive, checked against eager.

The exported graph maps images (N, C, H, W) to class activations (N, E) and
poses (N, E, P, P); the decoder is left out. By default its input is pixels
scaled to [0, 1] (uint8 / 255) and the dataset's normalisation is part of the
graph (:class:`Preprocess`), so the file needs nothing beside it; with
``inputs="normalised"`` it takes what the data pipeline feeds the model. Either
way the file says so: ONNX metadata properties, or ``capsnet.json`` among a
``.pt2`` archive's extra files (:func:`read_pt2_metadata`). The batch dimension is dynamic;
the routing loop is unrolled (its iteration count is static), and the routing
is the fast path's contraction form traced whole-batch. Before an export
is reported as done, its outputs are compared with the eager model's on a batch
of real test images, and on a second, smaller batch to exercise the dynamic
batch size. A difference above the tolerance is an error.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from capsnet.checkpoint import (
    build_model_from_checkpoint,
    current_umask,
    load_checkpoint,
    rebase_data_paths,
    resolve_checkpoint,
    run_name_of,
    safe_child,
    trained_class_names,
    trained_normalisation,
)
from capsnet.config import stored_config

FORMATS = {"onnx": "model.onnx", "pt2": "model.pt2"}
PT2_METADATA = "capsnet.json"  # the .pt2 archive's extra file holding :func:`metadata`
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
    source: str  # where the parity batch came from
    inputs: InputSpec | None = None
    note: str = ""

    def summary(self) -> str:
        if self.max_abs_diff is None:
            check = f"parity check skipped: {self.note}"
        else:
            sizes = " and ".join(str(b) for b in self.checked_batches)
            check = (
                f"parity ok: max |exported - eager| = {self.max_abs_diff:.2e} "
                f"(tolerance {TOLERANCE:g} x max(1, |eager output|)) on batches of {sizes} {self.source}"
            )
        lines = [f"exported {self.checkpoint} -> {self.path} ({self.format})"]
        if self.inputs is not None:
            lines.append(f"input: {self.inputs.describe()}")
        return "\n".join([*lines, check])


INPUTS = ("pixels", "normalised")


@dataclass(frozen=True)
class InputSpec:
    """What an exported graph takes, and how that becomes what the model saw in training.

    ``mean``/``std`` (per channel, in [0, 1] units) describe datasets normalised as
    ``(x / 255 - mean) / std``; ``None`` means smallNORB's preprocessing: each channel
    standardised with the statistics of the whole ``size`` x ``size`` image, then the
    centre ``model_size`` crop.
    """

    inputs: str  # "pixels" (the graph normalises) or "normalised" (the caller does)
    channels: int
    source_size: int  # side of the images the preprocessing starts from
    model_size: int  # side the model sees
    mean: tuple[float, ...] | None
    std: tuple[float, ...] | None
    per_image: bool = False  # smallNORB's standardisation (mean/std None and per_image False: not recorded)
    resize: str | None = None  # how the dataset's files became source_size images in training; None: as read

    @property
    def size(self) -> int:
        """Side of the exported graph's input images."""
        return self.source_size if self.inputs == "pixels" else self.model_size

    def preprocessing(self) -> str:
        if self.mean is not None:
            return (
                f"(p - mean) / std per channel for pixels p in [0, 1], "
                f"mean {_floats(self.mean)}, std {_floats(self.std)}"
            )
        if not self.per_image:
            return "as capsnet's data pipeline normalises this dataset (the checkpoint does not record how)"
        crop = (
            ""
            if self.source_size == self.model_size
            else f", then the centre {self.model_size}x{self.model_size} crop"
        )
        return (
            f"each channel standardised to zero mean and unit variance over the whole "
            f"{self.source_size}x{self.source_size} image (std at least 1/{self.source_size} in uint8 levels){crop}"
        )

    def describe(self) -> str:
        shape = f"images (N, {self.channels}, {self.size}, {self.size}) float32"
        resized = f"; in training the pixels were {self.resize}" if self.resize else ""
        if self.inputs == "pixels":
            return (
                f"{shape}: pixels in [0, 1] (uint8 / 255), normalised inside the graph: "
                f"{self.preprocessing()}{resized}"
            )
        return f"{shape}, preprocessed by the caller: {self.preprocessing()}{resized}"


def _floats(values) -> str:
    return "[" + ", ".join(f"{v:g}" for v in values) + "]"


def input_spec(
    inputs: str, arch: dict[str, Any], data_info: dict[str, Any] | None, data_name: str
) -> InputSpec:
    """The :class:`InputSpec` of a checkpoint's model (``data_info`` as the checkpoint stores it)."""
    from capsnet.data import smallnorb_source_size, stored_resizing

    if inputs not in INPUTS:
        raise ExportError(f"unknown --inputs {inputs!r}; choose one of: {', '.join(INPUTS)}")
    channels, size = int(arch["in_channels"]), int(arch["image_size"])
    mean = std = None
    if data_info and data_info.get("mean") is not None and data_info.get("std") is not None:
        mean, std = tuple(map(float, data_info["mean"])), tuple(map(float, data_info["std"]))
        if len(mean) != channels or len(std) != channels:
            raise ExportError(
                f"the checkpoint's normalisation has {len(mean)} channel(s) but the model takes {channels}"
            )
    elif data_name != "smallnorb" and inputs == "pixels":
        raise ExportError(
            "the checkpoint does not record its dataset's normalisation (data_info), so it cannot be part "
            "of the exported graph; export with --inputs normalised and normalise the images yourself"
        )
    per_image = mean is None and data_name == "smallnorb"
    source = smallnorb_source_size(size) if per_image else size
    return InputSpec(
        inputs, channels, source, size, mean, std, per_image, stored_resizing(data_name, source, channels)
    )


class Preprocess(nn.Module):
    """Pixels in [0, 1] (N, C, S, S) -> what the data pipeline feeds the model (N, C, H, W)."""

    def __init__(self, spec: InputSpec):
        super().__init__()
        self.source_size, self.model_size = spec.source_size, spec.model_size
        self.per_image = spec.per_image
        if not self.per_image:
            self.register_buffer("mean", torch.tensor(spec.mean, dtype=torch.float32).view(1, -1, 1, 1))
            self.register_buffer("std", torch.tensor(spec.std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, images: Tensor) -> Tensor:
        if not self.per_image:
            return (images - self.mean) / self.std
        levels = images * 255.0  # the pipeline's statistics are in uint8 levels (its floor too)
        mean = levels.mean(dim=(2, 3), keepdim=True)
        std = (levels - mean).square().mean(dim=(2, 3), keepdim=True).sqrt()
        std = std.clamp_min(1.0 / self.source_size)  # 1 / sqrt(S * S), as capsnet.data.image_stats
        top = (self.source_size - self.model_size) // 2
        crop = levels[:, :, top : top + self.model_size, top : top + self.model_size]
        return (crop - mean) / std


class Classifier(nn.Module):
    """The exported function: images -> (activations, poses), without the decoder.

    With ``preprocess`` the images are pixels in [0, 1] that it normalises first.
    """

    def __init__(self, model: nn.Module, preprocess: nn.Module | None = None):
        super().__init__()
        self.model = model
        self.preprocess = preprocess

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        if self.preprocess is not None:
            images = self.preprocess(images)
        out = self.model(images)
        return out.activations, out.poses  # (N, E), (N, E, P, P)


def default_export_path(run_name: str, fmt: str, base: str | Path = "exports") -> Path:
    """``exports/<run>/model.onnx`` or ``.pt2``; ``run_name`` may not leave ``base``."""
    return safe_child(base, run_name) / FORMATS[fmt]


def sample_batch(
    cfg,
    spec: InputSpec,
    batch: int,
    stats: tuple[list[float], list[float]] | None = None,
    trained_classes: list[str] | None = None,
) -> tuple[Tensor, Tensor, str]:
    """Parity images: (pixels in [0, 1] (N, C, S, S), what the model is fed for them, their source).

    Test images as stored and as the data pipeline's evaluation transform makes them with
    ``stats``, the normalisation the checkpoint records (where it does: not one recomputed
    from the training images as they are now); random pixels, normalised by
    :class:`Preprocess`, when the dataset cannot be loaded.
    """
    from capsnet.data import DataError, build_loaders, check_channels, reported_data_warnings

    try:
        with reported_data_warnings():
            loaders = build_loaders(cfg, stats=stats, trained_classes=trained_classes)
        check_channels(loaders.info, spec.channels)
        dataset = loaders.test.dataset
        count = min(batch, len(dataset))
        if count == 0:
            raise DataError("the test split has no images")
        stored = [dataset.pixels(i) for i in range(count)]
        if stored[0].shape[-2:] != (spec.source_size, spec.source_size):
            raise ExportError(
                f"the test images are {stored[0].shape[-1]}x{stored[0].shape[-2]} but the checkpoint's "
                f"preprocessing starts from {spec.source_size}x{spec.source_size}; "
                "check data.image_size (or pass the data the run trained on)"
            )
        pixels = torch.stack([torch.from_numpy(np.array(x)) for x in stored]).float() / 255.0
        fed = torch.stack([dataset.eval_transform(x) for x in stored])
        return pixels, fed, f"of {cfg.data.name} test images"
    except DataError as e:
        first = str(e).strip().splitlines()[0]
        shape = (batch, spec.channels, spec.source_size, spec.source_size)
        pixels = torch.randint(0, 256, shape, generator=torch.Generator().manual_seed(0)).float() / 255.0
        if spec.mean is None and not spec.per_image:
            # the checkpoint does not record its normalisation (only with inputs "normalised", whose
            # graph is the model alone): inputs of about the normalised scale check it as well
            fed = (pixels - 0.5) / 0.25
        else:
            with torch.no_grad():
                fed = Preprocess(spec)(pixels)
        return pixels, fed, f"of random images (test data unavailable: {first})"


def _caused_by_interrupt(error: BaseException) -> bool:
    """Whether a KeyboardInterrupt is in the chain of exceptions that led to ``error``."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, KeyboardInterrupt):
            return True
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return False


def metadata(spec: InputSpec, ckpt: dict[str, Any], class_names: list[str], run: str) -> dict[str, str]:
    """What an exported file records about itself (ONNX metadata properties; ``capsnet.json`` in a .pt2)."""
    from capsnet import __version__

    classes = len(class_names) or "E"
    pose = (ckpt.get("arch") or {}).get("pose_size", "P")
    return {
        "capsnet.inputs": spec.inputs,
        "capsnet.input": spec.describe(),
        "capsnet.preprocessing": spec.preprocessing(),
        "capsnet.resize": spec.resize or "none: the images as the dataset stores them",
        "capsnet.outputs": (
            f"activations (N, {classes}): one per class in (0, 1), the prediction is the largest; "
            f"poses (N, {classes}, {pose}, {pose})"
        ),
        "capsnet.class_names": json.dumps(class_names),
        "capsnet.run": run,
        "capsnet.step": str(ckpt.get("step", "")),
        "capsnet.version": __version__,
    }


def read_pt2_metadata(path: str | Path) -> dict[str, str]:
    """The metadata :func:`export_checkpoint` stored in a ``.pt2`` archive."""
    extra = {PT2_METADATA: ""}
    torch.export.load(str(path), extra_files=extra)
    return json.loads(extra[PT2_METADATA]) if extra[PT2_METADATA] else {}


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


def export_pt2(
    module: nn.Module, example: Tensor, path: Path, meta: dict[str, str] | None = None
) -> Callable[[Tensor], tuple]:
    batch = torch.export.Dim("batch", min=1, max=1 << 16)
    extra = {PT2_METADATA: json.dumps(meta, indent=1)} if meta else None
    with _quiet():
        program = torch.export.export(module, (example,), dynamic_shapes={"images": {0: batch}})
        torch.export.save(program, str(path), extra_files=extra)
    loaded = torch.export.load(str(path)).module()
    return lambda x: tuple(loaded(x))


def export_onnx(
    module: nn.Module, example: Tensor, path: Path, meta: dict[str, str] | None = None
) -> Callable[[Tensor], tuple] | None:
    """Writes ``path`` (with ``meta`` as metadata properties); returns an onnxruntime runner,
    or None when onnxruntime is missing."""
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
    import onnx

    proto = onnx.load(str(path))
    batch_dim = proto.graph.input[0].type.tensor_type.shape.dim[0]
    if not batch_dim.dim_param:  # the exporter fixed it (as it does for an example batch of one)
        raise ExportError(f"the ONNX graph's batch size is fixed at {batch_dim.dim_value}, not dynamic")
    if meta:
        for key, value in meta.items():
            entry = proto.metadata_props.add()
            entry.key, entry.value = key, value
        onnx.save(proto, str(path))
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
    inputs: str = "pixels",
    say: Callable[[str], None] | None = None,
) -> ExportReport:
    """Exports the checkpoint ``spec`` names (latest | best | run dir | file) as ``fmt``.

    ``say``, if given, hears one line as the export starts (tracing and checking take
    seconds to a minute, with nothing else to show).

    ``inputs="pixels"`` puts the dataset's normalisation into the graph (input: pixels
    in [0, 1]); ``"normalised"`` leaves it to the caller. The parity check feeds the
    export stored test images and compares it with the eager model on what the data
    pipeline makes of them, so it checks the normalisation too.

    The file is written beside its final name and moved there only once its parity
    check passes, so an export that fails leaves whatever was there before; an
    existing file is replaced only with ``overwrite``.
    """
    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r}; choose one of: {', '.join(FORMATS)}")
    if inputs not in INPUTS:
        raise ExportError(f"unknown --inputs {inputs!r}; choose one of: {', '.join(INPUTS)}")
    if out is not None:
        named = {Path(name).suffix: other for other, name in FORMATS.items()}.get(Path(out).suffix.lower())
        if named is not None and named != fmt:
            suffix = Path(FORMATS[fmt]).suffix

            def article(word: str) -> str:  # "an onnx", "a pt2", "an .onnx", "a .pt2"
                return "an" if word.lstrip(".")[:1] in "aeio" else "a"

            raise ExportError(
                f"--out {out} names {article(named)} {named} file but --format is {fmt}; "
                f"give --format {named}, or {article(suffix)} {suffix} name"
            )
        suffix = Path(FORMATS[fmt]).suffix
        if Path(out).suffix and Path(out).suffix.lower() != suffix:  # model.txt: no program would open it
            raise ExportError(
                f"--out {out}: {fmt} exports are {suffix} files; give a name ending in {suffix} "
                f"(or one with no suffix, which gets it: --out {Path(out).with_suffix('')})"
            )
    ckpt_path = resolve_checkpoint(spec, out_dir)
    ckpt = load_checkpoint(ckpt_path)
    # The default (fast) routing is what gets exported: while torch.export traces,
    # it runs the whole batch through plain differentiable operations (no in-place
    # writes, no custom autograd function, no cached geometry), which decompose into
    # ATen and ONNX operators under a symbolic batch size.
    model = build_model_from_checkpoint(ckpt, ckpt_path).eval()
    run = run_name_of(ckpt_path, ckpt)
    path = Path(out) if out is not None else default_export_path(run or "run", fmt, exports_dir)
    if path.is_dir():
        raise ExportError(f"--out {path} is a folder: give a file name, such as {path / FORMATS[fmt]}")
    if not path.suffix:  # --out model: model.onnx, as the format says
        path = path.with_name((path.name.rstrip(".") or path.name) + Path(FORMATS[fmt]).suffix)
        if path.is_dir():  # --out model where model.onnx is a folder
            raise ExportError(f"--out {path} is a folder: give a file name, such as {path / FORMATS[fmt]}")
    if path.exists() and not overwrite:
        raise ExportError(f"{path} already exists; --overwrite replaces it, or give another --out")
    from capsnet.data import tidy_made_folders

    # an export that fails or is stopped leaves no folder it made behind it
    with tidy_made_folders(path.parent):
        return _export_to(path, fmt, ckpt, ckpt_path, model, run, data_root, batch_size, inputs, say)


def _export_to(
    path: Path,
    fmt: str,
    ckpt: dict,
    ckpt_path: Path,
    model: nn.Module,
    run: str | None,
    data_root: str | None,
    batch_size: int,
    inputs: str,
    say: Callable[[str], None] | None,
) -> ExportReport:
    """:func:`export_checkpoint` once its arguments are checked: writes ``path`` or nothing."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ExportError(
            f"cannot write {path}: cannot make its folder {path.parent}: {e.strerror or e}"
        ) from None

    # the parity check never downloads a dataset: without the data it uses random images
    overrides = ["train.device=cpu", "data.download=false"] + (
        [f"data.root={data_root}"] if data_root else []
    )
    cfg = stored_config(ckpt["config"], ckpt_path, overrides)
    rebase_data_paths(cfg, ckpt, ckpt_path, {"data.root"} if data_root else set())
    data_info = ckpt.get("data_info") if isinstance(ckpt.get("data_info"), dict) else None
    inputs_spec = input_spec(inputs, ckpt["arch"], data_info, cfg.data.name)
    # the pipeline's side of the parity check takes the checkpoint's normalisation as the data module
    # reads it, not as input_spec does, so the graph's own copy of it is checked too
    names = trained_class_names(ckpt)
    pixels, fed, source = sample_batch(
        cfg, inputs_spec, max(2, batch_size), trained_normalisation(ckpt), names
    )
    if len(pixels) < 2:  # a test split of one image: traced alone, the batch size would be fixed at 1
        pixels, fed = pixels.repeat(2, 1, 1, 1), fed.repeat(2, 1, 1, 1)
    x = pixels if inputs == "pixels" else fed
    half = max(1, len(x) // 2 - 1)
    batches, fed_batches = [x, x[:half]], [fed, fed[:half]]
    module = Classifier(model, Preprocess(inputs_spec) if inputs == "pixels" else None).eval()
    with torch.no_grad():
        reference = [Classifier(model)(b) for b in fed_batches]  # eager first: also warms the model's caches
    meta = metadata(inputs_spec, ckpt, names or [], run)
    try:  # the file is written beside its name, so this is where a folder that takes no files shows
        handle, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix)
    except OSError as e:
        raise ExportError(f"cannot write {path}: {e.strerror or e}") from None
    os.close(handle)
    partial = Path(name)
    os.chmod(partial, 0o666 & ~current_umask())  # mkstemp makes it private; an export is an ordinary file
    if say is not None:
        say(
            f"exporting {ckpt_path} to {fmt}, then checking it against the eager model on batches {source} ..."
        )
    try:
        try:
            exporter = export_pt2 if fmt == "pt2" else export_onnx
            runner = exporter(module, x, partial, meta)
        except Exception as e:
            if _caused_by_interrupt(e):  # Ctrl-C inside an exporter that wraps what it meets
                raise KeyboardInterrupt from None
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise ExportError(f"{fmt} export of {ckpt_path} failed: {first[:300]}") from e
        if runner is None:
            os.replace(partial, path)
            return ExportReport(
                path, fmt, ckpt_path, None, [], source, inputs_spec, "onnxruntime is not installed"
            )
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
    return ExportReport(path, fmt, ckpt_path, diff, [len(b) for b in batches], source, inputs_spec)
