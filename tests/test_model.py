"""CapsNet: presets, parameter counts, geometry, shapes, initialisation, precision."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from capsnet import CapsNet
from capsnet.config import load_config


def test_small_preset_has_the_papers_68k_parameters_within_five_percent():
    model = CapsNet.from_preset("small", in_channels=1, num_classes=5, image_size=32)
    assert abs(model.num_parameters() - 68_000) / 68_000 < 0.05


def test_paper_preset_has_the_papers_310k_parameters_within_five_percent():
    model = CapsNet.from_preset("paper", in_channels=1, num_classes=5, image_size=32)
    assert abs(model.num_parameters() - 310_000) / 310_000 < 0.05


def test_summary_prints_the_parameter_count():
    model = CapsNet.from_preset("small", decoder=False)
    assert f"{model.num_parameters():,} parameters" in model.summary()


@pytest.mark.parametrize(
    "channels,size,grid",
    [(1, 32, [14, 14, 6, 4]), (1, 28, [12, 12, 5, 3]), (3, 32, [14, 14, 6, 4])],
)
def test_capsule_grid_for_common_input_sizes(channels, size, grid):
    model = CapsNet.from_preset("small", in_channels=channels, num_classes=10, image_size=size)
    assert [h for _, h, _ in model.capsule_grid(size, size)] == grid
    out = model(torch.randn(2, channels, size, size))
    assert out.activations.shape == (2, 10)
    assert out.poses.shape == (2, 10, 4, 4)


def test_impossible_geometry_raises_a_value_error_naming_the_layer_and_sizes():
    with pytest.raises(ValueError, match=r"caps2: input of 2x2 capsules is smaller than its 3x3 kernel"):
        CapsNet.from_preset("small", image_size=16)


def test_wrong_channel_count_raises_a_clear_error():
    model = CapsNet.from_preset("small", in_channels=1, image_size=28)
    with pytest.raises(ValueError, match=r"\(N, 1, H, W\)"):
        model(torch.randn(1, 3, 28, 28))


def test_a_batch_of_one_works_and_the_batch_size_is_not_stored():
    model = CapsNet.from_preset("small", num_classes=5, image_size=32).eval()
    assert model(torch.randn(3, 1, 32, 32)).activations.shape == (3, 5)
    assert model(torch.randn(1, 1, 32, 32)).activations.shape == (1, 5)


def test_outputs_do_not_depend_on_the_other_samples_in_the_batch():
    model = CapsNet.from_preset("small", num_classes=5, image_size=28).eval()
    x = torch.randn(4, 1, 28, 28)
    together = model(x).activations
    alone = torch.cat([model(x[i : i + 1]).activations for i in range(4)])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-4)


def test_activations_lie_strictly_between_zero_and_one():
    model = CapsNet.from_preset("small", num_classes=5, image_size=32)
    a = model(torch.randn(4, 1, 32, 32)).activations
    assert ((a > 0) & (a < 1)).all()


def test_about_half_of_the_primary_capsules_are_active_at_initialisation():
    torch.manual_seed(0)
    model = CapsNet.from_preset("small", num_classes=10, image_size=28)
    _, act = model.primary(model.stem(torch.randn(16, 1, 28, 28)))
    assert 0.35 < (act > 0.5).float().mean().item() < 0.65


def test_faint_primary_capsules_keep_their_activation_and_gradient_under_float16_autocast():
    """A pre-activation of -20 is a = 2e-9: float16 would round it to 0, and its gradient with it."""
    from capsnet.layers import PrimaryCaps

    primary = PrimaryCaps(4, types=2)
    with torch.no_grad():
        primary.activation.bias.fill_(-20.0)
    x = torch.rand(2, 4, 3, 3)
    with torch.autocast("cpu", dtype=torch.float16):
        _, act = primary(x)
    assert act.dtype == torch.float32 and (act > 0).all()
    act.sum().backward()
    grad = primary.activation.bias.grad
    assert torch.allclose(
        grad, torch.full_like(grad, 9 * 2 * torch.sigmoid(torch.tensor(-20.0)).item()), rtol=0.05
    )


def test_model_trains_a_step_and_every_parameter_gets_a_finite_gradient():
    model = CapsNet.from_preset("small", num_classes=5, image_size=32)
    out = model(torch.randn(4, 1, 32, 32))
    recon = model.reconstruct(out.poses, torch.tensor([0, 1, 2, 3]))
    assert recon.shape == (4, 1, 32, 32)
    (out.activations.sum() + recon.square().mean()).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_decoder_masks_all_but_the_target_class():
    model = CapsNet.from_preset("small", num_classes=5, image_size=28)
    poses = torch.randn(2, 5, 4, 4)
    labels = torch.tensor([1, 3])
    changed = poses.clone()
    changed[0, 0] += 5.0  # not the target of sample 0
    torch.testing.assert_close(model.reconstruct(poses, labels), model.reconstruct(changed, labels))


def test_a_model_cast_to_bfloat16_reconstructs_from_the_routing_float32_poses():
    torch.manual_seed(0)
    model = CapsNet.from_preset("small", num_classes=5, image_size=28).eval()
    x, labels = torch.randn(2, 1, 28, 28), torch.tensor([0, 3])
    with torch.no_grad():
        poses = model(x).poses
        want = model.reconstruct(poses, labels)
        other = model.reconstruct(poses, labels.flip(0))  # the other sample's class
        model.bfloat16()
        out = model(x.bfloat16())
        recon = model.reconstruct(out.poses, labels)
    assert out.poses.dtype == torch.float32
    assert recon.dtype == torch.bfloat16 and recon.shape == want.shape
    # The images are small at initialisation (entries up to about 0.07): the tolerance is set well
    # below the difference that decoding another class's pose makes.
    assert (other - want).abs().max() > 3e-3
    torch.testing.assert_close(recon.float(), want, atol=1e-3, rtol=1e-2)


def test_keyword_overrides_change_the_preset_sizes():
    model = CapsNet.from_preset("small", caps_types=[8, 8, 8], caps_strides=[1, 1, 1], image_size=32)
    assert len(model.convcaps) == 3
    assert model(torch.randn(1, 1, 32, 32)).poses.shape == (1, 5, 4, 4)


def test_a_two_conv_stem_like_the_seed_notebook_builds_and_runs():
    model = CapsNet.from_preset("small", stem_channels=[32, 64], image_size=32)
    assert model(torch.randn(2, 1, 32, 32)).activations.shape == (2, 5)


def test_extra_stem_convs_keep_the_capsule_grid_and_add_their_parameters():
    single = CapsNet.from_preset("small", num_classes=10, image_size=28)
    deep = CapsNet.from_preset("small", num_classes=10, image_size=28, stem_channels=[64, 64, 64])
    grid = [(h, w) for name, h, w in single.capsule_grid(28, 28) if not name.startswith("stem")]
    deep_grid = [(h, w) for name, h, w in deep.capsule_grid(28, 28) if not name.startswith("stem")]
    assert deep_grid == grid == [(12, 12), (5, 5), (3, 3)]  # primary, caps1, caps2
    # each extra conv: 64 x 64 x 3 x 3 weights (no bias under batch norm) + the norm's scale and shift
    assert deep.num_parameters() - single.num_parameters() == 2 * (64 * 64 * 9 + 2 * 64)
    out = deep(torch.randn(2, 1, 28, 28))
    assert out.activations.shape == (2, 10) and torch.isfinite(out.activations).all()


def test_model_from_config_uses_the_preset_and_routing_settings():
    cfg = load_config(None, ["model.preset=paper", "routing.min_var=0.001", "model.iterations=2"])
    model = CapsNet.from_config(cfg.model, cfg.routing, in_channels=1, num_classes=5, image_size=32)
    assert model.hparams["caps_types"] == [32, 32]
    assert model.settings.min_var == 0.001 and model.settings.iterations == 2


def test_forward_runs_under_bf16_autocast_with_float32_routing():
    model = CapsNet.from_preset("small", num_classes=5, image_size=28)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.randn(2, 1, 28, 28))
    assert out.activations.dtype == torch.float32
    assert torch.isfinite(out.activations).all()


def test_class_capsule_votes_are_made_in_float32_under_autocast(monkeypatch):
    from capsnet import layers

    model = CapsNet.from_preset("small", num_classes=5, image_size=28).eval()
    x = torch.randn(2, 1, 28, 28)
    seen, real = [], layers.em_routing

    def spy(votes, act_in, *args, **kwargs):
        seen.append(votes.dtype if isinstance(votes, torch.Tensor) else None)
        return real(votes, act_in, *args, **kwargs)

    monkeypatch.setattr(layers, "em_routing", spy)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        model(x)
    assert seen[-1] == torch.float32  # the class capsules' votes, a tensor (the others are products)
    # From the same last-layer capsules, autocast changes nothing in the class layer.
    with torch.no_grad():
        pose, act = model.primary(model.stem(x))
        for layer in model.convcaps:
            pose, act = layer(pose, act)
        want = model.classcaps(pose, act)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = model.classcaps(pose, act)
    torch.testing.assert_close(got[1], want[1], rtol=0, atol=0)
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=0)


def test_a_float64_model_places_its_coordinate_offsets_in_float64(monkeypatch):
    model = CapsNet.from_preset("small", num_classes=5, image_size=28).double()
    seen = []
    real = model.classcaps.forward

    def spy(pose, act, rows=None, cols=None):
        seen.append((rows.dtype, cols.dtype))
        return real(pose, act, rows, cols)

    monkeypatch.setattr(model.classcaps, "forward", spy)
    model(torch.randn(1, 1, 28, 28, dtype=torch.float64))
    assert seen == [(torch.float64, torch.float64)]


def test_routing_statistics_are_recorded_when_asked():
    from capsnet.routing import inverse_temperatures

    torch.manual_seed(0)
    model = CapsNet.from_preset("small", num_classes=5, image_size=28)
    model(torch.randn(2, 1, 28, 28))
    assert model.routing_stats == {}
    # beta_a drawn so that each layer has parents on both sides of 0.5 (at initialisation all are above)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in model.routing_layers():
            lam = inverse_temperatures(layer.settings)[-1]
            layer.beta_a.copy_(torch.randn(layer.beta_a.shape, generator=g) / lam)
    model.record_stats = True
    outputs = {}
    for layer in model.routing_layers():
        layer.register_forward_hook(lambda module, args, result: outputs.update({module.name: result[1]}))
    for grad in (True, False):  # a training step's routing and an evaluation's
        with torch.set_grad_enabled(grad):
            model(torch.randn(2, 1, 28, 28))
        stats = model.routing_stats
        assert set(stats) == {"caps1", "caps2", "class"} == set(outputs)
        for name, layer in stats.items():
            # the statistics of the layer's own output activations (its parents'), not of its input's
            act = outputs[name].detach()
            torch.testing.assert_close(layer["activation"].reshape(-1), act.reshape(-1), rtol=0, atol=0)
            assert layer["activation_mean"].item() == pytest.approx(act.mean().item(), rel=1e-6), name
            active = (act > 0.5).float().mean().item()
            assert 0 < active < 1 and layer["active_fraction"].item() == pytest.approx(active), name
            assert layer["variance"].item() >= model.settings.min_var, name  # min_var is in every variance
            assert 0.0 <= layer["entropy"].item() <= 1.0
    model.record_stats = False
    model(torch.randn(2, 1, 28, 28))
    assert model.routing_stats == {}


def test_fast_and_plain_routing_give_the_same_model_outputs():
    torch.manual_seed(1)
    model = CapsNet.from_preset("small", num_classes=5, image_size=28).double()
    x = torch.randn(2, 1, 28, 28, dtype=torch.float64)
    fast = model(x)
    model.set_routing_impl("plain")
    plain = model(x)
    torch.testing.assert_close(fast.activations, plain.activations, atol=1e-8, rtol=1e-7)
    torch.testing.assert_close(fast.poses, plain.poses, atol=1e-8, rtol=1e-7)


def test_the_fast_routings_hand_written_backward_gives_the_plain_routings_autograd_gradients():
    torch.manual_seed(2)
    fast = CapsNet.from_preset("small", num_classes=5, image_size=28, decoder=False).double()
    assert fast.hparams["recompute_votes"]  # the default: votes rebuilt in the backward
    plain = CapsNet.from_preset("small", num_classes=5, image_size=28, decoder=False).double()
    plain.load_state_dict(fast.state_dict())
    plain.set_routing_impl("plain")  # the equations written out, differentiated by autograd
    x = torch.randn(2, 1, 28, 28, dtype=torch.float64)
    for model in (fast, plain):
        out = model(x)
        (out.activations.sum() + out.poses.square().sum()).backward()
    for (name, a), b in zip(fast.named_parameters(), plain.parameters()):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-10, rtol=1e-7, msg=name)


def test_keeping_or_recomputing_the_vote_moments_gives_the_same_gradients():
    torch.manual_seed(4)
    kept = CapsNet.from_preset(
        "small", num_classes=5, image_size=28, decoder=False, recompute_votes=False
    ).double()
    default = CapsNet.from_preset("small", num_classes=5, image_size=28, decoder=False).double()
    default.load_state_dict(kept.state_dict())
    x = torch.randn(3, 1, 28, 28, dtype=torch.float64)
    for model in (kept, default):
        out = model(x)
        (out.activations.sum() + out.poses.square().sum()).backward()
    for (name, a), b in zip(kept.named_parameters(), default.parameters()):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-10, rtol=1e-8, msg=name)


def test_a_padded_stem_on_28x28_sees_the_grid_and_receptive_centres_of_32x32_without_padding():
    """stem_padding=2 on a 28x28 image is the unpadded model on the image zero-padded to 32x32."""
    torch.manual_seed(0)
    padded = CapsNet.from_preset(
        "small", num_classes=10, image_size=28, stem_padding=2, coord_add=False, decoder=False
    ).eval()
    plain = CapsNet.from_preset("small", num_classes=10, image_size=32, coord_add=False, decoder=False).eval()
    plain.load_state_dict(padded.state_dict())
    assert [h for _, h, _ in padded.capsule_grid(28, 28)] == [14, 14, 6, 4]
    x = torch.randn(3, 1, 28, 28)
    torch.testing.assert_close(
        padded(x).activations,
        plain(torch.nn.functional.pad(x, (2, 2, 2, 2))).activations,
        atol=1e-5,
        rtol=1e-4,
    )
    # Coordinate addition: the same centres in pixels, two pixels further left and up in the 28x28 frame.
    rows28, cols28 = padded._receptive_centres(28, 28, "cpu", torch.float64)
    rows32, cols32 = plain._receptive_centres(32, 32, "cpu", torch.float64)
    torch.testing.assert_close((rows28 + 0.5) * 28, (rows32 + 0.5) * 32 - 2)
    torch.testing.assert_close((cols28 + 0.5) * 28, (cols32 + 0.5) * 32 - 2)


def test_the_decoder_refuses_labels_and_image_sizes_it_cannot_draw():
    from capsnet.loss import reconstruction_loss

    model = CapsNet.from_preset("small", num_classes=5, image_size=32)
    poses = model(torch.rand(2, 1, 32, 32)).poses
    with pytest.raises(ValueError, match="labels must be class numbers 0 to 4, got 0 to 7"):
        model.reconstruct(poses, torch.tensor([0, 7]))
    larger = torch.rand(2, 1, 40, 40)  # the capsule layers take it; the decoder draws 32x32
    recon = model.reconstruct(model(larger).poses, torch.tensor([0, 1]))
    with pytest.raises(
        ValueError, match=r"decoder drew \(2, 1, 32, 32\) but the images are \(2, 1, 40, 40\)"
    ):
        reconstruction_loss(recon, larger)
    assert reconstruction_loss(recon, torch.zeros_like(recon)) > 0


def test_one_class_is_refused_by_the_model_and_the_config():
    from helpers import TINY

    from capsnet.config import ConfigError

    with pytest.raises(ValueError, match="at least 2 classes"):
        CapsNet.from_preset("small", num_classes=1)
    with pytest.raises(ConfigError, match=r"data\.num_classes: a classifier needs at least 2 classes"):
        load_config(TINY, ["data.num_classes=1"])
    assert CapsNet.from_preset("small", num_classes=2).num_classes == 2


def test_bad_images_are_refused_with_a_clear_error_before_torch_sees_them():
    model = CapsNet(in_channels=1, num_classes=5, image_size=32)
    cases = [
        (
            torch.zeros(2, 1, 32, 32, dtype=torch.uint8),
            "floating-point images (pixels / 255, normalised), got torch.uint8",
        ),
        (
            torch.zeros(2, 1, 32, 32, dtype=torch.float64),
            "the images are torch.float64 but the model's weights are torch.float32",
        ),
        (torch.zeros(0, 1, 32, 32), "empty batch (N = 0)"),
    ]
    for images, message in cases:
        with pytest.raises(ValueError, match=re.escape(message)):
            model(images)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast casts for the convs itself
        assert model(torch.rand(2, 1, 32, 32)).activations.shape == (2, 5)
        assert model(torch.rand(2, 1, 32, 32, dtype=torch.float16)).activations.shape == (2, 5)
        with pytest.raises(ValueError, match="the images are torch.float64 but the model's weights"):
            model(torch.rand(2, 1, 32, 32, dtype=torch.float64))  # autocast leaves float64 as it is
    with pytest.raises(TypeError, match="expects a torch.Tensor of images, got ndarray"):
        model(np.zeros((2, 1, 32, 32), dtype=np.float32))
    for size, where in [
        (4, "stem conv 1: a 4x4 input is smaller than its 5x5 kernel"),
        (5, "caps1: input of 1x1"),
    ]:
        with pytest.raises(ValueError, match=re.escape(where)):
            model(torch.rand(1, 1, size, size))
    assert model.double()(torch.rand(2, 1, 32, 32, dtype=torch.float64)).activations.dtype == torch.float64


@pytest.mark.parametrize(
    ("sizes", "message"),
    [
        ({"iterations": 0}, "iterations must be a whole number of at least 1, got 0"),
        ({"pose_size": 1}, "pose_size must be at least 2"),
        ({"caps_strides": [0, 1]}, "caps_strides must be a list of positive whole numbers, got [0, 1]"),
        ({"caps_types": [0, 16]}, "caps_types must be a list of positive whole numbers"),
        ({"stem_channels": []}, "stem_channels must be a non-empty list of positive whole numbers, got []"),
        (
            {"stem_stride": 0, "caps_kernel": 0},
            "stem_stride must be a positive whole number, got 0; caps_kernel must be a positive whole number",
        ),
        ({"num_classes": 10.0}, "num_classes must be a positive whole number, got 10.0"),
        ({"in_channels": 0}, "in_channels must be a positive whole number, got 0"),
        ({"image_size": 32.0}, "image_size must be a positive whole number, got 32.0"),
        ({"decoder_hidden": [0]}, "decoder_hidden must be a list of positive whole numbers, got [0]"),
        ({"stem_padding": 1.5}, "stem_padding must be a whole number, 0 or more, got 1.5"),
        ({"stem_padding": -1}, "stem_padding must be a whole number, 0 or more, got -1"),
        ({"iterations": 101}, "iterations must be at most 100"),
        (
            {"normalisation": "bogus", "caps_types": [], "caps_strides": []},
            "normalisation must be cross_position or per_patch, got 'bogus'",
        ),
        ({"lambda_decay": 1.0}, "lambda_decay must be in [0, 1)"),
        ({"final_lambda": 0.0}, "final_lambda must be positive, got 0.0"),
        ({"layer_cost_scales": [1, 1, -1]}, "layer_cost_scales must all be positive"),
    ],
)
def test_sizes_the_config_would_refuse_are_refused_by_the_constructor_too(sizes, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        CapsNet(**{"in_channels": 1, "num_classes": 5, "image_size": 32, **sizes})


def _receptive_centres_by_span(model: CapsNet, grid: int, size: int) -> torch.Tensor:
    """Scaled centre of each last-grid capsule's receptive field along one axis, by walking its span down.

    A capsule covering cells lo..hi of a layer's output covers lo * s - pad .. hi * s - pad + k - 1
    of that layer's input; the field of input pixels lo..hi is [lo, hi + 1] in pixel-edge
    coordinates, so its centre is (lo + hi + 1) / 2, scaled to [-0.5, 0.5] by the image size.
    """
    layers = [(k, s, pad) for k, s, pad in model._stem_geometry]
    layers += [(layer.kernel, layer.stride, 0) for layer in model.convcaps]
    centres = []
    for index in range(grid):
        lo = hi = index
        for k, s, pad in reversed(layers):
            lo, hi = lo * s - pad, hi * s - pad + k - 1
        centres.append((lo + hi + 1) / 2 / size - 0.5)
    return torch.tensor(centres, dtype=torch.float64)


def test_receptive_field_centres_for_coordinate_addition_match_a_hand_computation():
    # small preset on 32x32: conv 5x5 s2 (14x14), caps 3x3 s2 (6x6), caps 3x3 s1 (4x4); the first
    # class-layer capsule sees pixels 0..16, so its centre is at 8.5 pixels, and they are 4 apart.
    model = CapsNet.from_preset("small", num_classes=5, image_size=32, decoder=False)
    rows, cols = model._receptive_centres(32, 32, "cpu", torch.float64)
    by_hand = torch.tensor([8.5, 12.5, 16.5, 20.5], dtype=torch.float64) / 32 - 0.5
    torch.testing.assert_close(rows, by_hand)
    torch.testing.assert_close(cols, by_hand)
    torch.testing.assert_close(rows, _receptive_centres_by_span(model, 4, 32))
    # Other geometries: a deeper stem, a padded stem, three capsule layers, another kernel.
    for kwargs, size in [
        ({"stem_channels": [16, 16]}, 28),
        ({"stem_padding": 2}, 28),
        ({"caps_types": [4, 4, 4], "caps_strides": [1, 2, 1]}, 32),
        ({"caps_kernel": 2, "caps_strides": [2, 2]}, 32),
    ]:
        model = CapsNet.from_preset("small", num_classes=5, image_size=size, decoder=False, **kwargs)
        grid = model.capsule_grid(size, size)[-1][1]
        rows, _ = model._receptive_centres(size, size, "cpu", torch.float64)
        torch.testing.assert_close(rows, _receptive_centres_by_span(model, grid, size), msg=str(kwargs))


def test_a_non_square_image_gives_the_class_capsules_row_centres_from_its_height_and_column_centres_from_its_width(
    monkeypatch,
):
    model = CapsNet.from_preset("small", num_classes=5, image_size=32, decoder=False).eval()
    seen = []
    real = model.classcaps.forward

    def spy(pose, act, rows=None, cols=None):
        seen.append((pose.shape[1:3], rows, cols))
        return real(pose, act, rows, cols)

    monkeypatch.setattr(model.classcaps, "forward", spy)
    out = model(torch.randn(2, 1, 32, 40))  # 4 x 6 capsules before the class layer
    assert out.activations.shape == (2, 5) and torch.isfinite(out.activations).all()
    (grid, rows, cols) = seen[0]
    assert tuple(grid) == (4, 6)
    torch.testing.assert_close(rows.double(), _receptive_centres_by_span(model, 4, 32))
    torch.testing.assert_close(cols.double(), _receptive_centres_by_span(model, 6, 40))


def test_class_capsules_called_without_centres_add_the_centres_of_the_grid_cells():
    from capsnet.layers import ClassCaps

    torch.manual_seed(3)
    layer = ClassCaps(2, 3, coord_add=True).double()
    pose = torch.randn(1, 2, 3, 2, 16, dtype=torch.float64)
    act = torch.rand(1, 2, 3, 2, dtype=torch.float64)
    rows = torch.tensor([0.25, 0.75], dtype=torch.float64) - 0.5  # cell centres of 2 rows
    cols = torch.tensor([1 / 6, 0.5, 5 / 6], dtype=torch.float64) - 0.5  # ... and of 3 columns
    with torch.no_grad():
        default = layer(pose, act)
        explicit = layer(pose, act, rows, cols)
    torch.testing.assert_close(default[0], explicit[0], rtol=0, atol=1e-12)
    torch.testing.assert_close(default[1], explicit[1], rtol=0, atol=1e-12)


def test_the_decoder_reads_exactly_the_target_class_pose():
    torch.manual_seed(0)
    model = CapsNet.from_preset("small", num_classes=5, image_size=28).eval()
    poses = torch.randn(3, 5, 4, 4)
    labels = torch.tensor([1, 4, 0])
    # The decoder's input, built by hand: the target class's 16 pose entries in its slot, zeros elsewhere.
    masked = torch.zeros(3, 5 * 16)
    for n, label in enumerate(labels.tolist()):
        masked[n, label * 16 : (label + 1) * 16] = poses[n, label].reshape(-1)
    with torch.no_grad():
        want = model.decoder.net(masked).view(3, 1, 28, 28)
        got = model.reconstruct(poses, labels)
        torch.testing.assert_close(got, want)
        moved = poses.clone()
        moved[0, 1] += 1.0  # the target of sample 0
        assert not torch.allclose(model.reconstruct(moved, labels)[0], got[0])
