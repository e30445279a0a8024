"""The moving average of the weights (train.ema): its update, and a run that evaluates, saves and resumes it."""

from __future__ import annotations

import pytest
import torch
from helpers import logged, tiny
from torch import nn

from capsnet.averaging import WeightAverage, ema_decay_at
from capsnet.checkpoint import load_checkpoint
from capsnet.config import ConfigError
from capsnet.evaluate import evaluate, prepare_checkpoint
from capsnet.trainer import fit


def quiet(_msg: str) -> None:
    pass


def test_the_decay_warms_up_from_a_tenth_to_the_configured_value():
    assert ema_decay_at(0.999, 0) == pytest.approx(0.1)
    assert ema_decay_at(0.999, 10) == pytest.approx(11 / 20)
    assert ema_decay_at(0.999, 100_000) == 0.999
    assert ema_decay_at(0.5, 20) == 0.5  # (1 + 20) / (10 + 20) = 0.7 is above it


def test_an_update_moves_every_float_tensor_towards_the_model_and_copies_the_others():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    avg = WeightAverage(model, decay=0.9)
    before = {k: v.clone() for k, v in avg.model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    model.train()
    model(torch.randn(5, 3))  # moves the batch-norm statistics and its step count
    avg.update(1000)  # past the warm-up: decay 0.9
    now, src = avg.model.state_dict(), model.state_dict()
    for k, v in now.items():
        if v.is_floating_point():
            assert torch.allclose(v, 0.9 * before[k] + 0.1 * src[k], atol=1e-6), k
        else:
            assert torch.equal(v, src[k]), k
    assert not avg.model.training and not any(p.requires_grad for p in avg.model.parameters())


def test_the_first_update_keeps_a_tenth_of_the_starting_weights():
    model = nn.Linear(2, 2)
    avg = WeightAverage(model, decay=0.999)
    start = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    avg.update(0)
    assert torch.allclose(avg.model.weight, 0.1 * start + 0.9 * model.weight.detach(), atol=1e-6)


def test_the_average_is_a_copy_that_training_does_not_touch():
    model = nn.Linear(2, 2)
    avg = WeightAverage(model, decay=0.99)
    with torch.no_grad():
        model.weight.mul_(3.0)
    assert not torch.equal(avg.model.weight, model.weight)
    avg.reset()
    assert torch.equal(avg.model.weight, model.weight)


@pytest.mark.parametrize("decay", [0.0, 1.0, -0.5, 1.5])
def test_an_ema_decay_outside_zero_to_one_is_a_config_error(tmp_path, decay):
    with pytest.raises(ConfigError, match="train.ema"):
        tiny(tmp_path, f"train.ema={decay}")


def test_a_run_with_ema_evaluates_and_saves_the_average_and_resumes_bit_for_bit(tmp_path, monkeypatch):
    counts: list[int] = []
    original = WeightAverage.update

    def counted(self, updates):
        counts.append(updates)
        return original(self, updates)

    monkeypatch.setattr(WeightAverage, "update", counted)
    cfg = tiny(tmp_path, "train.ema=0.8")
    straight = fit(cfg, run_name="ema", echo=quiet)
    assert counts == list(range(12))  # one update per optimiser step, numbered by the global step
    ckpt = load_checkpoint(straight.run_dir / "last.pt")
    averaged, trained = ckpt["model"], ckpt["train_model"]
    assert averaged.keys() == trained.keys()
    assert any(not torch.equal(averaged[k], trained[k]) for k in averaged)
    # The last epoch's logged test loss is that of the saved average, not of the trained weights.
    prep = prepare_checkpoint(str(straight.run_dir / "last.pt"), split="test")
    step = ckpt["step"]

    def scored(state):
        prep.model.load_state_dict(state)
        # at the margin of the last step trained (tiny.yaml: loss.margin_steps fixed)
        return evaluate(prep.model, prep.loader, prep.cfg, prep.device, step - 1, step)

    last_logged = [line for line in logged(straight.run_dir) if "test/acc" in line][-1]
    of_average, of_trained = scored(averaged), scored(trained)
    assert of_average.loss == pytest.approx(last_logged["test/loss"], rel=1e-5)
    assert of_average.acc == pytest.approx(last_logged["test/acc"])
    assert of_trained.loss != pytest.approx(last_logged["test/loss"], rel=1e-3)
    best = load_checkpoint(straight.run_dir / "best.pt")
    assert "train_model" in best and best["best_metric"] == straight.best_acc
    step = best["step"]
    assert scored(best["model"]).acc == pytest.approx(best["best_metric"])

    first = fit(tiny(tmp_path, "train.ema=0.8", "train.max_steps=8"), run_name="split", echo=quiet)
    assert first.step == 8
    counts.clear()
    resumed = fit(tiny(tmp_path, "train.ema=0.8"), resume=str(first.run_dir), echo=quiet)
    assert resumed.step == straight.step and counts == list(range(8, 12))
    again = load_checkpoint(resumed.run_dir / "last.pt")
    for key in ("model", "train_model"):
        assert all(torch.equal(again[key][k], ckpt[key][k]) for k in ckpt[key]), key


def test_a_run_without_ema_saves_only_the_trained_weights(tmp_path):
    result = fit(tiny(tmp_path, "train.epochs=1"), run_name="plain", echo=quiet)
    assert "train_model" not in load_checkpoint(result.run_dir / "last.pt")


def test_switching_ema_on_when_resuming_chooses_best_afresh(tmp_path):
    first = fit(tiny(tmp_path, "train.max_steps=6"), run_name="switch", echo=quiet)
    assert first.best_acc is not None and first.best_step == 6
    said: list[str] = []
    resumed = fit(tiny(tmp_path, "train.ema=0.8"), resume=str(first.run_dir), echo=said.append)
    assert any("train.ema was switched on" in line and "chosen afresh" in line for line in said)
    assert resumed.best_step == 12 and "train_model" in load_checkpoint(resumed.run_dir / "best.pt")


def test_a_skipped_non_finite_step_leaves_the_average_where_it_was(tmp_path, monkeypatch):
    from capsnet import trainer

    real, calls = trainer.compute_loss, {"n": 0}

    def steps_2_and_3(*args, **kwargs):  # the losses of steps 2 and 3 overflow: both are skipped
        loss, parts = real(*args, **kwargs)
        calls["n"] += 1
        return (loss * float("inf") if calls["n"] in (2, 3) else loss), parts

    counts: list[int] = []
    original = WeightAverage.update

    def counted(self, updates):
        counts.append(updates)
        return original(self, updates)

    monkeypatch.setattr(trainer, "compute_loss", steps_2_and_3)
    monkeypatch.setattr(WeightAverage, "update", counted)
    result = fit(tiny(tmp_path, "train.ema=0.8", "train.epochs=1"), run_name="skips", echo=quiet)
    assert result.bad_steps == 2
    assert counts == [0, 3, 4, 5]  # updated after the optimiser steps alone, numbered by the global step
