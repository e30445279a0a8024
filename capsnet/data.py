"""Datasets and loaders.

Every dataset keeps its images in memory as a uint8 tensor ``(N, C, H, W)``
and converts one item at a time to ``(float32 (C, H, W), int label)``, so a
loader spends microseconds per image and no PIL call is in the hot path.

Where the data comes from (``data.name``):

* ``mnist``, ``fashion-mnist``: the four IDX files, read by :func:`read_idx`,
  found in ``data.root``, ``root/<name>``, ``root/<name>/raw``, torchvision's
  ``root/<MNIST|FashionMNIST>/raw``, then the system folders of
  :data:`SYSTEM_DATA_DIRS` (Debian's ``dataset-fashion-mnist`` package), then
  downloaded by torchvision when ``data.download`` is true.
* ``cifar10``: the python release's pickled batches (:func:`read_cifar_batch`);
  ``svhn``: torchvision's reader; on ``root`` or ``root/<name>`` first,
  downloaded by torchvision to ``root`` only when allowed.
* ``smallnorb``: the official binary-matrix files (:mod:`capsnet.smallnorb`).
* ``folder``: the user's own images, one sub-folder per class.
* ``synthetic``: learnable random patterns generated from the seed.

Resizing (``data.image_size`` different from the dataset's own size) is done
once at build time by bilinear interpolation with antialiasing, never by
padding or cropping, so the whole image is kept. smallNORB is the exception:
there ``image_size`` is the crop size (see :func:`_build_smallnorb`).
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import math
import os
import pickle
import struct
import sys
import warnings
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from capsnet.config import Config, ConfigError, DataConfig
from capsnet.distributed import rank_seed
from capsnet.tracking import counted, listed

# --------------------------------------------------------------------------- public types


class DataError(Exception):
    """A data problem the user can fix; the message says what and how."""


class DatasetNotFoundError(DataError):
    """The files are nowhere on disk and could not be downloaded; ``searched`` lists where we looked."""

    def __init__(self, message: str, searched: list[Path] | tuple[Path, ...] = ()):
        super().__init__(message)
        self.searched = list(searched)


class DataFormatError(DataError):
    """A file exists but is not what it should be (magic number, size, decoding, channels)."""


class DataWarning(UserWarning):
    """Data was usable but not all of it (skipped files); commands show it as a ``warning:`` line
    (:func:`reported_data_warnings`)."""


@contextlib.contextmanager
def reported_data_warnings(say: Callable[[str], None] | None = None):
    """Shows each DataWarning raised inside as one ``warning: ...`` line through ``say`` (default:
    on stderr, which keeps a command's stdout for its results) instead of as a Python warning with
    its source file and line; other warnings go on as they came. The lines are shown even when the
    block fails, so a data error follows the files that were skipped on the way to it."""
    if say is None:

        def say(line: str) -> None:
            print(line, file=sys.stderr, flush=True)

    caught: list[warnings.WarningMessage] = []
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", DataWarning)
            yield
    finally:
        for w in caught:
            if issubclass(w.category, DataWarning):
                say(f"warning: {w.message}")
            else:
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)


@dataclass
class DataInfo:
    num_classes: int
    channels: int
    image_size: int  # square side the model sees (after crop/resize)
    class_names: list[str]
    mean: list[float] | None = None  # per-channel normalisation; None: per-image standardisation
    std: list[float] | None = None
    #: the folder the image files were read from, where one folder holds them all (the IDX datasets,
    #: which may be found outside data.root: SYSTEM_DATA_DIRS); None otherwise
    source: str | None = None
    #: how an image folder without data.test_dir chose its held-out test files: "by-name" (each
    #: file by its own name, :func:`held_out_by_name`); None for every other dataset
    test_split: str | None = None


#: A per-channel input normalisation, ``(mean, std)`` in [0, 1] units: what a trained model's
#: checkpoint records (``data_info``) and :func:`build_datasets` can take instead of computing it.
Normalisation = tuple[list[float], list[float]]


def data_sizes(loaders: Loaders) -> dict[str, int]:
    """How many images each split of ``loaders`` holds (val: 0 without one): what a checkpoint
    records, so that a run resumed on other data says so."""
    return {
        "train": len(loaders.train.dataset),
        "val": len(loaders.val.dataset) if loaders.val is not None else 0,
        "test": len(loaders.test.dataset),
    }


def held_out_digest(loaders: Loaders) -> str | None:
    """A digest of the validation images, pixels and labels (None without a validation split): what
    a checkpoint records beside :func:`data_sizes`, so that a resume on a split that now holds
    other images is told even where the counts did not change (an image folder's files swapped)."""
    dataset = loaders.val.dataset if loaders.val is not None else None
    if not isinstance(dataset, ImageDataset):
        return None
    rows = dataset.rows()
    digest = hashlib.sha256(dataset.images[rows].numpy().tobytes())
    digest.update(dataset.labels[rows].numpy().tobytes())
    return digest.hexdigest()[:32]


def size_changes(before: dict[str, int], now: dict[str, int], splits: tuple[str, ...] | None = None) -> str:
    """The splits of ``splits`` (default: all of ``now``) whose image counts differ between two
    :func:`data_sizes`, as "train 18 -> 24, val 6 -> 8"."""
    return ", ".join(
        f"{k} {before.get(k, '?')} -> {now[k]}" for k in (splits or tuple(now)) if before.get(k) != now[k]
    )


@dataclass
class Loaders:
    train: DataLoader
    val: DataLoader | None
    test: DataLoader
    info: DataInfo
    train_sampler: Sampler | None  # the epoch's shuffled order (all ranks); call set_epoch on it
    train_generator: torch.Generator | None = None  # loader state (worker seeds); save/restore it to resume
    extra: dict[str, DataLoader] = field(default_factory=dict)  # e.g. smallNORB "test_familiar"


DATASETS = ("mnist", "fashion-mnist", "cifar10", "svhn", "smallnorb", "folder", "synthetic")

#: Folders searched after ``data.root``; Debian's dataset-fashion-mnist package installs the first.
SYSTEM_DATA_DIRS: dict[str, list[Path]] = {
    "fashion-mnist": [Path("/usr/share/datasets/fashion-mnist")],
    "mnist": [Path("/usr/share/datasets/mnist")],
}


def check_channels(info: DataInfo, expected: int, source: str = "the checkpoint's model") -> None:
    """Raises DataFormatError when the data's channel count is not what ``source`` expects."""
    if info.channels != expected:
        raise DataFormatError(
            f"{source} expects {expected}-channel images but this data has {info.channels} "
            f"channel(s); use data that matches (e.g. data.grayscale or data.stereo) or another checkpoint."
        )


def split_names(cfg: DataConfig) -> list[str]:
    """Names of the splits :func:`build_loaders` makes for ``cfg``, in order."""
    names = ["train"] + (["val"] if cfg.val_split > 0 else []) + ["test"]
    if cfg.name == "smallnorb" and cfg.split != "standard":
        names.append("test_familiar")
    return names


# --------------------------------------------------------------------------- per-item transforms
#
# Transforms take one uint8 numpy image (C, H, W) and return a float32 tensor.
# They work in numpy and draw all of an item's random numbers with one torch
# call: torch's per-operation overhead would otherwise cost more than the work
# on an image this small. Random numbers come from torch's generator, which
# DataLoader seeds per worker from the loader's generator.


class PixelTransform:
    """uint8 (C, H, W) -> float32 (C, H, W): ``(x / 255 - mean) / std`` per channel.

    Training options: a random crop of the image zero-padded by ``padding`` on
    every side (a shift of up to ``padding`` pixels, padding with black), a
    horizontal flip with probability 1/2 (``flip``), and with probability
    ``erase`` one rectangle of random pixels (:func:`erased`). The normalisation
    is a lookup table, so the whole transform is a few numpy operations.
    """

    def __init__(
        self, mean: list[float], std: list[float], padding: int = 0, flip: bool = False, erase: float = 0.0
    ):
        levels = np.arange(256, dtype=np.float64) / 255.0
        mean_, std_ = np.asarray(mean, dtype=np.float64), np.asarray(std, dtype=np.float64)
        self.table = ((levels[None, :] - mean_[:, None]) / std_[:, None]).astype(np.float32)  # (C, 256)
        self.channel = np.arange(len(mean))[:, None, None]  # (C, 1, 1)
        self.padding = padding
        self.flip = flip
        self.erase = erase

    def __call__(self, x: np.ndarray) -> torch.Tensor:
        if self.padding or self.flip:
            draw = torch.rand(3).tolist()
            if self.padding:
                x = shifted(
                    x,
                    int(draw[0] * (2 * self.padding + 1)) - self.padding,
                    int(draw[1] * (2 * self.padding + 1)) - self.padding,
                )
            if self.flip and draw[2] < 0.5:
                x = x[:, :, ::-1]
        if self.erase and torch.rand(()).item() < self.erase:
            x = erased(x)
        return torch.from_numpy(self.table[self.channel, x])


#: Random erasing's draws (Zhong et al., "Random Erasing Data Augmentation", AAAI 2020):
#: the rectangle's share of the image, its height-to-width ratio (drawn uniformly in log
#: space between the two bounds), and how many draws may miss the image before it is left whole.
ERASE_AREA = (0.02, 0.4)
ERASE_ASPECT = (0.3, 1 / 0.3)
_ERASE_LOG_ASPECT = (math.log(ERASE_ASPECT[0]), math.log(ERASE_ASPECT[1]))
ERASE_TRIES = 10


def erased(x: np.ndarray) -> np.ndarray:
    """A copy of ``x`` (C, H, W) uint8 with one random rectangle replaced by uniform random levels.

    The rectangle covers a share of the image drawn from ``ERASE_AREA`` with an aspect
    ratio drawn from ``ERASE_ASPECT``; a draw that does not fit is drawn again, up to
    ``ERASE_TRIES`` times, after which the image is returned unchanged (as a copy).
    """
    _, height, width = x.shape
    out = np.array(x)  # never write into the dataset's own pixels (or a flipped view of them)
    log_low, log_high = _ERASE_LOG_ASPECT
    for _ in range(ERASE_TRIES):
        share, log_aspect, top, left = torch.rand(4).tolist()
        area = height * width * (ERASE_AREA[0] + share * (ERASE_AREA[1] - ERASE_AREA[0]))
        aspect = math.exp(log_low + log_aspect * (log_high - log_low))
        h, w = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
        if 0 < h <= height and 0 < w <= width:
            top, left = int(top * (height - h + 1)), int(left * (width - w + 1))
            noise = torch.randint(0, 256, (out.shape[0], h, w), dtype=torch.uint8).numpy()
            out[:, top : top + h, left : left + w] = noise
            return out
    return out


def shifted(x: np.ndarray, down: int, right: int) -> np.ndarray:
    """``x`` (C, H, W) moved ``down`` rows and ``right`` columns, zeros filling the gap."""
    if down == 0 and right == 0:
        return x
    _, height, width = x.shape
    out = np.zeros_like(x)
    if abs(down) >= height or abs(right) >= width:  # moved out of view entirely
        return out
    out[:, max(down, 0) : height + min(down, 0), max(right, 0) : width + min(right, 0)] = x[
        :, max(-down, 0) : height - max(down, 0), max(-right, 0) : width - max(right, 0)
    ]
    return out


def image_stats(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and standard deviation (C,) of an image (C, H, W), float64.

    The standard deviation is floored at 1/sqrt(H*W), so a flat image stays finite.
    """
    flat = x.reshape(x.shape[0], -1).astype(np.float64)  # (C, H*W)
    count = flat.shape[1]
    mean = flat.sum(1) / count
    var = np.maximum(np.einsum("ij,ij->i", flat, flat) / count - mean * mean, 0.0)
    return mean, np.maximum(np.sqrt(var), 1.0 / math.sqrt(count))


def per_image_standardise(x: np.ndarray) -> np.ndarray:
    """float32 (C, H, W): each channel of the image to zero mean and unit variance."""
    mean, std = image_stats(x)
    return ((x - mean[:, None, None]) / std[:, None, None]).astype(np.float32)


class StandardisedCrop:
    """uint8 (C, S, S) -> float32 (C, size, size), the smallNORB preprocessing.

    The image is standardised per channel with the statistics of the whole
    image (:func:`per_image_standardise`), then cropped: the centre for
    evaluation; a random window for training (``train``), followed by a random
    contrast factor in [1 - contrast, 1 + contrast] about zero (the
    standardised image's mean) and a brightness offset in [-brightness,
    brightness], both in units of the image's standard deviation. Standardising,
    cropping and jitter are one multiply-add on the crop.
    """

    def __init__(self, size: int, train: bool = False, brightness: float = 0.25, contrast: float = 0.25):
        self.size = size
        self.train = train
        self.brightness = brightness
        self.contrast = contrast

    def __call__(self, x: np.ndarray) -> torch.Tensor:
        mean, std = image_stats(x)
        room = x.shape[1] - self.size
        factor, offset = 1.0, 0.0
        if self.train:
            draw = torch.rand(4).tolist()
            top, left = int(draw[0] * (room + 1)), int(draw[1] * (room + 1))
            factor += (2 * draw[2] - 1) * self.contrast
            offset += (2 * draw[3] - 1) * self.brightness
        else:
            top = left = room // 2
        crop = x[:, top : top + self.size, left : left + self.size].astype(np.float32)
        scale = (factor / std).astype(np.float32)[:, None, None]
        shift = (offset - mean * factor / std).astype(np.float32)[:, None, None]
        return torch.from_numpy(crop * scale + shift)


# --------------------------------------------------------------------------- dataset


class ImageDataset(Dataset):
    """uint8 images ``(N, C, H, W)`` in memory; item i is ``(transform(image) float32, int label)``.

    ``indices`` selects rows (a subset shares the tensors). ``meta`` holds
    per-row arrays such as smallNORB viewpoints; :meth:`selected_meta` returns
    them aligned with the items. ``group`` > 1 means runs of that many
    consecutive rows belong together (the two views of a smallNORB pair) and
    must land in the same split. ``extra_splits`` holds further evaluation sets
    (smallNORB's "test_familiar").
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        transform: Callable[[np.ndarray], torch.Tensor],
        eval_transform: Callable[[np.ndarray], torch.Tensor] | None = None,
        indices: torch.Tensor | None = None,
        meta: dict[str, torch.Tensor] | None = None,
        group: int = 1,
    ):
        self.images = images  # (N, C, H, W) uint8
        self.labels = labels  # (N,) int64
        self.transform = transform
        self.eval_transform = eval_transform or transform
        self.indices = indices
        self.meta = meta or {}
        self.group = group
        self.extra_splits: dict[str, ImageDataset] = {}
        self._pixels = images.numpy()  # shares memory; numpy indexing is cheaper per item
        self._labels = labels.tolist()
        self._rows = indices.tolist() if indices is not None else None

    def __getstate__(self) -> dict[str, Any]:
        # Workers started by spawn/forkserver receive the tensor through shared memory; the numpy
        # view would be pickled by value, so it is rebuilt on arrival instead.
        state = self.__dict__.copy()
        del state["_pixels"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._pixels = self.images.numpy()

    def __len__(self) -> int:
        return len(self._rows) if self._rows is not None else len(self._labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        row = self._rows[i] if self._rows is not None else i
        return self.transform(self._pixels[row]), self._labels[row]

    @property
    def fixed_items(self) -> bool:
        """Whether item i is the same every time it is read (no random augmentation)."""
        return self.transform is self.eval_transform

    def pixels(self, i: int) -> np.ndarray:
        """Item ``i``'s stored image, uint8 (C, H, W), before any transform."""
        return self._pixels[self._rows[i] if self._rows is not None else i]

    def rows(self) -> torch.Tensor:
        """The image rows of the items, in item order."""
        return self.indices if self.indices is not None else torch.arange(len(self.images))

    @property
    def targets(self) -> torch.Tensor:
        """Labels of the items, in item order."""
        return self.labels[self.rows()]

    def selected_meta(self) -> dict[str, torch.Tensor]:
        """The ``meta`` arrays aligned with the items."""
        rows = self.rows()
        return {key: value[rows] for key, value in self.meta.items()}

    def subset(self, positions: torch.Tensor, evaluation: bool = False) -> ImageDataset:
        """The items at ``positions``; ``evaluation`` switches to the test-time transform."""
        return ImageDataset(
            self.images,
            self.labels,
            self.eval_transform if evaluation else self.transform,
            self.eval_transform,
            indices=self.rows()[positions],
            meta=self.meta,
            group=self.group,
        )


# --------------------------------------------------------------------------- helpers


def resize_images(images: torch.Tensor, size: int, chunk: int = 4096) -> torch.Tensor:
    """(N, C, H, W) uint8 -> (N, C, size, size) uint8, bilinear with antialiasing."""
    if images.shape[-2:] == (size, size):
        return images
    out = torch.empty((*images.shape[:2], size, size), dtype=torch.uint8)
    for start in range(0, len(images), chunk):
        block = images[start : start + chunk].float()
        block = F.interpolate(block, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        out[start : start + chunk] = block.round_().clamp_(0, 255).to(torch.uint8)
    return out


def channel_stats(images: torch.Tensor, chunk: int = 4096) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of uint8 images, in [0, 1] units."""
    channels = images.shape[1]
    total = torch.zeros(channels, dtype=torch.float64)
    squares = torch.zeros(channels, dtype=torch.float64)
    for start in range(0, len(images), chunk):
        block = images[start : start + chunk].double().div_(255.0).transpose(0, 1).flatten(1)
        total += block.sum(1)
        squares += block.square().sum(1)
    count = max(1, images.numel() // channels)
    mean = total / count
    std = (squares / count - mean.square()).clamp_min(1e-12).sqrt().clamp_min(1e-3)
    return mean.tolist(), std.tolist()


def split_indices(n: int, fraction: float, seed: int, group: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """(kept, held out) positions: a seeded random ``fraction`` of ``range(n)`` held out, both sorted.

    With ``group`` > 1, runs of ``group`` consecutive positions are kept together.
    """
    groups = n // group
    held = min(groups, max(1, round(fraction * groups))) if fraction > 0 else 0
    if held >= groups > 0:
        raise DataError(f"data.val_split={fraction} leaves no training data out of {n} samples")
    order = torch.randperm(groups, generator=torch.Generator().manual_seed(seed))
    held_groups, kept_groups = order[:held].sort().values, order[held:].sort().values
    offsets = torch.arange(group)

    def expand(g: torch.Tensor) -> torch.Tensor:
        return (g[:, None] * group + offsets).flatten()

    return expand(kept_groups), expand(held_groups)


def held_out_by_name(names: list[str], fraction: float) -> list[bool]:
    """Whether each of ``names`` (one class's files, named relative to data.train_dir) is held out.

    Each file's side is fixed by a hash of its own name, whatever else is in the folder, so that
    files added or removed after training never move a training image into the test set: a file
    is held out where its hash, read as a number in [0, 1), is below ``fraction``. A class of two
    or more files holds out at least one and keeps at least one (its lowest-hashed file is held
    out where none would be, its highest kept where all would be): there alone can a file added
    or removed move another.
    """
    scores = [int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big") / 2**64 for name in names]
    held = [score < fraction for score in scores]
    if len(names) > 1 and not any(held):
        held[scores.index(min(scores))] = True
    if len(names) > 1 and all(held):
        held[scores.index(max(scores))] = False
    return held


def fitting_rows(cfg: DataConfig, n: int, seed: int) -> torch.Tensor:
    """The rows of an ``n``-image training set that stay for training once :func:`build_datasets`
    holds out ``data.val_split`` of them: what normalisation statistics may be computed on."""
    if cfg.val_split <= 0:
        return torch.arange(n)
    return split_indices(n, cfg.val_split, seed)[0]


def one_line(error: BaseException, limit: int = 300) -> str:
    """An exception's message on one line, shortened to ``limit`` characters."""
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


@contextlib.contextmanager
def tidy_made_folders(*folders: Path):
    """On work that fails (a download, an export), removes those of ``folders`` (and of their
    parents) that did not exist before it and that it left empty, so that a failed attempt leaves
    no trace."""
    chain = {f for folder in folders for f in (folder, *folder.parents)}
    made = sorted((f for f in chain if not f.exists()), key=lambda f: len(f.parts), reverse=True)
    try:
        yield
    except BaseException:
        for folder in made:  # the deepest first, and only where empty
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise


def download_advice(allow_download: bool) -> str:
    """How to get a dataset that was not found: with downloads on, they failed for want of network."""
    if allow_download:
        return "a rerun with network access (data.download is true)"
    return "data.download=true with network access"


def _train_or_eval(augment: bool, train: Callable, evaluation: Callable) -> Callable:
    return train if augment else evaluation


#: Datasets whose training augmentation flips images left-right unless data.flip says otherwise.
FLIPPED_BY_DEFAULT = frozenset({"fashion-mnist", "cifar10"})


def trains_with_flips(cfg: DataConfig) -> bool:
    """Whether training sees random left-right flips (so that ``eval --mirror`` suits the model)."""
    if not cfg.augment or cfg.name in ("smallnorb", "synthetic"):
        return False
    return cfg.flip if cfg.flip is not None else cfg.name in FLIPPED_BY_DEFAULT


def warn_if_mirror_unlearned(cfg: DataConfig) -> None:
    """A DataWarning where ``--mirror`` is asked of a model whose training (data config ``cfg``,
    as stored with it) saw no left-right flips: the mirrored images are unlike those it learned
    from, and the mirrored score says little about the model."""
    if not trains_with_flips(cfg):
        warnings.warn(
            DataWarning(
                f"--mirror: this run did not train with left-right flips (data {cfg.name}, "
                f"data.augment {str(cfg.augment).lower()}, "
                f"data.flip {'null' if cfg.flip is None else str(cfg.flip).lower()}), so its mirrored "
                "images are unlike any it learned from; the mirrored score says little about it"
            ),
            stacklevel=2,
        )


def _training_transform(
    cfg: DataConfig, mean: list[float], std: list[float], size: int, shift: int
) -> PixelTransform:
    """The augmenting transform: the dataset's ``shift`` unless data.shift says otherwise, flips
    as :func:`trains_with_flips` says, random erasing with probability data.erase."""
    if cfg.shift is not None and cfg.shift >= size:
        raise ConfigError([f"data.shift: {cfg.shift} pixels is not smaller than the {size}-pixel images"])
    shift = shift if cfg.shift is None else cfg.shift
    return PixelTransform(mean, std, padding=shift, flip=trains_with_flips(cfg), erase=cfg.erase)


# --------------------------------------------------------------------------- IDX (mnist, fashion-mnist)

IDX_DTYPES = {0x08: "u1", 0x09: "i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
IDX_IMAGES_MAGIC = 0x00000803
IDX_LABELS_MAGIC = 0x00000801
IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


#: A compressed body is read in pieces of this size, so that a corrupt header
#: announcing terabytes costs no more memory than the data that is really there.
READ_PIECE = 64 << 20


def open_data_file(path: Path):
    """``path`` opened for reading, decompressed when it is gzip data, whatever its name says.

    Browsers and some mirrors keep a ``.gz`` name on a file they unpacked, or the
    other way round; the first two bytes (gzip's 1F 8B) decide.
    """
    with open(path, "rb") as f:
        gzipped = f.read(2) == b"\x1f\x8b"
    return gzip.open(path, "rb") if gzipped else open(path, "rb")


def read_body(f, path: str | Path, dims: tuple[int, ...], expected: int) -> bytes | bytearray:
    """The rest of ``f``, which its header says is ``expected`` bytes; DataFormatError where it is not.

    A plain file's size is checked before anything is read; a gzip stream is read
    piece by piece up to one byte past ``expected``.
    """
    if isinstance(f, gzip.GzipFile):
        body = bytearray()
        while len(body) <= expected:
            piece = f.read(min(READ_PIECE, expected + 1 - len(body)))
            if not piece:
                break
            body += piece
        length, found = len(body), (len(body) if len(body) < expected else f"more than {expected}")
    else:
        length = found = os.fstat(f.fileno()).st_size - f.tell()
        body = f.read(expected) if length == expected else b""  # the size is right: one read
    if length != expected:
        what = "truncated" if length < expected else "longer than its header says"
        raise DataFormatError(f"{path}: {what}: header says {dims} = {expected} bytes of data, found {found}")
    return body


def shaped_body(
    body: bytes | bytearray, dtype: np.dtype, dims: tuple[int, ...], path: str | Path
) -> np.ndarray:
    """``body`` (of the length :func:`read_body` checked) as an array ``dims``; DataFormatError where the
    header's dimensions describe no array NumPy can hold (one of them 0, others in the billions)."""
    try:
        return np.frombuffer(body, dtype=dtype).reshape(dims)
    except ValueError:
        raise DataFormatError(
            f"{path}: corrupt header: dimensions {dims} describe no array; the file is damaged: fetch it again"
        ) from None


def read_idx(path: str | Path, expected_magic: int | None = None) -> torch.Tensor:
    """Reads an IDX file (plain or ``.gz``) into a tensor of its element type.

    Checks the magic number (``expected_magic``, e.g. 0x00000803 for uint8
    images, 0x00000801 for uint8 labels), the dimensions and that the body has
    exactly the length the header announces; DataFormatError names the file.
    """
    path = Path(path)
    try:
        with open_data_file(path) as f:
            head = f.read(4)
            if len(head) < 4:
                raise DataFormatError(f"{path}: too short for an IDX header ({len(head)} bytes)")
            magic = int.from_bytes(head, "big")
            if expected_magic is not None and magic != expected_magic:
                raise DataFormatError(
                    f"{path}: wrong magic number 0x{magic:08X} (expected 0x{expected_magic:08X})"
                )
            if head[:2] != b"\0\0" or head[2] not in IDX_DTYPES or head[3] == 0:
                raise DataFormatError(f"{path}: not an IDX file (magic number 0x{magic:08X})")
            ndim = head[3]
            raw_dims = f.read(4 * ndim)
            if len(raw_dims) < 4 * ndim:
                raise DataFormatError(f"{path}: truncated header")
            dims = struct.unpack(f">{ndim}I", raw_dims)
            dtype = np.dtype(IDX_DTYPES[head[2]])
            expected = math.prod(dims) * dtype.itemsize
            body = read_body(f, path, dims, expected)
    except (OSError, EOFError, zlib.error) as e:
        raise DataFormatError(f"{path}: cannot read ({e})") from None
    array = shaped_body(body, dtype, dims, path)
    return torch.from_numpy(array.astype(dtype.newbyteorder("="), copy=True))


_IDX_META = {
    "mnist": {
        "torchvision": "MNIST",
        "mean": [0.1307],
        "std": [0.3081],
        "classes": [str(i) for i in range(10)],
        "apt": "",
        # the first ten labels of the released training and test files: MNIST and Fashion-MNIST
        # name their files alike, so these tell one dataset's files from the other's
        "first_labels": {"train": [5, 0, 4, 1, 9, 2, 1, 3, 1, 4], "test": [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]},
    },
    "fashion-mnist": {
        "torchvision": "FashionMNIST",
        "mean": [0.2860],
        "std": [0.3530],
        "classes": [
            "T-shirt/top",
            "Trouser",
            "Pullover",
            "Dress",
            "Coat",
            "Sandal",
            "Shirt",
            "Sneaker",
            "Bag",
            "Ankle boot",
        ],
        "apt": "sudo apt-get install dataset-fashion-mnist, ",
        "first_labels": {"train": [9, 0, 0, 3, 0, 2, 7, 2, 5, 5], "test": [9, 2, 1, 1, 6, 1, 4, 6, 5, 7]},
    },
}


def idx_search_dirs(name: str, root: str | Path) -> list[Path]:
    """Folders searched for the IDX files of ``name``, in order."""
    root = Path(root).expanduser()
    tv_name = _IDX_META[name]["torchvision"]
    return [root, root / name, root / name / "raw", root / tv_name / "raw", *SYSTEM_DATA_DIRS.get(name, [])]


def _find_idx_files(folder: Path) -> dict[str, Path] | None:
    found = {}
    for key, stem in IDX_FILES.items():
        for candidate in (folder / stem, folder / f"{stem}.gz"):
            if candidate.is_file():
                found[key] = candidate
                break
        else:
            return None
    return found


def locate_idx(name: str, root: str | Path, allow_download: bool) -> dict[str, Path]:
    """Paths of the four IDX files of ``name``; downloads with torchvision when allowed."""
    dirs = idx_search_dirs(name, root)
    others: list[dict[str, Path]] = []  # the other dataset's files, found under the same names
    for folder in dirs:
        files = _find_idx_files(folder)
        if files is not None and _another_datasets_files(name, files):
            others.append(files)
        elif files is not None:
            return files
    if others:  # where no folder holds name's own, the refusal says whose they are
        return others[0]
    reason = "data.download is false"
    if allow_download:
        try:
            import torchvision.datasets

            folder = Path(root).expanduser() / _IDX_META[name]["torchvision"]
            with tidy_made_folders(folder / "raw", folder / "processed"):
                getattr(torchvision.datasets, _IDX_META[name]["torchvision"])(
                    str(root), train=True, download=True
                )
            files = _find_idx_files(folder / "raw")
            if files is not None:
                return files
            reason = "the download finished but the files are not where torchvision puts them"
        except Exception as e:  # noqa: BLE001 - network and archive errors come in many types
            reason = f"download failed: {one_line(e)}"
    looked = ", ".join(str(d) for d in dirs)
    raise DatasetNotFoundError(
        f"{name} not found (looked in: {looked}; {reason}).\n"
        f"Get it with: {_IDX_META[name]['apt']}{download_advice(allow_download)}, or put the "
        f"4 IDX files ({', '.join(s + '[.gz]' for s in IDX_FILES.values())}) in data.root/{name}.",
        searched=dirs,
    )


def _read_idx_split(
    images_path: Path, labels_path: Path, num_classes: int
) -> tuple[torch.Tensor, torch.Tensor]:
    images = read_idx(images_path, IDX_IMAGES_MAGIC)
    labels = read_idx(labels_path, IDX_LABELS_MAGIC)
    if images.ndim != 3 or 0 in images.shape[1:]:
        raise DataFormatError(f"{images_path}: expected (N, H, W) images, header says {tuple(images.shape)}")
    if images.shape[1] != images.shape[2]:  # resizing to the model's square would stretch them
        raise DataFormatError(
            f"{images_path}: images of {images.shape[1]}x{images.shape[2]} pixels (height x width); "
            "MNIST and Fashion-MNIST images are square, and so must these be"
        )
    if labels.ndim != 1 or len(labels) != len(images):
        raise DataFormatError(
            f"{labels_path}: {len(labels)} labels for {len(images)} images in {images_path}"
        )
    if len(labels) and int(labels.max()) >= num_classes:
        raise DataFormatError(f"{labels_path}: label {int(labels.max())} is not below {num_classes}")
    return images.unsqueeze(1), labels.long()  # (N, 1, H, W)


def _another_datasets_files(name: str, files: dict[str, Path]) -> bool:
    """Whether the training labels of ``files`` are another IDX dataset's (see
    :func:`refuse_another_datasets_labels`); a file that cannot be read is left to the reading."""
    try:
        labels = read_idx(files["train_labels"], IDX_LABELS_MAGIC)
    except DataFormatError:
        return False
    return _labels_of_another(name, "train", labels) is not None


def _labels_of_another(name: str, split: str, labels: torch.Tensor) -> str | None:
    """The IDX dataset other than ``name`` whose released ``split`` labels begin as ``labels`` do, or None."""
    for other, meta in _IDX_META.items():
        if (
            other != name
            and labels[: len(meta["first_labels"][split])].tolist() == meta["first_labels"][split]
        ):
            return other
    return None


def refuse_another_datasets_labels(name: str, path: Path, split: str, labels: torch.Tensor) -> None:
    """Refuses ``labels`` (the ``split`` labels read from ``path`` for the dataset ``name``) where they
    begin as the released file of another IDX dataset does: the four files of MNIST and of
    Fashion-MNIST have the same names, so one's files in the other's folder would otherwise train
    under the wrong class names and normalisation."""
    other = _labels_of_another(name, split, labels)
    if other is not None:
        first = _IDX_META[other]["first_labels"][split]
        raise DataFormatError(
            f"{path}: these are {other}'s {split} labels (they begin {first}), not {name}'s. "
            f"The two datasets' files have the same names: keep each in its own folder, "
            f"data.root/{name} for {name}"
        )


def _build_idx(
    cfg: DataConfig, seed: int, stats: Normalisation | None = None
) -> tuple[ImageDataset, ImageDataset, DataInfo]:
    meta = _IDX_META[cfg.name]
    files = locate_idx(cfg.name, cfg.root, cfg.download)
    num_classes = len(meta["classes"])
    train_x, train_y = _read_idx_split(files["train_images"], files["train_labels"], num_classes)
    test_x, test_y = _read_idx_split(files["test_images"], files["test_labels"], num_classes)
    for split, labels in (("train", train_y), ("test", test_y)):
        refuse_another_datasets_labels(cfg.name, files[f"{split}_labels"], split, labels)
    if test_x.shape[-2:] != train_x.shape[-2:]:  # files of two datasets: resizing would hide it
        raise DataFormatError(
            f"{files['test_images']}: {tuple(test_x.shape[-2:])} images, but those of "
            f"{files['train_images']} are {tuple(train_x.shape[-2:])}; both must come from one dataset"
        )
    native = train_x.shape[-1]
    size = cfg.image_size or native
    train_x, test_x = resize_images(train_x, size), resize_images(test_x, size)
    pad = max(1, round(2 * size / 28))
    mean, std = stats or (list(meta["mean"]), list(meta["std"]))
    evaluation = PixelTransform(mean, std)
    # shifts of up to 2 px (at 28 px); horizontal flips for clothes, never for digits
    # data.shift / data.flip override both
    training = _training_transform(cfg, mean, std, size, pad)
    info = DataInfo(num_classes, 1, size, list(meta["classes"]), mean, std, str(files["train_images"].parent))
    return (
        ImageDataset(train_x, train_y, _train_or_eval(cfg.augment, training, evaluation), evaluation),
        ImageDataset(test_x, test_y, evaluation),
        info,
    )


# --------------------------------------------------------------------------- torchvision (cifar10, svhn)

_TV_META = {
    "cifar10": {
        "mean": [0.4914, 0.4822, 0.4465],
        "std": [0.2470, 0.2435, 0.2616],
        "classes": ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"],
    },
    "svhn": {
        "mean": [0.4377, 0.4438, 0.4728],
        "std": [0.1980, 0.2010, 0.1970],
        "classes": [str(i) for i in range(10)],
    },
}


#: CIFAR-10's python release: the folder its archive unpacks to, and its batch files.
CIFAR10_FOLDER = "cifar-10-batches-py"
CIFAR10_ARCHIVE = "cifar-10-python.tar.gz"
CIFAR10_BATCHES = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
#: The files torchvision keeps SVHN's splits in.
SVHN_FILES = ["train_32x32.mat", "test_32x32.mat"]


class _BatchUnpickler(pickle.Unpickler):
    """Unpickles CIFAR's batches (dicts, lists, strings, numbers, NumPy arrays) and no other object.

    A pickle can name any importable function to call while it loads; this one only
    lets through what rebuilds a NumPy array, so a doctored file cannot run code.
    """

    ALLOWED = frozenset(
        {
            *(
                (f"numpy.{core}.multiarray", name)
                for core in ("core", "_core")
                for name in ("_reconstruct", "scalar")
            ),
            *((f"numpy.{core}.numeric", "_frombuffer") for core in ("core", "_core")),  # protocol 5
            ("numpy", "ndarray"),
            ("numpy", "dtype"),
            ("_codecs", "encode"),  # bytes under protocol 2
        }
    )

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} (not part of a CIFAR batch)")
        return super().find_class(module, name)


def read_cifar_batch(path: str | Path) -> tuple[torch.Tensor, torch.Tensor]:
    """One batch file of CIFAR-10's python release: (N, 3, 32, 32) uint8 images and (N,) labels.

    Each file is a pickled dict whose ``data`` is an (N, 3072) uint8 array (each
    row the red, green and blue 32 x 32 planes in turn) and whose ``labels`` is a
    list of N class numbers; keys are bytes (the files were written by Python 2).
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            batch = _BatchUnpickler(f, encoding="bytes").load()
    except OSError as e:
        raise DataFormatError(f"{path}: cannot read ({e.strerror or e})") from None
    except Exception as e:  # noqa: BLE001 - a corrupt pickle fails in many ways
        raise DataFormatError(f"{path}: not a CIFAR-10 batch file ({one_line(e)})") from None
    if not isinstance(batch, dict):
        raise DataFormatError(f"{path}: not a CIFAR-10 batch file (holds {type(batch).__name__}, not a dict)")
    batch = {k.decode(errors="replace") if isinstance(k, bytes) else k: v for k, v in batch.items()}
    images, labels = batch.get("data"), batch.get("labels")
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 2:
        raise DataFormatError(f"{path}: not a CIFAR-10 batch file (no (N, 3072) uint8 'data' array)")
    if images.shape[1] != 3 * 32 * 32:
        raise DataFormatError(f"{path}: rows of {images.shape[1]} bytes, not 3 x 32 x 32 = 3072")
    try:
        labels = np.asarray(labels)  # not converted yet: 2.7 or True would pass as a class number
    except (TypeError, ValueError):
        labels = None
    if (
        labels is None
        or labels.shape != (images.shape[0],)
        or (labels.size and labels.dtype.kind not in "iu")
    ):
        raise DataFormatError(f"{path}: its 'labels' are not one class number per image ({images.shape[0]})")
    labels = torch.from_numpy(labels.astype(np.int64))
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) > 9):
        raise DataFormatError(f"{path}: class numbers outside 0-9 ({int(labels.min())}..{int(labels.max())})")
    return torch.from_numpy(images.reshape(-1, 3, 32, 32).copy()), labels


def _read_cifar10(folder: Path, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    parts = [read_cifar_batch(folder / name) for name in CIFAR10_BATCHES["train" if train else "test"]]
    return torch.cat([x for x, _ in parts]), torch.cat([y for _, y in parts])


def _torchvision_split(
    name: str, folder: Path, train: bool, download: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    import torchvision.datasets as tvd

    if name == "cifar10":
        if download:  # downloads and unpacks the archive into folder / CIFAR10_FOLDER
            tvd.CIFAR10(str(folder), train=train, download=True)
        return _read_cifar10(folder / CIFAR10_FOLDER, train)
    try:
        if download:  # torchvision's SVHN downloads its files before it imports scipy to read them
            import scipy.io  # noqa: F401
        ds = tvd.SVHN(str(folder), split="train" if train else "test", download=download)
    except ImportError:
        raise DataError(
            "svhn needs scipy to read its .mat files: pip install scipy (the svhn extra)"
        ) from None
    return torch.from_numpy(np.ascontiguousarray(ds.data)), torch.from_numpy(ds.labels.astype(np.int64))


def _load_torchvision(name: str, root: str | Path, download: bool):
    root = Path(root).expanduser()
    dirs = [root, root / name]
    damaged: DataFormatError | None = None  # the release found, but not readable
    for folder in dirs:
        if name == "cifar10":
            if (folder / CIFAR10_FOLDER).is_dir():
                try:
                    return _read_cifar10(folder / CIFAR10_FOLDER, True), _read_cifar10(
                        folder / CIFAR10_FOLDER, False
                    )
                except DataFormatError as e:
                    if not download:
                        raise
                    damaged = e
                    break  # a damaged or incomplete release: downloaded and unpacked again below
            continue
        parts = []
        for train, file in zip((True, False), SVHN_FILES):
            try:
                parts.append(_torchvision_split(name, folder, train, False))
            except RuntimeError:  # torchvision's "Dataset not found or corrupted"
                if (folder / file).is_file():
                    problem = (
                        f"{folder / file}: present but failing torchvision's checksum (corrupt or incomplete)"
                    )
                    if not download:  # with download, torchvision replaces it below
                        raise DataFormatError(
                            f"{problem}; delete it, or set data.download=true to download it again"
                        ) from None
                    damaged = DataFormatError(problem)
                break
        if len(parts) == 2:
            return parts[0], parts[1]
    reason = "data.download is false"
    archives = [folder / CIFAR10_ARCHIVE for folder in dirs if (folder / CIFAR10_ARCHIVE).is_file()]
    if name == "cifar10" and archives and not download:
        reason += f"; {archives[0]} is there but not unpacked: tar xzf it in its folder"
    if download:
        try:
            with tidy_made_folders(root, root / CIFAR10_FOLDER):
                return _torchvision_split(name, root, True, True), _torchvision_split(name, root, False, True)
        except DataError:
            raise
        except Exception as e:  # noqa: BLE001 - network and archive errors come in many types
            reason = f"download failed: {one_line(e)}"
            if damaged is not None:  # the files are there: what is wrong with them comes first
                raise DataFormatError(
                    f"{damaged}; downloading the release again to replace it failed: {one_line(e)}"
                ) from None
    looked = ", ".join(str(d) for d in dirs)
    raise DatasetNotFoundError(
        f"{name} not found (looked in: {looked}; {reason}).\n"
        f"Get it with: {download_advice(download)} (it downloads to data.root), or put torchvision's "
        f"{name} files in data.root.",
        searched=dirs,
    )


def _build_torchvision(
    cfg: DataConfig, seed: int, stats: Normalisation | None = None
) -> tuple[ImageDataset, ImageDataset, DataInfo]:
    meta = _TV_META[cfg.name]
    (train_x, train_y), (test_x, test_y) = _load_torchvision(cfg.name, cfg.root, cfg.download)
    size = expected_image_size(cfg)
    train_x, test_x = resize_images(train_x, size), resize_images(test_x, size)
    mean, std = stats or (list(meta["mean"]), list(meta["std"]))
    evaluation = PixelTransform(mean, std)
    pad = max(1, round(4 * size / 32))
    training = _training_transform(cfg, mean, std, size, pad)
    info = DataInfo(10, 3, size, list(meta["classes"]), mean, std)
    return (
        ImageDataset(train_x, train_y.long(), _train_or_eval(cfg.augment, training, evaluation), evaluation),
        ImageDataset(test_x, test_y.long(), evaluation),
        info,
    )


# --------------------------------------------------------------------------- smallNORB


def stored_resizing(name: str, size: int, channels: int = 1) -> str | None:
    """How the dataset ``name``'s files become the ``size`` x ``size`` uint8 images that the
    transforms start from, where that is more than reading them; None when it is not."""
    native = {**{k: 28 for k in _IDX_META}, **{k: 32 for k in _TV_META}}.get(name)
    if native is not None and native != size:
        return (
            f"the dataset's {native}x{native} images resized to {size}x{size} by bilinear interpolation "
            f"with antialiasing (torch.nn.functional.interpolate, antialias=True), rounded to uint8"
        )
    if name == "smallnorb" and size != 96:
        how = "downsampled" if size < 96 else "enlarged"
        return (
            f"the dataset's 96x96 views {how} to {size}x{size} by area averaging "
            f"(torch.nn.functional.interpolate, mode='area': adaptive average pooling), rounded to uint8"
        )
    if name == "folder":
        mode = "L" if channels == 1 else "RGB"
        return (
            f"each image file turned upright by its EXIF orientation, converted to {mode} (16-bit grey "
            f"divided by 257 and rounded first) and resized to {size}x{size} by PIL's bilinear resampling"
        )
    return None


def smallnorb_source_size(crop: int) -> int:
    """Side smallNORB's 96x96 views are downsampled to before the ``crop`` x ``crop`` crops (48 for 32)."""
    return max(crop, round(1.5 * crop))


def _build_smallnorb(
    cfg: DataConfig, seed: int, stats: Normalisation | None = None
) -> tuple[ImageDataset, ImageDataset, DataInfo]:
    """smallNORB as in the paper.

    Images are downsampled from 96 to 48 pixels by area averaging (to
    ``round(1.5 * image_size)`` when ``data.image_size`` is not 32), then each
    image is standardised per view to zero mean and unit variance. Training
    items are random ``image_size`` crops (default 32) with random brightness
    (+-0.25) and contrast (x0.75..1.25) jitter; test items are the centre crop.
    Standardising each image needs no dataset statistics, so ``stats`` is not used.

    ``data.stereo``: "channels" gives 2-channel images (left, right view);
    "samples" makes each view its own 1-channel item (items 2k, 2k+1 are the
    two views of row k, and a validation split keeps them together).

    ``data.split`` selects rows as :func:`capsnet.smallnorb.select` documents;
    for "azimuth" and "elevation" the test set holds the novel viewpoints and
    ``test.extra_splits["test_familiar"]`` the test file's rows with the
    training viewpoints. Every dataset's :meth:`ImageDataset.selected_meta`
    gives per-item ``instance``, ``elevation`` (index 0..8), ``azimuth``
    (degrees) and ``lighting``.
    """
    from capsnet import smallnorb

    crop = expected_image_size(cfg)
    size = smallnorb_source_size(crop)
    train_part, test_part = smallnorb.load(cfg.root, cfg.download, size)
    train_rows, test_rows, familiar_rows = smallnorb.select(cfg.split, train_part, test_part)

    evaluation = StandardisedCrop(crop)
    training = _train_or_eval(cfg.augment, StandardisedCrop(crop, train=True), evaluation)
    samples = cfg.stereo == "samples"

    def make(part: smallnorb.NorbPart, rows: torch.Tensor, transform: Callable) -> ImageDataset:
        images, labels, meta = part.images, part.labels, part.viewpoints()
        if samples:
            images = images.reshape(-1, 1, *images.shape[-2:])  # (2N, 1, S, S): row k -> items 2k, 2k+1
            labels = labels.repeat_interleave(2)
            meta = {key: value.repeat_interleave(2) for key, value in meta.items()}
            rows = (rows[:, None] * 2 + torch.arange(2)).flatten()
        return ImageDataset(images, labels, transform, evaluation, rows, meta, group=2 if samples else 1)

    train = make(train_part, train_rows, training)
    test = make(test_part, test_rows, evaluation)
    if familiar_rows is not None:
        test.extra_splits["test_familiar"] = make(test_part, familiar_rows, evaluation)
    info = DataInfo(len(smallnorb.CLASS_NAMES), 1 if samples else 2, crop, list(smallnorb.CLASS_NAMES))
    return train, test, info


# --------------------------------------------------------------------------- image folder

#: Share of each class held out as the test set when data.test_dir is not given (each file by
#: its name: :func:`held_out_by_name`).
FOLDER_TEST_FRACTION = 0.2


def _class_files(folder: Path) -> dict[str, list[Path]]:
    """Each class folder's files, sub-folders included; hidden files and folders (thumbnails,
    editors' and version control's own) left out."""
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    return {name: visible_files(folder / name) for name in classes}


def visible_files(folder: Path, onerror: Callable[[OSError], None] | None = None) -> list[Path]:
    """The files under ``folder``, sorted, hidden files and folders left out and linked folders not
    followed (training's class folders, predict's folders of images); ``onerror`` as os.walk's."""
    found = []
    for parent, subfolders, names in os.walk(folder, onerror=onerror):
        subfolders[:] = [d for d in subfolders if not d.startswith(".")]
        found.extend(Path(parent) / n for n in names if not n.startswith("."))
    return sorted(p for p in found if p.is_file())


def decode_image(path: Path, size: int | None, mode: str) -> np.ndarray | None:
    """(size, size, C) uint8 (``size`` None: the image's own height and width), or None when the
    file is not a readable image."""
    from PIL import Image, ImageOps

    try:
        with Image.open(path) as image:
            image.verify()
        with Image.open(path) as image:
            image = ImageOps.exif_transpose(image)  # photos stored sideways, upright as they were taken
            if image.mode.startswith("I"):  # 16-bit grey (I;16 or, from a PGM, I): scaled to 8 bits
                wide = np.asarray(image).astype(np.float64)  # (convert() would clip at 255)
                if wide.size and not 0 <= wide.min() <= wide.max() <= 65535:
                    return None  # 32-bit levels: no known white to scale from
                image = Image.fromarray(np.round(wide / 257.0).astype(np.uint8), mode="L")
            elif image.mode == "F":
                return None  # floating-point levels: no known white to scale from
            image = image.convert(mode)
            if size is not None:
                image = image.resize((size, size), Image.Resampling.BILINEAR)
            array = np.array(image, dtype=np.uint8)  # writable: torch.from_numpy warns on read-only arrays
    except Exception:  # noqa: BLE001 - PIL reports broken files with many exception types
        return None
    return array.reshape(*array.shape[:2], -1)


@contextlib.contextmanager
def quiet_pil():
    """Leaves out PIL's notes on how a file is stored (a palette with transparency, more pixels
    than its decompression-bomb limit), which would show as Python warnings with PIL's source
    lines. Enter it in the main thread, around the threads that decode."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", module="PIL")
        yield


def _load_folder(
    files: list[tuple[Path, int]], size: int, mode: str
) -> tuple[torch.Tensor, torch.Tensor, list[Path]]:
    channels = 1 if mode == "L" else 3
    with quiet_pil(), ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        decoded = list(pool.map(lambda item: decode_image(item[0], size, mode), files))
    good = [(array, label) for array, (_, label) in zip(decoded, files) if array is not None]
    bad = [path for array, (path, _) in zip(decoded, files) if array is None]
    images = torch.empty((len(good), channels, size, size), dtype=torch.uint8)
    for i, (array, _) in enumerate(good):
        images[i] = torch.from_numpy(array).permute(2, 0, 1)
    labels = torch.tensor([label for _, label in good], dtype=torch.int64)
    return images, labels, bad


def _folder_tree(path_text: str, what: str) -> Path:
    path = Path(path_text).expanduser()
    if not path.is_dir():
        raise DatasetNotFoundError(
            f"{what} {path} is not a folder; point it at a tree with one sub-folder of images per class.",
            searched=[path],
        )
    return path


def _build_folder(
    cfg: DataConfig, seed: int, stats: Normalisation | None = None, trained_classes: list[str] | None = None
) -> tuple[ImageDataset, ImageDataset, DataInfo]:
    """The user's images, one sub-folder per class (sorted names are the classes).

    Every file is decoded at build time (PIL verify, then a full decode), resized
    to ``data.image_size`` (default 32) x same by bilinear resampling without
    keeping the aspect ratio, and converted to grey (``data.grayscale``) or RGB.
    Files that fail are skipped with one warning (``data.bad_files: skip``) or
    raise DataFormatError (``fail``). Without ``data.test_dir`` about 20% of each
    class is the test set, each file chosen by its name (:func:`held_out_by_name`, whatever
    the training seed and whatever files are added later).
    Normalisation uses the per-channel mean and std of the training images (``stats``
    where given: those a trained model's inputs were normalised with);
    training augmentation is a random crop with zero padding of size/8 (``data.shift``,
    and no flips unless ``data.flip``).

    ``trained_classes`` with ``stats``: a trained model's classes, in order, scored on the test
    split alone. No training image is decoded then (the training set is empty), and with
    ``data.test_dir`` the training folder is not read at all: the test folder's classes are
    matched to the model's by name.
    """
    test_only = trained_classes is not None and stats is not None
    train_dir = train_files = None
    if test_only and cfg.test_dir:
        classes = [str(name) for name in trained_classes]
    else:
        train_dir = _folder_tree(cfg.train_dir or "", "data.train_dir")
        train_files = _class_files(train_dir)
        if not train_files:
            raise DataFormatError(
                f"{train_dir}: no class sub-folders; put each class's images in its own sub-folder"
            )
        empty = [name for name, paths in train_files.items() if not paths]
        if empty:  # a class with no training images: nothing to learn it from (and nothing to hold out)
            raise DataFormatError(
                f"{train_dir}: class sub-folder(s) {', '.join(empty)} hold no files; "
                "put that class's images in them or remove them"
            )
        classes = list(train_files)
    index = {name: i for i, name in enumerate(classes)}
    size = expected_image_size(cfg)
    mode = "L" if cfg.grayscale else "RGB"

    if cfg.test_dir:
        test_dir = _folder_tree(cfg.test_dir, "data.test_dir")
        test_classes = _class_files(test_dir)
        unknown = sorted(set(test_classes) - set(index))
        if unknown and train_files is None:
            raise DataFormatError(
                f"{test_dir}: the model was trained with the classes {classes}, this folder also has "
                f"{unknown}; name its class sub-folders as the model's classes"
            )
        if unknown:
            raise DataFormatError(f"{test_dir}: classes {unknown} are not in data.train_dir {train_dir}")
        train_list = [(p, index[c]) for c, paths in (train_files or {}).items() for p in paths]
        test_list = [(p, index[c]) for c, paths in test_classes.items() for p in paths]
    else:
        train_list, test_list = [], []
        for c, paths in train_files.items():
            held = held_out_by_name(
                [p.relative_to(train_dir).as_posix() for p in paths], FOLDER_TEST_FRACTION
            )
            train_list += [(path, index[c]) for path, out in zip(paths, held) if not out]
            test_list += [(path, index[c]) for path, out in zip(paths, held) if out]

    train_x, train_y, bad = _load_folder([] if test_only else train_list, size, mode)
    test_x, test_y, bad_test = _load_folder(test_list, size, mode)
    bad += bad_test
    if bad and cfg.bad_files == "fail":
        raise DataFormatError(f"{bad[0]}: not a readable image (data.bad_files is 'fail'; 'skip' ignores it)")
    if bad:
        warnings.warn(
            f"skipped {counted(len(bad), 'unreadable or non-image file')} (data.bad_files: skip): {listed(bad)}",
            DataWarning,
            stacklevel=3,
        )
    if len(train_x) == 0 and not test_only:
        raise DataFormatError(f"{train_dir}: no readable training images")
    if len(test_x) == 0:
        raise DataFormatError(f"no readable test images ({cfg.test_dir or train_dir})")

    mean, std = stats or channel_stats(train_x[fitting_rows(cfg, len(train_x), seed)])
    evaluation = PixelTransform(mean, std)
    training = _training_transform(cfg, mean, std, size, max(1, size // 8))
    info = DataInfo(len(classes), train_x.shape[1], size, classes, mean, std)
    if not cfg.test_dir:
        info.test_split = "by-name"
    return (
        ImageDataset(train_x, train_y, _train_or_eval(cfg.augment, training, evaluation), evaluation),
        ImageDataset(test_x, test_y, evaluation),
        info,
    )


# --------------------------------------------------------------------------- synthetic


def _synthetic_split(
    templates: torch.Tensor, n: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` noisy, shifted, brightness-scaled copies of the class templates (K, C, S, S) in [0, 1]."""
    num_classes, channels, size, _ = templates.shape
    labels = (torch.arange(n) % num_classes)[torch.randperm(n, generator=generator)]
    shift = max(1, size // 16)
    padded = F.pad(templates, (shift, shift, shift, shift))  # (K, C, S + 2 shift, S + 2 shift)
    offsets = torch.randint(0, 2 * shift + 1, (n, 2), generator=generator)
    images = torch.empty((n, channels, size, size))
    for dy in range(2 * shift + 1):
        for dx in range(2 * shift + 1):
            chosen = ((offsets[:, 0] == dy) & (offsets[:, 1] == dx)).nonzero().flatten()
            images[chosen] = padded[labels[chosen], :, dy : dy + size, dx : dx + size]
    gain = 0.8 + 0.4 * torch.rand((n, 1, 1, 1), generator=generator)
    noise = 0.1 * torch.randn(images.shape, generator=generator)
    images = (images * gain + noise).clamp_(0, 1).mul_(255).round_().to(torch.uint8)
    return images, labels


def _build_synthetic(
    cfg: DataConfig, seed: int, stats: Normalisation | None = None
) -> tuple[ImageDataset, ImageDataset, DataInfo]:
    """One fixed random blob pattern per class; items are the pattern shifted by up to size/16
    pixels, scaled in brightness (x0.8..1.2) and with Gaussian noise (std 0.1). Everything
    follows from ``seed``; no extra augmentation. Normalised as :func:`_build_folder` is."""
    size = expected_image_size(cfg)
    coarse = max(2, size // 6)
    generator = torch.Generator().manual_seed(seed)
    low = torch.rand((cfg.num_classes, cfg.channels, coarse, coarse), generator=generator)
    smooth = F.interpolate(low, size=(size, size), mode="bilinear", align_corners=False)
    templates = torch.sigmoid((smooth - 0.5) * 12)  # (K, C, S, S) near-binary blobs
    train_x, train_y = _synthetic_split(templates, cfg.train_size, torch.Generator().manual_seed(seed + 1))
    test_x, test_y = _synthetic_split(templates, cfg.test_size, torch.Generator().manual_seed(seed + 2))
    mean, std = stats or channel_stats(train_x[fitting_rows(cfg, len(train_x), seed)])
    transform = PixelTransform(mean, std)
    names = [f"class{i}" for i in range(cfg.num_classes)]
    info = DataInfo(cfg.num_classes, cfg.channels, size, names, mean, std)
    return ImageDataset(train_x, train_y, transform), ImageDataset(test_x, test_y, transform), info


# --------------------------------------------------------------------------- entry points

#: the side of the images each dataset gives without data.image_size (smallNORB: its crops;
#: an image folder: what its images are resized to); the builders and the trainer's early
#: check read it here (MNIST and Fashion-MNIST: 28, the side of their files)
NATIVE_SIZES = {
    "mnist": 28,
    "fashion-mnist": 28,
    "cifar10": 32,
    "svhn": 32,
    "synthetic": 32,
    "smallnorb": 32,
    "folder": 32,
}


def expected_image_size(cfg: DataConfig) -> int | None:
    """The side of the model's input images, where it is known before any file is read."""
    return cfg.image_size or NATIVE_SIZES.get(cfg.name)


_BUILDERS: dict[
    str, Callable[[DataConfig, int, Normalisation | None], tuple[ImageDataset, ImageDataset, DataInfo]]
] = {
    "mnist": _build_idx,
    "fashion-mnist": _build_idx,
    "cifar10": _build_torchvision,
    "svhn": _build_torchvision,
    "smallnorb": _build_smallnorb,
    "folder": _build_folder,
    "synthetic": _build_synthetic,
}


def build_datasets(
    cfg: DataConfig,
    seed: int = 0,
    stats: Normalisation | None = None,
    trained_classes: list[str] | None = None,
) -> tuple[ImageDataset, ImageDataset | None, ImageDataset, DataInfo]:
    """(train, val or None, test, info) for ``cfg``.

    With ``data.val_split`` > 0 a seeded random share of the training data
    (never the test set) becomes the validation set, with test-time transforms.
    Extra evaluation sets (smallNORB "test_familiar") are in ``test.extra_splits``.
    ``stats``: the per-channel normalisation to use instead of the dataset's own (computed
    from the training images, or fixed); a trained model is scored with the one it was
    trained with, whatever the training images are now. Datasets that standardise each
    image on its own (smallNORB) ignore it. ``trained_classes``: the class names of a trained
    model that scores the test split alone (with ``stats``): an image folder then decodes only
    its test images, and the training set and the validation set are empty.
    """
    if cfg.name not in _BUILDERS:
        raise DataError(f"data.name: unknown dataset {cfg.name!r} (known: {', '.join(DATASETS)})")
    if cfg.name == "folder":
        train, test, info = _build_folder(cfg, seed, stats, trained_classes)
    else:
        train, test, info = _BUILDERS[cfg.name](cfg, seed, stats)
    val = None
    if cfg.val_split > 0:
        kept, held = split_indices(len(train), cfg.val_split, seed, group=train.group)
        val = train.subset(held, evaluation=True)
        train = train.subset(kept)
    return train, val, test, info


class ShardSampler(Sampler[int]):
    """Rank ``rank``'s contiguous slice of ``range(length)``: slices are disjoint, cover every
    index exactly once and are not padded, so metrics summed over ranks count each sample once."""

    def __init__(self, length: int, rank: int, world_size: int):
        self.start = length * rank // world_size
        self.stop = length * (rank + 1) // world_size

    def __iter__(self):
        return iter(range(self.start, self.stop))

    def __len__(self) -> int:
        return self.stop - self.start


def leave_stop_signals_to_the_main_process(_worker_id: int) -> None:
    """Moves a loader worker into a process group of its own.

    Ctrl-C, ``timeout``, ``kill -- -PGID`` and torchrun signal a whole process
    group; a worker killed by that would end the run with a loader error before
    the main process could save. In their own group the workers keep their
    default handlers, so the main process still stops them directly (the loader
    does at shutdown), and a worker whose main process is gone exits on its own.
    """
    os.setpgid(0, 0)


def build_loaders(
    cfg: Config,
    rank: int = 0,
    world_size: int = 1,
    stats: Normalisation | None = None,
    trained_classes: list[str] | None = None,
) -> Loaders:
    """Loaders for training (shuffled, seeded) and evaluation (in order, sharded across ranks).

    The training order of an epoch is one permutation drawn from ``train.seed``
    and the epoch number (a DistributedSampler; call ``set_epoch``), whatever
    the number of processes: rank ``r`` of ``world_size`` takes every
    ``world_size``-th index from position ``r``, so the ranks' k-th batches
    together hold exactly the k-th batch of a single process whose batch size
    is ``world_size`` times larger (but for the last batch of an epoch where the training
    set does not divide among the ranks: the sampler repeats up to ``world_size - 1``
    images so that every rank has as many). Random augmentation draws from torch's
    global generator in the main process, and from per-worker seeds derived
    from ``train_generator`` when ``train.num_workers`` > 0 (workers are started
    for each epoch, so a resumed run restores their seeds with that generator's
    state); that generator is seeded per rank (:func:`capsnet.distributed.rank_seed`),
    so no two ranks draw the same augmentation. ``stats``, ``trained_classes``: as
    :func:`build_datasets` takes them.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in 0..{world_size - 1}")
    train, val, test, info = build_datasets(cfg.data, cfg.train.seed, stats, trained_classes)
    batch_size = cfg.train.batch_size
    eval_batch_size = cfg.train.eval_batch_size or 2 * batch_size
    workers = cfg.train.num_workers
    common: dict[str, Any] = {
        "num_workers": workers,
        "worker_init_fn": leave_stop_signals_to_the_main_process if workers else None,
        "pin_memory": cfg.train.device.partition(":")[0] in ("auto", "cuda") and torch.cuda.is_available(),
        # workers start afresh each epoch, seeded from ``generator`` then: its state, saved in every
        # checkpoint, gives a resumed run the same draws (kept workers would carry their streams on
        # from epoch to epoch, where a resumed run's new ones cannot); a start costs about 0.1 s
        "persistent_workers": False,
    }
    # the seed of the loader workers' augmentation draws: rank_seed, like each rank's own generators,
    # so the ranks' workers never share a stream (rank 0, and so a single process, keeps train.seed)
    generator = torch.Generator().manual_seed(rank_seed(cfg.train.seed, rank))
    sampler = DistributedSampler(
        train, num_replicas=world_size, rank=rank, shuffle=True, seed=cfg.train.seed, drop_last=False
    )
    train_loader = DataLoader(
        train,
        batch_size=batch_size,
        sampler=sampler,
        generator=generator,
        drop_last=False,
        **common,
    )

    def eval_loader(dataset: Dataset) -> DataLoader:
        shard = ShardSampler(len(dataset), rank, world_size) if world_size > 1 else None
        return DataLoader(dataset, batch_size=eval_batch_size, shuffle=False, sampler=shard, **common)

    return Loaders(
        train=train_loader,
        val=eval_loader(val) if val is not None else None,
        test=eval_loader(test),
        info=info,
        train_sampler=sampler,
        train_generator=generator,
        extra={name: eval_loader(ds) for name, ds in test.extra_splits.items()},
    )
