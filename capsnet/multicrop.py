"""Multi-crop testing: class activations averaged over several crops of each test image.

The paper reports smallNORB results for the central 32 x 32 crop of each 48 x 48
image and also with several crops per image. Here a test image is seen as ``N``
crops: the usual evaluation crop (the centre) plus ``N - 1`` points of an evenly
spaced grid of offsets, and the prediction is the class with the highest mean
activation over the crops. With ``N = 1`` it is exactly the single-crop evaluation.
With ``mirror`` every crop is also seen flipped left to right (2N views), the
test-time counterpart of training with horizontal flips (``data.flip``).

What a crop is depends on the dataset's test-time transform:

* smallNORB (:class:`~capsnet.data.StandardisedCrop`): a window of the 48-pixel
  image moved away from the centre, standardised with the whole image's statistics
  as the centre crop is; offsets reach up to the room around the centre crop (8 px).
* datasets seen whole (:class:`~capsnet.data.PixelTransform`: Fashion-MNIST, CIFAR-10,
  ...): the image shifted, the uncovered border black, like the training augmentation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from capsnet.data import DataError, ImageDataset, PixelTransform, StandardisedCrop, image_stats, shifted

Offset = tuple[int, int]  # (down, right) in pixels


def crop_offsets(count: int, reach: int) -> list[Offset]:
    """``count`` distinct (down, right) offsets: (0, 0) first, then grid points in [-reach, reach]^2.

    The grid is the smallest evenly spaced k x k grid with enough points besides
    the centre (5 crops: the centre and the four corners; 9: the 3 x 3 grid; 17:
    the centre and a 4 x 4 grid); when it has more points than needed, those
    nearest the centre come first.
    """
    if count < 1:
        raise DataError(f"--crops must be at least 1, got {count}")
    if count == 1:
        return [(0, 0)]
    if reach < 1:
        raise DataError(f"{count} crops need a crop shift of at least 1 pixel, got {reach}")
    most = (2 * reach + 1) ** 2
    if count > most:
        raise DataError(f"at most {most} distinct crops fit a shift of up to {reach} px, asked for {count}")
    side = 2
    while True:
        values = sorted({round(v) for v in np.linspace(-reach, reach, side)})
        grid = [(dy, dx) for dy in values for dx in values if (dy, dx) != (0, 0)]
        if len(grid) >= count - 1:
            break
        side += 1
    grid.sort(key=lambda o: (o[0] ** 2 + o[1] ** 2, o))
    return [(0, 0), *grid[: count - 1]]


def default_reach(transform: Any, image_size: int, stored_size: int) -> int:
    """Largest sensible shift: the room around a centre crop, else image_size / 14 (2 px at 28 px)."""
    if isinstance(transform, StandardisedCrop):
        return (stored_size - transform.size) // 2
    return max(1, round(image_size / 14))


class MultiCrop:
    """uint8 (C, S, S) -> float32 (K, C, s, s): the test-time transform at each of K offsets.

    The (0, 0) crop is the unchanged test-time transform, bit for bit. With ``mirror``
    the K crops are followed by their left-right mirrors: (2K, C, s, s). With
    ``stereo_pair`` the channels are a stereo pair (left, right camera): mirroring the
    scene also swaps the cameras, so a mirror's channels are flipped *and* swapped, the
    pair that cameras facing the mirrored scene would have taken.
    """

    def __init__(
        self,
        base: Any,
        offsets: list[Offset],
        stored_size: int,
        mirror: bool = False,
        stereo_pair: bool = False,
    ):
        self.base = base
        self.offsets = list(offsets)
        self.mirror = mirror
        self.stereo_pair = stereo_pair
        #: views per image: the crops, then their mirrors with ``mirror``
        self.views = len(self.offsets) * (2 if mirror else 1)
        reach = max(max(abs(dy), abs(dx)) for dy, dx in self.offsets)
        if not isinstance(base, StandardisedCrop) and reach >= (stored_size + 1) // 2:
            raise DataError(
                f"crops shifted by {reach} px would move half or more of the {stored_size}-pixel images out "
                f"of view (use --crop-shift {(stored_size + 1) // 2 - 1} or less)"
            )
        if isinstance(base, StandardisedCrop):
            room = stored_size - base.size
            if reach > room // 2:
                raise DataError(
                    f"crops shifted by {reach} px do not fit: the {stored_size}-pixel images leave "
                    f"{room // 2} px around the {base.size}-pixel centre crop (use --crop-shift {room // 2} or less)"
                )

    def crop(self, x: np.ndarray, down: int, right: int) -> torch.Tensor:
        if (down, right) == (0, 0):
            return self.base(x)
        if isinstance(self.base, StandardisedCrop):
            size = self.base.size
            mean, std = image_stats(x)
            top, left = (x.shape[1] - size) // 2 + down, (x.shape[2] - size) // 2 + right
            window = x[:, top : top + size, left : left + size].astype(np.float32)
            scale = (1.0 / std).astype(np.float32)[:, None, None]
            shift = (-mean / std).astype(np.float32)[:, None, None]
            return torch.from_numpy(window * scale + shift)
        if isinstance(self.base, PixelTransform):
            return self.base(shifted(x, down, right))
        # Any other transform: shift its output, filling with zeros.
        return torch.from_numpy(shifted(self.base(x).numpy(), down, right))

    def __call__(self, x: np.ndarray) -> torch.Tensor:
        views = torch.stack([self.crop(x, dy, dx) for dy, dx in self.offsets])  # (K, C, s, s)
        if self.mirror:
            mirrored = views.flip(-1).flip(1) if self.stereo_pair else views.flip(-1)
            views = torch.cat([views, mirrored])  # (2K, C, s, s)
        return views


@dataclass
class MultiCropResult:
    crops: int
    offsets: list[Offset]
    acc: float
    n: int
    correct: int
    per_class_correct: list[int]
    per_class_total: list[int]
    class_names: list[str] = field(default_factory=list)
    mirror: bool = False  # each crop also seen mirrored left to right

    @property
    def views(self) -> int:
        """Views averaged per image: the crops, and their mirrors with ``mirror``."""
        return self.crops * (2 if self.mirror else 1)

    @property
    def label(self) -> str:
        """``5-crop`` or ``5-crop + mirror``."""
        return f"{self.crops}-crop" + (" + mirror" if self.mirror else "")

    def to_dict(self) -> dict[str, Any]:
        names = self.class_names or [str(i) for i in range(len(self.per_class_total))]
        return {
            "crops": self.crops,
            "mirror": self.mirror,
            "views": self.views,
            "offsets": [list(o) for o in self.offsets],
            "acc": self.acc,
            "n": self.n,
            "correct": self.correct,
            "per_class": {
                name: {"acc": c / t if t else None, "count": t}
                for name, c, t in zip(names, self.per_class_correct, self.per_class_total)
            },
        }


def multicrop_dataset(
    dataset: ImageDataset, offsets: list[Offset], mirror: bool = False, stereo_pair: bool = False
) -> ImageDataset:
    """The same items as ``dataset``, each as a (K, C, s, s) stack of crops ((2K, ...) with ``mirror``)."""
    transform = MultiCrop(dataset.transform, offsets, dataset.images.shape[-1], mirror, stereo_pair)
    return ImageDataset(
        dataset.images, dataset.labels, transform, transform, dataset.indices, dataset.meta, dataset.group
    )


@torch.no_grad()
def evaluate_crops(
    model: nn.Module,
    dataset: ImageDataset,
    crops: int,
    device: torch.device | str,
    batch_size: int = 64,
    reach: int | None = None,
    class_names: list[str] | None = None,
    precision: str = "fp32",
    progress: bool = True,
    desc: str = "crops",
    mirror: bool = False,
    stereo_pair: bool = False,
) -> MultiCropResult:
    """Accuracy of ``model`` on ``dataset`` with class activations averaged over ``crops`` crops.

    ``batch_size`` counts images through the model at once (crops included).
    ``reach`` (pixels) is the largest shift; default :func:`default_reach`.
    ``mirror`` averages over each crop's left-right mirror too (2 x ``crops`` views);
    ``stereo_pair``: the two channels are a stereo pair, swapped in the mirrors (see MultiCrop).
    """
    from capsnet.evaluate import autocast
    from capsnet.tracking import progress as progress_bar

    device = torch.device(device)
    stored = dataset.images.shape[-1]
    if reach is None:
        reach = default_reach(dataset.transform, model.image_size, stored)
    offsets = crop_offsets(crops, reach)
    stacked = multicrop_dataset(dataset, offsets, mirror, stereo_pair)
    loader = DataLoader(stacked, batch_size=max(1, batch_size // stacked.transform.views), shuffle=False)
    num_classes = model.num_classes
    per_correct = torch.zeros(num_classes, dtype=torch.long)
    per_count = torch.zeros(num_classes, dtype=torch.long)
    was_training = model.training
    model.eval()
    try:
        for x, y in progress_bar(loader, len(loader), progress, desc=desc):
            n, k = x.shape[:2]
            with autocast(device, precision):
                out = model(x.flatten(0, 1).to(device))  # (N*K, E) activations
            mean = out.activations.float().view(n, k, -1).mean(1).cpu()  # (N, E)
            hit = (mean.argmax(1) == y).long()
            per_correct.index_add_(0, y, hit)
            per_count.index_add_(0, y, torch.ones_like(hit))
    finally:
        model.train(was_training)
    correct, n = int(per_correct.sum()), int(per_count.sum())
    return MultiCropResult(
        crops=len(offsets),
        offsets=offsets,
        acc=correct / n if n else math.nan,
        n=n,
        correct=correct,
        per_class_correct=per_correct.tolist(),
        per_class_total=per_count.tolist(),
        class_names=list(class_names or []),
        mirror=mirror,
    )
