"""White-box adversarial attacks: accuracy (or targeted success) against the size of the perturbation.

The paper compares how capsules and a CNN stand up to the fast gradient sign
method (FGSM) and its iterative form (BIM), untargeted and targeted. Both move
the image along the sign of the gradient of a loss on the class capsules:
cross-entropy over the activation logits ``ln a - ln(1 - a)``, ascended away
from the true class (untargeted) or descended towards a target class (targeted).

* FGSM: ``x' = x + eps * sign(grad)`` in one step.
* BIM: ``steps`` steps of ``step_size``, each followed by a projection back into
  the ``eps`` box around ``x`` (default step size ``2.5 * eps / steps``).

Units of ``eps``: for datasets with a fixed per-channel normalisation (MNIST,
Fashion-MNIST, CIFAR-10, SVHN, folders, synthetic) ``eps`` is a fraction of the
pixel range [0, 1], and adversarial images are clipped to valid pixels. For
smallNORB, standardised per image, ``eps`` is in units of the image's standard
deviation (no clipping).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader

from capsnet.loss import class_scores
from capsnet.tracking import strict_json
from capsnet.visualize import ExperimentError, check_writable

METHODS = ("fgsm", "bim")
TARGETS = ("next", "random", "least")


#: the largest epsilon taken in any units (a standardised image's spans some tens of them)
MAX_EPS = 1000.0


def check_pixel_epsilons(epsilons: list[float], space: InputSpace) -> None:
    """Refuses an epsilon past 1 in pixel units, where 1 already lets each pixel take any value."""
    too_large = [eps for eps in epsilons if eps > 1]
    if space.units == "pixel" and too_large:
        raise ExperimentError(
            f"--eps: {too_large[0]:g} is past 1, which already lets each pixel take any value (this run's "
            "epsilons are in pixel units, its images spanning 0 to 1)"
        )


def parse_epsilons(text: str) -> list[float]:
    """``"0.01,0.05,0.1"`` -> [0.01, 0.05, 0.1] (sorted, duplicates dropped); ExperimentError if malformed."""
    values = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            value = float(part)
        except ValueError:
            raise ExperimentError(f"--eps: {part!r} is not a number (expected e.g. 0.01,0.05,0.1)") from None
        if not math.isfinite(value) or value < 0:
            raise ExperimentError(f"--eps: {part!r} must be a finite number >= 0")
        if value > MAX_EPS:
            raise ExperimentError(f"--eps: {part!r} is too large (at most {MAX_EPS:g})")
        values.append(value)
    if not values:
        raise ExperimentError("--eps: give at least one epsilon, e.g. 0.01,0.05,0.1,0.2")
    return sorted(set(values))


TB_STEPS_PER_EPS = 1000  # TensorBoard has integer steps: epsilon e is logged at step e x 1000, rounded


def tensorboard_step(eps: float) -> int:
    """eps x 1000 rounded half up, so that epsilons 0.001 apart never share a step.

    Python's round() sends halves to the even neighbour (0.0015 and 0.0025 would both be
    step 2); the product is first rounded to 6 decimals so that float error in eps x 1000
    (500.49999999999994 for 0.5005) does not move a half down.
    """
    return math.floor(round(eps * TB_STEPS_PER_EPS, 6) + 0.5)


def tensorboard_steps(epsilons: list[float]) -> list[int]:
    """The TensorBoard step of each epsilon; ExperimentError where two would share one.

    The clean accuracy is logged at step 0 when no epsilon is 0, so a nonzero epsilon
    that rounds to step 0 would share it too.
    """
    steps = [tensorboard_step(eps) for eps in epsilons]
    taken: dict[int, float] = {} if 0.0 in epsilons else {0: 0.0}
    for eps, step in zip(epsilons, steps):
        other = taken.get(step)
        if other is not None and other != eps:
            clash = "the clean accuracy (eps 0)" if other == 0.0 else f"eps {other:g}"
            raise ExperimentError(
                f"--eps: {eps:g} and {clash} would share TensorBoard step {step} (steps are eps x "
                f"{TB_STEPS_PER_EPS}): give epsilons at least {1 / TB_STEPS_PER_EPS:g} apart, or pass "
                "--no-tensorboard (the JSON report keeps every epsilon)"
            )
        taken[step] = eps
    return steps


def activation_logits(activations: Tensor) -> Tensor:
    """ln a - ln(1 - a) of class activations (N, E), the quantity the attacks' cross-entropy uses."""
    return class_scores(activations.float())


@dataclass
class InputSpace:
    """How ``eps`` maps to the model's (normalised) input and which inputs are valid pixels."""

    scale: Tensor  # (1, C, 1, 1): input units per unit of eps
    low: Tensor | None  # (1, C, 1, 1) bounds of valid pixels in input units, or None (no clipping)
    high: Tensor | None
    units: str  # "pixel" | "standardised"

    @classmethod
    def from_info(cls, mean: list[float] | None, std: list[float] | None, channels: int) -> InputSpace:
        if mean is None or std is None:
            return cls(torch.ones(1, channels, 1, 1), None, None, "standardised")
        m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        s = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        return cls(1.0 / s, (0.0 - m) / s, (1.0 - m) / s, "pixel")

    def to(self, device: torch.device) -> InputSpace:
        low = None if self.low is None else self.low.to(device)
        high = None if self.high is None else self.high.to(device)
        return InputSpace(self.scale.to(device), low, high, self.units)

    def project(self, x_adv: Tensor, x: Tensor, eps: float) -> Tensor:
        """``x_adv`` clipped into the eps box around ``x`` and to valid pixels."""
        radius = eps * self.scale
        x_adv = torch.maximum(torch.minimum(x_adv, x + radius), x - radius)
        if self.low is not None:
            x_adv = torch.maximum(torch.minimum(x_adv, self.high), self.low)
        return x_adv


def gradient_sign(
    model: nn.Module, x: Tensor, labels: Tensor, targeted: bool, precision: str = "fp32"
) -> Tensor:
    """Sign of the gradient that raises the loss on ``labels`` (lowers it when ``targeted``)."""
    from capsnet.evaluate import autocast

    x = x.detach().requires_grad_(True)
    with torch.enable_grad(), autocast(x.device, precision):
        out = model(x)
        loss = F.cross_entropy(activation_logits(out.activations), labels, reduction="sum")
    (grad,) = torch.autograd.grad(loss, x)
    return -grad.sign() if targeted else grad.sign()


def fgsm(
    model: nn.Module, x: Tensor, labels: Tensor, eps: float, space: InputSpace, targeted: bool = False, **kw
) -> Tensor:
    """One step of size ``eps`` along the gradient sign."""
    if eps == 0:
        return x
    return space.project(x + eps * space.scale * gradient_sign(model, x, labels, targeted, **kw), x, eps)


def bim(
    model: nn.Module,
    x: Tensor,
    labels: Tensor,
    eps: float,
    space: InputSpace,
    targeted: bool = False,
    steps: int = 10,
    step_size: float | None = None,
    **kw,
) -> Tensor:
    """``steps`` FGSM steps of ``step_size`` (default 2.5 eps / steps), projected into the eps box each time."""
    if eps == 0:
        return x
    alpha = bim_step_size(eps, steps, step_size)
    x_adv = x
    for _ in range(steps):
        x_adv = space.project(
            x_adv + alpha * space.scale * gradient_sign(model, x_adv, labels, targeted, **kw), x, eps
        )
    return x_adv.detach()


def choose_targets(labels: Tensor, activations: Tensor, mode: str, generator: torch.Generator) -> Tensor:
    """Target classes: "next" (label + 1 mod E), "random" (any other class), "least" (least active other class)."""
    num_classes = activations.shape[1]
    if mode == "next":
        return (labels + 1) % num_classes
    if mode == "random":
        shift = torch.randint(1, num_classes, labels.shape, generator=generator).to(labels.device)
        return (labels + shift) % num_classes
    if mode == "least":
        masked = activations.float().clone()
        masked[torch.arange(len(labels)), labels] = float("inf")
        return masked.argmin(1)
    raise ExperimentError(f"--target: {mode!r} is not one of: {', '.join(TARGETS)}")


def bim_step_size(eps: float, steps: int, step_size: float | None = None) -> float:
    """The step BIM takes at ``eps``: ``step_size``, or by default 2.5 eps / steps."""
    return step_size if step_size is not None else 2.5 * eps / steps


@dataclass
class AttackPoint:
    eps: float
    acc: float  # accuracy on the attacked images
    success: float | None  # targeted: share classified as the target; untargeted: None
    correct: int
    hits: int | None
    #: images the attack left exactly as they were (eps > 0): every gradient entry was zero,
    #: as when class activations saturate at 0 or 1, or every pixel was pushed against its bound
    unmoved: int = 0
    step_size: float | None = None  # BIM: the step taken at this eps (given, or 2.5 eps / steps)


@dataclass
class AttackReport:
    checkpoint: str
    run: str
    split: str
    method: str
    targeted: bool
    target: str | None
    steps: int | None
    step_size: float | None
    eps_units: str
    n: int
    clean_acc: float
    points: list[AttackPoint]
    files: dict[str, str] = field(default_factory=dict)
    replaced: list[str] = field(default_factory=list)  # report files of an earlier attack written over
    removed: list[str] = field(default_factory=list)  # an earlier attack's figure, where this one drew none
    #: routing iterations the model was attacked with, and where -o model.iterations changed it, trained with
    iterations: int | None = None
    trained_iterations: int | None = None

    @property
    def name(self) -> str:
        return f"{self.method}-targeted" if self.targeted else self.method

    def to_dict(self) -> dict[str, Any]:
        return {
            "checkpoint": self.checkpoint,
            "run": self.run,
            "split": self.split,
            "method": self.method,
            "targeted": self.targeted,
            "target": self.target,
            "steps": self.steps,
            "step_size": self.step_size,
            "eps_units": self.eps_units,
            "n": self.n,
            "clean_acc": self.clean_acc,
            **({"iterations": self.iterations} if self.iterations is not None else {}),
            **(
                {"trained_iterations": self.trained_iterations} if self.trained_iterations is not None else {}
            ),
            "results": [
                {
                    "eps": p.eps,
                    "acc": p.acc,
                    "success": p.success,
                    "correct": p.correct,
                    "hits": p.hits,
                    "unmoved": p.unmoved,
                    **({"step_size": p.step_size} if p.step_size is not None else {}),
                }
                for p in self.points
            ],
            "files": self.files,
        }

    def table(self) -> str:
        header = f"{'epsilon':>8}  {'accuracy':>8}" + (f"  {'success':>8}" if self.targeted else "")
        lines = [header, f"{'clean':>8}  {self.clean_acc:8.4f}" + (f"  {'':>8}" if self.targeted else "")]
        for p in self.points:
            line = f"{p.eps:8.4g}  {p.acc:8.4f}"
            if self.targeted:
                line += f"  {p.success:8.4f}"
            lines.append(line)
        return "\n".join(lines)

    def summary(self) -> str:
        kind = f"targeted ({self.target} class)" if self.targeted else "untargeted"
        detail = f", {self.steps} steps" if self.method == "bim" else ""
        lines = [
            f"checkpoint {self.checkpoint} (run {self.run})",
            f"{self.method.upper()} {kind}{detail} on {self.n} {self.split} images, eps in {self.eps_units} units",
            self.table(),
        ]
        if self.trained_iterations is not None:
            from capsnet.evaluate import iterations_note

            lines.insert(1, iterations_note(self.iterations, self.trained_iterations))
        for p in self.points:
            if p.eps > 0 and p.unmoved:
                lines.append(
                    f"note: at eps {p.eps:g}, {p.unmoved} of {self.n} images were not changed at all (a zero "
                    "gradient: saturated class activations, or pixels all at their bounds), so the accuracy "
                    "there overstates robustness"
                )
        lines += [f"wrote {path}" for path in self.files.values()]
        return "\n".join(lines)


@dataclass
class Examples:
    """One image attacked at every epsilon, for the figure."""

    clean: Tensor  # (C, H, W)
    label: int
    target: int | None
    adversarial: list[Tensor]  # one (C, H, W) per epsilon
    predictions: list[int]


def run_attack(
    model: nn.Module,
    loader: DataLoader,
    epsilons: list[float],
    space: InputSpace,
    method: str = "fgsm",
    targeted: bool = False,
    target: str = "next",
    steps: int = 10,
    step_size: float | None = None,
    precision: str = "fp32",
    seed: int = 0,
    progress: bool = True,
) -> tuple[float, list[AttackPoint], int, Examples | None]:
    """(clean accuracy, one AttackPoint per epsilon, images attacked, examples of the first image).

    Images are classified in ``precision`` (bf16 autocast or fp32), as ``capsnet eval`` scores
    them and as the gradients are taken, so the clean accuracy is the evaluation's.
    """
    from capsnet.evaluate import autocast
    from capsnet.tracking import progress as progress_bar

    if method not in METHODS:
        raise ExperimentError(f"--method: {method!r} is not one of: {', '.join(METHODS)}")
    device = next(model.parameters()).device
    space = space.to(device)
    generator = torch.Generator().manual_seed(seed)
    model.eval()
    clean_correct, total = 0, 0
    correct = [0] * len(epsilons)
    hits = [0] * len(epsilons)
    unmoved = [0] * len(epsilons)
    examples = None
    for x, y in progress_bar(loader, len(loader), progress, desc=f"attack {method}"):
        x, y = x.to(device), y.to(device)
        with torch.no_grad(), autocast(device, precision):
            clean = model(x).activations.float()  # (N, E)
        clean_correct += int((clean.argmax(1) == y).sum())
        total += len(y)
        goal = choose_targets(y, clean, target, generator) if targeted else y
        unchanged = space.project(x, x, 0.0)  # x as the projection alone leaves it (valid pixels)
        adversarial = []
        for k, eps in enumerate(epsilons):
            if method == "fgsm":
                x_adv = fgsm(model, x, goal, eps, space, targeted, precision=precision)
            else:
                x_adv = bim(model, x, goal, eps, space, targeted, steps, step_size, precision=precision)
            with torch.no_grad(), autocast(device, precision):
                pred = model(x_adv).activations.float().argmax(1)  # (N,)
            correct[k] += int((pred == y).sum())
            hits[k] += int((pred == goal).sum())
            if eps > 0:
                unmoved[k] += int((x_adv == unchanged).flatten(1).all(1).sum())
            if examples is None:
                adversarial.append((x_adv[0].detach().cpu(), int(pred[0])))
        if examples is None:
            examples = Examples(
                x[0].cpu(),
                int(y[0]),
                int(goal[0]) if targeted else None,
                [a for a, _ in adversarial],
                [p for _, p in adversarial],
            )
    if total == 0:
        raise ExperimentError("no images to attack (the split is empty)")
    points = [
        AttackPoint(
            eps,
            correct[k] / total,
            hits[k] / total if targeted else None,
            correct[k],
            hits[k] if targeted else None,
            unmoved[k],
            bim_step_size(eps, steps, step_size) if method == "bim" else None,
        )
        for k, eps in enumerate(epsilons)
    ]
    return clean_correct / total, points, total, examples


def attack_checkpoint(
    spec: str,
    out_dir: str = "weights/em_capsules",
    split: str = "test",
    method: str = "fgsm",
    epsilons: list[float] | None = None,
    targeted: bool = False,
    target: str = "next",
    steps: int = 10,
    step_size: float | None = None,
    limit: int | None = None,
    batch_size: int | None = None,
    data_root: str | None = None,
    device: str = "auto",
    overrides: list[str] | None = None,
    report_dir: str | Path | None = None,
    tensorboard: bool | None = None,
    tb_dir: str | None = None,
    plot: bool = True,
    progress: bool = True,
) -> AttackReport:
    """Attacks the checkpoint ``spec`` names on (up to ``limit`` images of) ``split``.

    Writes ``attack-<method>[-targeted].json`` and, when ``plot`` (needs matplotlib),
    a ``.png`` of accuracy against epsilon to ``report_dir`` (default
    ``reports/<run>``), and TensorBoard scalars ``attack/<name>/acc`` (and
    ``/success``) to ``<tb_dir>/<run>/attack`` with the step = epsilon x 1000
    (see :func:`tensorboard_steps`) when ``tensorboard``; None: when the run wrote TensorBoard
    events as it trained (its ``logging.tensorboard``), or when ``tb_dir`` is given.
    """
    from capsnet.evaluate import prepare_checkpoint
    from capsnet.visualize import require_matplotlib

    if method not in METHODS:
        raise ExperimentError(f"--method: {method!r} is not one of: {', '.join(METHODS)}")
    if target not in TARGETS:
        raise ExperimentError(f"--target: {target!r} is not one of: {', '.join(TARGETS)}")
    if steps < 1:
        raise ExperimentError(f"--steps must be at least 1, got {steps}")
    if plot:
        require_matplotlib()
    epsilons = list(epsilons or [0.01, 0.05, 0.1, 0.2])
    if tb_dir is not None and tensorboard is None:  # a folder for the events asks for them
        tensorboard = True
    # a clash is reported before the checkpoint and its data load where events are asked for
    steps_tb = tensorboard_steps(epsilons) if tensorboard else []
    prep = prepare_checkpoint(spec, out_dir, split, batch_size, data_root, device, overrides, limit)
    if tensorboard is None:  # a run kept out of TensorBoard as it trained is kept out of it here too
        tensorboard = prep.cfg.logging.tensorboard
        steps_tb = tensorboard_steps(epsilons) if tensorboard else []  # still before the attack
    info = prep.loaders.info
    space = InputSpace.from_info(info.mean, info.std, info.channels)
    check_pixel_epsilons(epsilons, space)
    folder = Path(report_dir) if report_dir is not None else Path("reports") / prep.run
    log_dir = Path(tb_dir or prep.cfg.logging.tb_dir) / prep.run / "attack"
    from capsnet.data import tidy_made_folders

    # an attack stopped or failed leaves no folder it made empty behind it
    places = [folder, *([log_dir] if tensorboard else [])]
    with tidy_made_folders(*places):
        # the attack may take hours: a place its results cannot be written to is an error before it
        for place in places:
            check_writable(place)
        for param in prep.model.parameters():
            param.requires_grad_(False)
        clean_acc, points, n, examples = run_attack(
            prep.model,
            prep.loader,
            epsilons,
            space,
            method,
            targeted,
            target,
            steps,
            step_size,
            prep.cfg.train.precision,
            prep.cfg.train.seed,
            progress,
        )
        report = AttackReport(
            str(prep.path),
            prep.run,
            split,
            method,
            targeted,
            target if targeted else None,
            steps if method == "bim" else None,
            step_size if method == "bim" else None,
            space.units,
            n,
            clean_acc,
            points,
            iterations=prep.iterations,
            trained_iterations=prep.trained_iterations,
        )
        path = folder / f"attack-{report.name}.json"
        png = folder / f"attack-{report.name}.png"
        report.replaced = [str(file) for file in ([path, png] if plot else [path]) if file.exists()]
        figure = None
        if plot:
            from capsnet.visualize import plot_attack, save_figure

            figure = plot_attack(report, examples, prep.class_names, info.mean, info.std)
            save_figure(figure, png)
            report.files["png"] = str(png)
        if tensorboard:
            _log_tensorboard(report, steps_tb, log_dir, figure)
            report.files["tensorboard"] = str(log_dir)
        report.files["json"] = str(path)
        path.write_text(strict_json(report.to_dict(), indent=2) + "\n")
        if not plot and png.exists():  # it would stand beside these results as theirs
            png.unlink()
            report.removed = [str(png)]
        return report


def _log_tensorboard(report: AttackReport, steps: list[int], log_dir: Path, figure: Any) -> None:
    """``steps``: the TensorBoard step of each of ``report.points`` (:func:`tensorboard_steps`)."""
    from capsnet.tracking import TensorBoardWriter

    writer = TensorBoardWriter(log_dir)
    try:
        if all(p.eps != 0 for p in report.points):
            writer.scalar(f"attack/{report.name}/acc", report.clean_acc, 0)
        for p, step in zip(report.points, steps, strict=True):
            writer.scalar(f"attack/{report.name}/acc", p.acc, step)
            if p.success is not None:
                writer.scalar(f"attack/{report.name}/success", p.success, step)
        if figure is not None:
            from capsnet.visualize import figure_to_tensor

            writer.image(f"attack/{report.name}/plot", figure_to_tensor(figure), 0)
    finally:
        writer.close()
