"""Every config under configs/ loads strictly and builds its model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from capsnet.config import load_config
from capsnet.model import CapsNet

REPO = Path(__file__).resolve().parents[1]
# (channels, classes, image size) of each dataset as the configs use it
GEOMETRY = {
    "fashion-mnist": (1, 10, 28),
    "mnist": (1, 10, 28),
    "cifar10": (3, 10, 32),
    "smallnorb": (2, 5, 32),
}


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads_and_builds_its_model(path):
    cfg = load_config(path)
    if cfg.data.name == "synthetic":
        channels, classes, size = cfg.data.channels, cfg.data.num_classes, cfg.data.image_size or 32
    else:
        channels, classes, size = GEOMETRY[cfg.data.name]
        size = cfg.data.image_size or size
    model = CapsNet.from_config(cfg.model, cfg.routing, channels, classes, size).eval()
    assert model.num_parameters() > 0
    # the layers fit together at the config's input size: two images reach the classes
    with torch.no_grad():
        out = model(torch.rand(2, channels, size, size))
    assert out.activations.shape == (2, classes) and torch.isfinite(out.activations).all()


def assert_small_model_on_fashion(cfg) -> None:
    m = cfg.model.resolved()
    assert (m.stem_channels, m.primary_types, m.caps_types) == ([64], 8, [16, 16])
    assert m.iterations == 2 and m.normalisation == "cross_position" and m.coord_add
    assert m.stem_padding == 0 and m.decoder
    assert cfg.data.name == "fashion-mnist" and cfg.data.val_split == 0.1
    assert cfg.train.epochs == 5 and cfg.loss.kind == "spread" and cfg.data.augment is False
    assert cfg.routing.beta_a_logit is True and cfg.routing.final_lambda == 0.01


def test_the_default_config_is_the_measured_recipe():
    """configs/small.yaml: the 18-epoch recipe of small_long.yaml in 5 epochs, on the unpadded grid."""
    cfg = load_config(REPO / "configs" / "small.yaml")
    assert_small_model_on_fashion(cfg)
    assert_long_fashion_recipe(cfg, epochs=5)
    # an interim checkpoint twice an epoch (211 steps), so a crash loses at most 100 steps
    assert cfg.logging.save_every == 100


def test_the_earlier_default_is_kept_as_measured():
    """configs/small_batch32.yaml: the routing ablation's config, batch 32 with Adam."""
    cfg = load_config(REPO / "configs" / "small_batch32.yaml")
    assert_small_model_on_fashion(cfg)
    assert (cfg.train.batch_size, cfg.optim.name, cfg.optim.lr) == (32, "adam", 0.003)
    assert cfg.optim.weight_decay == 2e-7  # the default, the paper's
    assert (cfg.optim.decay_rate, cfg.optim.decay_steps) == (0.96, 20000)


def assert_long_fashion_recipe(cfg, epochs: int) -> None:
    """The measured recipe of configs/small_long.yaml: AdamW, lr 0.008 -> 0.0008 at batch 256."""
    m = cfg.model.resolved()
    assert m.iterations == 2 and cfg.data.augment is False and cfg.data.val_split == 0.1
    assert (cfg.train.epochs, cfg.train.batch_size, cfg.optim.lr) == (epochs, 256, 0.008)
    assert (cfg.optim.name, cfg.optim.weight_decay) == ("adamw", 0.1)
    assert cfg.routing.beta_a_logit is True and cfg.routing.final_lambda == 0.01
    assert cfg.optim.decay_rate == 0.1 and cfg.optim.decay_steps is None


def test_the_paper_size_fashion_config_is_the_paper_preset_with_the_measured_recipe():
    cfg = load_config(REPO / "configs" / "fashion_paper.yaml")
    m = cfg.model.resolved()
    assert (m.stem_channels, m.primary_types, m.caps_types) == ([32], 32, [32, 32])
    assert m.stem_padding == 0
    assert_long_fashion_recipe(cfg, epochs=16)


def test_the_long_fashion_config_is_the_measured_recipe():
    cfg = load_config(REPO / "configs" / "small_long.yaml")
    m = cfg.model.resolved()
    assert (m.stem_channels, m.primary_types, m.caps_types) == ([64], 8, [16, 16])
    assert m.stem_padding == 2
    assert_long_fashion_recipe(cfg, epochs=18)


def deep_stem_config_parameters(name: str, stem: list[int]) -> int:
    """Checks a deeper-stem Fashion config (stem, unpadded grid, recipe); returns its parameter count."""
    cfg = load_config(REPO / "configs" / name)
    m = cfg.model.resolved()
    assert (m.stem_channels, m.primary_types, m.caps_types) == (stem, 8, [16, 16])
    assert m.stem_padding == 0 and m.batch_norm
    assert_long_fashion_recipe(cfg, epochs=18)
    return CapsNet.from_config(cfg.model, cfg.routing, 1, 10, 28).num_parameters()


def test_the_deep_stem_fashion_config_is_the_measured_recipe():
    parameters = deep_stem_config_parameters("small_deep.yaml", [64, 64, 64])
    # the two extra 3x3 convs (64 -> 64, no bias, batch norm) on top of the small model
    assert parameters == 68_508 + 2 * (64 * 64 * 9 + 2 * 64) == 142_492


@pytest.mark.parametrize(
    ("name", "width", "expected"), [("small_deep_narrow.yaml", 24, 72_452), ("small_deep20.yaml", 20, 68_616)]
)
def test_the_narrow_deep_stem_fashion_configs_are_the_measured_recipe(name, width, expected):
    parameters = deep_stem_config_parameters(name, [width] * 3)
    # against the small model: the first conv and PrimaryCaps see `width` channels instead of 64
    # (5x5 weights, batch norm; 1x1 conv to 8 x (16 + 1) outputs), plus two 3x3 convs width -> width
    first_conv, primary = 25 + 2, 8 * 17
    narrower = (64 - width) * (first_conv + primary)
    assert parameters == 68_508 - narrower + 2 * (width * width * 9 + 2 * width) == expected
