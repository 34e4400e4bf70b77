"""Image transforms (torchvision.transforms.v2 on uint8 [3,H,W] tensors) and batch rotations.

    extract = extract_transform(resize=32, crop=28)     # deterministic: features, evaluation
    train = train_transform(crop=28, min_scale=0.5)      # random crop + flip, per sample in the loader
    images, rot = all_rotations(batch)                    # RotNet targets: 4 x the batch
    images = rotate_batch(batch, random_rotations(len(batch), generator))

Both transforms give float32 normalised with the ImageNet statistics below (the one place they
live); the loader applies that last step once per batch (SampleThenBatch). Sobel filtering is part
of the model, not of the data.
"""
from __future__ import annotations

from typing import Optional

import torch
from torchvision.transforms import v2

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class SampleThenBatch:
    """Per-sample uint8 ops, then float conversion + normalisation once per batch.

    The loader calls `per_sample` on each image and `finish_batch` on the stacked batch: on 28 px
    images ToDtype + Normalize cost ~120 us per image as per-sample v2 ops and ~2 us batched.
    Called on one image it gives the same values, so it is also an ordinary transform.
    """

    def __init__(self, per_sample: v2.Compose, mean=IMAGENET_MEAN, std=IMAGENET_STD):
        self.per_sample, self.mean, self.std = per_sample, list(mean), list(std)

    def finish_batch(self, images: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """uint8 [..., 3, H, W] -> (x / 255 - mean) / std in float32, on the images' device.

        Written as (x - 255 mean) * 1 / (255 std): one float tensor allocated instead of three
        (ToDtype, Normalize's copy), which matters at 224 px where this pass is memory-bound.
        `out` (float32, same shape): written in place, e.g. a loader worker's shared-memory batch.
        """
        if images.dtype != torch.uint8:
            raise TypeError(f"finish_batch expects uint8 images, got {images.dtype}")
        shape = (3, 1, 1)
        mean = torch.tensor(self.mean, device=images.device).mul_(255).view(shape)
        inv_std = torch.tensor(self.std, device=images.device).mul_(255).reciprocal_().view(shape)
        out = images.to(torch.float32) if out is None else out.copy_(images)
        return out.sub_(mean).mul_(inv_std)

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        return self.finish_batch(self.per_sample(image))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.per_sample}, mean={self.mean}, std={self.std})"


def extract_transform(resize: int, crop: int) -> SampleThenBatch:
    """Shorter side to `resize`, then the central `crop` x `crop` square."""
    return SampleThenBatch(v2.Compose([v2.Resize(resize, antialias=True), v2.CenterCrop(crop)]))


def train_transform(crop: int, min_scale: float) -> SampleThenBatch:
    """Random crop of scale [min_scale, 1] resized to `crop` x `crop`, random horizontal flip."""
    if not 0 < min_scale <= 1:
        raise ValueError(f"min_scale must be in (0, 1], got {min_scale}")
    return SampleThenBatch(v2.Compose([v2.RandomResizedCrop(crop, scale=(min_scale, 1.0), antialias=True),
                                       v2.RandomHorizontalFlip()]))


# ---------------------------------------------------------------- rotations (RotNet targets)


def _check_square(images: torch.Tensor) -> None:
    if images.ndim < 2 or images.shape[-1] != images.shape[-2]:
        raise ValueError(f"rotations by 90 degrees need square images, got shape {tuple(images.shape)}")


def rotate_batch(images: torch.Tensor, rot_labels: torch.Tensor) -> torch.Tensor:
    """images[i] rotated by rot_labels[i] * 90 degrees counter-clockwise (np.rot90 on the last two axes).

    Each rotation of the whole batch, selected per image by a mask: a few cheap memory passes and
    no data-dependent shapes, so nothing waits for the GPU (indexing by `nonzero` would).
    """
    _check_square(images)
    if rot_labels.shape != images.shape[:1]:
        raise ValueError(f"rot_labels shape {tuple(rot_labels.shape)} does not match batch {images.shape[0]}")
    rot = rot_labels.to(images.device, non_blocking=True).view(-1, *([1] * (images.dim() - 1)))
    out = images
    for k in (1, 2, 3):
        out = torch.where(rot == k, torch.rot90(images, k, dims=(-2, -1)), out)
    return out


def random_rotations(n: int, generator: Optional[torch.Generator] = None,
                     device: str | torch.device = "cpu") -> torch.Tensor:
    """n rotation labels uniform in {0, 1, 2, 3} (LongTensor)."""
    made_on = generator.device if generator is not None else device  # a generator draws on its own device
    return torch.randint(0, 4, (n,), generator=generator, device=made_on).to(device)


def all_rotations(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(the batch in all 4 rotations [4B,...], labels [4B]): rotation-major, row r*B + i is image i
    rotated by r * 90 degrees."""
    _check_square(images)
    rotated = torch.cat([torch.rot90(images, k, dims=(-2, -1)) for k in range(4)])
    labels = torch.arange(4, device=images.device).repeat_interleave(images.shape[0])
    return rotated, labels


class RandomRot90:
    """Per-sample transform: img -> (img rotated by label * 90 degrees, label), label uniform in 0..3."""

    def __init__(self, generator: Optional[torch.Generator] = None):
        self.generator = generator

    def __call__(self, image: torch.Tensor) -> tuple[torch.Tensor, int]:
        _check_square(image)
        label = int(torch.randint(0, 4, (1,), generator=self.generator))
        return torch.rot90(image, label, dims=(-2, -1)), label

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"
