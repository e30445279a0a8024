#!/usr/bin/env python3
"""capsnet's routing against the plain EM-routing transcription, measured in one run.

Runs `capsnet bench` and the baseline script alternately, several rounds, each in
a fresh process (the baseline first in one round, last in the next), and prints the
median of each figure, the median ratios and the range of each round's own ratios.

First it checks that the two route alike: the same random votes go through the
baseline's `em_routing` and through capsnet's routing normalised per patch (the
baseline's way; `model.normalisation: per_patch`) with the baseline's eps as its
variance floor; poses and activations must agree to 1e-4 and 1e-5, or the script
stops before timing anything.
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
#: The yardstick: $CAPSNET_BASELINE, else ../shared/bench/baseline_em.py beside the checkout.
DEFAULT_BASELINE = Path(
    os.environ.get("CAPSNET_BASELINE") or ROOT.parent / "shared" / "bench" / "baseline_em.py"
)
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
#: Routes the same random votes through the baseline's em_routing and capsnet's routing
#: normalised per patch, as the baseline's is, with its variance floor (its eps), in float64;
#: prints the largest differences of the parents' poses and activations as JSON.
AGREEMENT_CHECK = """
import importlib.util, json, sys, torch
spec = importlib.util.spec_from_file_location("baseline_em", sys.argv[1])
baseline = importlib.util.module_from_spec(spec)
spec.loader.exec_module(baseline)
if not callable(getattr(baseline, "em_routing", None)):
    raise SystemExit(f"{sys.argv[1]} has no em_routing(v, a_in, beta_u, beta_a, iters) to check against")
from capsnet.routing import RoutingSettings, em_routing
gen = torch.Generator().manual_seed(0)
worst = {"pose": 0.0, "activation": 0.0}
for iters in (1, 2, 3):
    n, i, j = 4, 72, 16  # a ConvCaps1 patch of the small model: K*K*B = 3*3*8 children, C = 16 parents
    v = torch.randn(n, i, j, 16, generator=gen, dtype=torch.float64)
    a = torch.rand(n, i, 1, generator=gen, dtype=torch.float64)
    beta_u = 0.1 * torch.randn(j, generator=gen, dtype=torch.float64)
    beta_a = 0.1 * torch.randn(j, generator=gen, dtype=torch.float64)
    mu, act = baseline.em_routing(v, a, beta_u, beta_a, iters)
    ours = em_routing(
        v.permute(0, 2, 1, 3).unsqueeze(1), a.squeeze(-1).unsqueeze(1), beta_u, beta_a,
        RoutingSettings(iterations=iters, min_var=1e-6), None,
    )
    worst["pose"] = max(worst["pose"], (ours.pose.squeeze(1) - mu.reshape(n, j, 16)).abs().max().item())
    worst["activation"] = max(worst["activation"], (ours.activation.squeeze(1) - act.reshape(n, j)).abs().max().item())
print(json.dumps(worst))
"""
#: How far apart the two may be: the baseline adds its eps to each sum of assignments and to
#: the variance, capsnet floors the variance; that moves the poses by about 1e-6.
AGREEMENT_TOLERANCE = {"pose": 1e-4, "activation": 1e-5}
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
        raise SystemExit(f"error: could not read {what}:\n{out}")
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


def check_agreement(args) -> dict[str, float]:
    """The largest differences between the baseline's routing and capsnet's on the same votes;
    ends the script where they are larger than rounding and the baseline's eps explain."""
    cmd = [sys.executable, "-c", AGREEMENT_CHECK, str(args.baseline)]
    proc = _run(cmd, f"the routing check against {args.baseline}", cwd=ROOT, env=_thread_env(args.threads))
    worst = json.loads(proc.stdout.strip().splitlines()[-1])
    off = [
        f"{k} {worst[k]:.2g} (at most {tol:g})"
        for k, tol in AGREEMENT_TOLERANCE.items()
        if not worst[k] <= tol
    ]
    if off:
        raise SystemExit(
            f"error: capsnet's routing (normalised per patch) and the baseline's em_routing disagree on the "
            f"same votes: largest differences {', '.join(off)}; the two would not be doing the same work"
        )
    return worst


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
        _read(BASE_LINE, proc.stderr, "capsnet bench's memory after import")[1]
    )
    return out


def run_baseline(args) -> dict:
    cmd = [sys.executable, "-c", BASELINE_WRAPPER, args.device, args.allocator, str(args.threads)]
    cmd += [str(args.baseline), "--batch", str(args.batch), "--steps", str(args.steps)]
    out = _run(cmd, f"the baseline {args.baseline}", env=_thread_env(args.threads)).stdout
    m = _read(LINE, out, "the baseline's output")
    threads = THREADS_LINE.search(out[m.end() :].partition("\n")[0])
    if threads:  # the baseline names its thread count at the end of its line
        _check_threads("the baseline", int(threads[1]), args)
    # the baseline divides ru_maxrss by 1024 whatever the platform: on macOS that is bytes
    rss = float(m[3]) / (1024 if sys.platform == "darwin" else 1)
    result = {"train_img_per_s": float(m[1]), "infer_img_per_s": float(m[2]), "peak_rss_mib": rss}
    result["allocator_tuned"] = _read(TUNED_LINE, out, "the baseline's allocator setting")[1] == "True"
    cuda = args.device == "cuda"
    result["memory_mib"] = (
        float(_read(GPU_LINE, out, "the baseline's GPU memory")[1]) if cuda else result["peak_rss_mib"]
    )
    result["above_torch_mib"] = result["peak_rss_mib"] - float(
        _read(BASE_LINE, out, "the baseline's memory after import")[1]
    )
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=_HelpFormatter)
    ap.add_argument(
        "--rounds", type=_positive, default=3, help="rounds; each runs every side once, in a fresh process"
    )
    ap.add_argument(
        "--steps", type=_positive, default=5, help="timed steps of each side, training and inference alike"
    )
    ap.add_argument("--batch", type=_positive, default=32, help="images per step")
    ap.add_argument("--threads", type=_positive, default=2, help="CPU threads of each side")
    ap.add_argument(
        "--baseline",
        type=Path,
        default=DEFAULT_BASELINE,
        help="the baseline script: $CAPSNET_BASELINE, else ../shared/bench/baseline_em.py beside the checkout",
    )
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where both sides run")
    ap.add_argument("--compiled", action="store_true", help="also time train.compile_routing: true")
    ap.add_argument(
        "--allocator",
        choices=("tuned", "default"),
        default="tuned",
        help="the heap setting of both processes: capsnet's (tuned) or the C library's (default)",
    )
    ap.add_argument("--json", action="store_true", help="print the report as JSON")
    args = ap.parse_args()
    args.baseline = args.baseline.expanduser().absolute()  # the routing check runs in the checkout
    variants = {**VARIANTS, **(COMPILED if args.compiled else {})}
    if not args.baseline.is_file():
        raise SystemExit(
            f"error: baseline script not found: {args.baseline} (pass --baseline PATH, or set CAPSNET_BASELINE)"
        )
    agreement = check_agreement(args)
    print(
        f"routing checked against the baseline's on the same votes: largest differences pose "
        f"{agreement['pose']:.1g}, activation {agreement['activation']:.1g}",
        file=sys.stderr,
    )

    runs: dict[str, list[dict]] = {"baseline": [], **{k: [] for k in variants}}
    for r in range(args.rounds):
        # the baseline first in one round, last in the next: neither side always runs on a cooler machine
        order = ["baseline", *variants] if r % 2 == 0 else [*variants, "baseline"]
        for name in order:
            runs[name].append(run_baseline(args) if name == "baseline" else run_capsnet(variants[name], args))
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
        "routing_agreement": agreement,
        "median": med,
        "ratio": {},
        "ratio_range": {},
    }
    report["allocator_tuned"] = {name: all(x["allocator_tuned"] for x in rs) for name, rs in runs.items()}
    for name in variants:
        report["ratio"][name] = ratios(med[name], base)
        # each round's ratios, of the two sides measured in it: how much the machine moved them
        rounds = [ratios(ours, theirs) for ours, theirs in zip(runs[name], runs["baseline"])]
        report["ratio_range"][name] = {
            k: [min(r[k] for r in rounds), max(r[k] for r in rounds)] for k in rounds[0]
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
    if args.rounds > 1:
        print("each round's own ratios (lowest-highest):")
        for name, span in report["ratio_range"].items():
            print(
                f"  {name}: train x{span['train_speedup'][0]:.1f}-{span['train_speedup'][1]:.1f}, inference "
                f"x{span['inference_speedup'][0]:.1f}-{span['inference_speedup'][1]:.1f}, memory "
                f"{span['memory_fraction'][0]:.2f}-{span['memory_fraction'][1]:.2f} "
                f"({span['above_torch_fraction'][0]:.2f}-{span['above_torch_fraction'][1]:.2f} above torch)"
            )


def ratios(ours: dict, base: dict) -> dict[str, float]:
    return {
        "train_speedup": ours["train_img_per_s"] / base["train_img_per_s"],
        "inference_speedup": ours["infer_img_per_s"] / base["infer_img_per_s"],
        "memory_fraction": ours["memory_mib"] / base["memory_mib"],
        "above_torch_fraction": ours["above_torch_mib"] / base["above_torch_mib"],
    }


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The description as written, and each option's default after its help."""


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
