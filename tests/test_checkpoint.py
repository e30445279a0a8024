"""Checkpoints: atomic saves, safe loading, latest/best resolution, clear errors."""

from __future__ import annotations

import errno
import json
import os
import random
import time

import numpy as np
import pytest
import torch

from capsnet.checkpoint import (
    CHECKPOINT_FORMAT,
    CheckpointError,
    atomic_save,
    capture_rng,
    check_architecture,
    load_checkpoint,
    resolve_checkpoint,
    restore_rng,
    save_checkpoint,
    step_checkpoints,
    validate_run_name,
    write_run_record,
)
from capsnet.config import ConfigError, load_config, read_yaml


def fake_checkpoint(step: int, run: str = "run", epoch: int = 0) -> dict:
    return {
        "format": CHECKPOINT_FORMAT,
        "model": {"w": torch.full((2,), float(step))},
        "step": step,
        "epoch": epoch,
        "config": {},
        "arch": {"caps_types": [4, 4]},
        "run": run,
        "time": time.time(),
    }


def test_a_saved_checkpoint_loads_back_with_the_same_tensors(tmp_path):
    atomic_save(fake_checkpoint(7), tmp_path / "a.pt")
    ckpt = load_checkpoint(tmp_path / "a.pt")
    assert ckpt["step"] == 7 and torch.equal(ckpt["model"]["w"], torch.full((2,), 7.0))


def test_a_full_disk_leaves_no_temp_file_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    atomic_save(fake_checkpoint(1), path)

    def no_space(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(CheckpointError) as info:
        atomic_save(fake_checkpoint(2), path)
    monkeypatch.undo()
    assert str(path) in str(info.value) and "no space left" in str(info.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]
    assert load_checkpoint(path)["step"] == 1


class _WritesMarker:
    """Unpickling this calls open(marker, "w"): harmless, but visible."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_loading_refuses_a_pickle_that_would_run_code(tmp_path):
    path, marker = tmp_path / "evil.pt", tmp_path / "marker"
    torch.save({**fake_checkpoint(1), "payload": _WritesMarker(marker)}, path)
    with pytest.raises(CheckpointError, match="refusing to load"):
        load_checkpoint(path)
    assert not marker.exists()


def test_a_yaml_config_with_a_python_object_tag_is_rejected(tmp_path):
    marker = tmp_path / "marker"
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"train:\n  epochs: !!python/object/apply:builtins.open ['{marker}', 'w']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    assert not marker.exists()


@pytest.mark.parametrize("keep", [0.0, 0.01, 0.1, 0.5, 0.99])
def test_a_truncated_file_gives_a_short_clear_error(tmp_path, keep):
    path = tmp_path / "cut.pt"
    atomic_save({**fake_checkpoint(3), "big": torch.arange(20000.0)}, path)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    message = str(info.value)
    assert str(path) in message and "corrupt or truncated" in message and len(message.splitlines()) <= 2
    # the reason torch gives, not the paragraph of advice it adds, which the message already says
    assert len(message) < len(str(path)) + 160, message
    if keep == 0.0:
        assert message.endswith("the file is empty"), message


def test_a_corrupt_checkpoint_names_the_newest_intact_one_beside_it(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    for step in (4, 8, 12, 16):
        atomic_save({**fake_checkpoint(step), "big": torch.arange(5000.0)}, run / f"step-{step:06d}.pt")
    for step in (12, 16):  # the two newest cut short, as by a full disk
        path = run / f"step-{step:06d}.pt"
        path.write_bytes(path.read_bytes()[:3000])
    (run / "last.pt").write_bytes((run / "step-000016.pt").read_bytes())
    for bad in ("step-000016.pt", "last.pt"):
        with pytest.raises(CheckpointError) as info:
            load_checkpoint(run / bad)
        message = str(info.value)
        assert "corrupt or truncated" in message
        assert message.endswith(
            f"the newest intact checkpoint beside it is {run / 'step-000008.pt'}: give that path instead"
        )
    assert load_checkpoint(run / "step-000008.pt")["step"] == 8  # the one it names loads
    alone = tmp_path / "alone.pt"  # nothing intact beside it: no advice
    alone.write_bytes((run / "step-000016.pt").read_bytes())
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(alone)
    assert "corrupt or truncated" in str(info.value) and "intact" not in str(info.value)


def test_a_corrupt_newest_step_file_names_an_intact_last_pt_of_the_same_step(tmp_path):
    """last.pt is written after each step file: where the newest step file is cut short later, an
    intact last.pt holds that step, and the advice named an older step file instead (resuming from
    it deletes last.pt and retrains the steps since)."""
    run = tmp_path / "run"
    run.mkdir()
    for step in (6, 12):
        atomic_save({**fake_checkpoint(step), "big": torch.arange(5000.0)}, run / f"step-{step:06d}.pt")
    (run / "last.pt").write_bytes((run / "step-000012.pt").read_bytes())
    newest = run / "step-000012.pt"
    newest.write_bytes(newest.read_bytes()[:3000])
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(newest)
    assert str(info.value).endswith(
        f"the newest intact checkpoint beside it is {run / 'last.pt'}: give that path instead"
    )
    (run / "last.pt").write_bytes((run / "step-000006.pt").read_bytes())  # a last.pt no newer: the step file
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(newest)
    assert str(info.value).endswith(f"beside it is {run / 'step-000006.pt'}: give that path instead")


def test_a_missing_file_and_a_file_that_is_no_checkpoint_are_clear_errors(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "nope.pt")
    (tmp_path / "text.pt").write_text("root:x:0:0:root:/root:/bin/bash\n")
    with pytest.raises(CheckpointError, match=r"text\.pt is not a readable checkpoint: it is neither a zip"):
        load_checkpoint(tmp_path / "text.pt")
    torch.save({"hello": 1}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a capsnet checkpoint"):
        load_checkpoint(tmp_path / "other.pt")


def test_no_runs_at_all_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="no runs with checkpoints"):
        resolve_checkpoint("latest", tmp_path / "weights")


def test_save_keeps_the_newest_step_files_plus_last_and_best(tmp_path):
    run = tmp_path / "r"
    for step in (1, 2, 3, 4):
        save_checkpoint(run, fake_checkpoint(step), keep=2, is_best=step == 2)
    assert [s for s, _ in step_checkpoints(run)] == [3, 4]
    assert load_checkpoint(run / "last.pt")["step"] == 4
    assert load_checkpoint(run / "best.pt")["step"] == 2


def test_latest_is_the_highest_step_of_the_most_recently_updated_run_not_the_newest_file(tmp_path):
    out = tmp_path / "weights"
    for step in (10, 20):
        save_checkpoint(out / "old", fake_checkpoint(step, "old"), keep=5)
    time.sleep(0.01)
    for step in (5, 15):
        save_checkpoint(out / "new", fake_checkpoint(step, "new"), keep=5, is_best=step == 5)
    # The lower step file of the newest run is touched last: file times must not matter.
    os.utime(out / "new" / "step-000005.pt", (time.time() + 100, time.time() + 100))
    assert resolve_checkpoint("latest", out) == out / "new" / "step-000015.pt"
    assert resolve_checkpoint("best", out) == out / "new" / "best.pt"
    assert resolve_checkpoint(str(out / "old"), out) == out / "old" / "step-000020.pt"
    assert resolve_checkpoint("old", out) == out / "old" / "step-000020.pt"
    # a run name with a trailing slash, or a file inside a run, under the folder of runs
    assert resolve_checkpoint("old/", out) == out / "old" / "step-000020.pt"
    assert resolve_checkpoint("old/step-000010.pt", out) == out / "old" / "step-000010.pt"
    assert resolve_checkpoint("new/best.pt", out) == out / "new" / "best.pt"
    # Resuming the old run makes it the latest one.
    write_run_record(out / "old", step=20)
    assert resolve_checkpoint("latest", out) == out / "old" / "step-000020.pt"


def test_best_without_a_best_file_and_an_unknown_spec_are_clear_errors(tmp_path):
    out = tmp_path / "weights"
    save_checkpoint(out / "r", fake_checkpoint(1), keep=1)
    with pytest.raises(CheckpointError, match="no best.pt"):
        resolve_checkpoint("best", out)
    with pytest.raises(CheckpointError, match="checkpoint not found") as e:
        resolve_checkpoint("does-not-exist", out)
    assert str(e.value).endswith(f"or the name of a run in {out}: r)")
    with pytest.raises(CheckpointError, match=r"which holds no runs\)$"):
        resolve_checkpoint("r", tmp_path / "empty")
    for spec in ("../weights/r", "r/../r"):  # never out of the folder of runs by way of ".."
        with pytest.raises(CheckpointError, match="checkpoint not found"):
            resolve_checkpoint(spec, out)


@pytest.mark.parametrize("suffix", [".onnx", ".pt2"])
def test_an_exported_model_given_as_a_checkpoint_is_named_as_such(tmp_path, suffix):
    import zipfile

    path = tmp_path / f"model{suffix}"
    if suffix == ".pt2":  # an archive, as torch.export writes one
        with zipfile.ZipFile(path, "w") as archive:
            archive.writestr("model/archive_format", "pt2")
    else:
        path.write_bytes(b"\x08\x07\x12\x07pytorch")  # the start of an ONNX protobuf
    with pytest.raises(CheckpointError, match="is an exported model, not a checkpoint") as e:
        load_checkpoint(path)
    assert ("onnxruntime" if suffix == ".onnx" else "torch.export.load") in str(e.value)


@pytest.mark.parametrize("name", ["../up", "a/b", "", ".hidden", "x\\y", "a..b"])
def test_run_names_with_path_tricks_are_rejected(name):
    with pytest.raises(CheckpointError, match="invalid run name"):
        validate_run_name(name)


def test_an_architecture_mismatch_names_the_config_key():
    with pytest.raises(CheckpointError, match=r"model\.caps_types: \[4, 4\] in the checkpoint, \[8, 8\] now"):
        check_architecture({"caps_types": [4, 4]}, {"caps_types": [8, 8]}, "x.pt")
    check_architecture({"recompute_votes": False}, {"recompute_votes": True}, "x.pt")  # runtime only


def test_rng_states_survive_a_weights_only_round_trip(tmp_path):
    gen = torch.Generator().manual_seed(3)
    atomic_save({**fake_checkpoint(1), "rng": capture_rng(gen)}, tmp_path / "r.pt")
    expected = (random.random(), np.random.rand(), torch.rand(1).item(), torch.rand(1, generator=gen).item())
    restore_rng(load_checkpoint(tmp_path / "r.pt")["rng"], gen)
    assert (
        random.random(),
        np.random.rand(),
        torch.rand(1).item(),
        torch.rand(1, generator=gen).item(),
    ) == expected


def test_run_record_is_plain_json(tmp_path):
    save_checkpoint(tmp_path / "r", fake_checkpoint(4), keep=1)
    record = json.loads((tmp_path / "r" / "run.json").read_text())
    assert record["step"] == 4 and record["updated"] >= record["started"]


def test_the_default_export_path_cannot_leave_the_exports_folder(tmp_path):
    from capsnet.export import default_export_path

    assert default_export_path("run-1", "onnx", tmp_path) == tmp_path / "run-1" / "model.onnx"
    for name in ("../../x", "/etc", "a/../../b"):
        with pytest.raises(CheckpointError, match="invalid run name"):
            default_export_path(name, "onnx", tmp_path)


def test_a_checkpoint_from_a_newer_format_is_refused_with_a_clear_error(tmp_path):
    ckpt = fake_checkpoint(3)
    ckpt["format"] = CHECKPOINT_FORMAT + 1
    atomic_save(ckpt, tmp_path / "new.pt")
    with pytest.raises(CheckpointError, match="newer capsnet"):
        load_checkpoint(tmp_path / "new.pt")


def test_a_checkpoint_whose_format_is_not_a_number_is_refused_with_a_clear_error(tmp_path):
    ckpt = fake_checkpoint(3)
    ckpt["format"] = "2"
    atomic_save(ckpt, tmp_path / "odd.pt")
    with pytest.raises(CheckpointError, match="not a capsnet checkpoint.*'2'"):
        load_checkpoint(tmp_path / "odd.pt")


def test_a_bad_stored_configuration_names_the_checkpoint_and_bad_overrides_do_not(tmp_path):
    from capsnet.config import stored_config

    assert stored_config({"train": {"epochs": 3}}, tmp_path / "a.pt").train.epochs == 3
    with pytest.raises(ConfigError, match=r"train\.newkey.*in the configuration stored in .*a\.pt"):
        stored_config({"train": {"newkey": 1}}, tmp_path / "a.pt")
    with pytest.raises(ConfigError, match="not a mapping"):
        stored_config([1, 2], tmp_path / "a.pt")
    with pytest.raises(ConfigError) as info:
        stored_config({"train": {"epochs": 3}}, tmp_path / "a.pt", ["train.newkey=1"])
    assert "newkey" in str(info.value) and "stored in" not in str(info.value)


def test_a_format_1_checkpoint_loads_unless_it_learned_beta_a_in_the_old_logit_units(tmp_path):
    old = fake_checkpoint(3)
    old["format"] = 1
    atomic_save(old, tmp_path / "plain.pt")
    assert load_checkpoint(tmp_path / "plain.pt")["step"] == 3
    old["arch"] = {"caps_types": [4, 4], "beta_a_logit": True}
    atomic_save(old, tmp_path / "logit.pt")
    with pytest.raises(CheckpointError, match="beta_a_logit.*retrain"):
        load_checkpoint(tmp_path / "logit.pt")
    current = fake_checkpoint(3)
    current["arch"] = {"caps_types": [4, 4], "beta_a_logit": True}
    atomic_save(current, tmp_path / "current.pt")
    assert load_checkpoint(tmp_path / "current.pt")["arch"]["beta_a_logit"] is True


def test_a_yaml_key_given_twice_is_an_error_but_a_merge_key_may_be_overridden(tmp_path):
    twice = tmp_path / "twice.yaml"
    twice.write_text("train:\n  epochs: 1\ntrain:\n  epochs: 9\n")
    with pytest.raises(ConfigError, match=r"line 3, column 1 \(key 'train' given twice, first at line 1\)"):
        load_config(twice)
    merged = tmp_path / "merged.yaml"  # "<<" copies the anchor's keys; a key after it replaces one
    merged.write_text("a: &x {epochs: 1, batch_size: 8}\nb:\n  <<: *x\n  epochs: 3\n")
    assert read_yaml(merged)["b"] == {"epochs": 3, "batch_size": 8}


def test_a_resume_with_more_processes_gives_each_rank_its_own_loader_stream(tmp_path):
    """A checkpoint of one process resumed by two: rank 0 continues the saved loader stream,
    rank 1 gets a stream of its own, so their loader workers do not repeat each other's draws."""
    from types import SimpleNamespace

    from capsnet.checkpoint import capture_rng
    from capsnet.distributed import DistInfo
    from capsnet.runs import restore_run

    saved = capture_rng(torch.Generator().manual_seed(3))
    ckpt = {"step": 10, "epoch": 1, "rng": saved, "rng_per_rank": [saved], "world_size": 1}

    def resumed(rank: int) -> torch.Tensor:
        generator = torch.Generator()
        run = SimpleNamespace(
            dist=DistInfo(rank=rank, world_size=2),
            run_dir=tmp_path,
            window={},
            loaders=SimpleNamespace(train_generator=generator),
            cfg=SimpleNamespace(train=SimpleNamespace(seed=5)),
            echo=lambda message: None,
            interim=None,
        )
        with torch.random.fork_rng():
            state = (random.getstate(), np.random.get_state())
            restore_run(run, ckpt, tmp_path / "step-000010.pt")
            random.setstate(state[0])
            np.random.set_state(state[1])
        assert torch.equal(run.epoch_rng["loader"], generator.get_state())
        return generator.get_state()

    assert torch.equal(resumed(0), torch.Generator().manual_seed(3).get_state())
    assert not torch.equal(resumed(1), resumed(0))


def test_a_config_or_a_run_s_text_file_given_as_a_checkpoint_is_named_as_such(tmp_path):
    """``--ckpt configs/small.yaml`` (or a run's config.yaml) is a common slip: not "corrupt"."""
    config = tmp_path / "small.yaml"
    config.write_text("train:\n  epochs: 1\n")
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(config)
    message = str(info.value)
    assert "corrupt" not in message and "not a checkpoint" in message
    assert f"capsnet train --config {config}" in message
    run = tmp_path / "run"
    run.mkdir()
    for name in ("config.yaml", "metrics.jsonl", "run.json"):
        (run / name).write_text("{}\n")
        with pytest.raises(CheckpointError) as info:
            load_checkpoint(run / name)
        message = str(info.value)
        assert "corrupt" not in message and f"give the run folder itself ({run})" in message, name
