"""capsnet average: the mean of the weights of a run's last checkpoints, saved as a checkpoint."""

from __future__ import annotations

import json
import math

import pytest
import torch
from helpers import tiny
from typer.testing import CliRunner

from capsnet.averaging import _load_kept, average_run
from capsnet.checkpoint import CheckpointError, atomic_save, discard_after, load_checkpoint
from capsnet.cli import app
from capsnet.evaluate import evaluate, prepare_checkpoint
from capsnet.runs import TrainingError
from capsnet.trainer import fit

runner = CliRunner()


def quiet(_msg: str) -> None:
    pass


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A finished run of configs/tiny.yaml: 4 epochs of 3 steps, each epoch's checkpoint kept."""
    root = tmp_path_factory.mktemp("average")
    cfg = tiny(root, "data.train_size=48", "train.epochs=4", "logging.keep=4")
    result = fit(cfg, run_name="kept4", echo=quiet)
    names = sorted(p.name for p in result.run_dir.glob("step-*.pt"))
    assert names == ["step-000003.pt", "step-000006.pt", "step-000009.pt", "step-000012.pt"]
    return result.run_dir


def weights(run_dir, step):
    return load_checkpoint(run_dir / f"step-{step:06d}.pt")["model"]


def test_the_average_is_the_mean_of_the_newest_checkpoints_weights(run, tmp_path):
    report = average_run(str(run), last=3, out=tmp_path / "avg.pt")
    assert report.steps == [6, 9, 12] and report.epochs == [2, 3, 4] and not report.replaced
    ckpt = load_checkpoint(tmp_path / "avg.pt")
    parts = [weights(run, s) for s in (6, 9, 12)]
    assert ckpt["model"].keys() == parts[0].keys()
    moved = 0
    for name, value in ckpt["model"].items():
        if value.is_floating_point():
            expected = sum(p[name].double() for p in parts) / 3
            torch.testing.assert_close(value, expected.to(value.dtype), rtol=1e-6, atol=1e-7)
            moved += not torch.equal(value, parts[-1][name])
        else:
            assert torch.equal(value, parts[-1][name])
    assert moved > 0  # the checkpoints differ, so the mean is not just the newest one
    newest = load_checkpoint(run / "step-000012.pt")
    assert ckpt["step"] == 12 and ckpt["arch"] == newest["arch"] and ckpt["config"] == newest["config"]
    assert ckpt["averaged"] == {
        "files": ["step-000006.pt", "step-000009.pt", "step-000012.pt"],
        "steps": [6, 9, 12],
        "epochs": [2, 3, 4],
    }
    for key in ("optimizer", "rng", "best_metric"):
        assert key in newest and key not in ckpt


def test_by_default_every_kept_checkpoint_is_averaged_into_the_run_folder(run):
    report = average_run(str(run))
    assert report.steps == [3, 6, 9, 12]
    assert report.path == run / "average-000003-000012.pt" and report.path.is_file()
    try:
        # the average is none of the run's own checkpoints: "latest" still means step 12
        for spec in ([str(run)], ["latest", "--out-dir", str(run.parent)]):
            out = runner.invoke(app, ["eval", "--ckpt", *spec, "--json"])
            assert out.exit_code == 0, out.output
            assert json.loads(out.stdout)["checkpoint"].endswith("step-000012.pt")
        listing = runner.invoke(app, ["runs", "--out-dir", str(run.parent), "--json"])
        assert [row["run"] for row in json.loads(listing.stdout)] == ["kept4"]
    finally:
        report.path.unlink()


def test_a_file_of_the_run_averages_the_steps_up_to_its_own(run, tmp_path):
    report = average_run(str(run / "step-000009.pt"), last=2, out=tmp_path / "to9.pt")
    assert report.steps == [6, 9]
    copied = copy_of_run(run, tmp_path)
    (copied / "best.pt").write_bytes((copied / "step-000006.pt").read_bytes())
    report = average_run(str(copied / "best.pt"), out=tmp_path / "best-avg.pt")
    assert report.steps == [3, 6]
    linked = tmp_path / "link.pt"
    linked.symlink_to(run / "step-000012.pt")
    report = average_run(str(linked), last=2, out=tmp_path / "linked.pt")
    assert report.steps == [9, 12] and report.run_dir == run.resolve()


def test_the_command_writes_it_and_eval_scores_it_as_an_average(run, tmp_path):
    out_file = tmp_path / "mean.pt"
    result = runner.invoke(app, ["average", "--ckpt", str(run), "--last", "2", "--out", str(out_file)])
    assert result.exit_code == 0, result.output
    assert f"wrote {out_file}" in result.stdout and "steps 9, 12" in result.stdout
    assert f"capsnet eval --ckpt {out_file}" in result.stdout

    scored = runner.invoke(app, ["eval", "--ckpt", str(out_file), "--json"])
    assert scored.exit_code == 0, scored.output
    data = json.loads(scored.stdout)
    assert data["averaged_steps"] == [9, 12] and data["step"] == 12
    # the accuracy is that of a model holding the mean weights
    prep = prepare_checkpoint(str(run / "step-000012.pt"), split="test")
    mean = {k: (weights(run, 9)[k].double() + weights(run, 12)[k].double()) / 2 for k in weights(run, 12)}
    prep.model.load_state_dict({k: v.float() for k, v in mean.items()})
    direct = evaluate(prep.model, prep.loader, prep.cfg, prep.device)
    assert data["acc"] == pytest.approx(direct.acc) and data["loss"] == pytest.approx(direct.loss, rel=1e-5)

    text = runner.invoke(app, ["eval", "--ckpt", str(out_file)])
    assert "the mean of the weights at steps 9, 12; after epoch 4" in text.stdout

    # predict names it as eval does, in its header and in its JSON
    from PIL import Image

    image = tmp_path / "grey.png"
    Image.new("L", (20, 20), 128).save(image)
    said = runner.invoke(app, ["predict", str(image), "--ckpt", str(out_file)])
    assert said.exit_code == 0, said.output
    assert said.stdout.startswith(f"{out_file} (run kept4, the mean of the weights at steps 9, 12, 4 classes")
    said = runner.invoke(app, ["predict", str(image), "--ckpt", str(out_file), "--json"])
    assert json.loads(said.stdout)["averaged_steps"] == [9, 12]

    listed = runner.invoke(app, ["average", "--ckpt", str(run), "--json", "--out", str(tmp_path / "j.pt")])
    assert json.loads(listed.stdout)["steps"] == [3, 6, 9, 12]


def test_an_existing_file_is_replaced_only_with_overwrite(run, tmp_path):
    target = tmp_path / "avg.pt"
    target.write_bytes(b"keep me")
    args = ["average", "--ckpt", str(run), "--out", str(target)]
    refused = runner.invoke(app, args)
    assert refused.exit_code == 2 and f"{target} already exists; --overwrite replaces it" in refused.output
    assert target.read_bytes() == b"keep me"
    replaced = runner.invoke(app, [*args, "--overwrite"])
    assert replaced.exit_code == 0, replaced.output
    assert replaced.stdout.startswith(f"replaced {target}")
    assert load_checkpoint(target)["averaged"]["steps"] == [3, 6, 9, 12]


@pytest.mark.parametrize(
    ("out", "said"),
    [
        ("{run}/last.pt", "names of a run's own checkpoints"),
        ("{run}/step-000012.pt", "names of a run's own checkpoints"),
        ("{tmp}/best.pt", "names of a run's own checkpoints"),
        ("{tmp}/step-000099.pt", "names of a run's own checkpoints"),
        ("{tmp}", "is a folder: give a file name"),
        ("{tmp}/avg.onnx", "a checkpoint's name ends in .pt"),
    ],
)
def test_an_output_name_that_would_harm_the_run_or_mislead_is_refused(run, tmp_path, out, said):
    before = (run / "last.pt").read_bytes()
    result = runner.invoke(
        app, ["average", "--ckpt", str(run), "--overwrite", "--out", out.format(run=run, tmp=tmp_path)]
    )
    assert result.exit_code == 2 and said in result.output
    assert (run / "last.pt").read_bytes() == before
    assert not (tmp_path / "avg.onnx").exists() and not list(tmp_path.glob("*.pt"))


def test_too_few_kept_checkpoints_say_what_would_give_more(run, tmp_path):
    result = runner.invoke(app, ["average", "--ckpt", str(run), "--last", "5"])
    assert result.exit_code == 2
    assert "keeps 4 checkpoints from the end of an epoch up to step 12" in result.output
    assert "give --last 4, or train with logging.keep set higher" in result.output
    oldest = runner.invoke(app, ["average", "--ckpt", str(run / "step-000003.pt")])
    assert (
        oldest.exit_code == 2 and "keeps 1 checkpoint from the end of an epoch up to step 3" in oldest.output
    )
    assert "name a later checkpoint of the run, or the run itself" in oldest.output
    assert "logging.keep" not in oldest.output
    alone = tmp_path / "alone"
    alone.mkdir()
    (alone / "step-000012.pt").write_bytes((run / "step-000012.pt").read_bytes())
    with pytest.raises(CheckpointError, match="keeps 1 checkpoint .*train with logging.keep set higher"):
        average_run(str(alone))
    with pytest.raises(CheckpointError, match="--last 1: an average needs at least 2"):
        average_run(str(run), last=1)
    assert runner.invoke(app, ["average", "--ckpt", str(run), "--last", "1"]).exit_code == 2


def test_a_run_stopped_in_its_first_epoch_is_told_to_train_on_not_to_keep_more(tmp_path):
    stopped = fit(tiny(tmp_path, "train.max_steps=4", "logging.keep=4"), run_name="early", echo=quiet)
    assert stopped.step == 4 and load_checkpoint(stopped.run_dir / "last.pt")["batches_done"] == 4
    result = runner.invoke(app, ["average", "--ckpt", str(stopped.run_dir)])
    assert result.exit_code == 2
    assert "keeps 0 checkpoints from the end of an epoch up to step 4" in result.output
    assert "and 1 checkpoint saved within an epoch, which it leaves out" in result.output
    assert "no epoch of the run had ended by step 4; train it on past the end of an epoch" in result.output
    assert f"capsnet train --resume {stopped.run_dir}" in result.output
    assert "logging.keep" not in result.output


def test_a_file_outside_a_run_folder_is_refused_with_what_to_give(run, tmp_path):
    loose = tmp_path / "final.pt"
    loose.write_bytes((run / "step-000012.pt").read_bytes())
    result = runner.invoke(app, ["average", "--ckpt", str(loose)])
    assert result.exit_code == 2
    assert f"{loose} is not in a run folder" in result.output and "give the run" in result.output


def test_checkpoints_saved_within_an_epoch_are_left_out_unless_named(run, tmp_path):
    copied = copy_of_run(run, tmp_path)
    ckpt = load_checkpoint(copied / "step-000012.pt")
    ckpt.update(step=13, batches_done=1)
    atomic_save(ckpt, copied / "step-000013.pt")
    report = average_run(str(copied), last=2, out=tmp_path / "ends.pt")
    assert report.steps == [9, 12] and report.mid_epoch_left_out == [13]
    assert "left out: step 13, saved within an epoch" in report.summary()
    assert "(steps 9, 12: the ends of epochs 3-4)" in report.summary()
    named = average_run(str(copied / "step-000013.pt"), last=2, out=tmp_path / "named.pt")
    assert named.steps == [12, 13] and named.mid_epoch_left_out == []
    assert "(steps 12, 13: the end of epoch 4 and 1 step into epoch 5)" in named.summary()
    # last.pt (or best.pt) saved with it names it too
    atomic_save(ckpt, copied / "last.pt")
    named = average_run(str(copied / "last.pt"), last=2, out=tmp_path / "named-last.pt")
    assert named.steps == [12, 13] and named.mid_epoch_left_out == []
    # but the run itself, or latest, leaves it out
    assert average_run(str(copied), last=2, out=tmp_path / "run.pt").mid_epoch_left_out == [13]


def test_the_moving_average_of_a_run_with_ema_is_what_is_averaged(tmp_path):
    cfg = tiny(tmp_path, "data.train_size=48", "train.ema=0.8")
    run_dir = fit(cfg, run_name="ema", echo=quiet).run_dir
    report = average_run(str(run_dir), out=tmp_path / "ema-avg.pt")
    assert report.steps == [3, 6]
    ckpt = load_checkpoint(report.path)
    assert "train_model" not in ckpt
    parts = [load_checkpoint(run_dir / f"step-{s:06d}.pt") for s in (3, 6)]
    assert ckpt["model"].keys() == parts[0]["model"].keys()
    unlike_trained = 0
    for name, value in ckpt["model"].items():
        if not value.is_floating_point():
            assert torch.equal(value, parts[1]["model"][name]), name
            continue
        expected = (parts[0]["model"][name].double() + parts[1]["model"][name].double()) / 2
        torch.testing.assert_close(value, expected.to(value.dtype), msg=name)
        trained = (parts[0]["train_model"][name].double() + parts[1]["train_model"][name].double()) / 2
        unlike_trained += not torch.allclose(value, trained.to(value.dtype))
    assert unlike_trained > 0  # the trained weights' mean would differ: the moving average's is the one kept


def test_resuming_the_run_from_an_earlier_step_removes_the_averages_past_it(run, tmp_path):
    copied = copy_of_run(run, tmp_path)
    past = average_run(str(copied)).path
    before = average_run(str(copied / "step-000006.pt")).path
    assert (past.name, before.name) == ("average-000003-000012.pt", "average-000003-000006.pt")
    removed = discard_after(copied, 6)
    assert past in removed and not past.exists() and before.exists()


def test_a_checkpoint_pruned_while_it_is_read_says_why(tmp_path):
    with pytest.raises(CheckpointError, match="removed while it was read: the run is still being trained"):
        _load_kept(tmp_path / "step-000003.pt")


def copy_of_run(run, tmp_path):
    copied = tmp_path / "copy"
    copied.mkdir()
    for path in run.glob("step-*.pt"):
        (copied / path.name).write_bytes(path.read_bytes())
    return copied


def test_checkpoints_of_another_model_or_with_non_finite_weights_are_refused(run, tmp_path):
    copied = copy_of_run(run, tmp_path)
    ckpt = load_checkpoint(copied / "step-000009.pt")
    ckpt["arch"]["caps_types"] = [4, 8]
    atomic_save(ckpt, copied / "step-000009.pt")
    with pytest.raises(CheckpointError, match="step-000009.pt"):
        average_run(str(copied), last=2, out=tmp_path / "a.pt")
    average_run(str(copied / "step-000006.pt"), last=2, out=tmp_path / "b.pt")  # the steps before it

    ckpt = load_checkpoint(copied / "step-000006.pt")
    name = next(k for k, v in ckpt["model"].items() if v.is_floating_point())
    ckpt["model"][name].view(-1)[0] = math.nan
    atomic_save(ckpt, copied / "step-000006.pt")
    with pytest.raises(CheckpointError, match=f"average of {name} is not finite"):
        average_run(str(copied / "step-000006.pt"), last=2, out=tmp_path / "c.pt")
    assert not (tmp_path / "a.pt").exists() and not (tmp_path / "c.pt").exists()


def test_a_run_starts_from_an_average_but_cannot_resume_it(run, tmp_path):
    average = average_run(str(run), last=2, out=tmp_path / "avg.pt").path
    with pytest.raises(TrainingError, match="train.init_from"):
        fit(tiny(tmp_path), resume=str(average), echo=quiet)
    said: list[str] = []
    started = fit(
        tiny(tmp_path, f"train.init_from={average}", "train.max_steps=1"),
        run_name="from-avg",
        echo=said.append,
    )
    assert started.step == 1
    assert any(f"model weights from {average}" in line for line in said)
