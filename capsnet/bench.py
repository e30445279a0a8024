"""Throughput and memory of a config's model on synthetic data of its geometry."""

from __future__ import annotations

import resource
import statistics
import sys
import time
from dataclasses import asdict, dataclass

import torch

from capsnet.config import Config, ConfigError, DataConfig
from capsnet.evaluate import resolve_device
from capsnet.model import CapsNet
from capsnet.routing import choose_compiled_kernels, compiled_kernels_enabled, use_compiled_kernels
from capsnet.runtime import allocator_is_tuned, tune_allocator
from capsnet.tracking import counted

#: (channels, classes, image size) of each dataset, so a benchmark needs no data on disk.
DATASET_GEOMETRY = {
    "mnist": (1, 10, 28),
    "fashion-mnist": (1, 10, 28),
    "cifar10": (3, 10, 32),
    "svhn": (3, 10, 32),
    "smallnorb": (2, 5, 32),
    "folder": (3, 10, 32),
}


@dataclass
class BenchResult:
    train_img_per_s: float
    infer_img_per_s: float
    train_ms_per_step: float
    infer_ms_per_step: float
    peak_rss_mib: float  # peak resident memory of the process over the training and inference steps
    base_rss_mib: float  # resident memory before the model was built (torch itself)
    parameters: int
    batch_size: int
    image_size: int
    channels: int
    classes: int
    iterations: int
    threads: int
    steps: int
    device: str
    peak_gpu_mib: float | None = None  # peak CUDA memory allocated by tensors (CUDA runs only)
    compiled_routing: bool = False  # whether the routing's compiled kernels were used (train.compile_routing)
    warning: str | None = None  # why they were not, where train.compile_routing was left to choose
    #: the same throughputs from the mean time of the timed steps (the figures above use the median)
    train_img_per_s_mean: float | None = None
    infer_img_per_s_mean: float | None = None
    warmup: int = 2  # untimed steps before each timed series
    allocator_tuned: bool = False  # the process's heap tuned (capsnet.runtime.tune_allocator), as in training

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        return (
            f"train {self.train_img_per_s:.1f} img/s ({self.train_ms_per_step:.0f} ms/step), "
            f"inference {self.infer_img_per_s:.1f} img/s ({self.infer_ms_per_step:.0f} ms/step), "
            f"peak RSS {self.peak_rss_mib:.0f} MiB (torch alone {self.base_rss_mib:.0f} MiB); "
            f"{self.parameters:,} parameters, batch {self.batch_size}, "
            f"{self.channels}x{self.image_size}x{self.image_size}, {self.classes} classes, "
            f"{self.iterations} iterations, {counted(self.threads, 'thread')}, {self.device}, "
            + ("compiled" if self.compiled_routing else "eager")
            + " routing"
            + (f"; peak GPU memory {self.peak_gpu_mib:.0f} MiB" if self.peak_gpu_mib is not None else "")
        )


def _rss_mib() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux


def geometry(data: DataConfig) -> tuple[int, int, int]:
    if data.name == "synthetic":
        return data.channels, data.num_classes, data.image_size or 32
    channels, classes, size = DATASET_GEOMETRY[data.name]
    if data.name == "smallnorb" and data.stereo == "samples":
        channels = 1
    if data.name == "folder" and data.grayscale:
        channels = 1
    return channels, classes, data.image_size or size


def _spread(activations: torch.Tensor, target: torch.Tensor, margin: float) -> torch.Tensor:
    a_t = activations.gather(1, target[:, None])
    return (torch.clamp(margin - (a_t - activations), min=0) ** 2).sum() / activations.shape[0]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def _bench_device(name: str) -> torch.device:
    """``auto``: CUDA, then MPS, then the CPU, as training picks; ``cuda:N`` one GPU.

    An unknown or unavailable device is a ConfigError.
    """
    return resolve_device(name, option="--device")


def run_benchmark(
    cfg: Config,
    batch_size: int = 32,
    steps: int = 10,
    warmup: int = 2,
    image_size: int | None = None,
    classes: int | None = None,
    device: str = "cpu",
    threads: int | None = None,
    tune: bool = True,
) -> BenchResult:
    """Times training steps (forward, spread loss, backward, Adam) and inference batches.

    ``tune``: keep freed memory in the heap as training does (capsnet.runtime.tune_allocator);
    off, the C library's default allocator, for comparing with code that does not tune it.
    """
    tuned = tune_allocator() if tune else allocator_is_tuned()  # the setting lasts for the process
    base_rss = _rss_mib()  # torch alone, before any compiling
    dev = _bench_device(device)
    compiled_before = compiled_kernels_enabled()
    compiled, warning = choose_compiled_kernels(cfg.train.compile_routing, dev.type)
    use_compiled_kernels(compiled)
    try:
        result = _run(cfg, batch_size, steps, warmup, image_size, classes, dev, threads, base_rss)
        result.warning, result.allocator_tuned = warning, tuned
        return result
    finally:
        use_compiled_kernels(compiled_before)


def _run(cfg, batch_size, steps, warmup, image_size, classes, dev, threads, base_rss) -> BenchResult:
    compiled = compiled_kernels_enabled()
    if compiled:
        warmup = max(warmup, 3)  # the first calls compile (and recompile for a second chunk shape)
    if threads:
        torch.set_num_threads(threads)
    channels, num_classes, size = geometry(cfg.data)
    size = image_size or size
    num_classes = classes or num_classes
    torch.manual_seed(cfg.train.seed)
    try:
        model = CapsNet.from_config(cfg.model, cfg.routing, channels, num_classes, size).to(dev)
    except ValueError as e:  # a geometry the layers cannot take
        raise ConfigError([f"{size}x{size} images: {e}"]) from None
    opt = torch.optim.Adam(model.parameters(), lr=cfg.optim.lr)
    x = torch.randn(batch_size, channels, size, size, device=dev)
    y = torch.randint(0, num_classes, (batch_size,), device=dev)
    use_recon = model.decoder is not None and cfg.loss.recon_weight > 0

    def train_step():
        out = model(x)
        loss = _spread(out.activations, y, cfg.loss.margin_start)
        if use_recon:
            loss = (
                loss
                + cfg.loss.recon_weight * (model.reconstruct(out.poses, y) - x).square().sum() / batch_size
            )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def timed(fn, n) -> tuple[float, float]:
        """The median and the mean seconds of ``n`` calls."""
        times = []
        for _ in range(n):
            _sync(dev)
            t0 = time.perf_counter()
            fn()
            _sync(dev)
            times.append(time.perf_counter() - t0)
        return statistics.median(times), statistics.fmean(times)

    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    model.train()
    for _ in range(warmup):
        train_step()
    train_s, train_mean = timed(train_step, steps)
    model.eval()
    with torch.no_grad():
        for _ in range(warmup):
            model(x)
        infer_s, infer_mean = timed(lambda: model(x), steps)
    # the peaks of the whole run, inference included, as the baseline reads its own
    peak = _rss_mib()
    peak_gpu = torch.cuda.max_memory_allocated(dev) / 2**20 if dev.type == "cuda" else None
    return BenchResult(
        train_img_per_s=batch_size / train_s,
        infer_img_per_s=batch_size / infer_s,
        train_ms_per_step=train_s * 1000,
        infer_ms_per_step=infer_s * 1000,
        peak_rss_mib=peak,
        base_rss_mib=base_rss,
        parameters=model.num_parameters(),
        batch_size=batch_size,
        image_size=size,
        channels=channels,
        classes=num_classes,
        iterations=cfg.model.iterations,
        threads=torch.get_num_threads(),
        steps=steps,
        device=str(dev),
        peak_gpu_mib=peak_gpu,
        compiled_routing=compiled,
        train_img_per_s_mean=batch_size / train_mean,
        infer_img_per_s_mean=batch_size / infer_mean,
        warmup=warmup,
    )
