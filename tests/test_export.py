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
    from capsnet.export import sample_batch

    empty = SimpleNamespace(test=[], info=SimpleNamespace(channels=1))
    monkeypatch.setattr(data, "build_loaders", lambda cfg: empty)
    x, source = sample_batch(SimpleNamespace(data=SimpleNamespace(name="folder")), 1, 20, 4)
    assert x.shape == (4, 1, 20, 20)
    assert source == "of random images (test data unavailable: the test split has no images)"
