"""How a checkpoint's capsule activations behave: what the spread loss can reach, and
how much each capsule layer's activations depend on the input.

    python scripts/class_activations.py weights/em_capsules/<run>/best.pt [--split test] [--limit 2000]

The spread loss asks for a_target - a_other >= margin (0.9 at the end of a run). With
the routing's inverse temperature this small (about 0.001 in the last of two
iterations) a class that receives no votes gets a = sigmoid(lambda * beta_a): unless
beta_a is learned in logit units (``routing.beta_a_logit``) that floor stays near 0.5
and no image can meet a margin above 0.5. Prints the target and other activations,
their logits and the share of images whose margin meets 0.5 and 0.9.

Then, for every capsule layer (primary, each ConvCaps layer, the class capsules): the
mean activation, its spread over images (the standard deviation over images of each
capsule at a fixed position, averaged over positions and types) and that spread in
logit units. A layer whose spread is near zero passes the same activations for every
image, so its parents' routing learns nothing from them. With one inverse temperature
for all layers that is what happens to the ConvCaps layers, whose activation cost is
far smaller than the class capsules' (see ``routing.layer_cost_scales``).
"""

from __future__ import annotations

import argparse
import sys

import torch


def summarise(activations: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Statistics of (N, E) class activations against the (N,) labels."""
    is_target = torch.nn.functional.one_hot(labels, activations.shape[1]).bool()
    target = activations[is_target]  # (N,), in image order
    other = activations[~is_target]
    best_other = activations.masked_fill(is_target, float("-inf")).max(1).values
    logits = torch.logit(activations.double(), eps=1e-12)
    margin = target - best_other
    return {
        "accuracy": (activations.argmax(1) == labels).double().mean().item(),
        "target_mean": target.double().mean().item(),
        "other_mean": other.double().mean().item(),
        "best_other_mean": best_other.double().mean().item(),
        "other_min": other.min().item(),
        "logit_min": logits.min().item(),
        "logit_max": logits.max().item(),
        "margin_mean": margin.double().mean().item(),
        "margin_0.5": (margin >= 0.5).double().mean().item(),
        "margin_0.9": (margin >= 0.9).double().mean().item(),
    }


def spread(activations: torch.Tensor) -> dict[str, float]:
    """Statistics of one layer's activations, (N, ..., T): images first, capsule types last."""
    flat = activations.double().reshape(activations.shape[0], -1)  # (N, positions * types)
    logits = torch.logit(flat, eps=1e-12)
    return {
        "mean": flat.mean().item(),
        "spread": flat.std(0).mean().item() if flat.shape[0] > 1 else 0.0,
        "logit_spread": logits.std(0).mean().item() if flat.shape[0] > 1 else 0.0,
        "min": flat.min().item(),
        "max": flat.max().item(),
    }


def layer_activations(model: torch.nn.Module, loader) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Activations of every capsule layer over the loader's images, in layer order, and the labels."""
    found: dict[str, list[torch.Tensor]] = {}
    labels: list[torch.Tensor] = []
    modules = [("primary", model.primary), *((layer.name, layer) for layer in model.convcaps)]

    def keep(name):
        def hook(module, inputs, output):
            found.setdefault(name, []).append(output[1].detach())

        return hook

    handles = [module.register_forward_hook(keep(name)) for name, module in modules]
    try:
        with torch.no_grad():
            for images, target in loader:
                found.setdefault("class", []).append(model(images).activations.detach())
                labels.append(target)
    finally:
        for handle in handles:
            handle.remove()
    order = [name for name, _ in modules] + ["class"]
    return {name: torch.cat(found[name]) for name in order if name in found}, torch.cat(labels)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("ckpt", help="checkpoint file, run directory, latest or best")
    parser.add_argument("--split", default="test", help="test (default) or val")
    parser.add_argument("--limit", type=int, default=None, help="a seeded random subset of this many images")
    parser.add_argument(
        "--out-dir",
        default="weights/em_capsules",
        help="folder that holds the run directories, for latest, best or a run name "
        "(default: weights/em_capsules)",
    )
    args = parser.parse_args(argv)

    from capsnet.checkpoint import CheckpointError
    from capsnet.data import DataError
    from capsnet.evaluate import prepare_checkpoint

    try:
        prep = prepare_checkpoint(args.ckpt, args.out_dir, args.split, device="cpu", limit=args.limit)
    except (CheckpointError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    layers, labels = layer_activations(prep.model, prep.loader)
    stats = summarise(layers["class"], labels)
    print(f"{prep.path} ({args.split}, {len(labels)} images)")
    for key, value in stats.items():
        print(f"  {key:16s} {value:.4f}")
    print(f"  {'layer':10s} {'mean':>7s} {'spread':>8s} {'logit spread':>13s} {'min':>7s} {'max':>7s}")
    for name, acts in layers.items():
        s = spread(acts)
        print(
            f"  {name:10s} {s['mean']:7.4f} {s['spread']:8.4f} {s['logit_spread']:13.4f} "
            f"{s['min']:7.4f} {s['max']:7.4f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
