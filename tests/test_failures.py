"""What a user sees when training is killed, interrupted, runs out of disk or is given bad input.

The kill and signal tests run ``capsnet train`` in a subprocess on configs/tiny.yaml,
stop it from outside while it trains, then resume it with ``--resume latest`` and
check that the finished run equals one that was never stopped, bit for bit.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import logged as metric_lines
from helpers import other_process, tiny, trained_by
from typer.testing import CliRunner

from capsnet.checkpoint import load_checkpoint, process_start, step_checkpoints
from capsnet.cli import app
from capsnet.config import ConfigError, load_config
from capsnet.trainer import TrainingError, fit

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny.yaml"
EPOCHS = 4  # 6 steps each: 24 steps in all
runner = CliRunner()


def dirs(tmp_path: Path) -> list[str]:
    return ["-o", f"logging.out_dir={tmp_path / 'weights'}", "-o", f"logging.tb_dir={tmp_path / 'runs'}"]


def train_args(tmp_path: Path, *extra: str) -> list[str]:
    return ["train", "--config", str(TINY), "-o", f"train.epochs={EPOCHS}", *dirs(tmp_path), *extra]


def same_weights(a: Path, b: Path) -> bool:
    wa, wb = load_checkpoint(a)["model"], load_checkpoint(b)["model"]
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def logged(run_dir: Path) -> dict[int, dict[str, float]]:
    """metrics.jsonl by step, without the timings (perf/...)."""
    return {
        line["step"]: {k: v for k, v in line.items() if not k.startswith("perf/")}
        for line in metric_lines(run_dir)
    }


def temp_files(run_dir: Path) -> list[str]:
    return [p.name for p in run_dir.iterdir() if p.name.endswith(".tmp")]


def logged_step(run_dir: Path) -> int:
    """The highest step in metrics.jsonl so far (0 when there is none yet)."""
    try:
        text = (run_dir / "metrics.jsonl").read_text()
    except OSError:
        return 0
    steps = [json.loads(line)["step"] for line in text.splitlines() if line.endswith("}")]
    return max(steps, default=0)


def start(args: list[str], tmp_path: Path, prelude: str = "", new_group: bool = False) -> subprocess.Popen:
    """``capsnet <args>`` in a new process (``new_group``: the leader of a new process group);
    ``prelude`` is Python run before the CLI starts."""
    code = f"{prelude}\nimport sys\nfrom capsnet.cli import main\nsys.argv = ['capsnet', *{args!r}]\nmain()\n"
    return subprocess.Popen(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=new_group,
    )


def wait_until(proc: subprocess.Popen, ready, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"the run ended (code {proc.returncode}) before it could be stopped:\n{out}\n{err}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("the run did not get far enough in time")
        time.sleep(0.005)


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> Path:
    """last.pt of a run of configs/tiny.yaml that was never stopped."""
    tmp = tmp_path_factory.mktemp("straight")
    cfg = load_config(
        TINY,
        [f"train.epochs={EPOCHS}", f"logging.out_dir={tmp / 'weights'}", f"logging.tb_dir={tmp / 'runs'}"],
    )
    result = fit(cfg, run_name="straight", echo=lambda _msg: None)
    assert result.step == 6 * EPOCHS
    return result.run_dir


def resume_and_finish(tmp_path: Path, straight: Path, run: str) -> str:
    result = runner.invoke(app, ["train", "--resume", "latest", *dirs(tmp_path)])
    assert result.exit_code == 0, result.output
    run_dir = tmp_path / "weights" / run
    assert load_checkpoint(run_dir / "last.pt")["step"] == 6 * EPOCHS
    assert same_weights(straight / "last.pt", run_dir / "last.pt")
    assert logged(run_dir) == logged(straight)
    assert temp_files(run_dir) == []
    return result.stdout


# --------------------------------------------------------------------------- SIGKILL


def test_a_run_killed_with_sigkill_mid_epoch_resumes_from_its_last_checkpoint(tmp_path, straight):
    run_dir = tmp_path / "weights" / "killed"
    proc = start(train_args(tmp_path, "--run-name", "killed"), tmp_path)
    wait_until(proc, lambda: logged_step(run_dir) >= 8)  # inside epoch 2 (steps 7..12)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    saved = load_checkpoint(run_dir / "last.pt")["step"]
    assert 6 <= saved < 6 * EPOCHS
    out = resume_and_finish(tmp_path, straight, "killed")
    assert f"at step {saved} " in out


KILL_IN_SAVE = """
import os, signal
_fsync, _seen = os.fsync, []
def fsync(fd):
    name = os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))
    if name.startswith(TARGET) and name.endswith(".tmp"):
        _seen.append(name)
        if len(_seen) == NTH:
            os.ftruncate(fd, os.fstat(fd).st_size // 2)  # half of the bytes on disk, then gone
            os.kill(os.getpid(), signal.SIGKILL)
    return _fsync(fd)
os.fsync = fsync
"""


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc to find the file being saved")
@pytest.mark.parametrize(
    "target,nth,resumed_step",
    [
        (".step-000012.pt.", 1, 6),
        (".last.pt.", 2, 12),
        (".step-000006.pt.", 1, 0),
    ],
    ids=["while-writing-the-step-file", "while-writing-last.pt", "during-the-first-save"],
)
def test_a_run_killed_in_the_middle_of_a_save_keeps_the_previous_checkpoint(
    tmp_path, straight, target, nth, resumed_step
):
    """Killed with the temporary file half written: the previous checkpoint is intact, resume
    continues from the highest complete step (or starts over when there was none) and finishes."""
    run_dir = tmp_path / "weights" / "cut"
    hook = KILL_IN_SAVE.replace("TARGET", repr(target)).replace("NTH", str(nth))
    proc = start(train_args(tmp_path, "--run-name", "cut", "--resume", "latest"), tmp_path, hook)
    proc.communicate(timeout=180)
    assert proc.returncode == -signal.SIGKILL
    assert len(temp_files(run_dir)) == 1  # the half-written file a killed process leaves
    assert [step for step, _ in step_checkpoints(run_dir)] == (
        sorted({6, resumed_step}) if resumed_step else []
    )
    # step-<n>.pt is written before last.pt: whichever the kill cut, last.pt is still step 6's
    if resumed_step:
        assert load_checkpoint(run_dir / "last.pt")["step"] == 6
    else:
        assert not (run_dir / "last.pt").exists()
    result = runner.invoke(app, train_args(tmp_path, "--run-name", "cut", "--resume", "latest"))
    assert result.exit_code == 0, result.output
    assert same_weights(straight / "last.pt", run_dir / "last.pt")
    assert logged(run_dir) == logged(straight)
    assert temp_files(run_dir) == []
    if resumed_step:
        assert f"at step {resumed_step} " in result.stdout
        assert "left by a save that was interrupted" in result.stdout
    else:
        assert "no checkpoint in" in result.stdout and "starting the run from step 0" in result.stdout


# --------------------------------------------------------------------------- SIGTERM and Ctrl-C


@pytest.mark.parametrize(
    "sig,code",
    [(signal.SIGTERM, 143), (signal.SIGINT, 130)],
    ids=["SIGTERM", "SIGINT"],
)
def test_sigterm_and_ctrl_c_save_say_how_to_resume_and_exit_143_or_130(tmp_path, straight, sig, code):
    run_dir = tmp_path / "weights" / "stopped"
    proc = start(train_args(tmp_path, "--run-name", "stopped"), tmp_path)
    wait_until(proc, lambda: logged_step(run_dir) >= 8)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err
    ckpt = load_checkpoint(run_dir / "last.pt")
    assert f"stopped by {sig.name} at step {ckpt['step']}" in out
    assert f"resume with: capsnet train --resume {run_dir}" in out
    assert 8 <= ckpt["step"] < 6 * EPOCHS and "Traceback" not in err
    if sig == signal.SIGTERM:
        resume_and_finish(tmp_path, straight, "stopped")


def test_ctrl_c_of_a_run_piped_into_tee_still_saves_says_how_to_resume_and_exits_130(tmp_path):
    # Ctrl-C stops `capsnet train ... | tee log` and its tee together: the run's stdout reader is gone
    run_dir = tmp_path / "weights" / "teed"
    proc = start(train_args(tmp_path, "--run-name", "teed"), tmp_path)
    proc.stdout.close()
    wait_until(proc, lambda: logged_step(run_dir) >= 8)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    step = load_checkpoint(run_dir / "last.pt")["step"]
    assert f"stopped by SIGINT at step {step}" in err
    assert f"resume with: capsnet train --resume {run_dir}" in err
    assert "unexpected" not in err and "Traceback" not in err


def test_a_run_whose_output_pipe_closes_trains_to_the_end(tmp_path):
    # `capsnet train ... | head`: the reader leaves after a few lines, the run does not
    proc = start(["train", "--config", str(TINY), *dirs(tmp_path), "--run-name", "headed"], tmp_path)
    proc.stdout.close()
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert load_checkpoint(tmp_path / "weights" / "headed" / "last.pt")["step"] == 12
    assert "done at step 12" in err and "unexpected" not in err


def test_a_run_whose_stdout_and_stderr_share_a_pipe_that_closes_trains_to_the_end(tmp_path):
    # `capsnet train ... 2>&1 | head`: neither stream has a reader left; the run goes on regardless
    code = (
        "import sys\nfrom capsnet.cli import main\n"
        f"sys.argv = ['capsnet', 'train', '--config', {str(TINY)!r}, *{dirs(tmp_path)!r}, '--run-name', 'both']\n"
        "main()\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    proc.stdout.readline()  # as head: one line, then the reader is gone
    proc.stdout.close()
    assert proc.wait(timeout=120) == 0
    assert load_checkpoint(tmp_path / "weights" / "both" / "last.pt")["step"] == 12


def test_sigterm_to_the_process_group_with_loader_workers_still_saves_and_exits_143(tmp_path):
    # timeout(1), kill -- -PGID and schedulers signal the workers as well as the main process
    run_dir = tmp_path / "weights" / "group"
    args = train_args(tmp_path, "--run-name", "group", "-o", "train.num_workers=2")
    proc = start(args, tmp_path, new_group=True)
    wait_until(proc, lambda: logged_step(run_dir) >= 8)
    proc.send_signal(signal.SIGTERM)  # as timeout(1) does: the command, then its whole group
    os.killpg(proc.pid, signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    ckpt = load_checkpoint(run_dir / "last.pt")
    assert f"stopped by SIGTERM at step {ckpt['step']}" in out
    assert 8 <= ckpt["step"] < 6 * EPOCHS and "Traceback" not in err and "error" not in err.lower()
    resumed = runner.invoke(app, ["train", "--resume", "latest", *dirs(tmp_path)])
    assert resumed.exit_code == 0, resumed.output
    assert load_checkpoint(run_dir / "last.pt")["step"] == 6 * EPOCHS


REPEATED_SIGNALS = """
import os, signal, time
from capsnet.signals import catch_stop_signals
# Ctrl-C as in an interactive shell, whatever this process inherited (a job started in the
# background with `&` inherits SIGINT ignored, and then a second Ctrl-C rightly stays ignored)
signal.signal(signal.SIGINT, signal.default_int_handler)
with catch_stop_signals() as stop:
    for _ in range(3):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.01)
    print("after SIGTERMs", stop.name, flush=True)
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(0.01)
    print("after one SIGINT", stop.name, flush=True)
    try:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(1)
    except KeyboardInterrupt:
        print("second SIGINT interrupts", flush=True)
"""


def test_repeated_sigterms_only_ask_once_and_a_second_ctrl_c_interrupts():
    # timeout(1) signals the command and then its group: two SIGTERMs must still save
    done = subprocess.run(
        [sys.executable, "-c", REPEATED_SIGNALS], check=False, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, (done.returncode, done.stderr)
    assert done.stdout.splitlines() == [
        "after SIGTERMs SIGTERM",
        "after one SIGINT SIGTERM",
        "second SIGINT interrupts",
    ]


IGNORED_SIGINT = """
import os, signal, time
from capsnet.signals import catch_stop_signals
signal.signal(signal.SIGINT, signal.SIG_IGN)  # as for a job started in the background with `&`
with catch_stop_signals() as stop:
    for _ in range(2):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.01)
    print("after two SIGINTs", stop.name, flush=True)
print("restored", signal.getsignal(signal.SIGINT) is signal.SIG_IGN, flush=True)
"""


def test_a_second_ctrl_c_is_ignored_where_ctrl_c_was_ignored_before():
    # the first one still stops and saves; the second does what it did before: nothing
    done = subprocess.run(
        [sys.executable, "-c", IGNORED_SIGINT], check=False, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, (done.returncode, done.stderr)
    assert done.stdout.splitlines() == ["after two SIGINTs SIGINT", "restored True"]


def test_an_error_with_debug_and_loader_workers_exits_instead_of_waiting_for_them(tmp_path):
    # --debug lets the exception reach the interpreter, whose exit handlers then stop the workers
    args = [
        "--debug",
        *train_args(tmp_path, "--run-name", "diverges"),
        *["-o", "train.num_workers=2", "-o", "optim.lr=1e30", "-o", "train.max_bad_steps=1"],
    ]
    proc = start(args, tmp_path)
    try:
        _, err = proc.communicate(timeout=90)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        pytest.fail("the process did not exit after the error: its loader workers kept it alive")
    assert proc.returncode == 1 and "TrainingError" in err


# --------------------------------------------------------------------------- disk full, no permission


def test_a_full_disk_during_training_stops_with_the_path_and_keeps_the_previous_checkpoint(
    tmp_path, monkeypatch, straight
):
    real = os.fsync

    def full_at_step_12(fd):
        if "step-000012" in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd)

    monkeypatch.setattr(os, "fsync", full_at_step_12)
    result = runner.invoke(app, train_args(tmp_path, "--run-name", "full"))
    monkeypatch.undo()
    run_dir = tmp_path / "weights" / "full"
    assert result.exit_code == 2 and "Traceback" not in result.output
    message = result.stderr.strip().splitlines()
    assert len(message) == 2
    assert str(run_dir / "step-000012.pt") in message[0] and "no space left on device" in message[0]
    assert "stopped at step 12" in message[1] and f"--resume {run_dir}" in message[1]
    assert temp_files(run_dir) == [] and load_checkpoint(run_dir / "last.pt")["step"] == 6
    resume_and_finish(tmp_path, straight, "full")


def test_an_unwritable_run_directory_is_a_clear_error(tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    result = runner.invoke(app, train_args(tmp_path, "--run-name", "ro"))
    monkeypatch.undo()
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert str(tmp_path / "weights" / "ro") in result.stderr and "Permission denied" in result.stderr


# --------------------------------------------------------------------------- non-finite models


def test_a_model_that_became_non_finite_is_never_saved(tmp_path, monkeypatch):
    from capsnet import trainer

    real = trainer.build_optimizer

    def poison(model, cfg):
        with torch.no_grad():
            model.classcaps.weight[0, 0, 0, 0] = float("inf")
        return real(model, cfg)

    monkeypatch.setattr(trainer, "build_optimizer", poison)
    cfg = load_config(
        TINY,
        [f"logging.out_dir={tmp_path}", f"logging.tb_dir={tmp_path / 'runs'}", "train.max_bad_steps=100"],
    )
    with pytest.raises(TrainingError, match=r"classcaps\.weight became non-finite, so it was not saved"):
        fit(cfg, run_name="inf", echo=lambda _msg: None)
    assert sorted(p.name for p in (tmp_path / "inf").iterdir() if p.suffix == ".pt") == []


def test_a_batch_norm_statistic_that_became_non_finite_is_never_saved(tmp_path, monkeypatch):
    from capsnet import trainer

    real = trainer.build_optimizer

    def poison(model, cfg):  # training uses the batch's statistics, evaluation these
        model.stem[1].running_var.fill_(float("inf"))
        return real(model, cfg)

    monkeypatch.setattr(trainer, "build_optimizer", poison)
    cfg = load_config(TINY, [f"logging.out_dir={tmp_path}", "logging.tensorboard=false"])
    with pytest.raises(TrainingError, match=r"batch-norm statistic stem\.1\.running_var became non-finite"):
        fit(cfg, run_name="bn", echo=lambda _msg: None)
    assert not [p for p in (tmp_path / "bn").iterdir() if p.suffix == ".pt"]


def test_a_model_too_deep_for_the_images_is_refused_before_any_data_is_read_or_downloaded(
    tmp_path, monkeypatch
):
    from capsnet import trainer

    def no_download(*args, **kwargs):
        raise AssertionError("the data was looked for")

    monkeypatch.setattr(trainer, "build_loaders", no_download)
    root, out = tmp_path / "data", tmp_path / "w"
    cfg = load_config(
        TINY.parent / "mnist.yaml",
        [
            "data.image_size=8",
            f"data.root={root}",
            f"logging.out_dir={out}",
            f"logging.tb_dir={tmp_path / 'tb'}",
        ],
    )
    with pytest.raises(ConfigError, match=r"caps1: input of 2x2 capsules .* \(the data gives 8x8 images\)"):
        fit(cfg, run_name="deep", echo=lambda _msg: None)
    assert not root.exists() and not out.exists()


@pytest.mark.parametrize("where", ["metrics", "tensorboard"])
def test_a_full_disk_under_the_logs_stops_training_with_the_file_and_how_to_resume(
    tmp_path, monkeypatch, where
):
    import errno

    from torch.utils.tensorboard import SummaryWriter

    from capsnet.tracking import MetricsFile

    def full(*args, **kwargs):
        if fit_state["step"] >= 7:  # after epoch 1's checkpoint (tiny.yaml: 6 steps an epoch)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*args, **kwargs)

    fit_state = {"step": 0}
    owner, name = (MetricsFile, "_write") if where == "metrics" else (SummaryWriter, "add_scalar")
    real = getattr(owner, name)
    monkeypatch.setattr(owner, name, full)
    from capsnet import trainer

    real_step = trainer._train_step

    def counting(run, group, stop, *rest):
        out = real_step(run, group, stop, *rest)
        fit_state["step"] = run.step
        return out

    monkeypatch.setattr(trainer, "_train_step", counting)
    cfg = load_config(TINY, [f"logging.out_dir={tmp_path / 'w'}", f"logging.tb_dir={tmp_path / 'tb'}"])
    with pytest.raises(TrainingError) as info:
        fit(cfg, run_name="full", echo=lambda _msg: None)
    message = str(info.value)
    named = "metrics.jsonl" if where == "metrics" else f"TensorBoard events to {tmp_path / 'tb' / 'full'}"
    assert named in message and "No space left on device" in message, message
    assert "the last complete checkpoint is " in message and "step-000006.pt" in message, message
    assert f"resume with: capsnet train --resume {tmp_path / 'w' / 'full'}" in message


def test_a_failed_rewrite_of_the_metrics_file_leaves_it_whole(tmp_path, monkeypatch):
    from capsnet import checkpoint
    from capsnet.tracking import truncate_metrics

    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"step": s, "train/loss": 1.0 / s}) for s in (1, 2, 3)]
    path.write_text("".join(f"{line}\n" for line in lines))

    def disk_full(data, target):
        Path(target).with_name("partial.tmp").write_bytes(data[:5])
        raise checkpoint.CheckpointError(f"could not write {target}: no space left on device")

    monkeypatch.setattr(checkpoint, "atomic_write_bytes", disk_full)
    with pytest.raises(checkpoint.CheckpointError):
        truncate_metrics(path, 2)
    assert path.read_text().splitlines() == lines
    monkeypatch.undo()
    truncate_metrics(path, 2)
    assert path.read_text().splitlines() == lines[:2]


# --------------------------------------------------------------------------- soak


def soak(tmp_path: Path, steps: int, train_size: int) -> None:
    """Extreme settings (lr 0.1, final_lambda 1.0, min_var 1e-8): a finished run or a clean stop,
    and every checkpoint written holds finite weights."""
    cfg = load_config(
        TINY,
        [
            f"logging.out_dir={tmp_path}",
            f"logging.tb_dir={tmp_path / 'runs'}",
            "optim.lr=0.1",
            "routing.final_lambda=1.0",
            "routing.min_var=1e-8",
            f"data.train_size={train_size}",
            "train.epochs=1000",
            f"train.max_steps={steps}",
            "logging.log_every=50",
            "logging.hist_every=100000",
            "logging.tensorboard=false",
        ],
    )
    finished = False
    try:
        result = fit(cfg, run_name="soak", echo=lambda _msg: None)
        assert result.step == steps and result.stopped == "max_steps"
        finished = True
    except TrainingError as stop:  # a clean stop names the step
        assert "stopped at step" in str(stop)
    saved = [p for p in (tmp_path / "soak").iterdir() if p.suffix == ".pt"]
    if finished:  # a finished run has its checkpoints to check, the last one at its last step
        assert load_checkpoint(tmp_path / "soak" / "last.pt")["step"] == steps
        assert f"step-{steps:06d}.pt" in {p.name for p in saved}
    for path in saved:
        weights = load_checkpoint(path)["model"]
        assert all(bool(torch.isfinite(v).all()) for v in weights.values() if v.is_floating_point()), path


def test_a_short_soak_with_extreme_settings_ends_finite_or_stops_cleanly(tmp_path):
    soak(tmp_path, steps=60, train_size=480)


@pytest.mark.slow
def test_a_2000_step_soak_with_extreme_settings_ends_finite_or_stops_cleanly(tmp_path):
    soak(tmp_path, steps=2000, train_size=1600)


# --------------------------------------------------------------------------- bad input through the CLI


def write_idx(path: Path, array: np.ndarray, magic: int | None = None) -> None:
    head = magic if magic is not None else (0x0800 | array.ndim)
    path.write_bytes(
        head.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape) + array.tobytes()
    )


def mnist_files(folder: Path, wrong_magic: bool = False, truncate: bool = False) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for split, n in (("train", 20), ("t10k", 8)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        write_idx(folder / f"{split}-images-idx3-ubyte", images, 0x0801 if wrong_magic else None)
        write_idx(folder / f"{split}-labels-idx1-ubyte", rng.integers(0, 10, n, dtype=np.uint8))
    if truncate:
        path = folder / "train-images-idx3-ubyte"
        path.write_bytes(path.read_bytes()[:-100])
    return folder


def image_folder(root: Path, mode: str = "RGB", bad: bool = True) -> Path:
    from PIL import Image

    rng = np.random.default_rng(1)
    for label in ("a", "b"):
        (root / label).mkdir(parents=True)
        for i in range(5):
            shape = (20, 20, 3) if mode == "RGB" else (20, 20)
            Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode=mode).save(
                root / label / f"{i}.png"
            )
    if bad:
        (root / "a" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(30))
        (root / "b" / "notes.txt").write_text("not an image")
    return root


@pytest.fixture(scope="module")
def one_run(tmp_path_factory) -> Path:
    """A folder holding weights/one/: a finished one-step run of configs/tiny.yaml."""
    tmp = tmp_path_factory.mktemp("one")
    cfg = load_config(
        TINY, [f"logging.out_dir={tmp / 'weights'}", f"logging.tb_dir={tmp / 'runs'}", "train.max_steps=1"]
    )
    fit(cfg, run_name="one", echo=lambda _msg: None)
    return tmp


def truncated_checkpoint(tmp: Path, one: Path) -> Path:
    path = tmp / "cut.pt"
    path.write_bytes((one / "weights" / "one" / "last.pt").read_bytes()[:5000])
    return path


def code_checkpoint(tmp: Path, one: Path) -> Path:
    path = tmp / "code.pt"
    ckpt = load_checkpoint(one / "weights" / "one" / "last.pt")
    torch.save({**ckpt, "payload": _RunsCode(str(tmp / "marker"))}, path)
    return path


class _RunsCode:
    """Unpickling this would call open(marker, "w")."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def folder_args(tmp: Path, *extra: str) -> list[str]:
    return [
        "train",
        "--config",
        str(TINY),
        *dirs(tmp),
        "-o",
        "data.name=folder",
        "-o",
        f"data.train_dir={image_folder(tmp / 'images')}",
        "-o",
        "train.max_steps=1",
        *extra,
    ]


def on_the_run(command: str, *args: str):
    """The arguments of ``capsnet <command>`` on the finished run's checkpoint, then ``args``."""
    return lambda tmp, one: [command, "--ckpt", str(one / "weights" / "one"), *args]


# Each case: (arguments given the test's folder and the finished run's folder, what stderr must say).
BAD_INPUTS = {
    "truncated-checkpoint-resume": (
        lambda tmp, one: ["train", "--resume", str(truncated_checkpoint(tmp, one)), *dirs(tmp)],
        "corrupt or truncated",
    ),
    "truncated-checkpoint-eval": (
        lambda tmp, one: ["eval", "--ckpt", str(truncated_checkpoint(tmp, one))],
        "corrupt or truncated",
    ),
    "checkpoint-that-runs-code": (
        lambda tmp, one: ["eval", "--ckpt", str(code_checkpoint(tmp, one))],
        "refusing to load",
    ),
    "checkpoint-of-another-architecture": (
        lambda tmp, one: [
            "train",
            "--config",
            str(TINY),
            "--resume",
            str(one / "weights" / "one"),
            "--run-name",
            "other",
            *dirs(tmp),
            "-o",
            "model.caps_types=[4,6]",
        ],
        "model.caps_types: [4, 4] in the checkpoint, [4, 6] now",
    ),
    "resume-latest-with-no-runs": (
        lambda tmp, one: ["train", "--resume", "latest", *dirs(tmp)],
        "no runs with checkpoints",
    ),
    "eval-latest-with-no-runs": (lambda tmp, one: ["eval", "--ckpt", "latest"], "no runs with checkpoints"),
    "eval-latest-with-a-run-folder-as-the-folder-of-runs": (
        lambda tmp, one: ["eval", "--ckpt", "latest", "--out-dir", str(one / "weights" / "one")],
        f"one is a run folder, not the folder that holds the runs: name the run itself (--ckpt {os.sep}",
    ),
    "eval-latest-with-a-mistyped-folder-of-runs": (
        lambda tmp, one: ["eval", "--ckpt", "latest", "--out-dir", str(tmp / "wieghts")],
        "wieghts (no such folder); train one first",
    ),
    "missing-dataset": (
        lambda tmp, one: [
            *train_args(tmp),
            "-o",
            "data.name=smallnorb",
            "-o",
            f"data.root={tmp / 'nowhere'}",
            "-o",
            "data.download=false",
        ],
        "smallnorb not found (looked in: ",
    ),
    "idx-wrong-magic": (
        lambda tmp, one: [
            *train_args(tmp),
            "-o",
            "data.name=mnist",
            "-o",
            f"data.root={mnist_files(tmp / 'mnist', wrong_magic=True)}",
            "-o",
            "data.download=false",
        ],
        "train-images-idx3-ubyte: wrong magic number 0x00000801 (expected 0x00000803)",
    ),
    "idx-truncated-body": (
        lambda tmp, one: [
            *train_args(tmp),
            "-o",
            "data.name=mnist",
            "-o",
            f"data.root={mnist_files(tmp / 'mnist', truncate=True)}",
            "-o",
            "data.download=false",
        ],
        "train-images-idx3-ubyte: truncated",
    ),
    "image-folder-with-bad-files-in-fail-mode": (
        lambda tmp, one: folder_args(tmp, "-o", "data.bad_files=fail"),
        "not a readable image (data.bad_files is 'fail'",
    ),
    "channels-differ-from-the-checkpoint-resume": (
        lambda tmp, one: [
            "train",
            "--resume",
            str(one / "weights" / "one"),
            "--run-name",
            "rgb",
            *dirs(tmp),
            "-o",
            "data.channels=3",
        ],
        "data.channels: 1 in the checkpoint, 3 now",
    ),
    "channels-differ-from-the-checkpoint-eval": (
        on_the_run("eval", "-o", "data.channels=3"),
        "expects 1-channel images but this data has 3",
    ),
    "crop-shift-without-crops-eval": (
        on_the_run("eval", "--crop-shift", "2"),
        "--crop-shift sets the shifts of the multi-crop test: give --crops N with it",
    ),
    "unknown-device-eval": (
        on_the_run("eval", "--device", "tpu"),
        "--device: 'tpu' is not one of auto, cpu, cuda, cuda:N or mps",
    ),
    "steps-given-to-fgsm-attack": (
        on_the_run("attack", "-m", "fgsm", "--steps", "5"),
        "--steps sets the steps of BIM; FGSM takes one step of eps: use -m bim with it",
    ),
    "bim-step-size-0-attack": (
        on_the_run("attack", "-m", "bim", "--step-size", "0"),
        "--step-size: must be above 0",
    ),
    "image-size-differs-from-the-decoders-eval": (
        on_the_run("eval", "-o", "data.image_size=24"),
        "trained on 20x20 images, the size its decoder reconstructs, but this data gives 24x24",
    ),
    "eval-of-synthetic-data-drawn-with-another-seed": (
        on_the_run("eval", "-o", "train.seed=3"),
        "-o train.seed=3: the synthetic data's class patterns are drawn from train.seed",
    ),
    "image-size-too-small-for-the-model-eval": (
        on_the_run("eval", "-o", "data.image_size=12"),
        "cannot take 12x12 images: caps2",
    ),
    "run-name-outside-the-weights-folder": (
        lambda tmp, one: [*train_args(tmp), "--run-name", "../../x"],
        "invalid run name",
    ),
    "yaml-with-a-python-tag": (
        lambda tmp, one: ["train", "--config", str(python_tag_yaml(tmp))],
        "not valid YAML",
    ),
    "yaml-syntax-error-names-the-line": (
        lambda tmp, one: ["train", "--config", str(written(tmp / "bad.yaml", b"train:\n  epochs: [1, 2\n"))],
        "bad.yaml: not valid YAML at line 3, column 1",
    ),
    "yaml-key-given-twice": (
        lambda tmp, one: [
            "train",
            "--config",
            str(written(tmp / "twice.yaml", b"train:\n  epochs: 1\n  batch_size: 8\n  epochs: 9\n")),
        ],
        "twice.yaml: not valid YAML at line 4, column 3 (key 'epochs' given twice, first at line 2)",
    ),
    "override-of-a-whole-section-with-a-value": (
        lambda tmp, one: ["train", "--config", str(TINY), "-o", "train=3", *dirs(tmp)],
        "train: expected a mapping of keys, got 3",
    ),
    "config-that-is-not-utf8": (
        lambda tmp, one: ["train", "--config", str(written(tmp / "bin.yaml", b"\xff\xfetrain: 1\n"))],
        "bin.yaml: not a UTF-8 text file (byte 0 cannot be decoded)",
    ),
    "checkpoint-given-as-the-config": (
        lambda tmp, one: ["train", "--config", str(one / "weights" / "one" / "last.pt"), *dirs(tmp)],
        "last.pt is a checkpoint, not a YAML config: continue its run with capsnet train --resume ",
    ),
    "empty-config-file": (
        lambda tmp, one: ["train", "--config", str(written(tmp / "empty.yaml", b""))],
        "empty.yaml is empty",
    ),
    "random-bytes-as-a-checkpoint-eval": (
        lambda tmp, one: ["eval", "--ckpt", str(written(tmp / "rand.pt", bytes(range(256)) * 4))],
        "rand.pt is not a readable checkpoint: it is neither a zip archive nor a pickle",
    ),
    "resume-a-run-that-stopped-before-its-first-save": (
        lambda tmp, one: ["train", "--resume", str(start_files_only(tmp / "weights" / "k")), *dirs(tmp)],
        "stopped before its first save",
    ),
    "resume-from-a-checkpoint-without-optimizer-state": (
        lambda tmp, one: ["train", "--resume", str(weights_only(one, tmp / "weights-only.pt")), *dirs(tmp)],
        (
            "weights-only.pt holds the model's weights but not optimizer state, so a run cannot continue "
            "from it (eval and export can use it); to train on from these weights, start a new run with "
            "-o train.init_from="
        ),
    ),
    "resume-best-when-later-checkpoints-would-be-deleted": (
        lambda tmp, one: ["train", "--resume", "best", *dirs(tmp), *older_best(one, tmp / "weights")],
        "--resume best would continue",
    ),
    "resume-a-best-pt-by-its-path-when-later-checkpoints-would-be-deleted": (
        lambda tmp, one: [
            "train",
            "--resume",
            str(tmp / "weights" / "kept" / "best.pt"),
            *dirs(tmp),
            *older_best(one, tmp / "weights"),
        ],
        "kept/best.pt would continue",
    ),
    "resume-a-folder-outside-out-dir-whose-name-another-run-has": (
        lambda tmp, one: ["train", "--resume", str(taken_name(one, tmp)), *dirs(tmp)],
        "would continue the run in",
    ),
    "eval-of-the-folder-that-holds-the-runs": (
        lambda tmp, one: ["eval", "--ckpt", str(one / "weights")],
        "weights is a folder of runs (one), not a run: name one of them",
    ),
    "eval-of-a-folder-that-is-not-a-run": (
        lambda tmp, one: ["eval", "--ckpt", str(folder(tmp / "holiday-photos"))],
        "holiday-photos, and it is not a run folder (none of config.yaml, metrics.jsonl, run.json)",
    ),
    "export-to-a-file-named-for-the-other-format": (
        on_the_run("export", "--format", "onnx", "--out", "model.pt2"),
        "--out model.pt2 names a pt2 file but --format is onnx; give --format pt2, or an .onnx name",
    ),
    "export-to-an-onnx-name-as-pt2": (
        on_the_run("export", "--format", "pt2", "--out", "model.onnx"),
        "--out model.onnx names an onnx file but --format is pt2; give --format onnx, or a .pt2 name",
    ),
    "export-to-a-name-with-a-suffix-of-no-export-format": (
        on_the_run("export", "--format", "onnx", "--out", "model.txt"),
        "--out model.txt: onnx exports are .onnx files; give a name ending in .onnx (or one with no suffix",
    ),
    "export-into-a-folder-that-is-a-file": (
        lambda tmp, one: [
            "export",
            "--ckpt",
            str(one / "weights" / "one"),
            "--out",
            str(written(tmp / "plain-file", b"x") / "model.onnx"),
        ],
        "cannot write",
    ),
}


def written(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def weights_only(one: Path, path: Path) -> Path:
    """The run's last checkpoint without its optimizer state, as one kept only for evaluation."""
    ckpt = torch.load(one / "weights" / "one" / "last.pt", weights_only=False)
    del ckpt["optimizer"]
    torch.save(ckpt, path)
    return path


def older_best(one: Path, weights: Path) -> list[str]:
    """A copy of the run whose best.pt is older than its step checkpoints (as best.pt usually is)."""
    import shutil

    run = weights / "kept"
    shutil.copytree(one / "weights" / "one", run)
    (step, path), *_ = step_checkpoints(run)
    ckpt = torch.load(path, weights_only=False)
    ckpt["step"] = step - 1
    torch.save(ckpt, run / "best.pt")
    return []


def taken_name(one: Path, tmp: Path) -> Path:
    """A copy of the run outside out_dir, whose folder name a run in out_dir already has."""
    import shutil

    shutil.copytree(one / "weights" / "one", tmp / "weights" / "one")
    shutil.copytree(one / "weights" / "one", tmp / "backup" / "one")
    return tmp / "backup" / "one"


def folder(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def start_files_only(run_dir: Path) -> Path:
    """A run folder as a start killed before its first checkpoint leaves it."""
    run_dir.mkdir(parents=True, exist_ok=True)
    for name in ("config.yaml", "run.json", "metrics.jsonl"):
        (run_dir / name).write_text("{}\n" if name != "config.yaml" else "train:\n  epochs: 1\n")
    return run_dir


def python_tag_yaml(tmp: Path) -> Path:
    path = tmp / "evil.yaml"
    path.write_text(f"train:\n  epochs: !!python/object/apply:builtins.open ['{tmp / 'marker'}', 'w']\n")
    return path


def files_under(*roots: Path) -> dict[str, tuple[int, int] | None]:
    """Every folder (None) and file (its size and modification time) under ``roots``."""
    found: dict[str, tuple[int, int] | None] = {}
    for root in roots:
        for path in root.rglob("*"):
            stat = path.stat()
            found[str(path)] = None if path.is_dir() else (stat.st_size, stat.st_mtime_ns)
    return found


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_a_short_error_with_exit_code_2_and_no_traceback(tmp_path, monkeypatch, one_run, case):
    monkeypatch.chdir(tmp_path)
    make_args, expected = BAD_INPUTS[case]
    args = make_args(tmp_path, one_run)
    before = files_under(tmp_path, one_run)
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("error: ") and expected in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) <= 2, result.stderr
    assert "Traceback" not in result.output
    assert not (tmp_path / "marker").exists()
    assert files_under(tmp_path, one_run) == before  # nothing written, made or changed
    (tmp_path / "again").mkdir()
    with_debug = runner.invoke(app, ["--debug", *make_args(tmp_path / "again", one_run)])
    assert with_debug.exit_code == 1 and not isinstance(with_debug.exception, SystemExit), with_debug.output


def test_eval_at_another_image_size_scores_the_classification_without_the_decoder(tmp_path, one_run):
    ckpt = str(one_run / "weights" / "one")
    args = ["eval", "--ckpt", ckpt, "--json", "-o", "data.image_size=24", "-o", "loss.recon_weight=0"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["n"] == 32 and 0 <= report["acc"] <= 1


def test_an_existing_run_directory_needs_resume_or_overwrite(tmp_path, one_run, monkeypatch):
    monkeypatch.chdir(tmp_path)
    # compile_routing null would compile the kernels first (and say so) on a CPU
    args = [
        "train",
        "--config",
        str(TINY),
        "--run-name",
        "one",
        *dirs(one_run),
        "-o",
        "train.compile_routing=null",
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 2 and "already exists" in result.stderr
    assert "--resume" in result.stderr and "--overwrite" in result.stderr
    # refused before the slow set-up: no kernels compiled, no data loaded
    assert "routing:" not in result.output and "data " not in result.output, result.output


def test_a_run_folder_left_without_a_checkpoint_is_started_afresh_by_the_same_command(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    start_files_only(tmp_path / "weights" / "k")
    result = runner.invoke(app, [*train_args(tmp_path, "--run-name", "k"), "-o", "train.max_steps=2"])
    assert result.exit_code == 0, result.output
    assert "holds no checkpoint" in result.output and "starting it afresh" in result.output
    assert [step for step, _ in step_checkpoints(tmp_path / "weights" / "k")] == [2]
    # anything a run does not write before its first save keeps the folder
    start_files_only(tmp_path / "weights" / "m")
    (tmp_path / "weights" / "m" / "notes.txt").write_text("mine")
    kept = runner.invoke(app, train_args(tmp_path, "--run-name", "m"))
    assert kept.exit_code == 2 and "already exists" in kept.stderr
    assert (tmp_path / "weights" / "m" / "notes.txt").read_text() == "mine"


def test_the_folder_of_a_run_still_in_its_first_epoch_is_not_taken_for_a_dead_start(tmp_path, monkeypatch):
    """run.json names the process that opened the folder: while it runs, the same command is refused
    instead of emptying the folder under it; once it has stopped, the folder is started afresh."""
    monkeypatch.chdir(tmp_path)
    run_dir = start_files_only(tmp_path / "weights" / "k")
    start_k = [*train_args(tmp_path, "--run-name", "k"), "-o", "train.max_steps=1"]
    with other_process() as alive:
        record = trained_by(run_dir, alive.pid)
        for args in (start_k, [*start_k, "--overwrite"]):
            refused = runner.invoke(app, args)
            assert refused.exit_code == 2, refused.output
            assert f"still being trained (process {alive.pid}): let it run, stop it first" in refused.stderr
            assert json.loads((run_dir / "run.json").read_text()) == record  # the folder left as it was
        trained_by(run_dir, alive.pid, host=record["host"] + "-other")  # the same id on another machine
        assert runner.invoke(app, start_k).exit_code == 0
        trained_by(start_files_only(tmp_path / "weights" / "j"), alive.pid)
    started = runner.invoke(app, [*train_args(tmp_path, "--run-name", "j"), "-o", "train.max_steps=1"])
    assert started.exit_code == 0 and "starting it afresh" in started.output, started.output
    assert [step for step, _ in step_checkpoints(tmp_path / "weights" / "j")] == [1]
    assert json.loads((tmp_path / "weights" / "j" / "run.json").read_text())["pid"] == os.getpid()


def test_a_start_that_opens_the_folder_during_this_one_s_set_up_is_found_before_it_is_emptied(
    tmp_path, monkeypatch
):
    """The check before the slow set-up passes; another start takes the folder meanwhile (here, while
    the data loads): it is looked at again just before the folder is emptied."""
    from capsnet import trainer

    monkeypatch.chdir(tmp_path)
    run_dir = start_files_only(tmp_path / "weights" / "k")
    real = trainer.build_loaders
    loaded = []
    with other_process() as alive:

        def loading_while_another_starts(*args, **kwargs):
            trained_by(run_dir, alive.pid)
            loaded.append(True)
            return real(*args, **kwargs)

        monkeypatch.setattr(trainer, "build_loaders", loading_while_another_starts)
        refused = runner.invoke(app, [*train_args(tmp_path, "--run-name", "k"), "-o", "train.max_steps=1"])
        assert refused.exit_code == 2 and f"still being trained (process {alive.pid})" in refused.stderr
        assert loaded == [True]  # refused after the data loaded, not before
        assert json.loads((run_dir / "run.json").read_text())["pid"] == alive.pid  # the folder as it was
        assert sorted(p.name for p in run_dir.iterdir()) == ["config.yaml", "metrics.jsonl", "run.json"]


def test_a_run_whose_process_still_runs_is_not_resumed_by_a_second_one(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    first = runner.invoke(app, [*train_args(tmp_path, "--run-name", "r"), "-o", "train.max_steps=2"])
    assert first.exit_code == 0, first.output
    run_dir = tmp_path / "weights" / "r"
    again = ["train", "--resume", str(run_dir), "-o", "train.max_steps=4"]
    with other_process() as alive:
        trained_by(run_dir, alive.pid)
        refused = runner.invoke(app, again)
        assert refused.exit_code == 2 and f"is still being trained (process {alive.pid})" in refused.stderr
        assert f"then continue it with --resume {run_dir}" in refused.stderr
        assert [step for step, _ in step_checkpoints(run_dir)] == [2]
    resumed = runner.invoke(app, again)  # once it has stopped
    assert resumed.exit_code == 0, resumed.output
    assert [step for step, _ in step_checkpoints(run_dir)][-1] == 4


def test_a_run_trained_in_a_process_that_lives_on_is_not_taken_for_a_running_one(tmp_path, monkeypatch):
    """As in a notebook: training returned (or failed), the process did not end. Another process sees
    from run.json that the run is no longer trained, and may resume it."""
    from capsnet import trainer

    quiet = {"echo": lambda _msg: None}
    fit(tiny(tmp_path, "train.max_steps=2"), run_name="nb", **quiet)

    def boom(*args, **kwargs):
        raise RuntimeError("boom")

    with monkeypatch.context() as patched:  # failing in the training loop, or while setting it up
        patched.setattr(trainer, "_loop", boom)
        with pytest.raises(RuntimeError, match="boom"):
            fit(tiny(tmp_path, "train.max_steps=2"), run_name="in-loop", **quiet)
        patched.setattr(trainer, "Run", boom)
        with pytest.raises(RuntimeError, match="boom"):
            fit(tiny(tmp_path, "train.max_steps=2"), run_name="in-set-up", **quiet)
        patched.setattr(trainer, "TensorBoardWriter", boom)  # just after run.json is written
        with pytest.raises(RuntimeError, match="boom"):
            fit(tiny(tmp_path, "train.max_steps=2"), run_name="in-logging", **quiet)
    for name in ("nb", "in-loop", "in-set-up", "in-logging"):
        run_dir = tmp_path / "weights" / name
        assert json.loads((run_dir / "run.json").read_text())["pid"] == os.getpid()
        ask = f"from capsnet.checkpoint import run_process; print(run_process({str(run_dir)!r}))"
        seen = subprocess.run(
            [sys.executable, "-c", ask], capture_output=True, text=True, timeout=120, check=False
        )
        assert seen.stdout.strip() == f"({os.getpid()}, False)", (name, seen.stderr)


def test_a_training_process_is_told_from_a_zombie_and_from_a_later_one_with_its_id(tmp_path):
    from capsnet.checkpoint import run_process

    run_dir = start_files_only(tmp_path / "r")
    with other_process() as alive:
        trained_by(run_dir, alive.pid)
        assert run_process(run_dir) == (alive.pid, True)
        trained_by(run_dir, alive.pid, pid_start=process_start(alive.pid) + 1)  # another process, same id
        assert run_process(run_dir) == (alive.pid, False)
        trained_by(run_dir, alive.pid, pid_ns=-1)  # the id of another container: nothing can be told
        assert run_process(run_dir) == (alive.pid, None)
        trained_by(run_dir, alive.pid)
        alive.kill()
        deadline = time.monotonic() + 30
        while run_process(run_dir)[1] and time.monotonic() < deadline:  # killed, not yet reaped: a zombie
            time.sleep(0.05)
        assert run_process(run_dir) == (alive.pid, False)
    trained_by(run_dir, 2**40)  # an id no process can have
    assert run_process(run_dir) == (2**40, False)


def test_a_tensorboard_folder_that_cannot_be_made_stops_the_run_before_it_writes_anything(
    tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    blocker = written(tmp_path / "plain-file", b"x")
    result = runner.invoke(app, [*train_args(tmp_path, "--run-name", "t"), "-o", f"logging.tb_dir={blocker}"])
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("error: could not use ") and "plain-file" in result.stderr, result.stderr
    assert not (tmp_path / "weights" / "t").exists()


def test_a_run_folder_that_cannot_be_made_leaves_no_empty_tensorboard_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    blocker = written(tmp_path / "plain-file", b"x")
    args = [*train_args(tmp_path, "--run-name", "t"), "-o", f"logging.out_dir={blocker / 'sub'}"]
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("error: could not use ") and "plain-file" in result.stderr, result.stderr
    tb_root = tmp_path / "runs"  # train_args' logging.tb_dir
    assert not (tb_root / "t").exists()


def test_eval_refuses_a_figure_it_cannot_write_before_evaluating(tmp_path, one_run, monkeypatch):
    from capsnet import visualize
    from capsnet.visualize import ExperimentError

    blocker = written(tmp_path / "plain-file", b"x")
    args = ["eval", "--ckpt", str(one_run / "weights" / "one"), "--plot", str(blocker / "eval.png")]
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert "accuracy" not in result.stdout.lower(), result.stdout  # refused before the evaluation
    assert result.stderr.startswith("error: could not use ") and "plain-file" in result.stderr, result.stderr
    args = [
        "eval",
        "--ckpt",
        str(one_run / "weights" / "one"),
        "--plot",
        str(tmp_path / "new" / "deeper" / "a.png"),
    ]
    with monkeypatch.context() as patch:  # a failed evaluation leaves no folder made for its figure
        patch.setattr("capsnet.evaluate.evaluate_checkpoint", lambda *a, **k: 1 / 0)
        assert runner.invoke(app, args).exit_code != 0
    assert not (tmp_path / "new").exists()

    # a figure that fails as it is written (a disk that filled up meanwhile): the results come first
    def full(*args, **kwargs):
        raise ExperimentError("could not write the figure: No space left on device")

    monkeypatch.setattr(visualize, "save_figure", full)
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert "accuracy" in result.stdout.lower(), result.stdout
    assert result.stderr.startswith("error: could not write the figure: No space left"), result.stderr


def test_an_image_folder_with_bad_files_is_trained_with_one_warning_and_a_count(tmp_path):
    result = runner.invoke(app, folder_args(tmp_path, "--run-name", "imgs"))
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.stdout.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "skipped 2 unreadable or non-image files" in warnings[0]
    assert "broken.png" in warnings[0] and "notes.txt" in warnings[0]


def test_scientific_notation_without_a_dot_is_read_as_a_number(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("routing:\n  min_var: 1e-8\n")
    assert load_config(path, ["optim.lr=2E-3"]).routing.min_var == 1e-8
    assert load_config(path, ["optim.lr=2E-3"]).optim.lr == 2e-3


def test_a_missing_dataset_is_said_before_the_routing_kernels_are_compiled(tmp_path, monkeypatch):
    import capsnet.routing

    monkeypatch.chdir(tmp_path)
    checked = []
    monkeypatch.setattr(capsnet.routing, "_check_kernels", lambda device_type: checked.append(device_type))
    args = train_args(tmp_path, "-o", "train.compile_routing=null", "-o", "train.device=cpu")
    missing = args + [
        "-o",
        "data.name=mnist",
        "-o",
        f"data.root={tmp_path / 'nowhere'}",
        "-o",
        "data.download=false",
    ]
    result = runner.invoke(app, missing)
    assert result.exit_code == 2 and "mnist not found" in result.stderr, result.output
    assert checked == [] and "compiling" not in result.output


def test_a_failed_merge_into_the_metrics_file_s_last_line_is_a_tracking_error(tmp_path, monkeypatch):
    """A resumed run merges its first metrics into the file's last line with an atomic rewrite;
    a full disk there is the same TrackingError as one under an append, naming the file."""
    import errno

    from capsnet.tracking import MetricsFile, TrackingError

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 4, "train/loss": 1.0}\n')
    metrics = MetricsFile(path)
    metrics.add({"val/acc": 0.5}, step=4)  # the same step as the last line: a rewrite

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "replace", full)
    with pytest.raises(TrackingError, match=r"could not write .*metrics.jsonl: no space left on device"):
        metrics.flush()
    assert path.read_text() == '{"step": 4, "train/loss": 1.0}\n'


ANIMALS = ("cat", "dog", "bird")  # sorted, the run's classes are bird, cat, dog


def animal_images(root: Path, count: int, seed: int) -> None:
    """``count`` noisy 24x24 RGB images per class under ``root/<class>/``, each class its own colour."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for k, name in enumerate(ANIMALS):
        (root / name).mkdir(parents=True)
        colour = np.full(3, 60.0)
        colour[k] = 200.0
        for i in range(count):
            pixels = np.clip(colour + rng.normal(0, 40, (24, 24, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.png")


def white_images(folder: Path, count: int) -> None:
    from PIL import Image

    for i in range(count):
        Image.fromarray(np.full((24, 24, 3), 255, np.uint8)).save(folder / f"white-{i}.png")


@pytest.fixture(scope="module")
def animal_run(tmp_path_factory) -> Path:
    """A folder holding imgs/train and imgs/test (classes cat, dog, bird) and weights/animals/: a
    two-step run trained on them, whose config names the image folders relative to the folder."""
    tmp = tmp_path_factory.mktemp("animals")
    animal_images(tmp / "imgs" / "train", 8, 0)
    animal_images(tmp / "imgs" / "test", 3, 1)
    cfg = load_config(
        TINY,
        [
            f"logging.out_dir={tmp / 'weights'}",
            f"logging.tb_dir={tmp / 'runs'}",
            "train.max_steps=2",
            "data.name=folder",
            "data.train_dir=imgs/train",
            "data.test_dir=imgs/test",
        ],
    )
    old = os.getcwd()
    os.chdir(tmp)
    try:
        fit(cfg, run_name="animals", echo=lambda _msg: None)
    finally:
        os.chdir(old)
    return tmp


@pytest.fixture
def animals(animal_run, tmp_path, monkeypatch) -> Path:
    """A copy of ``animal_run`` that a test may change, as the working directory."""
    import shutil

    shutil.copytree(animal_run / "imgs", tmp_path / "imgs")
    shutil.copytree(animal_run / "weights", tmp_path / "weights")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_a_run_whose_config_names_its_data_relative_to_where_it_trained_is_scored_from_anywhere(
    tmp_path, monkeypatch
):
    from capsnet.checkpoint import training_folder

    trained_in = tmp_path / "project"
    animal_images(trained_in / "imgs" / "train", 4, 0)
    animal_images(trained_in / "imgs" / "test", 2, 1)
    monkeypatch.chdir(trained_in)
    relative = ["logging.out_dir=weights/em", "logging.tb_dir=runs", "train.max_steps=1", "data.name=folder"]
    cfg = load_config(TINY, [*relative, "data.train_dir=imgs/train", "data.test_dir=imgs/test"])
    fit(cfg, run_name="pets", echo=lambda _msg: None)
    ckpt_path = trained_in / "weights" / "em" / "pets" / "last.pt"
    assert training_folder(load_checkpoint(ckpt_path), ckpt_path) == trained_in
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert eval_json(ckpt_path)["n"] == 6
    out = elsewhere / "pets.pt2"
    result = runner.invoke(app, ["export", "--ckpt", str(ckpt_path), "--format", "pt2", "--out", str(out)])
    assert result.exit_code == 0 and "of folder test images" in result.stdout, result.output
    # a path given now is taken as given: relative to this folder, where it is missing
    moved = runner.invoke(app, ["eval", "--ckpt", str(ckpt_path), "-o", "data.test_dir=imgs/test"])
    assert moved.exit_code == 2 and "imgs/test" in moved.stderr, moved.output
    # a checkpoint away from <folder>/<out_dir>/<run>/ tells no folder: the paths stay as stored
    loose = elsewhere / "loose.pt"
    loose.write_bytes(ckpt_path.read_bytes())
    assert training_folder(load_checkpoint(loose), loose) is None
    unfound = runner.invoke(app, ["eval", "--ckpt", str(loose)])
    # (the test split of a run with data.test_dir reads that folder alone)
    assert unfound.exit_code == 2 and "data.test_dir imgs/test is not a folder" in unfound.stderr


def test_a_resumed_run_keeps_the_normalisation_it_started_with(tmp_path):
    animal_images(tmp_path / "imgs" / "train", 4, 0)
    animal_images(tmp_path / "imgs" / "test", 2, 1)
    where = [
        f"logging.out_dir={tmp_path / 'weights'}",
        f"logging.tb_dir={tmp_path / 'runs'}",
        "data.name=folder",
    ]
    folders = [f"data.train_dir={tmp_path / 'imgs' / 'train'}", f"data.test_dir={tmp_path / 'imgs' / 'test'}"]
    first = fit(
        load_config(TINY, [*where, *folders, "train.max_steps=1"]), run_name="kept", echo=lambda _m: None
    )
    started = load_checkpoint(first.run_dir / "last.pt")["data_info"]
    white_images(tmp_path / "imgs" / "train" / "cat", 30)  # moves the training images' mean and std
    lines: list[str] = []
    fit(load_config(TINY, [*where, *folders]), resume="kept", echo=lines.append)
    resumed = load_checkpoint(first.run_dir / "last.pt")
    assert resumed["step"] > 1 and (resumed["data_info"]["mean"], resumed["data_info"]["std"]) == (
        started["mean"],
        started["std"],
    )
    # a new run on the same folders computes them afresh: they did move
    fresh = fit(
        load_config(TINY, [*where, *folders, "train.max_steps=1"]), run_name="new", echo=lambda _m: None
    )
    assert load_checkpoint(fresh.run_dir / "last.pt")["data_info"]["mean"] != started["mean"]


def eval_json(ckpt: Path | str, *extra: str) -> dict:
    result = runner.invoke(app, ["eval", "--ckpt", str(ckpt), "--json", "--device", "cpu", *extra])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_scoring_normalises_with_the_checkpoint_s_statistics_not_the_training_images_of_now(animals):
    from capsnet.evaluate import prepare_checkpoint

    run = animals / "weights" / "animals"
    before = eval_json(run)
    white_images(animals / "imgs" / "train" / "cat", 30)  # would move the training images' mean and std
    after = eval_json(run)
    assert (after["loss"], after["per_class"]) == (before["loss"], before["per_class"])
    stored = load_checkpoint(run / "last.pt")["data_info"]
    info = prepare_checkpoint(str(run), device="cpu").loaders.info  # what attack and inspect score with
    assert (info.mean, info.std) == (stored["mean"], stored["std"])
    # the export's parity check feeds the eager model through the data pipeline: the same statistics
    out = animals / "model.pt2"
    result = runner.invoke(app, ["export", "--ckpt", str(run), "--format", "pt2", "--out", str(out)])
    assert result.exit_code == 0 and "parity ok" in result.stdout, result.output


def test_a_checkpoint_that_records_no_statistics_or_classes_is_scored_as_before(animals):
    """Older checkpoints keep the statistics of the training images and go unchecked by class name."""
    run = animals / "weights" / "animals"
    ckpt = load_checkpoint(run / "last.pt")
    old = animals / "old.pt"
    torch.save({key: value for key, value in ckpt.items() if key != "data_info"}, old)
    before = eval_json(old)
    white_images(animals / "imgs" / "train" / "cat", 30)
    assert eval_json(old)["loss"] != before["loss"]
    for split in ("train", "test"):
        (animals / "imgs" / split / "bird").rename(animals / "imgs" / split / "zebra")
    assert eval_json(old)["class_names"] == ["cat", "dog", "zebra"]


@pytest.mark.parametrize(
    "command", [["eval"], ["attack", "--no-plot", "--no-tensorboard"]], ids=lambda c: c[0]
)
def test_scoring_refuses_data_whose_classes_are_not_the_checkpoint_s_by_name_and_order(animals, command):
    for split in ("train", "test"):  # sorted, zebra comes after cat and dog where bird came before them
        (animals / "imgs" / split / "bird").rename(animals / "imgs" / split / "zebra")
    args = [command[0], "--ckpt", str(animals / "weights" / "animals"), "--device", "cpu", *command[1:]]
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("error: ") and len(result.stderr.strip().splitlines()) == 1, result.stderr
    # the test folder is matched to the model's classes by name (the training folder is not read)
    assert "was trained with the classes ['bird', 'cat', 'dog'], this folder also has ['zebra']" in (
        result.stderr
    )


@pytest.mark.parametrize(
    "command",
    [
        ["eval", "--json"],
        ["attack", "--no-plot", "--no-tensorboard", "--limit", "2", "--out", "attack"],
        ["inspect", "--out", "figures"],
        ["export", "--format", "pt2", "--out", "model.pt2"],
    ],
    ids=lambda command: command[0],
)
def test_scoring_and_export_show_skipped_files_as_one_warning_line(animals, command):
    (animals / "imgs" / "test" / "dog" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(30))
    args = [command[0], "--ckpt", str(animals / "weights" / "animals"), *command[1:]]
    result = runner.invoke(app, [*args, *(["--device", "cpu"] if command[0] != "export" else [])])
    assert result.exit_code == 0, result.output
    lines = result.stderr.splitlines()
    assert [line for line in lines if "skipped" in line] == [
        "warning: skipped 1 unreadable or non-image file (data.bad_files: skip): imgs/test/dog/broken.png"
    ], result.stderr
    assert "DataWarning" not in result.stderr
    if command[0] == "eval":
        assert json.loads(result.stdout)["n"] == 9  # stdout holds the results alone


def test_a_checkpoint_whose_class_names_are_not_a_list_is_scored_as_one_that_records_none(animals):
    run = animals / "weights" / "animals"
    ckpt = load_checkpoint(run / "last.pt")
    ckpt["data_info"]["class_names"] = 3
    odd = animals / "odd.pt"
    torch.save(ckpt, odd)
    assert eval_json(odd)["class_names"] == ["bird", "cat", "dog"]  # from the folders, unchecked


def test_a_resumed_run_that_cannot_save_names_the_checkpoint_it_resumed_from(tmp_path, monkeypatch):
    """The resumed checkpoint is intact and is what --resume takes; the message said "none"."""
    from capsnet import runs
    from capsnet.checkpoint import CheckpointError

    cfg = load_config(TINY, [f"logging.out_dir={tmp_path / 'w'}", f"logging.tb_dir={tmp_path / 'tb'}"])
    fit(cfg, run_name="full", echo=lambda _msg: None)  # 2 epochs of 6 steps: step-000012.pt

    def full(*args, **kwargs):
        raise CheckpointError("could not write step-000018.pt: No space left on device")

    monkeypatch.setattr(runs, "save_checkpoint", full)
    again = load_config(
        TINY, [f"logging.out_dir={tmp_path / 'w'}", f"logging.tb_dir={tmp_path / 'tb'}", "train.epochs=3"]
    )
    with pytest.raises(CheckpointError) as info:
        fit(again, resume=str(tmp_path / "w" / "full"), echo=lambda _msg: None)
    message = str(info.value)
    assert "training stopped at step 18" in message, message
    assert f"the last complete checkpoint is {tmp_path / 'w' / 'full' / 'step-000012.pt'}" in message, message
