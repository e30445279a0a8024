"""The same code on a CUDA device: training, checkpoints that move between devices, bench, bf16.

Skipped where no CUDA device is present.
"""

from __future__ import annotations

import pytest
import torch
from helpers import TINY, logged, tiny

from capsnet import CapsNet, routing
from capsnet.bench import run_benchmark
from capsnet.checkpoint import load_checkpoint
from capsnet.config import load_config
from capsnet.evaluate import evaluate_checkpoint
from capsnet.trainer import fit

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def test_a_cuda_run_trains_and_its_checkpoint_evaluates_the_same_on_the_cpu(tmp_path):
    result = fit(tiny(tmp_path, "train.device=cuda", "train.epochs=3"), run_name="gpu", echo=lambda _m: None)
    assert result.stopped == "completed" and result.bad_steps == 0
    state = load_checkpoint(result.run_dir / "last.pt")
    assert state["step"] == result.step == 18
    out_dir = str(tmp_path / "weights")
    on_gpu = evaluate_checkpoint(str(result.run_dir / "last.pt"), out_dir, device="cuda", progress=False)
    on_cpu = evaluate_checkpoint(str(result.run_dir / "last.pt"), out_dir, device="cpu", progress=False)
    assert on_gpu.result.n == on_cpu.result.n == 32
    assert abs(on_gpu.result.correct - on_cpu.result.correct) <= 1
    assert on_gpu.result.loss == pytest.approx(on_cpu.result.loss, rel=1e-3, abs=1e-4)


def test_a_cuda_run_resumes_on_the_cpu(tmp_path):
    first = fit(
        tiny(tmp_path, "train.device=cuda", "train.max_steps=6"), run_name="move", echo=lambda _m: None
    )
    assert first.stopped == "max_steps"
    resumed = fit(tiny(tmp_path, "train.device=cpu"), resume="latest", run_name="move", echo=lambda _m: None)
    assert resumed.stopped == "completed" and resumed.step == 12


def test_bf16_autocast_on_cuda_keeps_routing_in_float32_and_finite():
    torch.manual_seed(0)
    model = CapsNet.from_preset("small", in_channels=1, num_classes=5, image_size=32).cuda()
    x = torch.rand(4, 1, 32, 32, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = model(x)
    assert out.activations.dtype == torch.float32 and out.poses.dtype == torch.float32
    assert torch.isfinite(out.activations).all() and torch.isfinite(out.poses).all()
    full = model(x)
    assert (out.activations - full.activations).abs().max() < 0.1


def test_bench_on_cuda_reports_gpu_memory():
    cfg = load_config(TINY)
    result = run_benchmark(cfg, batch_size=8, steps=2, device="cuda")
    assert result.device.startswith("cuda")
    assert result.peak_gpu_mib is not None and result.peak_gpu_mib > 0
    assert result.train_img_per_s > 0 and result.infer_img_per_s > 0


def test_compiled_routing_on_cuda_equals_eager_routing_for_outputs_and_gradients():
    torch.manual_seed(3)
    model = CapsNet.from_preset("small", in_channels=1, num_classes=10, image_size=28).cuda().double()
    x = torch.rand(6, 1, 28, 28, device="cuda", dtype=torch.float64)

    def run():
        model.zero_grad()
        out = model(x)
        (out.activations.sum() + out.poses.square().sum()).backward()
        used = [p for name, p in model.named_parameters() if not name.startswith("decoder")]
        return [out.activations, out.poses] + [p.grad.clone() for p in used]

    want = run()
    routing.use_compiled_kernels(True)
    try:
        got = run()
    finally:
        routing.use_compiled_kernels(False)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-8, rtol=1e-6)


def test_a_cuda_run_with_compiled_routing_logs_the_eager_runs_losses(tmp_path):
    def losses(name, *extra):
        cfg = tiny(tmp_path, "train.device=cuda", "train.epochs=1", *extra)
        result = fit(cfg, run_name=name, echo=lambda _m: None)
        assert result.stopped == "completed"
        return [r["train/loss"] for r in logged(result.run_dir) if "train/loss" in r]

    eager = losses("eager")
    compiled = losses("compiled", "train.compile_routing=true")
    assert eager and compiled == pytest.approx(eager, rel=1e-3, abs=1e-5)
