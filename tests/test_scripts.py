"""The helper scripts under scripts/: learning-curve plots, the baseline comparison, class
activations, the set-up script and reproduce_fashion.sh."""

from __future__ import annotations

import importlib.util
import json
import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def fake_run(folder: Path, batch: int, rows: list[dict]) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(f"train:\n  batch_size: {batch}\n  accumulate: 2\n")
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def test_plot_curves_writes_a_png_of_train_and_eval_accuracy(tmp_path):
    plot = load_script("plot_curves")
    rows = [{"step": s, "train/loss": 1.0 / s, "train/acc": 0.1 + s / 100} for s in range(1, 40)]
    rows[19]["val/acc"] = 0.4
    rows[38]["val/acc"] = 0.6
    run = fake_run(tmp_path / "run-a", 16, rows)
    out = tmp_path / "figs" / "curves.png"
    assert plot.main([str(run), "--out", str(out), "--labels", "small"]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert plot.batch_size(run) == 32  # batch 16 x accumulate 2
    import torch

    from capsnet.checkpoint import CHECKPOINT_FORMAT

    ckpt = {"format": CHECKPOINT_FORMAT, "model": {}, "step": 39, "epoch": 1, "config": {}, "arch": {}}
    torch.save({**ckpt, "world_size": 2}, run / "step-000039.pt")  # a torchrun run of two processes
    assert plot.batch_size(run) == 64
    assert plot.smooth([1.0, 3.0, 5.0], 2) == [1.0, 2.0, 4.0]


def test_plot_curves_labels_the_loss_of_each_run_where_there_are_several(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    plot = load_script("plot_curves")
    drawn = []
    monkeypatch.setattr(Figure, "savefig", lambda fig, *a, **k: drawn.append(fig))
    rows = [{"step": s, "train/loss": 1.0 / s, "train/acc": 0.1 + s / 100} for s in range(1, 6)]
    runs = [str(fake_run(tmp_path / name, 16, rows)) for name in ("a", "b")]
    assert plot.main([*runs, "--out", str(tmp_path / "two.png"), "--labels", "first", "second"]) == 0
    assert plot.main([runs[0], "--out", str(tmp_path / "one.png")]) == 0
    (_, two_loss), (_, one_loss) = (fig.axes for fig in drawn)
    assert [t.get_text() for t in two_loss.get_legend().get_texts()] == ["first", "second"]
    assert one_loss.get_legend() is None  # one run: its colour is named in the accuracy panel


def test_plot_curves_draws_a_window_of_skipped_steps_as_a_gap(tmp_path):
    import math

    plot = load_script("plot_curves")
    rows = [{"step": s, "train/loss": 1.0, "train/acc": 0.5} for s in range(1, 6)]
    rows[2]["train/loss"] = "nan"  # a window whose steps were all skipped (metrics.jsonl writes NaN so)
    rows[4]["test/acc"] = 0.5
    run = fake_run(tmp_path / "run-nan", 16, rows)
    out = tmp_path / "curves.png"
    assert plot.main([str(run), "--out", str(out), "--smooth", "2"]) == 0
    assert plot.smooth([1.0, math.nan, 3.0, 5.0], 2) == [1.0, 1.0, 3.0, 4.0]
    assert math.isnan(plot.smooth([math.nan], 3)[0])


def test_plot_curves_places_a_run_resumed_with_a_larger_batch_by_the_images_it_saw(tmp_path):
    from helpers import tiny

    from capsnet.trainer import fit

    plot = load_script("plot_curves")
    fit(tiny(tmp_path, "train.batch_size=4", "train.max_steps=4"), run_name="grown", echo=lambda _msg: None)
    result = fit(
        tiny(tmp_path, "train.batch_size=8", "train.max_steps=8"), resume="grown", echo=lambda _msg: None
    )
    rows = plot.read_metrics(result.run_dir)
    assert [r["step"] for r in rows] == [2, 4, 6, 8]  # logged every 2 steps, evaluated at 4 and 8
    # steps 1-4 of 4 images, then of 8: not step x 8, the batch of the config the run ended with
    assert plot.images_seen(result.run_dir, rows) == [8.0, 16.0, 32.0, 48.0]
    out = tmp_path / "curves.png"
    assert plot.main([str(result.run_dir), "--out", str(out)]) == 0


def test_plot_curves_places_the_rows_of_an_older_metrics_file_at_step_times_the_global_batch(tmp_path):
    import math

    plot = load_script("plot_curves")
    rows = [{"step": s, "train/acc": 0.5} for s in (2, 4)] + [{"step": 5, "test/acc": 0.5}]
    older = fake_run(tmp_path / "older", 16, rows)  # no train/images_seen: batch 16 x accumulate 2
    assert plot.images_seen(older, rows) == [64.0, 128.0, 160.0]
    # rows before a resume from a checkpoint without the count go at the images per step up to
    # the first counted row: here 10 a step, the batch the run started with
    rows += [{"step": 6, "train/acc": 0.5, "train/images_seen": 60}, {"step": 8, "train/images_seen": 100}]
    resumed = fake_run(tmp_path / "resumed", 20, rows)
    assert plot.images_seen(resumed, rows) == [20.0, 40.0, 50.0, 60.0, 100.0]
    assert math.isnan(plot.images_seen(resumed, [{"test/acc": 0.5}])[0])  # a row without a step


def test_plot_curves_skips_a_metrics_line_cut_short_by_a_crash(tmp_path, capsys):
    plot = load_script("plot_curves")
    rows = [{"step": s, "train/loss": 1.0 / s, "train/acc": 0.1 + s / 100} for s in range(1, 10)]
    run = fake_run(tmp_path / "run-cut", 16, rows)
    with (run / "metrics.jsonl").open("a") as handle:
        handle.write('{"step": 10, "train/lo')
    assert [row["step"] for row in plot.read_metrics(run)] == list(range(1, 10))
    assert "skipped 1 damaged line" in capsys.readouterr().err
    out = tmp_path / "curves.png"
    assert plot.main([str(run), "--out", str(out)]) == 0 and out.is_file()


def test_plot_curves_names_a_folder_that_is_not_a_run(tmp_path):
    plot = load_script("plot_curves")
    with pytest.raises(SystemExit, match="metrics.jsonl does not exist"):
        plot.main([str(tmp_path), "--out", str(tmp_path / "x.png")])


#: EM routing normalised per patch, one patch of one image at a time, with the baseline's
#: eps on the sums of assignments and on the variance: what the baseline's em_routing computes.
#: ``WEIGHT_BY_ACTIVATION`` False leaves out the child activations in the M-step (a known mistake).
REFERENCE_EM = """
import math
import torch
WEIGHT_BY_ACTIVATION = True


def em_routing(v, a_in, beta_u, beta_a, iters, final_lambda=0.01, eps=1e-6):
    n, i_, j_, h = v.shape
    mus, acts = torch.zeros(n, j_, h, dtype=v.dtype), torch.zeros(n, j_, dtype=v.dtype)
    for b in range(n):
        r = torch.full((i_, j_), 1.0 / j_, dtype=v.dtype)
        for t in range(iters):
            lam = final_lambda * (1 - 0.95 ** (t + 1))
            w = r * (a_in[b] if WEIGHT_BY_ACTIVATION else 1.0)  # (I, J)
            for j in range(j_):
                total = w[:, j].sum()
                mu = (w[:, j, None] * v[b, :, j]).sum(0) / (total + eps)
                var = (w[:, j, None] * (v[b, :, j] - mu) ** 2).sum(0) / (total + eps) + eps
                cost = ((beta_u[j] + 0.5 * torch.log(var)) * total).sum()
                mus[b, j], acts[b, j] = mu, torch.sigmoid(lam * (beta_a[j] - cost))
                if j == 0:
                    means, variances = [], []
                means.append(mu)
                variances.append(var)
            if t < iters - 1:
                logp = torch.stack([
                    (-((v[b, :, j] - means[j]) ** 2) / (2 * variances[j])
                     - 0.5 * torch.log(2 * math.pi * variances[j])).sum(-1)
                    for j in range(j_)
                ], dim=1)  # (I, J)
                r = torch.softmax(logp + torch.log(acts[b] + eps), dim=1)
    return mus, acts
"""


def fake_baseline(train: str) -> str:
    """A baseline script with the reference routing whose one line reports ``train`` (an expression
    that shows what the benchmark gave its process) as its training speed."""
    return (
        REFERENCE_EM
        + f"""
if __name__ == "__main__":
    import argparse
    import torch
    from capsnet.runtime import allocator_is_tuned
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int)
    ap.add_argument("--steps", type=int)
    a = ap.parse_args()
    train = {train}
    print(f"baseline: train {{train:.2f}} img/s, inference 4.00 img/s, peak RSS 5000 MiB (batch {{a.batch}}, 32x32, iters 3)")
"""
    )


#: shows which heap setting the script gave the baseline's process
FAKE_BASELINE = fake_baseline("2.0 if allocator_is_tuned() else 3.0")


@pytest.mark.parametrize("baseline_kind", ["wrong routing", "no routing"])
def test_bench_vs_baseline_times_nothing_where_the_baseline_routes_otherwise(tmp_path, baseline_kind):
    """Before any timing, the same votes go through both routings: a baseline that routes otherwise
    (here: no child activations in the M-step), or has no em_routing to check, is refused."""
    import sys

    baseline = tmp_path / "baseline_em.py"
    if baseline_kind == "wrong routing":
        text = FAKE_BASELINE.replace("WEIGHT_BY_ACTIVATION = True", "WEIGHT_BY_ACTIVATION = False")
        expected = "capsnet's routing (normalised per patch) and the baseline's em_routing disagree"
    else:
        text = FAKE_BASELINE.replace("def em_routing(", "def other_routing(")
        expected = "has no em_routing"
    baseline.write_text(text)
    marker = tmp_path / "timed"
    baseline.write_text(
        baseline.read_text().replace(
            "    import argparse", f"    open({str(marker)!r}, 'w')\n    import argparse"
        )
    )
    cmd = [sys.executable, str(REPO / "scripts" / "bench_vs_baseline.py"), "--rounds", "1", "--steps", "1"]
    cmd += ["--batch", "4", "--baseline", str(baseline)]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True)
    assert proc.returncode != 0 and expected in proc.stderr, proc.stderr
    assert proc.stderr.count("error:") == 1 and "Traceback" not in proc.stderr
    assert not marker.exists()  # nothing was timed


def test_bench_vs_baseline_reports_ratios_against_the_baseline_run_in_the_same_invocation(tmp_path):
    import sys

    baseline = tmp_path / "baseline_em.py"
    baseline.write_text(FAKE_BASELINE)
    cmd = [sys.executable, str(REPO / "scripts" / "bench_vs_baseline.py"), "--rounds", "1", "--steps", "1"]
    cmd += ["--batch", "4", "--baseline", str(baseline), "--compiled", "--json"]
    report = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
    base = report["median"]["baseline"]
    assert (base["train_img_per_s"], base["infer_img_per_s"], base["memory_mib"]) == (2.0, 4.0, 5000.0)
    assert report["allocator"] == "tuned" and all(report["allocator_tuned"].values())  # both sides alike
    torch_alone = 5000.0 - base["above_torch_mib"]
    assert 50 < torch_alone < 5000  # the wrapper read the process's memory once torch was imported
    names = ("paper geometry", "baseline geometry", "paper geometry, compiled", "baseline geometry, compiled")
    assert set(report["ratio"]) == set(names)
    for name in names:
        ours, ratio = report["median"][name], report["ratio"][name]
        assert ratio["train_speedup"] == pytest.approx(ours["train_img_per_s"] / 2.0)
        assert ratio["inference_speedup"] == pytest.approx(ours["infer_img_per_s"] / 4.0)
        assert ratio["memory_fraction"] == pytest.approx(ours["memory_mib"] / 5000.0)
        assert 0 < ours["above_torch_mib"] < ours["memory_mib"]
        assert ratio["above_torch_fraction"] == pytest.approx(
            ours["above_torch_mib"] / base["above_torch_mib"]
        )
        assert report["ratio_range"][name] == {
            k: [pytest.approx(v), pytest.approx(v)] for k, v in ratio.items()
        }
    # the reference routing above and capsnet's agree to rounding and the eps
    assert 0 < report["routing_agreement"]["pose"] < 1e-4 and report["routing_agreement"]["activation"] < 1e-5


def test_bench_vs_baseline_with_the_default_allocator_tunes_neither_side(tmp_path):
    import os
    import sys

    baseline = tmp_path / "baseline_em.py"
    baseline.write_text(FAKE_BASELINE)
    cmd = [sys.executable, str(REPO / "scripts" / "bench_vs_baseline.py"), "--rounds", "1", "--steps", "2"]
    cmd += ["--batch", "4", "--allocator", "default", "--json"]
    # the baseline named by CAPSNET_BASELINE, relative to the folder the script is run from
    env = dict(os.environ, CAPSNET_BASELINE=baseline.name)
    report = json.loads(
        subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=tmp_path, env=env).stdout
    )
    assert report["median"]["baseline"]["train_img_per_s"] == 3.0
    assert report["allocator_tuned"] == {
        "baseline": False,
        "paper geometry": False,
        "baseline geometry": False,
    }
    ratio = report["ratio"]["paper geometry"]["train_speedup"]
    assert ratio == pytest.approx(report["median"]["paper geometry"]["train_img_per_s"] / 3.0)


#: shows the thread count the script gave the baseline's process
THREADS_BASELINE = fake_baseline("float(torch.get_num_threads())")


def test_bench_vs_baseline_runs_the_baseline_with_the_threads_capsnet_gets(tmp_path):
    """With MKL_NUM_THREADS=1 inherited, torch ran the baseline on one thread and capsnet on --threads."""
    import os
    import sys

    baseline = tmp_path / "baseline_em.py"
    baseline.write_text(THREADS_BASELINE)
    cmd = [sys.executable, str(REPO / "scripts" / "bench_vs_baseline.py"), "--rounds", "1", "--steps", "1"]
    cmd += ["--batch", "2", "--threads", "2", "--baseline", str(baseline), "--json"]
    env = dict(os.environ, MKL_NUM_THREADS="1", OMP_NUM_THREADS="1")
    report = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout)
    assert report["median"]["baseline"]["train_img_per_s"] == 2.0


def test_bench_vs_baseline_refuses_a_baseline_that_ran_with_other_threads(monkeypatch):
    import sys

    bench = load_script("bench_vs_baseline")
    out = (
        "torch alone 500 MiB\nallocator tuned True\n"
        "baseline: train 2.00 img/s, inference 4.00 img/s, peak RSS 5000 MiB "
        "(batch 4, 32x32, iters 3, threads 1)\n"
    )
    monkeypatch.setattr(bench, "_run", lambda cmd, what, **kw: subprocess.CompletedProcess(cmd, 0, out, ""))
    args = type("Args", (), {"threads": 2, "batch": 4, "steps": 1, "device": "cpu", "allocator": "tuned"})()
    args.baseline = "b.py"
    with pytest.raises(SystemExit, match="the baseline ran with 1 thread, not the 2 asked for"):
        bench.run_baseline(args)
    args.threads = 1
    assert bench.run_baseline(args)["peak_rss_mib"] == 5000.0
    monkeypatch.setattr(sys, "platform", "darwin")  # the baseline divides bytes by 1024 there
    assert bench.run_baseline(args)["peak_rss_mib"] == pytest.approx(5000.0 / 1024)


def test_bench_vs_baseline_output_in_the_readme_is_what_the_script_prints():
    """The README's CUDA block showed ratio lines the script cannot print (no host-memory part)."""
    import re

    bench = load_script("bench_vs_baseline")
    readme = (REPO / "README.md").read_text()
    blocks = re.findall(r"(?<=\n    )(median of \d+ rounds on (cpu|cuda).*?)(?=\n\n)", readme, re.DOTALL)
    assert len(blocks) >= 4
    ratio = re.compile(r"^(.+): train x([\d.]+), inference x([\d.]+), .*$")
    for block, device in blocks:
        checked = 0
        for line in block.splitlines():
            m = ratio.match(line.strip())
            if not m or "of the baseline's" not in line:
                continue
            checked += 1
            mem = re.search(r"memory ([\d.]+) of the baseline's", line)[1]
            above = re.search(r"(?:torch |\()([\d.]+)(?: above| of the baseline's\))", line)
            assert above, line
            r = {
                "train_speedup": float(m[2]),
                "inference_speedup": float(m[3]),
                "memory_fraction": float(mem),
                "above_torch_fraction": float(above[1]),
            }
            assert bench.ratio_line(m[1], r, device) == line.strip()
        assert checked, f"no ratio line read in the README's block:\n{block}"  # every block shows ratios


def test_class_activations_measures_target_other_and_margin_by_hand():
    import torch

    script = load_script("class_activations")
    acts = torch.tensor([[0.9, 0.5, 0.3], [0.4, 0.6, 0.05], [0.97, 0.02, 0.06]])
    labels = torch.tensor([0, 1, 0])
    stats = script.summarise(acts, labels)
    assert stats["accuracy"] == pytest.approx(1.0)
    assert stats["target_mean"] == pytest.approx((0.9 + 0.6 + 0.97) / 3)
    assert stats["other_mean"] == pytest.approx((0.5 + 0.3 + 0.4 + 0.05 + 0.02 + 0.06) / 6)
    assert stats["best_other_mean"] == pytest.approx((0.5 + 0.4 + 0.06) / 3)
    assert stats["other_min"] == pytest.approx(0.02)
    assert stats["margin_mean"] == pytest.approx((0.4 + 0.2 + 0.91) / 3)
    assert stats["margin_0.5"] == pytest.approx(1 / 3)  # only the third image: 0.91
    assert stats["margin_0.9"] == pytest.approx(1 / 3)
    assert stats["logit_min"] == pytest.approx(float(torch.logit(torch.tensor(0.02, dtype=torch.float64))))


def test_class_activations_reads_a_trained_checkpoint_and_names_a_missing_one(tmp_path, capsys):
    from helpers import tiny

    from capsnet.trainer import fit

    fit(tiny(tmp_path))
    capsys.readouterr()  # the training's own output
    script = load_script("class_activations")
    run = tmp_path / "weights"
    assert script.main(["best", "--out-dir", str(run)]) == 0
    out = capsys.readouterr().out
    assert "(test, 32 images)" in out and "margin_0.9" in out
    table = out[out.index("layer") :].splitlines()[1:]
    assert [line.split()[0] for line in table] == ["primary", "caps1", "caps2", "class"]  # tiny.yaml
    assert script.main([str(tmp_path / "nothing.pt")]) == 2
    assert "checkpoint not found" in capsys.readouterr().err


def test_class_activations_measures_each_layers_spread_over_images_by_hand():
    import torch

    script = load_script("class_activations")
    # 3 images, 2 positions, 1 type; the first capsule is the same for every image
    acts = torch.tensor([[[0.5], [0.2]], [[0.5], [0.4]], [[0.5], [0.9]]])
    stats = script.spread(acts)
    assert stats["mean"] == pytest.approx((1.5 + 1.5) / 6)
    second = torch.tensor([0.2, 0.4, 0.9], dtype=torch.float64)
    assert stats["spread"] == pytest.approx((0.0 + second.std().item()) / 2)
    assert stats["logit_spread"] == pytest.approx((0.0 + torch.logit(second).std().item()) / 2)
    assert (stats["min"], stats["max"]) == (pytest.approx(0.2), pytest.approx(0.9))


FAKE_PYTHON = """#!/bin/bash
# An interpreter whose venv module works: "-m venv DIR" makes DIR/bin/python, a stand-in
# that records its arguments and succeeds (so "pip" works without installing anything,
# and "-c" answers the version question with 3.11).
if [ "$1" = "-m" ] && [ "$2" = "venv" ]; then
    mkdir -p "$3/bin"
    printf '#!/bin/bash\\necho "$*" >> "$(dirname "$0")/../calls"\\n[ "$1" = "-c" ] && echo 3.11\\nexit 0\\n' \\
        > "$3/bin/python"
    chmod +x "$3/bin/python"
    exit 0
fi
[ "$1" = "-c" ] && { echo 3.11; exit 0; }
exit 1
"""

NO_VENV_PYTHON = """#!/bin/bash
# An interpreter without the venv module (Debian without python3-venv): venv leaves a
# half-made folder behind and fails.
if [ "$1" = "-m" ] && [ "$2" = "venv" ]; then mkdir -p "$3/bin"; : > "$3/bin/python"; exit 1; fi
[ "$1" = "-c" ] && { echo 3.11; exit 0; }
exit 1
"""


def run_setup(root: Path, env: dict):
    return subprocess.run(
        ["bash", "scripts/setup_env.sh"], check=False, cwd=root, env=env, capture_output=True, text=True
    )


def setup_copy(tmp_path: Path, python: str) -> tuple[Path, dict]:
    import os
    import shutil

    (tmp_path / "scripts").mkdir()
    for name in ("setup_env.sh", "lib.sh"):
        shutil.copy(REPO / "scripts" / name, tmp_path / "scripts")
    (tmp_path / "pyproject.toml").write_text("[project]\nname = 'x'\n")
    fake = tmp_path / "fake-python"
    fake.write_text(python)
    fake.chmod(0o755)
    tools = tmp_path / "tools"  # the commands the script needs, and no apt-get or sudo
    tools.mkdir()
    for tool in ("bash", "dirname", "rm", "id", "touch", "mkdir", "chmod", "printf"):
        found = shutil.which(tool)
        if found:
            os.symlink(found, tools / tool)
    return tmp_path, {"PATH": str(tools), "PYTHON": str(fake), "HOME": str(tmp_path)}


def test_setup_env_replaces_a_venv_left_without_pip_and_installs_into_the_new_one(tmp_path):
    root, env = setup_copy(tmp_path, FAKE_PYTHON)
    (root / ".venv" / "bin").mkdir(parents=True)
    broken = root / ".venv" / "bin" / "python"
    broken.write_text("#!/bin/bash\nexit 1\n")  # no pip: what a failed first attempt leaves
    broken.chmod(0o755)
    done = run_setup(root, env)
    assert done.returncode == 0, done.stderr
    calls = (root / ".venv" / "calls").read_text().splitlines()
    assert calls[0] == "-m pip install -q --upgrade pip" and "-m pip install -q -e .[dev]" in calls
    assert (root / ".venv" / ".capsnet-installed").is_file()
    again = run_setup(root, env)
    checks = (root / ".venv" / "calls").read_text().splitlines()[len(calls) :]
    assert again.returncode == 0 and [c.split(";")[0] for c in checks] == [
        "-m pip --version",
        "-c import sys",  # the venv's Python version
        "-c import torch, torchvision, typer, yaml, tqdm, tensorboard, capsnet",  # the install imports
    ], checks  # in place: only checked


def test_setup_env_without_the_venv_module_or_apt_get_says_what_to_install(tmp_path):
    root, env = setup_copy(tmp_path, NO_VENV_PYTHON)
    done = run_setup(root, env)
    assert done.returncode == 1
    assert "install Python's venv module (Debian/Ubuntu: apt-get install python3-venv)" in done.stderr
    assert not (root / ".venv").exists()  # nothing half-made left to be mistaken for a venv


CAPSNET_STAND_IN = """#!/bin/bash
# Records its arguments; `train --config CFG --run-name NAME ...` leaves NAME's config.yaml behind.
echo "$*" >> calls
out="${OUT_DIR:-weights/em_capsules}"  # the test says where the -o it passes puts the runs
if [ "$1" = train ]; then mkdir -p "$out/$5"; cp "$3" "$out/$5/config.yaml"; fi
# `average --ckpt RUN_DIR ... --json` answers as capsnet does, naming the file it wrote
if [ "$1" = average ]; then printf '{"checkpoint": "%s/average-000010-000030.pt"}\\n' "$3"; fi
"""


def stand_in_checkout(root: Path, scripts: list[str], configs: list[str]) -> None:
    """A checkout in ``root`` with ``scripts`` and ``configs`` copied, no-op set-up scripts, and a
    .venv whose capsnet records its calls (CAPSNET_STAND_IN) and whose curve plot writes `plot`."""
    import shutil
    import sys

    (root / "scripts").mkdir()
    for script in [*scripts, "lib.sh"]:
        shutil.copy(REPO / "scripts" / script, root / "scripts")
    for stand_in in ("setup_env.sh", "fetch_fashion_mnist.sh"):
        (root / "scripts" / stand_in).write_text("exit 0\n")
    (root / "scripts" / "plot_curves.py").write_text(
        "import sys\nopen('calls', 'a').write(' '.join(['plot', *sys.argv[1:]]) + '\\n')\n"
    )
    (root / "configs").mkdir()
    for config in configs:
        shutil.copy(REPO / "configs" / config, root / "configs")
    bin_dir = root / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    (bin_dir / "python").write_text(f'#!/bin/bash\nexec "{sys.executable}" "$@"\n')
    (bin_dir / "capsnet").write_text(CAPSNET_STAND_IN)
    for tool in ("python", "capsnet"):
        (bin_dir / tool).chmod(0o755)


def run_script(cwd: Path, args: list[str], **env: str) -> subprocess.CompletedProcess:
    """Runs a script of a stand-in checkout with a bare PATH and ``env``, its output captured."""
    return subprocess.run(
        args, cwd=cwd, env={"PATH": "/usr/bin:/bin", **env}, capture_output=True, text=True, check=False
    )


@pytest.mark.parametrize("config, mirrored", [("fashion_paper_deep.yaml", True), ("small.yaml", False)])
def test_reproduce_fashion_adds_the_mirrored_test_for_runs_trained_with_flips(tmp_path, config, mirrored):
    import shutil

    stand_in_checkout(tmp_path, ["reproduce_fashion.sh"], [config])
    args = ["bash", "scripts/reproduce_fashion.sh", f"configs/{config}", "-o", "train.seed=1"]
    done = run_script(tmp_path, args, RUN="r")
    assert done.returncode == 0, done.stderr
    calls = (tmp_path / "calls").read_text().splitlines()
    root = tmp_path.resolve()
    assert calls[0] == f"train --config {root}/configs/{config} --run-name r --resume latest -o train.seed=1"
    evaluation = "eval --ckpt weights/em_capsules/r/best.pt --split test"
    plot = "plot weights/em_capsules/r --out weights/em_capsules/r/curves.png"
    assert calls[1:] == [evaluation + (" --mirror" if mirrored else ""), plot]

    # from another folder, with paths relative to it, and runs kept in another logging.out_dir
    (tmp_path / "calls").unlink()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.copy(REPO / "configs" / config, elsewhere / "mine.yaml")
    args = ["bash", "../scripts/reproduce_fashion.sh", "mine.yaml", "-o", "logging.out_dir=kept"]
    done = run_script(elsewhere, args, RUN="r", OUT_DIR="kept")
    assert done.returncode == 0, done.stderr
    calls = (tmp_path / "calls").read_text().splitlines()
    assert calls[0].startswith(f"train --config {root}/elsewhere/mine.yaml --run-name r")
    assert calls[1] == "eval --ckpt kept/r/best.pt --split test" + (" --mirror" if mirrored else "")
    assert calls[2] == "plot kept/r --out kept/r/curves.png"

    # FIGURES puts the curves in a folder of the caller's instead, named after the run
    (tmp_path / "calls").unlink()
    done = run_script(elsewhere, args, RUN="r", OUT_DIR="kept", FIGURES="figs")
    assert done.returncode == 0, done.stderr
    figures = (elsewhere / "figs").resolve()
    assert figures.is_dir()
    assert (tmp_path / "calls").read_text().splitlines()[2] == f"plot kept/r --out {figures}/curves_r.png"
    assert f"learning curves: {figures}/curves_r.png" in done.stdout


def test_reproduce_fashion_given_options_alone_trains_the_default_config_with_them(tmp_path):
    stand_in_checkout(tmp_path, ["reproduce_fashion.sh"], ["small.yaml"])
    elsewhere = tmp_path / "elsewhere"  # from another folder too
    elsewhere.mkdir()
    args = ["bash", "../scripts/reproduce_fashion.sh", "-o", "train.seed=1", "-o", "train.epochs=2"]
    done = run_script(elsewhere, args)
    assert done.returncode == 0, done.stderr
    calls = (tmp_path / "calls").read_text().splitlines()
    root = tmp_path.resolve()
    train = f"train --config {root}/configs/small.yaml --run-name reproduce-small --resume latest"
    assert calls[0] == train + " -o train.seed=1 -o train.epochs=2"
    assert calls[1] == "eval --ckpt weights/em_capsules/reproduce-small/best.pt --split test"
    # no arguments at all: the same config
    (tmp_path / "calls").unlink()
    assert run_script(elsewhere, ["bash", "../scripts/reproduce_fashion.sh"]).returncode == 0
    assert (tmp_path / "calls").read_text().splitlines()[0] == train


def test_reproduce_fashion_with_average_scores_the_mean_of_the_last_checkpoints_on_val_and_test(tmp_path):
    stand_in_checkout(tmp_path, ["reproduce_fashion.sh"], ["small.yaml"])

    def reproduce(average: str, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["bash", "scripts/reproduce_fashion.sh", "configs/small.yaml", *args],
            cwd=tmp_path,
            env={"PATH": "/usr/bin:/bin", "RUN": "r", "AVERAGE": average},
            capture_output=True,
            text=True,
            check=False,
        )

    done = reproduce("04", "-o", "logging.keep=4")  # a leading zero is still decimal
    assert done.returncode == 0, done.stderr
    run = "weights/em_capsules/r"
    assert (tmp_path / "calls").read_text().splitlines()[1:] == [
        f"eval --ckpt {run}/best.pt --split test",
        f"average --ckpt {run} --last 4 --overwrite --json",
        f"eval --ckpt {run}/average-000010-000030.pt --split val",
        f"eval --ckpt {run}/average-000010-000030.pt --split test",
        f"plot {run} --out {run}/curves.png",
    ]
    assert f"averaged the weights of the last 4 epoch-end checkpoints: {run}/average-000010-000030.pt" in (
        done.stdout
    )

    # refused before any training: too few kept checkpoints, or not a count of 2 or more
    (tmp_path / "calls").unlink()
    done = reproduce("4")  # configs/small.yaml keeps 3
    assert done.returncode == 2
    assert (
        "error: AVERAGE=4 needs the run to keep that many checkpoints, but logging.keep is 3" in done.stderr
    )
    assert "add -o logging.keep=4" in done.stderr
    for bad in ("1", "six", "-3", "2.5"):
        done = reproduce(bad)
        assert done.returncode == 2, bad
        assert f"error: AVERAGE={bad}: give the number of epoch-end checkpoints to average, 2 or more" in (
            done.stderr
        )
    assert not (tmp_path / "calls").exists()


def test_distill_fashion_trains_and_scores_the_teacher_the_student_and_the_student_s_lower_lr_tail(tmp_path):
    stand_in_checkout(
        tmp_path,
        ["distill_fashion.sh", "reproduce_fashion.sh"],
        ["small_deep.yaml", "small_taught.yaml", "small_taught_tail.yaml"],
    )
    done = subprocess.run(
        ["bash", "scripts/distill_fashion.sh", "-o", "loss.teacher_temperature=2"],
        cwd=tmp_path,
        env={"PATH": "/usr/bin:/bin", "TEACHER": "t"},
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    root = tmp_path.resolve()
    assert (tmp_path / "calls").read_text().splitlines() == [
        f"train --config {root}/configs/small_deep.yaml --run-name t --resume latest -o train.epochs=12",
        "eval --ckpt weights/em_capsules/t/best.pt --split test",
        "plot weights/em_capsules/t --out weights/em_capsules/t/curves.png",
        (
            f"train --config {root}/configs/small_taught.yaml --run-name small-taught --resume latest "
            "-o loss.teacher=t/best.pt -o loss.teacher_temperature=2"
        ),
        "eval --ckpt weights/em_capsules/small-taught/best.pt --split test",
        "plot weights/em_capsules/small-taught --out weights/em_capsules/small-taught/curves.png",
        (
            f"train --config {root}/configs/small_taught_tail.yaml --run-name small-taught-tail --resume latest "
            "-o loss.teacher=t/best.pt -o train.init_from=small-taught/best.pt -o loss.teacher_temperature=2"
        ),
        "eval --ckpt weights/em_capsules/small-taught-tail/best.pt --split test",
        "plot weights/em_capsules/small-taught-tail --out weights/em_capsules/small-taught-tail/curves.png",
    ]


def test_distill_fashion_trains_the_measured_recipe_s_12_epoch_teacher_unless_told_otherwise(tmp_path):
    stand_in_checkout(
        tmp_path,
        ["distill_fashion.sh", "reproduce_fashion.sh"],
        ["small_deep.yaml", "small_taught.yaml", "small_taught_tail.yaml"],
    )

    def teacher_and_student_calls(env):
        done = subprocess.run(
            ["bash", "scripts/distill_fashion.sh"],
            cwd=tmp_path,
            env={"PATH": "/usr/bin:/bin", **env},
            capture_output=True,
            text=True,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        calls = (tmp_path / "calls").read_text().splitlines()
        (tmp_path / "calls").unlink()
        return calls[0], calls[3]

    root = tmp_path.resolve()
    teacher, student = teacher_and_student_calls({})
    assert teacher == (
        f"train --config {root}/configs/small_deep.yaml --run-name small-deep-teacher12 --resume latest "
        "-o train.epochs=12"
    )
    assert student.endswith("-o loss.teacher=small-deep-teacher12/best.pt")
    # both students' configs name that run too, so the stages also chain when run one by one
    for config in ("small_taught.yaml", "small_taught_tail.yaml"):
        stage = yaml.safe_load((REPO / "configs" / config).read_text())
        assert stage["loss"]["teacher"] == "small-deep-teacher12/best.pt", config
    teacher, student = teacher_and_student_calls({"TEACHER": "full", "TEACHER_EPOCHS": "18"})
    assert teacher.endswith("--run-name full --resume latest -o train.epochs=18")
    assert student.endswith("-o loss.teacher=full/best.pt")


def test_the_taught_config_is_the_paper_s_small_model_with_the_teacher_s_split():
    from capsnet.config import load_config

    student, teacher = (load_config(REPO / "configs" / f"{n}.yaml") for n in ("small_taught", "small_deep"))
    # the run distill_fashion.sh trains as the teacher, by default
    assert student.loss.teacher == "small-deep-teacher12/best.pt"
    assert (student.model.stem_channels, student.model.batch_norm, student.model.stem_padding) == (
        None,
        False,
        2,  # the paper's capsule grid
    )
    assert (student.loss.teacher_weight, student.loss.teacher_temperature) == (2.0, 4.0)
    assert student.model.resolved().stem_channels == [64]  # the paper's single conv
    assert (student.data.val_split, student.train.seed) == (teacher.data.val_split, teacher.train.seed)
    assert (
        student.optim == teacher.optim
        and student.train == teacher.train
        and student.routing == teacher.routing
    )


def test_the_tail_config_continues_the_taught_model_from_where_its_schedule_ended():
    from capsnet.config import load_config

    student, tail = (
        load_config(REPO / "configs" / f"{n}.yaml") for n in ("small_taught", "small_taught_tail")
    )
    assert tail.train.init_from == "small-taught/best.pt" and tail.loss.teacher == student.loss.teacher
    # the same model, routing, data split and distillation as the run it starts from
    assert (tail.model, tail.routing, tail.data) == (student.model, student.routing, student.data)
    assert tail.train.seed == student.train.seed and tail.train.batch_size == student.train.batch_size
    assert (tail.loss.teacher_weight, tail.loss.teacher_temperature, tail.loss.recon_weight) == (
        student.loss.teacher_weight,
        student.loss.teacher_temperature,
        student.loss.recon_weight,
    )
    # the learning rate starts where the first stage's ended and the margin stays at its end
    assert tail.optim.lr == pytest.approx(student.optim.lr * student.optim.decay_rate)
    assert (tail.optim.decay_rate, tail.optim.decay_steps, tail.optim.warmup_steps) == (0.1, None, 20)
    assert tail.loss.margin_start == tail.loss.margin_end == student.loss.margin_end
    assert tail.train.epochs == 4 and tail.logging.keep >= tail.train.epochs


def test_the_ablation_rewrites_only_its_own_part_of_the_results_file(tmp_path):
    import shutil
    import sys

    (tmp_path / "scripts").mkdir()
    for script in ("ablation_fashion.sh", "lib.sh"):
        shutil.copy(REPO / "scripts" / script, tmp_path / "scripts")
    for stand_in in ("setup_env.sh", "fetch_fashion_mnist.sh"):
        (tmp_path / "scripts" / stand_in).write_text("exit 0\n")
    (tmp_path / "configs").mkdir()
    for config in ("small.yaml", "small_batch32.yaml"):
        shutil.copy(REPO / "configs" / config, tmp_path / "configs")
    bin_dir = tmp_path / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    (bin_dir / "python").write_text(f'#!/bin/bash\nexec "{sys.executable}" "$@"\n')
    # the stand-in capsnet notes the arguments each variant trains with
    (bin_dir / "capsnet").write_text(
        '#!/bin/bash\nif [ "$1" = eval ]; then echo \'{"acc": 0.5}\'; else echo "${*:2}" >> trained; fi\n'
    )
    for tool in ("python", "capsnet"):
        (bin_dir / tool).chmod(0o755)
    results = tmp_path / "ablation.md"
    shutil.copy(REPO / "docs" / "ablation_fashion.md", results)  # the table between notes on it
    end = "<!-- end of the part written by scripts/ablation_fashion.sh -->"
    old_table, notes = results.read_text().split(end)

    def ablation(**env: str) -> subprocess.CompletedProcess:
        (tmp_path / "trained").unlink(missing_ok=True)
        return run_script(tmp_path, ["bash", "scripts/ablation_fashion.sh"], OUT=str(results), **env)

    # the default config: 7 steps, the margin and the learning rate paced as over its 5 epochs of
    # 211 steps (54,000 images at batch 256)
    done = ablation(STEPS="7")
    assert done.returncode == 0, done.stderr
    text = results.read_text()
    assert text.startswith("<!-- from here to the end marker") and "(7 steps of batch 256 each)" in text
    common = "-o train.max_steps=7 -o data.val_split=0.1 -o loss.margin_steps=1055 -o optim.decay_steps=1055"
    assert f"Every row is `configs/small.yaml` with one change (`{common}`," in text
    trained = (tmp_path / "trained").read_text().splitlines()
    assert len(trained) == 6 and all(
        t.startswith("--config configs/small.yaml --run-name ablation-") for t in trained
    )
    assert all(common in t for t in trained) and trained[1].endswith(common + " -o model.iterations=1")
    assert text.count("| 0.5000 |") == 6 and "| 0.5000 | " not in old_table  # the old table is gone
    assert text.endswith(notes) and "The previous table (beta_a in the paper's units" in notes

    # no file yet: the written part alone. Another config, one of its epochs (batch 64 from
    # OVERRIDES: 844 steps), its own learning-rate decay kept
    results.unlink()
    done = ablation(CONFIG="configs/small_batch32.yaml", OVERRIDES="train.batch_size=64")
    assert done.returncode == 0, done.stderr
    text = results.read_text()
    assert text.rstrip().endswith(end) and "(844 steps of batch 64 each)" in text
    schedule = "-o loss.margin_steps=4220 -o optim.decay_steps=20000 -o train.batch_size=64`"
    assert "Every row is `configs/small_batch32.yaml` with one change" in text and schedule in text
    assert (tmp_path / "trained").read_text().count("--config configs/small_batch32.yaml") == 6

    # refused before any training
    results.unlink()
    for env, message in (
        ({"CONFIG": "configs/nothere.yaml"}, "error: CONFIG=configs/nothere.yaml: no such file"),
        ({"STEPS": "ten"}, "error: STEPS=ten: give a number of optimiser steps, 1 or more"),
        ({"STEPS": "0"}, "error: STEPS=0: give a number"),
    ):
        done = ablation(**env)
        assert done.returncode == 2 and message in done.stderr, (env, done.stderr)
        assert not (tmp_path / "trained").exists() and not results.exists()


def test_train_sh_help_answers_without_setting_anything_up(tmp_path):
    import shutil

    scripts = tmp_path / "scripts"
    scripts.mkdir()
    for name in ("train.sh", "lib.sh"):
        shutil.copy(REPO / "scripts" / name, scripts / name)
    for name in ("setup_env.sh", "fetch_fashion_mnist.sh"):
        (scripts / name).write_text(f"touch {tmp_path}/{name}.ran\n")
    done = subprocess.run(
        ["bash", str(scripts / "train.sh"), "--help"], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("Sets up everything and trains the default config")
    assert "'.venv/bin/capsnet train --help'" in done.stdout  # no .venv beside this copy yet
    assert not list(tmp_path.glob("*.ran"))
    # with the set-up done, the options of capsnet train follow the usage
    listed = subprocess.run(
        ["bash", str(REPO / "scripts" / "train.sh"), "-h"], capture_output=True, text=True, check=False
    )
    assert listed.returncode == 0 and "--run-name" in listed.stdout, listed.stderr


def test_test_sh_and_the_dataset_script_print_their_usage_without_setting_anything_up(tmp_path):
    """--help of the set-up scripts answers at once: no venv, no apt-get, no pytest."""
    import shutil

    scripts = tmp_path / "scripts"
    scripts.mkdir()
    for name in ("test.sh", "fetch_fashion_mnist.sh", "lib.sh"):
        shutil.copy(REPO / "scripts" / name, scripts / name)
    (scripts / "setup_env.sh").write_text(f"touch {tmp_path}/setup_env.sh.ran\n")
    bin_dir = tmp_path / "bin"  # an apt-get that leaves a mark instead of installing
    bin_dir.mkdir()
    (bin_dir / "apt-get").write_text(f"#!/bin/sh\ntouch {tmp_path}/apt-get.ran\n")
    (bin_dir / "apt-get").chmod(0o755)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin"}
    for script, first in (
        ("test.sh", "Sets up everything (venv, packages, dataset) and runs the test suite."),
        ("fetch_fashion_mnist.sh", "Puts the Fashion-MNIST IDX files where capsnet looks for them"),
    ):
        for flag in ("--help", "-h"):
            done = subprocess.run(
                ["bash", str(scripts / script), flag], capture_output=True, text=True, check=False, env=env
            )
            assert done.returncode == 0, (script, done.stderr)
            assert done.stdout.startswith(first), (script, done.stdout)
            assert "set -euo" not in done.stdout
    assert (
        "pytest"
        in subprocess.run(
            ["bash", str(scripts / "test.sh"), "--help"], capture_output=True, text=True, check=False, env=env
        ).stdout
    )
    assert not list(tmp_path.glob("*.ran"))
    assert not (tmp_path / ".venv").exists()
    real = tmp_path / "checkout" / "scripts"  # setup_env.sh itself: its usage, and no venv made
    real.mkdir(parents=True)
    for name in ("setup_env.sh", "lib.sh"):
        shutil.copy(REPO / "scripts" / name, real / name)
    done = subprocess.run(
        ["bash", str(real / "setup_env.sh"), "--help"], capture_output=True, text=True, check=False, env=env
    )
    assert done.returncode == 0 and done.stdout.startswith("Creates .venv"), done.stderr
    assert "PYTHON=python3.11" in done.stdout and "set -euo" not in done.stdout
    assert not (tmp_path / "checkout" / ".venv").exists() and not list(tmp_path.glob("*.ran"))


def test_the_long_scripts_print_their_usage_and_the_ablation_takes_no_arguments():
    for script in (
        "reproduce_fashion.sh",
        "ablation_fashion.sh",
        "experiment_figures.sh",
        "distill_fashion.sh",
    ):
        done = subprocess.run(
            ["bash", str(REPO / "scripts" / script), "--help"], capture_output=True, text=True, check=False
        )
        assert done.returncode == 0 and done.stdout.strip(), (script, done.stderr)
        assert not done.stdout.startswith("#") and "set -euo" not in done.stdout
    usage = subprocess.run(
        ["bash", str(REPO / "scripts" / "reproduce_fashion.sh"), "-h"],
        check=False,
        capture_output=True,
        text=True,
    )
    assert usage.stdout.startswith("Reproduces the README's Fashion-MNIST results")
    refused = subprocess.run(
        ["bash", str(REPO / "scripts" / "ablation_fashion.sh"), "configs/small.yaml"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert refused.returncode == 2 and "takes no arguments" in refused.stderr
    named = subprocess.run(
        ["bash", str(REPO / "scripts" / "reproduce_fashion.sh"), "configs/small.yaml", "--run-name", "x"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert named.returncode == 2 and "sets --run-name itself" in named.stderr and "RUN=" in named.stderr


def test_script_paths_are_made_absolute_but_latest_and_best_stay_keywords(tmp_path):
    for name in ("best", "latest", "mine.yaml"):
        (tmp_path / name).write_text("")
    snippet = (
        f'source "{REPO}/scripts/lib.sh"; '
        'absolute_path_options --resume best --config mine.yaml -o data.root=x --resume=latest "a b"; '
        'printf "%s\n" "${ABS_ARGS[@]}"'
    )
    done = subprocess.run(["bash", "-c", snippet], cwd=tmp_path, capture_output=True, text=True, check=False)
    root = tmp_path.resolve()
    assert done.stdout.splitlines() == [
        "--resume",
        "best",
        "--config",
        f"{root}/mine.yaml",
        "-o",
        "data.root=x",
        "--resume=latest",
        "a b",
    ], done.stderr


def test_bench_vs_baseline_refuses_counts_below_one_and_ends_a_failed_side_with_one_line(monkeypatch, capsys):
    import sys

    bench = load_script("bench_vs_baseline")
    monkeypatch.setattr(sys, "argv", ["bench_vs_baseline.py", "--rounds", "0"])
    with pytest.raises(SystemExit) as refused:
        bench.main()
    assert refused.value.code == 2 and "--rounds: must be at least 1, got 0" in capsys.readouterr().err
    failing = [
        sys.executable,
        "-c",
        "import sys; print('detail', file=sys.stderr); sys.exit('torch is missing')",
    ]
    with pytest.raises(SystemExit, match=r"^error: the baseline failed: torch is missing$"):
        bench._run(failing, "the baseline")


def test_class_activations_help_explains_the_script_in_full(capsys):
    """Its description was the docstring's first line, cut off mid-sentence ("... reach, and")."""
    script = load_script("class_activations")
    with pytest.raises(SystemExit):
        script.main(["--help"])
    text = capsys.readouterr().out
    assert "how much each capsule layer's activations depend on the input" in text
    assert "folder that holds the run directories" in text
