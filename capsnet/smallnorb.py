"""smallNORB: reader of the official binary-matrix files and the viewpoint splits.

The dataset (LeCun, Huang & Bottou, 2004) has 5 toy categories photographed by
a stereo camera pair at 9 elevations, 18 azimuths and 6 lightings. Each of the
two official files holds 24300 stereo pairs of 96 x 96 grey images of 5
instances per category (training: instances 4, 6, 7, 8, 9; test: 0, 1, 2, 3, 5).

File layout (all integers little endian)::

    int32 magic     0x1E3D4C55 uint8 | 0x1E3D4C54 int32 (also read: 0x1E3D4C56 int16,
                    0x1E3D4C51 float32, 0x1E3D4C53 float64)
    int32 ndim
    int32 dims[max(3, ndim)]      entries past ndim are padding (1)
    data                          prod(dims[:ndim]) elements, row major

    *-dat.mat   uint8 (N, 2, 96, 96)  left and right camera images
    *-cat.mat   int32 (N,)            category 0..4
    *-info.mat  int32 (N, 4)          instance, elevation 0..8 (30 to 70 degrees in steps of 5),
                                      azimuth 0, 2, .., 34 (times 10 = degrees), lighting 0..5

This module knows the format, the files and the splits; :mod:`capsnet.data`
turns the arrays into datasets.
"""

from __future__ import annotations

import math
import shutil
import struct
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from capsnet.data import (
    DataFormatError,
    DatasetNotFoundError,
    download_advice,
    one_line,
    open_data_file,
    read_body,
    shaped_body,
    tidy_made_folders,
)

CLASS_NAMES = ["animal", "human", "airplane", "truck", "car"]
URL = "https://cs.nyu.edu/~ylclab/data/norb-v1.0-small/"
FILES = {
    "train": "smallnorb-5x46789x9x18x6x2x96x96-training",
    "test": "smallnorb-5x01235x9x18x6x2x96x96-testing",
}
PARTS = ("dat", "cat", "info")
#: Side of every camera view in the files (what data.stored_resizing and exports describe).
VIEW_SIZE = 96

MAGIC_DTYPES = {
    0x1E3D4C51: np.dtype("<f4"),
    0x1E3D4C53: np.dtype("<f8"),
    0x1E3D4C54: np.dtype("<i4"),
    0x1E3D4C55: np.dtype("u1"),
    0x1E3D4C56: np.dtype("<i2"),
}
EXPECTED_MAGIC = {"dat": 0x1E3D4C55, "cat": 0x1E3D4C54, "info": 0x1E3D4C54}

#: What each column of an ``-info`` file may hold (the format's description), and how a message says it.
INFO_FIELDS = (
    ("instance", tuple(range(10)), "0..9"),
    ("elevation", tuple(range(9)), "0..8"),
    ("azimuth", tuple(range(0, 35, 2)), "0, 2, .., 34"),
    ("lighting", tuple(range(6)), "0..5"),
)

#: Azimuths (degrees) of the training viewpoints in the paper's azimuth experiment.
FAMILIAR_AZIMUTHS = (300, 320, 340, 0, 20, 40)
#: Elevation indices (30, 35, 40 degrees) of the training viewpoints in the elevation experiment.
FAMILIAR_ELEVATIONS = (0, 1, 2)


@dataclass
class NorbPart:
    """One official file triple, images already downsampled."""

    images: torch.Tensor  # (N, 2, S, S) uint8
    labels: torch.Tensor  # (N,) int64, 0..4
    info: torch.Tensor  # (N, 4) int64: instance, elevation index, azimuth (0..34, x10 degrees), lighting

    def viewpoints(self) -> dict[str, torch.Tensor]:
        """Per-row arrays: instance, elevation (index 0..8), azimuth (degrees), lighting."""
        return {
            "instance": self.info[:, 0].clone(),
            "elevation": self.info[:, 1].clone(),
            "azimuth": self.info[:, 2] * 10,
            "lighting": self.info[:, 3].clone(),
        }


# --------------------------------------------------------------------------- reader


def read_norb_matrix(path: str | Path, expected_magic: int | None = None) -> np.ndarray:
    """Reads one binary-matrix file (plain or ``.gz``); DataFormatError names the file on any defect.

    ``expected_magic`` additionally requires one element type (0x1E3D4C55 uint8, 0x1E3D4C54 int32).
    """
    path = Path(path)
    try:
        with open_data_file(path) as f:
            head = f.read(8)
            if len(head) < 8:
                raise DataFormatError(f"{path}: too short for a smallNORB header ({len(head)} bytes)")
            magic, ndim = struct.unpack("<Ii", head)
            if magic not in MAGIC_DTYPES:
                raise DataFormatError(
                    f"{path}: not a smallNORB matrix file (magic number 0x{magic:08X}; "
                    f"expected 0x1E3D4C55 for images or 0x1E3D4C54 for labels/info)"
                )
            if expected_magic is not None and magic != expected_magic:
                raise DataFormatError(
                    f"{path}: wrong magic number 0x{magic:08X} (expected 0x{expected_magic:08X})"
                )
            if not 0 < ndim <= 8:
                raise DataFormatError(f"{path}: corrupt header (ndim = {ndim})")
            stored = max(3, ndim)
            raw_dims = f.read(4 * stored)
            if len(raw_dims) < 4 * stored:
                raise DataFormatError(f"{path}: truncated header")
            dims = struct.unpack(f"<{stored}i", raw_dims)[:ndim]
            if any(d < 0 for d in dims):
                raise DataFormatError(f"{path}: corrupt header (dims {dims})")
            dtype = MAGIC_DTYPES[magic]
            expected = math.prod(dims) * dtype.itemsize  # Python integers: no overflow
            body = read_body(f, path, dims, expected)
    except (OSError, EOFError, zlib.error) as e:
        raise DataFormatError(f"{path}: cannot read ({e})") from None
    return shaped_body(body, dtype, dims, path)


# --------------------------------------------------------------------------- files


def search_dirs(root: str | Path) -> list[Path]:
    """Folders searched for the six files, in order."""
    root = Path(root).expanduser()
    return [root, root / "smallnorb", root / "smallNORB", root / "norb-v1.0-small"]


def _find_file(folder: Path, name: str) -> Path | None:
    for candidate in (folder / name, folder / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


def find_files(root: str | Path) -> dict[tuple[str, str], Path] | None:
    """The six files, keyed by (split, part), from the first folder that has all of them
    (a plain file is preferred to its .gz)."""
    for folder in search_dirs(root):
        found = {}
        for split, stem in FILES.items():
            for part in PARTS:
                path = _find_file(folder, f"{stem}-{part}.mat")
                if path is not None:
                    found[split, part] = path
        if len(found) == len(FILES) * len(PARTS):
            return found
    return None


def download(root: str | Path) -> Path:
    """Downloads to ``root/smallnorb`` those of the six ``.gz`` files that are not there, plain or gzipped.

    Each is written to a temporary name first and kept only when it has as many
    bytes as the server announced, so a cut connection leaves nothing to trip on later.
    """
    dest = Path(root).expanduser() / "smallnorb"
    dest.mkdir(parents=True, exist_ok=True)
    for stem in FILES.values():
        for part in PARTS:
            if _find_file(dest, f"{stem}-{part}.mat") is not None:
                continue
            name = f"{stem}-{part}.mat.gz"
            target = dest / name
            partial = target.with_suffix(".gz.part")
            try:
                with urllib.request.urlopen(URL + name, timeout=60) as response, open(partial, "wb") as out:
                    shutil.copyfileobj(response, out, length=1 << 20)
                    announced = response.headers.get("Content-Length")
                    got = out.tell()
                if announced is not None and announced.isdigit() and int(announced) != got:
                    raise OSError(f"{URL + name}: the connection ended after {got} of {announced} bytes")
            except BaseException:
                partial.unlink(missing_ok=True)  # a cut connection leaves no part file
                raise
            partial.replace(target)
    return dest


def locate(root: str | Path, allow_download: bool) -> dict[tuple[str, str], Path]:
    """The six files; downloads them when allowed, else DatasetNotFoundError naming every folder searched."""
    files = find_files(root)
    if files is not None:
        return files
    reason = "data.download is false"
    if allow_download:
        try:
            with tidy_made_folders(Path(root).expanduser() / "smallnorb"):
                download(root)
        except Exception as e:  # noqa: BLE001 - network errors come in many types
            reason = f"download from {URL} failed: {one_line(e)}"
        files = find_files(root)
        if files is not None:
            return files
    dirs = search_dirs(root)
    looked = ", ".join(str(d) for d in dirs)
    raise DatasetNotFoundError(
        f"smallnorb not found (looked in: {looked}; {reason}).\n"
        f"Get it with: {download_advice(allow_download)}, or put the 6 files "
        f"smallnorb-5x*-{{training,testing}}-{{dat,cat,info}}.mat[.gz] from {URL} in data.root.",
        searched=dirs,
    )


# --------------------------------------------------------------------------- loading


def downsample(images: np.ndarray, size: int, chunk: int = 2048) -> torch.Tensor:
    """(N, V, H, W) uint8 -> (N, V, size, size) uint8 by area averaging (exact 2x2 means for 96 -> 48)."""
    n, views, height, width = images.shape
    if (height, width) == (size, size):
        return torch.from_numpy(np.array(images, dtype=np.uint8))
    out = torch.empty((n, views, size, size), dtype=torch.uint8)
    for start in range(0, n, chunk):
        block = torch.from_numpy(images[start : start + chunk].astype(np.float32))
        small = F.interpolate(block, size=(size, size), mode="area")  # (n, V, size, size)
        out[start : start + chunk] = small.round_().clamp_(0, 255).to(torch.uint8)
    return out


def load_part(files: dict[str, Path], size: int) -> NorbPart:
    """Reads and validates one dat/cat/info triple; images are downsampled to ``size``."""
    dat = read_norb_matrix(files["dat"], EXPECTED_MAGIC["dat"])
    if dat.ndim != 4 or dat.shape[1:] != (2, VIEW_SIZE, VIEW_SIZE):
        raise DataFormatError(
            f"{files['dat']}: expected (N, 2, {VIEW_SIZE}, {VIEW_SIZE}) stereo images, header says {dat.shape}"
        )
    images = downsample(dat, size)
    del dat
    cat = read_norb_matrix(files["cat"], EXPECTED_MAGIC["cat"])
    info = read_norb_matrix(files["info"], EXPECTED_MAGIC["info"])
    n = images.shape[0]
    if cat.ndim != 1 or cat.shape[0] != n:
        raise DataFormatError(
            f"{files['cat']}: expected {n} labels to match the images, got shape {cat.shape}"
        )
    if info.shape != (n, 4):
        raise DataFormatError(f"{files['info']}: expected ({n}, 4) info rows, got shape {info.shape}")
    if n and (cat.min() < 0 or cat.max() >= len(CLASS_NAMES)):
        raise DataFormatError(f"{files['cat']}: labels must be 0..4, found {cat.min()}..{cat.max()}")
    for column, (field, allowed, text) in enumerate(INFO_FIELDS):
        wrong = ~np.isin(info[:, column], allowed)
        if wrong.any():  # a viewpoint split would put such a row on the wrong side without a word
            row = int(wrong.argmax())
            raise DataFormatError(
                f"{files['info']}: {field} (column {column + 1}) must be {text}, found {info[row, column]} "
                f"in row {row}; the file is damaged: fetch it again"
            )
    return NorbPart(
        images=images,
        labels=torch.from_numpy(cat.astype(np.int64)),
        info=torch.from_numpy(info.astype(np.int64)),
    )


def load(root: str | Path, allow_download: bool, size: int) -> tuple[NorbPart, NorbPart]:
    """(training part, test part) of the official files, images downsampled to ``size`` x ``size``."""
    files = locate(root, allow_download)
    train, test = (load_part({part: files[split, part] for part in PARTS}, size) for split in FILES)
    return train, test


# --------------------------------------------------------------------------- splits


def familiar_mask(info: torch.Tensor, split: str) -> torch.Tensor:
    """Rows whose viewpoint is a training viewpoint of ``split`` ("azimuth" | "elevation")."""
    if split == "azimuth":
        return torch.isin(info[:, 2] * 10, torch.tensor(FAMILIAR_AZIMUTHS))
    if split == "elevation":
        return torch.isin(info[:, 1], torch.tensor(FAMILIAR_ELEVATIONS))
    raise ValueError(f"unknown smallnorb split {split!r}")


def select(
    split: str, train: NorbPart, test: NorbPart
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Row indices (train rows, test rows, familiar test rows or None) of a split.

    * ``standard``: every row of the training file; every row of the test file.
    * ``azimuth``: training-file rows with azimuth in {300, 320, 340, 0, 20, 40}
      degrees (azimuth field 30, 32, 34, 0, 2, 4); test-file rows with azimuth
      60..280 degrees (novel); familiar: the test file's rows with the training azimuths.
    * ``elevation``: training-file rows with elevation index 0, 1 or 2 (30-40
      degrees); test-file rows with elevation index 3..8 (45-70 degrees, novel);
      familiar: the test file's rows with elevation index 0..2.
    """
    if split == "standard":
        return torch.arange(len(train.labels)), torch.arange(len(test.labels)), None
    train_rows = familiar_mask(train.info, split).nonzero().flatten()
    test_familiar = familiar_mask(test.info, split)
    return train_rows, (~test_familiar).nonzero().flatten(), test_familiar.nonzero().flatten()
