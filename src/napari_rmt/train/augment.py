"""Weak and strong augmentation (paper Sec. 2.3, after Unbiased Teacher).

Weak: random horizontal flip, boxes flipped with it; the teacher sees this view.
Strong: photometric only (colour jitter, Gaussian blur, random erasing), so the student's
view keeps the weak view's geometry and the pseudo-boxes stay valid without any mapping.
Images are float tensors (3, H, W) in 0..1.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchvision.transforms import v2


def hflip(image: Tensor, boxes: Tensor) -> tuple[Tensor, Tensor]:
    w = image.shape[-1]
    flipped = boxes.clone()
    flipped[:, 0] = w - boxes[:, 2]
    flipped[:, 2] = w - boxes[:, 0]
    return image.flip(-1), flipped


def weak(image: Tensor, boxes: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    if torch.rand((), generator=generator) < 0.5:
        return hflip(image, boxes)
    return image, boxes


class StrongAugment:
    """Unbiased Teacher's strong view: jitter (p 0.8), blur (p 0.5), then erasing patches."""

    def __init__(self) -> None:
        self.jitter = v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8)
        self.blur = v2.RandomApply([v2.GaussianBlur(kernel_size=5, sigma=(0.1, 2.0))], p=0.5)
        self.erase = v2.Compose(
            [
                v2.RandomErasing(p=0.7, scale=(0.05, 0.2), ratio=(0.3, 3.3), value="random"),
                v2.RandomErasing(p=0.5, scale=(0.02, 0.2), ratio=(0.1, 6.0), value="random"),
                v2.RandomErasing(p=0.3, scale=(0.02, 0.2), ratio=(0.05, 8.0), value="random"),
            ]
        )

    def __call__(self, image: Tensor) -> Tensor:
        out = self.blur(self.jitter(image))
        return self.erase(out).clamp_(0.0, 1.0)
