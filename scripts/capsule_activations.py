"""How much each capsule layer's activations depend on the input image.

    python scripts/capsule_activations.py weights/em_capsules/<run>/best.pt [--split val] [--limit 1000]

For every capsule layer (primary, each ConvCaps layer, the class capsules) prints the
mean activation, its spread over images (the standard deviation over images of each
capsule at a fixed position, averaged over positions and types) and the same spread in
logit units. A layer whose spread is near zero passes the same activation for every
image: its parents' routing gets no information from it. With one inverse temperature
for all layers this happens to the ConvCaps layers, whose activation cost is far
smaller than the class capsules' (see ``routing.layer_cost_scales``).
"""

from __future__ import annotations

import argparse
import sys

import torch


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


def layer_activations(model: torch.nn.Module, loader) -> dict[str, torch.Tensor]:
    """Activations of every capsule layer over the loader's images, in layer order."""
    found: dict[str, list[torch.Tensor]] = {}
    modules = [("primary", model.primary), *((layer.name, layer) for layer in model.convcaps)]

    def keep(name):
        def hook(module, inputs, output):
            found.setdefault(name, []).append(output[1].detach())

        return hook

    handles = [module.register_forward_hook(keep(name)) for name, module in modules]
    try:
        with torch.no_grad():
            for images, _ in loader:
                found.setdefault("class", []).append(model(images).activations.detach())
    finally:
        for handle in handles:
            handle.remove()
    order = [name for name, _ in modules] + ["class"]
    return {name: torch.cat(found[name]) for name in order if name in found}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("ckpt", help="checkpoint file, run directory, latest or best")
    parser.add_argument("--split", default="val", help="val (default) or test")
    parser.add_argument("--limit", type=int, default=1000, help="a seeded random subset of this many images")
    parser.add_argument("--out-dir", default="weights/em_capsules")
    args = parser.parse_args(argv)

    from capsnet.checkpoint import CheckpointError
    from capsnet.data import DataError
    from capsnet.evaluate import prepare_checkpoint

    try:
        prep = prepare_checkpoint(args.ckpt, args.out_dir, args.split, device="cpu", limit=args.limit)
    except (CheckpointError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    acts = layer_activations(prep.model, prep.loader)
    images = next(iter(acts.values())).shape[0]
    print(f"{prep.path} ({args.split}, {images} images)")
    print(f"{'layer':10s} {'mean':>7s} {'spread':>8s} {'logit spread':>13s} {'min':>7s} {'max':>7s}")
    for name, a in acts.items():
        s = spread(a)
        print(
            f"{name:10s} {s['mean']:7.4f} {s['spread']:8.4f} {s['logit_spread']:13.4f} "
            f"{s['min']:7.4f} {s['max']:7.4f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
