#!/usr/bin/env python3
"""capsnet's routing against the plain EM-routing transcription, measured in one run.

Runs `capsnet bench` and the baseline script alternately, several rounds, each in
a fresh process, and prints the median of each figure and the median ratios.
Both run the paper's small model on 1x32x32 inputs, 5 classes, 3 routing
iterations, batch 32, an Adam step per batch, with the same thread count.
Both processes get --threads as torch.set_num_threads and as OMP_NUM_THREADS and
MKL_NUM_THREADS (torch prefers an inherited MKL_NUM_THREADS to OMP_NUM_THREADS); a
side that reports another thread count ends the comparison.

    python scripts/bench_vs_baseline.py [--rounds 3] [--steps 5] [--baseline PATH] [--device cuda] [--compiled] [--json]

The baseline pads its first convolution (32x32 -> 16x16 -> 7x7 -> 5x5 capsule
grids); the paper and capsnet do not (14x14 -> 6x6 -> 4x4). capsnet is measured
both ways: `paper geometry` is what `configs/small.yaml` trains, `baseline
geometry` (-o model.stem_padding=2) routes the baseline's grids (normalising the
assignments across positions, as the paper does, where the baseline does so per patch). With
--compiled, both are also measured with `train.compile_routing: true` (the
routing's per-chunk contractions compiled by torch.compile; the compiling, in the
warm-up steps, is not timed).

With --device cuda both run on the GPU: the baseline script is run unchanged
with CUDA as torch's default device and a clock that waits for the GPU before
each reading, and memory is the peak of CUDA memory allocated by tensors
instead of the process's resident memory.

"RSS above torch" is the peak resident memory minus that of the process once
torch is imported, the same fixed cost on both sides (about 700 MiB with a
CUDA build of torch, even on a CPU): both processes read it at that point,
before importing anything else.

Both sides are measured alike: the same warm-up (one untimed step, the
baseline's; three with compiled routing, whose compiling they hold), the same
statistic (the mean time of the timed steps, which is what the baseline prints),
and the same memory allocator: with `--allocator tuned` (the default) the
baseline's process also gets the heap setting capsnet trains with
(capsnet.runtime.tune_allocator), with `--allocator default` neither does.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_BASELINE = ROOT.parent / "shared" / "bench" / "baseline_em.py"
LINE = re.compile(r"train ([\d.]+) img/s, inference ([\d.]+) img/s, peak RSS (\d+) MiB")

GEOMETRIES = {
    "paper geometry": [],
    "baseline geometry": ["-o", "model.stem_padding=2"],
}
#: The eager kernels, whatever a CPU's default (train.compile_routing: null) would choose.
VARIANTS = {name: extra + ["-o", "train.compile_routing=false"] for name, extra in GEOMETRIES.items()}
#: The same with the routing's contractions compiled (--compiled).
COMPILED = {
    f"{name}, compiled": extra + ["-o", "train.compile_routing=true"] for name, extra in GEOMETRIES.items()
}
#: The baseline's settings (3 routing iterations) and memory-lean routing (vote moments
#: rebuilt in backward, not kept), whatever configs/small.yaml says.
COMMON = ["-o", "model.iterations=3", "-o", "model.recompute_votes=true"]


#: Runs the baseline script unchanged: first notes the resident memory of the process once
#: torch is imported (the fixed cost both sides pay). On CUDA, tensors and parameters default
#: to the GPU and every clock reading first waits for queued GPU work, so the timings cover
#: the work itself; the peak of CUDA memory allocated is printed at the end.
BASELINE_WRAPPER = """
import resource, runpy, sys, time, torch
_unit = 2**20 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
print(f"torch alone {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / _unit:.0f} MiB")
device, allocator, threads, path = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
torch.set_num_threads(threads)  # as capsnet bench --threads does, whatever MKL_NUM_THREADS says
if allocator == "tuned":
    from capsnet.runtime import tune_allocator
    print(f"allocator tuned {tune_allocator()}")
else:
    print("allocator tuned False")
if device == "cuda":
    torch.set_default_device("cuda")
    _clock = time.perf_counter
    def _synced_clock():
        torch.cuda.synchronize()
        return _clock()
    time.perf_counter = _synced_clock
sys.argv = sys.argv[4:]
runpy.run_path(path, run_name="__main__")
if device == "cuda":
    print(f"peak GPU memory {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB")
"""
#: Runs ``capsnet bench`` after reading the process's memory once torch is imported, as the
#: baseline's wrapper does (on stderr: stdout is the benchmark's JSON).
CAPSNET_WRAPPER = """
import resource, sys, torch
_unit = 2**20 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
print(f"torch alone {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / _unit:.0f} MiB", file=sys.stderr)
from capsnet.cli import main
sys.argv = ["capsnet", *sys.argv[1:]]
main()
"""
GPU_LINE = re.compile(r"peak GPU memory (\d+) MiB")
BASE_LINE = re.compile(r"torch alone (\d+) MiB")
TUNED_LINE = re.compile(r"allocator tuned (True|False)")
THREADS_LINE = re.compile(r"threads (\d+)\)")


def _thread_env(threads: int) -> dict[str, str]:
    """Both children's environment: torch takes its thread count from MKL_NUM_THREADS before
    OMP_NUM_THREADS, so an inherited MKL_NUM_THREADS=1 would otherwise run one side on one thread."""
    return dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))


def _check_threads(side: str, ran: int, args) -> None:
    if ran != args.threads:
        ran_threads = f"{ran} thread{'' if ran == 1 else 's'}"
        raise SystemExit(f"error: {side} ran with {ran_threads}, not the {args.threads} asked for")


def _read(pattern: re.Pattern, out: str, what: str) -> re.Match:
    m = pattern.search(out)
    if not m:
        raise SystemExit(f"could not read the baseline's {what}:\n{out}")
    return m


def _run(cmd: list[str], what: str, **kwargs) -> subprocess.CompletedProcess:
    """Runs ``cmd``; a failure ends the script with one line naming ``what`` and the child's last error line."""
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, **kwargs)
    if proc.returncode != 0:
        lines = [line.strip() for line in proc.stderr.splitlines() if line.strip()]
        last = lines[-1] if lines else f"no output (exit code {proc.returncode})"
        raise SystemExit(f"error: {what} failed: {last}")
    return proc


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def run_capsnet(extra: list[str], args) -> dict:
    cmd = [
        sys.executable,
        "-c",
        CAPSNET_WRAPPER,
        "bench",
        "--config",
        str(ROOT / "configs" / "small.yaml"),
        "-o",
        "model.decoder=false",
        "--image-size",
        "32",
        "--classes",
        "5",
        "--batch-size",
        str(args.batch),
        "--steps",
        str(args.steps),
        "--threads",
        str(args.threads),
        "--device",
        args.device,
        "--warmup",
        "1",  # the baseline's one untimed step (compiled routing takes three, for its compiling)
        "--allocator",
        args.allocator,
        "--json",
        *COMMON,
        *extra,
    ]
    proc = _run(cmd, "capsnet bench", cwd=ROOT, env=_thread_env(args.threads))
    out = json.loads(proc.stdout)
    _check_threads("capsnet bench", out["threads"], args)
    # the baseline's statistic: images over the mean time of the timed steps
    out["train_img_per_s"], out["infer_img_per_s"] = out["train_img_per_s_mean"], out["infer_img_per_s_mean"]
    out["memory_mib"] = out["peak_gpu_mib"] if args.device == "cuda" else out["peak_rss_mib"]
    out["above_torch_mib"] = out["peak_rss_mib"] - float(
        _read(BASE_LINE, proc.stderr, "memory after import")[1]
    )
    return out


def run_baseline(args) -> dict:
    cmd = [sys.executable, "-c", BASELINE_WRAPPER, args.device, args.allocator, str(args.threads)]
    cmd += [str(args.baseline), "--batch", str(args.batch), "--steps", str(args.steps)]
    out = _run(cmd, f"the baseline {args.baseline}", env=_thread_env(args.threads)).stdout
    m = _read(LINE, out, "output")
    threads = THREADS_LINE.search(out[m.end() :].partition("\n")[0])
    if threads:  # the baseline names its thread count at the end of its line
        _check_threads("the baseline", int(threads[1]), args)
    # the baseline divides ru_maxrss by 1024 whatever the platform: on macOS that is bytes
    rss = float(m[3]) / (1024 if sys.platform == "darwin" else 1)
    result = {"train_img_per_s": float(m[1]), "infer_img_per_s": float(m[2]), "peak_rss_mib": rss}
    result["allocator_tuned"] = _read(TUNED_LINE, out, "allocator setting")[1] == "True"
    cuda = args.device == "cuda"
    result["memory_mib"] = float(_read(GPU_LINE, out, "GPU memory")[1]) if cuda else result["peak_rss_mib"]
    result["above_torch_mib"] = result["peak_rss_mib"] - float(
        _read(BASE_LINE, out, "memory after import")[1]
    )
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=_positive, default=3)
    ap.add_argument("--steps", type=_positive, default=5)
    ap.add_argument("--batch", type=_positive, default=32)
    ap.add_argument("--threads", type=_positive, default=2)
    ap.add_argument("--baseline", type=Path, default=DEFAULT_BASELINE)
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--compiled", action="store_true", help="also time train.compile_routing: true")
    ap.add_argument(
        "--allocator",
        choices=("tuned", "default"),
        default="tuned",
        help="the heap setting of both processes: capsnet's (tuned) or the C library's (default)",
    )
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    variants = {**VARIANTS, **(COMPILED if args.compiled else {})}
    if not args.baseline.exists():
        raise SystemExit(f"baseline script not found: {args.baseline} (pass --baseline PATH)")

    runs: dict[str, list[dict]] = {"baseline": [], **{k: [] for k in variants}}
    for r in range(args.rounds):
        runs["baseline"].append(run_baseline(args))
        for name, extra in variants.items():
            runs[name].append(run_capsnet(extra, args))
        print(f"round {r + 1}/{args.rounds} done", file=sys.stderr)

    keys = ("train_img_per_s", "infer_img_per_s", "memory_mib", "above_torch_mib")
    med = {name: {k: statistics.median(x[k] for x in rs) for k in keys} for name, rs in runs.items()}
    base = med["baseline"]
    memory = "peak GPU memory" if args.device == "cuda" else "peak RSS"
    report = {
        "allocator": args.allocator,
        "rounds": args.rounds,
        "batch": args.batch,
        "threads": args.threads,
        "device": args.device,
        "memory": memory,
        "median": med,
        "ratio": {},
    }
    report["allocator_tuned"] = {name: all(x["allocator_tuned"] for x in rs) for name, rs in runs.items()}
    for name in variants:
        report["ratio"][name] = {
            "train_speedup": med[name]["train_img_per_s"] / base["train_img_per_s"],
            "inference_speedup": med[name]["infer_img_per_s"] / base["infer_img_per_s"],
            "memory_fraction": med[name]["memory_mib"] / base["memory_mib"],
            "above_torch_fraction": med[name]["above_torch_mib"] / base["above_torch_mib"],
        }
    if args.json:
        print(json.dumps(report, indent=2))
        return
    width = max(len(name) for name in med)
    print(
        f"median of {args.rounds} rounds on {args.device}, batch {args.batch}, {args.threads} threads, "
        f"1x32x32, 5 classes, 3 iterations, {args.allocator} allocator on both sides"
    )
    print(
        f"{'':{width}} {'train img/s':>12} {'infer img/s':>12} {memory + ' MiB':>20} {'RSS above torch MiB':>20}"
    )
    for name, m in med.items():
        print(
            f"{name:{width}} {m['train_img_per_s']:12.1f} {m['infer_img_per_s']:12.1f} {m['memory_mib']:20.0f} "
            f"{m['above_torch_mib']:20.0f}"
        )
    for name, r in report["ratio"].items():
        print(ratio_line(name, r, args.device))


def ratio_line(name: str, r: dict, device: str) -> str:
    """One variant's ratios; on CUDA the memory is the GPU's and the resident memory is the host's."""
    head = f"{name}: train x{r['train_speedup']:.1f}, inference x{r['inference_speedup']:.1f}, "
    if device == "cuda":
        return (
            head + f"peak GPU memory {r['memory_fraction']:.2f} of the baseline's "
            f"(host resident memory above the import of torch {r['above_torch_fraction']:.2f} of the baseline's)"
        )
    return (
        head + f"memory {r['memory_fraction']:.2f} of the baseline's "
        f"({r['above_torch_fraction']:.2f} above the resident memory of importing torch)"
    )


if __name__ == "__main__":
    main()
