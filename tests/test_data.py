"""Datasets and loaders: file formats, splits, folders, synthetic data, sharding."""

from __future__ import annotations

import gzip
import shutil
import struct
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import tiny
from torch.utils.data import DistributedSampler

from capsnet import data, smallnorb
from capsnet.config import ConfigError, DataConfig, config_from_dict
from capsnet.data import (
    DataError,
    DataFormatError,
    DataInfo,
    DatasetNotFoundError,
    PixelTransform,
    build_datasets,
    build_loaders,
    check_channels,
    held_out_by_name,
    per_image_standardise,
    read_idx,
    shifted,
    split_names,
)
from capsnet.trainer import fit

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")

# --------------------------------------------------------------------------- writers of the on-disk formats


def _opener(path: Path):
    return gzip.open if path.suffix == ".gz" else open


def write_idx(path: Path, array: np.ndarray) -> Path:
    """IDX: 0x00 0x00, type 0x08 (uint8), ndim, big-endian uint32 dims, then the bytes."""
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    with _opener(path)(path, "wb") as f:
        f.write(header + np.ascontiguousarray(array, dtype=np.uint8).tobytes())
    return path


def write_norb(path: Path, array: np.ndarray) -> Path:
    """smallNORB: little-endian int32 magic, ndim, max(3, ndim) dims (padded with 1), then the data."""
    magic = 0x1E3D4C55 if array.dtype == np.uint8 else 0x1E3D4C54
    body = np.ascontiguousarray(array, dtype=np.uint8 if array.dtype == np.uint8 else "<i4")
    dims = list(array.shape) + [1] * (3 - array.ndim)
    header = struct.pack("<ii", magic, array.ndim) + struct.pack(f"<{len(dims)}i", *dims)
    with _opener(path)(path, "wb") as f:
        f.write(header + body.tobytes())
    return path


def write_mnist(folder: Path, n_train: int = 30, n_test: int = 12, gz: bool = True) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    suffix = ".gz" if gz else ""
    for stem, n in (("train", n_train), ("t10k", n_test)):
        write_idx(
            folder / f"{stem}-images-idx3-ubyte{suffix}", rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        )
        write_idx(folder / f"{stem}-labels-idx1-ubyte{suffix}", (np.arange(n) % 10).astype(np.uint8))
    return folder


NORB_ROWS = 20


def norb_info(n: int) -> np.ndarray:
    """(instance, elevation 0..8, azimuth field 0, 2, .., 34, lighting) that visit every viewpoint value."""
    i = np.arange(n)
    return np.stack([i % 5, i % 9, (2 * i) % 36, i % 6], axis=1).astype(np.int32)


def write_smallnorb(folder: Path, seed: int = 0) -> Path:
    """Training files gzipped, testing files plain: both readings are exercised in every test."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for stem, suffix in ((smallnorb.FILES["train"], ".gz"), (smallnorb.FILES["test"], "")):
        write_norb(
            folder / f"{stem}-dat.mat{suffix}", rng.integers(0, 256, (NORB_ROWS, 2, 96, 96), dtype=np.uint8)
        )
        write_norb(folder / f"{stem}-cat.mat{suffix}", (np.arange(NORB_ROWS) % 5).astype(np.int32))
        write_norb(folder / f"{stem}-info.mat{suffix}", norb_info(NORB_ROWS))
    return folder


@pytest.fixture(scope="module")
def norb_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("norb")
    write_smallnorb(root / "smallnorb")
    return root


def norb_cfg(root: Path, **kwargs) -> DataConfig:
    return DataConfig(name="smallnorb", root=str(root), download=False, **kwargs)


# --------------------------------------------------------------------------- IDX


@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_idx_reader_round_trips_plain_and_gzipped_files(tmp_path, suffix):
    images = np.random.default_rng(1).integers(0, 256, (5, 28, 28), dtype=np.uint8)
    labels = np.array([3, 1, 4, 1, 5], dtype=np.uint8)
    read_images = read_idx(write_idx(tmp_path / f"images{suffix}", images), data.IDX_IMAGES_MAGIC)
    read_labels = read_idx(write_idx(tmp_path / f"labels{suffix}", labels), data.IDX_LABELS_MAGIC)
    assert read_images.dtype == torch.uint8 and torch.equal(read_images, torch.from_numpy(images))
    assert torch.equal(read_labels, torch.from_numpy(labels))


def test_readers_go_by_the_gzip_signature_not_by_the_file_name(tmp_path):
    images = np.random.default_rng(3).integers(0, 256, (2, 28, 28), dtype=np.uint8)
    packed, plain = write_idx(tmp_path / "a.gz", images), write_idx(tmp_path / "b", images)
    packed.rename(tmp_path / "packed-without-suffix")
    plain.rename(tmp_path / "plain.gz")
    for path in (tmp_path / "packed-without-suffix", tmp_path / "plain.gz"):
        assert torch.equal(read_idx(path, data.IDX_IMAGES_MAGIC), torch.from_numpy(images))
    labels = write_norb(tmp_path / "cat.mat.gz", np.arange(4, dtype=np.int32))
    labels = labels.rename(tmp_path / "cat.mat")
    assert smallnorb.read_norb_matrix(labels).tolist() == [0, 1, 2, 3]


def test_idx_reader_rejects_wrong_magic_number(tmp_path):
    path = write_idx(tmp_path / "labels-idx1-ubyte", np.zeros(4, dtype=np.uint8))
    with pytest.raises(DataFormatError, match="magic") as info:
        read_idx(path, data.IDX_IMAGES_MAGIC)
    assert str(path) in str(info.value)
    garbage = tmp_path / "garbage"
    garbage.write_bytes(b"\x12\x34\x56\x78" + bytes(16))
    with pytest.raises(DataFormatError, match="garbage"):
        read_idx(garbage)


@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_idx_reader_rejects_truncated_body(tmp_path, suffix):
    path = tmp_path / f"images{suffix}"
    header = bytes([0, 0, 8, 3]) + struct.pack(">3I", 10, 28, 28)
    with _opener(path)(path, "wb") as f:
        f.write(header + bytes(28 * 28 * 9))
    with pytest.raises(DataFormatError, match="truncated") as info:
        read_idx(path)
    assert path.name in str(info.value)


@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_a_header_announcing_more_data_than_memory_is_a_format_error(tmp_path, suffix, monkeypatch):
    """A corrupt size field: the readers compare it with the data, never allocate it."""
    monkeypatch.setattr(data, "READ_PIECE", 1000)  # a gzip body is read in several pieces
    idx = tmp_path / f"images{suffix}"
    with _opener(idx)(idx, "wb") as f:  # 2^32 - 1 images of 28 x 28 bytes: about 3 TiB
        f.write(bytes([0, 0, 8, 3]) + struct.pack(">3I", 2**32 - 1, 28, 28) + bytes(28 * 28 * 3))
    with pytest.raises(
        DataFormatError, match=r"truncated: header says \(4294967295, 28, 28\) = .* found 2352"
    ):
        read_idx(idx)
    norb = tmp_path / f"dat.mat{suffix}"
    with _opener(norb)(norb, "wb") as f:  # int32 dims whose product overflows 64 bits
        f.write(struct.pack("<ii8i", 0x1E3D4C55, 8, *[2**31 - 1] * 8) + bytes(10))
    with pytest.raises(DataFormatError, match=r"truncated: header says .* found 10"):
        smallnorb.read_norb_matrix(norb)
    images = np.random.default_rng(2).integers(0, 256, (7, 28, 28), dtype=np.uint8)  # 5.5 pieces
    assert torch.equal(read_idx(write_idx(tmp_path / f"ok{suffix}", images)), torch.from_numpy(images))


def test_mnist_is_read_from_idx_files_under_the_root(tmp_path):
    write_mnist(tmp_path / "mnist" / "raw", gz=False)
    train, val, test, info = build_datasets(DataConfig(name="mnist", root=str(tmp_path), download=False))
    assert val is None and len(train) == 30 and len(test) == 12
    source = str(tmp_path / "mnist" / "raw")
    assert info == DataInfo(10, 1, 28, [str(i) for i in range(10)], [0.1307], [0.3081], source)
    image, label = test[3]
    assert image.dtype == torch.float32 and image.shape == (1, 28, 28) and label == 3
    assert isinstance(label, int)
    augmented, _ = train[0]
    assert augmented.shape == (1, 28, 28)


def test_the_files_of_one_idx_dataset_are_refused_as_the_other_s(tmp_path, monkeypatch):
    """MNIST's and Fashion-MNIST's files have the same names: those of one in a folder that the other
    searches are told apart by their first labels, not trained under the other's classes."""
    rng = np.random.default_rng(0)
    system = tmp_path / "system"  # the installed copies, each in its own folder
    for name in ("mnist", "fashion-mnist"):
        monkeypatch.setitem(data.SYSTEM_DATA_DIRS, name, [system / name])
    first = {
        "mnist": ([5, 0, 4, 1, 9, 2, 1, 3, 1, 4], [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]),
        "fashion-mnist": ([9, 0, 0, 3, 0, 2, 7, 2, 5, 5], [9, 2, 1, 1, 6, 1, 4, 6, 5, 7]),
    }

    def files(folder: Path, train_labels: list[int], test_labels: list[int]) -> Path:
        folder.mkdir()
        for stem, labels in (("train", train_labels + [3, 3]), ("t10k", test_labels)):
            images = rng.integers(0, 256, (len(labels), 28, 28), dtype=np.uint8)
            write_idx(folder / f"{stem}-images-idx3-ubyte.gz", images)
            write_idx(folder / f"{stem}-labels-idx1-ubyte.gz", np.array(labels, dtype=np.uint8))
        return folder

    for name, other in (("mnist", "fashion-mnist"), ("fashion-mnist", "mnist")):
        root = files(tmp_path / f"{other}-flat", *first[other])
        train, _, test, _ = build_datasets(DataConfig(name=other, root=str(root), download=False))
        assert (train.targets[:10].tolist(), test.targets.tolist()) == first[other]
        with pytest.raises(DataFormatError) as caught:
            build_datasets(DataConfig(name=name, root=str(root), download=False))
        assert str(caught.value) == (
            f"{root}/train-labels-idx1-ubyte.gz: these are {other}'s train labels (they begin "
            f"{first[other][0]}), not {name}'s. The two datasets' files have the same names: keep each "
            f"in its own folder, data.root/{name} for {name}"
        )
    # a training file of one with the test file of the other: the test file is refused
    root = files(tmp_path / "mixed", first["mnist"][0], first["fashion-mnist"][1])
    with pytest.raises(DataFormatError, match=r"t10k-labels-idx1-ubyte.gz: these are fashion-mnist's test"):
        build_datasets(DataConfig(name="mnist", root=str(root), download=False))
    # labels that begin otherwise are either dataset's
    root = files(tmp_path / "own", [1] * 10, [2] * 10)
    for name in first:
        assert len(build_datasets(DataConfig(name=name, root=str(root), download=False))[0]) == 12
    # the other's files in data.root do not hide a dataset's own in a folder searched later
    system.mkdir()
    files(system / "fashion-mnist", *first["fashion-mnist"])
    root = tmp_path / "mnist-flat"
    train, _, test, _ = build_datasets(DataConfig(name="fashion-mnist", root=str(root), download=False))
    assert (train.targets[:10].tolist(), test.targets.tolist()) == first["fashion-mnist"]
    # each dataset in its own folder as advised, one of them in data.root itself: each finds its own
    for name, other in (("mnist", "fashion-mnist"), ("fashion-mnist", "mnist")):
        root = files(tmp_path / f"{other}-beside", *first[other])
        files(root / name, *first[name])
        for which in (name, other):
            train, _, test, _ = build_datasets(DataConfig(name=which, root=str(root), download=False))
            assert (train.targets[:10].tolist(), test.targets.tolist()) == first[which]


def _augmented_views(tmp_path, **kwargs) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
    """Image 0 as evaluated, 30 draws of it through the training transform, and the value of padding."""
    write_mnist(tmp_path)
    train, _, _, _ = build_datasets(
        DataConfig(name="fashion-mnist", root=str(tmp_path), download=False, **kwargs)
    )
    clean = train.eval_transform(train._pixels[0])
    blank = train.eval_transform(np.zeros((1, 1, 1), dtype=np.uint8))[0, 0, 0]
    return clean, [train[0][0] for _ in range(30)], blank


def test_data_shift_and_flip_choose_the_training_augmentation(tmp_path):
    torch.manual_seed(0)
    clean, views, _ = _augmented_views(tmp_path, augment=True, shift=0, flip=False)
    assert all(torch.equal(v, clean) for v in views)
    clean, views, _ = _augmented_views(tmp_path, augment=True, shift=0)  # clothes: flips by default
    mirrored = clean.flip(-1)
    assert all(torch.equal(v, clean) or torch.equal(v, mirrored) for v in views)
    assert any(torch.equal(v, mirrored) for v in views) and any(torch.equal(v, clean) for v in views)
    clean, views, blank = _augmented_views(tmp_path, augment=True, shift=3, flip=False)
    assert max(_blank_border(v, blank) for v in views) == 3
    # Fashion-MNIST's default: 2 px (and flips)
    clean, views, blank = _augmented_views(tmp_path, augment=True)
    assert max(_blank_border(v, blank) for v in views) == 2
    with pytest.raises(ConfigError, match="data.shift: 28 pixels is not smaller than the 28-pixel images"):
        _augmented_views(tmp_path, augment=True, shift=28)


@pytest.mark.parametrize(
    "name, augment, flip",
    [
        ("fashion-mnist", True, None),
        ("fashion-mnist", True, False),
        ("fashion-mnist", False, None),
        ("mnist", True, None),
        ("mnist", True, True),
        ("cifar10", True, None),
        ("cifar10", True, False),
    ],
)
def test_trains_with_flips_says_what_the_built_training_transform_does(tmp_path, name, augment, flip):
    if name == "cifar10":
        write_cifar10(tmp_path / "cifar10")
    else:
        write_mnist(tmp_path / name)
    cfg = DataConfig(name=name, root=str(tmp_path), download=False, augment=augment, flip=flip)
    train, _, _, _ = build_datasets(cfg)
    expected = name != "mnist" if flip is None else flip
    assert data.trains_with_flips(cfg) is (augment and expected)
    assert getattr(train.transform, "flip", False) is data.trains_with_flips(cfg)


def test_trains_with_flips_is_false_for_datasets_with_their_own_augmentation():
    assert not data.trains_with_flips(DataConfig(name="smallnorb", augment=True))
    assert not data.trains_with_flips(DataConfig(name="synthetic", augment=True))
    assert not data.trains_with_flips(DataConfig(name="folder", augment=True))
    assert data.trains_with_flips(DataConfig(name="folder", augment=True, flip=True))


def _blank_border(image: torch.Tensor, blank: torch.Tensor) -> int:
    """The most rows or columns of padding on any side of a (1, H, W) image (random images have none)."""
    empty = image[0] == blank
    rows, cols = empty.all(dim=1).tolist(), empty.all(dim=0).tolist()
    return max(_run(rows), _run(rows[::-1]), _run(cols), _run(cols[::-1]))


def _run(flags: list[bool]) -> int:
    n = 0
    while n < len(flags) and flags[n]:
        n += 1
    return n


def test_data_shift_and_flip_are_checked_against_augment_and_the_dataset():
    with pytest.raises(ConfigError, match="data.shift: has no effect unless data.augment is true"):
        config_from_dict({"data": {"augment": False, "shift": 2}})
    with pytest.raises(ConfigError, match="data.flip: not used by data.name 'smallnorb'"):
        config_from_dict({"data": {"name": "smallnorb", "augment": True, "flip": True}})
    with pytest.raises(ConfigError, match="data.shift: must not be negative"):
        config_from_dict({"data": {"augment": True, "shift": -1}})
    cfg = config_from_dict({"data": {"augment": True, "shift": 2, "flip": False}})
    assert cfg.data.shift == 2 and cfg.data.flip is False


def test_image_size_resizes_idx_images_by_interpolation(tmp_path):
    write_mnist(tmp_path)
    cfg = DataConfig(name="fashion-mnist", root=str(tmp_path), download=False, image_size=32)
    train, _, test, info = build_datasets(cfg)
    assert info.image_size == 32 and info.class_names[0] == "T-shirt/top"
    assert train[0][0].shape == (1, 32, 32) and test[0][0].shape == (1, 32, 32)


def test_mismatched_idx_label_count_is_a_format_error(tmp_path):
    write_mnist(tmp_path)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.zeros(5, dtype=np.uint8))
    with pytest.raises(DataFormatError, match="t10k-labels"):
        build_datasets(DataConfig(name="mnist", root=str(tmp_path), download=False))


def test_idx_images_of_another_size_or_of_no_pixels_are_a_format_error(tmp_path):
    write_mnist(tmp_path)
    cfg = DataConfig(name="mnist", root=str(tmp_path), download=False)
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", np.zeros((12, 20, 20), dtype=np.uint8))
    with pytest.raises(DataFormatError, match=r"t10k-images.*\(20, 20\) images, but those of .*\(28, 28\)"):
        build_datasets(cfg)
    write_mnist(tmp_path)
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", np.zeros((30, 0, 0), dtype=np.uint8))
    with pytest.raises(DataFormatError, match=r"train-images.*expected \(N, H, W\) images"):
        build_datasets(cfg)
    write_mnist(tmp_path)
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", np.zeros((30, 28, 32), dtype=np.uint8))
    with pytest.raises(DataFormatError, match=r"train-images.*images of 28x32 pixels .*must these be"):
        build_datasets(cfg)


def test_missing_dataset_error_lists_every_folder_searched(tmp_path):
    cfg = DataConfig(name="mnist", root=str(tmp_path / "empty"), download=False)
    with pytest.raises(DatasetNotFoundError) as info:
        build_datasets(cfg)
    message = str(info.value)
    for folder in ("empty", "empty/mnist", "empty/mnist/raw", "/usr/share/datasets/mnist"):
        assert folder in message
    assert "data.download=true" in message and "data.root" in message
    assert len(message.splitlines()) <= 2
    assert tmp_path / "empty" / "mnist" in info.value.searched


def offline_download(monkeypatch, made: list[Path]):
    """Every download way offline: each makes the folders a real attempt makes, then fails."""
    import urllib.request

    import torchvision.datasets

    def idx(tv_name):
        def fetch(root, train, download):
            (Path(root) / tv_name / "raw").mkdir(parents=True, exist_ok=True)
            made.append(Path(root))
            raise OSError("network is unreachable")

        return fetch

    real = data._torchvision_split

    def torchvision_split(name, folder, train, download):
        if not download:
            return real(name, folder, train, download)
        Path(folder).mkdir(parents=True, exist_ok=True)
        made.append(Path(folder))
        raise OSError("network is unreachable")

    def urlopen(url, timeout):
        raise OSError("network is unreachable")

    monkeypatch.setattr(torchvision.datasets, "MNIST", idx("MNIST"))
    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", idx("FashionMNIST"))
    monkeypatch.setattr(data, "_torchvision_split", torchvision_split)
    monkeypatch.setattr(urllib.request, "urlopen", urlopen)


@pytest.mark.parametrize("name", ["mnist", "fashion-mnist", "cifar10", "svhn", "smallnorb"])
def test_a_failed_download_leaves_no_folders_behind_and_advises_network_access(tmp_path, monkeypatch, name):
    monkeypatch.setitem(data.SYSTEM_DATA_DIRS, name, [tmp_path / "system"])
    made: list[Path] = []
    offline_download(monkeypatch, made)
    (tmp_path / "kept").mkdir()  # a data.root that was there before stays
    for root in (tmp_path / "data" / "deeper", tmp_path / "kept"):
        with pytest.raises(DatasetNotFoundError, match="network is unreachable") as info:
            build_datasets(DataConfig(name=name, root=str(root), download=True))
        advice = str(info.value).splitlines()[1]
        assert "a rerun with network access (data.download is true)" in advice, advice
        assert "data.download=true" not in advice
    assert made or name == "smallnorb"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept"] and not any((tmp_path / "kept").iterdir())
    with pytest.raises(DatasetNotFoundError, match="data.download is false") as off:
        build_datasets(DataConfig(name=name, root=str(tmp_path / "kept"), download=False))
    assert "data.download=true with network access" in str(off.value).splitlines()[1]


def test_missing_fashion_mnist_suggests_the_debian_package(tmp_path, monkeypatch):
    monkeypatch.setitem(data.SYSTEM_DATA_DIRS, "fashion-mnist", [tmp_path / "system"])
    with pytest.raises(DatasetNotFoundError, match="apt-get install dataset-fashion-mnist") as info:
        build_datasets(DataConfig(name="fashion-mnist", root=str(tmp_path / "root"), download=False))
    assert str(tmp_path / "system") in str(info.value)


def test_the_data_says_which_folder_it_was_read_from_when_found_outside_data_root(tmp_path, monkeypatch):
    """Where data.root lacks the files, the system folder that has them is what the run says it used."""
    write_mnist(tmp_path / "system")
    monkeypatch.setitem(data.SYSTEM_DATA_DIRS, "fashion-mnist", [tmp_path / "system"])
    cfg = DataConfig(name="fashion-mnist", root=str(tmp_path / "nowhere"), download=False)
    assert build_datasets(cfg)[3].source == str(tmp_path / "system")
    write_mnist(tmp_path / "nowhere")  # the root is searched first
    assert build_datasets(cfg)[3].source == str(tmp_path / "nowhere")
    synthetic = DataConfig(name="synthetic", image_size=20, num_classes=4, train_size=8, test_size=4)
    assert build_datasets(synthetic)[3].source is None  # made, not read
    # training says it on its data line
    lines: list[str] = []
    cfg = tiny(tmp_path, "data.name=fashion-mnist", f"data.root={tmp_path / 'nowhere'}", "train.max_steps=1")
    fit(cfg, run_name="said", echo=lines.append)
    said = [line for line in lines if line.startswith("data fashion-mnist:")]
    assert len(said) == 1 and said[0].endswith(f", from {tmp_path / 'nowhere'}"), lines


def write_cifar10(root: Path, per_batch: int = 3, seed: int = 0) -> Path:
    """CIFAR-10's python release under ``root``: six pickled batches and batches.meta.

    Each batch is a dict with bytes keys (the release was pickled by Python 2) whose
    b"data" is an (N, 3072) uint8 array of red, green and blue 32 x 32 planes and whose
    b"labels" is a list of ints; NumPy's module is named as the release's pickles name it.
    """
    import pickle

    folder = root / data.CIFAR10_FOLDER
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for i, name in enumerate([*data.CIFAR10_BATCHES["train"], *data.CIFAR10_BATCHES["test"]]):
        batch = {
            b"batch_label": f"batch {i}".encode(),
            b"labels": [int(v) for v in rng.integers(0, 10, per_batch)],
            b"data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
            b"filenames": [f"img{i}_{k}.png".encode() for k in range(per_batch)],
        }
        raw = pickle.dumps(batch, protocol=2).replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
        (folder / name).write_bytes(raw)
    (folder / "batches.meta").write_bytes(pickle.dumps({b"label_names": [b"airplane"] * 10}, protocol=2))
    return folder


def test_cifar10_is_read_from_its_python_release_without_torchvision(tmp_path):
    import pickle

    folder = write_cifar10(tmp_path / "cifar10")
    train, _, test, info = build_datasets(DataConfig(name="cifar10", root=str(tmp_path), download=False))
    assert (len(train), len(test), info.channels, info.image_size, info.num_classes) == (15, 3, 3, 32, 10)
    first = pickle.loads((folder / "data_batch_1").read_bytes(), encoding="bytes")
    # row n: the red plane, then green, then blue, each 32 rows of 32 pixels
    assert torch.equal(train.images[0, 1, 2, 5], torch.tensor(first[b"data"][0, 1024 + 2 * 32 + 5]))
    assert train.labels[:3].tolist() == first[b"labels"]
    last = pickle.loads((folder / "test_batch").read_bytes(), encoding="bytes")
    assert torch.equal(test.images.reshape(3, -1), torch.from_numpy(last[b"data"]))


def test_a_corrupt_or_doctored_cifar10_batch_is_a_format_error_naming_it(tmp_path):
    import pickle

    folder = write_cifar10(tmp_path)
    (folder / "test_batch").write_bytes(b"\x80\x02}q\x00(")  # cut short
    with pytest.raises(DataFormatError, match=r"test_batch: not a CIFAR-10 batch file"):
        build_datasets(DataConfig(name="cifar10", root=str(tmp_path), download=False))
    marker = tmp_path / "marker"
    evil = pickle.dumps({b"data": _Touches(marker)}, protocol=2)
    (folder / "test_batch").write_bytes(evil)
    with pytest.raises(DataFormatError, match="refusing to load"):
        build_datasets(DataConfig(name="cifar10", root=str(tmp_path), download=False))
    assert not marker.exists()
    wrong = {b"data": np.zeros((2, 1024), dtype=np.uint8), b"labels": [0, 1]}
    (folder / "test_batch").write_bytes(pickle.dumps(wrong, protocol=2))
    with pytest.raises(DataFormatError, match="rows of 1024 bytes, not 3 x 32 x 32 = 3072"):
        build_datasets(DataConfig(name="cifar10", root=str(tmp_path), download=False))


@pytest.mark.parametrize(
    "labels", [[0.5, 1.7], [2**70, 1], [float("inf"), 1.0], [True, False], ["1", "2"]], ids=repr
)
def test_cifar10_labels_that_are_not_whole_class_numbers_are_a_format_error(tmp_path, labels):
    """Fractions were cut to a class number; numbers past 64 bits and infinities were tracebacks."""
    import pickle

    folder = write_cifar10(tmp_path)
    batch = {b"data": np.zeros((2, 3072), dtype=np.uint8), b"labels": labels}
    (folder / "test_batch").write_bytes(pickle.dumps(batch, protocol=2))
    with pytest.raises(DataFormatError, match=r"test_batch: its 'labels' are not one class number per image"):
        build_datasets(DataConfig(name="cifar10", root=str(tmp_path), download=False))


def test_a_cifar10_batch_with_a_key_that_is_not_utf8_is_still_read(tmp_path):
    import pickle

    folder = write_cifar10(tmp_path)
    batch = pickle.loads((folder / "test_batch").read_bytes(), encoding="bytes")
    batch[b"\xff\xfe"] = 1  # a key the release does not have, in no text encoding
    (folder / "test_batch").write_bytes(pickle.dumps(batch, protocol=2))
    _, _, test, _ = build_datasets(DataConfig(name="cifar10", root=str(tmp_path), download=False))
    assert test.labels.tolist() == batch[b"labels"]


def test_a_corrupt_cifar10_batch_is_named_when_downloading_the_release_again_fails(tmp_path, monkeypatch):
    """With data.download on, a damaged release is downloaded again; offline, the error names the
    damaged file, not "cifar10 not found"."""
    folder = write_cifar10(tmp_path)
    (folder / "test_batch").write_bytes(b"\x80\x02}q\x00(")  # cut short
    asked = []

    def offline(name, root, train, download):
        asked.append((train, download))
        raise OSError("<urlopen error [Errno -3] Temporary failure in name resolution>")

    monkeypatch.setattr(data, "_torchvision_split", offline)
    with pytest.raises(DataFormatError) as caught:
        build_datasets(DataConfig(name="cifar10", root=str(tmp_path), download=True))
    assert asked == [(True, True)]
    message = str(caught.value)
    assert message.startswith(f"{folder / 'test_batch'}: not a CIFAR-10 batch file")
    assert message.endswith(
        "; downloading the release again to replace it failed: "
        "<urlopen error [Errno -3] Temporary failure in name resolution>"
    )
    # online, the release downloaded again is what is read
    fresh = (torch.zeros(2, 3, 32, 32, dtype=torch.uint8), torch.tensor([1, 2]))
    monkeypatch.setattr(data, "_torchvision_split", lambda name, root, train, download: fresh)
    train, _, test, _ = build_datasets(DataConfig(name="cifar10", root=str(tmp_path), download=True))
    assert train.labels.tolist() == test.labels.tolist() == [1, 2]


def test_a_cifar10_archive_left_packed_is_named_when_the_data_is_not_found(tmp_path):
    (tmp_path / data.CIFAR10_ARCHIVE).write_bytes(b"archive")
    with pytest.raises(DatasetNotFoundError, match=r"cifar-10-python.tar.gz is there but not unpacked"):
        build_datasets(DataConfig(name="cifar10", root=str(tmp_path), download=False))


def test_a_corrupt_svhn_file_is_not_reported_as_missing(tmp_path):
    (tmp_path / "train_32x32.mat").write_bytes(b"not the real file")
    with pytest.raises(DataFormatError, match=r"train_32x32.mat: present but failing torchvision's checksum"):
        build_datasets(DataConfig(name="svhn", root=str(tmp_path), download=False))


class _Touches:
    """Pickles as a call that creates ``path``: what a doctored data file could do."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


def test_missing_smallnorb_and_cifar_raise_dataset_not_found(tmp_path):
    for name in ("smallnorb", "cifar10"):
        with pytest.raises(DatasetNotFoundError, match=str(tmp_path)):
            build_datasets(DataConfig(name=name, root=str(tmp_path), download=False))


@pytest.mark.skipif(
    not (FASHION_DIR / "train-images-idx3-ubyte.gz").is_file(),
    reason=f"Fashion-MNIST is not installed in {FASHION_DIR} (apt-get install dataset-fashion-mnist)",
)
def test_real_fashion_mnist_is_found_in_the_system_folder(tmp_path):
    train, _, test, info = build_datasets(
        DataConfig(name="fashion-mnist", root=str(tmp_path), download=False)
    )
    assert (len(train), len(test), info.num_classes, info.channels) == (60000, 10000, 10, 1)
    assert torch.bincount(test.targets, minlength=10).tolist() == [1000] * 10
    image, _ = test[0]
    assert image.shape == (1, 28, 28) and abs(float(image.mean())) < 3
    # the same files given to MNIST as its data.root are refused, not trained as digits
    with pytest.raises(DataFormatError, match="these are fashion-mnist's train labels"):
        build_datasets(DataConfig(name="mnist", root=str(FASHION_DIR), download=False))


def test_pixel_transform_normalises_and_shifts_with_black_padding():
    x = np.arange(1, 17, dtype=np.uint8).reshape(1, 4, 4)
    normalise = PixelTransform([0.5], [0.25])
    expected = (torch.from_numpy(x).float() / 255 - 0.5) / 0.25
    assert torch.allclose(normalise(x), expected)
    moved = shifted(x, 1, -1)  # one row down, one column left
    assert np.array_equal(moved[:, 1:, :3], x[:, :3, 1:]) and moved[:, 0].sum() == moved[:, :, 3].sum() == 0
    augment = PixelTransform([0.5], [0.25], padding=1, flip=True)
    candidates = [
        normalise(np.ascontiguousarray(v))
        for dy in (-1, 0, 1)
        for dx in (-1, 0, 1)
        for v in (shifted(x, dy, dx), shifted(x, dy, dx)[:, :, ::-1])
    ]
    outputs = [augment(x) for _ in range(40)]
    assert all(any(torch.equal(out, c) for c in candidates) for out in outputs)
    assert len({tuple(out.flatten().tolist()) for out in outputs}) > 3


def test_random_erasing_replaces_one_rectangle_of_the_paper_sizes_and_leaves_the_source_alone():
    torch.manual_seed(0)
    x = np.zeros((2, 28, 28), dtype=np.uint8)
    source = x.copy()
    shapes = []
    for _ in range(300):
        out = data.erased(x)
        assert out.shape == x.shape and out.dtype == np.uint8
        changed = (out != 0).any(axis=0)
        rows, cols = np.nonzero(changed.any(axis=1))[0], np.nonzero(changed.any(axis=0))[0]
        h, w = rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1
        # one rectangle: nothing changed outside its bounding box, and most of it changed
        # (random levels hit 0, the original value, with probability 1/256 per pixel)
        inside = changed[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1].sum()
        assert changed.sum() > 0.9 * h * w and changed.sum() == inside
        assert (out[0] != out[1]).any()  # every channel draws its own levels
        shapes.append((h, w))
    assert np.array_equal(x, source)
    areas = np.array([h * w for h, w in shapes]) / (28 * 28)
    aspects = np.array([h / w for h, w in shapes])
    # the drawn share lies in [0.02, 0.4] and the ratio in [0.3, 3.3]; rounding to whole pixels
    # moves a side by at most half a pixel
    assert areas.min() >= 0.01 and areas.max() <= 0.45
    assert aspects.min() >= 0.25 and aspects.max() <= 4.0
    assert areas.mean() == pytest.approx(0.21, abs=0.03)
    assert (aspects > 1).mean() == pytest.approx(0.5, abs=0.1)
    assert len(set(shapes)) > 30


def test_random_erasing_gives_up_on_an_image_too_small_for_any_draw():
    torch.manual_seed(0)
    x = np.full((1, 1, 1), 7, dtype=np.uint8)  # 1x1: every draw rounds to 0 rows or columns
    out = data.erased(x)
    assert np.array_equal(out, x) and out is not x


def test_data_erase_applies_random_erasing_with_its_probability(tmp_path):
    torch.manual_seed(0)
    clean, views, _ = _augmented_views(tmp_path, augment=True, shift=0, flip=False, erase=0.5)
    erased_views = sum(not torch.equal(v, clean) for v in views)
    assert 5 <= erased_views <= 25  # 30 views, each erased with probability 1/2
    clean, views, _ = _augmented_views(tmp_path, augment=True, shift=0, flip=False, erase=1.0)
    assert all(not torch.equal(v, clean) for v in views)
    for bad, message in [
        ({"augment": True, "erase": 1.5}, "data.erase: must be a probability in \\[0, 1\\], got 1.5"),
        ({"augment": True, "erase": -0.1}, "data.erase: must be a probability"),
        ({"augment": False, "erase": 0.5}, "data.erase: has no effect unless data.augment is true"),
        (
            {"name": "smallnorb", "augment": True, "erase": 0.5},
            "data.erase: not used by data.name 'smallnorb'",
        ),
    ]:
        with pytest.raises(ConfigError, match=message):
            config_from_dict({"data": bad})
    assert config_from_dict({"data": {"augment": True, "erase": 1}}).data.erase == 1


def test_keys_of_one_dataset_set_for_another_are_refused_with_the_dataset_they_belong_to():
    for bad, message in [
        (
            {"name": "fashion-mnist", "split": "azimuth"},
            "data.split: only used by data.name 'smallnorb', not",
        ),
        (
            {"name": "synthetic", "stereo": "samples"},
            "data.stereo: only used by .* \\(leave it at channels\\)",
        ),
        ({"name": "mnist", "train_dir": "imgs"}, "data.train_dir: only used by data.name 'folder'"),
        ({"name": "cifar10", "grayscale": True}, "data.grayscale: .*'folder'.*leave it at false"),
        ({"name": "smallnorb", "bad_files": "fail"}, "data.bad_files: only used by data.name 'folder'"),
    ]:
        with pytest.raises(ConfigError, match=message):
            config_from_dict({"data": bad})
    norb = config_from_dict({"data": {"name": "smallnorb", "split": "azimuth", "stereo": "samples"}})
    assert (norb.data.split, norb.data.stereo) == ("azimuth", "samples")
    folder = config_from_dict({"data": {"name": "folder", "train_dir": "imgs", "grayscale": True}})
    assert folder.data.grayscale and folder.data.train_dir == "imgs"
    # their defaults may stay in any config, as every saved config holds them
    assert (
        config_from_dict({"data": {"name": "mnist", "split": "standard", "test_dir": None}}).data.name
        == "mnist"
    )


# --------------------------------------------------------------------------- smallNORB


def test_smallnorb_download_fetches_only_the_missing_files_and_keeps_no_cut_one(tmp_path, monkeypatch):
    import io
    import urllib.request

    write_smallnorb(tmp_path / "smallnorb")  # training files gzipped, testing files plain
    missing = tmp_path / "smallnorb" / f"{smallnorb.FILES['test']}-info.mat"
    body = gzip.compress(missing.read_bytes())
    missing.unlink()
    asked: list[str] = []
    announced = {"size": len(body)}

    class Response(io.BytesIO):
        @property
        def headers(self):
            return {"Content-Length": str(announced["size"])}

    def urlopen(url, timeout):
        asked.append(url.rsplit("/", 1)[-1])
        return Response(body)

    monkeypatch.setattr(urllib.request, "urlopen", urlopen)
    files = smallnorb.locate(tmp_path, allow_download=True)
    assert asked == [f"{smallnorb.FILES['test']}-info.mat.gz"]  # the five on disk are not fetched again
    assert len(files) == 6 and files["test", "info"].name.endswith("-info.mat.gz")
    assert np.array_equal(smallnorb.read_norb_matrix(files["test", "info"]), norb_info(NORB_ROWS))
    # a connection that ends early leaves no file behind, and says so
    files["test", "info"].unlink()
    announced["size"] = len(body) + 100
    with pytest.raises(DatasetNotFoundError, match="the connection ended after"):
        smallnorb.locate(tmp_path, allow_download=True)
    assert not list((tmp_path / "smallnorb").glob(f"{smallnorb.FILES['test']}-info.mat*"))


def test_smallnorb_reader_reads_gzipped_and_plain_matrix_files(norb_root):
    folder = norb_root / "smallnorb"
    dat = smallnorb.read_norb_matrix(folder / f"{smallnorb.FILES['train']}-dat.mat.gz")
    cat = smallnorb.read_norb_matrix(folder / f"{smallnorb.FILES['test']}-cat.mat")
    info = smallnorb.read_norb_matrix(folder / f"{smallnorb.FILES['test']}-info.mat")
    assert dat.shape == (NORB_ROWS, 2, 96, 96) and dat.dtype == np.uint8
    assert cat.shape == (NORB_ROWS,) and cat.tolist() == [i % 5 for i in range(NORB_ROWS)]
    assert np.array_equal(info, norb_info(NORB_ROWS))


def test_smallnorb_stereo_channels_gives_two_channel_32px_crops(norb_root):
    train, val, test, info = build_datasets(norb_cfg(norb_root))
    assert val is None and len(train) == len(test) == NORB_ROWS
    assert (info.num_classes, info.channels, info.image_size) == (5, 2, 32)
    assert info.class_names == ["animal", "human", "airplane", "truck", "car"]
    assert train.images.shape == (NORB_ROWS, 2, 48, 48)  # downsampled once at load
    for dataset in (train, test):
        image, label = dataset[7]
        assert image.shape == (2, 32, 32) and image.dtype == torch.float32 and label == 7 % 5
    assert split_names(norb_cfg(norb_root)) == ["train", "test"]


def test_smallnorb_stereo_samples_makes_each_view_a_one_channel_item(norb_root):
    train, _, test, info = build_datasets(norb_cfg(norb_root, stereo="samples"))
    assert len(train) == len(test) == 2 * NORB_ROWS and info.channels == 1
    pair = torch.cat([test[10][0], test[11][0]])  # the two views of row 5
    assert pair.shape == (2, 32, 32) and test[10][1] == test[11][1] == 5 % 5
    _, _, stereo_test, _ = build_datasets(norb_cfg(norb_root))
    assert torch.allclose(pair, stereo_test[5][0])  # same pixels as the 2-channel item of row 5


def test_smallnorb_downsampling_averages_2x2_blocks(tmp_path):
    images = np.zeros((1, 2, 96, 96), dtype=np.uint8)
    images[0, 0, 0, :2] = 200  # the first 2x2 block averages to 100
    images[0, 1] = 7
    small = smallnorb.downsample(images, 48)
    assert small.shape == (1, 2, 48, 48)
    assert small[0, 0, 0, 0] == 100 and small[0, 0, 0, 1] == 0 and bool((small[0, 1] == 7).all())


def test_smallnorb_images_are_standardised_per_image_before_the_crop(norb_root):
    _, _, test, _ = build_datasets(norb_cfg(norb_root))
    standardised = torch.from_numpy(per_image_standardise(test.images[4].numpy()))  # (2, 48, 48)
    assert torch.allclose(standardised.mean(dim=(1, 2)), torch.zeros(2), atol=1e-5)
    assert torch.allclose(standardised.std(dim=(1, 2), correction=0), torch.ones(2), atol=1e-4)
    pixels = test.images[4].double()
    mean = pixels.mean(dim=(1, 2), keepdim=True)
    reference = (pixels - mean) / pixels.std(dim=(1, 2), correction=0, keepdim=True)
    item = test[4][0]  # test items: the centre 32 x 32 of the standardised 48 x 48 image
    assert torch.allclose(item.double(), reference[:, 8:40, 8:40], atol=1e-5)


def test_smallnorb_training_items_are_random_crops_with_jitter(norb_root):
    train, _, _, _ = build_datasets(norb_cfg(norb_root))
    torch.manual_seed(0)
    first, second = train[0][0], train[0][0]
    assert first.shape == second.shape == (2, 32, 32)
    assert not torch.allclose(first, second)


@pytest.mark.parametrize(
    ("split", "column", "familiar"),
    [("azimuth", "azimuth", {300, 320, 340, 0, 20, 40}), ("elevation", "elevation", {0, 1, 2})],
)
def test_viewpoint_splits_select_exactly_the_documented_viewpoints(norb_root, split, column, familiar):
    train, _, test, _ = build_datasets(norb_cfg(norb_root, split=split))
    test_familiar = test.extra_splits["test_familiar"]
    values = {
        name: ds.selected_meta()[column].tolist()
        for name, ds in (("train", train), ("test", test), ("familiar", test_familiar))
    }
    info = norb_info(NORB_ROWS)
    every = (info[:, 2] * 10).tolist() if column == "azimuth" else info[:, 1].tolist()
    assert sorted(values["train"]) == sorted(v for v in every if v in familiar)
    assert sorted(values["familiar"]) == sorted(v for v in every if v in familiar)
    assert sorted(values["test"]) == sorted(v for v in every if v not in familiar)
    assert len(values["test"]) + len(values["familiar"]) == NORB_ROWS
    if column == "azimuth":
        assert all(60 <= v <= 280 for v in values["test"])
    else:
        assert all(3 <= v <= 8 for v in values["test"])
    labels = [label for _, label in test]
    assert labels == [i % 5 for i in range(NORB_ROWS) if every[i] not in familiar]
    assert split_names(norb_cfg(norb_root, split=split)) == ["train", "test", "test_familiar"]


@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_smallnorb_reader_rejects_wrong_magic_and_truncated_files(tmp_path, suffix):
    labels = write_norb(tmp_path / f"cat.mat{suffix}", np.arange(4, dtype=np.int32))
    with pytest.raises(DataFormatError, match="magic") as info:
        smallnorb.read_norb_matrix(labels, smallnorb.EXPECTED_MAGIC["dat"])
    assert labels.name in str(info.value)
    truncated = tmp_path / f"dat.mat{suffix}"
    header = struct.pack("<ii4i", 0x1E3D4C55, 4, 3, 2, 96, 96)
    with _opener(truncated)(truncated, "wb") as f:
        f.write(header + bytes(3 * 2 * 96 * 96 - 10))
    with pytest.raises(DataFormatError, match="truncated") as info:
        smallnorb.read_norb_matrix(truncated)
    assert truncated.name in str(info.value)
    garbage = tmp_path / f"info.mat{suffix}"
    with _opener(garbage)(garbage, "wb") as f:
        f.write(b"\x00\x01\x02\x03" + bytes(20))
    with pytest.raises(DataFormatError, match="not a smallNORB"):
        smallnorb.read_norb_matrix(garbage)


@pytest.mark.parametrize("shape", [(NORB_ROWS, 2, 96, 80), (NORB_ROWS, 2, 0, 0), (NORB_ROWS, 2, 48, 48)])
def test_smallnorb_views_that_are_not_96_pixels_square_are_a_format_error(tmp_path, shape):
    folder = write_smallnorb(tmp_path / "smallnorb")
    write_norb(folder / f"{smallnorb.FILES['test']}-dat.mat", np.zeros(shape, dtype=np.uint8))
    with pytest.raises(DataFormatError, match=r"testing-dat.mat: expected \(N, 2, 96, 96\) stereo images"):
        build_datasets(norb_cfg(tmp_path))


def test_corrupt_smallnorb_file_fails_the_build_naming_the_file(tmp_path):
    folder = write_smallnorb(tmp_path / "smallnorb")
    bad = folder / f"{smallnorb.FILES['test']}-cat.mat"
    bad.write_bytes(bad.read_bytes()[:-4])
    with pytest.raises(DataFormatError, match="testing-cat.mat"):
        build_datasets(norb_cfg(tmp_path))


@pytest.mark.parametrize(
    ("column", "value", "message"),
    [
        (0, 10, "instance \\(column 1\\) must be 0..9, found 10"),
        (1, 9, "elevation \\(column 2\\) must be 0..8, found 9"),
        (2, 35, "azimuth \\(column 3\\) must be 0, 2, .., 34, found 35"),
        (2, 36, "azimuth \\(column 3\\) must be 0, 2, .., 34, found 36"),
        (3, -1, "lighting \\(column 4\\) must be 0..5, found -1"),
    ],
)
def test_a_smallnorb_viewpoint_outside_the_format_is_a_format_error_naming_the_file(
    tmp_path, column, value, message
):
    """An azimuth field of 35 or 36 (350 or 360 degrees) went to the novel side of the azimuth split."""
    folder = write_smallnorb(tmp_path / "smallnorb")
    info = norb_info(NORB_ROWS)
    info[3, column] = value
    write_norb(folder / f"{smallnorb.FILES['test']}-info.mat", info)
    with pytest.raises(DataFormatError, match=f"testing-info.mat: {message} in row 3; the file is damaged"):
        build_datasets(norb_cfg(tmp_path, split="azimuth"))


def test_each_smallnorb_split_takes_images_labels_and_viewpoints_from_its_own_file(tmp_path):
    """The two files differ in every field here, so no split can come from the other file unnoticed."""
    folder = tmp_path / "smallnorb"
    folder.mkdir()
    rng = np.random.default_rng(7)
    files = {}
    for split, instances, shift in (("train", [4, 6, 7, 8, 9], 0), ("test", [0, 1, 2, 3, 5], 1)):
        i = np.arange(NORB_ROWS)
        info = np.stack(
            [np.take(instances, i % 5), (i + shift) % 9, (2 * (i + 5 * shift)) % 36, (i + shift) % 6], axis=1
        ).astype(np.int32)
        views = rng.integers(0, 256, (NORB_ROWS, 2, 96, 96), dtype=np.uint8)
        cat = ((i + 2 * shift) % 5).astype(np.int32)
        stem = smallnorb.FILES[split]
        write_norb(folder / f"{stem}-dat.mat", views)
        write_norb(folder / f"{stem}-cat.mat", cat)
        write_norb(folder / f"{stem}-info.mat", info)
        files[split] = (smallnorb.downsample(views, 48), cat, info)
    train, _, test, _ = build_datasets(norb_cfg(tmp_path, split="azimuth"))
    familiar = test.extra_splits["test_familiar"]
    for dataset, split in ((train, "train"), (test, "test"), (familiar, "test")):
        images, cat, info = files[split]
        rows = dataset.rows()
        assert torch.equal(
            torch.stack([torch.as_tensor(dataset.pixels(k)) for k in range(len(dataset))]), images[rows]
        )
        assert [label for _, label in dataset] == cat[rows.numpy()].tolist()
        meta = dataset.selected_meta()
        for column, name in enumerate(("instance", "elevation", "azimuth", "lighting")):
            scale = 10 if name == "azimuth" else 1
            assert meta[name].tolist() == (info[rows.numpy(), column] * scale).tolist(), name
    assert set(train.selected_meta()["instance"].tolist()) == {4, 6, 7, 8, 9}
    assert set(test.selected_meta()["instance"].tolist()) <= {0, 1, 2, 3, 5}
    assert len(test) and len(familiar) and len(test) + len(familiar) == NORB_ROWS


@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_a_header_whose_dimensions_describe_no_array_is_a_format_error(tmp_path, suffix):
    """No data and dimensions in the billions: the body's length matches (0 bytes), the shape cannot be."""
    idx = tmp_path / f"images{suffix}"
    with _opener(idx)(idx, "wb") as f:
        f.write(bytes([0, 0, 8, 3]) + struct.pack(">3I", 0, 2**32 - 1, 2**32 - 1))
    with pytest.raises(DataFormatError, match=r"images(\.gz)?: corrupt header: dimensions \(0, 4294967295"):
        read_idx(idx)
    norb = tmp_path / f"dat.mat{suffix}"
    with _opener(norb)(norb, "wb") as f:
        f.write(struct.pack("<ii4i", 0x1E3D4C55, 4, 0, *[2**31 - 1] * 3))
    with pytest.raises(DataFormatError, match=r"dat.mat(\.gz)?: corrupt header: dimensions \(0, 2147483647"):
        smallnorb.read_norb_matrix(norb)


# --------------------------------------------------------------------------- image folder


def _save(path: Path, mode: str, size: tuple[int, int], seed: int) -> None:
    from PIL import Image

    rng = np.random.default_rng(seed)
    channels = {"L": (), "RGB": (3,), "RGBA": (4,)}[mode]
    array = rng.integers(0, 256, (size[1], size[0], *channels), dtype=np.uint8)
    Image.fromarray(array, mode=mode).save(path)


@pytest.fixture
def image_tree(tmp_path) -> Path:
    root = tmp_path / "images"
    shapes = {
        "cat": [("L", (20, 20)), ("RGB", (40, 30)), ("RGB", (64, 64)), ("L", (33, 17)), ("RGB", (8, 50))],
        "dog": [("RGBA", (50, 50)), ("RGB", (31, 31)), ("L", (16, 24)), ("RGB", (45, 20)), ("L", (60, 60))],
    }
    for label, images in shapes.items():
        (root / label).mkdir(parents=True)
        for i, (mode, size) in enumerate(images):
            _save(root / label / f"{i}.png", mode, size, seed=i)
    (root / "cat" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(40))
    (root / "dog" / "notes.txt").write_text("not an image")
    return root


def test_image_folder_skips_bad_files_with_one_warning(image_tree):
    cfg = DataConfig(name="folder", train_dir=str(image_tree), image_size=16, bad_files="skip")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train, _, test, info = build_datasets(cfg)
    skipped = [w for w in caught if "skipped" in str(w.message)]
    assert len(skipped) == 1 and "skipped 2 " in str(skipped[0].message)
    assert len(train) + len(test) == 10 and len(test) == 2  # 20% of each class (5 valid + 1 bad) held out
    assert info.class_names == ["cat", "dog"] and info.channels == 3 and info.image_size == 16
    image, label = train[0]
    assert image.shape == (3, 16, 16) and label in (0, 1)


def test_image_folder_fail_mode_raises_naming_the_bad_file(image_tree):
    cfg = DataConfig(name="folder", train_dir=str(image_tree), bad_files="fail")
    with pytest.raises(DataFormatError, match=r"broken\.png|notes\.txt"):
        build_datasets(cfg)


def test_image_folder_grayscale_and_separate_test_dir(image_tree, tmp_path):
    test_dir = tmp_path / "test"
    (test_dir / "dog").mkdir(parents=True)
    _save(test_dir / "dog" / "x.png", "RGB", (12, 12), seed=9)
    cfg = DataConfig(name="folder", train_dir=str(image_tree), test_dir=str(test_dir), grayscale=True)
    with pytest.warns(UserWarning, match="skipped 2"):
        train, _, test, info = build_datasets(cfg)
    assert info.channels == 1 and info.image_size == 32 and len(train) == 10
    assert len(test) == 1 and test[0][0].shape == (1, 32, 32) and test[0][1] == 1


@pytest.mark.parametrize("with_test_dir", [False, True])
def test_an_empty_class_folder_is_a_format_error_naming_it(image_tree, tmp_path, with_test_dir):
    (image_tree / "emu").mkdir()
    (image_tree / "emu" / ".DS_Store").write_bytes(b"hidden files do not count")
    cfg = DataConfig(
        name="folder", train_dir=str(image_tree), test_dir=str(image_tree) if with_test_dir else None
    )
    with pytest.raises(DataFormatError, match=r"class sub-folder\(s\) emu hold no files"):
        build_datasets(cfg)


def test_image_folder_test_carve_is_deterministic_and_disjoint(image_tree):
    cfg = DataConfig(name="folder", train_dir=str(image_tree), image_size=8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        first = build_datasets(cfg, seed=0)
        second = build_datasets(cfg, seed=5)
    assert torch.equal(first[2].images, second[2].images)
    train_images = {bytes(x.numpy()) for x in first[0].images}
    assert not any(bytes(x.numpy()) in train_images for x in first[2].images)


def test_held_out_by_name_fixes_each_file_s_side_by_its_own_name():
    names = [f"cls/photo_{i:04d}.jpg" for i in range(2000)]
    held = held_out_by_name(names, 0.2)
    assert 0.18 < sum(held) / len(held) < 0.22
    # files added and removed move no other file between training and test
    more = held_out_by_name(names[500:] + [f"cls/new_{i}.jpg" for i in range(300)], 0.2)
    assert more[:1500] == held[500:]
    assert held_out_by_name(list(reversed(names)), 0.2) == list(reversed(held))  # nor does the order
    assert held_out_by_name(names, 0.5) != held  # the share is the fraction's
    # a class of two or more keeps one file or more and holds out one or more
    for size in range(2, 12):
        for start in range(0, 200, size):
            few = held_out_by_name(names[start : start + size], 0.2)
            assert any(few) and not all(few), (size, start)
    assert held_out_by_name(["only.png"], 0.2) in ([True], [False])
    assert held_out_by_name([], 0.2) == []


def test_images_added_to_a_folder_after_training_never_move_a_training_image_into_the_test_set(image_tree):
    for i in range(5, 40):
        _save(image_tree / ("cat" if i % 2 else "dog") / f"{i}.png", "RGB", (20, 20), seed=100 + i)
    cfg = DataConfig(name="folder", train_dir=str(image_tree), image_size=8)

    def split() -> tuple[set[bytes], set[bytes]]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            train, _, test, info = build_datasets(cfg)
        assert info.test_split == "by-name"
        return {bytes(x.numpy()) for x in train.images}, {bytes(x.numpy()) for x in test.images}

    trained, tested = split()
    assert len(tested) >= 2 and not trained & tested
    for i in range(40, 60):  # a user adds photos, and a note
        _save(image_tree / ("cat" if i % 2 else "dog") / f"{i}.png", "RGB", (20, 20), seed=100 + i)
    (image_tree / "cat" / "notes.txt").write_text("taken in May")
    later_trained, later_tested = split()
    assert not later_tested & trained  # not one image it trained on is scored
    assert tested <= later_tested and trained <= later_trained


def test_a_model_whose_test_fifth_was_drawn_otherwise_is_refused_when_scored():
    from capsnet.evaluate import check_test_split

    before = {"data_info": {"class_names": ["cat", "dog"], "mean": [0.5], "std": [0.2]}}
    with pytest.raises(
        DataError, match=r"run/best.pt was trained when an image folder's held-out test fifth"
    ):
        check_test_split(before, "by-name", "run/best.pt")
    check_test_split({"data_info": {**before["data_info"], "test_split": "by-name"}}, "by-name", "r")
    check_test_split(before, None, "r")  # a separate test folder, or another dataset
    check_test_split({}, "by-name", "r")  # a checkpoint that records nothing is scored as before


# --------------------------------------------------------------------------- synthetic, validation, loaders


def test_synthetic_data_is_deterministic_per_seed_with_the_configured_shape():
    cfg = DataConfig(name="synthetic", num_classes=4, channels=3, image_size=20, train_size=40, test_size=12)
    train, _, test, info = build_datasets(cfg, seed=3)
    again, _, _, _ = build_datasets(cfg, seed=3)
    other, _, _, _ = build_datasets(cfg, seed=4)
    assert (info.num_classes, info.channels, info.image_size) == (4, 3, 20)
    assert len(train) == 40 and len(test) == 12
    assert train[0][0].shape == (3, 20, 20) and set(train.targets.tolist()) == {0, 1, 2, 3}
    assert torch.equal(train.images, again.images) and torch.equal(train.labels, again.labels)
    assert not torch.equal(train.images, other.images)


def test_synthetic_data_is_learnable_by_nearest_class_mean():
    cfg = DataConfig(name="synthetic", num_classes=5, channels=1, train_size=200, test_size=100)
    train, _, test, _ = build_datasets(cfg, seed=0)
    x_train = torch.stack([x for x, _ in train]).flatten(1)
    x_test = torch.stack([x for x, _ in test]).flatten(1)
    means = torch.stack([x_train[train.targets == k].mean(0) for k in range(5)])
    predicted = torch.cdist(x_test, means).argmin(1)
    assert (predicted == test.targets).float().mean() > 0.9


def test_val_split_is_disjoint_from_train_and_deterministic():
    cfg = DataConfig(name="synthetic", train_size=50, test_size=10, val_split=0.2)
    train, val, test, _ = build_datasets(cfg, seed=1)
    again_train, again_val, _, _ = build_datasets(cfg, seed=1)
    assert len(val) == 10 and len(train) == 40 and len(test) == 10
    assert set(train.rows().tolist()).isdisjoint(val.rows().tolist())
    assert sorted(train.rows().tolist() + val.rows().tolist()) == list(range(50))
    assert torch.equal(val.rows(), again_val.rows()) and torch.equal(train.rows(), again_train.rows())
    assert val.images is train.images  # carved from the training data, never the test set
    assert split_names(cfg) == ["train", "val", "test"]


def test_val_split_uses_test_time_transforms(tmp_path):
    write_mnist(tmp_path)
    cfg = DataConfig(name="mnist", root=str(tmp_path), download=False, val_split=0.2)
    train, val, _, _ = build_datasets(cfg)
    assert train.transform is not val.transform and val.transform is val.eval_transform
    assert len(val) == 6 and val.fixed_items and not train.fixed_items
    torch.manual_seed(0)
    for i in range(len(val)):
        # the stored image normalised with MNIST's mean and std, the same on every read
        want = (torch.from_numpy(val.pixels(i)).float() / 255 - 0.1307) / 0.3081
        for _ in range(3):
            torch.testing.assert_close(val[i][0], want)
    # the training transform of the same image shifts it at random, so the reads above could differ
    views = [train.transform(val.pixels(0)) for _ in range(20)]
    first = (torch.from_numpy(val.pixels(0)).float() / 255 - 0.1307) / 0.3081
    assert any(not torch.allclose(v, first) for v in views)


def test_val_split_keeps_both_smallnorb_views_together(norb_root):
    train, val, _, _ = build_datasets(norb_cfg(norb_root, stereo="samples", val_split=0.25), seed=2)
    assert len(val) == 10 and len(train) == 30
    for rows in (train.rows(), val.rows()):
        assert set((rows // 2).tolist()) == set((rows[::2] // 2).tolist()) and len(rows) % 2 == 0


def loader_config(**train):
    return config_from_dict(
        {
            "data": {"name": "synthetic", "train_size": 21, "test_size": 13, "val_split": 0.3},
            "train": {"batch_size": 4, "seed": 7, **train},
        }
    )


def test_distributed_eval_slices_cover_every_test_sample_exactly_once():
    cfg = loader_config()
    ranks = [build_loaders(cfg, rank=r, world_size=2) for r in range(2)]
    for split in ("test", "val"):
        slices = [list(getattr(loaders, split).sampler) for loaders in ranks]
        assert set(slices[0]).isdisjoint(slices[1])
        assert sorted(slices[0] + slices[1]) == list(range(len(getattr(ranks[0], split).dataset)))
        assert sum(len(batch[1]) for loaders in ranks for batch in getattr(loaders, split)) == len(
            getattr(ranks[0], split).dataset
        )
    assert all(isinstance(loaders.train_sampler, DistributedSampler) for loaders in ranks)
    assert ranks[0].test.batch_size == 8  # eval_batch_size null -> 2 x batch_size


def test_train_order_is_reproducible_from_the_seed_and_generator_state():
    def labels(loader):
        return torch.cat([y for _, y in loader]).tolist()

    first, second = build_loaders(loader_config()), build_loaders(loader_config())
    assert first.train.drop_last is False
    assert labels(first.train) == labels(second.train)
    state = first.train_generator.get_state()
    epoch = labels(first.train)
    first.train_generator.set_state(state)
    assert labels(first.train) == epoch
    assert sum(1 for _ in first.train.dataset) == 15


def test_the_training_order_depends_on_the_epoch_not_on_the_number_of_processes():
    def order(loaders, epoch):
        loaders.train_sampler.set_epoch(epoch)
        return [[round(v, 3) for v in x.flatten(1).sum(1).tolist()] for x, _ in loaders.train]

    cfg = config_from_dict(
        {
            "data": {"name": "synthetic", "train_size": 24, "test_size": 4},
            "train": {"batch_size": 6, "seed": 3},
        }
    )
    half = config_from_dict(
        {
            "data": {"name": "synthetic", "train_size": 24, "test_size": 4},
            "train": {"batch_size": 3, "seed": 3},
        }
    )
    single = build_loaders(cfg)
    ranks = [build_loaders(half, rank=r, world_size=2) for r in range(2)]
    for epoch in (0, 1):
        one = order(single, epoch)
        two = [order(loaders, epoch) for loaders in ranks]
        assert [sorted(batch) for batch in one] == [sorted(a + b) for a, b in zip(*two)]
    assert order(single, 0) != order(single, 1)


def test_loader_workers_of_different_ranks_draw_different_augmentations(tmp_path):
    """Every training image is the same, so a batch shows only the augmentation draws: with
    loader workers, rank 1's must not repeat rank 0's (each rank's workers are seeded apart)."""
    folder = tmp_path / "fashion-mnist"
    folder.mkdir()
    image = np.random.default_rng(0).integers(0, 256, (28, 28), dtype=np.uint8)
    for stem, n in (("train", 16), ("t10k", 4)):
        write_idx(folder / f"{stem}-images-idx3-ubyte", np.repeat(image[None], n, axis=0))
        write_idx(folder / f"{stem}-labels-idx1-ubyte", np.zeros(n, dtype=np.uint8))
    cfg = config_from_dict(
        {
            "data": {"name": "fashion-mnist", "root": str(tmp_path), "download": False},
            "train": {"batch_size": 8, "seed": 5, "num_workers": 1},
        }
    )
    first = [next(iter(build_loaders(cfg, rank=r, world_size=2).train))[0] for r in range(2)]
    assert first[0].shape == (8, 1, 28, 28)
    assert not torch.equal(first[0], first[1])
    # rank 0 (and so a single process) keeps the generator seeded with train.seed
    single = build_loaders(cfg).train_generator
    assert torch.equal(single.get_state(), torch.Generator().manual_seed(5).get_state())


def test_check_channels_explains_a_mismatch():
    info = DataInfo(10, 1, 28, [str(i) for i in range(10)])
    check_channels(info, 1)
    with pytest.raises(DataFormatError, match="expects 3-channel images but this data has 1"):
        check_channels(info, 3)


def test_normalisation_is_computed_on_the_training_rows_only_never_the_validation_ones():
    cfg = DataConfig(name="synthetic", image_size=16, num_classes=3, channels=1, train_size=60, test_size=6)
    held_out = DataConfig(**{**cfg.__dict__, "val_split": 0.25})
    train, val, _test, info = build_datasets(held_out, seed=3)
    assert val is not None and len(train) == 45 and len(val) == 15
    whole = build_datasets(cfg, seed=3)[3]
    pixels = train.images[train.rows()].float() / 255  # the rows that stayed for training
    assert info.mean == pytest.approx([float(pixels.mean())], abs=1e-6)
    assert info.std == pytest.approx([float(pixels.std())], rel=1e-3)
    assert info.mean != pytest.approx(whole.mean, abs=1e-6)  # all 60 rows would give another mean


def test_folder_images_are_turned_upright_by_their_exif_orientation_and_16_bit_grey_is_scaled(tmp_path):
    from PIL import Image

    from capsnet.data import decode_image

    left_white = np.zeros((8, 8), dtype=np.uint8)
    left_white[:, :4] = 255
    plain = Image.fromarray(left_white, mode="L")
    exif = plain.getexif()
    exif[0x0112] = 6  # Orientation: shown turned 90 degrees clockwise
    plain.save(tmp_path / "sideways.png", exif=exif.tobytes())
    upright = decode_image(tmp_path / "sideways.png", 8, "L")[:, :, 0]
    assert upright[0].min() == 255 and upright[-1].max() == 0  # the white half is now on top
    plain.save(tmp_path / "as-stored.png")
    assert np.array_equal(decode_image(tmp_path / "as-stored.png", 8, "L")[:, :, 0], left_white)

    wide = np.full((8, 8), 32896, dtype=np.uint16)  # 128 x 257: mid grey in 16 bits
    wide[:, :4] = 65535
    Image.fromarray(wide).save(tmp_path / "grey16.png")
    assert Image.open(tmp_path / "grey16.png").mode.startswith("I;16")
    grey = decode_image(tmp_path / "grey16.png", 8, "L")[:, :, 0]
    assert grey[0, 0] == 255 and grey[0, -1] == 128
    # a 16-bit PGM, which Pillow opens as 32-bit integers (mode I): scaled alike, not clipped to white
    header = b"P5\n8 8\n65535\n"
    (tmp_path / "grey16.pgm").write_bytes(header + wide.astype(">u2").tobytes())
    assert Image.open(tmp_path / "grey16.pgm").mode == "I"
    assert np.array_equal(decode_image(tmp_path / "grey16.pgm", 8, "L")[:, :, 0], grey)
    # levels with no known white (beyond 16 bits, or floating point) are unreadable, not saturated
    Image.fromarray(np.full((8, 8), 70000, dtype=np.int32), mode="I").save(tmp_path / "grey32.tif")
    Image.fromarray(np.full((8, 8), 0.5, dtype=np.float32), mode="F").save(tmp_path / "float.tif")
    assert decode_image(tmp_path / "grey32.tif", 8, "L") is None
    assert decode_image(tmp_path / "float.tif", 8, "L") is None


def test_files_in_hidden_folders_of_a_class_are_not_its_images(image_tree):
    before = data._class_files(image_tree)
    hidden = image_tree / "cat" / ".thumbnails"
    hidden.mkdir()
    shutil.copyfile(before["cat"][0], hidden / "small.png")
    (image_tree / "cat" / "more").mkdir()
    shutil.copyfile(before["cat"][0], image_tree / "cat" / "more" / "again.png")
    after = data._class_files(image_tree)
    assert after["cat"] == sorted([*before["cat"], image_tree / "cat" / "more" / "again.png"])


def test_a_damaged_download_is_downloaded_again_when_downloads_are_on(tmp_path, monkeypatch):
    calls = []

    def offline(name, folder, train, download):
        if download:
            calls.append((name, train))
            raise OSError("network is unreachable")
        return real(name, folder, train, download)

    real = data._torchvision_split
    monkeypatch.setattr(data, "_torchvision_split", offline)
    folder = write_cifar10(tmp_path)
    (folder / "data_batch_3").unlink()  # an unpacking that stopped halfway
    with pytest.raises(DataFormatError, match="data_batch_3: cannot read"):
        build_datasets(DataConfig(name="cifar10", root=str(tmp_path), download=False))
    # offline, the file is still named, not reported missing
    again = "downloading the release again to replace it failed: network is unreachable"
    with pytest.raises(DataFormatError, match=f"data_batch_3: cannot read .*; {again}$"):
        build_datasets(DataConfig(name="cifar10", root=str(tmp_path), download=True))
    assert calls == [("cifar10", True)]
    (tmp_path / "train_32x32.mat").write_bytes(b"not the real file")
    with pytest.raises(DataFormatError) as caught:  # torchvision would replace it
        build_datasets(DataConfig(name="svhn", root=str(tmp_path), download=True))
    assert calls[-1] == ("svhn", True)
    assert str(caught.value) == (
        f"{tmp_path / 'train_32x32.mat'}: present but failing torchvision's checksum (corrupt or incomplete); "
        + again
    )


def test_the_recorded_resizing_is_what_the_loaders_do(tmp_path):
    """An export records how the dataset's files became the model's pixels; that account must hold."""
    import torch.nn.functional as F
    from PIL import Image

    from capsnet.data import read_idx, stored_resizing

    write_mnist(tmp_path)
    cfg = DataConfig(name="fashion-mnist", root=str(tmp_path), download=False, image_size=32)
    _, _, test, _ = build_datasets(cfg)
    described = stored_resizing("fashion-mnist", 32)
    assert "28x28 images resized to 32x32 by bilinear interpolation with antialiasing" in described
    raw = read_idx(tmp_path / "t10k-images-idx3-ubyte.gz").float().unsqueeze(1)
    again = F.interpolate(raw, size=(32, 32), mode="bilinear", antialias=True, align_corners=False)
    want = again.round().clamp(0, 255).to(torch.uint8)
    assert torch.equal(torch.stack([torch.as_tensor(test.pixels(i)) for i in range(len(test))]), want)
    assert stored_resizing("fashion-mnist", 28) is None and stored_resizing("synthetic", 20) is None
    assert "96x96 views downsampled to 48x48 by area averaging" in stored_resizing("smallnorb", 48)
    assert "96x96 views enlarged to 144x144 by area averaging" in stored_resizing("smallnorb", 144)
    assert stored_resizing("smallnorb", 96) is None

    train_dir, test_dir = tmp_path / "train", tmp_path / "test"
    for root in (train_dir, test_dir):
        for label in ("cat", "dog"):
            (root / label).mkdir(parents=True)
    _save(train_dir / "cat" / "0.png", "RGB", (20, 20), seed=1)
    _save(train_dir / "dog" / "0.png", "RGB", (20, 20), seed=2)
    _save(test_dir / "cat" / "0.png", "RGB", (40, 30), seed=3)
    cfg = DataConfig(name="folder", train_dir=str(train_dir), test_dir=str(test_dir), image_size=16)
    _, _, test, info = build_datasets(cfg)
    described = stored_resizing("folder", 16, info.channels)
    assert "and resized to 16x16 by PIL's bilinear resampling" in described and "to RGB" in described
    with Image.open(test_dir / "cat" / "0.png") as image:
        want = np.array(image.convert("RGB").resize((16, 16), Image.Resampling.BILINEAR)).transpose(2, 0, 1)
    assert np.array_equal(np.asarray(test.pixels(0)), want)


# --------------------------------------------------------------------------- checks against hand computations


def test_training_shifts_reach_every_offset_up_to_the_padding_in_both_axes_independently():
    torch.manual_seed(0)
    # distinct, non-black levels: every shift gives another image
    x = np.arange(1, 65, dtype=np.uint8).reshape(1, 8, 8)
    augment = PixelTransform([0.0], [1.0], padding=2)  # no normalisation: outputs are levels / 255

    def moved(down: int, right: int) -> torch.Tensor:  # black border of 2, then the window the shift shows
        padded = np.pad(x, ((0, 0), (2, 2), (2, 2)))
        window = padded[:, 2 - down : 10 - down, 2 - right : 10 - right]
        return torch.from_numpy(window.astype(np.float32) / 255)

    expected = {(dy, dx): moved(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)}
    seen = []
    for _ in range(400):
        out = augment(x)
        matches = [offset for offset, image in expected.items() if torch.allclose(out, image, atol=1e-6)]
        assert len(matches) == 1, "every output is the image shifted by up to 2 px, black filling the gap"
        seen.append(matches[0])
    assert set(seen) == set(expected)  # all 25 (down, right) pairs: both signs, both extremes, mixed
    counts = np.array([seen.count(offset) for offset in expected])
    assert counts.min() >= 4 and counts.max() <= 32  # about 16 each: drawn uniformly


def test_normalisation_statistics_are_per_channel_over_every_pixel_of_every_image():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (7, 3, 5, 6), dtype=np.uint8)
    images[:, 1] //= 4  # channels with different statistics
    mean, std = data.channel_stats(torch.from_numpy(images), chunk=3)  # three chunks summed
    pixels = images.transpose(1, 0, 2, 3).reshape(3, -1) / 255.0
    assert mean == pytest.approx(pixels.mean(axis=1).tolist(), rel=1e-9)
    assert std == pytest.approx(pixels.std(axis=1).tolist(), rel=1e-9)


def test_an_idx_label_outside_the_classes_is_a_format_error(tmp_path):
    write_mnist(tmp_path)
    labels = (np.arange(30) % 10).astype(np.uint8)
    labels[7] = 10  # one past the last of MNIST's ten classes
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", labels)
    with pytest.raises(DataFormatError, match="train-labels.*label 10 is not below 10"):
        build_datasets(DataConfig(name="mnist", root=str(tmp_path), download=False))


def test_downsizing_averages_every_pixel_rather_than_sampling_some():
    # one lit pixel in the corner of every 4 x 4 block: a 28 -> 7 resize that keeps the whole image
    # (antialiasing) spreads it over its block; plain bilinear sampling reads between pixels 1 and 2
    # of each block and sees only black
    images = np.zeros((2, 1, 28, 28), dtype=np.uint8)
    images[..., ::4, ::4] = 255
    small = data.resize_images(torch.from_numpy(images), 7)
    assert small.shape == (2, 1, 7, 7) and small.dtype == torch.uint8
    assert float(small.float().mean()) == pytest.approx(255 / 16, rel=0.15)


def test_smallnorb_channels_are_the_left_then_the_right_camera_each_averaged_over_2x2_blocks(tmp_path):
    folder = write_smallnorb(tmp_path / "smallnorb")
    rng = np.random.default_rng(5)
    views = rng.integers(0, 256, (NORB_ROWS, 2, 96, 96), dtype=np.uint8)
    views[:, 1] //= 2  # the right camera darker: a swap is not hidden by the two having one distribution
    write_norb(folder / f"{smallnorb.FILES['train']}-dat.mat.gz", views)
    # the 2x2 means, rounded half to even (means of four integers end in .0, .25, .5 or .75)
    expected = np.round(views.reshape(NORB_ROWS, 2, 48, 2, 48, 2).astype(np.float64).mean(axis=(3, 5)))
    train, _, _, _ = build_datasets(norb_cfg(tmp_path))
    assert np.array_equal(train.images.numpy(), expected.astype(np.uint8))
    samples, _, _, _ = build_datasets(norb_cfg(tmp_path, stereo="samples"))
    assert np.array_equal(samples.pixels(6)[0], expected[3, 0])  # row 3: items 6 (left) and 7 (right)
    assert np.array_equal(samples.pixels(7)[0], expected[3, 1])


def _standard_windows(image: np.ndarray, size: int) -> dict[tuple[int, int], np.ndarray]:
    """Every size x size window of the image standardised per channel with the whole image's statistics."""
    pixels = image.astype(np.float64)
    standard = (pixels - pixels.mean(axis=(1, 2), keepdims=True)) / pixels.std(axis=(1, 2), keepdims=True)
    room = image.shape[1] - size
    return {(t, l): standard[:, t : t + size, l : l + size] for t in range(room + 1) for l in range(room + 1)}


def test_smallnorb_training_jitter_scales_about_the_standardised_mean_and_offsets_within_its_range():
    rng = np.random.default_rng(4)
    image = rng.integers(100, 256, (2, 48, 48), dtype=np.uint8)  # a mean far from black
    windows = _standard_windows(image, 32)
    torch.manual_seed(0)
    contrast = data.StandardisedCrop(32, train=True, brightness=0.0, contrast=0.25)
    factors, places = [], set()
    for _ in range(25):
        item = contrast(image).double().numpy()
        # the window the item came from: the one it is a multiple of (both channels by one factor)
        fits = []
        for place, window in windows.items():
            factor = float((item * window).sum() / (window * window).sum())
            if np.abs(item - factor * window).max() < 1e-4:
                fits.append((place, factor))
        assert len(fits) == 1, "a training item is a whole-image-standardised window times one factor"
        places.add(fits[0][0])
        factors.append(fits[0][1])
    assert 0.75 <= min(factors) and max(factors) <= 1.25 and max(factors) - min(factors) > 0.2
    assert len(places) > 10  # windows drawn all over the 16 px of room
    brightness = data.StandardisedCrop(32, train=True, brightness=0.25, contrast=0.0)
    offsets = []
    for _ in range(25):
        item = brightness(image).double().numpy()
        fits = [float((item - w).mean()) for w in windows.values() if np.ptp(item - w) < 1e-4]
        assert len(fits) == 1, "a training item is a standardised window plus one offset"
        offsets.append(fits[0])
    assert -0.25 <= min(offsets) and max(offsets) <= 0.25 and max(offsets) - min(offsets) > 0.2


def test_scoring_the_test_split_of_an_image_folder_decodes_only_its_test_images(image_tree, monkeypatch):
    """A trained model's classes and normalisation stand in for the training images, so scoring
    decodes the held-out fifth alone and gets the same test set, labels and pixels."""
    cfg = DataConfig(name="folder", train_dir=str(image_tree), image_size=8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, _, whole, info = build_datasets(cfg)
    decoded = []
    real = data.decode_image
    monkeypatch.setattr(data, "decode_image", lambda path, *a: decoded.append(path) or real(path, *a))
    stats = (info.mean, info.std)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the held-out fifth holds an unreadable file
        train, val, test, alone = build_datasets(cfg, stats=stats, trained_classes=info.class_names)
    assert len(train) == 0 and val is None and alone.class_names == info.class_names
    assert torch.equal(test.images, whole.images) and torch.equal(test.labels, whole.labels)
    held = {
        path
        for paths in data._class_files(image_tree).values()
        for path, out in zip(
            paths, held_out_by_name([p.relative_to(image_tree).as_posix() for p in paths], 0.2)
        )
        if out
    }
    assert set(decoded) == held and len(test) == 2  # the held-out files (one unreadable) and no other
    assert torch.equal(test[1][0], whole[1][0])
    # without the normalisation the training images are needed after all (to compute it)
    decoded.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        build_datasets(cfg, trained_classes=info.class_names)
    assert len(decoded) > len(test)


def test_scoring_a_separate_test_folder_reads_no_training_folder(image_tree, tmp_path):
    test_dir = tmp_path / "test"
    for name in ("dog", "cat"):
        (test_dir / name).mkdir(parents=True)
        _save(test_dir / name / "x.png", "RGB", (12, 12), seed=3)
    gone = tmp_path / "no-training-folder"
    cfg = DataConfig(name="folder", train_dir=str(gone), test_dir=str(test_dir), image_size=8)
    stats = ([0.5, 0.5, 0.5], [0.25, 0.25, 0.25])
    _, _, test, info = build_datasets(cfg, stats=stats, trained_classes=["cat", "dog", "emu"])
    assert info.class_names == ["cat", "dog", "emu"] and info.num_classes == 3
    assert sorted(test.labels.tolist()) == [0, 1]  # by name: cat 0, dog 1
    (test_dir / "yak").mkdir()
    _save(test_dir / "yak" / "y.png", "RGB", (12, 12), seed=4)
    with pytest.raises(
        DataFormatError, match=r"classes \['cat', 'dog', 'emu'\], this folder also has \['yak'\]"
    ):
        build_datasets(cfg, stats=stats, trained_classes=["cat", "dog", "emu"])
    with pytest.raises(data.DataError, match="data.train_dir .* is not a folder"):  # training needs it
        build_datasets(cfg)


@pytest.mark.parametrize(
    ("settings", "warned"),
    [
        ({"name": "fashion-mnist"}, False),
        ({"name": "fashion-mnist", "augment": False}, True),
        ({"name": "fashion-mnist", "flip": False}, True),
        ({"name": "mnist"}, True),
        ({"name": "folder", "flip": True}, False),
        ({"name": "synthetic", "flip": True}, True),
    ],
)
def test_mirror_on_a_model_that_never_saw_flips_is_warned_of(settings, warned):
    import warnings

    from capsnet.config import DataConfig
    from capsnet.data import DataWarning, warn_if_mirror_unlearned

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warn_if_mirror_unlearned(DataConfig(**settings))
    assert [w.category for w in caught] == ([DataWarning] if warned else [])


def test_svhn_without_scipy_says_so_before_downloading_anything(tmp_path, monkeypatch):
    import sys

    import torchvision.datasets

    from capsnet.data import DataError

    fetched = []

    def svhn(root, split, download):  # stands in for torchvision's, which downloads before importing scipy
        fetched.append((split, download))
        raise RuntimeError("Dataset not found or corrupted.")

    monkeypatch.setattr(torchvision.datasets, "SVHN", svhn)
    monkeypatch.setitem(sys.modules, "scipy", None)  # importing it raises ImportError
    monkeypatch.setitem(sys.modules, "scipy.io", None)
    with pytest.raises(DataError, match="svhn needs scipy"):
        build_datasets(DataConfig(name="svhn", root=str(tmp_path), download=True))
    assert fetched and not [split for split, download in fetched if download]  # looked for, never fetched
