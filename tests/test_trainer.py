"""The training loop: exact resume, non-finite steps, signals, run directories, torchrun."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import torch
from helpers import TINY, logged, record_kernel_choice, tiny
from torch import Tensor

from capsnet import trainer
from capsnet.checkpoint import load_checkpoint
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


def test_compiled_routing_trains_like_the_eager_one_and_is_switched_off_after(
    tmp_path, straight, monkeypatch
):
    from capsnet import routing

    seen = record_kernel_choice(monkeypatch)
    result = fit(tiny(tmp_path, "train.compile_routing=true"), run_name="compiled", echo=quiet)
    assert seen and all(seen) and not routing.compiled_kernels_enabled()
    a = {line["step"]: line.get("train/loss") for line in logged(straight.run_dir)}
    b = {line["step"]: line.get("train/loss") for line in logged(result.run_dir)}
    assert a.keys() == b.keys()
    for step, loss in a.items():
        if loss is not None:
            assert b[step] == pytest.approx(loss, rel=1e-4)


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


def test_init_from_starts_a_new_run_from_another_runs_weights(tmp_path, straight):
    source = straight.run_dir / "last.pt"
    cfg = tiny(tmp_path, f"train.init_from={source}", "train.max_steps=1", "optim.lr=1e-12")
    result = fit(cfg, run_name="init", echo=quiet)
    assert result.step == 1  # a fresh optimiser and step count, not a resume
    want, got = load_checkpoint(source)["model"], load_checkpoint(result.run_dir / "last.pt")["model"]
    params = [k for k in want if "running" not in k and "num_batches" not in k]
    assert params
    for k in params:
        torch.testing.assert_close(got[k], want[k], atol=1e-6, rtol=0)


def test_init_from_a_checkpoint_of_another_architecture_is_a_clear_error(tmp_path, straight):
    from capsnet.checkpoint import CheckpointError

    cfg = tiny(tmp_path, f"train.init_from={straight.run_dir / 'last.pt'}", "model.iterations=3")
    with pytest.raises(CheckpointError, match="iterations"):
        fit(cfg, run_name="other", echo=quiet)


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
