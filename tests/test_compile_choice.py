"""train.compile_routing: null (the default) compiles the routing's kernels on a CPU where they can be built."""

from __future__ import annotations

import json

import pytest
from helpers import TINY, broken_compiler, record_kernel_choice, tiny
from typer.testing import CliRunner

from capsnet import routing
from capsnet.cli import app
from capsnet.config import TrainConfig, load_config
from capsnet.trainer import fit


@pytest.fixture
def no_compiler(monkeypatch):
    monkeypatch.setattr(routing, "_kernel", broken_compiler)
    routing._check_kernels.cache_clear()
    yield
    routing._check_kernels.cache_clear()


def test_the_default_is_left_to_the_device():
    assert TrainConfig().compile_routing is None
    assert load_config(None).train.compile_routing is None


@pytest.mark.parametrize(
    ("setting", "device", "want"),
    [
        (True, "cpu", True),
        (False, "cpu", False),
        (True, "cuda", True),
        (None, "cuda", False),
        (None, "mps", False),
    ],
)
def test_an_explicit_setting_or_a_gpu_needs_no_compiler_check(no_compiler, setting, device, want):
    assert routing.choose_compiled_kernels(setting, device) == (want, None)


def test_the_default_compiles_on_a_cpu_that_can():
    assert routing.choose_compiled_kernels(None, "cpu") == (True, None)


def test_the_default_falls_back_to_the_eager_kernels_with_a_warning(no_compiler):
    compiled, warning = routing.choose_compiled_kernels(None, "cpu")
    assert not compiled
    assert "g++: not found" in warning and "train.compile_routing: false" in warning


def test_a_run_without_a_compiler_trains_eagerly_and_says_so(tmp_path, no_compiler, monkeypatch):
    seen, said = record_kernel_choice(monkeypatch), []
    result = fit(
        tiny(tmp_path, "train.compile_routing=null", "train.epochs=1"), run_name="r", echo=said.append
    )
    assert result.stopped == "completed"
    assert seen and not any(seen)
    assert any(line.startswith("warning: the routing's compiled kernels cannot be built") for line in said)
    assert any(line.startswith("device cpu") and "eager routing" in line for line in said)


def test_a_run_with_the_default_on_a_cpu_routes_with_the_compiled_kernels(tmp_path, monkeypatch):
    seen = record_kernel_choice(monkeypatch)
    said = []
    fit(tiny(tmp_path, "train.compile_routing=null", "train.max_steps=2"), run_name="r", echo=said.append)
    assert seen and all(seen) and not routing.compiled_kernels_enabled()
    assert said[0].startswith("routing: compiling its kernels for the CPU")
    assert any(line.startswith("device cpu") and "compiled routing" in line for line in said)


def test_bench_reports_which_kernels_it_timed(no_compiler):
    runner = CliRunner()
    args = ["bench", "--config", str(TINY), "--steps", "1", "--batch-size", "2", "--json"]
    eager = runner.invoke(app, args)
    assert eager.exit_code == 0, eager.output
    assert json.loads(eager.stdout.strip().splitlines()[-1])["compiled_routing"] is False
    fallback = runner.invoke(app, [*args, "-o", "train.compile_routing=null"])
    assert fallback.exit_code == 0, fallback.output
    assert "warning: the routing's compiled kernels cannot be built" in fallback.output
    assert json.loads(fallback.stdout.strip().splitlines()[-1])["compiled_routing"] is False


def test_bench_reports_the_compiled_kernels_where_it_timed_them():
    runner = CliRunner()
    args = ["bench", "--config", str(TINY), "--steps", "1", "--batch-size", "2"]
    try:
        compiled = runner.invoke(app, [*args, "--json", "-o", "train.compile_routing=true"])
        assert compiled.exit_code == 0, compiled.output
        assert json.loads(compiled.stdout.strip().splitlines()[-1])["compiled_routing"] is True
        text = runner.invoke(app, [*args, "-o", "train.compile_routing=true"])
        assert text.exit_code == 0 and text.stdout.rstrip().endswith("compiled routing"), text.output
    finally:
        routing.use_compiled_kernels(False)
    eager = runner.invoke(app, args)  # tiny.yaml: compile_routing false
    assert eager.exit_code == 0 and eager.stdout.rstrip().endswith("eager routing"), eager.output


def test_torch_s_note_on_a_missing_cuda_runtime_is_left_out_once_kernels_are_built(monkeypatch):
    """Where a CUDA toolkit is installed without a GPU, building the kernels for the CPU made torch
    log "No CUDA runtime is found, using CUDA_HOME=..." in the middle of training's output."""
    import logging

    logger = logging.getLogger("torch.utils.cpp_extension")
    monkeypatch.setattr(logger, "filters", [])
    routing._kernel.__wrapped__(routing._moments_kernel)  # the uncached function: torch.compile is lazy
    routing._kernel.__wrapped__(routing._quadratic_kernel)
    assert len(logger.filters) == 1  # once, however many kernels

    def record(msg: str, *args) -> logging.LogRecord:
        return logger.makeRecord(logger.name, logging.WARNING, __file__, 1, msg, args, None)

    assert not logger.filter(record("No CUDA runtime is found, using CUDA_HOME='%s'", "/usr/local"))
    assert logger.filter(record("some other note about %s", "extensions"))
