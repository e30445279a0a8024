"""Export of the default (fast) routing path: torch.export .pt2 and ONNX, checked against eager."""

from __future__ import annotations

import pytest
import torch

from capsnet import routing
from capsnet.export import Classifier, export_onnx, export_pt2
from capsnet.model import CapsNet


def small_model(stem_channels: tuple[int, ...] = (8,)) -> Classifier:
    torch.manual_seed(3)
    model = CapsNet(
        in_channels=1,
        num_classes=4,
        image_size=20,
        stem_channels=stem_channels,
        primary_types=4,
        caps_types=(4, 4),
        caps_strides=(2, 1),
        iterations=3,
        decoder=False,
    )
    return Classifier(model).eval()


def eager(module, x):
    with torch.no_grad():
        return module(x)


def assert_matches(runner, module, batches):
    for x in batches:
        want = eager(module, x)
        got = runner(x)
        assert len(got) == 2
        for g, w in zip(got, want):
            assert g.shape == w.shape
            torch.testing.assert_close(torch.as_tensor(g), w, atol=1e-5, rtol=1e-4)


def test_pt2_export_of_the_fast_path_matches_eager_on_other_batch_sizes(tmp_path):
    module = small_model()
    assert all(layer.impl == "fast" for layer in module.model.routing_layers())
    assert any(p.requires_grad for p in module.parameters())  # no requires_grad_(False) needed
    runner = export_pt2(module, torch.randn(4, 1, 20, 20), tmp_path / "model.pt2")
    assert_matches(runner, module, [torch.randn(3, 1, 20, 20), torch.randn(7, 1, 20, 20)])


def test_onnx_export_of_the_fast_path_matches_eager_on_other_batch_sizes(tmp_path):
    pytest.importorskip("onnxscript")
    module = small_model()
    runner = export_onnx(module, torch.randn(4, 1, 20, 20), tmp_path / "model.onnx")
    assert (tmp_path / "model.onnx").stat().st_size > 0
    if runner is None:
        pytest.skip("onnxruntime is not installed")
    assert_matches(runner, module, [torch.randn(2, 1, 20, 20), torch.randn(5, 1, 20, 20)])


def test_an_onnx_graph_whose_batch_size_the_exporter_fixed_is_refused(tmp_path):
    pytest.importorskip("onnxscript")
    from capsnet.export import ExportError

    with pytest.raises(ExportError, match="batch size is fixed at 1"):
        export_onnx(small_model(), torch.randn(1, 1, 20, 20), tmp_path / "model.onnx")


def test_onnx_export_of_a_deeper_stem_matches_eager(tmp_path):
    """configs/small_deep.yaml's kind of stem: extra 3x3 convs with batch norm after the first."""
    pytest.importorskip("onnxscript")
    module = small_model(stem_channels=(8, 8, 8))
    for layer in module.model.stem:  # batch-norm statistics that are not the identity
        if isinstance(layer, torch.nn.BatchNorm2d):
            layer.running_mean.uniform_(-0.5, 0.5)
            layer.running_var.uniform_(0.5, 2.0)
    runner = export_onnx(module, torch.randn(4, 1, 20, 20), tmp_path / "model.onnx")
    if runner is None:
        pytest.skip("onnxruntime is not installed")
    assert_matches(runner, module, [torch.randn(2, 1, 20, 20), torch.randn(5, 1, 20, 20)])


def test_exporting_leaves_no_traced_tensor_in_the_fold_cache(tmp_path):
    module = small_model()
    x = torch.randn(3, 1, 20, 20)
    routing._cached_fold.cache_clear()
    export_pt2(module, torch.randn(4, 1, 20, 20), tmp_path / "model.pt2")
    assert routing._cached_fold.cache_info().currsize == 0  # folds built while tracing are not kept
    got = eager(module, x)
    assert routing._cached_fold.cache_info().currsize == 2
    fresh = small_model()
    for a, b in zip(got, eager(fresh, x)):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_the_parity_check_scales_its_tolerance_to_each_outputs_magnitude():
    from capsnet.export import TOLERANCE, _max_diff

    acts, poses = torch.full((2, 3), 0.5), torch.full((2, 3, 4, 4), 1000.0)
    # poses of magnitude 1000 off by 0.05: within 1e-4 of their scale; activations exact
    diff, ratio = _max_diff((acts, poses), (acts.clone(), poses + 0.05))
    assert diff == pytest.approx(0.05, rel=1e-3) and ratio == pytest.approx(
        0.05 / (TOLERANCE * 1000), rel=1e-3
    )
    assert ratio <= 1
    # activations off by 1e-3 fail whatever the poses' scale
    assert _max_diff((acts, poses), (acts + 1e-3, poses.clone()))[1] > 1
    # a NaN fails
    assert not _max_diff((acts, poses), (acts.clone(), poses * float("nan")))[1] <= 1
    with pytest.raises(Exception, match="shape"):
        _max_diff((acts,), (acts[:1],))


def test_an_empty_test_split_falls_back_to_random_parity_images(monkeypatch):
    from types import SimpleNamespace

    from capsnet import data
    from capsnet.export import InputSpec, Preprocess, sample_batch

    empty = SimpleNamespace(test=SimpleNamespace(dataset=[]), info=SimpleNamespace(channels=1))
    monkeypatch.setattr(data, "build_loaders", lambda cfg, **_: empty)
    spec = InputSpec("pixels", 1, 20, 20, (0.5,), (0.25,))
    pixels, fed, source = sample_batch(SimpleNamespace(data=SimpleNamespace(name="folder")), spec, 4)
    assert pixels.shape == (4, 1, 20, 20) and 0 <= pixels.min() and pixels.max() <= 1
    assert torch.equal(pixels * 255, (pixels * 255).round())  # whole uint8 levels, like stored images
    torch.testing.assert_close(fed, Preprocess(spec)(pixels))
    assert source == "of random images (test data unavailable: the test split has no images)"


def test_without_the_data_or_a_recorded_normalisation_the_parity_check_still_has_inputs(monkeypatch):
    """An older checkpoint without data_info, exported --inputs normalised where its data is gone."""
    from types import SimpleNamespace

    from capsnet import data
    from capsnet.export import InputSpec, sample_batch

    def missing(cfg, **_):
        raise data.DatasetNotFoundError("fashion-mnist not found")

    monkeypatch.setattr(data, "build_loaders", missing)
    spec = InputSpec("normalised", 1, 20, 20, None, None)
    pixels, fed, source = sample_batch(SimpleNamespace(data=SimpleNamespace(name="fashion-mnist")), spec, 4)
    assert pixels.shape == fed.shape == (4, 1, 20, 20) and bool(fed.isfinite().all())
    assert source == "of random images (test data unavailable: fashion-mnist not found)"


def test_the_graphs_normalisation_is_the_data_pipelines():
    """Preprocess (in the exported graph) against the evaluation transforms of capsnet.data."""
    import numpy as np

    from capsnet.data import PixelTransform, StandardisedCrop, smallnorb_source_size
    from capsnet.export import InputSpec, Preprocess

    rng = np.random.default_rng(0)
    mean, std = [0.4914, 0.4822, 0.4465], [0.2470, 0.2435, 0.2616]
    images = rng.integers(0, 256, size=(5, 3, 12, 12), dtype=np.uint8)
    want = torch.stack([PixelTransform(mean, std)(x) for x in images])
    got = Preprocess(InputSpec("pixels", 3, 12, 12, tuple(mean), tuple(std)))(
        torch.from_numpy(images).float() / 255
    )
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)

    # smallNORB: whole-image statistics, then the centre crop; a flat image meets the std floor
    crop = 32
    size = smallnorb_source_size(crop)
    assert size == 48
    views = rng.integers(0, 256, size=(4, 2, size, size), dtype=np.uint8)
    views[1, 0] = 77
    evaluation = StandardisedCrop(crop)
    want = torch.stack([evaluation(x) for x in views])
    got = Preprocess(InputSpec("pixels", 2, size, crop, None, None, per_image=True))(
        torch.from_numpy(views).float() / 255
    )
    assert got.shape == (4, 2, crop, crop)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert float(got[1, 0].abs().max()) == 0.0


def test_input_spec_reads_the_checkpoints_normalisation_and_refuses_what_it_cannot_describe():
    from capsnet.export import ExportError, input_spec

    arch = {"in_channels": 1, "image_size": 28}
    spec = input_spec("pixels", arch, {"mean": [0.286], "std": [0.353]}, "fashion-mnist")
    assert (spec.size, spec.mean, spec.std) == (28, (0.286,), (0.353,))
    assert "(p - mean) / std per channel for pixels p in [0, 1], mean [0.286], std [0.353]" in spec.describe()
    assert spec.describe().startswith("images (N, 1, 28, 28) float32: pixels in [0, 1]")
    norb = input_spec(
        "pixels", {"in_channels": 2, "image_size": 32}, {"mean": None, "std": None}, "smallnorb"
    )
    assert (norb.size, norb.model_size) == (48, 32) and "centre 32x32 crop" in norb.describe()
    assert norb.describe().endswith(
        "in training the pixels were the dataset's 96x96 views downsampled to 48x48 "
        "by area averaging (torch.nn.functional.interpolate, mode='area': adaptive average pooling), rounded to uint8"
    )
    assert spec.resize is None and "in training" not in spec.describe()  # Fashion-MNIST at its own 28x28
    larger = input_spec(
        "pixels", {"in_channels": 1, "image_size": 32}, {"mean": [0.3], "std": [0.4]}, "fashion-mnist"
    )
    assert "the pixels were the dataset's 28x28 images resized to 32x32" in larger.describe()
    normalised = input_spec("normalised", {"in_channels": 2, "image_size": 32}, None, "smallnorb")
    assert normalised.size == 32 and "preprocessed by the caller" in normalised.describe()
    with pytest.raises(ExportError, match="--inputs normalised"):
        input_spec("pixels", arch, None, "fashion-mnist")
    unrecorded = input_spec("normalised", arch, None, "fashion-mnist")  # the caller normalises
    assert unrecorded.size == 28 and "the checkpoint does not record how" in unrecorded.describe()
    with pytest.raises(ExportError, match="2 channel"):
        input_spec("pixels", arch, {"mean": [0.1, 0.2], "std": [0.3, 0.3]}, "folder")
    with pytest.raises(ExportError, match="unknown --inputs 'raw'"):
        input_spec("raw", arch, None, "folder")
