"""How far apart a checkpoint's class activations are: what the spread loss can reach.

    python scripts/class_activations.py weights/em_capsules/<run>/best.pt [--split test] [--limit 2000]

The spread loss asks for a_target - a_other >= margin (0.9 at the end of a run). With
the routing's inverse temperature this small (about 0.001 in the last of two
iterations) a class that receives no votes gets a = sigmoid(lambda * beta_a): unless
beta_a is learned in logit units (``routing.beta_a_logit``) that floor stays near 0.5
and no image can meet a margin above 0.5. Prints the target and other activations,
their logits and the share of images whose margin meets 0.5 and 0.9.
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("ckpt", help="checkpoint file, run directory, latest or best")
    parser.add_argument("--split", default="test", help="test (default) or val")
    parser.add_argument("--limit", type=int, default=None, help="a seeded random subset of this many images")
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
    acts, labels = [], []
    with torch.no_grad():
        for images, target in prep.loader:
            acts.append(prep.model(images).activations)
            labels.append(target)
    stats = summarise(torch.cat(acts), torch.cat(labels))
    print(f"{prep.path} ({args.split}, {sum(len(t) for t in labels)} images)")
    for key, value in stats.items():
        print(f"  {key:16s} {value:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
