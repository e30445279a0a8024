"""Evaluation: loss, accuracy and per-class accuracy of a model on a loader.

Used by the trainer after every epoch and by ``capsnet eval``. Under
torch.distributed every rank evaluates its shard and the sums are all-reduced,
so every rank returns the same result.
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader

from capsnet.config import Config
from capsnet.loss import compute_loss


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """``auto`` picks CUDA, then MPS, then the CPU; an unavailable explicit choice is a ConfigError."""
    from capsnet.config import ConfigError

    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError(["train.device: 'cuda' was asked for but no CUDA device is available"])
    if name == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(["train.device: 'mps' was asked for but MPS is not available"])
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        return torch.device("cuda", local_rank)
    if name == "mps" or (name == "auto" and torch.backends.mps.is_available()):
        return torch.device("mps")
    return torch.device("cpu")


def autocast(device: torch.device, precision: str):
    """bf16 autocast on CPU or GPU when ``precision`` is "bf16", else nothing."""
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


@dataclass
class EvalResult:
    loss: float  # mean training objective (classification + weighted reconstruction)
    acc: float
    n: int
    correct: int
    per_class_correct: list[int]
    per_class_total: list[int]
    class_names: list[str] = field(default_factory=list)

    @property
    def per_class_acc(self) -> list[float]:
        return [c / n if n else float("nan") for c, n in zip(self.per_class_correct, self.per_class_total)]

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        names = self.class_names or [str(i) for i in range(len(self.per_class_total))]
        data["per_class"] = {
            name: {"acc": acc, "count": count}
            for name, acc, count in zip(names, self.per_class_acc, self.per_class_total)
        }
        return data

    def table(self) -> str:
        """A per-class accuracy table, one class per line."""
        names = self.class_names or [str(i) for i in range(len(self.per_class_total))]
        width = max([len("class"), *map(len, names)])
        lines = [f"{'class':<{width}}  accuracy  correct  count"]
        for name, acc, correct, count in zip(
            names, self.per_class_acc, self.per_class_correct, self.per_class_total
        ):
            lines.append(f"{name:<{width}}  {acc:8.4f}  {correct:7d}  {count:5d}")
        return "\n".join(lines)


def _all_reduce(t: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: DataLoader,
    cfg: Config,
    device: torch.device | str,
    step: int | None = None,
    total_steps: int | None = None,
    class_names: list[str] | None = None,
    max_batches: int | None = None,
) -> EvalResult:
    """Mean loss and accuracy of ``model`` (a CapsNet) over ``loader``.

    The loss uses the spread-loss margin at ``step`` of ``total_steps`` (default:
    the final margin), so training and evaluation losses are comparable.
    """
    device = torch.device(device)
    num_classes = model.num_classes
    if step is None or total_steps is None:
        step = total_steps = 1 << 62  # past every schedule: the final margin
    was_training = model.training
    model.eval()
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss * n, correct, n
    per_correct = torch.zeros(num_classes, dtype=torch.float64, device=device)
    per_count = torch.zeros(num_classes, dtype=torch.float64, device=device)
    try:
        for i, (x, y) in enumerate(loader):
            if max_batches is not None and i >= max_batches:
                break
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with autocast(device, cfg.train.precision):
                out = model(x)
                loss, _ = compute_loss(out, x, y, model, cfg, step, total_steps)
            hit = (out.activations.argmax(dim=1) == y).double()  # (N,)
            sums[0] += loss.double() * len(y)
            sums[1] += hit.sum()
            sums[2] += len(y)
            per_correct.index_add_(0, y, hit)
            per_count.index_add_(0, y, torch.ones_like(hit))
    finally:
        model.train(was_training)
    packed = _all_reduce(torch.cat([sums, per_correct, per_count]))
    loss_sum, correct, n = packed[:3].tolist()
    per_correct_list = [round(v) for v in packed[3 : 3 + num_classes].tolist()]
    per_count_list = [round(v) for v in packed[3 + num_classes :].tolist()]
    return EvalResult(
        loss=loss_sum / n if n else float("nan"),
        acc=correct / n if n else float("nan"),
        n=round(n),
        correct=round(correct),
        per_class_correct=per_correct_list,
        per_class_total=per_count_list,
        class_names=list(class_names or []),
    )


@dataclass
class CheckpointEval:
    checkpoint: str
    run: str
    step: int
    epoch: int
    split: str
    result: EvalResult

    def to_dict(self) -> dict[str, Any]:
        return {
            "checkpoint": self.checkpoint,
            "run": self.run,
            "step": self.step,
            "epoch": self.epoch,
            "split": self.split,
            **self.result.to_dict(),
        }

    def summary(self) -> str:
        r = self.result
        return (
            f"checkpoint {self.checkpoint} (run {self.run}, step {self.step}, epoch {self.epoch})\n"
            f"{self.split}: accuracy {r.acc:.4f} ({r.correct}/{r.n}), loss {r.loss:.4f}\n{r.table()}"
        )


def evaluate_checkpoint(
    spec: str,
    out_dir: str = "weights/em_capsules",
    split: str = "test",
    batch_size: int | None = None,
    data_root: str | None = None,
    device: str = "auto",
    overrides: list[str] | None = None,
) -> CheckpointEval:
    """Evaluates the checkpoint ``spec`` names (latest | best | run dir | file) on ``split``.

    Everything comes from the checkpoint: the config it was trained with (for the
    data) and its architecture (for the model).
    """
    from capsnet.checkpoint import build_model_from_checkpoint, load_checkpoint, resolve_checkpoint
    from capsnet.config import config_from_dict
    from capsnet.data import DataError, build_loaders, check_channels

    path = resolve_checkpoint(spec, out_dir)
    ckpt = load_checkpoint(path)
    settings = [f"train.device={device}"]
    if batch_size is not None:
        settings.append(f"train.eval_batch_size={batch_size}")
    if data_root is not None:
        settings.append(f"data.root={data_root}")
    cfg = config_from_dict(ckpt["config"], [*(overrides or []), *settings])
    dev = resolve_device(device)
    model = build_model_from_checkpoint(ckpt, path).to(dev)
    loaders = build_loaders(cfg)
    check_channels(loaders.info, model.in_channels)
    if loaders.info.num_classes != model.num_classes:
        raise DataError(
            f"the checkpoint's model has {model.num_classes} classes but the data has {loaders.info.num_classes}"
        )
    loader = {"test": loaders.test, "val": loaders.val, **loaders.extra}.get(split)
    if loader is None:
        known = ", ".join(["test"] + (["val"] if loaders.val is not None else []) + list(loaders.extra))
        raise DataError(f"this run has no {split!r} split (available: {known}); val needs data.val_split > 0")
    result = evaluate(model, loader, cfg, dev, class_names=loaders.info.class_names)
    return CheckpointEval(
        str(path), str(ckpt.get("run", "")), int(ckpt["step"]), int(ckpt["epoch"]), split, result
    )
