"""Robust mixing, Eq. 3: blend a labelled cell of the same class into each pseudo-box.

``I_mix = I_u * p + P(I_a) * (1 - p)`` inside the pseudo-box, where ``p`` is the teacher's
confidence and ``P`` resizes the labelled patch ``I_a`` bilinearly to the box's size.
Outside every pseudo-box the image is unchanged. The pseudo-label stays the teacher's
hard class. Boxes are mixed in order, so where two overlap the later one is blended on
top of the earlier result.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass
class PatchBank:
    """Ground-truth cell patches of the labelled tiles, by model label (1..K)."""

    patches: dict[int, list[Tensor]] = field(default_factory=dict)

    @classmethod
    def from_labelled(cls, images: list[Tensor], boxes: list[Tensor], labels: list[Tensor]) -> PatchBank:
        bank = cls()
        for image, bxs, lbs in zip(images, boxes, labels, strict=True):
            for box, label in zip(bxs.tolist(), lbs.tolist(), strict=True):
                patch = crop(image, box)
                if patch is not None:
                    bank.patches.setdefault(int(label), []).append(patch)
        return bank

    def count(self, label: int) -> int:
        return len(self.patches.get(label, ()))

    def draw(self, label: int, generator: torch.Generator) -> Tensor | None:
        pool = self.patches.get(label)
        if not pool:
            return None
        return pool[int(torch.randint(len(pool), (), generator=generator))]


def pixel_bounds(box: list[float] | Tensor, height: int, width: int) -> tuple[int, int, int, int]:
    """The pixels a box covers: floor of the low corner, ceil of the high one, clipped."""
    x0, y0, x1, y1 = (float(v) for v in box)
    return (
        max(0, min(width, math.floor(x0))),
        max(0, min(height, math.floor(y0))),
        max(0, min(width, math.ceil(x1))),
        max(0, min(height, math.ceil(y1))),
    )


def crop(image: Tensor, box) -> Tensor | None:
    x0, y0, x1, y1 = pixel_bounds(box, image.shape[-2], image.shape[-1])
    if x1 <= x0 or y1 <= y0:
        return None
    return image[:, y0:y1, x0:x1].clone()


def mix_pseudo_boxes(
    image: Tensor,
    boxes: Tensor,
    labels: Tensor,
    scores: Tensor,
    bank: PatchBank,
    generator: torch.Generator,
) -> tuple[Tensor, int, int]:
    """Apply Eq. 3 to every pseudo-box of one image.

    Returns the mixed image (a new tensor) and the numbers of mixed and unmixed boxes;
    a box whose class has no labelled patch, or that covers no pixel, stays unmixed.
    """
    out = image.clone()
    mixed = unmixed = 0
    h, w = image.shape[-2:]
    for box, label, p in zip(boxes.tolist(), labels.tolist(), scores.tolist(), strict=True):
        x0, y0, x1, y1 = pixel_bounds(box, h, w)
        patch = bank.draw(int(label), generator)
        if patch is None or x1 <= x0 or y1 <= y0:
            unmixed += 1
            continue
        resized = F.interpolate(patch[None], size=(y1 - y0, x1 - x0), mode="bilinear", align_corners=False)[0]
        region = out[:, y0:y1, x0:x1]
        out[:, y0:y1, x0:x1] = region * p + resized * (1.0 - p)
        mixed += 1
    return out, mixed, unmixed
