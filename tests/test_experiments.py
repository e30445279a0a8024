"""The paper's experiments as commands: multi-crop eval, viewpoint splits, attacks, inspect figures."""

from __future__ import annotations

import itertools
import json
import os
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from capsnet import smallnorb
from capsnet.attack import InputSpace, bim, fgsm
from capsnet.cli import app
from capsnet.config import DataConfig
from capsnet.data import ImageDataset, PixelTransform, StandardisedCrop, build_datasets
from capsnet.model import CapsNet
from capsnet.multicrop import MultiCrop, crop_offsets, evaluate_crops
from capsnet.routing import RoutingSettings, em_routing

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "configs" / "tiny.yaml")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# Fits 64 synthetic images in seconds; the test set is 32 images.
FIT = ["-o", "train.epochs=6", "-o", "data.train_size=64", "-o", "loss.margin_steps=24"]

runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, list(args))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A fresh directory with one tiny model trained to fit its synthetic data."""
    path = tmp_path_factory.mktemp("experiments")
    old = os.getcwd()
    os.chdir(path)
    try:
        result = invoke("train", "--config", TINY, "--run-name", "fit", *FIT)
        assert result.exit_code == 0, result.output
        yield path
    finally:
        os.chdir(old)


@pytest.fixture
def here(workdir, monkeypatch):
    monkeypatch.chdir(workdir)
    return workdir


def is_png(path: Path) -> bool:
    return path.is_file() and path.read_bytes()[:8] == PNG_MAGIC


def scalar_events(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    out = {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}
    out["_images"] = events.Tags()["images"]
    return out


def text_events(log_dir: Path) -> dict[str, str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir), size_guidance={"tensors": 0})
    events.Reload()
    return {
        tag: "\n".join(b.decode() for e in events.Tensors(tag) for b in e.tensor_proto.string_val)
        for tag in events.Tags()["tensors"]
    }


# --------------------------------------------------------------------------- multi-crop


def test_crop_offsets_start_at_the_centre_and_are_distinct_within_reach():
    assert crop_offsets(1, 0) == [(0, 0)]
    assert crop_offsets(5, 8) == [(0, 0), (-8, -8), (-8, 8), (8, -8), (8, 8)]
    for count in (2, 9, 10, 17, 25):
        offsets = crop_offsets(count, 3)
        assert offsets[0] == (0, 0) and len(set(offsets)) == count
        assert all(abs(dy) <= 3 and abs(dx) <= 3 for dy, dx in offsets)
    with pytest.raises(Exception, match="at most 9 distinct crops"):
        crop_offsets(10, 1)


def test_one_crop_is_the_evaluation_transform_bit_for_bit():
    rng = np.random.default_rng(0)
    norb_like = rng.integers(0, 256, (2, 48, 48), dtype=np.uint8)
    centre = StandardisedCrop(32)
    stack = MultiCrop(centre, [(0, 0)], 48)(norb_like)
    assert stack.shape == (1, 2, 32, 32) and torch.equal(stack[0], centre(norb_like))
    moved = MultiCrop(centre, [(0, 0), (8, -8)], 48)(norb_like)
    window = norb_like[:, 16:48, 0:32].astype(np.float64)
    mean = norb_like.reshape(2, -1).mean(1)[:, None, None]
    std = norb_like.reshape(2, -1).std(1)[:, None, None]
    assert torch.allclose(moved[1].double(), torch.from_numpy((window - mean) / std), atol=1e-4)
    whole = PixelTransform([0.5], [0.25])
    digit = rng.integers(0, 256, (1, 28, 28), dtype=np.uint8)
    shifted = MultiCrop(whole, [(0, 0), (2, 0)], 28)(digit)
    assert torch.equal(shifted[0], whole(digit))
    assert torch.equal(shifted[1, :, 2:], whole(digit)[:, :-2])
    assert torch.all(shifted[1, :, :2] == (0 - 0.5) / 0.25), "the uncovered rows are black"


def test_eval_with_one_crop_equals_the_single_crop_result(here):
    result = invoke("eval", "--ckpt", "fit", "--crops", "1", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    crops = report["multicrop"]
    assert crops["crops"] == 1 and crops["offsets"] == [[0, 0]]
    assert (crops["acc"], crops["correct"], crops["n"]) == (report["acc"], report["correct"], report["n"])
    assert {k: v["count"] for k, v in crops["per_class"].items()} == {
        k: v["count"] for k, v in report["per_class"].items()
    }


def test_eval_with_five_crops_reports_them_beside_the_single_crop(here):
    result = invoke("eval", "--ckpt", "fit", "--crops", "5", "--crop-shift", "2", "--plot", "crops.png")
    assert result.exit_code == 0, result.output
    assert is_png(here / "crops.png")
    as_json = invoke("eval", "--ckpt", "fit", "--crops", "5", "--crop-shift", "2", "--json")
    assert as_json.exit_code == 0, as_json.output
    report = json.loads(as_json.stdout)
    crops = report["multicrop"]
    assert (
        crops["offsets"] == [[0, 0], [-2, -2], [-2, 2], [2, -2], [2, 2]] and crops["n"] == report["n"] == 32
    )
    assert crops["acc"] == crops["correct"] / 32
    said = (
        f"5-crop accuracy {crops['acc']:.4f} ({crops['correct']}/32) beside single-crop {report['acc']:.4f}"
    )
    assert said in result.stdout
    bad = invoke("eval", "--ckpt", "fit", "--crops", "30", "--crop-shift", "1")
    assert bad.exit_code == 2 and "distinct crops" in bad.output


def test_mirrored_views_are_the_crops_flipped_left_to_right():
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (1, 28, 28), dtype=np.uint8)
    whole = PixelTransform([0.5], [0.25])
    offsets = [(0, 0), (2, -1)]
    plain = MultiCrop(whole, offsets, 28)(image)
    views = MultiCrop(whole, offsets, 28, mirror=True)(image)
    assert views.shape == (4, 1, 28, 28)
    assert torch.equal(views[:2], plain)
    assert torch.equal(views[2], whole(np.ascontiguousarray(image[:, :, ::-1])))
    assert torch.equal(views[3], plain[1].flip(-1))
    norb_like = rng.integers(0, 256, (2, 48, 48), dtype=np.uint8)
    centre = StandardisedCrop(32)
    pair = MultiCrop(centre, [(0, 0)], 48, mirror=True)(norb_like)
    assert torch.allclose(pair[1], centre(np.ascontiguousarray(norb_like[:, :, ::-1])), atol=1e-5)
    # a stereo pair's mirror: each camera's image flipped, and the cameras swapped
    stereo = MultiCrop(centre, [(0, 0)], 48, mirror=True, stereo_pair=True)(norb_like)
    swapped = np.ascontiguousarray(norb_like[::-1, :, ::-1])  # (right, left), each flipped
    assert torch.equal(stereo[0], pair[0]) and not torch.equal(stereo[1], pair[1])
    assert torch.allclose(stereo[1], centre(swapped), atol=1e-5)


def _four_class_model_and_images(seed: int, n: int):
    """A small 4-class model on 20x20 images, n random images, their transform and the batch it gives."""
    torch.manual_seed(seed)
    model = CapsNet.from_preset(
        "small", in_channels=1, num_classes=4, image_size=20, caps_types=[4, 4]
    ).eval()
    images = torch.randint(0, 256, (n, 1, 20, 20), dtype=torch.uint8)
    transform = PixelTransform([0.5], [0.25])
    return model, images, transform, torch.stack([transform(img.numpy()) for img in images])


def test_mirrored_evaluation_predicts_the_class_of_the_mean_over_image_and_mirror():
    model, images, transform, x = _four_class_model_and_images(seed=1, n=12)  # x: (12, 1, 20, 20)
    with torch.no_grad():
        plain = model(x).activations  # (12, 4)
        mean = (plain + model(x.flip(-1)).activations) / 2  # (12, 4)
    # Labels are the mirrored prediction, so it scores 12 of 12 and the single view fewer.
    labels = mean.argmax(1)
    plain_hits = plain.argmax(1) == labels
    assert not plain_hits.all(), "the mirror must change some predictions for this test to tell them apart"
    dataset = ImageDataset(images, labels, transform)
    result = evaluate_crops(model, dataset, 1, "cpu", batch_size=5, mirror=True, progress=False)
    assert (result.mirror, result.views, result.n, result.correct) == (True, 2, 12, 12)
    assert result.per_class_total == [int((labels == k).sum()) for k in range(4)]
    single = evaluate_crops(model, dataset, 1, "cpu", batch_size=5, progress=False)
    assert not single.mirror and single.correct == int(plain_hits.sum())
    assert single.per_class_correct == [int(plain_hits[labels == k].sum()) for k in range(4)]


def test_eval_with_mirror_reports_it_beside_the_single_crop(here):
    result = invoke("eval", "--ckpt", "fit", "--mirror", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    views = report["multicrop"]
    assert (views["crops"], views["mirror"], views["views"], views["n"]) == (1, True, 2, report["n"])
    # the synthetic blobs train without flips: the mirrored score is said to mean little
    assert (
        "warning: --mirror: this run did not train with left-right flips (data synthetic, " in result.stderr
    )
    assert "data.augment true, data.flip null)" in result.stderr  # as YAML writes them
    text = invoke("eval", "--ckpt", "fit", "--mirror", "--crops", "5", "--crop-shift", "2", "--plot", "m.png")
    assert text.exit_code == 0, text.output
    assert "5-crop + mirror accuracy" in text.stdout and "beside single-crop" in text.stdout
    assert is_png(here / "m.png")


# --------------------------------------------------------------------------- smallNORB viewpoint splits

ELEVATIONS, AZIMUTHS = 9, 18


def write_norb(path: Path, array: np.ndarray) -> None:
    """The official binary-matrix layout: int32 magic, ndim, max(3, ndim) dims, little-endian data."""
    magic = 0x1E3D4C55 if array.dtype == np.uint8 else 0x1E3D4C54
    dims = list(array.shape) + [1] * (3 - array.ndim)
    header = struct.pack("<ii", magic, array.ndim) + struct.pack(f"<{len(dims)}i", *dims)
    body = np.ascontiguousarray(array, dtype=np.uint8 if array.dtype == np.uint8 else "<i4")
    path.write_bytes(header + body.tobytes())


@pytest.fixture(scope="module")
def norb_root(tmp_path_factory) -> Path:
    """Both official file triples, with one stereo pair at every (elevation, azimuth) viewpoint."""
    root = tmp_path_factory.mktemp("norb")
    folder = root / "smallnorb"
    folder.mkdir()
    rows = ELEVATIONS * AZIMUTHS
    elevation, azimuth = np.divmod(np.arange(rows), AZIMUTHS)
    info = np.stack([np.arange(rows) % 5, elevation, 2 * azimuth, np.arange(rows) % 6], 1).astype(np.int32)
    rng = np.random.default_rng(0)
    for stem in smallnorb.FILES.values():
        labels = (np.arange(rows) % 5).astype(np.int32)
        # Learnable: a bright square whose place depends on the class.
        images = rng.integers(0, 60, (rows, 2, 96, 96), dtype=np.uint8)
        for i, label in enumerate(labels):
            images[i, :, 16 + 12 * label : 40 + 12 * label, 30:66] = 220
        write_norb(folder / f"{stem}-dat.mat", images)
        write_norb(folder / f"{stem}-cat.mat", labels)
        write_norb(folder / f"{stem}-info.mat", info)
    return root


@pytest.mark.parametrize(
    ("split", "key", "familiar", "novel"),
    [
        ("azimuth", "azimuth", {300, 320, 340, 0, 20, 40}, set(range(60, 281, 20))),
        ("elevation", "elevation", {0, 1, 2}, set(range(3, 9))),
    ],
)
def test_viewpoint_splits_select_exactly_the_documented_viewpoints(norb_root, split, key, familiar, novel):
    cfg = DataConfig(name="smallnorb", root=str(norb_root), download=False, split=split)
    train, _, test, _ = build_datasets(cfg)
    seen = {
        "train": train.selected_meta()[key].tolist(),
        "novel": test.selected_meta()[key].tolist(),
        "familiar": test.extra_splits["test_familiar"].selected_meta()[key].tolist(),
    }
    assert set(seen["train"]) == familiar and set(seen["familiar"]) == familiar
    assert set(seen["novel"]) == novel
    per_value = AZIMUTHS if key == "elevation" else ELEVATIONS  # rows sharing one value of the key
    assert len(seen["train"]) == len(seen["familiar"]) == per_value * len(familiar)
    assert len(seen["novel"]) == per_value * len(novel)


def test_a_smallnorb_export_takes_the_whole_view_and_standardises_and_crops_it_itself(
    norb_root, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    data = ["data.name=smallnorb", f"data.root={norb_root}", "data.download=false"]
    overrides = [arg for setting in [*data, "train.epochs=1"] for arg in ("-o", setting)]
    trained = invoke("train", "--config", TINY, "--run-name", "norb", *overrides)
    assert trained.exit_code == 0, trained.output
    result = invoke("export", "--ckpt", "norb", "--format", "pt2")
    assert result.exit_code == 0, result.output
    # tiny's 20x20 crops come from views downsampled to 30x30, both cameras as channels
    assert "input: images (N, 2, 30, 30) float32: pixels in [0, 1]" in result.stdout
    assert "whole 30x30 image" in result.stdout and "centre 20x20 crop" in result.stdout
    assert "parity ok" in result.stdout and "of smallnorb test images" in result.stdout


def test_eval_reports_familiar_and_novel_viewpoint_accuracy(norb_root, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data = ["data.name=smallnorb", f"data.root={norb_root}", "data.download=false", "data.split=azimuth"]
    overrides = [arg for setting in [*data, "train.epochs=1"] for arg in ("-o", setting)]
    trained = invoke("train", "--config", TINY, "--run-name", "norb", *overrides)
    assert trained.exit_code == 0, trained.output
    result = invoke("eval", "--ckpt", "norb", "--json", "--crops", "2")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    views = report["viewpoints"]
    assert views["split"] == "azimuth"
    assert views["novel"]["n"] == report["n"] == 12 * ELEVATIONS
    assert views["familiar"]["n"] == 6 * ELEVATIONS
    assert views["novel"]["acc"] == report["acc"]
    assert report["multicrop"]["familiar"]["n"] == 6 * ELEVATIONS
    # mirrored views of the stereo pair swap its cameras
    from capsnet import multicrop

    pairs, real = [], multicrop.multicrop_dataset

    def recording(dataset, offsets, mirror=False, stereo_pair=False):
        pairs.append((mirror, stereo_pair))
        return real(dataset, offsets, mirror, stereo_pair)

    monkeypatch.setattr(multicrop, "multicrop_dataset", recording)
    mirrored = invoke("eval", "--ckpt", "norb", "--json", "--mirror")
    assert mirrored.exit_code == 0, mirrored.output
    assert pairs == [(True, True), (True, True)]  # the novel and the familiar viewpoints
    text = invoke("eval", "--ckpt", "norb").stdout
    assert "novel accuracy" in text and "familiar accuracy" in text
    # the familiar viewpoints scored on their own are one split, not a novel/familiar comparison
    alone = invoke("eval", "--ckpt", "norb", "--json", "--split", "test_familiar")
    assert alone.exit_code == 0, alone.output
    familiar = json.loads(alone.stdout)
    assert (familiar["split"], familiar["n"]) == ("test_familiar", 6 * ELEVATIONS)
    assert "viewpoints" not in familiar
    assert familiar["acc"] == pytest.approx(views["familiar"]["acc"])  # the same images, scored alike


# --------------------------------------------------------------------------- attacks


def test_attack_writes_a_table_json_png_and_tensorboard_scalars(here):
    result = invoke("attack", "--ckpt", "fit", "--eps", "0.2,0.01,0.05,0.1", "--out", "rep", "--tb-dir", "tb")
    assert result.exit_code == 0, result.output
    assert "epsilon  accuracy" in result.stdout and "clean" in result.stdout
    report = json.loads((here / "rep" / "attack-fgsm.json").read_text())
    assert {
        "checkpoint",
        "run",
        "method",
        "targeted",
        "eps_units",
        "n",
        "clean_acc",
        "results",
        "files",
    } <= set(report)
    assert report["method"] == "fgsm" and report["targeted"] is False and report["eps_units"] == "pixel"
    assert report["n"] == 32 and [r["eps"] for r in report["results"]] == [0.01, 0.05, 0.1, 0.2]
    for row in report["results"]:
        assert set(row) == {"eps", "acc", "success", "correct", "hits", "unmoved"}
        assert row["acc"] == pytest.approx(row["correct"] / 32) and row["success"] is None
    assert is_png(here / "rep" / "attack-fgsm.png")
    scalars = scalar_events(here / "tb" / "fit" / "attack")
    assert [step for step, _ in scalars["attack/fgsm/acc"]] == [0, 10, 50, 100, 200]
    # the clean accuracy at step 0, then each epsilon's, in order of epsilon
    logged = [value for _, value in scalars["attack/fgsm/acc"]]
    assert logged == pytest.approx([report["clean_acc"]] + [row["acc"] for row in report["results"]])
    assert "attack/fgsm/success" not in scalars  # an untargeted attack has no success rate
    assert "attack/fgsm/plot" in scalars["_images"]


@pytest.mark.parametrize("where", ["--out", "--tb-dir"])
def test_an_attack_whose_results_cannot_be_written_stops_before_it_attacks(here, monkeypatch, where):
    from capsnet import attack

    attacked = []
    monkeypatch.setattr(attack, "run_attack", lambda *a, **k: attacked.append(1) or pytest.fail("attacked"))
    (here / "a-file").write_text("in the way")
    args = ["--out", "rep"] if where == "--tb-dir" else []
    result = invoke("attack", "--ckpt", "fit", "--eps", "0.1", where, "a-file/sub", *args)
    assert result.exit_code == 2, result.output
    assert "error: could not use a-file/sub" in result.stderr, result.stderr
    assert attacked == []  # refused before hours of attacking, not after


def test_an_attack_stopped_or_failed_leaves_no_folder_it_made(here, monkeypatch):
    from capsnet import attack

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(attack, "run_attack", stopped)
    (here / "kept").mkdir()
    with pytest.raises(KeyboardInterrupt):
        attack.attack_checkpoint("fit", epsilons=[0.1], report_dir="kept/new/deeper", tb_dir="kept/tb")
    assert list((here / "kept").iterdir()) == []  # kept/ was there before; what it made is gone
    monkeypatch.setattr(attack, "run_attack", lambda *a, **k: pytest.fail("attacked"))
    (here / "kept" / "tb").write_text("in the way")  # the events' folder cannot be made
    result = invoke("attack", "--ckpt", "fit", "--eps", "0.1", "--out", "kept/new", "--tb-dir", "kept/tb")
    assert result.exit_code == 2 and "error: could not use kept/tb/fit/attack" in result.stderr
    assert sorted(p.name for p in (here / "kept").iterdir()) == ["tb"]


@pytest.mark.parametrize("method", ["fgsm", "bim"])
def test_attack_accuracy_does_not_increase_with_epsilon(here, method):
    args = ["--eps", "0,0.02,0.05,0.1,0.2", *(["--steps", "4"] if method == "bim" else []), "--no-plot"]
    args += ["--no-tensorboard", "--json"]
    result = invoke("attack", "--ckpt", "fit", "--method", method, "--out", "rep", *args)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    accuracy = [report["clean_acc"]] + [row["acc"] for row in report["results"]]
    assert accuracy[0] == accuracy[1] >= 0.9, "the model fits its data, and eps 0 changes nothing"
    assert all(a >= b for a, b in itertools.pairwise(accuracy)), accuracy
    assert accuracy[-1] < accuracy[0]


def test_attack_with_another_number_of_routing_iterations_says_so(here):
    args = ["--eps", "0.1", "--no-plot", "--no-tensorboard", "--limit", "8", "--out", "iters"]
    trained = invoke("attack", "--ckpt", "fit", *args, "--json")
    assert json.loads(trained.stdout)["iterations"] == 2 and "trained_iterations" not in trained.stdout
    once = invoke("attack", "--ckpt", "fit", *args, "-o", "model.iterations=1")
    assert once.exit_code == 0, once.output
    assert "routing iterations: 1 (the run was trained with 2)" in once.stdout
    report = json.loads((here / "iters" / "attack-fgsm.json").read_text())
    assert report["iterations"] == 1 and report["trained_iterations"] == 2
    figures = invoke(
        "inspect",
        "--ckpt",
        "fit",
        "--out",
        "iters-fig",
        "-o",
        "model.iterations=3",
        "--tensorboard",
        "--tb-dir",
        "iters-tb",
    )
    assert figures.exit_code == 0, figures.output
    assert "routing iterations: 3 (the run was trained with 2)" in figures.stdout
    text = text_events(here / "iters-tb" / "fit" / "inspect")["inspect/test/summary/text_summary"]
    assert "routing iterations: 3 (the run was trained with 2)" in text and "wrote" not in text
    assert figures.stdout.count(" -> ") == 2  # the parent's activation after each of the three
    assert "routing iterations" not in invoke("inspect", "--ckpt", "fit", "--out", "iters-fig").stdout


def test_targeted_attack_reports_its_success_rate(here, monkeypatch):
    from capsnet import visualize

    args = ["--method", "bim", "--targeted", "--target", "next", "--eps", "0.05,0.2", "--steps", "3"]
    drawn = []
    real = visualize.plot_attack
    monkeypatch.setattr(visualize, "plot_attack", lambda *a, **k: drawn.append(real(*a, **k)) or drawn[-1])
    result = invoke("attack", "--ckpt", "fit", *args, "--out", "rep", "--tb-dir", "tb")
    assert result.exit_code == 0, result.output
    # the figure's example names the class it was pushed towards: a prediction of it is a hit
    (figure,) = drawn
    titles = [ax.get_title() for ax in figure.axes]
    assert any(t.startswith("clean\n") and "\ntarget class" in t for t in titles), titles
    assert is_png(here / "rep" / "attack-bim-targeted.png")
    # again without the figure: the earlier one, of other results, is not left beside the new ones
    result = invoke("attack", "--ckpt", "fit", *args, "--no-plot", "--out", "rep", "--tb-dir", "tb")
    assert result.exit_code == 0, result.output
    assert not (here / "rep" / "attack-bim-targeted.png").exists()
    assert (
        "note: removed the earlier rep/attack-bim-targeted.png, of other results (--no-plot draws none)"
        in result.stderr
    ), result.stderr
    assert "success" in result.stdout
    report = json.loads((here / "rep" / "attack-bim-targeted.json").read_text())
    assert report["targeted"] and report["target"] == "next" and report["steps"] == 3
    assert report["step_size"] is None  # as given: the default, whose step each row names
    assert [row["step_size"] for row in report["results"]] == pytest.approx([2.5 * 0.05 / 3, 2.5 * 0.2 / 3])
    for row in report["results"]:  # the share of the 32 test images classified as their target
        assert isinstance(row["hits"], int) and row["success"] == pytest.approx(row["hits"] / 32)
    assert report["results"][-1]["success"] > 0
    assert "attack/bim-targeted/success" in scalar_events(here / "tb" / "fit" / "attack")


class Saturated(torch.nn.Module):
    """Class activations of 0 or 1 to float precision: the attack's logits have no gradient."""

    def __init__(self, classes: int = 4):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(classes, 1, 20, 20))

    def forward(self, x):
        from capsnet.model import CapsOutput

        z = torch.tanh(torch.einsum("nchw,echw->ne", x, self.w))  # depends on every pixel
        side = torch.where(torch.arange(z.shape[1]) == 0, 1.0, -1.0)  # class 0 on, the others off
        a = torch.sigmoid(side * 1e3 * (1 + 0.1 * z))  # logits of magnitude 900-1100: saturated
        return CapsOutput(a, torch.zeros(len(x), a.shape[1], 4, 4))


def test_an_attack_that_cannot_move_the_images_says_so(here):
    from capsnet.attack import AttackReport, run_attack
    from capsnet.evaluate import prepare_checkpoint

    prep = prepare_checkpoint("fit", device="cpu")
    info = prep.loaders.info
    space = InputSpace.from_info(info.mean, info.std, info.channels)
    stuck = run_attack(Saturated(info.num_classes), prep.loader, [0.0, 0.1], space, progress=False)
    _clean, points, n, _ = stuck
    assert [p.unmoved for p in points] == [0, n]  # eps 0 changes nothing by design: not counted
    report = AttackReport("c", "r", "test", "fgsm", False, None, None, None, "pixel", n, _clean, points)
    assert f"at eps 0.1, {n} of {n} images were not changed at all" in report.summary()
    moved = run_attack(prep.model, prep.loader, [0.1], space, method="bim", steps=2, progress=False)[1]
    assert moved[0].unmoved < n  # the trained capsule network's gradients do move its images


def test_adversarial_images_stay_within_epsilon_and_valid_pixels(here):
    from capsnet.evaluate import prepare_checkpoint

    prep = prepare_checkpoint("fit", device="cpu")
    x, y = next(iter(prep.loader))
    info = prep.loaders.info
    space = InputSpace.from_info(info.mean, info.std, info.channels)
    for attack in (fgsm, bim):
        x_adv = attack(prep.model, x, y, 0.1, space)
        change = (x_adv - x) * torch.tensor(info.std).view(1, -1, 1, 1)  # in pixel units
        assert change.abs().max() <= 0.1 + 1e-5 and change.abs().max() > 0.05
        assert torch.all(x_adv >= space.low - 1e-6) and torch.all(x_adv <= space.high + 1e-6)


# --------------------------------------------------------------------------- inspect


def test_inspect_writes_five_png_figures_and_tensorboard_images(here):
    result = invoke(
        "inspect", "--ckpt", "fit", "--index", "3", "--out", "fig", "--tensorboard", "--tb-dir", "tb"
    )
    assert result.exit_code == 0, result.output
    names = [
        "a_reconstruction",
        "b_class_activations",
        "c_routing",
        "d_activation_maps",
        "e_pose_perturbation",
    ]
    for name in names:
        assert is_png(here / "fig" / f"{name}.png"), name
        assert f"fig/{name}.png" in result.stdout
    assert "routing figure: layer class" in result.stdout
    images = scalar_events(here / "tb" / "fit" / "inspect")["_images"]
    assert sorted(images) == [f"inspect/test/{name}" for name in names]  # the split's own: indices repeat


def test_inspect_with_tb_dir_writes_tensorboard_images_and_checks_their_folder_before_drawing(here):
    result = invoke("inspect", "--ckpt", "fit", "--index", "1", "--out", "fig-tb", "--tb-dir", "tb-implied")
    assert result.exit_code == 0, result.output
    assert (
        len(scalar_events(here / "tb-implied" / "fit" / "inspect")["_images"]) == 5
    )  # --tb-dir asks for them
    (here / "tb-blocked").write_text("in the way")
    result = invoke("inspect", "--ckpt", "fit", "--index", "1", "--out", "fig-none", "--tb-dir", "tb-blocked")
    assert result.exit_code == 2 and "error: could not use tb-blocked/fit/inspect" in result.stderr
    assert not (here / "fig-none").exists()  # refused before any figure, and no folder left behind


def test_inspect_of_a_model_without_decoder_says_which_figures_it_leaves_out(here):
    trained = invoke(
        "train", "--config", TINY, "--run-name", "nodec", "-o", "model.decoder=false", "-o", "train.epochs=1"
    )
    assert trained.exit_code == 0, trained.output
    result = invoke("inspect", "--ckpt", "nodec", "--out", "nodec-fig")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (here / "nodec-fig").iterdir()) == [
        "a_reconstruction.png",
        "b_class_activations.png",
        "c_routing.png",
        "d_activation_maps.png",
    ]
    assert "no decoder in this model (model.decoder: false)" in result.stdout
    assert "figure (e)" in result.stdout and "not drawn" in result.stdout
    assert "no decoder" not in invoke("inspect", "--ckpt", "fit", "--out", "with-decoder").stdout
    # the same --out again, of the model without decoder: the other model's figure (e) does not stay
    assert (here / "with-decoder" / "e_pose_perturbation.png").is_file()
    again = invoke("inspect", "--ckpt", "nodec", "--out", "with-decoder")
    assert again.exit_code == 0, again.output
    assert not (here / "with-decoder" / "e_pose_perturbation.png").exists()
    assert "note: removed the earlier with-decoder/e_pose_perturbation.png, of other results" in again.stderr


def test_inspect_at_another_image_size_is_refused_where_it_would_draw_reconstructions(here):
    for extra in ([], ["-o", "loss.recon_weight=0"]):  # the eval's advice does not apply to the figures
        result = invoke("inspect", "--ckpt", "fit", "--out", "sized", "-o", "data.image_size=24", *extra)
        assert result.exit_code == 2, result.output
        assert "gives 24x24, which its reconstructions could not be drawn beside" in result.stderr
        assert "recon_weight" not in result.stderr
    assert not (here / "sized").exists()


def test_inspect_says_when_the_decoder_it_draws_was_never_trained(here):
    trained = invoke(
        "train",
        "--config",
        TINY,
        "--run-name",
        "norecon",
        "-o",
        "loss.recon_weight=0",
        "-o",
        "train.max_steps=1",
    )
    assert trained.exit_code == 0, trained.output
    result = invoke("inspect", "--ckpt", "norecon", "--out", "norecon-fig")
    assert result.exit_code == 0, result.output
    assert "the decoder was not trained (the run's loss.recon_weight is 0)" in result.stdout
    assert is_png(here / "norecon-fig" / "e_pose_perturbation.png")
    assert "was not trained" not in invoke("inspect", "--ckpt", "fit", "--out", "trained-decoder").stdout


def test_inspect_draws_a_convolutional_layer_at_a_chosen_position(here):
    args = ["--layer", "caps1", "--parent", "2", "--position", "1,2", "--entries", "0,5", "--out", "conv"]
    result = invoke("inspect", "--ckpt", "fit", *args)
    assert result.exit_code == 0, result.output
    assert "layer caps1, parent type 2 at (1, 2), pose entries (0, 5)" in result.stdout
    assert is_png(here / "conv" / "c_routing.png")


def test_inspect_of_a_model_with_one_entry_poses_says_why_it_cannot_draw_the_routing():
    from capsnet.inspection import inspect_image
    from capsnet.visualize import ExperimentError

    torch.manual_seed(0)
    model = CapsNet(
        num_classes=3,
        image_size=20,
        stem_channels=[4],
        primary_types=2,
        caps_types=[2],
        caps_strides=[2],
        pose_size=1,
        coord_add=False,
        decoder=False,
    )
    for layer in ("class", "caps1"):
        with pytest.raises(ExperimentError, match=r"poses are 1x1 \(model.pose_size 1: one entry\)"):
            inspect_image(model, torch.randn(1, 20, 20), 0, ["a", "b", "c"], layer=layer)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["inspect", "--index", "999"], "has 32 images"),
        (["inspect", "--layer", "caps9"], "not a routing layer"),
        (["inspect", "--layer", "caps2", "--position", "5,5"], "positions"),
        (["inspect", "--position", "0,0"], "the class capsules have one position"),
        (["attack", "--target", "least"], "--target applies to targeted attacks"),
        (["inspect", "--entries", "3,3"], "two different pose entries"),
        (["inspect", "--perturb", "0"], "--perturb must be positive, got 0"),
        (["inspect", "--perturb", "nan"], "--perturb must be a finite number, got nan"),
        (["inspect", "--perturb", "inf"], "--perturb must be a finite number, got inf"),
        (["attack", "--eps", "0.1,big"], "is not a number"),
        (["attack", "--eps", "0.1,1e306"], "--eps: '1e306' is too large (at most 1000)"),
        (
            ["attack", "--eps", "0.1,1.5", "--no-tensorboard"],
            "--eps: 1.5 is past 1, which already lets each pixel",
        ),
        (["attack", "--method", "pgd"], "not one of"),
        (["attack", "-m", "bim", "--step-size", "inf"], "--step-size: must be a finite number, got inf"),
        (["attack", "-m", "bim", "--step-size", "-0.5"], "--step-size: must be above 0"),
        (["attack", "--eps", "0.0101,0.0104"], "0.0104 and eps 0.0101 would share TensorBoard step 10"),
        (["attack", "--eps", "0.0004,0.1"], "0.0004 and the clean accuracy (eps 0) would share"),
        (["attack", "-o", "model.caps_types=[2,2]"], "model.caps_types ([4, 4] in the checkpoint"),
        (["inspect", "-o", "routing.min_var=0.1"], "which -o cannot change: routing.min_var"),
    ],
)
def test_bad_experiment_arguments_fail_with_a_message(here, args, message):
    result = invoke(*args[:1], "--ckpt", "fit", *args[1:])
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output


def test_epsilons_closer_than_a_tensorboard_step_are_refused_only_with_tensorboard(here):
    from capsnet.attack import tensorboard_steps
    from capsnet.visualize import ExperimentError

    assert tensorboard_steps([0.0, 0.001, 0.01]) == [0, 1, 10]
    assert tensorboard_steps([0.0011, 0.002, 0.2]) == [1, 2, 200]
    with pytest.raises(ExperimentError, match=r"0.0004 and the clean accuracy \(eps 0\) would share"):
        tensorboard_steps([0.0, 0.0004])
    args = ["--eps", "0.0101,0.0104", "--no-tensorboard", "--no-plot", "--limit", "4", "--json"]
    result = invoke("attack", "--ckpt", "fit", *args, "--out", "rep")
    assert result.exit_code == 0, result.output
    report = json.loads((here / "rep" / "attack-fgsm.json").read_text())
    assert [point["eps"] for point in report["results"]] == [0.0101, 0.0104]


def test_epsilons_a_thousandth_apart_or_more_never_share_a_tensorboard_step():
    from capsnet.attack import tensorboard_steps

    # every half-thousandth from 0.0005 to 1, and each with its neighbour 0.001 above
    grid = [round(k * 0.0005, 4) for k in range(1, 2001)]
    for eps in grid:
        pair = [eps, round(eps + 0.001, 4)]
        low, high = tensorboard_steps(pair)
        assert high == low + 1, pair
        assert abs(low - eps * 1000) <= 0.5 + 1e-9, eps  # still eps x 1000, rounded
    for spaced in (grid[::2], grid[1::2]):  # 0.001 apart: every one has a step of its own
        steps = tensorboard_steps(spaced)
        assert steps == sorted(set(steps)) and len(steps) == len(spaced)


def test_attack_writes_tensorboard_events_as_the_run_did_unless_told(here):
    """A run trained with logging.tensorboard false gets no events from attack unless --tensorboard."""
    untracked = ["-o", "logging.tensorboard=false", "-o", "train.max_steps=1"]
    trained = invoke("train", "--config", TINY, "--run-name", "untracked", *untracked)
    assert trained.exit_code == 0, trained.output
    args = ["--ckpt", "untracked", "--no-plot", "--limit", "4", "--out", "rep-u"]
    # epsilons closer than a TensorBoard step are no clash where no events are written
    result = invoke("attack", *args, "--eps", "0.0101,0.0104", "--json")
    assert result.exit_code == 0, result.output
    assert "tensorboard" not in json.loads(result.stdout)["files"]
    assert not (here / "runs" / "untracked").exists()
    # where they are asked for, the clash is said before the checkpoint is looked for
    clash = invoke("attack", "--ckpt", "no-such-run", "--eps", "0.0101,0.0104", "--tensorboard")
    assert clash.exit_code == 2 and "0.0101" in clash.stderr and "no-such-run" not in clash.stderr, (
        clash.output
    )
    forced = invoke("attack", *args, "--eps", "0.1", "--tensorboard", "--json")
    assert forced.exit_code == 0, forced.output
    assert json.loads(forced.stdout)["files"]["tensorboard"] == str(Path("runs", "untracked", "attack"))
    # a folder given for the events asks for them
    placed = invoke("attack", *args, "--eps", "0.1", "--tb-dir", "untracked-tb", "--json")
    assert placed.exit_code == 0, placed.output
    assert json.loads(placed.stdout)["files"]["tensorboard"] == str(
        Path("untracked-tb", "untracked", "attack")
    )
    assert (here / "untracked-tb" / "untracked" / "attack").is_dir()
    # a run that wrote events as it trained gets them by default
    tracked = invoke(
        "attack", "--ckpt", "fit", "--eps", "0.1", "--no-plot", "--limit", "4", "--tb-dir", "fit-tb"
    )
    assert tracked.exit_code == 0, tracked.output
    assert (here / "fit-tb" / "fit" / "attack").is_dir()


def test_reports_written_over_are_named(here):
    args = ["--eps", "0.1", "--no-tensorboard", "--limit", "4", "--out", "again"]
    first = invoke("attack", "--ckpt", "fit", *args)
    assert first.exit_code == 0, first.output
    assert "replaced" not in first.stderr
    second = invoke("attack", "--ckpt", "fit", *args, "--no-plot")
    assert second.exit_code == 0, second.output
    assert (
        f"note: replaced the earlier {Path('again') / 'attack-fgsm.json'} (give another --out"
        in second.stderr
    )
    # --no-plot removes the earlier figure, of other results, and says so
    assert f"note: removed the earlier {Path('again') / 'attack-fgsm.png'}, of other results" in second.stderr
    assert not (here / "again" / "attack-fgsm.png").exists()
    figures = ["inspect", "--ckpt", "fit", "--out", "figs"]
    assert "replaced" not in invoke(*figures).stderr
    again = invoke(*figures)
    assert again.exit_code == 0 and again.stderr.count(".png") == 5, again.output
    assert "(give another --out to keep reports apart)" in again.stderr
    # without --out, the default folder is named after the checkpoint and image
    third = invoke("attack", "--ckpt", "fit", "--eps", "0.1", "--no-tensorboard", "--limit", "4", "--no-plot")
    fourth = invoke(
        "attack", "--ckpt", "fit", "--eps", "0.1", "--no-tensorboard", "--limit", "4", "--no-plot"
    )
    assert third.exit_code == fourth.exit_code == 0, fourth.output
    assert "(give --out DIR to keep reports apart)" in fourth.stderr


def test_missing_matplotlib_is_reported_with_the_install_command(here, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    result = invoke("inspect", "--ckpt", "fit")
    assert result.exit_code == 2
    assert "pip install 'capsnet[viz]'" in result.output


# --------------------------------------------------------------------------- routing trace


@pytest.mark.parametrize("impl", ["plain", "fast"])
def test_tracing_the_routing_changes_nothing_and_records_every_iteration(impl):
    torch.manual_seed(0)
    votes = torch.randn(2, 3, 4, 6, 16, dtype=torch.float64)  # (N, L, C, I, H)
    act_in = torch.rand(2, 3, 6, dtype=torch.float64)
    beta_u, beta_a = torch.randn(4, dtype=torch.float64), torch.randn(4, dtype=torch.float64)
    settings = RoutingSettings(iterations=3)
    plain = em_routing(votes, act_in, beta_u, beta_a, settings, impl=impl)
    trace: list = []
    traced = em_routing(votes, act_in, beta_u, beta_a, settings, impl=impl, trace=trace)
    assert torch.allclose(traced.pose, plain.pose) and torch.allclose(traced.activation, plain.activation)
    assert len(trace) == 3
    assert torch.allclose(trace[0]["r"], torch.full_like(trace[0]["r"], 1 / 4)), "r starts uniform"
    assert torch.allclose(trace[-1]["mu"], traced.pose) and torch.allclose(
        trace[-1]["act"], traced.activation
    )
    for it in trace[1:]:
        assert torch.allclose(it["r"].sum(2), torch.ones(2, 3, 6, dtype=torch.float64))


def test_eval_plot_names_the_file_it_writes_and_checks_the_name_before_evaluating(here):
    result = invoke("eval", "--ckpt", "fit", "--plot", "plots/acc")
    assert result.exit_code == 0, result.output
    assert is_png(here / "plots" / "acc.png") and "wrote plots/acc.png" in result.stdout
    bad = invoke("eval", "--ckpt", "fit", "--plot", "acc.v2")
    assert bad.exit_code == 2 and "acc.v2: matplotlib cannot write .v2 files; use one of" in bad.stderr
    assert "accuracy" not in bad.stdout  # refused before the evaluation
    folder = invoke("eval", "--ckpt", "fit", "--plot", "plots")
    assert folder.exit_code == 2 and "plots is a folder: give a file name" in folder.stderr
    as_json = invoke("eval", "--ckpt", "fit", "--json", "--plot", "plots/json-acc")
    assert as_json.exit_code == 0, as_json.output
    assert json.loads(as_json.stdout)["acc"] >= 0  # stdout stays one JSON object
    assert "wrote plots/json-acc.png" in as_json.stderr and is_png(here / "plots" / "json-acc.png")


def test_the_eval_plot_marks_a_class_without_images_instead_of_drawing_it_at_zero():
    from types import SimpleNamespace

    from capsnet.visualize import plot_eval

    result = SimpleNamespace(
        class_names=["a", "b", "c"], per_class_correct=[2, 0, 0], per_class_total=[2, 0, 3], acc=0.4
    )
    report = SimpleNamespace(
        result=result, familiar=None, multicrop=None, multicrop_familiar=None, split="test", run="r", step=1
    )
    (ax,) = plot_eval(report).axes
    notes = [t for t in ax.texts if t.get_text() == "no images"]
    assert len(notes) == 1 and round(notes[0].get_position()[1]) == 1  # class b's row, not c's 0%
    assert "no images in the split have no bar" in ax.get_xlabel()
    result.per_class_total = [2, 1, 3]
    (ax,) = plot_eval(report).axes
    assert not ax.texts and ax.get_xlabel() == "accuracy"


def test_eval_json_is_standard_json_when_a_class_has_no_images(here):
    result = invoke("eval", "--ckpt", "fit", "--limit", "2", "--json")
    assert result.exit_code == 0, result.output

    def refuse(constant):
        raise ValueError(f"not standard JSON: {constant}")

    report = json.loads(result.stdout, parse_constant=refuse)
    empty = [v for v in report["per_class"].values() if v["count"] == 0]
    assert empty and all(v["acc"] is None for v in empty)


def test_multi_crop_shifts_that_move_half_of_the_image_out_of_view_are_refused(here):
    result = invoke("eval", "--ckpt", "fit", "--crops", "5", "--crop-shift", "25")
    assert result.exit_code == 2 and "crops shifted by 25 px would move half or more" in result.stderr
    mirrored = invoke("eval", "--ckpt", "fit", "--mirror", "--crop-shift", "2")
    assert mirrored.exit_code == 2 and "give --crops N with it" in mirrored.stderr
    from capsnet.data import shifted

    image = np.ones((1, 4, 4), dtype=np.uint8)
    assert not shifted(image, 4, 0).any() and not shifted(image, -1, -9).any()


# --------------------------------------------------------------------------- checks against hand computations


class LinearScore(torch.nn.Module):
    """Two classes with scores s and -s, s = w . x (or, with ``centre``, s = 1e-3 |x - centre|^2):
    activations sigmoid(+-s), so the attacks' logits are +-s and the gradient's sign is known by hand."""

    def __init__(self, w: torch.Tensor, centre: torch.Tensor | None = None):
        super().__init__()
        self.w = torch.nn.Parameter(w)
        self.centre = centre

    def forward(self, x):
        from capsnet.model import CapsOutput

        if self.centre is None:
            s = torch.einsum("nchw,chw->n", x, self.w)
        else:
            s = 1e-3 * (x - self.centre).square().flatten(1).sum(1)
        z = torch.stack([s, -s], 1)
        return CapsOutput(torch.sigmoid(z), torch.zeros(len(x), 2, 4, 4))


MEAN, STD = [0.5, 0.2], [0.25, 0.1]


def _normalised(pixels: torch.Tensor) -> torch.Tensor:
    return (pixels - torch.tensor(MEAN).view(1, -1, 1, 1)) / torch.tensor(STD).view(1, -1, 1, 1)


def _pixels(x: torch.Tensor) -> torch.Tensor:
    return x * torch.tensor(STD).view(1, -1, 1, 1) + torch.tensor(MEAN).view(1, -1, 1, 1)


def test_fgsm_and_bim_step_against_the_true_class_or_towards_the_target_in_pixel_units_and_clip():
    torch.manual_seed(3)
    pixels = torch.rand(4, 2, 5, 5, dtype=torch.float64)
    pixels[:, :, 0] = 0.0  # black and white rows: the clipping to valid pixels matters
    pixels[:, :, 1] = 1.0
    pixels[:, :, 2] = 0.04
    w = torch.randn(2, 5, 5)
    model = LinearScore(w * 1e-3)  # small scores: no saturation
    x = _normalised(pixels).float()
    space = InputSpace.from_info(MEAN, STD, 2)
    eps = 0.1

    # in pixel units: eps along direction * sign(w), kept in [0, 1]
    def expected(direction: int) -> torch.Tensor:
        return (pixels + direction * eps * w.sign().double()).clamp(0, 1)

    zeros, ones = torch.zeros(4, dtype=torch.long), torch.ones(4, dtype=torch.long)
    # class 0's score rises with w . x: untargeted against class 0 (or targeted at class 1) goes along -sign(w)
    cases = [(zeros, False, -1), (ones, False, +1), (ones, True, -1), (zeros, True, +1)]
    for labels, targeted, direction in cases:
        for attack in (fgsm, bim):
            x_adv = attack(model, x, labels, eps, space, targeted)
            assert torch.allclose(_pixels(x_adv.double()), expected(direction), atol=1e-5), (attack, targeted)


def test_bim_follows_the_gradient_at_each_step_with_steps_of_2_5_eps_over_steps_and_stays_in_the_box():
    torch.manual_seed(4)
    start = 0.2 + 0.6 * torch.rand(2, 2, 4, 4, dtype=torch.float64)  # away from 0 and 1: no pixel clipping
    # the minimum of class 0's score, away from each pixel by one of these (pixel units): with eps 0.1 and
    # 5 steps of 0.05 the pixels close in, overshoot and swing back, or stop at the edge of the box
    gaps = torch.tensor([-0.17, -0.12, -0.07, -0.02, 0.02, 0.07, 0.12, 0.17], dtype=torch.float64)
    gap = gaps[torch.randint(0, len(gaps), start.shape)]
    model = LinearScore(torch.zeros(1), centre=_normalised(start + gap).float())
    space = InputSpace.from_info(MEAN, STD, 2)
    eps, steps = 0.1, 5
    # untargeted against class 0: down its score, towards the centre
    labels = torch.zeros(2, dtype=torch.long)
    x_adv = bim(model, _normalised(start).float(), labels, eps, space, steps=steps)
    # by hand, pixel by pixel: a step of 2.5 eps / steps towards the centre, then back into the eps box
    p = start.clone()
    for _ in range(steps):
        p = p - 2.5 * eps / steps * torch.sign(p - (start + gap))
        p = torch.minimum(torch.maximum(p, start - eps), start + eps)
    assert torch.allclose(_pixels(x_adv.double()), p, atol=1e-5)


def test_targets_are_other_classes_next_random_or_least_active():
    from capsnet.attack import choose_targets

    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(400) % 4
    activations = torch.rand(400, 4, generator=generator)
    activations[::3, 0] = 0.0  # the true class is often the least active one
    assert torch.equal(choose_targets(labels, activations, "next", generator), (labels + 1) % 4)
    chosen = choose_targets(labels, activations, "random", generator)
    pairs = set(zip(labels.tolist(), chosen.tolist()))
    assert pairs == {(a, b) for a in range(4) for b in range(4) if a != b}  # never the true class
    least = choose_targets(labels, activations, "least", generator).tolist()
    by_hand = [
        min((k for k in range(4) if k != label), key=lambda k: float(activations[i, k]))
        for i, label in enumerate(labels.tolist())
    ]
    assert least == by_hand


class ChannelVote(torch.nn.Module):
    """Predicts the channel with the brightest mean."""

    def __init__(self):
        super().__init__()
        self.unused = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x):
        from capsnet.model import CapsOutput

        return CapsOutput(torch.sigmoid(x.mean((2, 3))), torch.zeros(len(x), x.shape[1], 4, 4))


def test_a_targeted_attack_counts_as_hits_only_the_images_classified_as_their_target():
    from capsnet.attack import run_attack

    predicted = torch.tensor([0, 1, 2, 0, 1, 2])
    labels = torch.tensor([0, 0, 0, 2, 2, 2])  # targets ("next"): 1 1 1 0 0 0
    x = torch.full((6, 3, 2, 2), -1.0)
    x[torch.arange(6), predicted] = 1.0
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, labels), batch_size=4)
    space = InputSpace.from_info([0.5] * 3, [0.25] * 3, 3)
    clean, points, n, _ = run_attack(ChannelVote(), loader, [0.0], space, targeted=True, progress=False)
    # right: images 0 and 5; on target: images 1 (1 = 0 + 1) and 3 (0 = 2 + 1 mod 3); neither: 2 and 4
    assert (clean, n, points[0].correct, points[0].hits) == (2 / 6, 6, 2, 2)
    assert points[0].success == pytest.approx(2 / 6)


class RoundedAway(torch.nn.Module):
    """Two classes on two pixels (p, q): class 1 when p - q > 0.0005. Images at p = 1.001, q = 1 are
    class 1 in float32, but class 0 under bf16 autocast, which rounds p to 1 before the product."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor([[1.0, -1.0]]))

    def forward(self, x):
        from capsnet.model import CapsOutput

        s = torch.nn.functional.linear(x.flatten(1), self.w).float()  # (N, 1): p - q
        z = torch.cat([torch.full_like(s, 0.0005), s], 1)  # (N, 2)
        return CapsOutput(torch.sigmoid(z), torch.zeros(len(x), 2, 4, 4))


def test_an_attack_classifies_images_in_the_run_s_precision_as_evaluation_does():
    from capsnet.attack import run_attack
    from capsnet.evaluate import autocast

    model = RoundedAway()
    x = torch.tensor([1.001, 1.0]).view(1, 1, 1, 2).repeat(3, 1, 1, 1)  # (3, 1, 1, 2)
    labels = torch.zeros(3, dtype=torch.long)
    with torch.no_grad(), autocast(torch.device("cpu"), "bf16"):
        scored = float((model(x).activations.float().argmax(1) == labels).float().mean())
    with torch.no_grad():
        in_float32 = float((model(x).activations.argmax(1) == labels).float().mean())
    assert scored != in_float32, "bf16 must change the predictions for this test to tell them apart"
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, labels), batch_size=2)
    space = InputSpace.from_info(None, None, 1)
    clean, points, n, _ = run_attack(model, loader, [0.0], space, precision="bf16", progress=False)
    assert n == 3 and clean == points[0].acc == scored


def test_evaluation_sums_over_batches_of_any_size_and_counts_each_class_by_its_true_label():
    from capsnet.config import config_from_dict
    from capsnet.evaluate import evaluate
    from capsnet.loss import compute_loss

    model, images, transform, x = _four_class_model_and_images(seed=2, n=10)
    with torch.no_grad():
        predicted = model(x).activations.argmax(1)
    labels = torch.where(torch.arange(10) < 6, predicted, (predicted + 1) % 4)  # six right, four wrong
    cfg = config_from_dict({})
    loader = torch.utils.data.DataLoader(ImageDataset(images, labels, transform), batch_size=4)  # 4, 4, 2
    names = ["a", "b", "c", "d"]
    result = evaluate(model, loader, cfg, "cpu", class_names=names)
    total = [int((labels == k).sum()) for k in range(4)]
    right = [sum(1 for i in range(6) if int(labels[i]) == k) for k in range(4)]
    assert (result.n, result.correct, result.acc) == (10, 6, 0.6)
    assert result.per_class_total == total and result.per_class_correct == right
    accuracy = [c / t if t else float("nan") for c, t in zip(right, total)]
    assert result.per_class_acc == pytest.approx(accuracy, nan_ok=True)
    big = 1 << 62  # evaluation's margin: the final one
    with torch.no_grad():
        each = [
            float(compute_loss(model(x[i : i + 1]), x[i : i + 1], labels[i : i + 1], model, cfg, big, big)[0])
            for i in range(10)
        ]
    assert result.loss == pytest.approx(sum(each) / 10, rel=1e-4)  # the mean over images, not over batches
    rows = [line.split() for line in result.table().splitlines()[1:]]
    assert rows == [[n, f"{a:.4f}", str(c), str(t)] for n, a, c, t in zip(names, accuracy, right, total)]
    # multi-crop testing counts the same way, with shifts of up to 20 / 14 = 1 px by default
    crops = evaluate_crops(
        model, ImageDataset(images, labels, transform), 5, "cpu", batch_size=10, progress=False
    )
    assert crops.offsets == [(0, 0), (-1, -1), (-1, 1), (1, -1), (1, 1)]
    assert crops.n == 10 and crops.per_class_total == total


def test_limit_scores_a_seeded_random_subset_of_the_images_in_order():
    from capsnet.evaluate import limited

    levels = torch.arange(100, dtype=torch.uint8).view(100, 1, 1, 1).expand(100, 1, 2, 2).contiguous()
    dataset = ImageDataset(levels, torch.zeros(100, dtype=torch.long), PixelTransform([0.0], [1.0]))
    loader = torch.utils.data.DataLoader(dataset, batch_size=7)
    assert limited(loader, 100) is loader
    first, again, other = limited(loader, 10, 0), limited(loader, 10, 0), limited(loader, 10, 1)
    rows = first.dataset.rows().tolist()
    assert len(rows) == 10 and rows == sorted(set(rows)) and first.batch_size == 7
    assert rows == again.dataset.rows().tolist() and rows != other.dataset.rows().tolist()
    assert rows != list(range(10)) and max(rows) >= 50  # drawn from all the images, not the first ten
    assert [round(float(x[0, 0, 0]) * 255) for x, _ in first.dataset] == rows  # those rows' images


def test_epsilons_past_1_are_refused_in_pixel_units_alone():
    from capsnet.attack import ExperimentError, InputSpace, check_pixel_epsilons

    pixels = InputSpace.from_info([0.5], [0.25], 1)
    standardised = InputSpace.from_info(None, None, 2)  # smallNORB's: eps in standard deviations
    assert (pixels.units, standardised.units) == ("pixel", "standardised")
    check_pixel_epsilons([0.1, 1.0], pixels)
    check_pixel_epsilons([0.5, 2.0, 10.0], standardised)
    with pytest.raises(ExperimentError, match="--eps: 2 is past 1"):
        check_pixel_epsilons([0.5, 2.0], pixels)
