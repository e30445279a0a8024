"""Training under torchrun on CPUs (Gloo): one run written once, results equal to one process.

The torchrun tests are slow (each starts several Python processes) and run with
--runslow or CAPSNET_SLOW=1. They compare with a single process whose batch is
the global batch: the data order is a function of the seed and the epoch only
(see capsnet.data.build_loaders), so both see the same images in each step.
They use SGD: Adam divides each update by the gradient's running RMS, which turns
last-bit differences of tiny gradients (the two ways of summing a batch) into
visible weight differences, while SGD keeps them at rounding level.
"""

from __future__ import annotations

import copy
import inspect
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from helpers import logged

from capsnet import trainer
from capsnet.checkpoint import load_checkpoint, step_checkpoints
from capsnet.config import load_config
from capsnet.distributed import GlobalBatchNorm2d, rank_seed
from capsnet.trainer import fit

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny.yaml"
SGD = ["optim.name=sgd", "optim.lr=0.05"]


def overrides(tmp_path: Path, *extra: str) -> list[str]:
    return [f"logging.out_dir={tmp_path / 'weights'}", f"logging.tb_dir={tmp_path / 'runs'}", *SGD, *extra]


def cli_overrides(tmp_path: Path, *extra: str) -> list[str]:
    return [arg for value in overrides(tmp_path, *extra) for arg in ("-o", value)]


def torchrun(*launcher: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", *launcher, "-m", "capsnet", "train"]


def single_process(tmp_path: Path, name: str, *extra: str, said: list[str] | None = None) -> Path:
    """Trains ``name`` in this process; what the run says is added to ``said``, where given."""
    cfg = load_config(TINY, overrides(tmp_path, *extra))
    echo = said.append if said is not None else lambda _msg: None
    return fit(cfg, run_name=name, echo=echo).run_dir


def max_difference(a: Path, b: Path) -> float:
    wa, wb = load_checkpoint(a)["model"], load_checkpoint(b)["model"]
    assert wa.keys() == wb.keys()
    return max((wa[k].double() - wb[k].double()).abs().max().item() for k in wa if wa[k].is_floating_point())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


@contextmanager
def launched(cmd: list[str], cwd: Path, env: dict[str, str] | None = None) -> Iterator[subprocess.Popen]:
    """Starts ``cmd`` in a session of its own and, on the way out, kills whatever of it is left.

    A failed assertion or a timeout would otherwise leave torchrun's workers running
    after the test, holding the cores and the port.
    """
    agent = subprocess.Popen(
        cmd,
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        yield agent
    finally:
        try:
            os.killpg(agent.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        agent.communicate()


def launch(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    with launched(cmd, cwd) as agent:
        out, err = agent.communicate(timeout=300)
    return subprocess.CompletedProcess(cmd, agent.returncode, out, err)


# --------------------------------------------------------------------------- without torchrun


def test_rank_seeds_differ_per_rank_and_rank_0_keeps_the_run_seed():
    seeds = [rank_seed(7, rank) for rank in range(4)]
    assert seeds[0] == 7 and len(set(seeds)) == 4 and seeds == [rank_seed(7, r) for r in range(4)]
    assert rank_seed(8, 1) != seeds[1]


def test_world_size_without_rank_is_a_clear_error(monkeypatch):
    from capsnet.config import ConfigError
    from capsnet.distributed import init_distributed

    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(
        ConfigError, match="WORLD_SIZE=4 is set but RANK is not: start multi-process training"
    ):
        init_distributed("cpu")


def test_global_batch_norm_is_batch_norm_in_a_single_process():
    torch.manual_seed(0)
    plain, global_ = torch.nn.BatchNorm2d(3), GlobalBatchNorm2d(3)
    global_.load_state_dict(plain.state_dict())
    x = torch.randn(4, 3, 5, 5)
    torch.testing.assert_close(global_(x), plain(x))
    torch.testing.assert_close(global_.running_var, plain.running_var)


@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum-0.1", "cumulative-average"])
def test_global_batch_norm_s_own_statistics_over_one_rank_are_batch_norm_s(monkeypatch, momentum):
    """The path taken under a process group (its sums, its running statistics, their gradients),
    here with one rank, whose all-reduce leaves the sums as they are: the output, the gradients
    and every buffer are BatchNorm2d's, over three steps, then in evaluation."""
    from capsnet import distributed

    reduced: list[torch.Size] = []
    monkeypatch.setattr(distributed, "active", lambda: True)
    monkeypatch.setattr(distributed.dist, "all_reduce", lambda t, op=None: reduced.append(t.shape))
    torch.manual_seed(0)
    plain = torch.nn.BatchNorm2d(3, momentum=momentum)
    with torch.no_grad():
        plain.weight.copy_(torch.rand(3) + 0.5)
        plain.bias.copy_(torch.randn(3))
    global_ = GlobalBatchNorm2d(3, momentum=momentum)
    global_.load_state_dict(plain.state_dict())
    for step in range(3):
        x = (torch.randn(4, 3, 5, 5) * (step + 1) + step).requires_grad_()
        x_copy = x.detach().clone().requires_grad_()
        out, want = global_(x), plain(x_copy)
        torch.testing.assert_close(out, want)
        weights = torch.randn(4, 3, 5, 5)  # a loss whose gradient differs per element
        (out * weights).sum().backward()
        (want * weights).sum().backward()
        torch.testing.assert_close(x.grad, x_copy.grad)
    assert len(reduced) > 0 and reduced[0] == torch.Size([4])  # the sums and the count went through it
    torch.testing.assert_close(global_.weight.grad, plain.weight.grad)
    torch.testing.assert_close(global_.bias.grad, plain.bias.grad)
    for name, buffer in plain.named_buffers():
        torch.testing.assert_close(dict(global_.named_buffers())[name], buffer, msg=name)
    global_.eval(), plain.eval()
    x = torch.randn(2, 3, 5, 5)
    torch.testing.assert_close(global_(x), plain(x))


def test_accumulating_two_half_batches_equals_one_whole_batch(tmp_path):
    whole = single_process(tmp_path, "whole", "train.batch_size=32", "model.batch_norm=false")
    halves = single_process(
        tmp_path, "halves", "train.batch_size=16", "train.accumulate=2", "model.batch_norm=false"
    )
    assert load_checkpoint(halves / "last.pt")["step"] == load_checkpoint(whole / "last.pt")["step"] == 6
    assert max_difference(whole / "last.pt", halves / "last.pt") < 1e-5
    apart = single_process(tmp_path, "apart", "train.batch_size=16", "model.batch_norm=false")
    assert max_difference(whole / "last.pt", apart / "last.pt") > 1e-3  # the comparison can fail


@pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="reads process states from /proc")
def test_a_launch_that_fails_leaves_none_of_its_processes_behind(tmp_path):
    grandchild = None
    sleeper = [sys.executable, "-c", SPAWNS_A_SLEEPER]
    with pytest.raises(AssertionError, match="the test failed"), launched(sleeper, tmp_path) as agent:
        grandchild = int(agent.stdout.readline())
        os.kill(grandchild, 0)  # it runs
        raise AssertionError("the test failed")
    assert agent.returncode == -signal.SIGKILL
    deadline = time.monotonic() + 10
    while running(grandchild) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not running(grandchild)


def running(pid: int) -> bool:
    """Whether ``pid`` is a live process (a killed one waiting to be reaped is not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


SPAWNS_A_SLEEPER = """
import subprocess, sys, time
sleeper = subprocess.Popen(
    [sys.executable, "-c", "import time; time.sleep(120)"],
    stdout=subprocess.DEVNULL,
    stderr=subprocess.DEVNULL,
)
print(sleeper.pid, flush=True)
time.sleep(120)
"""


# --------------------------------------------------------------------------- torchrun


@pytest.mark.slow
def test_two_processes_with_sync_bn_write_one_run_equal_to_one_process_with_the_global_batch(tmp_path):
    cmd = torchrun("--standalone", "--nproc-per-node", "2")
    cmd += ["--config", str(TINY), "--run-name", "ddp", *cli_overrides(tmp_path, "train.sync_bn=true")]
    result = launch(cmd, tmp_path)
    check(result)
    run = tmp_path / "weights" / "ddp"
    # rank 0 alone writes: one line per epoch, one set of checkpoints, one metrics file, one event file
    assert len([line for line in result.stdout.splitlines() if line.startswith("epoch ")]) == 2
    assert {p.name for p in run.iterdir()} == {
        "config.yaml",
        "metrics.jsonl",
        "run.json",
        "last.pt",
        "best.pt",
        "step-000003.pt",
        "step-000006.pt",
    }
    steps = [line["step"] for line in logged(run)]
    assert steps == sorted(set(steps)) and steps[-1] == 6  # 96 images / (2 ranks x 16) = 3 steps per epoch
    events = [p.name for p in (tmp_path / "runs" / "ddp").rglob("events.out.tfevents.*")]
    assert events and len({name.split(".")[-2] for name in events}) == 1  # all by one process (its pid)
    assert [p.name for p in (tmp_path / "weights").iterdir()] == ["ddp"]
    ckpt = load_checkpoint(run / "last.pt")
    assert ckpt["world_size"] == 2 and len(ckpt["rng_per_rank"]) == 2
    assert ckpt["images_seen"] == 192  # two epochs of 96 images, both processes' together
    one = single_process(tmp_path, "one", "train.batch_size=32")
    seen = [(line["step"], line["train/images_seen"]) for line in logged(run)]
    assert seen == [(line["step"], line["train/images_seen"]) for line in logged(one)]
    assert max_difference(run / "last.pt", one / "last.pt") < 1e-4
    test_acc = logged(run)[-1]["test/acc"]
    assert test_acc == logged(one)[-1]["test/acc"]
    # the routing statistics are the mean over both processes' halves: those of the whole batch
    lines = [(a, b) for a, b in zip(logged(run), logged(one)) if "train/loss" in a]
    keys = [k for k in lines[0][0] if k.startswith("routing/")]
    assert lines and keys
    for a, b in lines:
        assert [a[k] for k in keys] == pytest.approx([b[k] for k in keys], rel=1e-4, abs=1e-6), a["step"]


@pytest.mark.slow
def test_every_process_evaluates_the_saved_model_with_its_batch_norm_statistics(tmp_path):
    """Without train.sync_bn each process's batch norm (and its moving average) ran on its own
    batches; the evaluation logged, shared out between the processes, is that of the model saved.
    A test set of one image leaves a process with none to draw reconstructions from."""
    from capsnet.evaluate import evaluate_checkpoint

    settings = ["data.test_size=37", "train.eval_batch_size=8", "loss.kind=cross_entropy", "train.ema=0.9"]
    check(
        launch(
            torchrun("--standalone", "--nproc-per-node", "2")
            + ["--config", str(TINY), "--run-name", "bn"]
            + cli_overrides(tmp_path, *settings),
            tmp_path,
        )
    )
    run = tmp_path / "weights" / "bn"
    evaluations = [line for line in logged(run) if "test/loss" in line]
    assert [line["step"] for line in evaluations] == [3, 6]
    for line in evaluations:
        alone = evaluate_checkpoint(str(run / f"step-{line['step']:06d}.pt"), device="cpu", progress=False)
        assert alone.result.n == 37
        assert line["test/loss"] == pytest.approx(alone.result.loss, rel=1e-6), line["step"]
        assert line["test/acc"] == alone.result.acc
    one_image = launch(
        torchrun("--standalone", "--nproc-per-node", "2")
        + ["--config", str(TINY), "--run-name", "one"]
        + cli_overrides(tmp_path, "data.test_size=1"),
        tmp_path,
    )
    check(one_image)
    assert [line["step"] for line in logged(tmp_path / "weights" / "one") if "test/acc" in line] == [3, 6]


@pytest.mark.slow
def test_two_processes_distilling_from_a_teacher_equal_one_process_with_the_global_batch(tmp_path):
    teacher = single_process(tmp_path, "teacher", "train.epochs=1") / "best.pt"
    taught = ("train.sync_bn=true", f"loss.teacher={teacher}", "loss.teacher_weight=20")
    cmd = torchrun("--standalone", "--nproc-per-node", "2")
    cmd += ["--config", str(TINY), "--run-name", "ddp", *cli_overrides(tmp_path, *taught)]
    result = launch(cmd, tmp_path)
    check(result)
    assert "teacher's class activations of the 96 training images computed ahead" in result.stdout
    one = single_process(tmp_path, "one", "train.batch_size=32", *taught[1:])
    plain = single_process(tmp_path, "plain", "train.batch_size=32")
    run = tmp_path / "weights" / "ddp"
    apart = max_difference(run / "last.pt", one / "last.pt")
    assert apart < 1e-4, apart
    taught_apart = max_difference(one / "last.pt", plain / "last.pt")  # what the teacher changed
    assert taught_apart > 100 * apart


def looking_augmented(build_loaders):
    """``build_loaders`` whose training items look augmented: an evaluation transform of their own,
    equal to the training one. The teacher then runs on every batch instead of once ahead."""

    def augmenting(*args, **kwargs):
        loaders = build_loaders(*args, **kwargs)
        train = loaders.train.dataset
        train.eval_transform = copy.copy(train.transform)  # the same pixels, but not known to be
        return loaders

    return augmenting


# Runs `capsnet train` with looking_augmented (its very source) in place of the trainer's build_loaders.
PER_BATCH_TRAIN = f"""
import copy, sys
from capsnet import trainer
from capsnet.cli import app

{inspect.getsource(looking_augmented)}
trainer.build_loaders = looking_augmented(trainer.build_loaders)
sys.argv = ["capsnet", *sys.argv[1:]]
app()
"""


@pytest.mark.slow
def test_two_processes_running_the_teacher_on_every_batch_equal_one_process_with_the_global_batch(
    tmp_path, monkeypatch
):
    """The teacher's forward pass inside every process's step, as for augmented training data.

    Random augmentation itself cannot be compared: each rank draws from a stream of its own
    (capsnet.distributed.rank_seed), so two processes shift other images than one does. The
    items here are the synthetic set's fixed ones, only not known to be fixed: both runs
    train on the same pixels, and both run the teacher on every batch.
    """
    teacher = single_process(tmp_path, "teacher", "train.epochs=1") / "best.pt"
    taught = ("train.sync_bn=true", f"loss.teacher={teacher}", "loss.teacher_weight=20")
    script = tmp_path / "per_batch_train.py"
    script.write_text(PER_BATCH_TRAIN)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    cmd = [*launcher, str(script), "train", "--config", str(TINY), "--run-name", "ddp"]
    cmd += cli_overrides(tmp_path, *taught)
    result = launch(cmd, tmp_path)
    check(result)
    pinned = teacher.with_name(f"step-{load_checkpoint(teacher)['step']:06d}.pt")  # best.pt's own step file
    assert f"distilling from {pinned}" in result.stdout
    assert "computed ahead" not in result.stdout
    plain = single_process(tmp_path, "plain", "train.batch_size=32")
    monkeypatch.setattr(trainer, "build_loaders", looking_augmented(trainer.build_loaders))
    said: list[str] = []
    one = single_process(tmp_path, "one", "train.batch_size=32", *taught[1:], said=said)
    assert any(line.startswith(f"distilling from {pinned}") for line in said)
    assert not any("computed ahead" in line for line in said), said
    run = tmp_path / "weights" / "ddp"
    apart = max_difference(run / "last.pt", one / "last.pt")
    assert apart < 1e-4, apart
    taught_apart = max_difference(one / "last.pt", plain / "last.pt")  # what the teacher changed
    assert taught_apart > 100 * apart, (taught_apart, apart)


# Runs `capsnet train` with one fault put into one process: a SIGTERM to itself just after the
# step's stop agreement (inside the step's logging), or a NaN pixel in its batch of one step.
FAULTY_TRAIN = """
import os, signal, sys
import torch
from capsnet import trainer
from capsnet.cli import app

rank, step = int(os.environ["FAULT_RANK"]), int(os.environ["FAULT_STEP"])
log_step, train_step = trainer._log_step, trainer._train_step

def late_signal(run, *logged):
    log_step(run, *logged)
    if os.environ["FAULT"] == "sigterm" and run.dist.rank == rank and run.step == step:
        os.kill(os.getpid(), signal.SIGTERM)

def nan_batch(run, group, stop, *taught):
    if os.environ["FAULT"] == "nan" and run.dist.rank == rank and run.step + 1 == step:
        (x, y), *rest = group
        x = x.clone()
        x[0, 0, 0, 0] = float("nan")
        group = [(x, y), *rest]
    return train_step(run, group, stop, *taught)

trainer._log_step, trainer._train_step = late_signal, nan_batch
sys.argv = ["capsnet", *sys.argv[1:]]
app()
"""


def faulty_launch(tmp_path: Path, name: str, fault: str, rank: int, step: int) -> subprocess.CompletedProcess:
    script = tmp_path / "faulty_train.py"
    script.write_text(FAULTY_TRAIN)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        str(script),
    ]
    cmd += ["train", "--config", str(TINY), "--run-name", name, *cli_overrides(tmp_path)]
    env = {**os.environ, "FAULT": fault, "FAULT_RANK": str(rank), "FAULT_STEP": str(step)}
    with launched(cmd, tmp_path, env) as agent:
        out, err = agent.communicate(timeout=240)  # a hang fails here
    return subprocess.CompletedProcess(cmd, agent.returncode, out, err)


@pytest.mark.slow
def test_a_signal_that_reaches_one_process_after_the_steps_agreement_stops_every_process_together(tmp_path):
    # tiny.yaml on 2 processes: 3 steps an epoch, a log every 2 steps; rank 0 is signalled at step 4
    result = faulty_launch(tmp_path, "late", "sigterm", rank=0, step=4)
    assert "stopped by SIGTERM at step 5" in result.stdout, result.stdout[-3000:] + result.stderr[-3000:]
    ckpt = load_checkpoint(tmp_path / "weights" / "late" / "last.pt")
    assert ckpt["step"] == 5 and ckpt["batches_done"] == 2  # the next step, agreed by both, then saved


@pytest.mark.slow
def test_a_non_finite_batch_in_one_process_is_skipped_by_all_and_leaves_batch_norm_finite(tmp_path):
    result = faulty_launch(tmp_path, "nan", "nan", rank=1, step=3)  # the last step before epoch 1's save
    check(result)
    lines = logged(tmp_path / "weights" / "nan")
    assert [line["train/skipped_steps"] for line in lines if "train/skipped_steps" in line][-1] == 1
    ckpt = load_checkpoint(tmp_path / "weights" / "nan" / "last.pt")
    assert ckpt["step"] == 6 and all(
        torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point()
    )


@pytest.mark.slow
def test_the_weight_average_of_two_processes_equals_that_of_one(tmp_path):
    """Every rank's average starts from rank 0's weights (the ones DDP hands every rank), not its own."""
    ema = ["train.sync_bn=true", "train.ema=0.5", "train.epochs=1"]
    cmd = torchrun("--standalone", "--nproc-per-node", "2")
    cmd += ["--config", str(TINY), "--run-name", "ddp", *cli_overrides(tmp_path, *ema)]
    check(launch(cmd, tmp_path))
    run = tmp_path / "weights" / "ddp"
    one = single_process(tmp_path, "one", "train.batch_size=32", *ema)
    assert max_difference(run / "last.pt", one / "last.pt") < 1e-4
    # the test loss is summed over both ranks' halves of the test set, each scored by its own rank's average
    assert logged(run)[-1]["test/loss"] == pytest.approx(logged(one)[-1]["test/loss"], rel=1e-5)


@pytest.mark.slow
def test_a_two_node_launch_with_accumulation_equals_one_process(tmp_path):
    """Two torchrun agents (one process each) meet at a c10d rendezvous, as on two machines.

    The rendezvous store is hosted here, outside both agents (``is_host=false``): an agent
    that hosts it and finishes first would take it away from the other agent's last
    health check, and that agent would then fail after a finished run.
    """
    port, args = free_port(), ["--config", str(TINY), "--run-name", "nodes"]
    args += cli_overrides(tmp_path, "train.sync_bn=true", "train.batch_size=8", "train.accumulate=2")
    store = torch.distributed.TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False)
    launcher = ["--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "capsnet-test"]
    launcher += ["--rdzv-conf", "is_host=false"]
    commands = [
        torchrun("--nnodes", "2", "--node-rank", str(node), "--nproc-per-node", "1", *launcher) + args
        for node in (0, 1)
    ]
    with launched(commands[0], tmp_path) as first, launched(commands[1], tmp_path) as second:
        agents = [first, second]
        outputs = [agent.communicate(timeout=300) for agent in agents]
    del store
    for agent, (out, err) in zip(agents, outputs):
        assert agent.returncode == 0, out[-3000:] + err[-3000:]
    run = tmp_path / "weights" / "nodes"
    assert load_checkpoint(run / "last.pt")["step"] == 6
    one = single_process(tmp_path, "one", "train.batch_size=16", "train.accumulate=2")
    assert max_difference(run / "last.pt", one / "last.pt") < 1e-4


def children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        text = (task / "children").read_text().split()
        found += [int(child) for child in text]
    return found


def environment(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(item.decode(errors="replace").split("=", 1) for item in raw if b"=" in item)


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="finds the workers through /proc")
def test_a_killed_worker_is_restarted_by_torchrun_and_the_run_finishes_from_its_checkpoint(tmp_path):
    epochs = 6
    cmd = torchrun("--standalone", "--nproc-per-node", "2", "--max-restarts", "1")
    cmd += ["--config", str(TINY), "--run-name", "elastic", "--resume", "latest"]
    cmd += cli_overrides(tmp_path, "train.sync_bn=true", f"train.epochs={epochs}")
    env = {**os.environ, "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}  # see README: restarts need it
    run = tmp_path / "weights" / "elastic"
    with launched(cmd, tmp_path, env) as agent:
        deadline = time.monotonic() + 240
        while not step_checkpoints(run):
            assert agent.poll() is None and time.monotonic() < deadline, "no checkpoint was written"
            time.sleep(0.01)
        victim = next(pid for pid in children(agent.pid) if environment(pid).get("LOCAL_RANK") == "1")
        os.kill(victim, signal.SIGKILL)
        out, err = agent.communicate(timeout=300)
    assert agent.returncode == 0, out[-3000:] + err[-3000:]
    assert "torchrun restarted the workers (1 time so far)" in out
    assert "resumed from" in out
    ckpt = load_checkpoint(run / "last.pt")
    assert ckpt["step"] == 3 * epochs and ckpt["epoch"] == epochs
    one = single_process(
        tmp_path, "one", "train.batch_size=32", "train.sync_bn=true", f"train.epochs={epochs}"
    )
    assert max_difference(run / "last.pt", one / "last.pt") < 1e-4
