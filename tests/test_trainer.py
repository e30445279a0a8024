"""The training loop: exact resume, non-finite steps, signals, run directories, torchrun."""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import time
from pathlib import Path

import pytest
import torch
from helpers import TINY, logged, record_kernel_choice, tiny
from torch import Tensor

from capsnet import trainer
from capsnet.checkpoint import CheckpointError, load_checkpoint
from capsnet.config import ConfigError
from capsnet.trainer import TrainingError, TrainingInterrupted, fit


def quiet(_msg: str) -> None:
    pass


def same_weights(a: Path, b: Path) -> bool:
    wa, wb = load_checkpoint(a)["model"], load_checkpoint(b)["model"]
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("straight")
    return fit(tiny(tmp), run_name="straight", echo=quiet)


@pytest.mark.parametrize("stop_at", [6, 8], ids=["at-an-epoch-boundary", "mid-epoch"])
def test_a_resumed_run_is_bit_identical_to_a_straight_run(tmp_path, straight, stop_at):
    first = fit(tiny(tmp_path, f"train.max_steps={stop_at}"), run_name="split", echo=quiet)
    assert first.stopped == "max_steps" and first.step == stop_at
    resumed = fit(tiny(tmp_path), resume="latest", echo=quiet)
    assert resumed.run_dir == first.run_dir and resumed.step == straight.step == 12
    assert same_weights(straight.run_dir / "last.pt", resumed.run_dir / "last.pt")
    a = {line["step"]: line.get("train/loss") for line in logged(straight.run_dir)}
    b = {line["step"]: line.get("train/loss") for line in logged(resumed.run_dir)}
    assert a == b


def test_resuming_a_finished_run_trains_nothing_and_keeps_its_files(tmp_path):
    done = fit(tiny(tmp_path), run_name="done", echo=quiet)
    files = sorted(p.name for p in done.run_dir.iterdir())
    lines: list[str] = []
    again = fit(tiny(tmp_path), resume="latest", echo=lines.append)
    assert again.step == 12 and sorted(p.name for p in done.run_dir.iterdir()) == files
    assert any(line.startswith("nothing to train: the run already has 2 of train.epochs=2") for line in lines)


@pytest.mark.parametrize("limit", ["train.epochs=1", "train.max_steps=6"])
def test_resuming_an_earlier_checkpoint_with_nothing_left_to_train_is_refused_before_deleting(
    tmp_path, limit
):
    done = fit(tiny(tmp_path), run_name="done", echo=quiet)
    before = {p.name: p.stat().st_mtime_ns for p in done.run_dir.iterdir()}
    assert {"step-000006.pt", "step-000012.pt", "last.pt"} <= before.keys()
    with pytest.raises(TrainingError) as refused:
        fit(tiny(tmp_path, limit), resume=str(done.run_dir / "step-000006.pt"), echo=quiet)
    key = limit.split("=")[0]
    assert f"would train nothing, as {limit} is reached there" in str(refused.value)
    assert "step-000012.pt" in str(refused.value) and f"-o {key}=N" in str(refused.value)
    assert {p.name: p.stat().st_mtime_ns for p in done.run_dir.iterdir()} == before
    # with more to train, the same resume goes on from step 6 and replaces the later checkpoints
    more = fit(tiny(tmp_path), resume=str(done.run_dir / "step-000006.pt"), echo=quiet)
    assert more.step == 12 and same_weights(more.run_dir / "last.pt", more.run_dir / "step-000012.pt")


def test_the_epoch_line_after_a_mid_epoch_resume_says_its_training_figures_cover_the_steps_since(tmp_path):
    fit(tiny(tmp_path, "train.max_steps=4"), run_name="part", echo=quiet)  # 4 of the first epoch's 6 steps
    lines: list[str] = []
    fit(tiny(tmp_path), resume="latest", echo=lines.append)
    first = [line for line in lines if line.startswith("epoch 1/2  step 6")]
    assert len(first) == 1 and "(train/* over the 2 steps since the resume)" in first[0], lines
    second = [line for line in lines if line.startswith("epoch 2/2  step 12")]
    assert len(second) == 1 and "since the resume" not in second[0]  # a whole epoch trained here


def test_img_per_s_after_a_mid_epoch_resume_leaves_out_the_replay_of_the_steps_before_it(
    tmp_path, monkeypatch
):
    """The resumed run replays the loader over the epoch's steps trained before (for its random
    draws); that replay, however long, is not training time."""
    import collections

    fit(tiny(tmp_path, "train.max_steps=3"), run_name="part", echo=quiet)  # 3 of the first epoch's 6 steps
    clock, offset = time.perf_counter, {"t": 0.0}

    def slow_replay(iterable, maxlen=None):  # each batch replayed takes 1,000 s by the run's clock
        for _ in iterable:
            offset["t"] += 1000.0
        return collections.deque(maxlen=maxlen)

    monkeypatch.setattr(time, "perf_counter", lambda: clock() + offset["t"])
    monkeypatch.setattr(trainer, "deque", slow_replay)
    lines: list[str] = []
    result = fit(tiny(tmp_path), resume="latest", echo=lines.append)
    assert offset["t"] == 3000.0  # the 3 steps before the resume; the next epoch replays none
    [epoch] = [line for line in lines if line.startswith("epoch 1/2  step 6")]
    seconds = float(epoch.split(" img/s  ")[1].split("s")[0])
    assert seconds < 1000, epoch
    speeds = {e["step"]: e["perf/img_per_s"] for e in logged(result.run_dir) if "perf/img_per_s" in e}
    assert speeds[4] > 1 and speeds[6] > 1  # 16 images a step: not 16 / 1000 s


def test_the_evaluation_loss_uses_the_margin_of_the_step_just_trained_which_the_line_shows(
    tmp_path, monkeypatch
):
    from capsnet.loss import margin_at

    real, steps = trainer.evaluate, []

    def spy(model, loader, cfg, device, step=None, total_steps=None, *args, **kwargs):
        steps.append(step)
        return real(model, loader, cfg, device, step, total_steps, *args, **kwargs)

    monkeypatch.setattr(trainer, "evaluate", spy)
    lines: list[str] = []
    cfg = tiny(tmp_path)
    fit(cfg, run_name="margins", echo=lines.append)
    assert steps == [5, 11]  # after steps 6 and 12, whose updates used the margins of steps 5 and 11
    epochs = [line for line in lines if line.startswith("epoch ")]
    for step, line in zip(steps, epochs, strict=True):
        assert f"sched/margin {margin_at(step, 12, cfg.loss):.4g}" in line, line


def test_the_plan_line_puts_one_epoch_and_one_step_in_the_singular(tmp_path):
    lines: list[str] = []
    fit(tiny(tmp_path, "train.epochs=1", "train.batch_size=96"), run_name="one", echo=lines.append)
    plan = [line for line in lines if line.startswith("device ")]
    assert len(plan) == 1 and plan[0].endswith("routing; 1 epoch x 1 step"), lines


def test_compiled_routing_trains_like_the_eager_one_and_is_switched_off_after(
    tmp_path, straight, monkeypatch
):
    from capsnet import routing

    seen = record_kernel_choice(monkeypatch)
    result = fit(tiny(tmp_path, "train.compile_routing=true"), run_name="compiled", echo=quiet)
    assert seen and all(seen) and not routing.compiled_kernels_enabled()
    a = {line["step"]: line.get("train/loss") for line in logged(straight.run_dir)}
    b = {line["step"]: line.get("train/loss") for line in logged(result.run_dir)}
    assert a.keys() == b.keys() and [s for s, v in a.items() if v is not None] == [2, 4, 6, 8, 10, 12]
    for step, loss in a.items():
        if loss is not None:
            assert b[step] == pytest.approx(loss, rel=1e-4), step


def test_four_epochs_equal_two_epochs_plus_a_resumed_two_through_the_cli(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from capsnet.cli import app

    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    straight = runner.invoke(
        app, ["train", "--config", str(TINY), "-o", "train.epochs=4", "--run-name", "four"]
    )
    assert straight.exit_code == 0, straight.output
    first = runner.invoke(app, ["train", "--config", str(TINY), "--run-name", "two"])
    assert first.exit_code == 0, first.output
    resumed = runner.invoke(app, ["train", "--resume", "latest", "-o", "train.epochs=4"])
    assert resumed.exit_code == 0, resumed.output
    assert "resumed from" in resumed.stdout and resumed.stdout.count("epoch ") >= 2
    weights = tmp_path / "weights" / "em_capsules"
    assert load_checkpoint(weights / "two" / "last.pt")["step"] == 24
    assert same_weights(weights / "four" / "last.pt", weights / "two" / "last.pt")

    def without_timings(run: str) -> list[dict]:
        return [
            {k: v for k, v in line.items() if not k.startswith("perf/")} for line in logged(weights / run)
        ]

    assert without_timings("four") == without_timings("two")


def test_non_finite_steps_are_skipped_then_training_stops_and_nothing_non_finite_is_best(
    tmp_path, monkeypatch
):
    real = trainer.compute_loss

    def poisoned(*args, **kwargs):
        loss, parts = real(*args, **kwargs)
        return loss * float("nan"), parts

    monkeypatch.setattr(trainer, "compute_loss", poisoned)
    cfg = tiny(tmp_path, "train.max_bad_steps=3")
    with pytest.raises(TrainingError, match="3 non-finite steps in a row"):
        fit(cfg, run_name="nan", echo=quiet)
    run = tmp_path / "weights" / "nan"
    assert not (run / "best.pt").exists() and not (run / "last.pt").exists()


def test_the_stop_message_names_the_first_routing_layer_with_non_finite_statistics(tmp_path, monkeypatch):
    real = trainer.build_optimizer

    def poison_caps2(model, cfg):
        with torch.no_grad():
            model.convcaps[1].weight.fill_(float("nan"))
        return real(model, cfg)

    monkeypatch.setattr(trainer, "build_optimizer", poison_caps2)
    with pytest.raises(TrainingError) as info:
        fit(tiny(tmp_path, "train.max_bad_steps=2"), run_name="nan-layer", echo=quiet)
    message = str(info.value)
    assert "stopped at step 2" in message and "'caps2'" in message and "convcaps.1.weight" in message


def test_a_few_non_finite_steps_are_skipped_and_counted(tmp_path, monkeypatch):
    real, calls = trainer.compute_loss, {"n": 0}

    def sometimes(*args, **kwargs):
        loss, parts = real(*args, **kwargs)
        calls["n"] += 1
        return (loss * float("inf") if calls["n"] in (2, 3) else loss), parts

    monkeypatch.setattr(trainer, "compute_loss", sometimes)
    result = fit(tiny(tmp_path), run_name="skips", echo=quiet)
    assert result.bad_steps == 2 and result.stopped == "completed"
    assert [line["train/skipped_steps"] for line in logged(result.run_dir) if "train/loss" in line][-1] == 2
    ckpt = load_checkpoint(result.run_dir / "best.pt")
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())


def test_a_logging_window_of_only_skipped_steps_logs_no_loss_of_zero(tmp_path, monkeypatch):
    import math

    real, calls = trainer.compute_loss, {"n": 0}

    def steps_3_and_4(*args, **kwargs):  # configs/tiny.yaml logs every 2 steps: the window of step 4
        loss, parts = real(*args, **kwargs)
        calls["n"] += 1
        return (loss * float("inf") if calls["n"] in (3, 4) else loss), parts

    monkeypatch.setattr(trainer, "compute_loss", steps_3_and_4)
    lines: list[str] = []
    result = fit(tiny(tmp_path, "train.epochs=1"), run_name="all-bad", echo=lines.append)
    assert result.bad_steps == 2
    losses = {line["step"]: line["train/loss"] for line in logged(result.run_dir) if "train/loss" in line}
    assert losses[4] == "nan"  # not 0.0: the window has no finite loss (JSON writes NaN as "nan")
    assert all(math.isfinite(losses[s]) and losses[s] > 0 for s in (2, 6))


def test_the_epoch_line_leaves_out_the_loss_of_steps_skipped_for_their_gradients(tmp_path, monkeypatch):
    """A finite loss whose gradients overflow is skipped: the epoch's train/loss is the mean over the
    steps that were not, as in metrics.jsonl."""
    real, calls = torch.nn.utils.clip_grad_norm_, {"n": 0}

    def overflowing(*args, **kwargs):
        norm = real(*args, **kwargs)
        calls["n"] += 1
        return norm * float("inf") if calls["n"] in (3, 4) else norm

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", overflowing)
    lines: list[str] = []
    result = fit(tiny(tmp_path, "train.epochs=1"), run_name="grads", echo=lines.append)
    assert result.bad_steps == 2
    windows = [e for e in logged(result.run_dir) if "train/loss" in e and e["train/loss"] != "nan"]
    assert [e["step"] for e in windows] == [2, 6]  # each the mean of its window's 2 steps
    mean = sum(e["train/loss"] for e in windows) / len(windows)
    [epoch] = [line for line in lines if line.startswith("epoch 1/1")]
    assert f"train/loss {mean:.4f}" in epoch, (epoch, mean)


def test_a_skipped_batch_with_a_nan_pixel_leaves_the_batch_norm_statistics_as_they_were(
    tmp_path, monkeypatch
):
    real, seen = trainer._train_step, {}

    def nan_in_step_3(run, group, stop, *rest_args):
        if run.step == 2:  # the step that makes step 3
            (x, y), *rest = group
            x = x.clone()
            x[0, 0, 0, 0] = float("nan")
            group = [(x, y), *rest]
            seen["before"] = run.model.stem[1].running_mean.clone()
        result = real(run, group, stop, *rest_args)
        if run.step == 3:
            seen["after"] = run.model.stem[1].running_mean.clone()
        return result

    monkeypatch.setattr(trainer, "_train_step", nan_in_step_3)
    result = fit(tiny(tmp_path), run_name="nan-pixel", echo=quiet)  # the epoch's save checks the buffers
    assert result.stopped == "completed" and result.bad_steps == 1
    assert torch.equal(seen["before"], seen["after"])


def test_the_count_of_non_finite_steps_in_a_row_carries_over_a_resume(tmp_path, monkeypatch):
    real = trainer.compute_loss

    def bad_from_step_2(*args, **kwargs):  # compute_loss(out, x, y, model, cfg, step, total_steps)
        loss, parts = real(*args, **kwargs)
        return (loss * float("nan") if args[5] >= 2 else loss), parts

    monkeypatch.setattr(trainer, "compute_loss", bad_from_step_2)
    with pytest.raises(TrainingError, match="stopped at step 6: 4 non-finite steps in a row"):
        fit(tiny(tmp_path, "train.max_bad_steps=4"), run_name="straight", echo=quiet)
    fit(tiny(tmp_path, "train.max_bad_steps=4", "train.max_steps=4"), run_name="split", echo=quiet)
    with pytest.raises(TrainingError, match="stopped at step 6: 4 non-finite steps in a row"):
        fit(tiny(tmp_path, "train.max_bad_steps=4"), resume="split", echo=quiet)


def test_a_short_last_micro_batch_weighs_by_its_images_as_in_one_whole_batch(tmp_path):
    # 100 images: one batch of 100 against micro-batches of 16 (six) and 4, accumulated into one step
    common = [
        "data.train_size=100",
        "train.max_steps=1",
        "optim.name=sgd",
        "optim.lr=0.5",
        "model.batch_norm=false",
    ]
    whole = fit(tiny(tmp_path, *common, "train.batch_size=100"), run_name="whole", echo=quiet)
    parts = fit(
        tiny(tmp_path, *common, "train.batch_size=16", "train.accumulate=7"), run_name="parts", echo=quiet
    )
    a, b = (load_checkpoint(r.run_dir / "last.pt")["model"] for r in (whole, parts))
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=1e-5, msg=key)


def test_save_every_writes_checkpoints_within_an_epoch_without_changing_the_run(tmp_path, straight):
    seen: list[tuple[int, int, list[str]]] = []
    real = trainer.save_run

    def watch(run, mid_epoch, is_best=False, interim=False):
        path = real(run, mid_epoch, is_best, interim)
        seen.append((run.step, run.batches_done, sorted(p.name for p in run.run_dir.glob("step-*.pt"))))
        return path

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(trainer, "save_run", watch)
        result = fit(tiny(tmp_path, "logging.save_every=4", "logging.keep=10"), run_name="often", echo=quiet)
    # 6 steps an epoch: step 4 is saved within epoch 1, and replaced by the epoch's own checkpoint
    assert seen[0] == (4, 4, ["step-000004.pt"])
    assert seen[1] == (6, 0, ["step-000006.pt"])
    assert seen[2] == (8, 2, ["step-000006.pt", "step-000008.pt"])  # every 4 steps of the run
    assert sorted(p.name for p in result.run_dir.glob("step-*.pt")) == ["step-000006.pt", "step-000012.pt"]
    assert same_weights(straight.run_dir / "last.pt", result.run_dir / "last.pt")


def test_checkpoints_within_epochs_push_no_epochs_checkpoint_out_of_keep(tmp_path):
    cfg = tiny(tmp_path, "logging.save_every=2", "logging.keep=2", "train.epochs=3")
    result = fit(cfg, run_name="kept", echo=quiet)
    assert sorted(p.name for p in result.run_dir.glob("step-*.pt")) == ["step-000012.pt", "step-000018.pt"]
    # a run resumed from a checkpoint within an epoch replaces it at its next save
    fit(tiny(tmp_path, "train.max_steps=4"), run_name="part", echo=quiet)
    resumed = fit(tiny(tmp_path, "logging.keep=1"), resume="part", echo=quiet)
    assert sorted(p.name for p in resumed.run_dir.glob("step-*.pt")) == ["step-000012.pt"]


def test_training_and_eval_show_a_progress_bar_over_the_evaluation_on_a_terminal(
    tmp_path, monkeypatch, capsys
):
    import sys

    from capsnet.evaluate import evaluate_checkpoint

    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    result = fit(tiny(tmp_path, "train.epochs=1", "logging.progress=true"), run_name="bars", echo=quiet)
    assert "test after epoch 1" in capsys.readouterr().err  # tiny.yaml has no validation split
    evaluate_checkpoint(str(result.run_dir), str(tmp_path / "weights"))
    assert "\rtest:   0%" in capsys.readouterr().err  # the bar of the one test batch
    evaluate_checkpoint(str(result.run_dir), str(tmp_path / "weights"), progress=False)
    assert "test:" not in capsys.readouterr().err


def test_a_small_validation_split_and_more_loader_processes_than_cpus_are_noted(tmp_path, monkeypatch):
    monkeypatch.setattr(trainer.os, "cpu_count", lambda: 1)
    lines: list[str] = []
    cfg = tiny(tmp_path, "data.val_split=0.25", "train.num_workers=2", "train.max_steps=1")
    fit(cfg, run_name="notes", echo=lines.append)
    assert any(
        "the validation split holds 24 images" in line and "steps of 0.042" in line for line in lines
    ), lines
    assert any("train.num_workers=2 starts more loader processes than the 1 CPUs" in line for line in lines)
    lines.clear()
    fit(tiny(tmp_path, "train.max_steps=1"), run_name="quiet", echo=lines.append)
    assert not any("validation split holds" in line or "num_workers" in line for line in lines), lines


def test_a_signal_during_an_evaluation_stops_the_run_even_in_its_last_epoch(tmp_path, monkeypatch):
    real, calls = trainer.evaluate, {"n": 0, "at": 0}

    def evaluate_then_signal(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == calls["at"]:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)

    monkeypatch.setattr(trainer, "evaluate", evaluate_then_signal)
    calls["at"] = 1  # epoch 1 of 2: the run stops after its checkpoint
    with pytest.raises(TrainingInterrupted) as info:
        fit(tiny(tmp_path), run_name="mid", echo=quiet)
    assert info.value.result.step == 6 and info.value.exit_code == 143
    calls["n"], calls["at"] = 0, 2  # the last epoch's evaluation: dropped, so the run is not complete
    with pytest.raises(TrainingInterrupted) as info:
        fit(tiny(tmp_path), run_name="end", echo=quiet)
    assert info.value.result.step == 12 and info.value.result.epoch == 1
    monkeypatch.undo()
    done = fit(tiny(tmp_path), resume=str(info.value.result.run_dir), echo=quiet)
    assert done.stopped == "completed" and done.step == 12 and done.last_eval is not None


def test_a_compiled_model_trains_like_the_eager_one(tmp_path, monkeypatch):
    settings = ["train.compile=true", "model.decoder=false", "loss.recon_weight=0", "train.max_steps=3"]
    real_compile, compiled_calls = torch.compile, []

    def compile_and_count(model, *args, **kwargs):  # the compiled forward, counting its calls
        compiled = real_compile(model, *args, **kwargs)

        def forward(x):
            compiled_calls.append(len(x))
            return compiled(x)

        return forward

    monkeypatch.setattr(torch, "compile", compile_and_count)
    eager = fit(tiny(tmp_path, *settings[1:]), run_name="eager", echo=quiet)
    assert compiled_calls == []
    compiled = fit(tiny(tmp_path, *settings), run_name="compiled", echo=quiet)
    assert compiled_calls == [16, 16, 16]  # every training step went through torch.compile's module
    a = {line["step"]: line.get("train/loss") for line in logged(eager.run_dir)}
    b = {line["step"]: line.get("train/loss") for line in logged(compiled.run_dir)}
    assert a.keys() == b.keys() and any(v is not None for v in a.values())
    for step, loss in a.items():
        if loss is not None:
            assert b[step] == pytest.approx(loss, rel=1e-4), step


def test_sigint_finishes_the_step_saves_and_says_how_to_resume(tmp_path, monkeypatch):
    real, calls, lines = trainer.compute_loss, {"n": 0}, []

    def interrupt_on_third(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            os.kill(os.getpid(), signal.SIGINT)
        return real(*args, **kwargs)

    monkeypatch.setattr(trainer, "compute_loss", interrupt_on_third)
    # Whatever handler was there before (a background job starts with SIGINT ignored).
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(TrainingInterrupted) as info:
        fit(tiny(tmp_path), run_name="sig", echo=lines.append)
    result = info.value.result
    assert info.value.exit_code == 130 and result.stopped == "SIGINT" and result.step == 3
    assert load_checkpoint(result.run_dir / "last.pt")["batches_done"] == 3
    assert any("capsnet train --resume" in line for line in lines)
    assert signal.getsignal(signal.SIGINT) is before  # restored


def test_an_existing_run_needs_resume_or_overwrite(tmp_path):
    cfg = tiny(tmp_path, "train.max_steps=1")
    fit(cfg, run_name="dup", echo=quiet)
    with pytest.raises(TrainingError, match="already exists"):
        fit(cfg, run_name="dup", echo=quiet)
    result = fit(cfg, run_name="dup", overwrite=True, echo=quiet)
    assert result.step == 1 and len(logged(result.run_dir)) == 1


def test_automatic_run_names_never_clash(tmp_path):
    cfg = tiny(tmp_path, "train.max_steps=1")
    a = fit(cfg, echo=quiet, name_prefix="tiny")
    b = fit(cfg, echo=quiet, name_prefix="tiny")
    assert a.run_dir != b.run_dir and a.run_name.startswith("tiny-")


def test_resuming_with_a_different_architecture_is_a_clear_error(tmp_path):
    from capsnet.checkpoint import CheckpointError

    fit(tiny(tmp_path, "train.max_steps=1"), run_name="arch", echo=quiet)
    with pytest.raises(CheckpointError, match=r"model\.caps_types"):
        fit(tiny(tmp_path, "model.caps_types=[4,6]"), resume="latest", echo=quiet)


def test_a_validation_split_chooses_best_by_validation_accuracy(tmp_path):
    result = fit(tiny(tmp_path, "data.val_split=0.25", "train.epochs=1"), run_name="val", echo=quiet)
    assert result.best_split == "val"
    assert "val/acc" in logged(result.run_dir)[-1]


@pytest.mark.parametrize("given_as", ["file", "run directory", "run name", "latest"])
def test_init_from_starts_a_new_run_from_another_runs_weights(tmp_path, straight, given_as):
    import shutil

    source = straight.run_dir / "last.pt"
    shutil.copytree(straight.run_dir, tmp_path / "weights" / "src")
    spec = {"file": source, "run directory": straight.run_dir, "run name": "src", "latest": "latest"}[
        given_as
    ]
    cfg = tiny(tmp_path, f"train.init_from={spec}", "train.max_steps=1", "optim.lr=1e-12")
    result = fit(cfg, run_name="init", echo=quiet)
    assert result.step == 1  # a fresh optimiser and step count, not a resume
    want, got = load_checkpoint(source)["model"], load_checkpoint(result.run_dir / "last.pt")["model"]
    params = [k for k in want if "running" not in k and "num_batches" not in k]
    assert params
    for k in params:
        torch.testing.assert_close(got[k], want[k], atol=1e-6, rtol=0)


def test_init_from_is_recorded_as_the_file_it_named_and_a_resume_keeps_that_file(tmp_path, straight):
    """``latest`` is another run by the time this one resumes (this one): the saved configs name the file."""
    import shutil

    import yaml

    shutil.copytree(straight.run_dir, tmp_path / "weights" / "src")
    lines: list[str] = []
    fit(tiny(tmp_path, "train.init_from=latest", "train.max_steps=2"), run_name="init", echo=lines.append)
    said = [line for line in lines if line.startswith("model weights from ")]
    assert len(said) == 1, lines
    named = said[0].removeprefix("model weights from ").split(" (step")[0]
    assert Path(named).parent == tmp_path / "weights" / "src" and Path(named).is_file()
    run_dir = tmp_path / "weights" / "init"

    def recorded() -> tuple[str, str]:
        saved = yaml.safe_load((run_dir / "config.yaml").read_text())["train"]["init_from"]
        return saved, load_checkpoint(run_dir / "last.pt")["config"]["train"]["init_from"]

    assert recorded() == (named, named)
    # resumed with the config that says "latest" (now this run itself), or with the run's own config
    fit(tiny(tmp_path, "train.init_from=latest", "train.max_steps=3"), run_name="init", resume="latest")
    assert recorded() == (named, named)
    out_dir = f"logging.out_dir={tmp_path / 'weights'}"
    fit(
        trainer.config_for_resume("latest", [out_dir, "train.max_steps=4"], "init"),
        resume="latest",
        echo=quiet,
    )
    assert recorded() == (named, named)
    # a new run cannot start from its own checkpoints (--overwrite would delete them first)
    with pytest.raises(ConfigError, match="train.init_from: init is .*a checkpoint of this run itself"):
        fit(tiny(tmp_path, "train.init_from=init"), run_name="init", overwrite=True, echo=quiet)


def test_a_resume_says_that_another_init_from_is_not_read(tmp_path, straight):
    """-o train.init_from=OTHER on a resume is not applied (the run goes on from its own
    checkpoint): said, not dropped in silence; the setting the run started with is not remarked on."""
    import shutil

    shutil.copytree(straight.run_dir, tmp_path / "weights" / "src")
    shutil.copytree(straight.run_dir, tmp_path / "weights" / "other")
    fit(tiny(tmp_path, "train.init_from=src", "train.max_steps=1"), run_name="b", echo=quiet)

    def resumed(*overrides: str) -> list[str]:
        lines: list[str] = []
        fit(tiny(tmp_path, *overrides), run_name="b", resume="latest", echo=lines.append)
        return [line for line in lines if "train.init_from" in line]

    assert resumed("train.init_from=src", "train.max_steps=2") == []
    assert resumed("train.init_from=src/best.pt", "train.max_steps=3") == []
    # src trains on: it names a later checkpoint of its own by now, still the run this one started from
    fit(tiny(tmp_path, "train.epochs=3"), resume=str(tmp_path / "weights" / "src"), echo=quiet)
    assert resumed("train.init_from=src", "train.max_steps=4") == []
    said = resumed("train.init_from=other", "train.max_steps=5")
    assert len(said) == 1 and said[0].startswith("note: train.init_from (other) is not read"), said
    assert str(tmp_path / "weights" / "src") in said[0] and "--resume" in said[0]
    saved = load_checkpoint(tmp_path / "weights" / "b" / "last.pt")
    assert (
        saved["step"] == 5
        and Path(saved["config"]["train"]["init_from"]).parent == tmp_path / "weights" / "src"
    )


def test_a_best_checkpoint_is_recorded_as_the_step_file_it_was_written_with(tmp_path, straight):
    """best.pt is rewritten at its run's next best: the config names the file of its step instead."""
    import yaml

    best = load_checkpoint(straight.run_dir / "best.pt")
    fit(tiny(tmp_path, f"train.init_from={straight.run_dir}/best.pt", "train.max_steps=1"), run_name="b")
    saved = yaml.safe_load((tmp_path / "weights" / "b" / "config.yaml").read_text())["train"]["init_from"]
    assert saved == str(straight.run_dir / f"step-{best['step']:06d}.pt")
    assert load_checkpoint(saved)["step"] == best["step"]


@pytest.mark.parametrize("how", ["init_from", "resume"])
def test_a_checkpoint_of_another_architecture_is_refused_before_the_data_and_the_kernels(
    tmp_path, straight, monkeypatch, how
):
    """Said before the data loads and the routing kernels compile; a resume refused for its model is
    not told to start a new run from those weights, which would be refused the same way."""
    from capsnet.checkpoint import CheckpointError

    def never(*args, **kwargs):
        raise AssertionError("the data was loaded")

    monkeypatch.setattr(trainer, "build_loaders", never)
    monkeypatch.setattr(trainer, "_choose_routing_kernels", never)
    other = ["model.iterations=3", "data.val_split=0.25"]  # a split moved too: the model is said first
    if how == "init_from":
        cfg, resume = tiny(tmp_path, f"train.init_from={straight.run_dir / 'last.pt'}", *other), None
    else:
        cfg, resume = tiny(tmp_path, *other), str(straight.run_dir / "step-000006.pt")
    with pytest.raises(CheckpointError) as refused:
        fit(cfg, run_name="other", resume=resume, echo=quiet)
    assert "does not match the config: model.iterations: 2 in the checkpoint, 3 now" in str(refused.value)
    assert "init_from" not in str(refused.value)


def test_null_decay_steps_decays_the_rate_over_the_whole_run(tmp_path):
    cfg = tiny(tmp_path, "optim.decay_steps=null", "optim.decay_rate=0.1")
    result = fit(cfg, run_name="decay", echo=quiet)
    lrs = {line["step"]: line["sched/lr"] for line in logged(result.run_dir) if "sched/lr" in line}
    total = result.step
    last = max(lrs)
    assert lrs[last] == pytest.approx(cfg.optim.lr * 0.1 ** ((last - 1) / total))


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_a_training_run_evaluates_in_the_chunks_of_its_training_steps(tmp_path, monkeypatch, compiled):
    from capsnet import routing

    # the whole batch in one chunk with the kernels in use, one sample per chunk otherwise
    monkeypatch.setattr(routing, "FUSED_CHUNK_BYTES" if compiled else "CHUNK_BYTES", 1 << 30)
    monkeypatch.setattr(routing, "CHUNK_BYTES" if compiled else "FUSED_CHUNK_BYTES", 1)
    monkeypatch.setattr(routing, "INFERENCE_CHUNK_BYTES", 1)  # one sample per chunk
    counts = []
    original = routing._sample_chunks

    def spy(*args, **kwargs):
        chunks = original(*args, **kwargs)
        counts.append(len(chunks))
        return chunks

    monkeypatch.setattr(routing, "_sample_chunks", spy)
    overrides = ["train.epochs=1", f"train.compile_routing={str(compiled).lower()}"]
    result = fit(tiny(tmp_path, *overrides), run_name="chunks", echo=quiet)
    assert result.last_eval is not None and counts and set(counts) == {1}
    # outside a training run, the same evaluation routes one sample per chunk
    from capsnet.checkpoint import build_model_from_checkpoint

    model = build_model_from_checkpoint(load_checkpoint(result.run_dir / "last.pt")).eval()
    counts.clear()
    with torch.no_grad():
        model(torch.rand(3, 1, 20, 20))
    assert counts and all(n == 3 for n in counts)


@pytest.mark.parametrize("name", ["adam", "adamw", "sgd"])
def test_decay_scope_matrices_decays_only_tensors_of_two_or_more_dimensions(tmp_path, name):
    from capsnet.model import CapsNet

    def one_step(scope: str) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        model = CapsNet(
            num_classes=3,
            image_size=20,
            stem_channels=(4,),
            primary_types=2,
            caps_types=(2, 2),
            decoder=False,
        )
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        cfg = tiny(tmp_path, f"optim.name={name}", "optim.weight_decay=0.5", f"optim.decay_scope={scope}")
        optimizer = trainer.build_optimizer(model, cfg)
        for p in model.parameters():
            p.grad = torch.zeros_like(p)  # no loss: only the weight decay moves anything
        optimizer.step()
        return before, dict(model.named_parameters())

    before, after = one_step("matrices")
    vectors = [n for n, p in after.items() if p.dim() < 2]
    assert {"convcaps.0.beta_a", "convcaps.0.beta_u", "classcaps.beta_a", "stem.1.weight"} <= set(vectors)
    for n, p in after.items():
        moved = not torch.equal(p, before[n])
        assert moved == (p.dim() >= 2 and bool(before[n].abs().sum() > 0)), n
    before, after = one_step("all")
    assert all(not torch.equal(after[n], before[n]) for n in vectors if before[n].abs().sum() > 0)


def test_a_run_with_decay_scope_matrices_resumes_bit_identically(tmp_path):
    scope = ["optim.name=adamw", "optim.weight_decay=0.1", "optim.decay_scope=matrices"]
    straight = fit(tiny(tmp_path, *scope), run_name="whole", echo=quiet)
    first = fit(tiny(tmp_path, *scope, "train.max_steps=7"), run_name="split", echo=quiet)
    resumed = fit(tiny(tmp_path, *scope), resume=str(first.run_dir / "last.pt"), echo=quiet)
    assert resumed.step == straight.step
    assert same_weights(straight.run_dir / "last.pt", resumed.run_dir / "last.pt")
    # the other scope has another number of parameter groups: a clear error, not a traceback
    with pytest.raises(TrainingError, match="optim.decay_scope=all"):
        fit(
            tiny(tmp_path, "optim.name=adamw"),
            resume=str(first.run_dir / "last.pt"),
            run_name="other",
            echo=quiet,
        )


def test_an_unknown_decay_scope_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="decay_scope"):
        tiny(tmp_path, "optim.decay_scope=biases")


def sigterm_on_call(monkeypatch, n: int) -> None:
    """SIGTERM to this process during the ``n``-th training step's loss (the step itself completes)."""
    real, calls = trainer.compute_loss, {"n": 0}

    def loss_then_signal(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == n:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)

    monkeypatch.setattr(trainer, "compute_loss", loss_then_signal)


def merged_metrics(run_dir: Path) -> dict[int, dict]:
    """metrics.jsonl by step, lines of one step merged (a stop can split them), without perf/..."""
    merged: dict[int, dict] = {}
    for line in logged(run_dir):
        merged.setdefault(line["step"], {}).update(
            {k: v for k, v in line.items() if not k.startswith("perf/")}
        )
    return merged


def test_a_stop_on_an_epochs_last_step_leaves_its_evaluation_to_the_resumed_run(
    tmp_path, straight, monkeypatch
):
    sigterm_on_call(monkeypatch, 6)  # configs/tiny.yaml: 6 steps an epoch
    with pytest.raises(TrainingInterrupted) as info:
        fit(tiny(tmp_path), run_name="edge", echo=quiet)
    result = info.value.result
    assert result.stopped == "SIGTERM" and result.step == 6
    ckpt = load_checkpoint(result.run_dir / "last.pt")
    assert ckpt["epoch"] == 0 and ckpt["batches_done"] == 6  # all steps done, not yet evaluated
    monkeypatch.undo()
    lines: list[str] = []
    resumed = fit(tiny(tmp_path), resume="latest", echo=lines.append)
    assert any("after the last step of epoch 1, before its evaluation" in line for line in lines), lines
    epoch_lines = [line for line in lines if line.startswith("epoch 1/2  step 6")]
    assert len(epoch_lines) == 1 and "train/loss" not in epoch_lines[0]  # no training in it to report
    assert "img/s" not in epoch_lines[0], epoch_lines  # nor a speed of 0 img/s over no images
    assert resumed.step == 12 and (resumed.best_acc, resumed.best_step) == (
        straight.best_acc,
        straight.best_step,
    )
    assert same_weights(straight.run_dir / "last.pt", resumed.run_dir / "last.pt")
    assert merged_metrics(resumed.run_dir) == merged_metrics(straight.run_dir)  # step 6's evaluation included
    steps = [line["step"] for line in logged(resumed.run_dir)]
    assert steps == sorted(set(steps)), steps  # one line a step: the evaluation joined step 6's line
    assert {"train/loss", "test/acc"} <= set(logged(resumed.run_dir)[steps.index(6)])


def test_a_stop_during_an_epoch_end_evaluation_drops_it_and_leaves_it_to_the_resumed_run(
    tmp_path, straight, monkeypatch
):
    from capsnet import evaluate as evaluation

    real, batches = evaluation.compute_loss, {"n": 0}

    def loss_then_signal(*args, **kwargs):  # SIGTERM during the first evaluation's first batch
        batches["n"] += 1
        if batches["n"] == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)

    monkeypatch.setattr(evaluation, "compute_loss", loss_then_signal)
    lines: list[str] = []
    with pytest.raises(TrainingInterrupted) as info:
        fit(tiny(tmp_path), run_name="mid-eval", echo=lines.append)
    result = info.value.result
    assert result.stopped == "SIGTERM" and result.exit_code == 143 and result.step == 6
    assert result.last_eval is None
    assert batches["n"] == 1  # configs/tiny.yaml evaluates 32 images in 2 batches: the second never ran
    ckpt = load_checkpoint(result.run_dir / "last.pt")
    assert ckpt["epoch"] == 0 and ckpt["batches_done"] == 6  # all of epoch 1's steps done, not evaluated
    assert not (result.run_dir / "best.pt").exists()
    assert any("SIGTERM during the evaluation at step 6: the resumed run evaluates" in line for line in lines)
    monkeypatch.undo()
    resumed = fit(tiny(tmp_path), resume="latest", echo=quiet)
    assert resumed.step == 12 and (resumed.best_acc, resumed.best_step) == (
        straight.best_acc,
        straight.best_step,
    )
    assert same_weights(straight.run_dir / "last.pt", resumed.run_dir / "last.pt")
    assert merged_metrics(resumed.run_dir) == merged_metrics(straight.run_dir)  # step 6's evaluation included


def test_a_resumed_run_keeps_its_start_time_and_logs_its_summary_at_each_attempts_last_step(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    first = fit(tiny(tmp_path, "train.max_steps=4"), run_name="again", echo=quiet)
    started = json.loads((first.run_dir / "run.json").read_text())["started"]
    resumed = fit(tiny(tmp_path), resume=str(first.run_dir), echo=quiet)
    record = json.loads((resumed.run_dir / "run.json").read_text())
    assert record["started"] == started and record["updated"] > started
    events = EventAccumulator(str(tmp_path / "runs" / "again"), size_guidance={"scalars": 0})
    events.Reload()
    assert [e.step for e in events.Scalars("hparam/best_acc")] == [4, 12]  # not twice at step 0


def test_a_run_stopped_by_a_signal_logs_no_summary_that_its_resume_would_leave_behind(tmp_path, monkeypatch):
    """The summary belongs at the step where an attempt ends as asked; a signalled stop's, at its
    checkpoint's step, stays in TensorBoard beside the resumed run's (events past it are hidden)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    sigterm_on_call(monkeypatch, 9)  # in epoch 2, after epoch 1's evaluation
    with pytest.raises(TrainingInterrupted) as info:
        fit(tiny(tmp_path), run_name="sig", echo=quiet)
    assert info.value.result.step == 9 and info.value.result.last_eval is not None
    monkeypatch.undo()
    fit(tiny(tmp_path), resume="latest", run_name="sig", echo=quiet)
    events = EventAccumulator(str(tmp_path / "runs" / "sig"), size_guidance={"scalars": 0})
    events.Reload()
    for tag in ("hparam/best_acc", "hparam/last_acc", "hparam/last_loss"):
        assert [e.step for e in events.Scalars(tag)] == [12], tag


@pytest.mark.parametrize("tensorboard", [True, False])
def test_routing_histograms_and_reconstructions_are_made_only_for_tensorboard(
    tmp_path, monkeypatch, tensorboard
):
    """Without TensorBoard nothing would show them: no routing statistics are gathered for a histogram
    (only at the steps that log scalars) and no test batch is drawn for the reconstruction images."""
    from capsnet.model import CapsNet

    recorded, grids = [], []
    real_forward, real_grid = CapsNet.forward, trainer.reconstruction_grid

    def forward(self, *args, **kwargs):
        if self.training:
            recorded.append(self.record_stats)
        return real_forward(self, *args, **kwargs)

    def grid(*args, **kwargs):
        grids.append(1)
        return real_grid(*args, **kwargs)

    monkeypatch.setattr(CapsNet, "forward", forward)
    monkeypatch.setattr(trainer, "reconstruction_grid", grid)
    cfg = tiny(
        tmp_path,
        f"logging.tensorboard={str(tensorboard).lower()}",
        "logging.log_every=5",
        "logging.hist_every=3",
    )
    fit(cfg, run_name="hist", echo=quiet)
    steps = [i + 1 for i, on in enumerate(recorded) if on]
    assert len(recorded) == 12
    assert steps == ([3, 5, 6, 9, 10, 12] if tensorboard else [5, 10])
    assert len(grids) == (2 if tensorboard else 0)  # one after each epoch's evaluation


def test_the_throughput_after_an_epoch_leaves_out_its_evaluation(tmp_path, monkeypatch):
    from types import SimpleNamespace

    # the trainer's clock: a millisecond a reading, and 1,000 s in each end-of-epoch evaluation and save
    clock = {"now": 0.0}

    def perf_counter() -> float:
        clock["now"] += 0.001
        return clock["now"]

    real = trainer.end_of_epoch

    def slow_evaluation(*args, **kwargs):
        clock["now"] += 1000.0
        return real(*args, **kwargs)

    monkeypatch.setattr(trainer, "time", SimpleNamespace(perf_counter=perf_counter))
    monkeypatch.setattr(trainer, "end_of_epoch", slow_evaluation)
    result = fit(tiny(tmp_path), run_name="speed", echo=quiet)
    speeds = {
        line["step"]: line["perf/img_per_s"] for line in logged(result.run_dir) if "perf/img_per_s" in line
    }
    # the first log after epoch 1's evaluation (6 steps an epoch, a log every 2): its 32 images over
    # the readings of two steps; counting the evaluation's 1,000 s would give under 0.04 img/s
    assert speeds[8] > 100, speeds


def test_a_stop_on_the_max_steps_step_evaluates_before_it_exits(tmp_path):
    lines: list[str] = []
    with pytest.MonkeyPatch.context() as mp:
        sigterm_on_call(mp, 4)
        result = fit(tiny(tmp_path, "train.max_steps=4"), run_name="cap", echo=lines.append)
    assert result.stopped == "max_steps" and result.step == 4 and result.last_eval is not None
    assert any(line.startswith("epoch 1/2 (partial: 4/6 steps)  step 4") for line in lines), lines


@pytest.mark.parametrize("how", ["renamed", "copied"])
def test_a_renamed_or_copied_run_folder_resumes_in_itself(tmp_path, straight, how):
    import shutil

    weights = tmp_path / "weights"
    shutil.copytree(straight.run_dir, weights / "straight")  # the name its checkpoints carry
    moved = weights / "straight-b"
    if how == "renamed":
        (weights / "straight").rename(moved)
    else:
        shutil.copytree(weights / "straight", moved)
    resumed = fit(tiny(tmp_path, "train.epochs=3", "train.max_steps=14"), resume=str(moved), echo=quiet)
    assert resumed.run_dir == moved and resumed.run_name == "straight-b" and resumed.step == 14
    assert load_checkpoint(moved / "last.pt")["step"] == 14
    assert [e["step"] for e in logged(moved)][-1] == 14
    if how == "renamed":
        assert not (weights / "straight").exists()
    else:  # the original is left as it was
        assert load_checkpoint(weights / "straight" / "last.pt")["step"] == straight.step


def test_resume_dot_from_inside_a_run_folder_continues_it_in_place(tmp_path, straight, monkeypatch):
    import shutil

    run_dir = tmp_path / "weights" / "straight-b"  # renamed: its checkpoints say "straight"
    shutil.copytree(straight.run_dir, run_dir)
    monkeypatch.chdir(run_dir)
    resumed = fit(tiny(tmp_path, "train.epochs=3", "train.max_steps=14"), resume=".", echo=quiet)
    assert resumed.run_dir == run_dir and resumed.step == 14
    assert load_checkpoint(run_dir / "last.pt")["run"] == "straight-b"


def test_a_run_folder_outside_out_dir_continues_in_out_dir_under_its_folder_name(tmp_path, straight):
    import shutil

    backup = tmp_path / "backup" / "straight-copy"  # renamed on the way: its checkpoints say "straight"
    shutil.copytree(straight.run_dir, backup)
    lines: list[str] = []
    resumed = fit(
        tiny(tmp_path, "train.epochs=3", "train.max_steps=14"), resume=str(backup), echo=lines.append
    )
    assert resumed.run_dir == tmp_path / "weights" / "straight-copy" and resumed.step == 14
    assert any(
        f"note: {backup} is not in {tmp_path / 'weights'}" in line and "is left as it is" in line
        for line in lines
    ), lines
    assert load_checkpoint(backup / "last.pt")["step"] == straight.step  # untouched
    # the continued run's history starts with the one that led to the checkpoint
    history = logged(resumed.run_dir)
    assert [e for e in history if e["step"] <= 12] == logged(backup) and history[-1]["step"] == 14
    # a folder name that is no run name ("x (copy)") gives way to the name the checkpoints carry
    odd = tmp_path / "backup" / "straight (copy)"
    shutil.copytree(straight.run_dir, odd)
    copied = fit(tiny(tmp_path / "b", "train.epochs=3", "train.max_steps=14"), resume=str(odd), echo=quiet)
    assert copied.run_dir == tmp_path / "b" / "weights" / "straight"
    # a checkpoint file alone, in a folder that is no run, continues under the run name it carries
    loose = tmp_path / "downloads"
    loose.mkdir()
    shutil.copyfile(straight.run_dir / "last.pt", loose / "model.pt")
    again = fit(
        tiny(tmp_path, "train.epochs=3", "train.max_steps=14"), resume=str(loose / "model.pt"), echo=quiet
    )
    assert again.run_dir == tmp_path / "weights" / "straight" and again.step == 14


def test_a_run_branched_under_another_name_keeps_the_history_up_to_its_checkpoint(tmp_path, straight):
    import shutil

    trunk = tmp_path / "weights" / "trunk"
    shutil.copytree(straight.run_dir, trunk)
    before = logged(trunk)
    branch = fit(tiny(tmp_path), run_name="branch", resume=str(trunk / "step-000006.pt"), echo=quiet)
    assert branch.run_dir == tmp_path / "weights" / "branch" and branch.step == 12
    history = logged(branch.run_dir)
    assert [e for e in history if e["step"] <= 6] == [e for e in before if e["step"] <= 6]
    assert [e["step"] for e in history] == [e["step"] for e in before]  # each logged once, in order
    assert logged(trunk) == before  # the trunk keeps its own


def test_a_run_branched_into_a_new_folder_keeps_the_best_pt_its_checkpoint_records(tmp_path, straight):
    import shutil

    trunk = tmp_path / "weights" / "trunk"
    shutil.copytree(straight.run_dir, trunk)
    best = load_checkpoint(trunk / "best.pt")
    # from best.pt itself, and from the last step file, whose record names best.pt's step (its own,
    # or an earlier one that best.pt holds): the branch starts with that best.pt, not with none
    for name, resume in (("from-best", "best.pt"), ("from-last", "step-000012.pt")):
        lines: list[str] = []
        branch = fit(
            tiny(tmp_path, "train.max_steps=12"), run_name=name, resume=str(trunk / resume), echo=lines.append
        )
        assert (branch.run_dir / "best.pt").read_bytes() == (trunk / "best.pt").read_bytes(), name
        assert (branch.best_acc, branch.best_step) == (best["best_metric"], best["step"])
        assert any(line.startswith("best.pt: a copy of ") for line in lines), lines
        assert not [line for line in lines if "chosen afresh" in line]
    # a step file whose own step is its best is that best.pt
    fit(
        tiny(tmp_path, "train.max_steps=6"),
        run_name="from-six",
        resume=str(trunk / "step-000006.pt"),
        echo=quiet,
    )
    assert load_checkpoint(trunk / "step-000006.pt")["best_step"] == 6
    six = (tmp_path / "weights" / "from-six" / "best.pt").read_bytes()
    assert six == (trunk / "step-000006.pt").read_bytes()
    # a last step whose record names step 6 as the best: the best.pt beside it that holds step 6 is
    # copied, and without that best.pt, step 6's own file
    six_record = load_checkpoint(trunk / "step-000006.pt")
    last = load_checkpoint(trunk / "step-000012.pt")
    last.update(best_metric=six_record["best_metric"], best_step=6)
    torch.save(last, trunk / "step-000012.pt")
    shutil.copyfile(trunk / "step-000006.pt", trunk / "best.pt")
    for name in ("beside", "step-file"):
        lines = []
        branch = fit(
            tiny(tmp_path, "train.max_steps=12"),
            run_name=name,
            resume=str(trunk / "step-000012.pt"),
            echo=lines.append,
        )
        source = trunk / ("best.pt" if name == "beside" else "step-000006.pt")
        assert any(line.startswith(f"best.pt: a copy of {source}, ") for line in lines), lines
        assert (branch.run_dir / "best.pt").read_bytes() == six and branch.best_step == 6
        (trunk / "best.pt").unlink(missing_ok=True)
    # a record that none of those files holds (a later best of the trunk, a file from elsewhere)
    # copies nothing: the branch chooses its best.pt afresh, and says so
    last.update(best_metric=0.999)
    torch.save(last, trunk / "step-000012.pt")
    lines = []
    fit(
        tiny(tmp_path, "train.max_steps=12"),
        run_name="unheld",
        resume=str(trunk / "step-000012.pt"),
        echo=lines.append,
    )
    assert any("holds no best.pt of the steps up to 12" in line for line in lines), lines
    assert not (tmp_path / "weights" / "unheld" / "best.pt").exists()


def test_resuming_from_an_earlier_step_drops_the_best_pt_of_the_steps_it_replaces(tmp_path, straight):
    import shutil

    run_dir = tmp_path / "weights" / "straight"  # the run name the checkpoints carry
    shutil.copytree(straight.run_dir, run_dir)
    shutil.copyfile(run_dir / "step-000012.pt", run_dir / "best.pt")  # a best from the later steps
    lines: list[str] = []
    resumed = fit(
        tiny(tmp_path, "train.max_steps=8"), resume=str(run_dir / "step-000006.pt"), echo=lines.append
    )
    assert any("removed best.pt, past the resumed step 6" in line for line in lines), lines
    assert not (run_dir / "step-000012.pt").exists()
    # step 6 was the best of the steps up to it (its first evaluation), so best.pt is written again
    # from it; the step-8 evaluation replaces it only where it scores higher
    six = load_checkpoint(run_dir / "step-000006.pt")
    assert six["best_step"] == 6
    assert any(line.startswith(f"best.pt: a copy of {run_dir / 'step-000006.pt'}, ") for line in lines), lines
    best = 8 if resumed.last_eval.acc > six["best_metric"] else 6
    assert resumed.best_step == best and load_checkpoint(run_dir / "best.pt")["step"] == best
    assert load_checkpoint(run_dir / "last.pt")["step"] == 8


def test_a_resume_that_changes_the_runs_length_says_how_the_schedules_move(tmp_path):
    whole_run = ["loss.margin_steps=null", "optim.decay_steps=null", "optim.decay_rate=0.1"]
    first = fit(tiny(tmp_path, *whole_run, "train.max_steps=6"), run_name="short", echo=quiet)
    assert load_checkpoint(first.run_dir / "last.pt")["total_steps"] == 6
    lines: list[str] = []
    fit(tiny(tmp_path, *whole_run), resume=str(first.run_dir), echo=lines.append)
    cfg = tiny(tmp_path, *whole_run)
    lr6, lr12 = trainer.lr_at(6, cfg.optim, 6), trainer.lr_at(6, cfg.optim, 12)
    m6, m12 = trainer.margin_at(6, 6, cfg.loss), trainer.margin_at(6, 12, cfg.loss)
    assert lr6 < lr12 and m6 > m12
    expected = (
        "note: the run is now 12 steps long instead of 6 (train.epochs or train.max_steps changed), and the "
        f"schedules spread over the whole run follow: at step 6 the learning rate from {lr6:.3g} to {lr12:.3g} "
        f"and the spread-loss margin from {m6:.3f} to {m12:.3f}"
    )
    assert expected in lines, lines
    # schedules of a fixed length (configs/tiny.yaml's own) do not move, and an unchanged length says nothing
    fixed = tiny(tmp_path)
    assert trainer.schedule_change(fixed, 6, 6, 12) is None
    assert (
        trainer.schedule_change(cfg, 6, 12, 12) is None and trainer.schedule_change(cfg, 6, None, 12) is None
    )


def test_the_first_img_per_s_after_a_resume_counts_only_the_images_it_timed():
    import time
    from types import SimpleNamespace

    written: dict = {}
    run = SimpleNamespace(
        window={"loss": 1.0, "steps": 2, "correct": 10, "n": 32},
        window_untimed=16,  # the window's first step, trained before the stop
        window_start=time.perf_counter() - 2.0,
        device=torch.device("cpu"),
        model=SimpleNamespace(lambdas=lambda: [0.01], routing_stats={}),
        bad_total=0,
        images_seen=64,
        step=4,
        writer=SimpleNamespace(scalars=lambda metrics, step: written.update(metrics)),
    )
    trainer._log_step(run, 0.01, 0.2)
    assert 7.0 < written["perf/img_per_s"] <= 8.0  # 16 images in about 2 s, not 32
    assert written["train/images_seen"] == 64  # the whole run's, the images before the stop included
    assert written["train/acc"] == 10 / 32  # the accuracy still covers the whole window
    assert run.window_untimed == 0 and run.window["n"] == 0


def test_overrides_on_resume_are_checked_against_the_checkpoints_config_not_the_defaults(tmp_path):
    from capsnet.runs import config_for_resume

    one_layer = ["model.caps_types=[4]", "model.caps_strides=[2]", "train.max_steps=2"]
    first = fit(tiny(tmp_path, *one_layer), run_name="one-layer", echo=quiet)
    # one ConvCaps layer, then the class capsules: two factors (the default model would need three)
    cfg = config_for_resume(
        str(first.run_dir), ["routing.layer_cost_scales=[2,1]", f"logging.out_dir={tmp_path / 'weights'}"]
    )
    assert cfg.routing.layer_cost_scales == [2, 1] and cfg.model.caps_types == [4]
    with pytest.raises(ConfigError, match="layer_cost_scales"):
        config_for_resume(str(first.run_dir), ["routing.layer_cost_scales=[2,1,1]"])


@pytest.mark.parametrize(
    ("prefix", "start"), [("_base", "base-"), ("my cfg", "my-cfg-"), ("..", "run-"), (None, "synthetic-")]
)
def test_automatic_run_names_from_any_config_file_name_are_valid_run_names(prefix, start):
    from capsnet.checkpoint import validate_run_name
    from capsnet.runs import default_run_name

    name = default_run_name(tiny(Path(".")), prefix)
    assert name.startswith(start) and validate_run_name(name) == name


def test_a_fresh_run_hides_the_tensorboard_events_of_a_deleted_run_of_the_same_name(tmp_path):
    import shutil

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    def loss_steps() -> list[int]:
        events = EventAccumulator(str(tmp_path / "runs" / "again"), size_guidance={"scalars": 0})
        events.Reload()
        return [e.step for e in events.Scalars("train/loss")]

    first = fit(tiny(tmp_path, "train.max_steps=6"), run_name="again", echo=quiet)
    assert loss_steps() == [2, 4, 6]
    shutil.rmtree(first.run_dir)  # the checkpoints deleted by hand, runs/again left behind
    time.sleep(1.1)  # event files are named by the second they were opened
    fit(tiny(tmp_path, "train.max_steps=4"), run_name="again", echo=quiet)
    assert loss_steps() == [2, 4]  # the new run's alone, not [2, 4, 6] or [2, 2, 4, 4, 6]


def test_a_non_finite_image_is_logged_without_a_warning(tmp_path):
    import warnings

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from capsnet.tracking import TensorBoardWriter

    image = torch.full((1, 4, 4), 0.5)
    image[0, 0, :3] = torch.tensor([float("nan"), float("inf"), -float("inf")])
    writer = TensorBoardWriter(tmp_path / "tb")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        writer.image("recon", image, 3)
    writer.close()
    events = EventAccumulator(str(tmp_path / "tb"), size_guidance={"images": 0})
    events.Reload()
    (logged_image,) = events.Images("recon")
    assert (logged_image.step, logged_image.width, logged_image.height) == (3, 4, 4)


def test_a_resumed_run_takes_the_configs_optimiser_settings_but_refuses_another_optimiser(tmp_path):
    from capsnet.checkpoint import CheckpointError

    first = fit(tiny(tmp_path, "train.max_steps=6"), run_name="opt", echo=quiet)
    groups = load_checkpoint(first.run_dir / "last.pt")["optimizer"]["param_groups"]
    assert [g["weight_decay"] for g in groups] == [2e-7]
    resumed = fit(
        tiny(tmp_path, "train.max_steps=8", "optim.weight_decay=0.1"), resume=str(first.run_dir), echo=quiet
    )
    state = load_checkpoint(resumed.run_dir / "last.pt")["optimizer"]
    assert [g["weight_decay"] for g in state["param_groups"]] == [0.1]
    assert state["state"]  # the moments went on
    with pytest.raises(CheckpointError, match=r"optim.name: 'adam' in the checkpoint, 'sgd' now"):
        fit(tiny(tmp_path, "train.max_steps=10", "optim.name=sgd"), resume=str(first.run_dir), echo=quiet)
    switched = fit(  # Adam's state continues under AdamW, with decoupled decay
        tiny(tmp_path, "train.max_steps=10", "optim.name=adamw"), resume=str(first.run_dir), echo=quiet
    )
    groups = load_checkpoint(switched.run_dir / "last.pt")["optimizer"]["param_groups"]
    assert [g["decoupled_weight_decay"] for g in groups] == [True]


def test_resuming_refuses_settings_that_would_draw_another_validation_split(tmp_path):
    from capsnet.checkpoint import CheckpointError

    first = fit(tiny(tmp_path, "train.max_steps=4", "data.val_split=0.25"), run_name="val", echo=quiet)
    for change, message in [
        (
            "train.seed=5",
            r"train.seed: 0 in the checkpoint, 5 now \(these settings draw the validation split",
        ),
        ("data.val_split=0.5", r"data.val_split: 0.25 in the checkpoint, 0.5 now"),
        ("data.val_split=0", r"data.val_split: 0.25 in the checkpoint, 0.0 now"),
    ]:
        with pytest.raises(CheckpointError, match=message):
            fit(tiny(tmp_path, "train.max_steps=6", change), resume=str(first.run_dir), echo=quiet)
    # refused before the routing kernels are chosen (and compiled)
    from capsnet import trainer

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(
            trainer, "_choose_routing_kernels", lambda *a: pytest.fail("kernels chosen before the check")
        )
        with pytest.raises(
            CheckpointError, match=r"drop the -o overrides, or the --config, that change them"
        ):
            fit(tiny(tmp_path, "train.max_steps=6", "train.seed=5"), resume=str(first.run_dir), echo=quiet)
    # Without a validation split the seed draws only the data order: the run goes on.
    plain = fit(tiny(tmp_path, "train.max_steps=4"), run_name="test-chosen", echo=quiet)
    again = fit(tiny(tmp_path, "train.max_steps=6", "train.seed=5"), resume=str(plain.run_dir), echo=quiet)
    assert load_checkpoint(again.run_dir / "last.pt")["step"] == 6


@pytest.mark.parametrize("copy_fails", [False, True])
def test_a_save_stopped_before_best_pt_is_mended_when_the_run_resumes(tmp_path, monkeypatch, copy_fails):
    """best.pt is written again from the checkpoint that holds the recorded best; only where it cannot
    be (here: the disk is still full) does the record fall back to the best that best.pt holds."""
    from capsnet import checkpoint
    from capsnet.checkpoint import CheckpointError

    real, writes = checkpoint.atomic_write_bytes, []

    def full_disk_at_the_second_best(data, path):
        if Path(path).name == "best.pt":
            writes.append(path)
            if len(writes) == 2:
                raise CheckpointError(f"could not write {path}: no space left on device")
        return real(data, path)

    monkeypatch.setattr(checkpoint, "atomic_write_bytes", full_disk_at_the_second_best)
    with pytest.raises(CheckpointError, match="no space left") as stopped:
        fit(tiny(tmp_path, "train.epochs=6", "optim.lr=0.0005"), run_name="b", echo=quiet)
    monkeypatch.setattr(checkpoint, "atomic_write_bytes", real)
    run_dir = tmp_path / "weights" / "b"
    last, best = load_checkpoint(run_dir / "last.pt"), load_checkpoint(run_dir / "best.pt")
    written = f"step-{last['step']:06d}.pt"
    assert f"({written} and last.pt were written)" in str(stopped.value)
    assert f"the last complete checkpoint is {run_dir / written}" in str(stopped.value)
    assert last["best_step"] == last["step"] > best["step"] == best["best_step"]  # the record is ahead
    said: list[str] = []
    if copy_fails:

        def full_disk(data, path):
            raise CheckpointError(f"could not write {path}: no space left on device")

        monkeypatch.setattr(trainer, "atomic_write_bytes", full_disk)  # the copy; the saves have space
    result = fit(tiny(tmp_path, "train.epochs=7", "optim.lr=1e-9"), resume=str(run_dir), echo=said.append)
    held_back = any(f"best.pt holds step {best['step']}" in line for line in said)
    mended = any(line.startswith(f"best.pt: a copy of {run_dir / written}, the best") for line in said)
    assert (held_back, mended) == (copy_fails, not copy_fails), said
    final_best = load_checkpoint(run_dir / "best.pt")
    assert (result.best_step, result.best_acc) == (final_best["step"], final_best["best_metric"])
    if not copy_fails:  # never below the recorded best, whose file is on disk
        assert final_best["best_metric"] >= last["best_metric"]


def test_resuming_mid_epoch_with_another_batch_size_says_what_it_does_to_the_epoch(tmp_path):
    first = fit(tiny(tmp_path, "train.max_steps=8"), run_name="bs", echo=quiet)
    ckpt = load_checkpoint(first.run_dir / "last.pt")
    assert ckpt["batches_done"] == 2
    size = ckpt["config"]["train"]["batch_size"]
    said: list[str] = []
    fit(
        tiny(tmp_path, "train.max_steps=9", f"train.batch_size={2 * size}"),
        resume=str(first.run_dir),
        echo=said.append,
    )
    notes = [line for line in said if line.startswith("note: train.batch_size x train.accumulate")]
    want = (
        f"note: train.batch_size x train.accumulate is {2 * size} x 1 instead of {size} x 1 in the middle of "
        f"epoch 2: its first 2 steps are skipped in steps of the new size ({4 * size} images instead of the "
        f"{2 * size} trained on), so until the epoch ends some images are seen twice or not at all"
    )
    assert notes == [want]
    said.clear()  # at an epoch boundary nothing is skipped: no note
    again = fit(tiny(tmp_path, "train.max_steps=12"), run_name="bs2", echo=quiet)
    fit(
        tiny(tmp_path, "train.max_steps=14", "train.batch_size=4"),
        resume=str(again.run_dir),
        echo=said.append,
    )
    assert not [line for line in said if "train.batch_size x" in line]


def test_a_resume_with_another_loader_worker_count_says_that_the_augmentation_changes(tmp_path):
    first = fit(tiny(tmp_path, "train.max_steps=2"), run_name="w", echo=quiet)
    said: list[str] = []
    fit(
        tiny(tmp_path, "train.max_steps=3", "train.num_workers=1"),
        resume=str(first.run_dir),
        echo=said.append,
    )
    notes = [line for line in said if "train.num_workers" in line]
    assert len(notes) == 1 and notes[0].startswith("note: train.num_workers is 1 instead of 0"), said
    assert "-o train.num_workers=0" in notes[0]
    said.clear()  # the same count again, or no augmentation to draw: nothing to say
    fit(
        tiny(tmp_path, "train.max_steps=4", "train.num_workers=1"),
        resume=str(first.run_dir),
        echo=said.append,
    )
    fit(
        tiny(tmp_path, "train.max_steps=5", "data.augment=false"), resume=str(first.run_dir), echo=said.append
    )
    assert not [line for line in said if "train.num_workers" in line]


def test_a_resume_on_a_folder_whose_validation_split_now_holds_other_images_is_refused(tmp_path):
    """One training file swapped for another of another name: the same counts, but the split, drawn
    over the sorted files, now holds out other images, some of which the run trained on."""
    import numpy as np
    from PIL import Image
    from test_predict import class_tree

    from capsnet.checkpoint import CheckpointError

    train = class_tree(tmp_path / "train", "L", 8, 0)
    test = class_tree(tmp_path / "test", "L", 2, 1)
    folder = ["data.name=folder", f"data.train_dir={train}", f"data.test_dir={test}", "data.grayscale=true"]
    folder += ["data.image_size=20", "data.val_split=0.5", "train.epochs=6"]
    first = fit(tiny(tmp_path, *folder, "train.max_steps=2"), run_name="f", echo=quiet)
    assert isinstance(load_checkpoint(first.run_dir / "last.pt")["val_digest"], str)
    again = fit(tiny(tmp_path, *folder, "train.max_steps=3"), resume=str(first.run_dir), echo=quiet)
    assert again.step == 3  # the same files: it goes on
    (train / "cat" / "0.png").unlink()
    pixels = np.random.default_rng(5).integers(0, 96, (20, 20), dtype=np.uint8)
    Image.fromarray(pixels, mode="L").save(train / "cat" / "zz.png")
    with pytest.raises(CheckpointError) as refused:
        fit(tiny(tmp_path, *folder, "train.max_steps=4"), resume=str(first.run_dir), echo=quiet)
    assert "its validation split holds other images than it did" in str(refused.value)
    assert load_checkpoint(first.run_dir / "last.pt")["step"] == 3  # nothing written


def test_the_batch_change_note_counts_the_images_of_every_process():
    from capsnet.trainer import batch_change

    cfg = tiny(Path("/nonexistent"), "train.batch_size=8")
    ckpt = {"config": {"train": {"batch_size": 16, "accumulate": 1}}, "world_size": 2}
    note = batch_change(ckpt, cfg, 3, 0, world_size=2)
    assert note is not None and "(48 images instead of the 96 trained on)" in note
    assert batch_change(ckpt, cfg, 0, 0, world_size=2) is None  # at an epoch boundary nothing is skipped
    # the same batch in one process instead of two: half the images per step
    same = tiny(Path("/nonexistent"), "train.batch_size=16")
    note = batch_change(ckpt, same, 3, 0, world_size=1)
    assert note is not None and note.startswith(
        "note: the run trains in 1 process instead of 2 in the middle"
    )
    assert "(48 images instead of the 96 trained on)" in note
    # twice the batch in one process: the same images per step, so nothing to say
    assert batch_change(ckpt, tiny(Path("/nonexistent"), "train.batch_size=32"), 3, 0, world_size=1) is None


def test_resume_compares_only_the_split_settings_of_the_runs_dataset():
    from capsnet.checkpoint import CheckpointError, check_resume_settings

    saved = tiny(Path("/nonexistent"), "data.val_split=0.25").to_dict()
    smallnorb_only = tiny(Path("/nonexistent"), "data.val_split=0.25").to_dict()
    smallnorb_only["data"]["stereo"] = "samples"  # as a config saved before such keys were refused holds
    check_resume_settings(saved, smallnorb_only, "ckpt")  # synthetic data: the stereo setting draws nothing
    bigger = tiny(Path("/nonexistent"), "data.val_split=0.25", "data.train_size=128").to_dict()
    with pytest.raises(CheckpointError, match=r"data.train_size: 96 in the checkpoint, 128 now"):
        check_resume_settings(saved, bigger, "ckpt")


def test_a_reconstruction_weight_without_a_decoder_is_named_as_unused(tmp_path):
    lines: list[str] = []
    fit(tiny(tmp_path, "model.decoder=false", "train.max_steps=1"), run_name="nodec", echo=lines.append)
    assert "note: loss.recon_weight 0.0005 is not used: model.decoder is false" in lines, lines
    lines.clear()
    fit(
        tiny(tmp_path, "model.decoder=false", "loss.recon_weight=0", "train.max_steps=1"),
        run_name="n2",
        echo=lines.append,
    )
    assert not any("recon_weight" in line for line in lines), lines


def test_settings_that_a_run_never_reads_are_named_as_unused(tmp_path):
    from capsnet.config import unused_settings

    def notes(*overrides: str) -> list[str]:
        return unused_settings(tiny(tmp_path, *overrides))

    assert notes() == []  # tiny.yaml's own
    spread = ("loss.kind=cross_entropy", "loss.margin_start=0.5", "loss.margin_schedule=sigmoid")
    assert notes(*spread) == [  # with tiny.yaml's margin_steps: 16
        (
            "loss.margin_start, loss.margin_schedule, loss.margin_steps are not used: they set the spread "
            "loss's margin, and loss.kind is cross_entropy"
        )
    ]
    assert notes("loss.kind=margin", "loss.margin_steps=null") == []  # every margin key at its default
    assert notes("loss.teacher_weight=5") == ["loss.teacher_weight is not used: loss.teacher is null"]
    with_mnist = notes("data.name=mnist")  # tiny.yaml's synthetic sizes, under another dataset
    assert with_mnist == [
        "data.num_classes, data.train_size, data.test_size are not used: only data.name 'synthetic' reads them"
    ]
    assert notes("loss.recon_weight=0") == [
        (
            "model.decoder: the decoder is built and saved but never trained (loss.recon_weight is 0); "
            "model.decoder: false leaves it out"
        )
    ]
    assert notes("model.decoder=false", "loss.recon_weight=0", "model.decoder_hidden=[8]") == [
        "model.decoder_hidden is not used: model.decoder is false"
    ]
    # training says them, with train.sync_bn in a single process, and logs no margin for another loss
    lines: list[str] = []
    cfg = tiny(
        tmp_path, "loss.kind=cross_entropy", "loss.margin_end=0.5", "train.sync_bn=true", "train.max_steps=6"
    )
    result = fit(cfg, run_name="unread", echo=lines.append)
    assert f"note: {unused_settings(cfg)[0]}" in lines, lines
    assert any(line.startswith("note: train.sync_bn is not used:") for line in lines), lines
    epoch = [line for line in lines if line.startswith("epoch 1/")]
    assert len(epoch) == 1 and "sched/lr" in epoch[0] and "margin" not in epoch[0], epoch
    assert not [row for row in logged(result.run_dir) if "sched/margin" in row]


def test_a_model_without_decoder_loads_whatever_decoder_widths_the_config_names(tmp_path):
    no_decoder = ("model.decoder=false", "loss.recon_weight=0", "train.max_steps=2")
    first = fit(tiny(tmp_path, *no_decoder), run_name="plain", echo=quiet)
    cfg = tiny(tmp_path, *no_decoder, "model.decoder_hidden=[16]", f"train.init_from={first.run_dir}")
    assert fit(cfg, run_name="again", echo=quiet).step == 2
    with pytest.raises(CheckpointError, match=r"model.decoder: False in the checkpoint, True now"):
        fit(
            tiny(tmp_path, "train.max_steps=2", f"train.init_from={first.run_dir}"),
            run_name="more",
            echo=quiet,
        )


def test_the_training_step_reconstructs_from_the_target_class_not_the_predicted_one():
    from capsnet.model import CapsNet

    torch.manual_seed(0)
    model = CapsNet.from_preset("small", num_classes=5, image_size=28, decoder_hidden=[16, 16]).eval()
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        out = model(x)
        y = out.activations.argmin(dim=1)  # never the predicted class
        _, recon = trainer.TrainStep(model, None, reconstruct=True)(x, y)
        torch.testing.assert_close(recon, model.reconstruct(out.poses, y))
        assert not torch.allclose(recon, model.reconstruct(out.poses, out.activations.argmax(dim=1)))


@pytest.mark.parametrize("name", ["adam", "adamw", "sgd"])
def test_every_optimiser_step_runs_at_the_scheduled_learning_rate(tmp_path, monkeypatch, name):
    """Warm-up, then decay: the rate each step of the optimiser itself uses is lr_at(step), not
    only the logged sched/lr."""
    from capsnet.loss import lr_at

    seen: list[float] = []
    real = trainer.build_optimizer

    def spied(model, cfg):
        optimizer = real(model, cfg)
        step = optimizer.step

        def recording_step(*args, **kwargs):
            seen.append(optimizer.param_groups[0]["lr"])
            assert len({g["lr"] for g in optimizer.param_groups}) == 1  # every group alike
            return step(*args, **kwargs)

        optimizer.step = recording_step
        return optimizer

    monkeypatch.setattr(trainer, "build_optimizer", spied)
    cfg = tiny(
        tmp_path, f"optim.name={name}", "optim.warmup_steps=4", "optim.decay_steps=3", "optim.decay_rate=0.5"
    )
    result = fit(cfg, run_name="lr", echo=quiet)
    assert result.step == len(seen) == 12
    want = [lr_at(k, cfg.optim, 12) for k in range(12)]
    assert want[0] < want[3] and want[4] > want[11]  # a warm-up, then a decay, to tell apart
    assert seen == pytest.approx(want, rel=1e-12)


def test_sgd_keeps_a_momentum_of_0_9():
    """Two SGD steps with known gradients g1, g2: the second moves by lr * (g2 + 0.9 * g1)."""
    model = torch.nn.Linear(3, 2)
    cfg = tiny(Path("."), "optim.name=sgd", "optim.lr=0.1", "optim.weight_decay=0")
    optimizer = trainer.build_optimizer(model, cfg)
    g1, g2 = torch.randn(2, 3), torch.randn(2, 3)
    for g in (g1, g2):
        before = model.weight.detach().clone()
        model.weight.grad, model.bias.grad = g.clone(), torch.zeros(2)
        optimizer.step()
    torch.testing.assert_close(before - model.weight.detach(), 0.1 * (g2 + 0.9 * g1))


def test_grad_clip_scales_every_gradient_by_one_factor_from_their_global_l2_norm(tmp_path, monkeypatch):
    # One SGD step (momentum's first step is lr * gradient; no weight decay) without clipping gives
    # the gradients; with optim.grad_clip=c the step must be those gradients times c / ||g||_2,
    # the norm taken over all parameters together.
    common = ["train.max_steps=1", "optim.name=sgd", "optim.lr=0.5", "optim.weight_decay=0"]
    starts: list[dict[str, Tensor]] = []
    real = trainer.build_optimizer

    def remember_start(model, cfg):
        starts.append({n: p.detach().clone() for n, p in model.named_parameters()})
        return real(model, cfg)

    monkeypatch.setattr(trainer, "build_optimizer", remember_start)

    def step(name: str, *extra: str) -> dict[str, Tensor]:
        result = fit(tiny(tmp_path, *common, *extra), run_name=name, echo=quiet)
        start, end = starts[-1], load_checkpoint(result.run_dir / "last.pt")["model"]
        return {n: (end[n] - start[n]).double() for n in start}

    free = step("free")
    grads = {n: -d / 0.5 for n, d in free.items()}
    norm = float(torch.sqrt(sum((g**2).sum() for g in grads.values())))
    assert norm > 0.01
    clip = norm / 4
    clipped = step("clipped", f"optim.grad_clip={clip}")
    assert starts[0].keys() == starts[1].keys() and all(
        torch.equal(starts[0][n], starts[1][n]) for n in starts[0]
    )
    for n, d in clipped.items():
        torch.testing.assert_close(d, free[n] * (clip / norm), atol=1e-7, rtol=1e-4, msg=n)
    loose = step("loose", f"optim.grad_clip={norm * 4}")  # above the norm: the step is unchanged
    for n, d in loose.items():
        torch.testing.assert_close(d, free[n], atol=1e-7, rtol=1e-4, msg=n)


def test_a_run_accumulating_micro_batches_resumes_mid_epoch_bit_identically(tmp_path):
    # 96 images in micro-batches of 8, two to a step: 6 steps an epoch; stopped after 4 of them,
    # the resumed run must skip 8 micro-batches (not 4) to go on where the first one stopped.
    accumulate = ["train.batch_size=8", "train.accumulate=2"]
    whole = fit(tiny(tmp_path, *accumulate), run_name="whole", echo=quiet)
    first = fit(tiny(tmp_path, *accumulate, "train.max_steps=4"), run_name="split", echo=quiet)
    assert first.step == 4 and load_checkpoint(first.run_dir / "last.pt")["batches_done"] == 4
    resumed = fit(tiny(tmp_path, *accumulate), resume=str(first.run_dir), echo=quiet)
    assert resumed.step == whole.step == 12
    assert same_weights(whole.run_dir / "last.pt", resumed.run_dir / "last.pt")
    a = {line["step"]: line.get("train/loss") for line in logged(whole.run_dir)}
    b = {line["step"]: line.get("train/loss") for line in logged(resumed.run_dir)}
    assert a == b


def _write_image_classes(root: Path, per_class: int = 15) -> Path:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(3)
    for label in ("a", "b"):
        (root / label).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (20, 20), dtype=np.uint8), mode="L").save(
                root / label / f"{i}.png"
            )
    return root


def _folder_of_24(root: Path) -> tuple[Path, list[str]]:
    """A folder of 24 training images of 20x20 in two classes, with a test folder of 6: its root
    and the overrides that train on it in grey."""
    images = _write_image_classes(root / "images", 12)
    tests = _write_image_classes(root / "tests", 3)
    data = [
        "data.name=folder",
        f"data.train_dir={images}",
        f"data.test_dir={tests}",
        "data.image_size=20",
        "data.grayscale=true",
    ]
    return images, data


def test_a_run_resumed_on_a_folder_with_other_images_is_refused_with_a_val_split_and_told_without(tmp_path):
    from PIL import Image

    from capsnet.checkpoint import CheckpointError

    images, data = _folder_of_24(tmp_path)
    data.append("train.batch_size=6")
    tests = tmp_path / "tests"
    held = fit(tiny(tmp_path, *data, "data.val_split=0.25", "train.epochs=1"), run_name="held", echo=quiet)
    assert load_checkpoint(held.run_dir / "last.pt")["data_sizes"] == {"train": 18, "val": 6, "test": 6}
    plain = fit(tiny(tmp_path, *data, "train.epochs=1"), run_name="plain", echo=quiet)
    said: list[str] = []
    fit(tiny(tmp_path, *data, "train.epochs=2"), resume=str(plain.run_dir), echo=said.append)
    assert not [line for line in said if "the data is not what" in line]  # the same data: no note
    for i in range(12, 20):  # photos added to a class
        Image.new("L", (20, 20), 40 * (i % 6)).save(images / "a" / f"{i}.png")
    before = sorted(p.name for p in held.run_dir.iterdir())
    with pytest.raises(CheckpointError) as caught:
        fit(
            tiny(tmp_path, *data, "data.val_split=0.25", "train.epochs=2"),
            resume=str(held.run_dir),
            echo=quiet,
        )
    last = held.run_dir / "step-000003.pt"  # the newest checkpoint, as resuming the run names it
    assert str(caught.value) == (
        f"cannot resume {last} on other data (images: train 18 -> 24, val 6 -> 8): its validation split "
        "would be drawn anew and could hold out images the run trained on; resume it on the data it trained "
        f"on, or start a new run from its weights with -o train.init_from={last}"
    )
    assert sorted(p.name for p in held.run_dir.iterdir()) == before  # refused before touching the run
    # nor is that validation split scored: it may now hold training images; the test split may be
    from capsnet.data import DataError
    from capsnet.evaluate import evaluate_checkpoint

    with pytest.raises(DataError, match=r"--split val on other data \(images: train 18 -> 24, val 6 -> 8\)"):
        evaluate_checkpoint(
            str(held.run_dir), str(tmp_path / "weights"), split="val", device="cpu", progress=False
        )
    assert (
        evaluate_checkpoint(
            str(held.run_dir), str(tmp_path / "weights"), device="cpu", progress=False
        ).result.n
        == 6
    )
    # without a validation split it goes on, and says so; best.pt, chosen on the test images, stays
    said.clear()
    fit(tiny(tmp_path, *data, "train.epochs=3"), resume=str(plain.run_dir), echo=said.append)
    assert [line for line in said if "the data is not what" in line] == [
        (
            "note: the data is not what the checkpoint was trained on (images: train 24 -> 32): the order of "
            "the epochs is drawn anew, so the run does not go on as it would have"
        )
    ]
    assert not [line for line in said if "chosen afresh" in line]
    # the test images changed too: the best so far was scored on others, so best.pt is chosen afresh
    Image.new("L", (20, 20), 99).save(tests / "b" / "extra.png")
    said.clear()
    fit(tiny(tmp_path, *data, "train.epochs=4"), resume=str(plain.run_dir), echo=said.append)
    assert any("(images: test 6 -> 7)" in line for line in said)
    assert any(
        line.endswith("was measured on other test images, so best.pt is chosen afresh from here")
        for line in said
    )
    assert (
        load_checkpoint(plain.run_dir / "best.pt")["step"]
        == load_checkpoint(plain.run_dir / "last.pt")["step"]
    )


@pytest.mark.parametrize("workers", [0, 1])
def test_a_run_with_random_augmentation_resumes_mid_epoch_bit_identically(tmp_path, workers):
    # An image folder trains with random shifts drawn from torch's generator (in the training
    # process, or in a loader worker seeded from the loader's generator), so the resumed run
    # trains on the same shifted images only when it restores the random state of the epoch's
    # start and replays the loader to the step it stopped at.
    _, data = _folder_of_24(tmp_path)  # 3 steps of 8 an epoch
    data += [
        "data.augment=true",
        "data.shift=3",
        "train.batch_size=8",
        "train.epochs=3",
        f"train.num_workers={workers}",
    ]
    whole = fit(tiny(tmp_path, *data), run_name="whole", echo=quiet)
    assert whole.step == 9
    first = fit(
        tiny(tmp_path, *data, "train.max_steps=5"), run_name="split", echo=quiet
    )  # epoch 2, step 2 of 3
    assert load_checkpoint(first.run_dir / "last.pt")["batches_done"] == 2
    resumed = fit(tiny(tmp_path, *data), resume=str(first.run_dir), echo=quiet)
    assert resumed.step == 9
    assert same_weights(whole.run_dir / "last.pt", resumed.run_dir / "last.pt")
    # the augmentation does draw: without it the same run ends elsewhere
    unaugmented = [o for o in data if not o.startswith(("data.augment", "data.shift"))] + [
        "data.augment=false"
    ]
    plain = fit(tiny(tmp_path, *unaugmented), run_name="plain", echo=quiet)
    assert not same_weights(whole.run_dir / "last.pt", plain.run_dir / "last.pt")


def test_a_run_stopped_inside_a_logging_window_logs_the_whole_window_after_resuming(tmp_path, straight):
    # configs/tiny.yaml logs every 2 steps: stopped at step 7, the window logged at step 8 holds
    # step 7 (trained before the stop) and step 8 (after it), as in the run that never stopped.
    first = fit(tiny(tmp_path, "train.max_steps=7"), run_name="odd", echo=quiet)
    assert load_checkpoint(first.run_dir / "last.pt")["log_window"]["steps"] == 1
    resumed = fit(tiny(tmp_path), resume=str(first.run_dir), echo=quiet)
    assert same_weights(straight.run_dir / "last.pt", resumed.run_dir / "last.pt")
    keys = ("train/loss", "train/loss_class", "train/loss_recon", "train/acc")
    a = {line["step"]: [line[k] for k in keys] for line in logged(straight.run_dir) if "train/loss" in line}
    b = {line["step"]: [line[k] for k in keys] for line in logged(resumed.run_dir) if "train/loss" in line}
    assert a == b and 8 in b


def images_logged(run_dir: Path) -> dict[int, float]:
    """train/images_seen of each step of a run's metrics.jsonl."""
    return {
        line["step"]: line["train/images_seen"] for line in logged(run_dir) if "train/images_seen" in line
    }


def test_the_images_seen_are_counted_over_a_resume_with_another_batch_size(tmp_path):
    first = fit(tiny(tmp_path, "train.batch_size=4", "train.max_steps=4"), run_name="grown", echo=quiet)
    assert load_checkpoint(first.run_dir / "last.pt")["images_seen"] == 16  # 4 steps of 4 images
    resumed = fit(tiny(tmp_path, "train.batch_size=8", "train.max_steps=8"), resume="grown", echo=quiet)
    assert images_logged(resumed.run_dir) == {2: 8, 4: 16, 6: 32, 8: 48}  # then steps of 8 images
    assert all("train/images_seen" in line for line in logged(resumed.run_dir))  # evaluations too
    assert load_checkpoint(resumed.run_dir / "last.pt")["images_seen"] == 48


def test_the_images_seen_count_an_epochs_short_last_batch_as_what_it_holds(tmp_path):
    # 96 images in batches of 20: four of 20, then one of 16 (an evaluation on a step that logs no window)
    result = fit(tiny(tmp_path, "train.batch_size=20", "train.epochs=1"), run_name="short", echo=quiet)
    assert images_logged(result.run_dir) == {2: 40, 4: 80, 5: 96}
    assert "test/acc" in logged(result.run_dir)[-1] and "train/loss" not in logged(result.run_dir)[-1]


def test_a_checkpoint_without_the_count_of_images_resumes_at_its_step_times_its_global_batch(tmp_path):
    first = fit(tiny(tmp_path, "train.batch_size=4", "train.max_steps=4"), run_name="older", echo=quiet)
    for path in first.run_dir.glob("*.pt"):  # as written before the count was kept
        ckpt = load_checkpoint(path)
        del ckpt["images_seen"]
        torch.save(ckpt, path)
    resumed = fit(tiny(tmp_path, "train.batch_size=8", "train.max_steps=6"), resume="older", echo=quiet)
    assert images_logged(resumed.run_dir)[6] == 4 * 4 + 2 * 8


def test_a_checkpoint_without_the_loss_parts_logs_them_as_unknown_for_the_window_it_ends(tmp_path):
    # configs/tiny.yaml logs every 2 steps: stopped at step 3, the window logged at step 4 holds a
    # step whose parts the older checkpoint did not keep; its loss is known, its parts are not
    first = fit(tiny(tmp_path, "train.max_steps=3"), run_name="older", echo=quiet)
    for path in first.run_dir.glob("*.pt"):
        ckpt = load_checkpoint(path)
        ckpt["log_window"] = {k: v for k, v in ckpt["log_window"].items() if k not in ("class", "recon")}
        torch.save(ckpt, path)
    resumed = fit(tiny(tmp_path, "train.max_steps=6"), resume="older", echo=quiet)
    rows = {r["step"]: r for r in logged(resumed.run_dir) if "train/loss" in r}
    assert math.isfinite(float(rows[4]["train/loss"]))
    assert rows[4]["train/loss_class"] == "nan" and rows[4]["train/loss_recon"] == "nan"
    parts = rows[6]["train/loss_class"] + 0.0005 * rows[6]["train/loss_recon"]  # the recon weight
    assert rows[6]["train/loss"] == pytest.approx(parts, rel=1e-5)


def test_an_equal_accuracy_later_keeps_the_earlier_best(tmp_path):
    # A rate of 1e-12 leaves the weights (no batch norm: no running statistics) where they were:
    # both epochs score the same, and best.pt stays the first epoch's (only a higher accuracy moves it).
    cfg = tiny(tmp_path, "optim.lr=1e-12", "model.batch_norm=false")
    result = fit(cfg, run_name="ties", echo=quiet)
    accs = [line["test/acc"] for line in logged(result.run_dir) if "test/acc" in line]
    assert len(accs) == 2 and accs[0] == accs[1]
    best = load_checkpoint(result.run_dir / "best.pt")
    assert (result.best_step, best["step"], best["best_step"]) == (6, 6, 6)


def test_best_pt_is_chosen_on_the_validation_split_it_logs(tmp_path):
    from capsnet.evaluate import evaluate, prepare_checkpoint

    result = fit(tiny(tmp_path, "data.val_split=0.25"), run_name="val", echo=quiet)
    lines = [line for line in logged(result.run_dir) if "val/acc" in line]
    assert len(lines) == 2 and not any("test/acc" in line for line in lines)
    accs = [line["val/acc"] for line in lines]
    first_best = lines[accs.index(max(accs))]  # the first step of the highest accuracy
    assert result.best_step == first_best["step"] and result.best_acc == first_best["val/acc"]
    # scored afresh on the held-out images (not the test split), best.pt gives what was logged
    prep = prepare_checkpoint(str(result.run_dir / "best.pt"), split="val")
    assert len(prep.loader.dataset) == 24  # a quarter of the 96 training images
    step = load_checkpoint(result.run_dir / "best.pt")["step"]
    # at the margin of the step that made best.pt's weights (tiny.yaml: loss.margin_steps fixed)
    scored = evaluate(prep.model, prep.loader, prep.cfg, prep.device, step - 1, step)
    assert scored.acc == pytest.approx(result.best_acc)
    assert scored.loss == pytest.approx(first_best["val/loss"], rel=1e-5)


def test_the_logged_training_loss_is_the_mean_of_the_windows_step_losses(tmp_path, monkeypatch):
    real, losses = trainer.compute_loss, {}

    def record(*args, **kwargs):  # compute_loss(out, x, y, model, cfg, step, total_steps)
        loss, parts = real(*args, **kwargs)
        losses[args[5] + 1] = float(loss.detach())  # one micro-batch a step: the loss of the step it makes
        return loss, parts

    monkeypatch.setattr(trainer, "compute_loss", record)
    result = fit(tiny(tmp_path, "train.epochs=1"), run_name="mean", echo=quiet)
    logged_losses = {
        line["step"]: line["train/loss"] for line in logged(result.run_dir) if "train/loss" in line
    }
    assert sorted(logged_losses) == [2, 4, 6]  # logging.log_every: 2
    for step, value in logged_losses.items():
        assert value == pytest.approx((losses[step - 1] + losses[step]) / 2, rel=1e-6), step


@contextlib.contextmanager
def name_held_elsewhere(out_dir: Path, name: str):
    """Another process that has taken run ``name`` of ``out_dir``, as a start does before it makes the
    run's folder; killed when the block ends."""
    import subprocess
    import sys

    code = (
        "import sys, time; from capsnet.runs import claim_run_name; "
        "assert claim_run_name(sys.argv[1], sys.argv[2]) is None; print('held', flush=True); time.sleep(300)"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(out_dir), name], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout.readline().strip() == "held"
        yield proc
    finally:
        proc.kill()
        proc.wait()


def test_a_start_in_the_same_second_as_another_takes_the_next_default_name(tmp_path, monkeypatch):
    """Default names go down to the second: two starts in one second picked the same name, and both
    trained into one folder (doubled metrics, overwritten checkpoints), or one failed."""
    from capsnet import runs

    monkeypatch.setattr(runs, "default_run_name", lambda cfg, prefix: "tiny-now")
    with name_held_elsewhere(tmp_path / "weights", "tiny-now"):
        result = fit(tiny(tmp_path, "train.max_steps=2"), echo=quiet)
    assert result.run_dir.name == "tiny-now-2"
    assert not (tmp_path / "weights" / "tiny-now").exists()
    assert not (tmp_path / "weights" / ".tiny-now-2.lock").exists()  # given up as the run ended


def test_a_run_name_that_another_start_holds_is_refused_until_it_ends(tmp_path):
    with name_held_elsewhere(tmp_path / "weights", "same") as other:
        with pytest.raises(TrainingError, match=f"being started or trained by process {other.pid}"):
            fit(tiny(tmp_path, "train.max_steps=2"), run_name="same", echo=quiet)
        assert not (tmp_path / "weights" / "same").exists()
    result = fit(tiny(tmp_path, "train.max_steps=2"), run_name="same", echo=quiet)
    assert [row["step"] for row in logged(result.run_dir) if "train/loss" in row] == [2]


def test_a_run_continued_in_a_new_folder_shows_its_history_in_tensorboard_too(tmp_path):
    """Its metrics.jsonl starts with the history that led to the checkpoint; its TensorBoard events
    started only after it."""
    import shutil

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    def loss_steps(run: str) -> list[int]:
        events = EventAccumulator(str(tmp_path / "runs" / run), size_guidance={"scalars": 0})
        events.Reload()
        return [e.step for e in events.Scalars("train/loss")]

    first = fit(tiny(tmp_path, "train.max_steps=6"), run_name="base", echo=quiet)
    assert loss_steps("base") == [2, 4, 6]
    # the events of a deleted run of the new name are hidden, not shown beside the history
    stale = fit(tiny(tmp_path, "train.max_steps=4", "train.seed=1"), run_name="cont", echo=quiet)
    shutil.rmtree(stale.run_dir)
    time.sleep(1.1)  # event files are named by the second they were opened
    fit(tiny(tmp_path), resume=str(first.run_dir / "step-000006.pt"), run_name="cont", echo=quiet)
    assert loss_steps("cont") == [2, 4, 6, 8, 10, 12]
    logged_steps = [row["step"] for row in logged(tmp_path / "weights" / "cont") if "train/loss" in row]
    assert logged_steps == [2, 4, 6, 8, 10, 12]
    history = [row["train/loss"] for row in logged(tmp_path / "weights" / "cont") if "train/loss" in row]
    events = EventAccumulator(str(tmp_path / "runs" / "cont"), size_guidance={"scalars": 0})
    events.Reload()
    assert [e.value for e in events.Scalars("train/loss")] == pytest.approx(history)
    # the same start again, over the new folder's checkpoints: the history once, not twice
    time.sleep(1.1)
    fit(
        tiny(tmp_path, "train.max_steps=8"),
        resume=str(first.run_dir / "step-000006.pt"),
        run_name="cont",
        overwrite=True,
        echo=quiet,
    )
    assert loss_steps("cont") == [2, 4, 6, 8]
    # a run folder moved out of logging.out_dir and continued under its own name keeps its own
    # events: the first steps' histograms stay, the scalars are not written twice
    (tmp_path / "backup").mkdir()
    shutil.move(str(first.run_dir), str(tmp_path / "backup" / "base"))
    time.sleep(1.1)
    fit(tiny(tmp_path), resume=str(tmp_path / "backup" / "base"), echo=quiet)
    assert loss_steps("base") == [2, 4, 6, 8, 10, 12]
    events = EventAccumulator(str(tmp_path / "runs" / "base"), size_guidance={"histograms": 0})
    events.Reload()
    assert 4 in [e.step for e in events.Histograms(events.Tags()["histograms"][0])]


def test_a_stop_within_an_epoch_pushes_no_epoch_checkpoint_out_of_logging_keep(tmp_path, monkeypatch):
    """The checkpoint a stop saves within an epoch is interim, as those of logging.save_every are:
    the next epoch's replaces it. It took the place of the oldest epoch checkpoint kept."""
    real, calls = trainer.compute_loss, {"n": 0}

    def interrupt(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 15:  # within epoch 3 (6 steps an epoch)
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)

    monkeypatch.setattr(trainer, "compute_loss", interrupt)
    cfg = tiny(tmp_path, "train.epochs=4", "logging.keep=2")
    with pytest.raises(TrainingInterrupted):
        fit(cfg, run_name="kept", echo=quiet)
    run_dir = tmp_path / "weights" / "kept"
    assert sorted(p.name for p in run_dir.glob("step-*.pt")) == [
        "step-000006.pt",
        "step-000012.pt",
        "step-000015.pt",
    ]
    monkeypatch.setattr(trainer, "compute_loss", real)
    fit(cfg, resume=str(run_dir), echo=quiet)
    assert sorted(p.name for p in run_dir.glob("step-*.pt")) == ["step-000018.pt", "step-000024.pt"]
