"""Classifying image files with a trained checkpoint (``capsnet predict``).

Each file is decoded as the image-folder data pipeline decodes its files (turned
upright by its EXIF orientation, converted to grey or RGB as the model takes),
resized to the side the model's preprocessing starts from as the run's dataset
resized its images (without keeping the aspect ratio: PIL's bilinear resampling
for image folders, bilinear interpolation with antialiasing for MNIST,
Fashion-MNIST, CIFAR-10 and SVHN, area averaging for smallNORB), then given the
evaluation transform the model was scored with: the per-channel normalisation its
checkpoint records, or smallNORB's per-image standardisation and centre crop.
Nothing of the training data is read. Files are decoded and classified a batch at
a time, so a folder of any size fits in memory.
"""

from __future__ import annotations

import csv
import io
import math
import os
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from capsnet.data import DataError, DataFormatError, DatasetNotFoundError, DataWarning, visible_files
from capsnet.tracking import averaged_steps_text, counted, listed


@dataclass(frozen=True)
class InputPipeline:
    """How an image file becomes what a checkpoint's model takes."""

    mode: str  # PIL mode the file is converted to: "L" or "RGB"
    source_size: int  # side the file is resized to, where the evaluation transform starts
    model_size: int  # side the model sees
    transform: Callable[[np.ndarray], torch.Tensor]  # uint8 (C, S, S) -> float32 (C, H, W)
    description: str
    dark_ground: str | None = None  # the dataset's name where its images are light objects on black
    #: uint8 (C, H, W) of any size -> (C, S, S), as the run's dataset resized its images; None: PIL's
    #: bilinear resampling as the file is decoded (image folders)
    resize: Callable[[np.ndarray], np.ndarray] | None = None

    @property
    def channels(self) -> int:
        return 1 if self.mode == "L" else 3


def input_pipeline(ckpt: dict[str, Any]) -> InputPipeline:
    """The :class:`InputPipeline` of a checkpoint's model, from the checkpoint alone.

    Raises DataError where image files cannot be made into its inputs: a model of
    stereo pairs (2 channels), or a checkpoint that does not record the
    normalisation its model was trained with.
    """
    from capsnet.checkpoint import trained_normalisation
    from capsnet.data import PixelTransform, StandardisedCrop, smallnorb_source_size

    arch = ckpt["arch"]
    channels, size = int(arch["in_channels"]), int(arch["image_size"])
    data_name = str(((ckpt.get("config") or {}).get("data") or {}).get("name", ""))
    if channels not in (1, 3):
        raise DataError(
            f"the model takes {channels}-channel images (smallNORB's stereo pairs with data.stereo: "
            "channels, say), which an image file does not hold; only grey or RGB models classify files"
        )
    mode = "L" if channels == 1 else "RGB"
    kind = "grey" if channels == 1 else "RGB"
    resize = dataset_resize(data_name, smallnorb_source_size(size) if data_name == "smallnorb" else size)
    stats = trained_normalisation(ckpt)
    if stats is not None:
        mean, std = stats
        if len(mean) != channels:
            raise DataError(
                f"the checkpoint's normalisation has {len(mean)} channel(s) but its model takes {channels}"
            )
        return InputPipeline(
            mode,
            size,
            size,
            PixelTransform(mean, std),
            f"{kind}, resized to {size}x{size}, normalised with the mean and std of the run's training images",
            data_name if data_name in DARK_GROUND else None,
            resize,
        )
    if data_name == "smallnorb":
        source = smallnorb_source_size(size)
        crop = f", centre {size}x{size} crop" if source != size else ""
        return InputPipeline(
            mode,
            source,
            size,
            StandardisedCrop(size),
            f"{kind}, resized to {source}x{source}, standardised per image{crop}",
            resize=resize,
        )
    raise DataError(
        "the checkpoint does not record the normalisation its model was trained with (it was written "
        "by an older capsnet), so image files cannot be prepared as its training images were"
    )


#: Datasets whose images are light objects on a black ground (dark-on-light pictures need --invert)
DARK_GROUND = ("mnist", "fashion-mnist")
#: Datasets whose images are resized by bilinear interpolation with antialiasing (capsnet.data.resize_images)
INTERPOLATED = ("mnist", "fashion-mnist", "cifar10", "svhn")


def dataset_resize(data_name: str, size: int) -> Callable[[np.ndarray], np.ndarray] | None:
    """uint8 (C, H, W) -> (C, size, size) as the dataset ``data_name`` resizes its images to ``size``;
    None where that is PIL's bilinear resampling of the decoded file (image folders, and the
    synthetic images, which are made at their size)."""
    from capsnet.data import resize_images
    from capsnet.smallnorb import downsample

    if data_name in INTERPOLATED:
        return lambda x: resize_images(torch.from_numpy(x)[None], size)[0].numpy()
    if data_name == "smallnorb":
        return lambda x: downsample(x[None], size)[0].numpy()
    return None


def light_ground(pixels: np.ndarray) -> bool:
    """Whether an image's outer ring (2 px at 28 px) is light on average: a dark-on-light picture.

    Of the 10,000 Fashion-MNIST test images, 2 have a ring that light, where 548 are light on
    average over the whole image (a pullover that fills the frame)."""
    side = pixels.shape[-1]
    ring = max(1, round(side / 14))
    inner = pixels[..., ring:-ring, ring:-ring].astype(np.float64)
    total = pixels.astype(np.float64).sum() - inner.sum()
    return total / (pixels.size - inner.size) > 127.5


def image_suffixes() -> set[str]:
    """The file name endings of the formats PIL reads (".png", ".jpg", ...), lower case; not those
    it only writes (".pdf", ".palm"). MPO files are read by its JPEG reader."""
    from PIL import Image

    formats = Image.registered_extensions()  # initialises the plugins, and so Image.OPEN
    return {suffix.lower() for suffix, fmt in formats.items() if fmt in Image.OPEN or fmt == "MPO"}


#: Endings of the files that hold a model's weights (capsnet's checkpoints are .pt), never images
CHECKPOINT_SUFFIXES = (".pt", ".pth")


def list_images(paths: list[str | Path]) -> list[Path]:
    """The image files that ``paths`` name: files as given (whatever their name), and the files
    under folders (recursively, sorted, hidden ones left out) whose names end as an image format
    PIL reads. Each file once, in the order given. Raises DataError for a path that does not
    exist, a folder with no image files, a checkpoint or run folder (which belongs to --ckpt),
    or no paths at all, and OSError for a folder that cannot be read."""
    from capsnet.checkpoint import has_checkpoint

    if not paths:
        raise DataError("no images given: name image files or folders of them")
    suffixes = image_suffixes()
    found: list[Path] = []
    seen: set[Path] = set()
    for given in paths:
        path = Path(given).expanduser()
        # a checkpoint put where the images go would be skipped, and the images classified by another model
        if path.is_file() and path.suffix.lower() in CHECKPOINT_SUFFIXES:
            raise DataError(f"{path} is a checkpoint, not an image: give it as --ckpt {path}")
        if path.is_dir() and has_checkpoint(path):
            raise DataError(f"{path} is a run folder, not a folder of images: give it as --ckpt {path}")
        if path.is_dir():
            with os.scandir(path):  # a folder that cannot be read is said, not searched as an empty one
                pass
            unreadable: list[str] = []
            said = unreadable.append
            files = visible_files(path, onerror=lambda e, said=said: said(e.filename))
            inside = [p for p in files if p.suffix.lower() in suffixes]
            if unreadable:  # below the folder given: its other images are still classified
                warnings.warn(
                    f"skipped {counted(len(unreadable), 'folder')} that could not be read: {listed(unreadable)}",
                    DataWarning,
                    stacklevel=2,
                )
            if not inside:
                raise DatasetNotFoundError(
                    f"{path} holds no image files (looked for {', '.join(sorted(suffixes)[:6])}, ... "
                    "in it and its sub-folders)",
                    searched=[path],
                )
        elif path.exists():
            inside = [path]
        else:
            raise DatasetNotFoundError(f"{path}: no such file or folder", searched=[path])
        for p in inside:
            key = p.resolve()
            if key not in seen:
                seen.add(key)
                found.append(p)
    return found


def printable(path: str) -> str:
    """``path`` as text any terminal takes: the bytes of a file name that are not UTF-8 as \\xNN."""
    return path.encode(errors="surrogateescape").decode(errors="backslashreplace")


@dataclass
class PredictionReport:
    """The class activations of each image file, with what they came from."""

    checkpoint: str
    run: str
    step: int | None
    class_names: list[str]
    input: str  # how the files were prepared
    device: str
    iterations: int
    files: list[str] = field(default_factory=list)
    activations: list[list[float]] = field(default_factory=list)  # per file, per class
    skipped: list[str] = field(default_factory=list)  # files that are not readable images
    top: int = 3
    mirrored: bool = False
    inverted: bool = False
    averaged_steps: list[int] | None = None  # an averaged checkpoint's (capsnet average): its steps

    def ranked(self, i: int) -> list[tuple[str, float]]:
        """The ``top`` most active classes of file ``i``, most active first (ties: lower index)."""
        acts = self.activations[i]
        order = sorted(range(len(acts)), key=lambda k: (-acts[k], k))[: self.top]
        return [(self.class_names[k], acts[k]) for k in order]

    def to_dict(self) -> dict[str, Any]:
        images = []
        for i, path in enumerate(self.files):
            ranked = self.ranked(i)
            images.append(
                {
                    "path": path,
                    "class": ranked[0][0],
                    "class_index": self.class_names.index(ranked[0][0]),
                    "activation": ranked[0][1],
                    "top": [{"class": name, "activation": act} for name, act in ranked],
                    "activations": dict(zip(self.class_names, self.activations[i])),
                }
            )
        return {
            "checkpoint": self.checkpoint,
            "run": self.run,
            "step": self.step,
            **({"averaged_steps": self.averaged_steps} if self.averaged_steps else {}),
            "classes": self.class_names,
            "iterations": self.iterations,
            "input": self.input,
            "inverted": self.inverted,
            "mirrored": self.mirrored,
            "device": self.device,
            "images": images,
            "skipped": self.skipped,
        }

    def summary(self) -> str:
        step = f", step {self.step}" if self.step is not None else ""
        if self.averaged_steps:
            step = f", {averaged_steps_text(self.averaged_steps)}"
        extras = [
            *(["inverted"] if self.inverted else []),
            *(["averaged with the left-right mirror"] if self.mirrored else []),
        ]
        classes = counted(len(self.class_names), "class", "classes")
        head = (
            f"{self.checkpoint} (run {self.run}{step}, {classes}, "
            f"{counted(self.iterations, 'routing iteration')}): {counted(len(self.files), 'image')}"
        )
        lines = [head, f"input: {self.input}{''.join('; ' + e for e in extras)}"]
        shown = [printable(p) for p in self.files]
        width = min(60, max([5, *(len(p) for p in shown)]))  # longer paths are shown whole
        name_width = max([5, *(len(n) for n in self.class_names)])
        columns = f"{'image':<{width}}  {'class':<{name_width}}  activation"
        lines.append(columns + ("  next" if self.top > 1 else ""))
        for i, path in enumerate(shown):
            ranked = self.ranked(i)
            row = f"{path:<{width}}  {ranked[0][0]:<{name_width}}  {ranked[0][1]:10.4f}"
            if len(ranked) > 1:
                row += "  " + ", ".join(f"{name} {act:.4f}" for name, act in ranked[1:])
            lines.append(row)
        return "\n".join(lines)

    def csv_text(self) -> str:
        """One row per file: path, predicted class, its activation, then every class's activation."""
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(["image", "class", "activation", *self.class_names])
        for i, path in enumerate(self.files):
            name, act = self.ranked(i)[0]
            writer.writerow([path, name, f"{act:.6g}", *(f"{a:.6g}" for a in self.activations[i])])
        return out.getvalue()


def _decode_batch(files: list[Path], pipe: InputPipeline, invert: bool) -> list[np.ndarray | None]:
    """uint8 (C, S, S) per file (None where the file is not a readable image), decoded in parallel."""
    from capsnet.data import decode_image, quiet_pil

    def one(path: Path) -> np.ndarray | None:
        array = decode_image(path, pipe.source_size if pipe.resize is None else None, pipe.mode)  # (H, W, C)
        if array is None:
            return None
        array = np.ascontiguousarray(array.transpose(2, 0, 1))
        if pipe.resize is not None:
            array = pipe.resize(array)  # (C, S, S)
        return 255 - array if invert else array

    with quiet_pil(), ThreadPoolExecutor(max_workers=min(len(files), os.cpu_count() or 1) or 1) as pool:
        return list(pool.map(one, files))


def predict_files(
    spec: str,
    paths: list[str | Path],
    out_dir: str | Path = "weights/em_capsules",
    device: str = "auto",
    batch_size: int = 64,
    top: int = 3,
    invert: bool = False,
    mirror: bool = False,
    show_progress: bool = False,
) -> PredictionReport:
    """Classifies the image files that ``paths`` name (files, or folders searched recursively)
    with the checkpoint ``spec`` names (latest | best | run dir | file | run name).

    Files that are not readable images are left out with one DataWarning; none readable is a
    DataFormatError. ``mirror`` averages each image's class activations with its left-right
    mirror's (for models trained with horizontal flips); ``invert`` turns each pixel p into
    255 - p first (dark objects on a light ground, for models of MNIST or Fashion-MNIST, whose
    images are light on black).
    """
    from capsnet.checkpoint import (
        CheckpointError,
        build_model_from_checkpoint,
        load_checkpoint,
        resolve_checkpoint,
        run_name_of,
        trained_class_names,
    )
    from capsnet.evaluate import autocast, resolve_device
    from capsnet.tracking import progress

    if batch_size < 1:
        raise DataError(f"--batch-size must be at least 1, not {batch_size}")
    if top < 1:
        raise DataError(f"--top must be at least 1, not {top}")
    files = list_images(paths)  # a typo in a path is said before the checkpoint loads
    dev = resolve_device(device, option="--device")
    path = resolve_checkpoint(spec, out_dir)
    ckpt = load_checkpoint(path)
    pipe = input_pipeline(ckpt)
    model = build_model_from_checkpoint(ckpt, path).to(dev).eval()
    if mirror:
        from capsnet.config import stored_config
        from capsnet.data import warn_if_mirror_unlearned

        warn_if_mirror_unlearned(stored_config(ckpt["config"], path, []).data)
    names = trained_class_names(ckpt) or []
    if len(names) != model.num_classes:
        names = [str(k) for k in range(model.num_classes)]
    precision = str(((ckpt.get("config") or {}).get("train") or {}).get("precision", "fp32"))
    report = PredictionReport(
        checkpoint=str(path),
        run=run_name_of(path, ckpt),
        step=int(ckpt["step"]) if isinstance(ckpt.get("step"), int) else None,
        class_names=names,
        input=pipe.description,
        device=str(dev),
        iterations=int(model.hparams["iterations"]),
        top=min(top, len(names)),
        mirrored=mirror,
        inverted=invert,
        averaged_steps=(ckpt.get("averaged") or {}).get("steps"),
    )
    light = 0  # images on a light ground where the model knows light objects on black
    starts = range(0, len(files), batch_size)
    for start in progress(starts, total=len(starts), enabled=show_progress, desc="predict"):
        chunk = files[start : start + batch_size]
        decoded = _decode_batch(chunk, pipe, invert)
        report.skipped += [str(p) for p, a in zip(chunk, decoded) if a is None]
        kept = [(p, a) for p, a in zip(chunk, decoded) if a is not None]
        if pipe.dark_ground and not invert:
            light += sum(light_ground(a) for _, a in kept)
        if not kept:
            continue
        x = torch.stack([pipe.transform(a) for _, a in kept]).to(dev)  # (N, C, H, W)
        with torch.no_grad(), autocast(dev, precision):
            acts = model(x).activations.float()
            if mirror:
                acts = (acts + model(x.flip(-1)).activations.float()) / 2
        report.files += [str(p) for p, _ in kept]
        report.activations += acts.cpu().tolist()
    if report.skipped and (report.files or len(files) > 1):  # else the error below names the one file
        warnings.warn(
            f"skipped {counted(len(report.skipped), 'unreadable or non-image file')}: {listed(report.skipped)}",
            DataWarning,
            stacklevel=2,
        )
    if light:
        warnings.warn(
            f"{light} of the {counted(len(report.files), 'image')} {'is' if light == 1 else 'are'} on a "
            f"light ground, but {pipe.dark_ground} "
            "images are light objects on black: --invert turns dark-on-light pictures into those",
            DataWarning,
            stacklevel=2,
        )
    if not report.files:
        raise DataFormatError(
            f"none of the {counted(len(files), 'file')} given is a readable image"
            if len(files) > 1
            else f"{files[0]} is not a readable image"
        )
    bad = [report.files[i] for i, acts in enumerate(report.activations) if not all(map(math.isfinite, acts))]
    if bad:  # said, not ranked
        raise CheckpointError(f"the class activations of {path}'s model are not finite for {bad[0]}")
    return report
