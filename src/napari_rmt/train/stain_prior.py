"""Where on an unlabelled H&E tile a missing pseudo-box may still be a cell.

A young teacher finds about half of the cells of the tiles it did not learn from
(docs/benchmarks.md, "The cells the teacher misses"); the rest it calls background with
confidence, so no rule that weighs negatives by the teacher's own doubt can spare them.
Haematoxylin stains nuclei whether or not the teacher sees them: on CoNSeP, 88 % of the
cells' boxes are at least 30 % haematoxylin-positive pixels (above the tile's Otsu
threshold of the haematoxylin channel), against 12 % of cell-sized boxes away from any
cell (docs/benchmarks.md; measured by a probe since retired). ``TrainConfig.unsup_stain_ignore`` uses that:
a background region of a pseudo-labelled tile that is that stained, and not next to a
pseudo-box, is left out of the loss ("not known") instead of being taught as "not a cell".
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchvision.ops import boxes as box_ops

from .augment import STAIN_VECTORS

#: A region overlapping a pseudo-box by at least this IoU stays a negative: it teaches the
#: student where that cell's box is not (a near miss), which the stain cannot tell.
NEAR_PSEUDO_IOU = 0.1


def haematoxylin(image: Tensor) -> Tensor:
    """The haematoxylin concentration (H, W) of an RGB image (3, H, W) in 0..1, by colour
    deconvolution with ``augment.STAIN_VECTORS``."""
    od = -torch.log(image[:3].float().clamp(1.0 / 255.0, 1.0))
    return torch.einsum("chw,c->hw", od, torch.linalg.inv(STAIN_VECTORS)[:, 0])


def otsu_threshold(values: Tensor, bins: int = 256) -> float:
    """Otsu's threshold of ``values``: the cut that maximises the between-class variance
    of a histogram of ``bins`` bins; the midpoint when all values are equal."""
    v = values.flatten().float()
    lo, hi = float(v.min()), float(v.max())
    if hi <= lo:
        return lo
    hist = torch.histc(v, bins=bins, min=lo, max=hi).double()
    centres = torch.linspace(lo, hi, bins + 1, dtype=torch.float64)
    centres = (centres[:-1] + centres[1:]) / 2
    w0 = hist.cumsum(0)
    w1 = hist.sum() - w0
    m0 = (hist * centres).cumsum(0)
    mean0 = m0 / w0.clamp_min(1e-12)
    mean1 = (m0[-1] - m0) / w1.clamp_min(1e-12)
    between = w0 * w1 * (mean0 - mean1) ** 2
    k = int(between[:-1].argmax())
    return float((centres[k] + centres[k + 1]) / 2)


def stain_integral(image: Tensor) -> Tensor:
    """The summed-area table (H + 1, W + 1) of the tile's haematoxylin-positive pixels
    (above its Otsu threshold), from which ``box_cover`` reads any box in O(1)."""
    h = haematoxylin(image)
    mask = (h > otsu_threshold(h)).float()
    out = torch.zeros((mask.shape[0] + 1, mask.shape[1] + 1), dtype=torch.float32)
    out[1:, 1:] = mask.cumsum(0).cumsum(1)
    return out


def box_cover(integral: Tensor, boxes: Tensor) -> Tensor:
    """The share of each box's (x0, y0, x1, y1) pixels that are haematoxylin-positive;
    boxes are clipped to the tile and rounded outwards to whole pixels."""
    if boxes.numel() == 0:
        return torch.zeros(0, dtype=torch.float32, device=boxes.device)
    height, width = integral.shape[0] - 1, integral.shape[1] - 1
    b = boxes.detach().to(integral.device)
    x0 = b[:, 0].floor().clamp(0, width).long()
    y0 = b[:, 1].floor().clamp(0, height).long()
    x1 = b[:, 2].ceil().clamp(0, width).long()
    y1 = b[:, 3].ceil().clamp(0, height).long()
    x1, y1 = torch.maximum(x1, x0 + 1).clamp(max=width), torch.maximum(y1, y0 + 1).clamp(max=height)
    x0, y0 = torch.minimum(x0, x1 - 1), torch.minimum(y0, y1 - 1)
    total = integral[y1, x1] - integral[y0, x1] - integral[y1, x0] + integral[y0, x0]
    area = ((x1 - x0) * (y1 - y0)).float()
    return (total / area).to(boxes.device)


def stain_unknown(integral: Tensor, boxes: Tensor, pseudo_boxes: Tensor, min_cover: float) -> Tensor:
    """Which ``boxes`` (regions that would be background) may be a cell the teacher
    missed: at least ``min_cover`` haematoxylin-positive and under ``NEAR_PSEUDO_IOU`` of
    every pseudo-box."""
    unknown = box_cover(integral, boxes) >= min_cover
    if pseudo_boxes.numel() and boxes.numel():
        near = box_ops.box_iou(boxes, pseudo_boxes.to(boxes.device)).max(dim=1).values >= NEAR_PSEUDO_IOU
        unknown = unknown & ~near
    return unknown
