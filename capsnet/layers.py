"""Capsule layers: they own the parameters and call the routing in routing.py.

Capsules travel between layers as a pair::

    pose        (N, H, W, T, P*P)   a P x P pose matrix per capsule type T at each position
    activation  (N, H, W, T)        in (0, 1)
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from capsnet.routing import ChildFold, RoutingSettings, VoteProduct, child_fold, em_routing


def conv_output_size(size: int, kernel: int, stride: int, padding: int = 0) -> int:
    return (size + 2 * padding - kernel) // stride + 1


def check_geometry(layer: str, height: int, width: int, kernel: int) -> None:
    if height < kernel or width < kernel:
        raise ValueError(
            f"{layer}: input of {height}x{width} capsules is smaller than its {kernel}x{kernel} kernel; "
            "use larger images or fewer/smaller-stride layers"
        )


class PrimaryCaps(nn.Module):
    """1x1 convolution from feature maps to B capsule types: P*P pose + sigmoid activation."""

    def __init__(self, in_channels: int, types: int, pose_size: int = 4):
        super().__init__()
        self.types, self.pose_size = types, pose_size
        self.pose = nn.Conv2d(in_channels, types * pose_size * pose_size, kernel_size=1)
        self.activation = nn.Conv2d(in_channels, types, kernel_size=1)
        # Zero bias and small symmetric weights put the pre-activations around zero,
        # so about half of the primary capsules start active (a > 0.5).
        nn.init.zeros_(self.activation.bias)
        nn.init.normal_(self.activation.weight, std=0.5 / in_channels**0.5)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        n, _, h, w = x.shape
        pose = self.pose(x).permute(0, 2, 3, 1).reshape(n, h, w, self.types, -1)  # (N, H, W, B, P*P)
        # The activations (and their gradients) in the routing's precision, also under autocast:
        # float16 would round an activation below about 6e-8, and its gradient, to 0.
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        with torch.autocast(x.device.type, enabled=False):
            conv = self.activation
            logits = F.conv2d(x.to(dtype), conv.weight.to(dtype), conv.bias.to(dtype))
        act = torch.sigmoid(logits).permute(0, 2, 3, 1)  # (N, H, W, B)
        return pose, act


#: Routing settings of a layer built without any (frozen, so safe to share).
DEFAULT_SETTINGS = RoutingSettings()


def _transform_init(shape: tuple[int, ...], pose_size: int) -> Tensor:
    # Entries N(0, 1/P): a vote has about the scale of the pose it transforms.
    return torch.randn(shape) / pose_size**0.5


class RoutingLayer(nn.Module):
    """Shared by the routing layers: beta_u, beta_a per output type and routing settings."""

    def __init__(self, out_types: int, settings: RoutingSettings, impl: str = "fast"):
        super().__init__()
        self.out_types = out_types
        self.settings = settings
        self.impl = impl
        self.beta_u = nn.Parameter(torch.zeros(out_types))  # "beta_u" (beta_v in some texts)
        self.beta_a = nn.Parameter(torch.zeros(out_types))
        self.record_stats = False
        self.stats: dict[str, Tensor] | None = None
        # Set to {} to record the next forward's votes, child activations and every routing
        # iteration (plain path; for figures, see capsnet.inspection).
        self.trace: dict | None = None

    def route(self, votes: Tensor | VoteProduct, act_in: Tensor, fold: ChildFold | None):
        iterations = None
        if self.trace is not None:
            votes = votes.compute() if isinstance(votes, VoteProduct) else votes
            iterations = []
            self.trace.update(votes=votes.detach(), act_in=act_in.detach(), fold=fold, iterations=iterations)
        result = em_routing(
            votes,
            act_in,
            self.beta_u,
            self.beta_a,
            self.settings,
            fold,
            impl=self.impl,
            stats=self.record_stats,
            trace=iterations,
        )
        self.stats = result.stats
        return result


class ConvCaps(RoutingLayer):
    """Convolutional capsules: K x K patches of B child types vote for C parent types.

    ``normalisation="cross_position"`` (the paper) lets each child's assignments
    sum to one over every parent it feeds, across all overlapping patches;
    ``"per_patch"`` normalises within each patch (for comparison).
    """

    def __init__(
        self,
        in_types: int,
        out_types: int,
        kernel: int = 3,
        stride: int = 1,
        pose_size: int = 4,
        settings: RoutingSettings = DEFAULT_SETTINGS,
        normalisation: str = "cross_position",
        name: str = "convcaps",
        recompute_votes: bool = True,
    ):
        super().__init__(out_types, settings)
        self.recompute_votes = recompute_votes
        if normalisation not in ("cross_position", "per_patch"):
            raise ValueError(
                f"{name}: normalisation must be cross_position or per_patch, got {normalisation!r}"
            )
        self.in_types, self.kernel, self.stride, self.pose_size = in_types, kernel, stride, pose_size
        self.normalisation, self.name = normalisation, name
        # One P x P transformation per (kernel offset, child type, parent type): "W_ij".
        self.weight = nn.Parameter(
            _transform_init((kernel * kernel * in_types, pose_size, out_types, pose_size), pose_size)
        )

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        check_geometry(self.name, height, width, self.kernel)
        return conv_output_size(height, self.kernel, self.stride), conv_output_size(
            width, self.kernel, self.stride
        )

    def forward(self, pose: Tensor, act: Tensor) -> tuple[Tensor, Tensor]:
        n, h, w, types, pp = pose.shape
        if types != self.in_types:
            raise ValueError(f"{self.name}: expected {self.in_types} input capsule types, got {types}")
        out_h, out_w = self.output_size(h, w)
        fold = child_fold(h, w, self.kernel, self.stride, types, str(pose.device))
        index = fold.index.reshape(-1)  # (L*KK,) input position of every patch slot
        p, c, kk = self.pose_size, self.out_types, self.kernel * self.kernel
        positions, children = out_h * out_w, kk * types
        patches = pose.reshape(n, h * w, types * pp)[:, index]  # (N, L*KK, B*P*P)
        act_in = act.reshape(n, h * w, types)[:, index].reshape(n, positions, children)  # (N, L, I)
        # Votes V_ij = M_i W_ij as one batched product over the children i.
        m = patches.reshape(n * positions, children, p, p).permute(1, 0, 2, 3)  # (I, N*L, P, P)
        m = m.reshape(children, n * positions * p, p)
        wt = self.weight.reshape(children, p, c * p)  # (I, P, C*P)
        # Described, not computed: the routing builds what it needs a few samples at a time.
        # With recompute_votes it rebuilds its vote moments in backward instead of keeping them.
        votes = VoteProduct(m, wt, (n, positions, c, p), self.recompute_votes)
        use_fold = fold if self.normalisation == "cross_position" else None
        result = self.route(votes, act_in, use_fold)
        pose_out = result.pose.view(n, out_h, out_w, c, p * p)  # (N, Ho, Wo, C, P*P)
        act_out = result.activation.view(n, out_h, out_w, c)  # (N, Ho, Wo, C)
        return pose_out, act_out


class ClassCaps(RoutingLayer):
    """Class capsules: every capsule of the last layer votes for each of E classes.

    The transformation matrices are shared across positions (one per child type
    and class). With coordinate addition the scaled, centred (row, column) of the
    child's receptive-field centre is added to the first two entries of the
    right-hand column of its vote.
    """

    def __init__(
        self,
        in_types: int,
        num_classes: int,
        pose_size: int = 4,
        settings: RoutingSettings = DEFAULT_SETTINGS,
        coord_add: bool = True,
        name: str = "class",
    ):
        super().__init__(num_classes, settings)
        self.in_types, self.pose_size, self.coord_add, self.name = in_types, pose_size, coord_add, name
        self.weight = nn.Parameter(_transform_init((in_types, pose_size, num_classes, pose_size), pose_size))

    def forward(
        self, pose: Tensor, act: Tensor, rows: Tensor | None = None, cols: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """``rows`` (H,), ``cols`` (W,): scaled receptive-field centres for coordinate addition.

        Without them the centres of the H x W capsule grid's cells are added instead
        ((k + 0.5) / H - 0.5), which equal the receptive-field centres only where the
        layers below cover the image evenly; :class:`capsnet.model.CapsNet` always passes
        the receptive-field centres.
        """
        n, h, w, types, _ = pose.shape
        if types != self.in_types:
            raise ValueError(f"{self.name}: expected {self.in_types} input capsule types, got {types}")
        p, e = self.pose_size, self.out_types
        # The votes are made in the routing's precision (float32, or float64), also under autocast,
        # as the convolutional capsules' are inside the routing.
        dtype = torch.float64 if pose.dtype == torch.float64 else torch.float32
        m = (
            pose.to(dtype)
            .reshape(n * h * w, types, p, p)
            .permute(1, 0, 2, 3)
            .reshape(types, n * h * w * p, p)
        )
        with torch.autocast(pose.device.type, enabled=False):
            votes = torch.bmm(m, self.weight.to(dtype).reshape(types, p, e * p))  # (D, N*H*W*P, E*P)
        votes = votes.view(types, n, h, w, p, e, p).permute(1, 5, 2, 3, 0, 4, 6)  # (N, E, H, W, D, P, P)
        if self.coord_add:
            if rows is None or cols is None:
                rows = (torch.arange(h, device=pose.device, dtype=votes.dtype) + 0.5) / h - 0.5
                cols = (torch.arange(w, device=pose.device, dtype=votes.dtype) + 0.5) / w - 0.5
            offset = votes.new_zeros(h, w, p, p)
            offset[:, :, 0, p - 1] = rows.to(votes.dtype)[:, None]
            offset[:, :, 1, p - 1] = cols.to(votes.dtype)[None, :]
            votes = votes + offset[:, :, None]  # (N, E, H, W, D, P, P)
        votes = votes.reshape(n, 1, e, h * w * types, p * p)  # (N, 1, E, I, P*P)
        act_in = act.reshape(n, 1, h * w * types)  # (N, 1, I)
        result = self.route(votes, act_in, None)
        return result.pose.view(n, e, p, p), result.activation.view(n, e)


class Decoder(nn.Module):
    """Reconstruction from the target class pose (other classes masked to zero)."""

    def __init__(self, num_classes: int, pose_size: int, out_shape: tuple[int, int, int], hidden=(512, 1024)):
        super().__init__()
        self.out_shape = tuple(out_shape)
        sizes = [num_classes * pose_size * pose_size, *hidden]
        layers: list[nn.Module] = []
        for a, b in itertools.pairwise(sizes):
            layers += [nn.Linear(a, b), nn.ReLU(inplace=True)]
        c, hh, ww = self.out_shape
        layers.append(nn.Linear(sizes[-1], c * hh * ww))
        self.net = nn.Sequential(*layers)

    def forward(self, poses: Tensor, labels: Tensor) -> Tensor:
        n, e = poses.shape[:2]
        mask = F.one_hot(labels, e).to(poses.dtype)  # (N, E)
        masked = (poses.reshape(n, e, -1) * mask[:, :, None]).reshape(n, -1)  # (N, E*P*P)
        # Routing returns float32 poses; a decoder cast to another dtype takes them in its own.
        return self.net(masked.to(self.net[0].weight.dtype)).view(n, *self.out_shape)
