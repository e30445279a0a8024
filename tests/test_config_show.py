"""capsnet config: a config as training reads it, every key with the comment that explains it."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from capsnet.cli import app
from capsnet.config import Config, documented_yaml, field_docs, load_config

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))
runner = CliRunner()


def every_key() -> list[str]:
    return [f"{section}.{key}" for section, values in Config().to_dict().items() for key in values]


def test_every_key_has_its_comment_and_only_its_own():
    docs = field_docs()
    assert sorted(docs) == sorted(every_key())
    assert [key for key, doc in docs.items() if not doc] == []
    # a comment carried on over the lines below its key, before the next key
    assert docs["loss.teacher"].startswith(
        "knowledge distillation: a trained run whose class scores the model"
    )
    assert docs["loss.teacher"].endswith("as --ckpt); null: none")
    assert docs["train.ema"].endswith("chosen as best.pt and exported; null: none")  # the last key
    # inside a parenthesised default, then carried on below it
    assert docs["train.compile_routing"].startswith("torch.compile the routing's per-chunk contractions")
    assert docs["train.compile_routing"].endswith("off on CUDA (slower there) and MPS (README, Speed)")
    # a sentence above its key belongs to it, not to the key before
    assert docs["routing.layer_cost_scales"].startswith("One factor per routing layer")
    assert "One factor" not in docs["routing.beta_a_logit"]
    # the dataset names above groups of data keys are nobody's comment
    assert docs["data.erase"].endswith("(one rectangle of random pixels)")
    assert docs["data.stereo"].startswith('smallnorb: "channels" (both views')
    assert docs["data.train_dir"] == "folder: image tree for training (one sub-folder per class)"
    assert docs["data.num_classes"] == "synthetic: classes of learnable random patterns"


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_the_shown_yaml_reads_back_to_the_same_config(path, tmp_path):
    cfg = load_config(path, ["train.epochs=2", "model.caps_types=[4, 6]"])
    for only_changed in (False, True):
        for comments in (True, False):
            shown = tmp_path / "shown.yaml"
            shown.write_text(documented_yaml(cfg, only_changed, comments))
            assert load_config(shown) == cfg, (only_changed, comments)
    full = documented_yaml(cfg).splitlines()
    assert len([line for line in full if line.startswith("  ")]) == len(every_key())
    assert sum("  # " in line for line in full) == len(every_key())


def test_only_the_changed_keys_and_the_defaults_as_an_empty_mapping():
    cfg = load_config(None, ["optim.lr=0.01", "data.val_split=0.2"])
    assert documented_yaml(cfg, only_changed=True, comments=False) == (
        "optim:\n  lr: 0.01\ndata:\n  val_split: 0.2\n"
    )
    assert yaml.safe_load(documented_yaml(Config(), only_changed=True)) == {}


def test_the_command_shows_checks_and_explains():
    shown = runner.invoke(app, ["config", "-c", str(REPO / "configs" / "small.yaml"), "--changed"])
    assert shown.exit_code == 0, shown.output
    # the comments of a section start in one column
    assert "  epochs: 5        # passes over the training set" in shown.stdout
    assert (
        "  batch_size: 256  # images per forward pass, per process (a step: batch_size x accumulate)"
        in shown.stdout
    )
    assert "  name: adamw        # " in shown.stdout
    assert "seed" not in shown.stdout and "preset" not in shown.stdout  # written, but the defaults
    plain = runner.invoke(app, ["config", "-o", "train.batch_size=8", "--plain"])
    assert plain.exit_code == 0 and "#" not in plain.stdout
    assert "  batch_size: 8\n" in plain.stdout and len(plain.stdout.splitlines()) == len(every_key()) + len(
        fields(Config)
    )
    bad = runner.invoke(app, ["config", "-o", "train.epoch=3"])
    assert bad.exit_code == 2 and "train.epoch: unknown key; did you mean train.epochs?" in bad.stderr
    missing = runner.invoke(app, ["config", "-c", "nowhere.yaml"])
    assert missing.exit_code == 2 and missing.stderr.startswith("error: ")


def test_long_values_stay_on_the_line_of_their_key(tmp_path):
    """A path with spaces or a list longer than a line reads back as it was, not folded over lines."""
    folder = "/data/" + "my photos of the garden/" * 5
    cfg = load_config(
        None, ["data.name=folder", f"data.train_dir={folder}", f"model.decoder_hidden={list(range(1, 41))}"]
    )
    for only_changed in (False, True):
        shown = tmp_path / "shown.yaml"
        shown.write_text(documented_yaml(cfg, only_changed))
        assert load_config(shown) == cfg
        assert f"  train_dir: {folder}" in shown.read_text()


def test_text_beyond_ascii_is_shown_as_written_and_reads_back(tmp_path):
    cfg = load_config(None, ["data.name=folder", "data.train_dir=café/Bilder/猫"])
    shown = documented_yaml(cfg, only_changed=True)
    assert "  train_dir: café/Bilder/猫  # " in shown
    (tmp_path / "shown.yaml").write_text(shown, encoding="utf-8")
    assert load_config(tmp_path / "shown.yaml") == cfg
