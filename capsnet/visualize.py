"""Figures for ``capsnet attack`` and ``capsnet inspect`` (matplotlib, the optional ``viz`` extra).

Everything here draws on :class:`matplotlib.figure.Figure` objects directly
(no pyplot, no global state), so it works without a display and in threads.
matplotlib is imported inside the functions: the rest of capsnet never needs it.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

if TYPE_CHECKING:  # pragma: no cover
    from capsnet.attack import AttackReport, Examples
    from capsnet.inspection import Inspection, RoutingPicture

INSTALL_HINT = "pip install 'capsnet[viz]' (or pip install matplotlib)"


class ExperimentError(Exception):
    """A problem with an experiment command's inputs the user can fix; the message says how."""


def check_writable(folder: Path) -> None:
    """Makes ``folder`` and checks that a file can be written in it; ExperimentError naming it if not."""
    import tempfile

    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        from capsnet.runtime import os_error_reason

        raise ExperimentError(f"could not use {folder}: {os_error_reason(e)}") from None


def require_matplotlib() -> None:
    """Raises ExperimentError with the install command when matplotlib is missing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ExperimentError(f"figures need matplotlib, which is not installed: {INSTALL_HINT}") from None


def new_figure(width: float, height: float) -> Any:
    require_matplotlib()
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def figure_path(path: str | Path) -> Path:
    """The file a figure asked for as ``path`` is written to: ``.png`` added to a name without a suffix.

    Raises ExperimentError for a folder or a suffix that matplotlib cannot write,
    so that a command can check its output path before its work, not after.
    """
    require_matplotlib()
    from matplotlib.backend_bases import FigureCanvasBase

    path = Path(path)
    if path.is_dir():
        raise ExperimentError(f"{path} is a folder: give a file name, such as {path / 'figure.png'}")
    if not path.suffix:
        return path.with_name(path.name + ".png")
    kinds = FigureCanvasBase.get_supported_filetypes()
    if path.suffix[1:].lower() not in kinds:
        raise ExperimentError(
            f"{path}: matplotlib cannot write {path.suffix} files; use one of {', '.join('.' + k for k in sorted(kinds))}"
        )
    return path


def save_figure(figure: Any, path: str | Path, dpi: int = 100) -> Path:
    """Writes ``figure`` to :func:`figure_path` of ``path``, and returns that path."""
    path = figure_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=dpi)
    return path


def figure_to_tensor(figure: Any) -> Tensor:
    """The rendered figure as a (3, H, W) float tensor in [0, 1], for TensorBoard."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    rgba = np.asarray(canvas.buffer_rgba())  # (H, W, 4) uint8
    return torch.from_numpy(rgba[..., :3].copy()).permute(2, 0, 1).float() / 255.0


# --------------------------------------------------------------------------- images


def to_display(
    x: Tensor,
    mean: list[float] | None = None,
    std: list[float] | None = None,
    bounds: tuple[float, float] | None = None,
) -> np.ndarray:
    """A model input (C, H, W) as an image in [0, 1]: (H, W) grey, (H, W, 3) colour.

    With the dataset's ``mean`` and ``std`` the pixels are recovered exactly;
    otherwise (smallNORB, standardised per image) values are scaled from
    ``bounds`` (default: the image's own minimum and maximum). The two views of a
    stereo pair are shown side by side.
    """
    x = x.detach().float().cpu()
    if mean is not None and std is not None and len(mean) == x.shape[0]:
        x = x * torch.tensor(std).view(-1, 1, 1) + torch.tensor(mean).view(-1, 1, 1)
    else:
        lo, hi = bounds if bounds is not None else (float(x.min()), float(x.max()))
        x = (x - lo) / max(hi - lo, 1e-8)
    x = x.clamp(0, 1)
    if x.shape[0] == 3:
        return x.permute(1, 2, 0).numpy()
    if x.shape[0] == 2:  # stereo pair: left | right
        gap = torch.ones(x.shape[1], 1)
        return torch.cat([x[0], gap, x[1]], dim=1).numpy()
    return x[0].numpy()


def _show(ax: Any, image: np.ndarray, title: str | None = None) -> None:
    ax.imshow(image, cmap="gray" if image.ndim == 2 else None, vmin=0, vmax=1, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=9)


def _name(names: list[str], index: int | None) -> str:
    if index is None:
        return "-"
    return names[index] if index < len(names) else str(index)


# --------------------------------------------------------------------------- attack


def plot_attack(
    report: AttackReport,
    examples: Examples | None,
    class_names: list[str],
    mean: list[float] | None = None,
    std: list[float] | None = None,
) -> Any:
    """Accuracy (and targeted success) against epsilon, above one image attacked at every epsilon."""
    columns = 1 + sum(p.eps != 0 for p in report.points)
    figure = new_figure(max(5.0, 1.2 * columns), 5.2 if examples is not None else 3.4)
    grid = figure.add_gridspec(
        2 if examples is not None else 1, columns, height_ratios=[2.2, 1][: 1 + (examples is not None)]
    )
    ax = figure.add_subplot(grid[0, :])
    eps = [0.0] + [p.eps for p in report.points if p.eps != 0]
    acc = [report.clean_acc] + [p.acc for p in report.points if p.eps != 0]
    ax.plot(eps, acc, "o-", label="accuracy")
    if report.targeted:
        ax.plot(
            [p.eps for p in report.points], [p.success for p in report.points], "s--", label="target success"
        )
    ax.set_xlabel(f"epsilon ({report.eps_units} units)")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    kind = f"targeted, {report.target} class" if report.targeted else "untargeted"
    steps = f", {report.steps} steps" if report.steps else ""
    ax.set_title(f"{report.method.upper()} ({kind}{steps}) on {report.n} {report.split} images", fontsize=10)
    if examples is not None:
        images = [examples.clean, *examples.adversarial]
        lo = min(float(t.min()) for t in images)
        hi = max(float(t.max()) for t in images)
        clean_title = f"clean\n{_name(class_names, examples.label)}"
        if examples.target is not None:  # a prediction that is the target is a hit
            clean_title += f"\ntarget {_name(class_names, examples.target)}"
        _show(figure.add_subplot(grid[1, 0]), to_display(examples.clean, mean, std, (lo, hi)), clean_title)
        attacked = zip(report.points, examples.adversarial, examples.predictions)
        shown = [(point, image, pred) for point, image, pred in attacked if point.eps != 0]
        for k, (point, image, pred) in enumerate(shown):
            title = f"eps {point.eps:g}\n{_name(class_names, pred)}"
            _show(figure.add_subplot(grid[1, k + 1]), to_display(image, mean, std, (lo, hi)), title)
    return figure


# --------------------------------------------------------------------------- inspect


def plot_reconstruction(ins: Inspection, mean: list[float] | None, std: list[float] | None) -> Any:
    """(a) The input beside the decoder's reconstruction from the predicted (and the true) class pose."""
    panels = [(ins.image, f"input ({_name(ins.class_names, ins.label)})")]
    if ins.reconstruction is not None:
        panels.append((ins.reconstruction, f"from {_name(ins.class_names, ins.prediction)} pose"))
    if ins.reconstruction_label is not None:
        panels.append((ins.reconstruction_label, f"from {_name(ins.class_names, ins.label)} pose"))
    stereo = ins.image.shape[0] == 2
    figure = new_figure((3.6 if stereo else 2.2) * len(panels), 2.5)
    lo, hi = float(ins.image.min()), float(ins.image.max())
    for k, (image, title) in enumerate(panels):
        _show(figure.add_subplot(1, len(panels), k + 1), to_display(image, mean, std, (lo, hi)), title)
    if ins.reconstruction is None:
        figure.suptitle("this model has no decoder (model.decoder: false)", fontsize=9)
    return figure


def plot_class_activations(ins: Inspection) -> Any:
    """(b) Class capsule activations; the true class green, a wrong prediction red."""
    names = [_name(ins.class_names, i) for i in range(len(ins.activations))]
    figure = new_figure(5.0, 0.6 + 0.28 * len(names))
    ax = figure.add_subplot(1, 1, 1)
    colours = ["tab:gray"] * len(names)
    colours[ins.prediction] = "tab:red"
    colours[ins.label] = "tab:green"
    values = ins.activations.float().cpu().numpy()
    ax.barh(range(len(names)), values, color=colours)
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, max(1.0, float(values.max()) * 1.05))
    ax.set_xlabel("activation a_j")
    verdict = "correct" if ins.prediction == ins.label else f"predicted {names[ins.prediction]}"
    ax.set_title(f"{ins.split} image {ins.index}: {names[ins.label]} ({verdict})", fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    return figure


def plot_routing(picture: RoutingPicture) -> Any:
    """(c) Votes for one parent on two pose entries, coloured by assignment, with the parent's
    Gaussian (mean and 1 and 2 standard deviations) after every routing iteration."""
    from matplotlib.patches import Ellipse

    steps = len(picture.iterations)
    figure = new_figure(2.9 * steps + 0.8, 3.3)
    votes = picture.votes.float().cpu().numpy()  # (I, 2)
    child = picture.child_act.float().cpu().numpy()  # (I,)
    top = max(float(it.r.max()) for it in picture.iterations) or 1.0
    sd_max = max(float(it.var.max()) for it in picture.iterations) ** 0.5
    weight = child > 0.05 * child.max() if child.max() > 0 else np.ones_like(child, dtype=bool)
    shown = votes[weight] if weight.any() else votes
    lo = np.minimum(shown.min(0), np.min([it.mu.cpu().numpy() for it in picture.iterations], 0) - 2 * sd_max)
    hi = np.maximum(shown.max(0), np.max([it.mu.cpu().numpy() for it in picture.iterations], 0) + 2 * sd_max)
    pad = 0.05 * (hi - lo) + 1e-6
    order = np.argsort(child)  # active children drawn last (on top)
    h1, h2 = picture.entries
    scatter = None
    axes = [figure.add_subplot(1, steps, t + 1) for t in range(steps)]
    for t, (ax, it) in enumerate(zip(axes, picture.iterations)):
        r = it.r.float().cpu().numpy()
        scatter = ax.scatter(
            votes[order, 0],
            votes[order, 1],
            c=r[order],
            s=6 + 40 * child[order],
            cmap="viridis",
            vmin=0,
            vmax=top,
            alpha=0.85,
            linewidths=0,
        )
        mu = it.mu.float().cpu().numpy()
        sd = it.var.float().cpu().numpy() ** 0.5
        for k, style in ((1, "-"), (2, ":")):
            ax.add_patch(
                Ellipse(
                    tuple(mu), 2 * k * sd[0], 2 * k * sd[1], fill=False, color="tab:red", ls=style, lw=1.2
                )
            )
        ax.plot(mu[0], mu[1], "x", color="tab:red", ms=8, mew=2)
        ax.set_xlim(lo[0] - pad[0], hi[0] + pad[0])
        ax.set_ylim(lo[1] - pad[1], hi[1] + pad[1])
        ax.set_title(f"iteration {t + 1}: a_j = {it.activation:.3f}\nlambda = {it.lam:.3g}", fontsize=9)
        ax.set_xlabel(f"vote entry {h1} ({h1 // picture.pose_size},{h1 % picture.pose_size})", fontsize=8)
        if t == 0:
            ax.set_ylabel(f"vote entry {h2} ({h2 // picture.pose_size},{h2 % picture.pose_size})", fontsize=8)
        ax.tick_params(labelsize=7)
    where = f" at ({picture.position[0]}, {picture.position[1]})" if picture.position is not None else ""
    figure.suptitle(
        f"EM routing in {picture.layer}: {picture.children} children voting for {picture.parent_name}{where}\n"
        "colour: assignment r_ij; size: child activation a_i; red: parent Gaussian (mean, 1 and 2 sd)",
        fontsize=9,
    )
    figure.colorbar(scatter, ax=axes, shrink=0.85, label="r_ij")
    return figure


def plot_activation_maps(maps: dict[str, Tensor], wrap: int = 16) -> Any:
    """(d) Activation map of every capsule type, one block of rows per capsule layer."""
    blocks = [(name, m.float().cpu().numpy()) for name, m in maps.items()]  # (T, H, W) each
    columns = min(wrap, max(m.shape[0] for _, m in blocks))
    rows = sum(-(-m.shape[0] // columns) for _, m in blocks)
    figure = new_figure(0.75 * columns + 0.9, 0.8 * rows + 0.5)
    grid = figure.add_gridspec(rows, columns)
    row = 0
    image = None
    for name, m in blocks:
        for t in range(m.shape[0]):
            ax = figure.add_subplot(grid[row + t // columns, t % columns])
            image = ax.imshow(m[t], vmin=0, vmax=1, cmap="magma", interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(str(t), fontsize=6, pad=1)
            if t % columns == 0:
                ax.set_ylabel(name if t == 0 else "", fontsize=8)
        row += -(-m.shape[0] // columns)
    figure.suptitle("capsule activations per type (rows: layers)", fontsize=9)
    if image is not None:
        figure.colorbar(image, ax=figure.axes, shrink=0.6, label="activation")
    return figure


def plot_pose_perturbations(
    ins: Inspection, mean: list[float] | None, std: list[float] | None, tile_gap: int = 1
) -> Any:
    """(e) Decoder images as each pose entry of the predicted class is shifted in steps."""
    images = ins.perturbation  # (PP, S, C, H, W)
    entries, steps = images.shape[:2]
    lo, hi = float(images.min()), float(images.max())
    tiles = [[to_display(images[e, s], mean, std, (lo, hi)) for s in range(steps)] for e in range(entries)]
    th, tw = tiles[0][0].shape[:2]
    colour = tiles[0][0].ndim == 3
    shape = (entries * (th + tile_gap) - tile_gap, steps * (tw + tile_gap) - tile_gap) + (
        (3,) if colour else ()
    )
    mosaic = np.ones(shape, dtype=np.float32)
    for e in range(entries):
        for s in range(steps):
            y, x = e * (th + tile_gap), s * (tw + tile_gap)
            mosaic[y : y + th, x : x + tw] = tiles[e][s]
    figure = new_figure(0.32 * steps * tw / th + 1.2, 0.3 * entries + 0.8)
    ax = figure.add_subplot(1, 1, 1)
    ax.imshow(mosaic, cmap="gray" if not colour else None, vmin=0, vmax=1, interpolation="nearest")
    p = ins.pose_size
    ax.set_yticks(
        [e * (th + tile_gap) + th / 2 for e in range(entries)],
        [f"({e // p},{e % p})" for e in range(entries)],
    )
    ax.set_xticks([s * (tw + tile_gap) + tw / 2 for s in range(steps)], [f"{d:+.2g}" for d in ins.deltas])
    ax.tick_params(labelsize=6)
    ax.set_xlabel("added to the pose entry", fontsize=8)
    ax.set_ylabel("pose entry (row, col)", fontsize=8)
    ax.set_title(f"decoder output, {_name(ins.class_names, ins.prediction)} pose perturbed", fontsize=9)
    return figure


# --------------------------------------------------------------------------- eval


def plot_eval(report: Any) -> Any:
    """Per-class accuracy of a ``capsnet eval`` report (:class:`capsnet.evaluate.CheckpointEval`):
    single crop, multi-crop, and familiar vs novel viewpoints when the run has them."""
    r = report.result
    names = r.class_names or [str(i) for i in range(len(r.per_class_total))]
    novel = "novel viewpoints" if report.familiar is not None else report.split
    series = [(f"{novel}: {r.acc:.3f}", r.per_class_correct, r.per_class_total)]
    if report.multicrop is not None:
        m = report.multicrop
        series.append((f"{novel}, {m.label}: {m.acc:.3f}", m.per_class_correct, m.per_class_total))
    if report.familiar is not None:
        f = report.familiar
        series.append((f"familiar viewpoints: {f.acc:.3f}", f.per_class_correct, f.per_class_total))
        if report.multicrop_familiar is not None:
            mf = report.multicrop_familiar
            series.append((f"familiar, {mf.label}: {mf.acc:.3f}", mf.per_class_correct, mf.per_class_total))
    figure = new_figure(6.0, 1.0 + 0.22 * len(names) * len(series))
    ax = figure.add_subplot(1, 1, 1)
    height = 0.8 / len(series)
    empty = False
    for k, (label, correct, total) in enumerate(series):
        rows = np.arange(len(names)) + (k - (len(series) - 1) / 2) * height
        acc = [c / t if t else 0.0 for c, t in zip(correct, total)]
        bars = ax.barh(rows, acc, height, label=label)
        for row, t in zip(rows, total):
            if not t:  # no images of the class: no bar, a note instead of a 0% one
                ax.text(
                    0.01, row, "no images", va="center", fontsize=6, color=bars.patches[0].get_facecolor()
                )
                empty = True
    if empty:
        ax.set_xlabel("accuracy (classes with no images in the split have no bar)")
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    if not empty:
        ax.set_xlabel("accuracy")
    ax.grid(axis="x", alpha=0.3)
    figure.legend(fontsize=7, loc="outside lower center", ncols=2)
    ax.set_title(f"{report.run or 'checkpoint'} at step {report.step}: per-class accuracy", fontsize=9)
    return figure
