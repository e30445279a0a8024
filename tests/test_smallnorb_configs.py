"""The smallNORB configs hold the paper's and the authors' settings (docs/smallnorb.md).

Each check names the value docs/smallnorb.md gives with its source; a change to
either YAML file that moves away from them fails here.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import yaml

from capsnet import CapsNet
from capsnet.config import load_config
from capsnet.loss import lr_at, margin_at

REPO = Path(__file__).resolve().parents[1]
SMALL = REPO / "configs" / "smallnorb.yaml"
PAPER = REPO / "configs" / "smallnorb_paper.yaml"
DOC = REPO / "docs" / "smallnorb.md"
CONFIGS = [SMALL, PAPER]

# ([A], B, [C, D]) and the parameter count the paper reports (sec. 5)
SIZES = {
    SMALL: ([64], 8, [16, 16], 68_000),
    PAPER: ([32], 32, [32, 32], 310_000),
}


@pytest.fixture(params=CONFIGS, ids=lambda p: p.stem)
def path(request):
    return request.param


def test_preset_sizes_are_the_papers(path):
    stem, primary, caps, _ = SIZES[path]
    m = load_config(path).model.resolved()
    assert m.stem_channels == stem  # A
    assert m.primary_types == primary  # B
    assert m.caps_types == caps  # C, D


def test_architecture_follows_paper_fig1(path):
    m = load_config(path).model
    assert (m.stem_kernel, m.stem_stride, m.stem_padding) == (5, 2, 0)
    assert m.batch_norm is False
    assert m.caps_kernel == 3
    assert m.caps_strides == [2, 1]
    assert m.pose_size == 4
    assert m.iterations == 3
    assert m.normalisation == "cross_position"
    assert m.coord_add is True
    assert m.decoder is False  # the authors used weight decay, not reconstruction


def test_routing_settings_are_the_authors(path):
    r = load_config(path).routing
    assert r.final_lambda == pytest.approx(0.01)
    assert r.lambda_decay == pytest.approx(0.95)
    assert r.min_var == pytest.approx(0.0005)
    assert r.cost_norm is None
    assert r.beta_a_logit is False


def test_inverse_temperature_schedule_is_the_authors_formula(path):
    cfg = load_config(path)
    model = CapsNet.from_config(cfg.model, cfg.routing, in_channels=2, num_classes=5, image_size=32)
    assert model.lambdas() == pytest.approx([0.01 * (1 - 0.95 ** (t + 1)) for t in range(3)])


def test_spread_loss_margin_rises_linearly_from_02_to_09_over_the_run(path):
    loss = load_config(path).loss
    assert loss.kind == "spread"
    assert loss.recon_weight == 0.0
    assert (loss.margin_start, loss.margin_end) == (pytest.approx(0.2), pytest.approx(0.9))
    assert loss.margin_schedule == "linear"
    assert loss.margin_steps is None
    total = 10_000
    assert margin_at(0, total, loss) == pytest.approx(0.2)
    assert margin_at(total // 2, total, loss) == pytest.approx(0.55)
    assert margin_at(total, total, loss) == pytest.approx(0.9)


def test_optimiser_is_the_authors(path):
    o = load_config(path).optim
    assert o.name == "adam"
    assert o.lr == pytest.approx(3e-3)
    assert o.decay_rate == pytest.approx(0.96)
    assert o.decay_steps == 20000
    assert o.staircase is False
    assert o.weight_decay == pytest.approx(2e-7)
    assert o.warmup_steps == 0
    assert o.grad_clip is None
    assert lr_at(20000, o) == pytest.approx(3e-3 * 0.96)
    assert lr_at(10000, o) == pytest.approx(3e-3 * 0.96**0.5)


def test_data_and_batch_follow_the_paper(path):
    cfg = load_config(path)
    d = cfg.data
    assert d.name == "smallnorb"
    assert d.image_size == 32  # 32x32 crops of the 48x48 images
    assert d.stereo == "channels"
    assert d.split == "standard"
    assert d.augment is True
    assert d.val_split == 0.0
    assert cfg.train.batch_size == 64
    assert cfg.train.accumulate == 1


def test_parameter_counts_are_near_the_papers(path):
    cfg = load_config(path)
    model = CapsNet.from_config(cfg.model, cfg.routing, in_channels=2, num_classes=5, image_size=32)
    assert model.decoder is None
    target = SIZES[path][3]
    assert abs(model.num_parameters() - target) / target < 0.05
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())


def test_model_from_config_classifies_five_classes_from_stereo_pairs(path):
    cfg = load_config(path)
    model = CapsNet.from_config(cfg.model, cfg.routing, in_channels=2, num_classes=5, image_size=32).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 2, 32, 32))
    assert out.activations.shape == (2, 5)
    assert out.poses.shape == (2, 5, 4, 4)


def test_the_two_configs_differ_only_in_model_size_and_epochs():
    small, paper = load_config(SMALL).to_dict(), load_config(PAPER).to_dict()
    for cfg in (small, paper):
        del cfg["model"]["preset"], cfg["train"]["epochs"]
    assert small == paper


def _leaf_keys(data: dict, prefix: str = "") -> list[str]:
    keys = []
    for key, value in data.items():
        if isinstance(value, dict):
            keys += _leaf_keys(value, f"{prefix}{key}.")
        else:
            keys.append(f"{prefix}{key}")
    return keys


def test_every_setting_carries_a_comment(path):
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        text = line.strip()
        if not text or text.startswith("#") or text.endswith(":"):
            continue  # blank, comment or section header
        assert "#" in text, f"{path.name}:{number}: setting without a source comment: {text}"


def test_every_setting_is_in_the_docs_table(path):
    doc = DOC.read_text()
    for key in _leaf_keys(yaml.safe_load(path.read_text())):
        assert re.search(rf"`{re.escape(key)}[`:]", doc), f"{key} is not documented in {DOC.name}"
