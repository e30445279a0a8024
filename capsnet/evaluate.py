"""Evaluation: loss, accuracy and per-class accuracy of a model on a loader.

Used by the trainer after every epoch and by ``capsnet eval``. Under
torch.distributed every rank evaluates its shard and the sums are all-reduced,
so every rank returns the same result.
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader

from capsnet.config import Config
from capsnet.distributed import active
from capsnet.loss import compute_loss, uses_reconstruction
from capsnet.tracking import averaged_steps_text, counted

if TYPE_CHECKING:
    from capsnet.model import CapsNet
    from capsnet.signals import StopRequest


def resolve_device(
    name: str, local_rank: int = 0, option: str = "train.device", processes: int = 1
) -> torch.device:
    """``auto`` picks CUDA, then MPS, then the CPU; ``cuda`` is the process's GPU (its local
    rank's under torchrun), ``cuda:N`` GPU N of a single process. An unknown or unavailable
    choice is a ConfigError naming ``option``."""
    from capsnet.config import ConfigError, device_problem

    if (problem := device_problem(name)) is not None:
        raise ConfigError([f"{option}: {problem}"])
    kind, _, index = name.partition(":")
    if kind == "cuda" and not torch.cuda.is_available():
        raise ConfigError([f"{option}: {name!r} was asked for but no CUDA device is available"])
    if kind == "mps" and not torch.backends.mps.is_available():
        raise ConfigError([f"{option}: 'mps' was asked for but MPS is not available"])
    if index:
        if processes > 1:
            raise ConfigError(
                [
                    f"{option}: {name!r} names one GPU for {processes} processes; give cuda (each takes its own)"
                ]
            )
        if int(index) >= torch.cuda.device_count():
            there = counted(torch.cuda.device_count(), "CUDA device")
            raise ConfigError([f"{option}: {name!r}: this machine has {there}"])
        # the current device too: what CUDA calls without a device (pinned memory among them) use
        torch.cuda.set_device(int(index))
        return torch.device("cuda", int(index))
    if kind == "cuda" or (kind == "auto" and torch.cuda.is_available()):
        return torch.device("cuda", local_rank)
    if kind == "mps" or (kind == "auto" and torch.backends.mps.is_available()):
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
            shown = f"{acc:8.4f}" if count else f"{'-':>8}"  # no images of the class: no accuracy
            lines.append(f"{name:<{width}}  {shown}  {correct:7d}  {count:5d}")
        return "\n".join(lines)


def _all_reduce(t: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


class EvaluationStopped(Exception):
    """A stop signal (SIGINT/SIGTERM) came while :func:`evaluate` ran: the evaluation was dropped."""


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
    progress_bar: bool = False,
    desc: str = "evaluating",
    stop: StopRequest | None = None,
) -> EvalResult:
    """Mean loss and accuracy of ``model`` (a CapsNet) over ``loader``.

    The loss uses the spread-loss margin at ``step`` of ``total_steps`` (default:
    the final margin), so training and evaluation losses are comparable.
    ``progress_bar``: a progress bar on a terminal (rank 0 only under torchrun).
    ``stop`` (a :class:`capsnet.signals.StopRequest`): once it has received a signal,
    :class:`EvaluationStopped` is raised after the current batch, in a single process (under
    torchrun every rank finishes the evaluation, which the ranks share).
    """
    from capsnet.tracking import progress

    device = torch.device(device)
    num_classes = model.num_classes
    if step is None or total_steps is None:
        step = total_steps = 1 << 62  # past every schedule: the final margin
    was_training = model.training
    model.eval()
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss * n, correct, n
    per_correct = torch.zeros(num_classes, dtype=torch.float64, device=device)
    per_count = torch.zeros(num_classes, dtype=torch.float64, device=device)
    main = not active() or dist.get_rank() == 0
    total = len(loader) if max_batches is None else min(len(loader), max_batches)
    batches = progress(loader, total, progress_bar and main, desc)
    try:
        for i, (x, y) in enumerate(batches):
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
            if stop is not None and stop.received is not None and not active():
                raise EvaluationStopped(stop.name)
    finally:
        model.train(was_training)
        if batches is not loader:
            batches.close()
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
class Prepared:
    """A checkpoint made ready for analysis: its config, model (eval mode, on ``device``) and data."""

    path: Path
    ckpt: dict[str, Any]
    cfg: Config
    model: nn.Module
    loaders: Any  # capsnet.data.Loaders
    loader: DataLoader  # the chosen split
    split: str
    device: torch.device

    @property
    def run(self) -> str:
        from capsnet.checkpoint import run_name_of

        return run_name_of(self.path, self.ckpt)

    @property
    def iterations(self) -> int:
        """The routing iterations the model is scored with."""
        return int(self.model.hparams["iterations"])

    @property
    def trained_iterations(self) -> int | None:
        """The routing iterations the run was trained with, where -o model.iterations changed them; else None."""
        trained = (self.ckpt.get("arch") or {}).get("iterations")
        return trained if trained != self.iterations else None

    @property
    def class_names(self) -> list[str]:
        return list(self.loaders.info.class_names)


def prepare_checkpoint(
    spec: str,
    out_dir: str = "weights/em_capsules",
    split: str = "test",
    batch_size: int | None = None,
    data_root: str | None = None,
    device: str = "auto",
    overrides: list[str] | None = None,
    limit: int | None = None,
    draws_reconstructions: bool = False,
) -> Prepared:
    """Loads the checkpoint ``spec`` names (latest | best | run dir | file), its model and its data.

    Everything comes from the checkpoint: the config it was trained with (for the
    data), the input normalisation it was trained with (where it records it: not
    recomputed from the training images, which may have changed since) and its
    architecture (for the model); ``overrides`` change the data side, and of the model
    only its number of routing iterations (others are refused). Data whose classes are
    not the ones the model was trained with, by name and in order, is refused.
    ``limit`` keeps a seeded random subset of that many images of every evaluation split.
    ``draws_reconstructions``: the caller shows the decoder's images beside the input (inspect).
    """
    from capsnet.checkpoint import (
        architecture_overrides,
        build_model_from_checkpoint,
        load_checkpoint,
        moved_split_settings,
        rebase_data_paths,
        resolve_checkpoint,
        trained_class_names,
        trained_normalisation,
    )
    from capsnet.config import stored_config
    from capsnet.data import DataError, build_loaders, check_channels, reported_data_warnings, split_names

    _check_scoring_overrides(overrides or [], batch_size is not None, data_root is not None)
    dev = resolve_device(device, option="--device")  # named as the command's option, not the config key
    path = resolve_checkpoint(spec, out_dir)
    ckpt = load_checkpoint(path)
    settings = [f"train.device={device}"]
    if batch_size is not None:
        settings.append(f"train.eval_batch_size={batch_size}")
    if data_root is not None:
        settings.append(f"data.root={data_root}")
    cfg = stored_config(ckpt["config"], path, [*(overrides or []), *settings])
    given = {o.split("=", 1)[0].strip() for o in [*(overrides or []), *settings]}
    rebase_data_paths(cfg, ckpt, path, given)  # relative to the folder it trained in, if not to this one
    known = ["test"] + [name for name in split_names(cfg.data) if name not in ("train", "test")]
    if split not in known:  # before the data loads
        raise DataError(
            f"this run has no {split!r} split (available: {', '.join(known)}){_split_hint(split)}"
        )
    moved = moved_split_settings(ckpt["config"], cfg.to_dict())
    if split == "val" and moved and "data.name" not in moved:  # another dataset shares no images
        raise DataError(
            f"--split val with other settings would score another held-out set, which may hold images "
            f"{path} was trained on: {'; '.join(moved.values())}; drop those overrides, or score --split test"
        )
    trained_seed = (ckpt["config"].get("train") or {}).get("seed")
    if cfg.data.name == "synthetic" and trained_seed is not None and cfg.train.seed != trained_seed:
        raise DataError(
            f"-o train.seed={cfg.train.seed}: the synthetic data's class patterns are drawn from train.seed, so "
            f"this seed draws other classes than {path} learned (seed {trained_seed}); drop the override"
        )
    changes = architecture_overrides(ckpt, cfg, path)  # before the data loads
    model = build_model_from_checkpoint(ckpt, path, changes).to(dev).eval()
    # scoring the test split needs no training image: an image folder decodes its test images alone
    trained_classes = trained_class_names(ckpt) if split != "val" else None
    with reported_data_warnings():
        loaders = build_loaders(cfg, stats=trained_normalisation(ckpt), trained_classes=trained_classes)
    check_channels(loaders.info, model.in_channels)
    if loaders.info.num_classes != model.num_classes:
        raise DataError(
            f"the checkpoint's model has {model.num_classes} classes but the data has {loaders.info.num_classes}"
        )
    check_class_names(ckpt, loaders.info.class_names, path)
    if split != "val":
        check_test_split(ckpt, loaders.info.test_split, path)
    else:
        check_val_split(ckpt, loaders, path)
    check_image_size(model, cfg, loaders.info.image_size, draws_reconstructions)
    loader = {"test": loaders.test, "val": loaders.val, **loaders.extra}.get(split)
    if loader is None:
        known = ", ".join(["test"] + (["val"] if loaders.val is not None else []) + list(loaders.extra))
        raise DataError(f"this run has no {split!r} split (available: {known}){_split_hint(split)}")
    if limit is not None:
        loaders.extra = {name: limited(ld, limit, cfg.train.seed) for name, ld in loaders.extra.items()}
        loader = limited(loader, limit, cfg.train.seed)
    return Prepared(Path(path), ckpt, cfg, model, loaders, loader, split, dev)


def check_val_split(ckpt: dict[str, Any], loaders, path: str | Path) -> None:
    """Refuses to score the validation split of data whose training and validation images number
    otherwise than when ``path`` was saved (files added to or removed from an image folder): the
    split, drawn anew, may hold images the run trained on. Checkpoints that record no sizes pass."""
    from capsnet.data import DataError, data_sizes, size_changes

    before, now = ckpt.get("data_sizes"), data_sizes(loaders)
    if not isinstance(before, dict) or all(before.get(k) == now[k] for k in ("train", "val")):
        return
    moved = size_changes(before, now, ("train", "val"))
    raise DataError(
        f"--split val on other data (images: {moved}) than {path} was trained on: the validation split "
        "would be drawn anew and may hold images the run trained on; score it on the data it trained on, "
        "or score --split test"
    )


def check_class_names(ckpt: dict[str, Any], names: list[str], path: str | Path) -> None:
    """Raises DataError when the data's classes are not the ones, in the order, the checkpoint's
    model was trained with: its outputs are the classes by position, so another name or order
    would score its predictions against other labels. Checkpoints that record no names pass."""
    from capsnet.checkpoint import trained_class_names
    from capsnet.data import DataError

    trained = trained_class_names(ckpt)
    if trained is None or trained == [str(n) for n in names]:
        return
    raise DataError(
        f"{path} was trained with the classes {trained}, this data has {list(names)}: its outputs "
        "would be scored against other labels; use data whose class names (folder names) and order "
        "are the ones it was trained with"
    )


def check_test_split(ckpt: dict[str, Any], test_split: str | None, path: str | Path) -> None:
    """Raises DataError where the image folder's test files are chosen otherwise than when the
    checkpoint's model was trained (``test_split``: :attr:`capsnet.data.DataInfo.test_split`):
    they would include images it trained on. Checkpoints that record no data_info pass."""
    from capsnet.data import DataError

    info = ckpt.get("data_info")
    if test_split is None or not isinstance(info, dict) or info.get("test_split") == test_split:
        return
    raise DataError(
        f"{path} was trained when an image folder's held-out test fifth was drawn by each file's "
        "position in the folder; it is now chosen by each file's name, and would include images this "
        "model trained on: score it on a separate test folder (-o data.test_dir=...) or train it again"
    )


#: training-only settings: -o on a command that scores a trained model could not change anything
TRAINING_ONLY = ("optim.", "logging.", "loss.teacher") + tuple(
    f"train.{key}"
    for key in ("epochs", "max_steps", "max_bad_steps", "init_from", "sync_bn", "accumulate", "ema")
)


def _check_scoring_overrides(overrides: list[str], batch_option: bool, root_option: bool) -> None:
    """Refuses -o settings that a scoring command ignores or that its own options set."""
    from capsnet.config import ConfigError, parse_override

    problems, keys = [], []
    for text in overrides:
        path, value = parse_override(text)
        key = ".".join(path)
        # a mapping for a section (-o 'optim={lr: 5}') sets each of its keys
        keys += [f"{key}.{sub}" for sub in value] if isinstance(value, dict) else [key]
    for key in keys:
        if key == "logging.tb_dir":  # where attack and inspect write TensorBoard events without --tb-dir
            continue
        if key.startswith(TRAINING_ONLY):
            problems.append(f"-o {key}: a training setting, which scoring a trained model does not use")
        elif key == "train.device":
            problems.append("-o train.device: give the device as --device")
        elif key == "train.eval_batch_size" and batch_option:
            problems.append("-o train.eval_batch_size: --batch-size sets it too; give one of them")
        elif key == "data.root" and root_option:
            problems.append("-o data.root: --data-root sets it too; give one of them")
    if problems:
        raise ConfigError(problems)


def iterations_note(iterations: int, trained: int) -> str:
    """The report line for a model scored with another number of routing iterations than it was trained with."""
    return f"routing iterations: {iterations} (the run was trained with {trained})"


def _split_hint(split: str) -> str:
    if split == "val":
        return "; val needs data.val_split > 0"
    if split == "test_familiar":
        return "; test_familiar needs a smallNORB viewpoint split (data.split azimuth or elevation)"
    return ""


def check_image_size(model: CapsNet, cfg: Config, size: int, draws_reconstructions: bool = False) -> None:
    """Raises DataError when images of ``size`` cannot be scored by ``model`` under ``cfg``
    (``draws_reconstructions``: or drawn beside its decoder's reconstructions).

    The capsule layers take any size their kernels fit; the decoder (and so the
    reconstruction term of the loss) only the size the model was trained on.
    """
    from capsnet.data import DataError

    if size == model.image_size:
        return
    try:
        model.capsule_grid(size, size)
    except ValueError as e:
        raise DataError(f"the checkpoint's model cannot take {size}x{size} images: {e}") from None
    if draws_reconstructions and model.decoder is not None:
        raise DataError(
            f"the checkpoint's model was trained on {model.image_size}x{model.image_size} images, the size "
            f"its decoder reconstructs, but this data gives {size}x{size}, which its reconstructions could "
            "not be drawn beside: drop the data.image_size override"
        )
    if uses_reconstruction(model, cfg):
        raise DataError(
            f"the checkpoint's model was trained on {model.image_size}x{model.image_size} images, the size "
            f"its decoder reconstructs, but this data gives {size}x{size}: drop the data.image_size "
            "override, or add -o loss.recon_weight=0 to score the classification alone"
        )


def limited(loader: DataLoader, limit: int, seed: int = 0) -> DataLoader:
    """An in-order loader over a seeded random subset of ``limit`` items of ``loader``'s dataset."""
    dataset = loader.dataset
    if limit >= len(dataset):
        return loader
    chosen = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:limit]
    return DataLoader(dataset.subset(chosen.sort().values, evaluation=True), batch_size=loader.batch_size)


def _brief(result: Any) -> dict[str, Any]:
    return {"acc": result.acc, "n": result.n, "correct": result.correct}


@dataclass
class CheckpointEval:
    checkpoint: str
    run: str
    step: int
    epoch: int
    split: str
    result: EvalResult
    #: smallNORB viewpoint splits: data.split and the test file's rows with the training viewpoints
    viewpoint_split: str | None = None
    familiar: EvalResult | None = None
    #: multi-crop results (``--crops``, ``--mirror``), on ``split`` and, with a viewpoint split, on the familiar rows
    multicrop: Any = None  # capsnet.multicrop.MultiCropResult
    multicrop_familiar: Any = None
    #: routing iterations the model was scored with, and where -o model.iterations changed it, trained with
    iterations: int | None = None
    trained_iterations: int | None = None
    #: steps of epoch ``epoch + 1`` done when the checkpoint was written (0: it ends epoch ``epoch``)
    batches_done: int = 0
    #: the folder the images were read from, where the dataset has one (capsnet.data.DataInfo.source)
    data_source: str | None = None
    #: the steps of the checkpoints whose mean the weights are (capsnet average), else None
    averaged_steps: list[int] | None = None

    def to_dict(self) -> dict[str, Any]:
        data = {
            "checkpoint": self.checkpoint,
            "run": self.run,
            "step": self.step,
            **({"averaged_steps": self.averaged_steps} if self.averaged_steps else {}),
            "epoch": self.epoch,  # epochs completed
            **({"mid_epoch_steps": self.batches_done} if self.batches_done else {}),
            "split": self.split,
            **({"data_source": self.data_source} if self.data_source else {}),
            **self.result.to_dict(),
        }
        if self.iterations is not None:
            data["iterations"] = self.iterations
        if self.trained_iterations is not None:
            data["trained_iterations"] = self.trained_iterations
        if self.familiar is not None:
            data["viewpoints"] = {
                "split": self.viewpoint_split,
                "novel": _brief(self.result),
                "familiar": _brief(self.familiar),
            }
        if self.multicrop is not None:
            data["multicrop"] = self.multicrop.to_dict()
            if self.multicrop_familiar is not None:
                data["multicrop"]["familiar"] = _brief(self.multicrop_familiar)
        return data

    def summary(self) -> str:
        r = self.result
        lines = [
            f"checkpoint {self.checkpoint} (run {self.run}, "
            + (
                f"{averaged_steps_text(self.averaged_steps)}; "
                if self.averaged_steps
                else f"step {self.step}, "
            )
            + (
                f"{counted(self.batches_done, 'step')} into epoch {self.epoch + 1})"
                if self.batches_done
                else f"after epoch {self.epoch})"
            ),
            f"{self.split}: accuracy {r.acc:.4f} ({r.correct}/{r.n}), loss {r.loss:.4f}"
            + (f", images from {self.data_source}" if self.data_source else ""),
        ]
        if self.trained_iterations is not None:
            lines.insert(1, iterations_note(self.iterations, self.trained_iterations))
        if self.familiar is not None:
            f = self.familiar
            lines.append(
                f"viewpoints (data.split {self.viewpoint_split}): novel accuracy {r.acc:.4f} ({r.correct}/{r.n}), "
                f"familiar accuracy {f.acc:.4f} ({f.correct}/{f.n})"
            )
        if self.multicrop is not None:
            m = self.multicrop
            text = f"{m.label} accuracy {m.acc:.4f} ({m.correct}/{m.n}) beside single-crop {r.acc:.4f}"
            if self.multicrop_familiar is not None:
                mf = self.multicrop_familiar
                text += f"; familiar viewpoints {mf.acc:.4f} ({mf.correct}/{mf.n})"
            lines.append(text)
        lines.append(r.table())
        return "\n".join(lines)


def evaluate_checkpoint(
    spec: str,
    out_dir: str = "weights/em_capsules",
    split: str = "test",
    batch_size: int | None = None,
    data_root: str | None = None,
    device: str = "auto",
    overrides: list[str] | None = None,
    crops: int | None = None,
    crop_shift: int | None = None,
    progress: bool = True,
    limit: int | None = None,
    mirror: bool = False,
) -> CheckpointEval:
    """Evaluates the checkpoint ``spec`` names (latest | best | run dir | file) on ``split``.

    With a smallNORB viewpoint split (``data.split: azimuth | elevation``) the test
    split holds the novel viewpoints, and the test file's rows with the training
    viewpoints are evaluated too (familiar). ``crops`` also runs the multi-crop test
    (:mod:`capsnet.multicrop`) with shifts of up to ``crop_shift`` pixels; ``mirror``
    averages each crop with its left-right mirror (with ``crops`` unset: the single crop
    and its mirror). ``limit`` evaluates a seeded random subset of that many images.
    """
    prep = prepare_checkpoint(spec, out_dir, split, batch_size, data_root, device, overrides, limit)
    cfg, model, dev, names = prep.cfg, prep.model, prep.device, prep.class_names
    result = evaluate(model, prep.loader, cfg, dev, class_names=names, progress_bar=progress, desc=split)
    report = CheckpointEval(
        str(prep.path),
        prep.run,
        int(prep.ckpt["step"]),
        int(prep.ckpt["epoch"]),
        split,
        result,
        iterations=prep.iterations,
        trained_iterations=prep.trained_iterations,
        batches_done=int(prep.ckpt.get("batches_done", 0)),
        data_source=prep.loaders.info.source,
        averaged_steps=(prep.ckpt.get("averaged") or {}).get("steps"),
    )
    familiar = prep.loaders.extra.get("test_familiar") if split == "test" else None
    if familiar is not None:
        report.viewpoint_split = cfg.data.split
        report.familiar = evaluate(
            model, familiar, cfg, dev, class_names=names, progress_bar=progress, desc="test_familiar"
        )
    if mirror:
        from capsnet.config import stored_config
        from capsnet.data import warn_if_mirror_unlearned

        warn_if_mirror_unlearned(stored_config(prep.ckpt["config"], prep.path, []).data)
    if mirror and crops is None:
        crops = 1
    if crops is not None:
        from capsnet.multicrop import evaluate_crops

        eval_batch = cfg.train.eval_batch_size or 2 * cfg.train.batch_size
        common: dict[str, Any] = {
            "crops": crops,
            "device": dev,
            "batch_size": eval_batch,
            "reach": crop_shift,
            "class_names": names,
            "precision": cfg.train.precision,
            "progress": progress,
            "mirror": mirror,
            # smallNORB's two cameras as two channels: a mirror swaps them
            "stereo_pair": cfg.data.name == "smallnorb"
            and cfg.data.stereo == "channels"
            and model.in_channels == 2,
        }
        report.multicrop = evaluate_crops(model, prep.loader.dataset, desc=f"{split} crops", **common)
        if familiar is not None:
            report.multicrop_familiar = evaluate_crops(
                model, familiar.dataset, desc="familiar crops", **common
            )
    return report
