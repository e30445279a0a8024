"""Look inside a trained CapsNet on one image: what ``capsnet inspect`` draws.

One forward pass collects (a) the decoder's reconstructions, (b) the class
activations, (c) for one routing layer and one parent capsule, the children's
votes, their assignments and the parent's Gaussian after every EM iteration,
(d) the activation maps of every capsule type, and (e) the decoder's images as
each entry of the predicted class's pose is perturbed. :mod:`capsnet.visualize`
turns them into figures.

The routing layer under study runs the plain EM path with a trace
(:attr:`capsnet.layers.RoutingLayer.trace`); every other layer runs as usual.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from capsnet.visualize import ExperimentError

FIGURES = {
    "a": "a_reconstruction",
    "b": "b_class_activations",
    "c": "c_routing",
    "d": "d_activation_maps",
    "e": "e_pose_perturbation",
}


@dataclass
class RoutingIteration:
    r: Tensor  # (I,) assignment of each child to the parent entering this iteration's M-step
    mu: Tensor  # (2,) parent mean on the two pose entries
    var: Tensor  # (2,) parent variance on them
    activation: float  # a_j after this iteration
    lam: float  # inverse temperature


@dataclass
class RoutingPicture:
    layer: str
    parent: int  # parent capsule type (class index in the class layer)
    parent_name: str
    position: tuple[int, int] | None  # parent position in a convolutional layer
    entries: tuple[int, int]  # the two pose entries (flattened index 0..P*P-1)
    pose_size: int
    votes: Tensor  # (I, 2) vote of each child on the two entries
    child_act: Tensor  # (I,) child activations a_i
    iterations: list[RoutingIteration]

    @property
    def children(self) -> int:
        return self.votes.shape[0]


@dataclass
class Inspection:
    index: int
    split: str
    label: int
    prediction: int
    class_names: list[str]
    image: Tensor  # (C, H, W) model input
    activations: Tensor  # (E,)
    pose_size: int
    routing: RoutingPicture
    maps: dict[str, Tensor]  # layer -> (T, H, W) activation of each capsule type
    reconstruction: Tensor | None = None  # (C, H, W) from the predicted class's pose
    reconstruction_label: Tensor | None = None  # from the true class's pose, when the prediction is wrong
    perturbation: Tensor | None = None  # (P*P, S, C, H, W)
    deltas: list[float] = field(default_factory=list)
    files: dict[str, str] = field(default_factory=dict)
    replaced: list[str] = field(default_factory=list)  # figures of an earlier inspection written over
    removed: list[str] = field(default_factory=list)  # figures of an earlier inspection not drawn this time
    trained_iterations: int | None = None  # where -o model.iterations changed them, the run's own
    untrained_decoder: bool = False  # the run's loss.recon_weight was 0: its decoder never learned

    def summary(self, with_files: bool = True) -> str:
        names = self.class_names
        acts = ", ".join(
            f"{names[i] if i < len(names) else i} {a:.3f}" for i, a in enumerate(self.activations.tolist())
        )
        pic = self.routing
        where = f" at {pic.position}" if pic.position is not None else ""
        lines = [
            f"{self.split} image {self.index}: label {names[self.label]}, predicted {names[self.prediction]}",
            f"class activations: {acts}",
            f"routing figure: layer {pic.layer}, parent {pic.parent_name}{where}, pose entries {pic.entries}, "
            f"parent activation per iteration "
            + " -> ".join(f"{it.activation:.3f}" for it in pic.iterations),
        ]
        if self.reconstruction is None:  # the figures that need a decoder say why they are missing
            lines.append(
                "no decoder in this model (model.decoder: false): figure (a) shows the input alone, "
                "and figure (e), the pose perturbations (--perturb, --steps), is not drawn"
            )
        elif self.untrained_decoder:
            lines.append(
                "the decoder was not trained (the run's loss.recon_weight is 0): figures (a) and (e) "
                "show what its initial weights make of the poses, not reconstructions"
            )
        if self.trained_iterations is not None:
            from capsnet.evaluate import iterations_note

            lines.insert(1, iterations_note(len(pic.iterations), self.trained_iterations))
        if with_files:
            lines += [f"wrote {path}" for path in self.files.values()]
        return "\n".join(lines)


def parse_pair(text: str | None, what: str) -> tuple[int, int] | None:
    """``"3,1"`` -> (3, 1); None or "auto" -> None."""
    if text is None or text.strip().lower() == "auto":
        return None
    parts = [p.strip() for p in text.split(",")]
    try:
        first, second = (int(p) for p in parts)
    except ValueError:
        raise ExperimentError(f"{what}: expected two integers like 0,1 (or auto), got {text!r}") from None
    return first, second


def _trace_layer(model: Any, name: str) -> Any:
    layers = {layer.name: layer for layer in model.routing_layers()}
    if name not in layers:
        raise ExperimentError(
            f"--layer: {name!r} is not a routing layer of this model (choose: {', '.join(layers)})"
        )
    return layers[name]


def _pick_entries(
    votes: Tensor, child_act: Tensor, pose_size: int, entries: tuple[int, int] | None
) -> tuple[int, int]:
    count = votes.shape[-1]
    if entries is not None:
        if entries[0] == entries[1] or not all(0 <= e < count for e in entries):
            raise ExperimentError(f"--entries: two different pose entries in 0..{count - 1}, got {entries}")
        return entries
    # The two entries along which the (activation-weighted) votes spread most.
    w = child_act / child_act.sum().clamp_min(1e-12)  # (I,)
    mean = (w[:, None] * votes).sum(0)
    spread = (w[:, None] * (votes - mean) ** 2).sum(0)  # (H,)
    first, second = spread.topk(2).indices.tolist()
    return int(first), int(second)


@torch.no_grad()
def inspect_image(
    model: Any,
    image: Tensor,
    label: int,
    class_names: list[str],
    index: int = 0,
    split: str = "test",
    layer: str = "class",
    parent: int | None = None,
    position: tuple[int, int] | None = None,
    entries: tuple[int, int] | None = None,
    perturb: float = 0.25,
    steps: int = 11,
) -> Inspection:
    """Everything the inspect figures show for ``image`` (C, H, W) with true class ``label``."""
    device = next(model.parameters()).device
    model.eval()
    target = _trace_layer(model, layer)
    if model.classcaps.pose_size < 2:
        p = model.classcaps.pose_size
        raise ExperimentError(
            f"figure (c) plots the votes on two pose entries, but this model's poses are {p}x{p} "
            f"(model.pose_size {p}: one entry); inspect needs a model with model.pose_size 2 or more"
        )
    maps: dict[str, Tensor] = {}

    def keep(name: str):
        def hook(module, inputs, output) -> None:
            maps[name] = output[1][0].permute(2, 0, 1).float().cpu()  # (N, H, W, T) -> (T, H, W)

        return hook

    capsule_layers = [("primary", model.primary), *[(m.name, m) for m in model.convcaps]]
    handles = [module.register_forward_hook(keep(name)) for name, module in capsule_layers]
    target.trace = {}
    try:
        x = image[None].to(device)
        out = model(x)
        trace = target.trace
    finally:
        target.trace = None
        for handle in handles:
            handle.remove()
    activations = out.activations[0].float().cpu()  # (E,)
    prediction = int(activations.argmax())
    pose_size = model.classcaps.pose_size

    # (c) the chosen parent: (position l, type j) in the traced layer.
    votes = trace["votes"][0].reshape(*trace["votes"].shape[1:4], -1).float().cpu()  # (L, C, I, H)
    act_in = trace["act_in"][0].float().cpu()  # (L, I)
    final = trace["iterations"][-1]["act"][0].float().cpu()  # (L, C)
    types = final.shape[1]
    where = None
    if layer == model.classcaps.name:
        if position is not None:
            raise ExperimentError(
                f"--position: the class capsules have one position (pooled over the grid); it applies to "
                f"ConvCaps layers ({', '.join(m.name for m in model.convcaps)})"
            )
        j = prediction if parent is None else parent
        l = 0
        name = class_names[j] if j < len(class_names) else f"class {j}"
    else:
        rows, cols = maps[layer].shape[1:]  # (C, Ho, Wo)
        if position is not None and not (0 <= position[0] < rows and 0 <= position[1] < cols):
            raise ExperimentError(f"--position: {layer} has {rows}x{cols} positions, got {position}")
        if parent is not None:
            j = parent
        elif position is not None:  # the most active type there
            j = int(final[position[0] * cols + position[1]].argmax())
        else:  # the most active capsule of the layer
            j = int(final.argmax()) % types
        if position is not None:
            l = position[0] * cols + position[1]
        else:  # where type j is most active
            l = int(final[:, j].argmax()) if 0 <= j < types else 0
        where = (l // cols, l % cols)
        name = f"type {j}"
    if not 0 <= j < types:
        raise ExperimentError(f"--parent: {layer} has {types} parent types (0..{types - 1}), got {j}")
    h1, h2 = _pick_entries(votes[l, j], act_in[l], pose_size, entries)
    iterations = [
        RoutingIteration(
            r=it["r"][0, l, j].float().cpu(),
            mu=it["mu"][0, l, j, [h1, h2]].float().cpu(),
            var=it["var"][0, l, j, [h1, h2]].float().cpu(),
            activation=float(it["act"][0, l, j]),
            lam=float(it["lambda"]),
        )
        for it in trace["iterations"]
    ]
    picture = RoutingPicture(
        layer, j, name, where, (h1, h2), pose_size, votes[l, j][:, [h1, h2]], act_in[l], iterations
    )
    result = Inspection(
        index, split, label, prediction, list(class_names), image.cpu(), activations, pose_size, picture, maps
    )

    # (a) and (e): the decoder, from the predicted (and the true) class's pose.
    if model.decoder is not None:
        pred = torch.tensor([prediction], device=device)
        result.reconstruction = model.reconstruct(out.poses, pred)[0].float().cpu()
        if label != prediction:
            truth = torch.tensor([label], device=device)
            result.reconstruction_label = model.reconstruct(out.poses, truth)[0].float().cpu()
        deltas = [perturb * (2 * k / (steps - 1) - 1) for k in range(steps)]  # exactly 0 in the middle
        shifts = torch.tensor(deltas, device=device)  # (S,)
        poses = out.poses[0].reshape(out.poses.shape[1], -1)  # (E, P*P)
        entries_count = poses.shape[1]
        batch = poses.expand(entries_count, steps, *poses.shape).clone()  # (P*P, S, E, P*P)
        for e in range(entries_count):
            batch[e, :, prediction, e] += shifts
        batch = batch.reshape(entries_count * steps, poses.shape[0], pose_size, pose_size)
        labels = torch.full((len(batch),), prediction, device=device)
        images = model.reconstruct(batch, labels)  # (P*P*S, C, H, W)
        result.perturbation = images.view(entries_count, steps, *images.shape[1:]).float().cpu()
        result.deltas = deltas
    return result


def figures(ins: Inspection, mean: list[float] | None, std: list[float] | None) -> dict[str, Any]:
    """The five figures (a)-(e) as matplotlib Figures, keyed by file stem; (a) and (e) need a decoder."""
    from capsnet import visualize as viz

    out = {FIGURES["a"]: viz.plot_reconstruction(ins, mean, std)}
    out[FIGURES["b"]] = viz.plot_class_activations(ins)
    out[FIGURES["c"]] = viz.plot_routing(ins.routing)
    out[FIGURES["d"]] = viz.plot_activation_maps(ins.maps)
    if ins.perturbation is not None:
        out[FIGURES["e"]] = viz.plot_pose_perturbations(ins, mean, std)
    return out


def inspect_checkpoint(
    spec: str,
    index: int = 0,
    out_dir: str = "weights/em_capsules",
    split: str = "test",
    layer: str = "class",
    parent: int | None = None,
    position: tuple[int, int] | None = None,
    entries: tuple[int, int] | None = None,
    perturb: float = 0.25,
    steps: int = 11,
    data_root: str | None = None,
    device: str = "auto",
    overrides: list[str] | None = None,
    report_dir: str | Path | None = None,
    tensorboard: bool = False,
    tb_dir: str | None = None,
) -> Inspection:
    """Writes the figures for image ``index`` of ``split`` as PNGs to ``report_dir``
    (default ``reports/<run>/inspect-<split>-<index>``) and, with ``tensorboard`` (or a
    ``tb_dir``, which asks for it), as images tagged ``inspect/<figure>`` at step ``index`` to
    ``<tb_dir>/<run>/inspect``."""
    from capsnet.data import tidy_made_folders
    from capsnet.evaluate import prepare_checkpoint
    from capsnet.visualize import check_writable, figure_to_tensor, require_matplotlib, save_figure

    require_matplotlib()
    tensorboard = tensorboard or tb_dir is not None  # a folder for the events asks for them
    if steps < 2:
        raise ExperimentError(f"--steps must be at least 2, got {steps}")
    if not math.isfinite(perturb):
        raise ExperimentError(f"--perturb must be a finite number, got {perturb}")
    if perturb <= 0:
        raise ExperimentError(f"--perturb must be positive, got {perturb}")
    prep = prepare_checkpoint(
        spec, out_dir, split, 1, data_root, device, overrides, draws_reconstructions=True
    )
    dataset = prep.loader.dataset
    if not 0 <= index < len(dataset):
        raise ExperimentError(
            f"--index: the {split} split has {len(dataset)} images (0..{len(dataset) - 1}), got {index}"
        )
    image, label = dataset[index]
    ins = inspect_image(
        prep.model,
        image,
        int(label),
        prep.class_names,
        index,
        split,
        layer,
        parent,
        position,
        entries,
        perturb,
        steps,
    )
    ins.trained_iterations = prep.trained_iterations
    trained_loss = (prep.ckpt.get("config") or {}).get("loss") or {}
    ins.untrained_decoder = trained_loss.get("recon_weight", 1) == 0
    folder = (
        Path(report_dir)
        if report_dir is not None
        else Path("reports") / prep.run / f"inspect-{split}-{index}"
    )
    log_dir = Path(tb_dir or prep.cfg.logging.tb_dir) / prep.run / "inspect"
    places = [folder, *([log_dir] if tensorboard else [])]
    with tidy_made_folders(*places):  # a failure leaves no folder it made behind it
        for place in places:  # a place that cannot be written to is refused before any figure is
            check_writable(place)
        info = prep.loaders.info
        drawn = figures(ins, info.mean, info.std)
        for stem, figure in drawn.items():
            png = folder / f"{stem}.png"
            if png.exists():
                ins.replaced.append(str(png))
            ins.files[stem] = str(save_figure(figure, png))
        for stem in FIGURES.values():  # an earlier inspection's figure that this one does not draw
            png = folder / f"{stem}.png"
            if stem not in drawn and png.exists():
                png.unlink()
                ins.removed.append(str(png))
    if tensorboard:
        from capsnet.tracking import TensorBoardWriter

        writer = TensorBoardWriter(log_dir)
        try:
            for stem, figure in drawn.items():
                writer.image(f"inspect/{split}/{stem}", figure_to_tensor(figure), index)
            # the report's text (prediction, routing iterations, the figure's parent) beside the images
            writer.text(f"inspect/{split}/summary", ins.summary(with_files=False), index)
        finally:
            writer.close()
        ins.files["tensorboard"] = str(log_dir)
    return ins
