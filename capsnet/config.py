"""Configuration: dataclasses that mirror the YAML files one to one.

Loading is strict. An unknown key, a value of the wrong type or an impossible
value raises :class:`ConfigError`, whose message names every bad key at once.
Dotted overrides (``train.batch_size=64``) go through the same checks.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import datetime
import difflib
import math
import os
import re
import types
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A configuration problem; ``problems`` lists one line per bad key."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("invalid configuration:\n  " + "\n  ".join(problems))


# --------------------------------------------------------------------------- presets

#: Sizes of the paper's two models. "A".."D" are the paper's letters.
PRESETS: dict[str, dict[str, Any]] = {
    # A=B=C=D=32: about 310K parameters for 5 classes, 1.8% error on smallNORB.
    "paper": {"stem_channels": [32], "primary_types": 32, "caps_types": [32, 32]},
    # A=64, B=8, C=D=16: about 68K parameters, 2.2% error on smallNORB.
    "small": {"stem_channels": [64], "primary_types": 8, "caps_types": [16, 16]},
}


# --------------------------------------------------------------------------- sections


@dataclass
class ModelConfig:
    preset: str | None = "small"  # "small" | "paper" | null; explicit sizes below override it
    stem_channels: list[int] | None = None  # "A" (and "AA", ...): ReLU conv layers before PrimaryCaps
    stem_kernel: int = 5  # first stem conv; later ones are 3x3 stride 1
    stem_stride: int = 2  # first stem conv
    stem_padding: int = 0  # first stem conv (0: the unpadded grid, 28 px -> 12x12 capsules)
    batch_norm: bool = True  # batch norm after each stem conv
    primary_types: int | None = None  # "B": capsule types of PrimaryCaps
    caps_types: list[int] | None = None  # "C", "D": capsule types of each ConvCaps layer
    caps_kernel: int = 3  # "K"
    caps_strides: list[int] = field(default_factory=lambda: [2, 1])  # one per ConvCaps layer
    pose_size: int = 4  # "P": poses are P x P matrices (the paper uses 4)
    iterations: int = 3  # EM routing iterations, static so export can unroll them
    normalisation: str = "cross_position"  # "cross_position" (paper) | "per_patch"
    coord_add: bool = True  # coordinate addition in the class capsules
    decoder: bool = True  # reconstruction decoder (used when loss.recon_weight > 0)
    decoder_hidden: list[int] = field(default_factory=lambda: [512, 1024])  # decoder hidden layer widths
    recompute_votes: bool = (
        True  # rebuild the vote moments in backward instead of keeping them: ~320 MB less at batch 32
    )

    def resolved(self) -> ModelConfig:
        """A copy with every size filled from the preset."""
        out = dataclasses.replace(self)
        if self.preset is not None:
            for key, value in PRESETS[self.preset].items():
                if getattr(out, key) is None:
                    setattr(out, key, list(value) if isinstance(value, list) else value)
        return out


@dataclass
class RoutingConfig:
    final_lambda: float = 0.01  # scale of the inverse temperatures (their limit over many iterations)
    lambda_decay: float = 0.95  # lambda_t = final_lambda * (1 - lambda_decay ** (t + 1)), t = 0 .. T-1
    min_var: float = 0.0005  # variance floor of the parent Gaussians
    cost_norm: float | None = None  # null: the paper's cost; k: scale sum_i R_ij by k * C / I per layer
    beta_a_logit: bool = False  # learn beta_a in last-iteration logit units (routing: beta_a / lambda_T-1)
    # One factor per routing layer (each ConvCaps layer, then the class capsules) on its
    # activation cost, i.e. a per-layer inverse temperature; null: 1 for every layer.
    layer_cost_scales: list[float] | None = None


@dataclass
class LossConfig:
    kind: str = "spread"  # "spread" | "cross_entropy" | "margin"
    margin_start: float = 0.2  # spread loss margin at step 0 (loss.kind spread only)
    margin_end: float = 0.9  # ... reached after margin_steps (spread only)
    margin_schedule: str = "linear"  # "linear" | "sigmoid" (spread only)
    margin_steps: int | None = None  # steps to reach margin_end; null: the whole run (spread only)
    recon_weight: float = 0.0005  # weight of the sum-squared reconstruction error; 0 disables
    teacher: str | None = None  # knowledge distillation: a trained run whose class scores the model
    # also learns to match (a .pt file, a run directory or run name under logging.out_dir, latest or
    # best, as --ckpt); null: none
    teacher_weight: float = 1.0  # weight of the distillation term (with loss.teacher)
    teacher_temperature: float = 4.0  # softmax temperature of both models' class scores in that term


@dataclass
class OptimConfig:
    name: str = "adam"  # "adam" | "adamw" | "sgd"
    lr: float = 3e-3  # learning rate at step 0 (after warm-up), then decayed as below
    weight_decay: float = 2e-7  # L2 (adam, sgd) or decoupled (adamw) weight decay
    decay_scope: str = "all"  # "all" parameters | "matrices": weights of 2+ dimensions only (not
    # biases, batch-norm scales or the routing's beta_u / beta_a)
    decay_rate: float = 0.96  # lr * decay_rate ** (step / decay_steps)
    decay_steps: int | None = 20000  # null: the whole run (the rate reaches lr * decay_rate at the end)
    staircase: bool = False  # decay in steps of decay_steps (exponent rounded down)
    warmup_steps: int = 0  # lr rises linearly over this many first steps; 0: none
    grad_clip: float | None = None  # max global gradient norm; null: no clipping


@dataclass
class DataConfig:
    name: str = "fashion-mnist"  # mnist | fashion-mnist | cifar10 | svhn | smallnorb | folder | synthetic
    root: str = "data"  # where to look first (and download to)
    download: bool = True  # download when the files are nowhere on disk
    image_size: int | None = None  # resize/crop target; null: the dataset's own
    val_split: float = 0.0  # fraction of the training set held out for validation
    augment: bool = True  # training augmentation (random crop etc., per dataset)
    shift: int | None = None  # augment: largest random shift in pixels; null: the dataset's (2 at 28 px)
    flip: bool | None = None  # augment: random horizontal flips; null: the dataset's (clothes, CIFAR-10)
    erase: float = 0.0  # augment: probability of random erasing (one rectangle of random pixels)
    # smallnorb
    stereo: str = "channels"  # smallnorb: "channels" (both views as 2 channels) | "samples" (each alone)
    split: str = "standard"  # smallnorb: "standard" | "azimuth" | "elevation"
    # folder
    train_dir: str | None = None  # folder: image tree for training (one sub-folder per class)
    test_dir: str | None = None  # folder: its test tree; null: about 20% of each class held out, by file name
    grayscale: bool = False  # folder: convert images to one channel
    bad_files: str = "skip"  # folder: "skip" (warn and count) | "fail"
    # synthetic
    num_classes: int = 5  # synthetic: classes of learnable random patterns
    channels: int = 1  # synthetic: image channels
    train_size: int = 256  # synthetic: training images
    test_size: int = 64  # synthetic: test images


#: data keys that only one dataset reads -> that dataset (``data.name``)
DATASET_KEYS = {
    "stereo": "smallnorb",
    "split": "smallnorb",
    "train_dir": "folder",
    "test_dir": "folder",
    "grayscale": "folder",
    "bad_files": "folder",
}


def _yaml_value(value: Any) -> str:
    """``value`` as YAML writes a scalar: null, true, 0.5, text; on one line, however long (a long
    text or list folded over lines would not read back as the value of its key)."""
    return (
        yaml.safe_dump(value, default_flow_style=True, width=math.inf, allow_unicode=True)
        .removesuffix("\n...\n")
        .strip()
    )


@dataclass
class TrainConfig:
    epochs: int = 10  # passes over the training set
    batch_size: int = 32  # images per forward pass, per process (a step: batch_size x accumulate)
    eval_batch_size: int | None = None  # null: 2 x batch_size
    seed: int = 0  # weights, data order and the validation split
    device: str = "auto"  # auto | cpu | cuda | cuda:N (GPU N; one process) | mps
    num_workers: int = 0  # data-loader worker processes; 0: load in the training process (the augmentation's
    # random draws are made where the images are loaded: another count gives other draws from the same seed)
    precision: str = "fp32"  # fp32 | bf16
    compile: bool = False  # torch.compile the model
    compile_routing: bool | None = (
        None  # torch.compile the routing's per-chunk contractions; null: on for a CPU
    )
    # when a C++ compiler works (faster there), off on CUDA (slower there) and MPS (README, Speed)
    max_steps: int | None = None  # stop after this many optimiser steps (quick tries)
    init_from: str | None = None  # start from this checkpoint's model weights (fresh optimiser, step 0):
    # a .pt file, a run directory or run name under logging.out_dir, latest or best (as --ckpt); the
    # run's saved config holds the file it named at the start
    max_bad_steps: int = 10  # consecutive non-finite steps before stopping
    threads: int | None = None  # torch intra-op threads; null: torch's default
    sync_bn: bool = False  # SyncBatchNorm under torchrun
    accumulate: int = 1  # gradient accumulation steps
    ema: float | None = None  # decay of an exponential moving average of the weights (e.g. 0.999),
    # which is then what is evaluated, chosen as best.pt and exported; null: none


@dataclass
class LoggingConfig:
    out_dir: str = "weights/em_capsules"  # checkpoints go to <out_dir>/<run>/
    tb_dir: str = "runs"  # TensorBoard events go to <tb_dir>/<run>/
    log_every: int = 50  # steps between scalar logs
    hist_every: int = 500  # steps between routing histograms
    keep: int = 3  # step-numbered checkpoints kept (last and best always)
    save_every: int | None = (
        None  # steps between checkpoints within an epoch (as well as at its end); null: none
    )
    tensorboard: bool = True  # write TensorBoard events (metrics.jsonl is always written)
    progress: bool = True  # progress bars


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    routing: RoutingConfig = field(default_factory=RoutingConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --------------------------------------------------------------------------- choices and ranges

CHOICES: dict[str, tuple[str | None, ...]] = {
    "model.preset": (None, *PRESETS),
    "model.normalisation": ("cross_position", "per_patch"),
    "loss.kind": ("spread", "cross_entropy", "margin"),
    "loss.margin_schedule": ("linear", "sigmoid"),
    "optim.name": ("adam", "adamw", "sgd"),
    "optim.decay_scope": ("all", "matrices"),
    "data.name": ("mnist", "fashion-mnist", "cifar10", "svhn", "smallnorb", "folder", "synthetic"),
    "data.stereo": ("channels", "samples"),
    "data.split": ("standard", "azimuth", "elevation"),
    "data.bad_files": ("skip", "fail"),
    "train.precision": ("fp32", "bf16"),
}

DEVICES = "auto, cpu, cuda, cuda:N or mps"  # train.device and the commands' --device


def device_problem(name: object) -> str | None:
    """Why ``name`` is not a device :data:`DEVICES` allows (``cuda:N``: GPU N), or None."""
    if isinstance(name, str):
        kind, colon, index = name.partition(":")
        if (not colon and kind in ("auto", "cpu", "cuda", "mps")) or (
            kind == "cuda" and index.isascii() and index.isdigit()
        ):
            return None
    return f"{name!r} is not one of {DEVICES}"


POSITIVE = {
    "model.stem_kernel",
    "model.stem_stride",
    "model.primary_types",
    "model.caps_kernel",
    "model.pose_size",
    "model.iterations",
    "routing.final_lambda",
    "routing.min_var",
    "routing.cost_norm",
    "optim.lr",
    "optim.decay_rate",
    "optim.decay_steps",
    "loss.margin_steps",
    "loss.teacher_temperature",
    "data.num_classes",
    "data.channels",
    "data.train_size",
    "data.test_size",
    "data.image_size",
    "train.epochs",
    "train.batch_size",
    "train.eval_batch_size",
    "train.max_steps",
    "train.max_bad_steps",
    "train.threads",
    "train.accumulate",
    "logging.log_every",
    "logging.hist_every",
    "logging.keep",
    "logging.save_every",
    "optim.grad_clip",
}
NON_NEGATIVE = {
    "model.stem_padding",
    "data.shift",
    "loss.recon_weight",
    "loss.teacher_weight",
    "loss.margin_start",
    "loss.margin_end",
    "optim.weight_decay",
    "optim.warmup_steps",
    "train.num_workers",
    "train.seed",
}
#: the largest C int: the most that torch takes for a size or a count
C_INT_MAX = 2**31 - 1
#: settings that torch takes as C integers: at most C_INT_MAX
SIZED_BY_TORCH = (
    "model.",
    "data.",
    "train.batch_size",
    "train.eval_batch_size",
    "train.threads",
    "train.num_workers",
    "train.accumulate",
)
#: integer settings with a limit of their own
UPPER_LIMITS = {
    "train.seed": 2**32 - 1,  # numpy's seeds are 32-bit
    "model.iterations": 100,  # each iteration is unrolled in the graph; the paper uses 3
}
#: limits of settings a stored configuration (see _validate) is not held to
NEW_RUN_LIMITS = {
    "train.threads": 1024,  # OpenMP allocates per thread: a typo's billions exhaust memory
}
POSITIVE_LISTS = {"model.stem_channels", "model.caps_types", "model.caps_strides", "model.decoder_hidden"}


# --------------------------------------------------------------------------- strict conversion


# Numbers that YAML 1.1 reads as text: 1e-8 (no dot), and nan and inf as Python writes them (YAML
# wants .nan and .inf), read as the numbers they name so that the check for finite values says
# what is wrong with them
_FLOAT_TEXT = re.compile(r"[-+]?((\d+\.?\d*|\.\d+)e[-+]?\d+|nan|inf|infinity)", re.IGNORECASE)


#: integers that YAML 1.1 reads otherwise than they look: octal (010 is 8), base 60 (1:30 is 90)
_YAML11_INT = re.compile(r"[-+]?(0[0-7]+|[1-9][0-9]*(:[0-5]?[0-9])+)")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp)).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str, problems: list[str]) -> Any:
    """Checks ``value`` against the annotation ``tp``; ints are accepted for floats."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key, problems)
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, list):
            problems.append(f"{key}: expected a list of {_type_name(item)}, got {value!r}")
            return value
        return [_coerce(v, item, f"{key}[{i}]", problems) for i, v in enumerate(value)]
    if tp is float:
        if isinstance(value, str) and _FLOAT_TEXT.fullmatch(value.strip()):
            value = float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            problems.append(f"{key}: expected a number, got {value!r}")
            return value
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            problems.append(f"{key}: expected an integer, got {value!r}")
            return value
        text = str(getattr(value, "yaml_text", "")).replace("_", "")
        if _YAML11_INT.fullmatch(text):  # 010 is 8 and 1:30 is 90 to YAML 1.1, which PyYAML reads
            problems.append(
                f"{key}: {text} is read as {int(value)} (YAML 1.1 reads a leading 0 as octal and a colon "
                f"as base 60); write the number without them"
            )
        return int(value)  # a plain int, not the loader's record of its text
    if tp is bool:
        if not isinstance(value, bool):
            problems.append(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is str:
        if isinstance(value, (datetime.date, int, float)) and not isinstance(value, bool):
            # YAML read a name like 2024, 0755 or 1_000 as a number: the text as written
            return getattr(value, "yaml_text", str(value))
        if not isinstance(value, str):
            problems.append(f"{key}: expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported annotation {tp!r} for {key}")


def _build(cls: type, data: Any, prefix: str, problems: list[str]) -> Any:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        problems.append(f"{prefix.rstrip('.') or 'config'}: expected a mapping of keys, got {data!r}")
        return cls()
    hints = typing.get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    for key in data:
        if key not in known:
            close = difflib.get_close_matches(str(key), sorted(known), n=1, cutoff=0.6)
            guess = f"; did you mean {prefix}{close[0]}?" if close else ""
            problems.append(f"{prefix}{key}: unknown key{guess} (known: {', '.join(sorted(known))})")
    kwargs = {}
    for f in fields(cls):
        if f.name not in data:
            continue
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            kwargs[f.name] = _build(tp, data[f.name], f"{prefix}{f.name}.", problems)
        else:
            kwargs[f.name] = _coerce(data[f.name], tp, f"{prefix}{f.name}", problems)
    return cls(**kwargs)


def _validate(cfg: Config, problems: list[str], stored: bool = False) -> None:
    """Every problem of ``cfg`` into ``problems``.

    ``stored``: a configuration saved with a run, which may hold combinations that earlier
    versions accepted and that change nothing in scoring it (a key of another dataset, a
    counter beyond 2**31); only what would make the run unusable is checked then.
    """
    flat = _flatten(cfg.to_dict())
    for key, allowed in CHOICES.items():
        if flat.get(key) not in allowed:
            shown = ", ".join("null" if a is None else a for a in allowed)
            problems.append(f"{key}: {flat.get(key)!r} is not one of: {shown}")
    if (problem := device_problem(flat.get("train.device"))) is not None:
        problems.append(f"train.device: {problem}")
    for key, v in flat.items():
        if isinstance(v, float) and not math.isfinite(v):
            problems.append(f"{key}: must be a finite number, got {v!r}")
        elif isinstance(v, list) and any(isinstance(x, float) and not math.isfinite(x) for x in v):
            problems.append(f"{key}: every entry must be a finite number, got {v!r}")
    for key in POSITIVE:
        v = flat.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and v <= 0:
            problems.append(f"{key}: must be positive, got {v!r}")
    for key, v in flat.items():  # beyond what torch and numpy take (a timestamp as a seed, a typo)
        if key in UPPER_LIMITS:
            limit = UPPER_LIMITS[key]
        elif key in NEW_RUN_LIMITS and not stored:
            limit = NEW_RUN_LIMITS[key]
        elif key.startswith(SIZED_BY_TORCH) and not stored:  # sizes and counts torch takes as C ints
            limit = C_INT_MAX
        else:
            continue
        for x in v if isinstance(v, list) else [v]:
            if isinstance(x, int) and not isinstance(x, bool) and x > limit:
                problems.append(f"{key}: at most {limit:,} (got {x:,})")
                break
    for key in NON_NEGATIVE:
        v = flat.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and v < 0:
            problems.append(f"{key}: must not be negative, got {v!r}")
    for key in POSITIVE_LISTS:
        v = flat.get(key)
        if isinstance(v, list) and any(isinstance(x, int) and x <= 0 for x in v):
            problems.append(f"{key}: every entry must be positive, got {v!r}")
    if isinstance(flat.get("data.num_classes"), int) and flat["data.num_classes"] == 1:
        problems.append("data.num_classes: a classifier needs at least 2 classes, got 1")
    m = cfg.model.resolved() if cfg.model.preset in PRESETS else cfg.model
    # only a null preset leaves sizes to give: a mistyped one is reported above on its own
    if cfg.model.preset is None:
        for key in ("stem_channels", "primary_types", "caps_types"):
            if getattr(m, key) is None:
                problems.append(f"model.{key}: must be given when model.preset is null")
    if isinstance(m.stem_channels, list) and not m.stem_channels:
        problems.append("model.stem_channels: needs at least one conv layer")
    if (
        isinstance(m.caps_types, list)
        and isinstance(m.caps_strides, list)
        and len(m.caps_types) != len(m.caps_strides)
    ):
        problems.append(
            f"model.caps_strides: needs one stride per ConvCaps layer "
            f"({len(m.caps_types)} in model.caps_types), got {m.caps_strides!r}"
        )
    scales = cfg.routing.layer_cost_scales
    if isinstance(scales, list) and isinstance(m.caps_types, list):
        if len(scales) != len(m.caps_types) + 1:
            problems.append(
                f"routing.layer_cost_scales: needs one factor per routing layer ({len(m.caps_types)} "
                f"ConvCaps layers, then the class capsules: {len(m.caps_types) + 1}), got {scales!r}"
            )
        if any(isinstance(x, (int, float)) and not isinstance(x, bool) and x <= 0 for x in scales):
            problems.append(f"routing.layer_cost_scales: every entry must be positive, got {scales!r}")
    if not 0.0 <= cfg.data.val_split < 1.0:
        problems.append(f"data.val_split: must be in [0, 1), got {cfg.data.val_split!r}")
    if cfg.loss.margin_end < cfg.loss.margin_start:
        problems.append("loss.margin_end: must not be below loss.margin_start")
    if cfg.data.name == "folder" and not cfg.data.train_dir:
        problems.append("data.train_dir: required when data.name is 'folder'")
    for key, owner in {} if stored else DATASET_KEYS.items():  # set for a dataset that never reads them
        value, default = getattr(cfg.data, key), getattr(DataConfig, key)
        if cfg.data.name != owner and value != default:
            problems.append(
                f"data.{key}: only used by data.name {owner!r}, not {cfg.data.name!r} "
                f"(leave it at {_yaml_value(default)})"
            )
    for key in ("shift", "flip"):
        if getattr(cfg.data, key) is None:
            continue
        if cfg.data.name in ("smallnorb", "synthetic"):
            problems.append(f"data.{key}: not used by data.name {cfg.data.name!r} (leave it null)")
        elif not cfg.data.augment:
            problems.append(f"data.{key}: has no effect unless data.augment is true")
    if not 0.0 <= cfg.data.erase <= 1.0:
        problems.append(f"data.erase: must be a probability in [0, 1], got {cfg.data.erase!r}")
    elif cfg.data.erase > 0 and cfg.data.name in ("smallnorb", "synthetic"):
        problems.append(f"data.erase: not used by data.name {cfg.data.name!r} (leave it 0)")
    elif cfg.data.erase > 0 and not cfg.data.augment:
        problems.append("data.erase: has no effect unless data.augment is true")
    if cfg.train.compile and cfg.model.decoder and cfg.loss.recon_weight > 0 and not stored:
        problems.append(
            "train.compile: torch.compile of the whole model fails in its backward pass (a TypeError in "
            "inductor's code, torch 2.14) when the reconstruction decoder trains; set model.decoder: false "
            "with it, or leave it off (train.compile_routing compiles the routing's kernels alone)"
        )
    if cfg.optim.staircase and cfg.optim.decay_steps is None:
        problems.append(
            "optim.staircase: with optim.decay_steps null (the whole run) the rounded-down exponent "
            "stays 0 until the run's last step, so the rate would never decay; give optim.decay_steps, "
            "or leave optim.staircase false"
        )
    if cfg.train.ema is not None and not 0.0 < cfg.train.ema < 1.0:
        problems.append(f"train.ema: must be in (0, 1) (a decay per step, e.g. 0.999), got {cfg.train.ema!r}")
    if not 0.0 <= cfg.routing.lambda_decay < 1.0:
        problems.append(
            f"routing.lambda_decay: must be in [0, 1) (1 makes every inverse temperature 0), "
            f"got {cfg.routing.lambda_decay!r}"
        )
    if m.coord_add and isinstance(m.pose_size, int) and m.pose_size < 2:
        problems.append(
            f"model.pose_size: coordinate addition writes into two pose entries, so it needs at least 2 "
            f"(got {m.pose_size!r}; or set model.coord_add: false)"
        )
    if cfg.optim.decay_rate > 1:
        problems.append(f"optim.decay_rate: must be at most 1, got {cfg.optim.decay_rate!r}")


#: data keys that only the synthetic dataset reads (set elsewhere, as in a copy of configs/tiny.yaml
#: with another data.name, they are noted, not refused)
SYNTHETIC_KEYS = ("num_classes", "channels", "train_size", "test_size")


def unused_settings(cfg: Config) -> list[str]:
    """Notes on settings given values that this configuration never reads (each ``key ...: why``)."""
    notes: list[str] = []

    def changed(section: Any, keys: tuple[str, ...]) -> list[str]:
        defaults = type(section)()
        return [k for k in keys if getattr(section, k) != getattr(defaults, k)]

    loss, model = cfg.loss, cfg.model
    margins = changed(loss, ("margin_start", "margin_end", "margin_schedule", "margin_steps"))
    if loss.kind != "spread" and margins:
        notes.append(
            f"{_listed('loss.', margins)} not used: they set the spread loss's margin, and loss.kind is "
            f"{loss.kind}"
        )
    taught = changed(loss, ("teacher_weight", "teacher_temperature"))
    if not loss.teacher and taught:
        notes.append(f"{_listed('loss.', taught)} not used: loss.teacher is null")
    synthetic = changed(cfg.data, SYNTHETIC_KEYS)
    if cfg.data.name != "synthetic" and synthetic:
        notes.append(f"{_listed('data.', synthetic)} not used: only data.name 'synthetic' reads them")
    if not model.decoder and loss.recon_weight > 0:
        notes.append(f"loss.recon_weight {loss.recon_weight:g} is not used: model.decoder is false")
    elif model.decoder and loss.recon_weight == 0:
        notes.append(
            "model.decoder: the decoder is built and saved but never trained (loss.recon_weight is 0); "
            "model.decoder: false leaves it out"
        )
    if not model.decoder and changed(model, ("decoder_hidden",)):
        notes.append("model.decoder_hidden is not used: model.decoder is false")
    return notes


def _listed(prefix: str, keys: list[str]) -> str:
    return ", ".join(prefix + k for k in keys) + (" are" if len(keys) > 1 else " is")


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"train.batch_size=64"`` -> (["train", "batch_size"], 64). Values are YAML scalars."""
    if "=" not in text:
        raise ConfigError([f"override {text!r}: expected key.path=value"])
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError([f"override {text!r}: empty key"])
    if not raw.strip():
        raise ConfigError([f"override {text!r}: empty value (give one, or null for none)"])
    try:
        value = yaml.load(raw, Loader=_UniqueKeyLoader)
    except yaml.YAMLError:
        value = raw
    text = raw.strip()
    quoted = text[:1] in "'\"" and text[:1] == text[-1:]
    if isinstance(value, str) and value != text and not quoted and not text.startswith("!"):  # "!": a tag
        value = text  # YAML read " #..." as a comment or folded spaces: a command line means the text
    return key.split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    data = dict(data)
    problems: list[str] = []
    for text in overrides:
        try:
            path, value = parse_override(text)
        except ConfigError as e:
            problems.extend(e.problems)
            continue
        node = data
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = {}
            elif not isinstance(child, dict):
                problems.append(
                    f"{'.'.join(path)}: cannot be set: {part} is {child!r} in the config, not a section of keys"
                )
                break
            node[part] = dict(child)
            node = node[part]
        else:
            old = node.get(path[-1])
            if isinstance(value, dict) and isinstance(old, dict):  # -o 'data={name: mnist}' sets those keys
                value = {**old, **value}
            node[path[-1]] = value
    if problems:
        raise ConfigError(problems)
    return data


def stored_config(data: Any, source: str | Path, overrides: list[str] | None = None) -> Config:
    """:func:`config_from_dict` for a configuration stored in ``source`` (a checkpoint).

    Problems in the stored configuration itself (one written by another version of
    capsnet, or a damaged file) name ``source``, so that they are not taken for
    problems in the command's own overrides.
    """
    if not isinstance(data, dict):
        raise ConfigError([f"the configuration stored in {source} is not a mapping"])
    try:
        cfg = config_from_dict(data, overrides, stored=True)
    except ConfigError as with_overrides:
        try:  # the stored configuration alone, parsed again only to tell whose fault it is
            config_from_dict(data, stored=True)
        except ConfigError as e:
            raise ConfigError(
                [f"{p} (in the configuration stored in {source})" for p in e.problems]
            ) from None
        raise with_overrides from None
    # what the stored configuration may hold (see _validate), the command's own overrides may not
    touched = {".".join(parse_override(text)[0]) for text in overrides or []}
    problems: list[str] = []
    _validate(cfg, problems)
    own = [p for p in problems if any(_names_key(p, key) for key in touched)]
    if own:
        raise ConfigError(own)
    return cfg


def _names_key(problem: str, key: str) -> bool:
    """Whether ``problem`` (``section.key: what is wrong``) is about ``key`` or a key of its section."""
    about = problem.split(":", 1)[0]
    return about == key or about.startswith(key + ".")


def config_from_dict(
    data: dict[str, Any] | None, overrides: list[str] | None = None, stored: bool = False
) -> Config:
    """Builds and validates a Config; raises ConfigError naming every bad key.

    ``stored``: ``data`` is a run's saved configuration (see :func:`_validate`).
    """
    data = apply_overrides(data or {}, overrides or [])
    problems: list[str] = []
    cfg = _build(Config, data, "", problems)
    if not problems:
        _validate(cfg, problems, stored)
    if not problems:  # "~/runs" means the home folder, as data.root's does
        cfg.logging.out_dir = os.path.expanduser(cfg.logging.out_dir)
        cfg.logging.tb_dir = os.path.expanduser(cfg.logging.tb_dir)
    if problems:
        raise ConfigError(problems)
    return cfg


class _UniqueKeyLoader(yaml.SafeLoader):
    """The safe loader, refusing a key given twice in one mapping (YAML would keep the last silently)."""

    def construct_mapping(self, node, deep=False):
        first: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # "<<: *anchor"; its keys may be overridden
                continue
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, collections.abc.Hashable):
                continue  # the base class reports unhashable keys
            if key in first:
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    f"key {key!r} given twice, first at line {first[key] + 1}",
                    key_node.start_mark,
                )
            first[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep)


class _YamlInt(int):
    """An int as YAML read it, with the text it was written as (``yaml_text``)."""


class _YamlFloat(float):
    """A float as YAML read it, with the text it was written as (``yaml_text``)."""


def _keeping_text(kind: type, construct):
    def constructor(loader, node):
        value = kind(construct(loader, node))
        value.yaml_text = node.value  # a string key given 0755 or 1_000 keeps what was written
        return value

    return constructor


_UniqueKeyLoader.add_constructor(
    "tag:yaml.org,2002:int", _keeping_text(_YamlInt, yaml.SafeLoader.construct_yaml_int)
)
_UniqueKeyLoader.add_constructor(
    "tag:yaml.org,2002:float", _keeping_text(_YamlFloat, yaml.SafeLoader.construct_yaml_float)
)
# no setting is a date: a name like 2024-05-01 stays the text it is
_UniqueKeyLoader.add_constructor("tag:yaml.org,2002:timestamp", yaml.SafeLoader.construct_yaml_str)


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Reads a YAML mapping with the safe loader (no Python object tags)."""
    path = Path(path)
    if path.suffix.lower() in (".pt", ".pth") and path.is_file():  # a run's checkpoint, not its config
        problem = (
            f"{path} is a checkpoint, not a YAML config: continue its run with capsnet train --resume "
            f"{path}, or start a new run from its weights with -o train.init_from={path}"
        )
        raise ConfigError([problem])
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError([f"config file not found: {path}"]) from None
    except OSError as e:
        raise ConfigError([f"cannot read config file {path}: {e.strerror}"]) from None
    except UnicodeDecodeError as e:
        raise ConfigError([f"{path}: not a UTF-8 text file (byte {e.start} cannot be decoded)"]) from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # a subclass of the safe loader
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError([f"{path}: not valid YAML{where} ({problem})"]) from None
    if data is None:
        raise ConfigError([f"{path} is empty: give at least one section (see configs/small.yaml)"])
    if not isinstance(data, dict):
        raise ConfigError([f"{path}: the top level must be a mapping of sections"])
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Loads a YAML config (or the defaults when ``path`` is None) with dotted overrides."""
    data = read_yaml(path) if path is not None else {}
    return config_from_dict(data, overrides)


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


# --------------------------------------------------------------------------- documented YAML

#: The comment lines above the data keys that name the dataset of the keys below them
_SECTION_MARKERS = re.compile(r"^[a-z-]+$")


def field_docs() -> dict[str, str]:
    """``{"section.key": its comment in this module}`` for every key of every section.

    A key's comment is the one at the end of its line (or inside its parenthesised default),
    the comment lines below it that carry on that sentence (they start in lower case), and
    the comment lines above it that begin a sentence of their own; a lone lower-case word
    above a group of keys (``# smallnorb``) names the dataset they belong to and is left out.
    """
    import ast
    import inspect
    import io
    import sys
    import tokenize

    source = inspect.getsource(sys.modules[__name__])
    comments: dict[int, tuple[str, bool]] = {}  # line -> (text, whether it ends a line of code)
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            code = tok.line[: tok.start[1]].strip()
            comments[tok.start[0]] = (tok.string.lstrip("#").strip(), bool(code))
    sections = {f.type if isinstance(f.type, str) else f.type.__name__: f.name for f in fields(Config)}
    docs: dict[str, str] = {}
    for node in ast.parse(source).body:
        if not isinstance(node, ast.ClassDef) or node.name not in sections:
            continue
        keys = [n for n in node.body if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)]
        pending: list[str] = []
        for i, key in enumerate(keys):
            own = [
                text for line, (text, _) in sorted(comments.items()) if key.lineno <= line <= key.end_lineno
            ]
            if i + 1 < len(keys):
                stop = keys[i + 1].lineno
            else:  # the comment lines right below the last key
                stop = key.end_lineno + 1
                while stop in comments and not comments[stop][1]:
                    stop += 1
            below = [comments[line] for line in range(key.end_lineno + 1, stop) if line in comments]
            carried, ahead = [], []
            for text, trailing in below:
                if trailing or _SECTION_MARKERS.match(text):
                    continue
                if own and not ahead and not text[:1].isupper():
                    carried.append(text)
                else:
                    ahead.append(text)
            docs[f"{sections[node.name]}.{key.target.id}"] = " ".join([*pending, *own, *carried])
            pending = ahead
    return docs


def documented_yaml(cfg: Config, only_changed: bool = False, comments: bool = True) -> str:
    """``cfg`` as YAML that :func:`load_config` reads back to it, every key followed by its comment
    (:func:`field_docs`); ``only_changed``: only the keys whose value is not the default."""
    docs = field_docs() if comments else {}
    defaults = Config().to_dict()
    lines: list[str] = []
    for section, values in cfg.to_dict().items():
        rows = [
            (f"  {key}: {_yaml_value(value)}", docs.get(f"{section}.{key}", ""))
            for key, value in values.items()
            if not only_changed or value != defaults[section][key]
        ]
        if not rows:
            continue
        width = min(44, max(len(text) for text, _ in rows))
        lines.append(f"{section}:")
        lines += [f"{text:<{width}}  # {doc}" if doc else text for text, doc in rows]
    return "\n".join(lines) + "\n" if lines else "{}\n"
