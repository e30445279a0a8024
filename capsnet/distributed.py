"""Processes under torchrun: joining the group, per-rank seeds and the few collectives training needs.

One code path: without torchrun's environment (``WORLD_SIZE`` unset or 1) there
is no process group and every helper here is the identity, so single-process
training runs exactly the same code.

The backend follows the device: NCCL when training on CUDA GPUs, Gloo on CPUs.
Rank 0 alone writes files (checkpoints, metrics, TensorBoard); the helpers
below let the other ranks learn the outcome, so a failure on rank 0 stops every
rank with the same message instead of leaving them waiting in a collective.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def backend_for(device: str) -> str:
    """``nccl`` when ``device`` (``train.device``) means CUDA and a GPU is present, else ``gloo``."""
    return "nccl" if device.partition(":")[0] in ("auto", "cuda") and torch.cuda.is_available() else "gloo"


def launched_world_size() -> int:
    """The number of processes torchrun started for this run (1 without torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_distributed(device: str) -> DistInfo:
    """Joins the process group when started by torchrun (RANK, WORLD_SIZE, LOCAL_RANK set)."""
    world = launched_world_size()
    if world <= 1:
        return DistInfo()
    if "RANK" not in os.environ:
        from capsnet.config import ConfigError

        message = (
            f"WORLD_SIZE={world} is set but RANK is not: start multi-process training with torchrun "
            "(which sets both), or unset WORLD_SIZE for one process"
        )
        raise ConfigError([message])
    info = DistInfo(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    backend = backend_for(device)
    if backend == "nccl":
        torch.cuda.set_device(info.local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend)
    return info


def shutdown(synchronise: bool = False) -> None:
    """Leaves the process group; ``synchronise``: first wait until every rank is leaving too.

    Without that wait, a rank that tore down its Gloo connections while a peer was
    still in its own teardown sometimes aborted the peer at exit (SIGABRT, "terminate
    called without an active exception") after a run that had finished.
    """
    if dist.is_available() and dist.is_initialized():
        if synchronise:
            try:
                dist.barrier()
            except RuntimeError:  # a peer already gone: nothing to wait for
                pass
        dist.destroy_process_group()


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def restart_count() -> int:
    """How many times torchrun has restarted this job's workers (``--max-restarts``); 0 otherwise."""
    try:
        return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    except ValueError:
        return 0


def rank_seed(seed: int, rank: int) -> int:
    """The seed of rank ``rank``'s own random draws (augmentation): the run seed on rank 0,
    a value derived from (seed, rank) elsewhere, so ranks never share a random stream."""
    if rank == 0:
        return seed
    return int(np.random.SeedSequence([seed, rank]).generate_state(1, dtype=np.uint32)[0])


def any_rank(flags: list[bool], device: torch.device) -> list[bool]:
    """Element-wise OR of boolean flags over all ranks (identity in a single process)."""
    if not active():
        return flags
    t = torch.tensor([float(f) for f in flags], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [bool(v) for v in t.tolist()]


def sum_over_ranks(values: list[float], device: torch.device) -> list[float]:
    """Element-wise sum over all ranks, in float64 (identity in a single process)."""
    if not active():
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def share_buffers(*modules: torch.nn.Module, src: int = 0) -> None:
    """Rank ``src``'s buffers (batch norm's running statistics) in ``modules`` on every rank
    (nothing in a single process): each rank's training batches moved its own since the last
    forward pass of DistributedDataParallel, which shares them only at the start of a pass."""
    if not active():
        return
    with torch.no_grad():
        for module in modules:
            for buf in module.buffers():
                dist.broadcast(buf, src=src)


def broadcast(value: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``value`` on every rank (any picklable object)."""
    if not active():
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=src)
    return holder[0]


def gather_to_main(value: Any) -> list[Any] | None:
    """Every rank's ``value`` as a list on rank 0 (None on the others); ``[value]`` in a single process."""
    if not active():
        return [value]
    everything: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everything, value)
    return everything if dist.get_rank() == 0 else None


# --------------------------------------------------------------------------- synchronised batch norm


class _SumOverRanks(torch.autograd.Function):
    """All-reduce (sum) with its gradient: the gradient of a sum over ranks is the sum of the
    ranks' gradients, so the backward pass is the same all-reduce."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        x = x.clone()
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
        return x

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        grad = grad.clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad


class GlobalBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics are those of the global batch (all ranks together).

    PyTorch's SyncBatchNorm runs on CUDA only; this one works with any backend
    (Gloo on CPUs included), with two all-reduces per layer and step: the sum,
    then the centred sum of squares (two passes, as a single process computes
    them). Gradients flow through the all-reduces, so the result equals a
    single process's BatchNorm2d on the concatenated batch. Outside training or
    without a process group it is a plain BatchNorm2d; the state dict is the same.
    """

    def forward(self, x: Tensor) -> Tensor:
        if not (self.training and active()):
            return super().forward(x)
        channels, dtype = x.shape[1], x.dtype
        x = x.float()  # statistics in float32, also under bf16 autocast
        count = torch.tensor([x.numel() / channels], device=x.device)
        total = _SumOverRanks.apply(torch.cat([x.sum(dim=(0, 2, 3)), count]))  # (C + 1,)
        n = total[-1].detach()
        mean = total[:channels] / n  # (C,)
        centred = x - mean[None, :, None, None]  # (N, C, H, W)
        var = _SumOverRanks.apply(centred.square().sum(dim=(0, 2, 3))) / n  # (C,) biased, as BatchNorm
        if self.track_running_stats and self.running_mean is not None:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                momentum = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                unbiased = var.detach() * (n / (n - 1).clamp(min=1))
                self.running_mean.lerp_(mean.detach(), momentum)
                self.running_var.lerp_(unbiased, momentum)
        out = centred * torch.rsqrt(var + self.eps)[None, :, None, None]
        if self.affine:
            out = out * self.weight[None, :, None, None] + self.bias[None, :, None, None]
        return out.to(dtype)


def convert_sync_batchnorm(model: nn.Module, device: torch.device) -> nn.Module:
    """Batch norm over the global batch: PyTorch's SyncBatchNorm on CUDA, GlobalBatchNorm2d elsewhere."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    for name, child in model.named_children():
        if type(child) is nn.BatchNorm2d:
            replacement = GlobalBatchNorm2d(
                child.num_features, child.eps, child.momentum, child.affine, child.track_running_stats
            )
            replacement.load_state_dict(child.state_dict())
            replacement.train(child.training)
            setattr(model, name, replacement)
        else:
            convert_sync_batchnorm(child, device)
    return model
