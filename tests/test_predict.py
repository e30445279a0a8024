"""capsnet predict: image files classified as the evaluation pipeline prepares the run's own images."""

from __future__ import annotations

import builtins
import csv
import errno
import io
import json
import os
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import tiny
from PIL import Image
from test_data import write_smallnorb
from test_failures import mnist_files
from typer.testing import CliRunner

from capsnet.checkpoint import atomic_save, load_checkpoint
from capsnet.cli import app
from capsnet.data import DataError, DataWarning, resize_images
from capsnet.evaluate import prepare_checkpoint
from capsnet.predict import input_pipeline, list_images, predict_files
from capsnet.smallnorb import downsample
from capsnet.trainer import fit

runner = CliRunner()


def class_tree(root: Path, mode: str, per_class: int, seed: int) -> Path:
    """Three classes of 20x20 images (a bright square in a class's own corner, on noise)."""
    rng = np.random.default_rng(seed)
    for k, name in enumerate(("cat", "dog", "owl")):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            shape = (20, 20, 3) if mode == "RGB" else (20, 20)
            array = rng.integers(0, 96, shape, dtype=np.uint8)
            top, left = (k // 2) * 10, (k % 2) * 10
            array[top : top + 8, left : left + 8] = 255
            Image.fromarray(array, mode=mode).save(root / name / f"{i}.png")
    return root


def folder_settings(tmp: Path, mode: str) -> list[str]:
    train = class_tree(tmp / "train", mode, 6, 0)
    test = class_tree(tmp / "test", mode, 2, 1)
    return [
        "data.name=folder",
        f"data.train_dir={train}",
        f"data.test_dir={test}",
        f"data.grayscale={'true' if mode == 'L' else 'false'}",
        "data.image_size=20",
    ]


RUNS = {
    "folder-rgb": lambda tmp: folder_settings(tmp, "RGB"),
    "folder-grey": lambda tmp: folder_settings(tmp, "L"),
    # 28x28 files resized to tiny's 20x20: the stored test images are the resized ones
    "mnist": lambda tmp: [
        "data.name=mnist",
        f"data.root={mnist_files(tmp / 'mnist')}",
        "data.download=false",
    ],
    "smallnorb-one-view": lambda tmp: [
        "data.name=smallnorb",
        f"data.root={write_smallnorb(tmp / 'norb' / 'smallnorb').parent}",
        "data.download=false",
        "data.stereo=samples",
    ],
}


@pytest.fixture(scope="module", params=sorted(RUNS))
def trained(request, tmp_path_factory) -> tuple[str, Path]:
    """(kind, the folder of the data and of weights/<kind>/): a one-step run of configs/tiny.yaml."""
    tmp = tmp_path_factory.mktemp(request.param)
    cfg = tiny(tmp, *RUNS[request.param](tmp), "train.max_steps=1", "data.val_split=0")
    fit(cfg, run_name=request.param, echo=lambda _msg: None)
    return request.param, tmp


def save_png(pixels: np.ndarray, path: Path) -> Path:
    """uint8 (C, H, W) as a PNG, grey or RGB."""
    array = pixels[0] if pixels.shape[0] == 1 else pixels.transpose(1, 2, 0)
    Image.fromarray(np.ascontiguousarray(array), mode="L" if pixels.shape[0] == 1 else "RGB").save(path)
    return path


def test_files_are_classified_as_the_evaluation_pipeline_scores_the_same_images(trained, tmp_path):
    kind, tmp = trained
    weights = tmp / "weights"
    prep = prepare_checkpoint(kind, str(weights), device="cpu")
    dataset = prep.loader.dataset
    count = min(6, len(dataset))
    stored = [dataset.pixels(i) for i in range(count)]
    files = [save_png(p, tmp_path / f"{i}.png") for i, p in enumerate(stored)]
    with torch.no_grad():
        want = prep.model(torch.stack([dataset.eval_transform(p) for p in stored])).activations

    report = predict_files(kind, files, weights, device="cpu", batch_size=4)  # two batches: 4 and 2
    assert report.files == [str(f) for f in files]
    torch.testing.assert_close(torch.tensor(report.activations), want, atol=1e-6, rtol=1e-5)
    assert report.class_names == prep.class_names
    # a file that is not of the size the model's preprocessing starts from is resized to it, as the
    # run's dataset resizes its images: PIL's bilinear resampling for image folders, antialiased
    # interpolation for MNIST, area averaging for smallNORB
    source = input_pipeline(prep.ckpt).source_size
    big = Image.open(files[0]).resize((2 * source + 3, 2 * source + 3), Image.Resampling.NEAREST)
    big.save(tmp_path / "big.png")
    if kind.startswith("folder"):
        fitted = np.array(big.resize((source, source), Image.Resampling.BILINEAR))
        fitted = fitted.reshape(source, source, -1).transpose(2, 0, 1)
    else:
        pixels = torch.from_numpy(np.array(big))[None, None]  # (1, 1, H, W): grey files
        fitted = (resize_images(pixels, source) if kind == "mnist" else downsample(pixels.numpy(), source))[0]
        fitted = fitted.numpy()
    with torch.no_grad():
        resized = prep.model(dataset.eval_transform(np.ascontiguousarray(fitted))[None]).activations
    again = predict_files(kind, [tmp_path / "big.png"], weights, device="cpu")
    torch.testing.assert_close(torch.tensor(again.activations), resized, atol=1e-6, rtol=1e-5)


def dataset_files(kind: str, tmp: Path, dataset, count: int) -> list[np.ndarray]:
    """The first ``count`` test images of a run as its dataset's files hold them, before any resizing:
    uint8 (H, W) or (H, W, 3), in the order of the evaluation set's items."""
    from capsnet import smallnorb
    from capsnet.data import read_idx

    if kind.startswith("folder"):  # the test tree's files: classes in order, files sorted within each
        return [np.array(Image.open(f)) for f in sorted((tmp / "test").rglob("*.png"))[:count]]
    if kind == "mnist":  # 28x28, which the run resized to 20x20
        return list(read_idx(tmp / "mnist" / "t10k-images-idx3-ubyte").numpy()[:count])
    # smallNORB's 96x96 views, which the run downsampled to 30x30 before its 20x20 crops; item
    # 2k + v is view v of the test file's row k (data.stereo: samples)
    views = smallnorb.read_norb_matrix(tmp / "norb" / "smallnorb" / f"{smallnorb.FILES['test']}-dat.mat")
    return [views[r // 2, r % 2] for r in dataset.rows()[:count].tolist()]


def test_the_dataset_s_own_files_are_resized_as_the_run_resized_them(trained, tmp_path):
    """A run's test images, given as the files its dataset holds (MNIST's 28x28 images for a 20x20
    model, smallNORB's 96x96 views), are classified as eval scores them."""
    kind, tmp = trained
    weights = tmp / "weights"
    prep = prepare_checkpoint(kind, str(weights), device="cpu")
    dataset = prep.loader.dataset
    count = min(4, len(dataset))
    files = []
    for i, array in enumerate(dataset_files(kind, tmp, dataset, count)):
        Image.fromarray(array).save(tmp_path / f"{i}.png")
        files.append(tmp_path / f"{i}.png")
    with torch.no_grad():
        want = prep.model(torch.stack([dataset[i][0] for i in range(count)])).activations
    report = predict_files(kind, files, weights, device="cpu")
    torch.testing.assert_close(torch.tensor(report.activations), want, atol=1e-6, rtol=1e-5)


def test_the_model_is_fed_the_normalisation_its_checkpoint_records(trained):
    kind, tmp = trained
    ckpt = load_checkpoint(tmp / "weights" / kind / "last.pt")
    pipe = input_pipeline(ckpt)
    flat = np.full((pipe.channels, pipe.source_size, pipe.source_size), 200, dtype=np.uint8)
    x = pipe.transform(flat)
    assert x.shape == (pipe.channels, pipe.model_size, pipe.model_size)
    if kind.startswith("smallnorb"):  # standardised per image: a flat image is all zeros
        assert pipe.source_size > pipe.model_size and torch.count_nonzero(x) == 0
        assert "standardised per image" in pipe.description
    else:
        mean, std = ckpt["data_info"]["mean"], ckpt["data_info"]["std"]
        want = torch.tensor([(200 / 255 - m) / s for m, s in zip(mean, std)]).view(-1, 1, 1).expand_as(x)
        torch.testing.assert_close(x, want.float())
        assert "normalised with the mean and std of the run's training images" in pipe.description


@pytest.fixture(scope="module")
def folder_run(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("predict-folder")
    cfg = tiny(tmp, *folder_settings(tmp, "RGB"), "train.max_steps=1", "data.val_split=0")
    fit(cfg, run_name="pets", echo=lambda _msg: None)
    return tmp


def predict(folder_run: Path, *args: str):
    return runner.invoke(app, ["predict", "--out-dir", str(folder_run / "weights"), "--device", "cpu", *args])


def test_the_cli_prints_a_table_json_and_a_csv_of_the_same_predictions(folder_run, tmp_path):
    images = tmp_path / "images"
    shutil.copytree(folder_run / "test", images)
    (images / "dog" / "notes.txt").write_text("not an image: left out of the folder's search")
    (images / "owl" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(30))
    (images / ".thumbs").mkdir()
    save_png(np.zeros((3, 20, 20), dtype=np.uint8), images / ".thumbs" / "hidden.png")
    extra = save_png(np.full((3, 20, 20), 90, dtype=np.uint8), tmp_path / "one.png")
    table = predict(folder_run, str(images), str(extra), str(extra), "--top", "2")
    assert table.exit_code == 0, table.output
    assert (
        "warning: skipped 1 unreadable or non-image file: " in table.stderr and "broken.png" in table.stderr
    )
    lines = table.stdout.splitlines()
    assert lines[0].endswith("(run pets, step 1, 3 classes, 2 routing iterations): 7 images")
    assert lines[1].startswith("input: RGB, resized to 20x20, normalised with the mean and std of the run's")
    assert lines[2].split() == ["image", "class", "activation", "next"]
    rows = lines[3:]
    shown = [str(p) for p in sorted((folder_run / "test").rglob("*.png"))]
    expected = [str(images / Path(p).relative_to(folder_run / "test")) for p in shown] + [str(extra)]
    assert [row.split()[0] for row in rows] == expected  # sorted, recursive, each file once

    as_json = predict(
        folder_run, str(images), str(extra), "--top", "2", "--json", "--csv", str(tmp_path / "p.csv")
    )
    assert as_json.exit_code == 0, as_json.output
    result = json.loads(as_json.stdout)
    assert result["classes"] == ["cat", "dog", "owl"] and result["run"] == "pets"
    assert [image["path"] for image in result["images"]] == expected
    assert result["skipped"] == [str(images / "owl" / "broken.png")]
    for row, image in zip(rows, result["images"]):
        acts = image["activations"]
        ranked = sorted(acts, key=lambda name: -acts[name])
        assert [t["class"] for t in image["top"]] == ranked[:2]
        assert image["class"] == ranked[0] == result["classes"][image["class_index"]]
        assert row.split()[1:3] == [image["class"], f"{image['activation']:.4f}"]
    assert f"wrote {tmp_path / 'p.csv'}" in as_json.stderr
    with open(tmp_path / "p.csv", newline="") as f:
        table_rows = list(csv.reader(f))
    assert table_rows[0] == ["image", "class", "activation", "cat", "dog", "owl"]
    for row, image in zip(table_rows[1:], result["images"], strict=True):
        assert row[:2] == [image["path"], image["class"]]
        assert [float(v) for v in row[3:]] == pytest.approx(
            [image["activations"][c] for c in result["classes"]]
        )


def test_invert_and_mirror_change_the_pixels_as_they_say(folder_run, tmp_path):
    rng = np.random.default_rng(5)
    pixels = rng.integers(0, 256, (3, 20, 20), dtype=np.uint8)
    plain = save_png(pixels, tmp_path / "plain.png")
    inverted = save_png(255 - pixels, tmp_path / "inverted.png")
    flipped = save_png(np.ascontiguousarray(pixels[:, :, ::-1]), tmp_path / "flipped.png")
    weights = folder_run / "weights"

    def acts(*files, **options):
        return torch.tensor(predict_files("pets", list(files), weights, device="cpu", **options).activations)

    torch.testing.assert_close(acts(plain, invert=True), acts(inverted))
    both = acts(plain, flipped)
    with pytest.warns(DataWarning, match="did not train with left-right flips"):  # folders: no flips
        mirrored = acts(plain, mirror=True)
    torch.testing.assert_close(mirrored[0], both.mean(0))
    assert not torch.allclose(acts(plain)[0], acts(inverted)[0])


def test_the_training_images_are_not_needed(folder_run, tmp_path):
    """Only the checkpoint is read: a run whose training folder is gone still classifies files."""
    moved = tmp_path / "run"
    shutil.copytree(folder_run / "weights" / "pets", moved / "pets")
    ckpt = load_checkpoint(moved / "pets" / "last.pt")
    ckpt["config"]["data"]["train_dir"] = str(tmp_path / "gone")
    ckpt["config"]["data"]["test_dir"] = str(tmp_path / "gone-too")
    atomic_save(ckpt, moved / "pets" / "last.pt")
    image = next((folder_run / "test" / "owl").glob("*.png"))
    report = predict_files(str(moved / "pets"), [image], device="cpu")
    want = predict_files("pets", [image], folder_run / "weights", device="cpu")
    assert report.activations == want.activations


def test_paths_are_searched_in_order_once_each_and_bad_ones_are_said(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "deep").mkdir(parents=True)
    for name in ("b/2.png", "a/deep/1.JPG", "a/0.png", "a/skip.txt"):
        (tmp_path / name).write_bytes(b"")
    found = list_images(
        [tmp_path / "b", tmp_path / "a", tmp_path / "b" / "2.png", tmp_path / "a" / "skip.txt"]
    )
    assert found == [
        tmp_path / "b/2.png",
        tmp_path / "a/0.png",
        tmp_path / "a/deep/1.JPG",
        tmp_path / "a/skip.txt",
    ]
    with pytest.raises(DataError, match="no such file or folder"):
        list_images([tmp_path / "missing.png"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no image files"):
        list_images([tmp_path / "empty"])
    with pytest.raises(DataError, match="no images given"):
        list_images([])


def test_what_cannot_be_classified_is_a_one_line_error(folder_run, tmp_path):
    nothing = predict(folder_run)
    assert nothing.exit_code == 2 and "error: no images given" in nothing.stderr
    # a mistyped path is said before any checkpoint is looked for
    missing = runner.invoke(app, ["predict", str(tmp_path / "nope.png"), "--out-dir", str(tmp_path / "none")])
    assert (
        missing.exit_code == 2 and f"error: {tmp_path / 'nope.png'}: no such file or folder" in missing.stderr
    )
    junk = tmp_path / "junk.png"
    junk.write_text("not an image")
    one_bad = predict(folder_run, str(junk))
    assert one_bad.exit_code == 2 and one_bad.stderr.strip() == f"error: {junk} is not a readable image"
    # several: the warning names which ones, the error says that none could be read
    junk2 = tmp_path / "junk2.png"
    junk2.write_text("not an image either")
    two_bad = predict(folder_run, str(junk), str(junk2))
    assert two_bad.exit_code == 2 and "error: none of the 2 files given is a readable image" in two_bad.stderr
    assert "warning: skipped 2 unreadable or non-image files" in two_bad.stderr
    # a batch size beyond what torch takes is refused as the option's, not as a config key's
    huge = predict(folder_run, str(junk), "--batch-size", str(2**31))
    assert huge.exit_code == 2 and "--batch-size" in huge.output and "eval_batch_size" not in huge.output
    folder = predict(folder_run, str(folder_run / "test"), "--csv", str(tmp_path))
    assert folder.exit_code == 2 and "is a folder: give a file name" in folder.stderr


def test_a_checkpoint_or_run_folder_given_as_an_image_points_to_ckpt_instead_of_using_another_model(
    folder_run, tmp_path
):
    run = folder_run / "weights" / "pets"
    image = save_png(np.full((3, 20, 20), 90, dtype=np.uint8), tmp_path / "one.png")
    for given in (run / "last.pt", run):
        result = predict(folder_run, str(given), str(image))
        assert result.exit_code == 2, result.output
        assert result.stderr.strip().endswith(f"give it as --ckpt {given}"), result.stderr
        assert len(result.stderr.strip().splitlines()) == 1 and result.stdout == ""


def test_a_csv_folder_that_cannot_be_used_is_said_before_scoring(folder_run, tmp_path, monkeypatch):
    from capsnet import predict as predicting

    image = save_png(np.full((3, 20, 20), 90, dtype=np.uint8), tmp_path / "one.png")
    (tmp_path / "plain-file").write_text("a file where the CSV's folder should be")
    monkeypatch.setattr(predicting, "predict_files", lambda *a, **k: pytest.fail("scored first"))
    result = predict(folder_run, str(image), "--csv", str(tmp_path / "plain-file" / "sub" / "p.csv"))
    assert result.exit_code == 2 and result.stdout == ""
    want = f"error: could not use {tmp_path / 'plain-file' / 'sub'}: a part of that path is a file, where a folder is needed"
    assert result.stderr.strip() == want, result.stderr
    # a folder it makes for the CSV is not left behind when it fails
    monkeypatch.undo()
    result = predict(
        folder_run, str(tmp_path / "missing.png"), "--csv", str(tmp_path / "new" / "deeper" / "p.csv")
    )
    assert result.exit_code == 2 and not (tmp_path / "new").exists()


def test_a_csv_file_that_cannot_be_written_keeps_the_printed_predictions(folder_run, tmp_path, monkeypatch):
    from capsnet import checkpoint

    image = save_png(np.full((3, 20, 20), 90, dtype=np.uint8), tmp_path / "one.png")

    def full_disk(data, path):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(checkpoint, "atomic_write_bytes", full_disk)
    result = predict(folder_run, str(image), "--csv", str(tmp_path / "out" / "p.csv"))
    assert result.exit_code == 2
    assert result.stderr.startswith(f"error: could not use {tmp_path / 'out' / 'p.csv'}: No space left"), (
        result.stderr
    )
    assert str(image) in result.stdout and "(run pets, step 1, 3 classes" in result.stdout


def deny(monkeypatch, path: Path) -> None:
    """Makes ``path`` unreadable to this process, as a file or folder of another user's is."""
    real_access, real_open, real_scandir = os.access, builtins.open, os.scandir

    def refused(given) -> bool:
        return isinstance(given, str | os.PathLike) and Path(given) == path

    def access(given, mode, *args, **kwargs):
        return False if refused(given) and mode & os.R_OK else real_access(given, mode, *args, **kwargs)

    def opened(given, *args, **kwargs):
        if refused(given):
            raise PermissionError(errno.EACCES, "Permission denied", str(given))
        return real_open(given, *args, **kwargs)

    def scandir(given=".", *args, **kwargs):
        if refused(given):
            raise PermissionError(errno.EACCES, "Permission denied", str(given))
        return real_scandir(given, *args, **kwargs)

    monkeypatch.setattr(os, "access", access)
    monkeypatch.setattr(builtins, "open", opened)
    monkeypatch.setattr(os, "scandir", scandir)


def test_a_file_that_cannot_be_read_is_skipped_as_the_others_and_a_folder_is_said(
    folder_run, tmp_path, monkeypatch
):
    good = next((folder_run / "test" / "cat").glob("*.png"))
    locked = shutil.copy(good, tmp_path / "locked.png")
    (tmp_path / "private").mkdir()
    shutil.copy(good, tmp_path / "private" / "in.png")
    deny(monkeypatch, Path(locked))
    deny(monkeypatch, tmp_path / "private")
    result = predict(folder_run, str(good), str(locked))
    assert result.exit_code == 0, result.output
    assert f"warning: skipped 1 unreadable or non-image file: {locked}" in result.stderr
    assert [row.split()[0] for row in result.stdout.splitlines()[3:]] == [str(good)]
    folder = predict(folder_run, str(tmp_path / "private"))
    assert folder.exit_code == 2
    assert folder.stderr.strip() == f"error: could not use {tmp_path / 'private'}: Permission denied"


def test_what_pil_notes_about_how_a_file_is_stored_is_not_shown_as_a_python_warning(
    folder_run, tmp_path, monkeypatch
):
    pixels = np.random.default_rng(2).integers(0, 256, (20, 20, 3), dtype=np.uint8)
    palette = tmp_path / "palette.png"  # transparency given per palette entry, as web images often are
    Image.fromarray(pixels).convert("P").save(palette, transparency=bytes([0] * 8 + [255] * 248))
    large = save_png(pixels.transpose(2, 0, 1), tmp_path / "large.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 300)  # 400 pixels: over PIL's limit, not twice over
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        report = predict_files("pets", [palette, large], folder_run / "weights", device="cpu")
    assert report.files == [str(palette), str(large)]
    assert [str(w.message) for w in seen] == []


def test_a_file_name_that_is_not_utf_8_is_shown_escaped_and_written_to_the_csv_as_it_is(folder_run, tmp_path):
    odd = tmp_path / os.fsdecode(b"\xff.png")
    try:
        shutil.copy(next((folder_run / "test" / "dog").glob("*.png")), odd)
    except (OSError, UnicodeError):
        pytest.skip("this file system takes UTF-8 names only")
    result = predict(folder_run, str(odd), "--csv", str(tmp_path / "p.csv"))
    assert result.exit_code == 0, result.output  # the table is printed to a strict UTF-8 stream
    assert result.stdout.splitlines()[3].startswith(str(tmp_path / "\\xff.png") + " ")
    assert (tmp_path / "p.csv").read_bytes().splitlines()[1].startswith(os.fsencode(odd) + b",")


def test_checkpoints_whose_inputs_no_image_file_can_give_are_refused(folder_run, tmp_path):
    ckpt = load_checkpoint(folder_run / "weights" / "pets" / "last.pt")
    stereo = {**ckpt, "arch": {**ckpt["arch"], "in_channels": 2}}
    with pytest.raises(DataError, match="2-channel images .* which an image file does not hold"):
        input_pipeline(stereo)
    older = {k: v for k, v in ckpt.items() if k != "data_info"}
    with pytest.raises(DataError, match="does not record the normalisation"):
        input_pipeline(older)
    atomic_save(older, tmp_path / "old.pt")
    image = next((folder_run / "test" / "cat").glob("*.png"))
    result = runner.invoke(
        app, ["predict", str(image), "--ckpt", str(tmp_path / "old.pt"), "--device", "cpu"]
    )
    assert result.exit_code == 2 and "does not record the normalisation" in result.stderr


def test_a_stereo_smallnorb_run_is_refused_with_the_setting_that_makes_one_view_models(tmp_path):
    cfg = tiny(
        tmp_path,
        "data.name=smallnorb",
        f"data.root={write_smallnorb(tmp_path / 'norb' / 'smallnorb').parent}",
        "data.download=false",
        "train.max_steps=1",
    )
    fit(cfg, run_name="stereo", echo=lambda _msg: None)
    image = save_png(np.zeros((1, 30, 30), dtype=np.uint8), tmp_path / "view.png")
    with pytest.raises(DataError, match="2-channel images"):
        predict_files("stereo", [image], tmp_path / "weights", device="cpu")


def test_predict_help_says_how_files_are_prepared():
    result = runner.invoke(app, ["predict", "--help"])
    assert result.exit_code == 0
    text = " ".join(result.stdout.split())
    assert "prepared as the run's test images were scored (no augmentation)" in text
    assert "smallNORB models: resized to 1.5 times their input size, standardised per image" in text


def test_csv_text_quotes_paths_with_commas():
    from capsnet.predict import PredictionReport

    report = PredictionReport("c.pt", "r", 1, ["a", "b"], "grey", "cpu", 2, ["x,y.png"], [[0.25, 0.75]])
    rows = list(csv.reader(io.StringIO(report.csv_text())))
    assert rows == [["image", "class", "activation", "a", "b"], ["x,y.png", "b", "0.75", "0.25", "0.75"]]


def test_light_pictures_given_to_a_model_of_light_objects_on_black_are_pointed_at_invert(tmp_path):
    cfg = tiny(tmp_path, *RUNS["mnist"](tmp_path), "train.max_steps=1", "data.val_split=0")
    fit(cfg, run_name="digits", echo=lambda _msg: None)
    dark = save_png(np.zeros((1, 28, 28), dtype=np.uint8), tmp_path / "dark.png")
    light = save_png(np.full((1, 28, 28), 230, dtype=np.uint8), tmp_path / "light.png")
    filled = np.zeros((1, 28, 28), dtype=np.uint8)
    filled[:, 2:-2, 2:-2] = 255  # light in the middle, as a pullover filling the frame: no note
    full = save_png(filled, tmp_path / "pullover.png")
    args = [
        "predict",
        str(dark),
        str(light),
        str(full),
        "--out-dir",
        str(tmp_path / "weights"),
        "--device",
        "cpu",
    ]
    plain = runner.invoke(app, args)
    assert plain.exit_code == 0, plain.output
    assert (
        "warning: 1 of the 3 images is on a light ground, but mnist images are light objects on black"
        in plain.stderr
    )
    inverted = runner.invoke(app, [*args, "--invert"])
    assert inverted.exit_code == 0 and "light ground" not in inverted.stderr
    assert "input: grey, resized to 20x20" in inverted.stdout and "; inverted" in inverted.stdout


def test_the_light_ground_is_read_from_the_outer_ring():
    from capsnet.predict import light_ground

    image = np.zeros((1, 28, 28), dtype=np.uint8)
    image[:, 2:-2, 2:-2] = 255
    assert not light_ground(image)
    assert light_ground(255 - image)
    big = np.full((3, 70, 70), 200, dtype=np.uint8)  # a ring of 5 px at 70 px
    big[:, 5:-5, 5:-5] = 0
    assert light_ground(big) and not light_ground(255 - big)


def test_an_image_folder_dataset_keeps_pil_s_storage_notes_quiet_too(tmp_path):
    from capsnet.config import DataConfig
    from capsnet.data import build_datasets

    rng = np.random.default_rng(3)
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        for i in range(3):
            pixels = rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)
            Image.fromarray(pixels).convert("P").save(
                tmp_path / name / f"{i}.png", transparency=bytes([0] * 8 + [255] * 248)
            )
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        train, _, _, _ = build_datasets(DataConfig(name="folder", train_dir=str(tmp_path), image_size=8))
    assert len(train) == 4 and [str(w.message) for w in seen] == []


def test_folders_are_searched_for_the_formats_pil_reads_not_those_it_only_writes(tmp_path):
    from capsnet.predict import image_suffixes

    suffixes = image_suffixes()
    assert {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".webp", ".mpo"} <= suffixes
    assert not suffixes & {".pdf", ".palm"}
    for name in ("a.pdf", "b.png"):
        (tmp_path / name).write_bytes(b"")
    assert list_images([tmp_path]) == [tmp_path / "b.png"]


def test_a_sub_folder_that_cannot_be_read_is_said_and_the_rest_is_classified(tmp_path, monkeypatch):
    for name in ("open", "closed"):
        (tmp_path / name).mkdir()
        save_png(np.zeros((3, 8, 8), dtype=np.uint8), tmp_path / name / "x.png")
    real = os.scandir

    def scandir(path="."):
        if Path(path).name == "closed":
            raise PermissionError(13, "Permission denied", str(path))
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        found = list_images([tmp_path])
    assert found == [tmp_path / "open" / "x.png"]
    assert [str(w.message) for w in seen] == [
        f"skipped 1 folder that could not be read: {tmp_path / 'closed'}"
    ]


def test_tied_classes_are_ranked_lower_index_first():
    from capsnet.predict import PredictionReport

    report = PredictionReport(
        checkpoint="c.pt",
        run="r",
        step=1,
        class_names=["a", "b", "c", "d"],
        input="",
        device="cpu",
        iterations=2,
    )
    report.files, report.activations, report.top = ["x.png"], [[0.2, 0.7, 0.2, 0.7]], 4
    assert report.ranked(0) == [("b", 0.7), ("d", 0.7), ("a", 0.2), ("c", 0.2)]
