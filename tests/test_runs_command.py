"""capsnet runs: the runs of a weights folder, the newest first, with how far each got."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch
import yaml
from helpers import logged, other_process, tiny, trained_by
from typer.testing import CliRunner

from capsnet.checkpoint import (
    _preset_of,
    latest_run,
    load_checkpoint,
    process_start,
    read_run_record,
    run_summaries,
    write_run_record,
)
from capsnet.cli import app
from capsnet.model import CapsNet
from capsnet.trainer import fit

runner = CliRunner()


def stamp(run_dir: Path, when: float) -> None:
    write_run_record(run_dir)
    record = read_run_record(run_dir)
    record["updated"] = when
    (run_dir / "run.json").write_text(json.dumps(record))


def test_runs_are_listed_newest_first_with_how_far_they_got(tmp_path):
    fit(tiny(tmp_path, "train.max_steps=3"), run_name="short", echo=lambda _msg: None)
    fit(tiny(tmp_path, "train.epochs=1", "model.caps_types=[4, 6]"), run_name="whole", echo=lambda _msg: None)
    weights = tmp_path / "weights"
    broken = weights / "broken"
    broken.mkdir()
    (broken / "last.pt").write_bytes(b"not a checkpoint")
    (weights / "notes").mkdir()  # no checkpoint: not a run
    stamp(weights / "short", 3_000.0)
    stamp(weights / "whole", 2_000.0)
    stamp(broken, 1_000.0)

    rows = run_summaries(weights)
    assert [row["run"] for row in rows] == ["short", "whole", "broken"]
    short, whole, bad = rows
    assert (short["step"], short["total_steps"], short["finished"]) == (3, 3, True)
    assert (whole["step"], whole["total_steps"], whole["epoch"], whole["epochs"]) == (6, 6, 1, 1)
    ckpt = load_checkpoint(weights / "whole" / "last.pt")
    assert whole["parameters"] == CapsNet(**ckpt["arch"]).num_parameters() != short["parameters"]
    assert whole["best"] == ckpt["best_metric"] and whole["best_split"] == "test"  # tiny holds out no val
    assert whole["data"] == "synthetic" and whole["preset"] is None and whole["iterations"] == 2
    assert "error" in bad and "not a readable checkpoint" in bad["error"]

    table = runner.invoke(app, ["runs", "--out-dir", str(weights)])
    assert table.exit_code == 0, table.output
    lines = table.stdout.splitlines()
    assert lines[0] == f"3 runs in {weights}, the newest first:"
    assert lines[1].split() == ["run", "updated", "data", "model", "steps", "best"]
    assert lines[2].startswith("short ") and " 3/3 done " in lines[2]
    assert f"custom, {whole['parameters']:,} parameters" in lines[3]
    assert f"test/acc {whole['best']:.4f} (step {whole['best_step']})" in lines[3]
    assert lines[4].startswith("broken ") and "unreadable: " in lines[4]
    listed = runner.invoke(app, ["runs", "--out-dir", str(weights), "--json"])
    assert listed.exit_code == 0 and json.loads(listed.stdout) == json.loads(json.dumps(rows))


def test_a_stopped_run_shows_its_steps_of_the_planned_total(tmp_path):
    fit(tiny(tmp_path, "train.epochs=3"), run_name="planned", echo=lambda _msg: None)
    run = tmp_path / "weights" / "planned"
    # tiny.yaml keeps two step files (12 and 18): as if the run stopped after its save at step 12
    for step_file in sorted(run.glob("step-*.pt"))[1:]:
        step_file.unlink()
    first = min(run.glob("step-*.pt"))
    (run / "last.pt").write_bytes(first.read_bytes())
    [row] = run_summaries(tmp_path / "weights")
    assert (row["step"], row["total_steps"], row["epoch"], row["finished"]) == (12, 18, 2, False)
    table = runner.invoke(app, ["runs", "--out-dir", str(tmp_path / "weights")])
    assert table.exit_code == 0, table.output
    [line] = [line for line in table.stdout.splitlines() if line.startswith("planned ")]
    assert " 12/18 " in line and "done" not in line and "running" not in line


def test_the_preset_is_named_only_where_the_model_has_its_sizes():
    small = {"stem_channels": [64], "primary_types": 8, "caps_types": [16, 16]}
    assert _preset_of(small, "small") == "small"
    assert _preset_of({**small, "stem_channels": (64, 64, 64)}, "small") is None  # a deeper stem
    assert _preset_of(small, None) is None and _preset_of(small, "paper") is None


@pytest.mark.parametrize(
    ("model", "shown"),
    [
        ({"preset": "small"}, "small"),
        ({"preset": "small", "stem_channels": [64], "caps_types": [16, 16]}, "small"),
        ({"preset": "small", "stem_channels": [64, 64, 64]}, None),  # a deeper stem
        ({"preset": "paper", "primary_types": 8}, None),
        ({"preset": None, "stem_channels": [64], "primary_types": 8, "caps_types": [16, 16]}, None),
    ],
)
def test_a_run_with_no_checkpoint_yet_names_its_preset_only_where_its_config_keeps_the_sizes(
    tmp_path, model, shown
):
    run = tmp_path / "young"
    run.mkdir()
    write_run_record(run, run="young", step=0)
    sizes = {"stem_channels": None, "primary_types": None, "caps_types": None}
    (run / "config.yaml").write_text(yaml.safe_dump({"model": {**sizes, **model}, "data": {"name": "x"}}))
    [row] = run_summaries(tmp_path)
    assert row["checkpoint"] is None and row["preset"] == shown


def test_an_empty_folder_is_a_one_line_error_and_an_empty_json_list(tmp_path):
    result = runner.invoke(app, ["runs", "--out-dir", str(tmp_path)])
    assert result.exit_code == 2 and result.stdout == ""
    assert result.stderr.startswith(f"error: no runs with checkpoints in {tmp_path}"), result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    listed = runner.invoke(app, ["runs", "--out-dir", str(tmp_path), "--json"])
    assert listed.exit_code == 0 and json.loads(listed.stdout) == []


def test_json_says_a_missing_folder_or_a_run_folder_is_wrong_rather_than_listing_nothing(tmp_path):
    missing = runner.invoke(app, ["runs", "--out-dir", str(tmp_path / "missing"), "--json"])
    assert missing.exit_code == 2 and missing.stdout == ""
    assert missing.stderr.startswith(
        f"error: no runs with checkpoints in {tmp_path / 'missing'} (no such folder)"
    )
    fit(tiny(tmp_path, "train.max_steps=1"), run_name="one", echo=lambda _msg: None)
    run = runner.invoke(app, ["runs", "--out-dir", str(tmp_path / "weights" / "one"), "--json"])
    assert run.exit_code == 2 and run.stdout == "" and "is a run folder" in run.stderr
    listed = runner.invoke(app, ["runs", "--out-dir", str(tmp_path / "weights"), "--json"])
    assert listed.exit_code == 0 and [row["run"] for row in json.loads(listed.stdout)] == ["one"]


def test_a_run_folder_given_as_the_folder_of_runs_points_to_the_folder_above_it(tmp_path):
    fit(tiny(tmp_path, "train.max_steps=1"), run_name="one", echo=lambda _msg: None)
    result = runner.invoke(app, ["runs", "--out-dir", str(tmp_path / "weights" / "one")])
    assert result.exit_code == 2 and result.stderr.strip().endswith(f"--out-dir {tmp_path / 'weights'}")
    assert "is a run folder" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_odd_run_folders_are_rows_of_the_table_not_a_traceback(tmp_path):
    """Times that are no date (NaN, beyond any calendar, text in last.pt), a step that is no number
    and weights that are no mapping: the others are listed as usual, the damaged ones as unreadable."""
    fit(tiny(tmp_path, "train.max_steps=1"), run_name="good", echo=lambda _msg: None)
    weights = tmp_path / "weights"

    def copy(name: str, change=None) -> Path:
        run = weights / name
        shutil.copytree(weights / "good", run)
        for path in run.glob("*.pt") if change else []:
            ckpt = torch.load(path, weights_only=True)
            change(ckpt)
            torch.save(ckpt, path)
        return run

    (copy("nan") / "run.json").write_text('{"updated": NaN}')
    (copy("far") / "run.json").write_text('{"updated": 1e300}')
    (copy("textual", lambda c: c.update(time="yesterday")) / "run.json").unlink()
    copy("stepless", lambda c: c.update(step="abc"))
    copy("weightless", lambda c: c.update(model="weights"))

    table = runner.invoke(app, ["runs", "--out-dir", str(weights)])
    assert table.exit_code == 0, table.output
    rows = {line.split()[0]: line for line in table.stdout.splitlines()[2:]}
    assert sorted(rows) == ["far", "good", "nan", "stepless", "textual", "weightless"]
    for name in ("nan", "far", "textual"):
        assert " 1/1 done " in rows[name], rows[name]
    assert rows["far"].split()[1] == "-" and rows["textual"].split()[1] == "-"
    assert "unreadable: " in rows["stepless"] and "(step 'abc')" in rows["stepless"]
    assert "unreadable: " in rows["weightless"] and "weights are not a mapping" in rows["weightless"]
    listed = runner.invoke(app, ["runs", "--out-dir", str(weights), "--json"])
    assert listed.exit_code == 0 and len(json.loads(listed.stdout)) == 6
    # the run --ckpt latest takes is found among them too
    assert latest_run(weights).name == "far"
    weightless = runner.invoke(app, ["eval", "--ckpt", str(weights / "weightless")])
    assert weightless.exit_code == 2 and weightless.stderr.startswith("error: "), weightless.output


def test_the_first_run_listed_is_the_one_latest_takes_when_two_were_saved_at_once(tmp_path):
    fit(tiny(tmp_path, "train.max_steps=1"), run_name="a", echo=lambda _msg: None)
    weights = tmp_path / "weights"
    shutil.copytree(weights / "a", weights / "b")  # a copied run keeps its run.json's time
    rows = run_summaries(weights)
    assert [row["run"] for row in rows] == [latest_run(weights).name, "a"] == ["b", "a"]


def test_a_run_with_no_checkpoint_yet_is_listed_after_the_saved_ones(tmp_path):
    """A run in its first epoch has run.json, config.yaml and logged steps but no checkpoint: it is
    shown below the table (which stays the runs --ckpt latest can take), with its logged step."""
    fit(tiny(tmp_path, "train.max_steps=1"), run_name="saved", echo=lambda _msg: None)
    fit(tiny(tmp_path, "train.epochs=2", "logging.log_every=2"), run_name="young", echo=lambda _msg: None)
    weights = tmp_path / "weights"
    for path in (weights / "young").glob("*.pt"):  # as it was before its first save
        path.unlink()
    metrics = weights / "young" / "metrics.jsonl"  # ... after step 6 of its 12, before run.json says more
    metrics.write_text("".join(f"{json.dumps(e)}\n" for e in logged(weights / "young") if e["step"] <= 6))
    write_run_record(weights / "young", step=0)
    stamp(weights / "saved", 1_000.0)  # the older of the two: the waiting run is still listed last
    (weights / "opened").mkdir()
    write_run_record(weights / "opened", run="opened", step=0)  # stopped before it logged a step
    stamp(weights / "opened", 2_000.0)
    os.utime(metrics, (3_000.0, 3_000.0))  # young's last activity: its last logged step
    stamp(weights / "young", 500.0)
    (weights / "notes").mkdir()  # neither a checkpoint nor run.json: not a run

    rows = run_summaries(weights)
    assert rows[0]["run"] == "saved" == latest_run(weights).name
    assert [row["run"] for row in rows[1:]] == ["young", "opened"]  # the most recently active first
    waiting = {row["run"]: row for row in rows[1:]}
    young = waiting["young"]
    assert young["checkpoint"] is None and not young["finished"] and young["parameters"] is None
    assert young["step"] == logged(weights / "young")[-1]["step"] == 6 and young["total_steps"] == 12
    assert young["updated"] == 3_000.0
    # a crash while writing its next line leaves it cut short: the last whole line still counts
    whole = metrics.read_text()
    metrics.write_text(whole + '{"step": 8, "train/loss": 0.5, "train/a')
    os.utime(metrics, (3_000.0, 3_000.0))
    cut = {row["run"]: row for row in run_summaries(weights)}["young"]
    assert (cut["step"], cut["updated"]) == (6, 3_000.0)
    metrics.write_text(whole)
    os.utime(metrics, (3_000.0, 3_000.0))
    assert (young["data"], young["epochs"], young["iterations"]) == ("synthetic", 2, 2)
    opened = waiting["opened"]
    assert (opened["step"], opened["total_steps"], opened["data"]) == (0, None, None)

    table = runner.invoke(app, ["runs", "--out-dir", str(weights)])
    assert table.exit_code == 0, table.output
    lines = table.stdout.splitlines()
    assert lines[0] == f"1 run in {weights}, the newest first:" and lines[2].startswith("saved ")
    assert lines[3].startswith(f"Also started in {weights}, with no checkpoint yet")
    assert [line.split()[0] for line in lines[4:]] == ["young", "opened"]
    assert " step 6/12 logged  (synthetic, custom)" in lines[4]
    listed = runner.invoke(app, ["runs", "--out-dir", str(weights), "--json"])
    assert listed.exit_code == 0 and json.loads(listed.stdout) == json.loads(json.dumps(rows))

    # with no saved run at all, the listing still shows them, and --ckpt latest says why it finds none
    shutil.rmtree(weights / "saved")
    only = runner.invoke(app, ["runs", "--out-dir", str(weights)])
    assert only.exit_code == 0 and only.stdout.startswith(f"Started in {weights}, with no checkpoint yet")
    latest = runner.invoke(app, ["eval", "--ckpt", "latest", "--out-dir", str(weights)])
    assert latest.exit_code == 2 and "opened, young have started but saved none yet" in latest.stderr
    assert "still in its first epoch" in latest.stderr and "stopped before its first save" in latest.stderr
    # a run whose process has ended stopped before its first save; one whose process runs is in its first epoch
    named = runner.invoke(app, ["eval", "--ckpt", "young", "--out-dir", str(weights)])
    assert named.exit_code == 2 and "the run stopped before its first save; the command that" in named.stderr
    with other_process() as alive:
        trained_by(weights / "young", alive.pid)
        named = runner.invoke(app, ["eval", "--ckpt", "young", "--out-dir", str(weights)])
        assert (
            named.exit_code == 2
            and f"still in its first epoch, trained by process {alive.pid}" in named.stderr
        )
    # given as the folder of runs, a run folder with no checkpoint yet is still said to be a run folder
    inside = runner.invoke(app, ["runs", "--out-dir", str(weights / "young")])
    assert inside.exit_code == 2 and "is a run folder" in inside.stderr


def test_a_run_saving_its_first_checkpoint_during_the_listing_is_listed_once(tmp_path, monkeypatch):
    from capsnet import checkpoint

    fit(tiny(tmp_path, "train.max_steps=1"), run_name="old", echo=lambda _msg: None)
    fit(tiny(tmp_path, "train.max_steps=1"), run_name="young", echo=lambda _msg: None)
    weights = tmp_path / "weights"
    saved = (weights / "young" / "last.pt").read_bytes()
    for path in (weights / "young").glob("*.pt"):
        path.unlink()
    real = checkpoint.load_checkpoint

    def load_while_young_saves(path, *args, **kwargs):
        (weights / "young" / "last.pt").write_bytes(saved)  # its first save, while "old" is read
        return real(path, *args, **kwargs)

    monkeypatch.setattr(checkpoint, "load_checkpoint", load_while_young_saves)
    assert sorted(row["run"] for row in run_summaries(weights)) == ["old", "young"]


def test_a_folder_that_cannot_be_read_is_left_out_of_the_listing(tmp_path, monkeypatch):
    """As lost+found on a disk of its own: listing it fails (no permission), the runs beside it are listed."""
    from capsnet import checkpoint

    fit(tiny(tmp_path, "train.max_steps=1"), run_name="good", echo=lambda _msg: None)
    weights = tmp_path / "weights"
    (weights / "lost+found").mkdir()
    real = checkpoint.step_checkpoints

    def no_permission(run_dir):
        if Path(run_dir).name == "lost+found":
            raise PermissionError(13, "Permission denied", str(run_dir))
        return real(run_dir)

    monkeypatch.setattr(checkpoint, "step_checkpoints", no_permission)
    assert [row["run"] for row in run_summaries(weights)] == ["good"] == [latest_run(weights).name]
    table = runner.invoke(app, ["runs", "--out-dir", str(weights)])
    assert table.exit_code == 0 and table.stdout.splitlines()[2].startswith("good ")


def test_the_listing_says_which_runs_are_still_being_trained_on_this_machine(tmp_path):
    """run.json names the training process and its host: while that process runs, the table says so
    (a saved run that is not done, a run with no checkpoint yet with its process id)."""
    fit(tiny(tmp_path, "train.epochs=2"), run_name="saved", echo=lambda _msg: None)
    fit(tiny(tmp_path, "train.epochs=2"), run_name="young", echo=lambda _msg: None)
    weights = tmp_path / "weights"
    for path in (weights / "young").glob("*.pt"):
        path.unlink()
    for path in (weights / "saved").glob("*.pt"):  # the first epoch's save only: 6 of 12 steps
        if path.name != "step-000006.pt":
            path.unlink()
    record = read_run_record(weights / "saved")  # as training leaves it: this process, ended
    assert record["pid"] == os.getpid() and isinstance(record["ended"], float)
    if sys.platform.startswith("linux"):  # with when the process started, from /proc
        assert record["pid_start"] == process_start(os.getpid()) is not None
    # the last training lines: the time left is the remaining steps at that speed (16 images a step)
    speed = {
        "saved": ({"step": 6, "train/images_seen": 96, "perf/img_per_s": 0.8}, {"step": 6, "test/acc": 0.5}),
        "young": ({"step": 4, "train/images_seen": 64, "perf/img_per_s": 2.0},),
    }
    with other_process() as alive:
        for name in ("saved", "young"):
            trained_by(weights / name, alive.pid)
            (weights / name / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in speed[name]))
        rows = {row["run"]: row for row in run_summaries(weights)}
        assert (rows["saved"]["running"], rows["young"]["running"]) == (True, True)
        assert rows["young"]["process"] == alive.pid
        assert (rows["saved"]["seconds_left"], rows["young"]["seconds_left"]) == (120.0, 64.0)
        lines = runner.invoke(app, ["runs", "--out-dir", str(weights)]).stdout.splitlines()
        [saved] = [line for line in lines if line.startswith("saved ")]
        [young] = [line for line in lines if line.startswith("  young ")]
        assert " 6/12 running, 2 min left " in saved  # its last logged step is its last save's
        assert young.endswith(f"  running (process {alive.pid}, 1 min left)")
    rows = {row["run"]: row for row in run_summaries(weights)}
    assert (rows["saved"]["running"], rows["young"]["process"], rows["young"]["seconds_left"]) == (
        False,
        None,
        None,
    )
    lines = runner.invoke(app, ["runs", "--out-dir", str(weights)]).stdout.splitlines()
    assert any(line.startswith("  young ") and line.endswith("  not running") for line in lines)
    assert not any("running" in line for line in lines if line.startswith("saved "))
    # on another machine, or with no process recorded, nothing is said
    trained_by(weights / "young", alive.pid, host="elsewhere")
    record = read_run_record(weights / "saved")
    del record["pid"]
    (weights / "saved" / "run.json").write_text(json.dumps(record))
    rows = {row["run"]: row for row in run_summaries(weights)}
    assert (rows["saved"]["running"], rows["young"]["running"]) == (None, None)
    lines = runner.invoke(app, ["runs", "--out-dir", str(weights)]).stdout.splitlines()
    [young] = [line for line in lines if line.startswith("  young ")]
    assert young.endswith("logged  (synthetic, custom)") and not any("running" in line for line in lines)


def test_a_finished_run_resumed_for_more_steps_is_shown_running_with_its_new_plan(tmp_path):
    fit(tiny(tmp_path, "train.max_steps=2"), run_name="more", echo=lambda _msg: None)
    run_dir = tmp_path / "weights" / "more"
    assert run_summaries(tmp_path / "weights")[0]["finished"]
    lines = [{"step": 4, "train/images_seen": 64, "perf/img_per_s": 16.0}]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in lines))
    with other_process() as alive:
        trained_by(run_dir, alive.pid, total_steps=40)  # resumed with train.max_steps=40, no save yet
        [row] = run_summaries(tmp_path / "weights")
        assert (row["step"], row["total_steps"], row["finished"], row["seconds_left"]) == (2, 40, False, 36.0)
        assert row["logged_step"] == 4
        table = runner.invoke(app, ["runs", "--out-dir", str(tmp_path / "weights")]).stdout
        assert " 4/40 running (saved at step 2), 1 min left " in table, table
        assert "done" not in table.splitlines()[2]


def test_the_time_left_reads_in_hours_and_minutes():
    from capsnet.checkpoint import _duration

    assert [_duration(t) for t in (20, 31, 420, 3_599, 3_600, 7_290)] == [
        "under a minute",
        "1 min",
        "7 min",
        "1 h 00 min",
        "1 h 00 min",
        "2 h 02 min",
    ]
