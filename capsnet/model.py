"""CapsNet: stem -> primary caps -> conv caps -> class caps -> (activations, poses)."""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import torch
from torch import Tensor, nn

from capsnet.config import PRESETS, UPPER_LIMITS, ModelConfig, RoutingConfig
from capsnet.layers import ClassCaps, ConvCaps, Decoder, PrimaryCaps, conv_output_size
from capsnet.routing import RoutingSettings, _tracing, inverse_temperatures


class CapsOutput(NamedTuple):
    activations: Tensor  # (N, E) class capsule activations in (0, 1)
    poses: Tensor  # (N, E, P, P) class capsule poses


def _check_sizes(**sizes) -> None:
    """Raises ValueError naming every size that is not a positive whole number (lists: every entry)."""
    problems = []
    for name, value in sizes.items():
        values = list(value) if isinstance(value, (list, tuple)) else [value]
        empty = not values and name == "stem_channels"  # the stem needs a conv; ConvCaps layers may be none
        if empty or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in values):
            kind = "a non-empty list" if name == "stem_channels" else "a list"
            want = (
                f"{kind} of positive whole numbers"
                if isinstance(value, (list, tuple))
                else "a positive whole number"
            )
            problems.append(f"{name} must be {want}, got {value!r}")
    if problems:
        raise ValueError("; ".join(problems))


#: the float types torch.autocast casts between (float64 is left as it is)
_AUTOCAST_TYPES = {torch.float32, torch.float16, torch.bfloat16}


class CapsNet(nn.Module):
    """Matrix capsules with EM routing.

    Sizes use the paper's letters: ``stem_channels`` = [A, (AA, ...)],
    ``primary_types`` = B, ``caps_types`` = [C, D, ...], ``num_classes`` = E,
    ``kernel`` = K, ``pose_size`` = P.
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 5,
        image_size: int = 32,
        stem_channels: tuple[int, ...] | list[int] = (64,),
        stem_kernel: int = 5,
        stem_stride: int = 2,
        stem_padding: int = 0,
        batch_norm: bool = True,
        primary_types: int = 8,
        caps_types: tuple[int, ...] | list[int] = (16, 16),
        caps_kernel: int = 3,
        caps_strides: tuple[int, ...] | list[int] = (2, 1),
        pose_size: int = 4,
        iterations: int = 3,
        normalisation: str = "cross_position",
        coord_add: bool = True,
        decoder: bool = True,
        decoder_hidden: tuple[int, ...] | list[int] = (512, 1024),
        final_lambda: float = 0.01,
        lambda_decay: float = 0.95,
        min_var: float = 0.0005,
        cost_norm: float | None = None,
        beta_a_logit: bool = False,
        layer_cost_scales: tuple[float, ...] | list[float] | None = None,
        recompute_votes: bool = True,
    ):
        super().__init__()
        _check_sizes(
            in_channels=in_channels,
            num_classes=num_classes,
            image_size=image_size,
            stem_channels=stem_channels,
            stem_kernel=stem_kernel,
            stem_stride=stem_stride,
            primary_types=primary_types,
            caps_types=caps_types,
            caps_kernel=caps_kernel,
            caps_strides=caps_strides,
            pose_size=pose_size,
            decoder_hidden=decoder_hidden,
        )
        if isinstance(stem_padding, bool) or not isinstance(stem_padding, int) or stem_padding < 0:
            raise ValueError(f"stem_padding must be a whole number, 0 or more, got {stem_padding!r}")
        most = UPPER_LIMITS["model.iterations"]
        if isinstance(iterations, int) and iterations > most:
            raise ValueError(
                f"iterations must be at most {most} (each is unrolled in the graph), got {iterations}"
            )
        if normalisation not in ("cross_position", "per_patch"):
            raise ValueError(f"normalisation must be cross_position or per_patch, got {normalisation!r}")
        if coord_add and pose_size < 2:
            raise ValueError(
                f"coordinate addition writes into two pose entries, so pose_size must be at least 2 "
                f"(got {pose_size}; or coord_add=False)"
            )
        if layer_cost_scales is not None and any(not x > 0 for x in layer_cost_scales):
            raise ValueError(f"layer_cost_scales must all be positive, got {list(layer_cost_scales)}")
        if len(caps_strides) != len(caps_types):
            raise ValueError(
                f"caps_strides {list(caps_strides)} needs one stride per ConvCaps layer {list(caps_types)}"
            )
        if num_classes < 2:
            raise ValueError(f"a classifier needs at least 2 classes, got {num_classes}")
        if layer_cost_scales is not None and len(layer_cost_scales) != len(caps_types) + 1:
            raise ValueError(
                f"layer_cost_scales {list(layer_cost_scales)} needs one factor per routing layer "
                f"({len(caps_types)} ConvCaps layers, then the class capsules)"
            )
        self.in_channels, self.num_classes, self.image_size = in_channels, num_classes, image_size
        self.settings = RoutingSettings(
            iterations, final_lambda, lambda_decay, min_var, cost_norm, beta_a_logit
        )
        scales = [1.0] * (len(caps_types) + 1) if layer_cost_scales is None else list(layer_cost_scales)
        layer_settings = [dataclasses.replace(self.settings, layer_scale=float(x)) for x in scales]
        self.hparams = {
            "in_channels": in_channels,
            "num_classes": num_classes,
            "image_size": image_size,
            "stem_channels": list(stem_channels),
            "stem_kernel": stem_kernel,
            "stem_stride": stem_stride,
            "stem_padding": stem_padding,
            "batch_norm": batch_norm,
            "primary_types": primary_types,
            "caps_types": list(caps_types),
            "caps_kernel": caps_kernel,
            "caps_strides": list(caps_strides),
            "pose_size": pose_size,
            "iterations": iterations,
            "normalisation": normalisation,
            "coord_add": coord_add,
            "decoder": decoder,
            "decoder_hidden": list(decoder_hidden),
            "final_lambda": final_lambda,
            "lambda_decay": lambda_decay,
            "min_var": min_var,
            "cost_norm": cost_norm,
            "beta_a_logit": beta_a_logit,
            "layer_cost_scales": None if layer_cost_scales is None else [float(x) for x in layer_cost_scales],
            "recompute_votes": recompute_votes,
        }

        # Stem: ReLU conv K x K stride s ("A" channels), then 3x3 stride 1 convs ("AA", ...).
        stem: list[nn.Module] = []
        channels = in_channels
        self._stem_geometry: list[tuple[int, int, int]] = []  # (kernel, stride, padding)
        for idx, out_ch in enumerate(stem_channels):
            k, s, pad = (stem_kernel, stem_stride, stem_padding) if idx == 0 else (3, 1, 1)
            stem.append(nn.Conv2d(channels, out_ch, k, stride=s, padding=pad, bias=not batch_norm))
            if batch_norm:
                stem.append(nn.BatchNorm2d(out_ch))
            stem.append(nn.ReLU(inplace=True))
            self._stem_geometry.append((k, s, pad))
            channels = out_ch
        self.stem = nn.Sequential(*stem)
        self.primary = PrimaryCaps(channels, primary_types, pose_size)
        convcaps = []
        types = primary_types
        for idx, (out_types, stride) in enumerate(zip(caps_types, caps_strides), start=1):
            convcaps.append(
                ConvCaps(
                    types,
                    out_types,
                    caps_kernel,
                    stride,
                    pose_size,
                    layer_settings[idx - 1],
                    normalisation,
                    name=f"caps{idx}",
                    recompute_votes=recompute_votes,
                )
            )
            types = out_types
        self.convcaps = nn.ModuleList(convcaps)
        self.classcaps = ClassCaps(types, num_classes, pose_size, layer_settings[-1], coord_add, name="class")
        self.decoder = (
            Decoder(num_classes, pose_size, (in_channels, image_size, image_size), tuple(decoder_hidden))
            if decoder
            else None
        )
        self.capsule_grid(image_size, image_size)  # fail fast on an impossible geometry

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_preset(
        cls, name: str, in_channels: int = 1, num_classes: int = 5, image_size: int = 32, **overrides
    ):
        """``CapsNet.from_preset("small")`` (A=64, B=8, C=D=16) or ``"paper"`` (A=B=C=D=32)."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
        kwargs = {k: list(v) if isinstance(v, list) else v for k, v in PRESETS[name].items()}
        kwargs.update(overrides)
        return cls(in_channels=in_channels, num_classes=num_classes, image_size=image_size, **kwargs)

    @classmethod
    def from_config(
        cls, model: ModelConfig, routing: RoutingConfig, in_channels: int, num_classes: int, image_size: int
    ) -> CapsNet:
        m = model.resolved()
        return cls(
            in_channels=in_channels,
            num_classes=num_classes,
            image_size=image_size,
            stem_channels=m.stem_channels,
            stem_kernel=m.stem_kernel,
            stem_stride=m.stem_stride,
            stem_padding=m.stem_padding,
            batch_norm=m.batch_norm,
            primary_types=m.primary_types,
            caps_types=m.caps_types,
            caps_kernel=m.caps_kernel,
            caps_strides=m.caps_strides,
            pose_size=m.pose_size,
            iterations=m.iterations,
            normalisation=m.normalisation,
            coord_add=m.coord_add,
            decoder=m.decoder,
            decoder_hidden=m.decoder_hidden,
            final_lambda=routing.final_lambda,
            lambda_decay=routing.lambda_decay,
            min_var=routing.min_var,
            cost_norm=routing.cost_norm,
            beta_a_logit=routing.beta_a_logit,
            layer_cost_scales=routing.layer_cost_scales,
            recompute_votes=m.recompute_votes,
        )

    # ------------------------------------------------------------------ geometry

    def capsule_grid(self, height: int, width: int) -> list[tuple[str, int, int]]:
        """(layer, rows, cols) after each stage; raises ValueError naming the layer that cannot fit."""
        grid = []
        h, w = height, width
        for idx, (k, s, pad) in enumerate(self._stem_geometry):
            nh, nw = conv_output_size(h, k, s, pad), conv_output_size(w, k, s, pad)
            if nh < 1 or nw < 1:
                raise ValueError(f"stem conv {idx + 1}: a {h}x{w} input is smaller than its {k}x{k} kernel")
            h, w = nh, nw
            grid.append((f"stem{idx + 1}", h, w))
        grid.append(("primary", h, w))
        for layer in self.convcaps:
            h, w = layer.output_size(h, w)
            grid.append((layer.name, h, w))
        return grid

    def _receptive_centres(self, height: int, width: int, device, dtype) -> tuple[Tensor, Tensor]:
        """Scaled, centred receptive-field centres of the last capsule grid, in [-0.5, 0.5]."""
        start, jump = 0.5, 1.0  # centre of the first pixel, distance between neighbours (in pixels)
        for k, s, pad in self._stem_geometry:
            start += ((k - 1) / 2 - pad) * jump
            jump *= s
        for layer in self.convcaps:
            start += (layer.kernel - 1) / 2 * jump
            jump *= layer.stride
        _, h, w = self.capsule_grid(height, width)[-1]
        rows = (start + jump * torch.arange(h, device=device, dtype=dtype)) / height - 0.5
        cols = (start + jump * torch.arange(w, device=device, dtype=dtype)) / width - 0.5
        return rows, cols

    # ------------------------------------------------------------------ forward

    def forward(self, x: Tensor) -> CapsOutput:
        if not isinstance(x, Tensor):
            raise TypeError(f"CapsNet expects a torch.Tensor of images, got {type(x).__name__}")
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"CapsNet expects images of shape (N, {self.in_channels}, H, W), got {tuple(x.shape)}"
            )
        if not _tracing() and x.shape[0] == 0:
            raise ValueError("CapsNet got an empty batch (N = 0)")
        weight = next(self.stem.parameters())
        if not x.is_floating_point():
            raise ValueError(
                f"CapsNet expects floating-point images (pixels / 255, normalised), got {x.dtype}"
            )
        # autocast casts between the float types it knows, float64 not among them
        autocast = torch.is_autocast_enabled(x.device.type) and {x.dtype, weight.dtype} <= _AUTOCAST_TYPES
        if x.dtype != weight.dtype and not autocast:
            raise ValueError(
                f"the images are {x.dtype} but the model's weights are {weight.dtype}: convert one to the other "
                f"(x.to({weight.dtype}) or model.to({x.dtype}))"
            )
        if not _tracing():
            self.capsule_grid(x.shape[-2], x.shape[-1])  # images too small: the layer that cannot fit
        features = self.stem(x)  # (N, A, H1, W1)
        pose, act = self.primary(features)  # (N, H1, W1, B, 16), (N, H1, W1, B)
        for layer in self.convcaps:
            pose, act = layer(pose, act)  # (N, Hk, Wk, C, 16), (N, Hk, Wk, C)
        dtype = torch.float64 if pose.dtype == torch.float64 else torch.float32  # the routing's precision
        rows, cols = self._receptive_centres(x.shape[-2], x.shape[-1], x.device, dtype)
        poses, activations = self.classcaps(pose, act, rows, cols)  # (N, E, 4, 4), (N, E)
        return CapsOutput(activations, poses)

    def reconstruct(self, poses: Tensor, labels: Tensor) -> Tensor:
        """Decoder image (N, C, H, W) from the pose of class ``labels`` (the target in training)."""
        if self.decoder is None:
            raise RuntimeError("this model was built without a decoder (model.decoder: false)")
        # checked on the CPU only: on a GPU reading the labels would wait for it at every training step
        if (
            not _tracing()
            and labels.device.type == "cpu"
            and labels.numel()
            and not 0 <= int(labels.min()) <= int(labels.max()) < self.num_classes
        ):
            raise ValueError(
                f"reconstruct: labels must be class numbers 0 to {self.num_classes - 1}, "
                f"got {int(labels.min())} to {int(labels.max())}"
            )
        return self.decoder(poses, labels)

    # ------------------------------------------------------------------ introspection

    def routing_layers(self) -> list[nn.Module]:
        return [*self.convcaps, self.classcaps]

    @property
    def record_stats(self) -> bool:
        return self.classcaps.record_stats

    @record_stats.setter
    def record_stats(self, value: bool) -> None:
        for layer in self.routing_layers():
            layer.record_stats = value
            layer.stats = None

    @property
    def routing_stats(self) -> dict[str, dict[str, Tensor]]:
        """Statistics of the last forward pass per routing layer (when ``record_stats`` is on)."""
        return {layer.name: layer.stats for layer in self.routing_layers() if layer.stats is not None}

    def set_routing_impl(self, impl: str) -> None:
        """ "fast" (default) or "plain" routing in every layer; both compute the same function."""
        for layer in self.routing_layers():
            layer.impl = impl

    def lambdas(self) -> list[float]:
        return inverse_temperatures(self.settings)

    def num_parameters(self, include_decoder: bool = False) -> int:
        total = sum(p.numel() for p in self.parameters())
        if not include_decoder and self.decoder is not None:
            total -= sum(p.numel() for p in self.decoder.parameters())
        return total

    def summary(self) -> str:
        grid = " -> ".join(
            f"{name} {h}x{w}" for name, h, w in self.capsule_grid(self.image_size, self.image_size)
        )
        text = f"CapsNet: {self.num_parameters():,} parameters"
        if self.decoder is not None:
            text += f" (+{self.num_parameters(True) - self.num_parameters():,} in the decoder)"
        return f"{text}; {self.in_channels}x{self.image_size}x{self.image_size}: {grid}"
