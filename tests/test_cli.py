"""End to end through the real CLI: train, eval, export on configs/tiny.yaml; bad configs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import broken_compiler, logged
from typer.testing import CliRunner

from capsnet.checkpoint import load_checkpoint
from capsnet.cli import app

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "configs" / "tiny.yaml")
ROUTING_LAYERS = ("caps1", "caps2", "class")
ROUTING_STATS = ("entropy", "activation_mean", "variance", "active_fraction")

runner = CliRunner()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A fresh directory holding one finished 2-epoch run of configs/tiny.yaml."""
    path = tmp_path_factory.mktemp("cli")
    old = os.getcwd()
    os.chdir(path)
    try:
        result = runner.invoke(app, ["train", "--config", TINY, "--run-name", "tiny-e2e"])
        assert result.exit_code == 0, result.output
        yield path, result
    finally:
        os.chdir(old)


@pytest.fixture
def in_workdir(workdir, monkeypatch):
    monkeypatch.chdir(workdir[0])
    return workdir[0]


def test_train_prints_one_line_per_epoch_and_how_to_evaluate(workdir):
    out = workdir[1].stdout
    epoch_lines = [line for line in out.splitlines() if line.startswith("epoch ")]
    assert len(epoch_lines) == 2
    assert "train/loss" in epoch_lines[0] and "test/acc" in epoch_lines[0]
    assert "best.pt is chosen by test accuracy" in out
    assert "capsnet eval --ckpt" in out


def test_train_writes_config_checkpoints_and_metrics(in_workdir):
    run = in_workdir / "weights" / "em_capsules" / "tiny-e2e"
    names = {p.name for p in run.iterdir()}
    assert {"config.yaml", "last.pt", "best.pt", "metrics.jsonl", "step-000006.pt", "step-000012.pt"} <= names
    assert not [n for n in names if n.endswith(".tmp")]
    lines = logged(run)
    steps = [line["step"] for line in lines]
    assert steps == sorted(set(steps)), "one JSON object per logged step"
    train_steps = [line["step"] for line in lines if "train/loss" in line]
    assert train_steps == [2, 4, 6, 8, 10, 12]
    assert [line["step"] for line in lines if "test/acc" in line] == [6, 12]
    for layer in ROUTING_LAYERS:
        assert all(f"routing/{layer}/entropy" in line for line in lines if "train/loss" in line)


def test_tensorboard_has_every_routing_scalar_once_per_logged_step(in_workdir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(
        str(in_workdir / "runs" / "tiny-e2e"), size_guidance={"scalars": 0, "histograms": 0}
    )
    events.Reload()
    tags = events.Tags()
    for name in ("train/loss", "train/acc", "sched/lr", "sched/margin", "sched/lambda", "perf/img_per_s"):
        assert [e.step for e in events.Scalars(name)] == [2, 4, 6, 8, 10, 12], name
    for layer in ROUTING_LAYERS:
        for stat in ROUTING_STATS:
            assert [e.step for e in events.Scalars(f"routing/{layer}/{stat}")] == [2, 4, 6, 8, 10, 12]
        assert f"routing/{layer}/activation" in tags["histograms"]
    assert [e.step for e in events.Scalars("test/acc")] == [6, 12]
    assert "recon/images" in tags["images"]


def test_eval_latest_prints_accuracy_loss_and_a_per_class_table(in_workdir):
    result = runner.invoke(app, ["eval", "--ckpt", "latest"])
    assert result.exit_code == 0, result.output
    assert "step-000012.pt" in result.stdout
    assert "test: accuracy" in result.stdout and "loss" in result.stdout
    assert all(f"class{i}" in result.stdout for i in range(4))


def test_the_per_class_table_shows_a_dash_for_a_class_without_images():
    from capsnet.evaluate import EvalResult

    result = EvalResult(0.5, 0.5, 2, 1, [1, 0, 0], [1, 1, 0], ["a", "b", "Ankle boot"])
    rows = [line.split() for line in result.table().splitlines()[1:]]
    assert rows == [["a", "1.0000", "1", "1"], ["b", "0.0000", "0", "1"], ["Ankle", "boot", "-", "0", "0"]]


def test_an_evaluation_names_the_folder_its_images_came_from_where_there_is_one():
    from capsnet.evaluate import CheckpointEval, EvalResult

    result = EvalResult(0.5, 0.5, 2, 1, [1, 0], [1, 1], ["a", "b"])
    read = CheckpointEval("c.pt", "r", 4, 1, "test", result, data_source="/data/fashion-mnist")
    assert "test: accuracy 0.5000 (1/2), loss 0.5000, images from /data/fashion-mnist" in read.summary()
    assert read.to_dict()["data_source"] == "/data/fashion-mnist"
    made = CheckpointEval("c.pt", "r", 4, 1, "test", result)
    assert "images from" not in made.summary() and "data_source" not in made.to_dict()


def test_eval_json_parses_and_counts_every_test_image(in_workdir):
    result = runner.invoke(app, ["eval", "--ckpt", "best", "--json", "--batch-size", "5"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["n"] == 32 and sum(report["per_class_total"]) == 32
    assert sum(report["per_class_correct"]) == report["correct"] and report["acc"] == report["correct"] / 32
    assert report["checkpoint"].endswith("best.pt")
    # in batches of 5, the test accuracy training chose best.pt by
    best = load_checkpoint(in_workdir / "weights" / "em_capsules" / "tiny-e2e" / "best.pt")
    assert report["acc"] == pytest.approx(best["best_metric"])


def test_eval_applies_overrides_to_the_checkpoint_config_and_checks_their_keys(in_workdir):
    result = runner.invoke(app, ["eval", "--ckpt", "latest", "--json", "-o", "data.root=elsewhere"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["n"] == 32
    result = runner.invoke(app, ["eval", "--ckpt", "latest", "-o", "data.bogus=1"])
    assert result.exit_code == 2 and "data.bogus" in result.stderr


def test_eval_says_how_far_into_an_epoch_a_mid_epoch_checkpoint_is(tmp_path):
    out = tmp_path / "w"
    args = [
        "train",
        "--config",
        str(TINY),
        "-o",
        f"logging.out_dir={out}",
        "-o",
        f"logging.tb_dir={tmp_path / 'tb'}",
    ]
    assert runner.invoke(app, [*args, "--run-name", "mid", "-o", "train.max_steps=4"]).exit_code == 0
    result = runner.invoke(app, ["eval", "--ckpt", str(out / "mid"), "--out-dir", str(out)])
    assert "step 4, 4 steps into epoch 1)" in result.stdout, result.output
    data = json.loads(runner.invoke(app, ["eval", "--ckpt", str(out / "mid"), "--json"]).stdout)
    assert (data["epoch"], data["mid_epoch_steps"]) == (0, 4)


def test_eval_refuses_overrides_it_would_ignore_or_that_its_own_options_set(in_workdir):
    for args, message in [
        (["-o", "optim.lr=5"], "-o optim.lr: a training setting, which scoring a trained model does not use"),
        (["-o", "logging.out_dir=x"], "-o logging.out_dir: a training setting"),
        (["-o", "train.epochs=3"], "-o train.epochs: a training setting"),
        (["-o", "train.device=cpu"], "-o train.device: give the device as --device"),
        (["-o", "data.root=a", "--data-root", "b"], "-o data.root: --data-root sets it too"),
        (
            ["-o", "train.eval_batch_size=4", "--batch-size", "8"],
            "-o train.eval_batch_size: --batch-size sets",
        ),
        (["-o", "optim={lr: 5}"], "-o optim.lr: a training setting"),
    ]:
        result = runner.invoke(app, ["eval", "--ckpt", "latest", *args])
        assert result.exit_code == 2 and message in result.stderr, (args, result.output)
    kept = runner.invoke(app, ["eval", "--ckpt", "latest", "--json", "-o", "train.eval_batch_size=4"])
    assert kept.exit_code == 0, kept.output
    tb = runner.invoke(app, ["eval", "--ckpt", "latest", "--json", "-o", "logging.tb_dir=elsewhere"])
    assert tb.exit_code == 0, tb.output  # attack and inspect write there without --tb-dir


def test_eval_refuses_overrides_of_the_architecture_the_weights_were_trained_for(in_workdir):
    for setting, shown in [
        ("model.caps_types=[8,8]", "model.caps_types ([4, 4] in the checkpoint, [8, 8] asked)"),
        ("routing.final_lambda=0.5", "routing.final_lambda (0.01 in the checkpoint, 0.5 asked)"),
        ("model.pose_size=3", "model.pose_size (4 in the checkpoint, 3 asked)"),
    ]:
        result = runner.invoke(app, ["eval", "-o", setting])
        assert result.exit_code == 2, result.output
        assert shown in result.stderr and "drop those overrides" in result.stderr, result.stderr
    # the same value as the checkpoint's is no change
    result = runner.invoke(app, ["eval", "--json", "-o", "model.caps_types=[4,4]"])
    assert result.exit_code == 0, result.output


def test_eval_may_score_the_model_with_another_number_of_routing_iterations(in_workdir):
    trained = json.loads(runner.invoke(app, ["eval", "--json"]).stdout)
    assert trained["iterations"] == 2 and "trained_iterations" not in trained
    result = runner.invoke(app, ["eval", "--json", "-o", "model.iterations=1"])
    assert result.exit_code == 0, result.output
    one = json.loads(result.stdout)
    assert one["iterations"] == 1 and one["trained_iterations"] == 2
    assert one["loss"] != trained["loss"]  # the model did route once
    result = runner.invoke(app, ["eval", "-o", "model.iterations=3"])
    assert "routing iterations: 3 (the run was trained with 2)" in result.stdout


def test_eval_of_a_missing_split_is_a_clear_error(in_workdir):
    result = runner.invoke(app, ["eval", "--split", "val"])
    assert result.exit_code == 2 and "no 'val' split" in result.stderr


def test_eval_of_an_unknown_split_is_refused_before_the_data_loads(in_workdir, monkeypatch):
    from capsnet import data

    def no_loading(*args, **kwargs):
        raise AssertionError("the data was loaded")

    monkeypatch.setattr(data, "build_loaders", no_loading)
    result = runner.invoke(app, ["eval", "--split", "tset"])
    assert result.exit_code == 2, result.output
    assert "this run has no 'tset' split (available: test)\n" in result.stderr
    result = runner.invoke(app, ["eval", "--split", "test_familiar"])
    assert result.exit_code == 2, result.output
    assert (
        "no 'test_familiar' split (available: test); test_familiar needs a smallNORB viewpoint split"
        in result.stderr
    )
    result = runner.invoke(app, ["eval", "--split", "val"])
    assert result.exit_code == 2 and result.stdout == "", result.output
    assert "this run has no 'val' split (available: test); val needs data.val_split > 0\n" in result.stderr


def test_eval_of_val_under_settings_that_draw_another_split_is_refused(in_workdir):
    # the run held nothing out; a val split drawn now would hold out images it trained on
    result = runner.invoke(app, ["eval", "--split", "val", "-o", "data.val_split=0.5"])
    assert result.exit_code == 2 and "another held-out set" in result.stderr, result.output
    assert "data.val_split" in result.stderr
    result = runner.invoke(app, ["eval", "--split", "test", "--json", "-o", "data.val_split=0.5"])
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("fmt", ["onnx", "pt2"])
def test_export_writes_the_file_and_reports_parity(in_workdir, fmt):
    result = runner.invoke(app, ["export", "--ckpt", "latest", "--format", fmt])
    assert result.exit_code == 0, result.output
    path = in_workdir / "exports" / "tiny-e2e" / f"model.{fmt}"
    assert path.is_file() and path.stat().st_size > 0
    assert "parity ok" in result.stdout and "synthetic test images" in result.stdout
    # the export says what it is doing before the seconds of tracing, on stderr
    assert f"to {fmt}, then checking it against the eager model on batches of synthetic test images" in (
        result.stderr
    )
    assert (
        "input: images (N, 1, 20, 20) float32: pixels in [0, 1] (uint8 / 255), normalised inside"
        in result.stdout
    )


def test_ctrl_c_inside_an_exporter_that_wraps_it_is_an_interrupt_not_a_failed_export(in_workdir, monkeypatch):
    from capsnet import export

    def interrupted_inside(*args, **kwargs):  # as torch.onnx reports a Ctrl-C in torch.export
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt as e:
            raise RuntimeError("Failed to export the model with torch.export. Next steps:") from e

    monkeypatch.setattr(export, "export_onnx", interrupted_inside)
    out = in_workdir / "interrupted" / "model.onnx"
    result = runner.invoke(app, ["export", "--ckpt", "latest", "--format", "onnx", "--out", str(out)])
    assert result.exit_code == 130 and "interrupted" in result.stderr, result.output
    assert "failed" not in result.stderr
    assert not out.exists() and not list(out.parent.glob(".model.onnx.*"))  # no partial file left


def test_export_of_a_renamed_run_folder_goes_by_the_folder_name(in_workdir, tmp_path):
    import shutil

    renamed = tmp_path / "tiny-renamed"  # its checkpoints still say run "tiny-e2e"
    shutil.copytree(in_workdir / "weights" / "em_capsules" / "tiny-e2e", renamed)
    result = runner.invoke(app, ["export", "--ckpt", str(renamed), "--format", "pt2"])
    assert result.exit_code == 0, result.output
    path = in_workdir / "exports" / "tiny-renamed" / "model.pt2"
    assert path.is_file() and exported_metadata(path)["capsnet.run"] == "tiny-renamed"
    result = runner.invoke(app, ["eval", "--ckpt", str(renamed), "--json"])
    assert json.loads(result.stdout)["run"] == "tiny-renamed"
    with pytest.MonkeyPatch.context() as mp:  # "." from inside the folder names it too
        mp.chdir(renamed)
        assert (
            json.loads(runner.invoke(app, ["eval", "--ckpt", ".", "--json"]).stdout)["run"] == "tiny-renamed"
        )
    # a loose checkpoint file goes by the name it was saved under
    shutil.copyfile(renamed / "last.pt", tmp_path / "model.pt")
    result = runner.invoke(app, ["eval", "--ckpt", str(tmp_path / "model.pt"), "--json"])
    assert json.loads(result.stdout)["run"] == "tiny-e2e"


def test_an_export_name_with_no_suffix_gets_the_formats(in_workdir):
    out = in_workdir / "named" / "model"
    result = runner.invoke(app, ["export", "--ckpt", "latest", "--format", "pt2", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.parent.iterdir()) == ["model.pt2"]
    assert f"{out}.pt2" in result.stdout
    assert exported_metadata(out.parent / "model.pt2")["capsnet.run"] == "tiny-e2e"


def test_export_to_a_place_that_takes_no_files_names_the_file_asked_for(in_workdir):
    result = runner.invoke(app, ["export", "--ckpt", "latest", "--out", "/proc/capsnet-model.onnx"])
    assert result.exit_code == 2, result.output
    assert "error: cannot write /proc/capsnet-model.onnx: " in result.stderr, result.stderr
    assert ".capsnet-model.onnx." not in result.stderr  # not the temporary file beside it
    result = runner.invoke(app, ["export", "--ckpt", "latest", "--out", "/dev/null/sub/model.onnx"])
    assert result.exit_code == 2, result.output
    assert "cannot write /dev/null/sub/model.onnx: cannot make its folder /dev/null/sub" in result.stderr


def exported_metadata(path: Path) -> dict[str, str]:
    if path.suffix == ".pt2":
        from capsnet.export import read_pt2_metadata

        return read_pt2_metadata(path)
    onnx = pytest.importorskip("onnx")
    return {p.key: p.value for p in onnx.load(str(path)).metadata_props}


def exported_runner(path: Path):
    if path.suffix == ".pt2":
        module = torch.export.load(str(path)).module()
        return lambda x: module(x)[0]
    ort = pytest.importorskip("onnxruntime")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return lambda x: torch.from_numpy(session.run(None, {"images": x.numpy()})[0])


@pytest.mark.parametrize("fmt", ["onnx", "pt2"])
def test_the_exported_model_takes_stored_pixels_and_says_so_in_its_metadata(in_workdir, fmt):
    from capsnet.checkpoint import build_model_from_checkpoint, load_checkpoint
    from capsnet.config import config_from_dict
    from capsnet.data import build_datasets

    out = in_workdir / "pixels" / f"m.{fmt}"
    result = runner.invoke(app, ["export", "--ckpt", "latest", "--format", fmt, "--out", str(out)])
    assert result.exit_code == 0, result.output
    meta = exported_metadata(out)
    ckpt_path = in_workdir / "weights" / "em_capsules" / "tiny-e2e" / "last.pt"
    ckpt = load_checkpoint(ckpt_path)
    assert meta["capsnet.inputs"] == "pixels" and "pixels in [0, 1]" in meta["capsnet.input"]
    assert json.loads(meta["capsnet.class_names"]) == ["class0", "class1", "class2", "class3"]
    assert meta["capsnet.run"] == "tiny-e2e" and meta["capsnet.step"] == str(ckpt["step"])
    assert meta["capsnet.outputs"].endswith("poses (N, 4, 4, 4)")
    assert meta["capsnet.resize"] == "none: the images as the dataset stores them"
    # the file alone gives the eager model's activations on the stored uint8 test images / 255
    cfg = config_from_dict(ckpt["config"])
    _, _, test, _ = build_datasets(cfg.data, seed=cfg.train.seed)
    stored = [test.pixels(i) for i in range(len(test))]
    pixels = torch.stack([torch.from_numpy(x.copy()) for x in stored]).float() / 255
    model = build_model_from_checkpoint(ckpt, ckpt_path).eval()
    with torch.no_grad():
        want = model(torch.stack([test.eval_transform(x) for x in stored])).activations
        got = exported_runner(out)(pixels)
        unnormalised = model(pixels).activations
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(unnormalised, want, atol=1e-3)  # the normalisation matters to this model

    normalised = in_workdir / "normalised" / f"m.{fmt}"
    args = ["export", "--ckpt", "latest", "--format", fmt, "--out", str(normalised), "--inputs", "normalised"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "preprocessed by the caller: (p - mean) / std per channel for pixels p in [0, 1]" in result.stdout
    assert exported_metadata(normalised)["capsnet.inputs"] == "normalised"
    with torch.no_grad():
        got = exported_runner(normalised)(torch.stack([test.eval_transform(x) for x in stored]))
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_the_parity_check_covers_the_normalisation_in_the_graph(in_workdir, monkeypatch):
    from dataclasses import replace

    from capsnet import export

    real = export.input_spec
    monkeypatch.setattr(export, "input_spec", lambda *a: replace(real(*a), mean=(0.0,), std=(1.0,)))
    out = in_workdir / "wrong-normalisation" / "m.pt2"
    result = runner.invoke(app, ["export", "--ckpt", "latest", "--format", "pt2", "--out", str(out)])
    assert result.exit_code == 2 and "differs from the eager model" in result.stderr, result.output
    assert not out.exists()


@pytest.mark.parametrize("fmt", ["onnx", "pt2"])
def test_an_export_from_a_test_split_of_one_image_keeps_the_batch_size_dynamic(in_workdir, monkeypatch, fmt):
    from capsnet import export

    real = export.sample_batch

    def one_image(*args):
        pixels, fed, source = real(*args)
        return pixels[:1], fed[:1], source

    monkeypatch.setattr(export, "sample_batch", one_image)
    out = in_workdir / "one-image" / f"m.{fmt}"
    result = runner.invoke(app, ["export", "--ckpt", "latest", "--format", fmt, "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "on batches of 2 and 1 of synthetic test images" in result.stdout
    for n in (1, 5):
        assert exported_runner(out)(torch.rand(n, 1, 20, 20)).shape == (n, 4)


def test_training_into_an_existing_run_without_resume_or_overwrite_fails(in_workdir):
    run = in_workdir / "weights" / "em_capsules" / "tiny-e2e"
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    result = runner.invoke(app, ["train", "--config", TINY, "--run-name", "tiny-e2e"])
    assert result.exit_code == 2
    assert "already exists" in result.stderr and "--resume" in result.stderr
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before  # the run is left as it was


def test_a_run_name_that_leaves_the_weights_folder_is_rejected_and_nothing_is_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["train", "--config", TINY, "--run-name", "../../x"])
    assert result.exit_code == 2 and "invalid run name" in result.stderr
    assert list(tmp_path.iterdir()) == []
    dashed = runner.invoke(app, ["train", "--config", TINY, "--run-name", "-x"])
    assert dashed.exit_code == 2 and "starting with a letter or digit" in dashed.stderr, dashed.output


@pytest.mark.parametrize("name", ["latest", "best"])
def test_a_run_name_that_ckpt_reads_as_the_newest_run_is_rejected_and_nothing_is_written(
    tmp_path, monkeypatch, name
):
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["train", "--config", TINY, "--run-name", name])
    assert result.exit_code == 2, result.output
    assert f"--run-name {name}: 'latest' and 'best' stand for the newest run" in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_bench_reports_throughput_as_json(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = ["bench", "--config", TINY, "--batch-size", "4", "--steps", "1", "--threads", "1", "--json"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["train_img_per_s"] > 0 and report["batch_size"] == 4 and report["image_size"] == 20


def test_bench_takes_batch_threads_device_from_the_config_and_says_what_it_does_not_apply(
    tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    args = ["bench", "--config", TINY, "--steps", "1", "--warmup", "0", "--json"]
    result = runner.invoke(app, [*args, "-o", "train.batch_size=6", "-o", "train.threads=1"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["batch_size"] == 6 and report["threads"] == 1 and report["device"] == "cpu"
    chosen = runner.invoke(app, [*args, "-o", "train.batch_size=6", "--batch-size", "3", "--threads", "1"])
    assert json.loads(chosen.stdout)["batch_size"] == 3  # the option wins
    bf16 = runner.invoke(app, [*args, "-o", "train.batch_size=2", "-o", "train.precision=bf16"])
    assert bf16.exit_code == 0 and "train.precision bf16 is not applied" in bf16.stderr
    if not torch.cuda.is_available():
        cuda = runner.invoke(app, [*args, "-o", "train.device=cuda"])
        assert cuda.exit_code == 2 and "'cuda' was asked for" in cuda.stderr, cuda.output


def test_bench_says_that_it_does_not_compile_the_whole_model(tmp_path, monkeypatch):
    """train.compile: true was ignored without a word: the figures were the eager model's."""
    monkeypatch.chdir(tmp_path)
    args = ["bench", "--config", TINY, "--batch-size", "2", "--steps", "1", "--warmup", "0", "--json"]
    result = runner.invoke(app, [*args, "-o", "train.compile=true", "-o", "model.decoder=false"])
    assert result.exit_code == 0, result.output
    assert "train.compile is not applied" in result.stderr
    plain = runner.invoke(app, [*args, "-o", "model.decoder=false"])
    assert plain.exit_code == 0 and "train.compile" not in plain.stderr


def test_bench_reports_the_mean_beside_the_median_and_its_warmup_and_rejects_bad_options(
    tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    args = ["bench", "--config", TINY, "--batch-size", "4", "--threads", "1", "--json"]
    one = json.loads(runner.invoke(app, [*args, "--steps", "1", "--warmup", "0"]).stdout)
    assert one["warmup"] == 0
    assert one["train_img_per_s_mean"] == pytest.approx(one["train_img_per_s"])  # one step: median = mean
    three = json.loads(runner.invoke(app, [*args, "--steps", "3"]).stdout)
    assert three["warmup"] == 2 and three["infer_img_per_s_mean"] > 0
    bad = runner.invoke(app, [*args, "--allocator", "jemalloc"])
    assert bad.exit_code == 2 and "--allocator: 'jemalloc' is not one of tuned, default" in bad.stderr
    small = runner.invoke(app, [*args, "--image-size", "8"])
    assert small.exit_code == 2 and "8x8 images: caps1" in small.stderr, small.output


def test_bench_picks_its_device_as_training_does_and_rejects_one_it_cannot_use(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = ["bench", "--config", TINY, "--batch-size", "2", "--steps", "1", "--json"]
    for bad in ("tpu", "cpu:1", "cuda:x"):
        unknown = runner.invoke(app, [*args, "--device", bad])
        assert unknown.exit_code == 2 and f"--device: {bad!r} is not one of" in unknown.stderr
    auto = runner.invoke(app, [*args, "--device", "auto"])
    assert auto.exit_code == 0, auto.output
    expected = (
        "cuda" if torch.cuda.is_available() else ("mps" if torch.backends.mps.is_available() else "cpu")
    )
    assert json.loads(auto.stdout)["device"].split(":")[0] == expected
    if not torch.cuda.is_available():
        missing = runner.invoke(app, [*args, "--device", "cuda"])
        assert missing.exit_code == 2 and "--device: 'cuda' was asked for" in missing.stderr
        second = runner.invoke(app, [*args, "--device", "cuda:1"])
        assert second.exit_code == 2 and "--device: 'cuda:1' was asked for" in second.stderr, second.output


def test_bench_auto_prefers_cuda_then_mps_then_the_cpu(monkeypatch):
    from capsnet.bench import _bench_device

    for cuda, mps, expected in [(True, True, "cuda"), (False, True, "mps"), (False, False, "cpu")]:
        monkeypatch.setattr(torch.cuda, "is_available", lambda cuda=cuda: cuda)
        monkeypatch.setattr(torch.backends.mps, "is_available", lambda mps=mps: mps)
        assert _bench_device("auto").type == expected
    assert _bench_device("cpu").type == "cpu"


def test_the_top_level_help_shows_no_value_type_for_help_either():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0 and "--help" in result.stdout and "<bool>" not in result.stdout


def test_counts_in_messages_take_the_nouns_number():
    from capsnet.tracking import counted

    assert [counted(n, "step") for n in (0, 1, 2)] == ["0 steps", "1 step", "2 steps"]
    assert (
        counted(1, "process", "processes") == "1 process"
        and counted(4, "process", "processes") == "4 processes"
    )


def test_cuda_n_picks_one_gpu_for_one_process_and_is_refused_where_it_cannot_be_used(monkeypatch):
    from capsnet.config import ConfigError, load_config
    from capsnet.evaluate import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    current: list[int] = []
    monkeypatch.setattr(torch.cuda, "set_device", current.append)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    assert current == [1]  # the current device too, which pinned memory and other calls use
    assert resolve_device("cuda", local_rank=1, processes=2) == torch.device("cuda", 1)
    for name, said in [
        ("cuda:2", "'cuda:2': this machine has 2 CUDA devices"),
        ("cuda:-1", "'cuda:-1' is not one of auto, cpu, cuda, cuda:N or mps"),
        ("cuda:", "'cuda:' is not one of"),
        ("cpu:0", "'cpu:0' is not one of"),
    ]:
        with pytest.raises(ConfigError, match=said):
            resolve_device(name, option="--device")
    with pytest.raises(ConfigError, match="names one GPU for 2 processes; give cuda"):
        resolve_device("cuda:0", processes=2)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="'cuda:0' was asked for but no CUDA device is available"):
        resolve_device("cuda:0")
    # the config takes the same names as the commands' --device
    assert load_config(TINY, ["train.device=cuda:1"]).train.device == "cuda:1"
    for bad in ("gpu", "cuda:one", "cuda:1:2"):
        with pytest.raises(ConfigError, match=f"train.device: '{bad}' is not one of"):
            load_config(TINY, [f"train.device={bad}"])


def test_a_missing_checkpoint_is_exit_code_2_with_a_one_line_message(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["eval", "--ckpt", "latest"])
    assert result.exit_code == 2 and result.stdout == ""
    assert result.stderr.startswith("error:") and len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.output


@pytest.mark.parametrize(
    "override,key",
    [
        ("train.bogus=1", "train.bogus"),
        ("train.epochs=two", "train.epochs"),
        ("train.batch_size=-4", "train.batch_size"),
        ("data.name=imagenet", "data.name"),
    ],
)
def test_a_bad_config_exits_with_code_2_names_the_key_and_writes_nothing(
    tmp_path, monkeypatch, override, key
):
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["train", "--config", TINY, "-o", override])
    assert result.exit_code == 2
    assert key in result.stderr
    assert "Traceback" not in result.output
    assert list(tmp_path.iterdir()) == []


def test_a_misspelt_key_is_answered_with_the_key_it_resembles(tmp_path, monkeypatch):
    from capsnet.config import ConfigError, load_config

    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as info:
        load_config(None, ["train.epoch=1", "trian.epochs=1", "model.zzz=1"])
    problems = "\n".join(info.value.problems)
    assert "train.epoch: unknown key; did you mean train.epochs?" in problems
    assert "trian: unknown key; did you mean train?" in problems
    assert "model.zzz: unknown key (known:" in problems  # nothing close: no guess
    typo = tmp_path / "typo.yaml"
    typo.write_text("train:\n  batchsize: 8\n")
    result = runner.invoke(app, ["train", "--config", str(typo)])
    assert (
        result.exit_code == 2
        and "train.batchsize: unknown key; did you mean train.batch_size?" in result.stderr
    )


def test_a_mistyped_preset_is_the_only_problem_said_about_the_model(tmp_path, monkeypatch):
    """The sizes a null preset needs are not asked for when the preset is not null but mistyped."""
    monkeypatch.chdir(tmp_path)
    big = tmp_path / "big.yaml"
    big.write_text("model: {preset: big}\n")
    result = runner.invoke(app, ["train", "--config", str(big)])
    assert result.exit_code == 2 and "model.preset: 'big' is not one of: null, paper, small" in result.stderr
    assert [line for line in result.stderr.splitlines() if "model." in line] == [
        "  model.preset: 'big' is not one of: null, paper, small"
    ]
    result = runner.invoke(
        app, ["train", "--config", TINY, "-o", "model.preset=null", "-o", "model.caps_types=null"]
    )
    assert (
        result.exit_code == 2 and "model.caps_types: must be given when model.preset is null" in result.stderr
    )


def test_a_bad_yaml_file_names_the_unknown_key(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  epochs: 1\n  bach_size: 8\n")
    result = runner.invoke(app, ["train", "--config", str(bad)])
    assert result.exit_code == 2 and "train.bach_size: unknown key" in result.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["bad.yaml"]


def test_debug_shows_the_traceback(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["eval", "--ckpt", "latest", "--debug"])
    # the error itself propagates (exit 1 with its traceback), not the one-line exit 2
    assert result.exit_code == 1 and not isinstance(result.exception, SystemExit), result.exception
    assert type(result.exception).__name__ == "CheckpointError"
    plain = runner.invoke(app, ["eval", "--ckpt", "latest"])
    assert plain.exit_code == 2 and isinstance(plain.exception, SystemExit)


def test_every_command_help_explains_its_options():
    for command, options in {
        "train": ["--config", "--override", "--resume", "--run-name", "--overwrite", "--debug"],
        "eval": ["--ckpt", "--split", "--batch-size", "--json", "--data-root"],
        "export": ["--ckpt", "--format", "--out"],
        "average": ["--ckpt", "--last", "--out", "--overwrite", "--out-dir", "--json"],
        "config": ["--config", "--override", "--changed", "--plain"],
        "runs": ["--out-dir", "--json"],
        "predict": ["--ckpt", "--top", "--invert", "--mirror", "--json", "--csv", "--batch-size", "--device"],
        "bench": [
            "--config",
            "--override",
            "--batch-size",
            "--steps",
            "--image-size",
            "--classes",
            "--threads",
        ],
    }.items():
        result = runner.invoke(app, [command, "--help"])
        assert result.exit_code == 0
        for option in options:
            assert option in result.stdout, (command, option)
        # flags show no value to give, -o the form of its value
        shown = [line for line in result.stdout.splitlines() if "<bool>" in line]
        assert not shown, (command, shown)
        if "--override" in options:
            assert "KEY=VALUE" in result.stdout, command


@pytest.mark.parametrize(
    "command",
    ["train", "config", "runs", "eval", "average", "predict", "export", "bench", "attack", "inspect"],
)
def test_help_in_an_80_column_terminal_cuts_no_word_short(command):
    result = runner.invoke(app, [command, "--help"], env={"COLUMNS": "80"})
    assert result.exit_code == 0
    cut = [line for line in result.stdout.splitlines() if "…" in line]
    assert not cut, cut


def test_train_resume_help_names_every_form_of_checkpoint_that_eval_ckpt_names():
    """--resume takes what --ckpt takes (a run name too), resolved under logging.out_dir."""
    import re

    for command, option in [("train", "--resume"), ("eval", "--ckpt")]:
        result = runner.invoke(app, [command, "--help"], env={"COLUMNS": "200"})
        text = re.sub(r"[\s│]+", " ", result.stdout)
        shown = text[text.index(f" {option} ") :]
        for form in ("'latest'", "'best'", "a run directory", "a .pt file", "a run name under"):
            assert form in shown[:400], (command, form)


def test_python_dash_m_capsnet_help_works():
    result = subprocess.run(
        [sys.executable, "-m", "capsnet", "--help"],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stderr
    assert all(command in result.stdout for command in ("train", "eval", "export", "bench"))


def test_compiled_routing_without_a_working_compiler_is_a_one_line_error(monkeypatch):
    from capsnet import routing

    monkeypatch.setattr(routing, "_kernel", broken_compiler)
    routing._check_kernels.cache_clear()
    try:
        cmd = [
            "bench",
            "--config",
            TINY,
            "--steps",
            "1",
            "--batch-size",
            "2",
            "-o",
            "train.compile_routing=true",
        ]
        result = runner.invoke(app, cmd)
    finally:
        routing._check_kernels.cache_clear()
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("error: train.compile_routing: torch.compile could not build the routing")
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "CppCompileError: g++: not found" in result.stderr and "more lines" not in result.stderr
    assert result.stdout == "" and "Traceback" not in result.output
    assert not routing.compiled_kernels_enabled()


def test_export_replaces_a_file_only_when_asked_and_only_with_an_export_that_passed(in_workdir, monkeypatch):
    from capsnet import export

    out = in_workdir / "replace" / "m.onnx"
    first = runner.invoke(app, ["export", "--ckpt", "latest", "--out", str(out)])
    assert first.exit_code == 0, first.output
    before = out.read_bytes()
    again = runner.invoke(app, ["export", "--ckpt", "latest", "--out", str(out)])
    assert again.exit_code == 2 and f"{out} already exists; --overwrite replaces it" in again.stderr
    monkeypatch.setattr(export, "TOLERANCE", 1e-30)  # any difference at all now fails the parity check
    failed = runner.invoke(app, ["export", "--ckpt", "latest", "--out", str(out), "--overwrite"])
    assert failed.exit_code == 2 and f"nothing was written; {out} is as it was" in failed.stderr
    assert out.read_bytes() == before
    assert sorted(p.name for p in out.parent.iterdir()) == ["m.onnx"]  # no partial file left
    monkeypatch.undo()
    replaced = runner.invoke(app, ["export", "--ckpt", "latest", "--out", str(out), "--overwrite"])
    assert replaced.exit_code == 0, replaced.output
    assert sorted(p.name for p in out.parent.iterdir()) == ["m.onnx"]
    mask = os.umask(0)
    os.umask(mask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~mask  # an ordinary file, not a private temporary one
    folder = runner.invoke(app, ["export", "--ckpt", "latest", "--out", str(out.parent), "--overwrite"])
    assert folder.exit_code == 2 and f"--out {out.parent} is a folder: give a file name" in folder.stderr


def test_a_failed_or_stopped_export_leaves_no_folder_it_made(in_workdir, monkeypatch):
    from capsnet import export

    kept = in_workdir / "kept"
    kept.mkdir()
    out = kept / "new" / "deeper" / "m.onnx"
    monkeypatch.setattr(export, "TOLERANCE", 1e-30)  # the parity check fails
    failed = runner.invoke(app, ["export", "--ckpt", "latest", "--out", str(out)])
    assert failed.exit_code == 2 and "nothing was written" in failed.stderr
    assert list(kept.iterdir()) == []  # new/deeper, made for the file, are gone; kept/ was there before
    monkeypatch.undo()

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(export, "export_onnx", stopped)
    with pytest.raises(KeyboardInterrupt):
        export.export_checkpoint("latest", "onnx", out=out)
    assert list(kept.iterdir()) == []
    monkeypatch.undo()
    done = runner.invoke(app, ["export", "--ckpt", "latest", "--out", str(out)])
    assert done.exit_code == 0 and out.is_file(), done.output


def test_export_refuses_an_out_without_suffix_whose_suffixed_name_is_a_folder_before_exporting(
    in_workdir, monkeypatch
):
    from capsnet import export

    (in_workdir / "suffixless" / "model.onnx").mkdir(parents=True)
    monkeypatch.setattr(export, "export_onnx", lambda *a, **k: pytest.fail("exported to a folder's name"))
    for extra in ([], ["--overwrite"]):
        refused = runner.invoke(app, ["export", "--ckpt", "latest", "--out", "suffixless/model", *extra])
        assert refused.exit_code == 2
        assert refused.stderr.strip() == (
            "error: --out suffixless/model.onnx is a folder: give a file name, "
            "such as suffixless/model.onnx/model.onnx"
        )


def test_attack_step_size_help_says_it_is_in_the_units_of_eps_not_a_multiple_of_it():
    """BIM's --step-size is used as given (pixel units, or standard deviations on smallNORB)."""
    import re

    result = runner.invoke(app, ["attack", "--help"], env={"COLUMNS": "200"})
    text = re.sub(r"[\s│]+", " ", result.stdout)
    assert "in the units of --eps (not a multiple of eps" in text
    assert "in eps units" not in text


def test_a_run_on_a_separate_test_folder_is_scored_without_its_training_folder(tmp_path, monkeypatch):
    """The checkpoint's classes and normalisation stand in for the training images: eval and
    export of the test split work where the training folder is gone, with the same scores."""
    import shutil

    from test_predict import folder_settings

    monkeypatch.chdir(tmp_path)
    overrides = [*folder_settings(tmp_path, "RGB"), "train.max_steps=2", "data.val_split=0"]
    trained = runner.invoke(
        app, ["train", "--config", TINY, "--run-name", "pets", *[a for o in overrides for a in ("-o", o)]]
    )
    assert trained.exit_code == 0, trained.output
    # scored as before: a checkpoint that records no class names takes them from the training folder
    ckpt = torch.load(tmp_path / "weights" / "em_capsules" / "pets" / "last.pt", weights_only=True)
    del ckpt["data_info"]["class_names"]
    torch.save(ckpt, tmp_path / "nameless.pt")
    before = runner.invoke(app, ["eval", "--ckpt", str(tmp_path / "nameless.pt"), "--json"])
    assert before.exit_code == 0, before.output
    shutil.rmtree(tmp_path / "train")
    after = runner.invoke(app, ["eval", "--ckpt", "pets", "--json"])
    assert after.exit_code == 0, after.output
    scored, scored_before = json.loads(after.stdout), json.loads(before.stdout)
    for key in ("loss", "acc", "n", "per_class_correct", "per_class_total", "class_names"):
        assert scored[key] == scored_before[key], key
    assert scored["n"] == 6
    nameless = runner.invoke(app, ["eval", "--ckpt", str(tmp_path / "nameless.pt")])
    assert nameless.exit_code == 2 and "data.train_dir" in nameless.stderr  # its classes were there
    exported = runner.invoke(app, ["export", "--ckpt", "pets", "--format", "pt2"])
    assert exported.exit_code == 0 and "of folder test images" in exported.stdout, exported.output
    # the validation split is carved from the training images, which it still needs
    val = runner.invoke(app, ["eval", "--ckpt", "pets", "--split", "val"])
    assert val.exit_code == 2


def test_version_names_capsnet_torch_and_python():
    import sys

    import torch

    from capsnet import __version__

    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == (
        f"capsnet {__version__} (torch {torch.__version__}, Python {sys.version.split()[0]})"
    )


def test_a_folder_setting_that_names_a_file_says_so(tmp_path):
    (tmp_path / "afile").write_text("")
    for out_dir, said in (
        (tmp_path / "afile", "it is a file, where a folder is needed"),
        (tmp_path / "afile" / "sub", "a part of that path is a file, where a folder is needed"),
    ):
        result = runner.invoke(
            app, ["train", "--config", TINY, "--run-name", "x", "-o", f"logging.out_dir={out_dir}"]
        )
        assert result.exit_code == 2, result.output
        assert f"error: could not use {out_dir}: {said}" in result.output


@pytest.mark.parametrize(
    "failure",
    [
        lambda: torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB"),
        lambda: RuntimeError(
            "[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: you "
            "tried to allocate 160000000000 bytes. Error code 12 (Cannot allocate memory)"
        ),
    ],
    ids=["cuda", "cpu"],
)
def test_running_out_of_memory_is_said_with_what_to_change(monkeypatch, failure):
    from capsnet import bench

    def out_of_memory(*args, **kwargs):
        raise failure()

    monkeypatch.setattr(bench, "_run", out_of_memory)
    result = runner.invoke(app, ["bench", "--config", TINY, "--steps", "1", "--batch-size", "4"])
    assert result.exit_code == 2, result.output
    assert result.output.startswith("error: not enough memory: ") and "smaller batch" in result.output
    assert "alloc_cpu.cpp" not in result.output and "unexpected" not in result.output


def test_output_that_cannot_be_written_is_one_error_line_and_a_run_goes_on(monkeypatch, tmp_path, capsys):
    """stdout on a full disk: a command's last output is said as an error, not a traceback; training's
    lines move to stderr, and the run finishes."""
    import errno

    import typer

    from capsnet import cli

    real_echo = typer.echo

    def full_stdout(message=None, file=None, nl=True, err=False, color=None):
        if not err and file is None:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_echo(message, file=file, nl=nl, err=err, color=color)

    monkeypatch.setattr(typer, "echo", full_stdout)
    exits = []

    def leave(code):
        exits.append(code)
        raise SystemExit(code)

    monkeypatch.setattr(cli.os, "_exit", leave)
    monkeypatch.setattr(sys, "argv", ["capsnet", "config"])
    with pytest.raises(SystemExit):
        cli.main()
    assert exits == [2]
    assert capsys.readouterr().err == "error: could not write the output: No space left on device\n"

    echo = cli._console_echo()
    with open(tmp_path / "stdout", "w") as out:  # a file of its own to close
        monkeypatch.setattr(sys, "stdout", out)
        echo("first line")
        echo("second line")
    err = capsys.readouterr().err.splitlines()
    assert err == [
        "warning: could not write to standard output (No space left on device): the rest goes to standard error",
        "first line",
        "second line",
    ]


@pytest.mark.parametrize("command", ["eval", "bench", "export", "predict", "attack"])
def test_a_batch_size_beyond_what_torch_takes_is_refused_as_the_options(command):
    args = [command, "--batch-size", str(2**31)] + (["x.png"] if command == "predict" else [])
    args += ["--config", TINY] if command == "bench" else []
    result = runner.invoke(app, args)
    assert result.exit_code == 2 and "--batch-size" in result.output and "2,147,483,647" in result.output
    assert "eval_batch_size" not in result.output
