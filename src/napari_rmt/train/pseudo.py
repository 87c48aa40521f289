"""Choosing pseudo-boxes from an unsure teacher (SPEC §5).

A fixed threshold (Unbiased Teacher's 0.7) assumes the teacher's scores mean the same
thing throughout a run and for every class. From random init on a CPU they do not: a
teacher at the end of a short burn-in scores most real cells between 0.2 and 0.6, and
a rare class lower than a common one. Two published rules adapt to the scores the
teacher actually gives:

- ``gmm_threshold`` (Consistent Teacher): per class, a two-component 1-D Gaussian mixture
  over a rolling buffer of the teacher's recent scores; the threshold is the lowest
  score that the high component claims.
- ``top_count`` (a per-image count): the teacher's scores summed over an image estimate
  how many objects it holds; keep that many of the best boxes.

What falls between the ignore band's low edge and the threshold is neither a pseudo-box
nor background (``select_pseudo``).
"""

from __future__ import annotations

import math
from collections import deque

import numpy as np
import torch
from torch import Tensor


def gmm_threshold(scores: np.ndarray, fallback: float, min_scores: int = 100, iterations: int = 50) -> float:
    """The lowest score the high component of a 2-Gaussian fit to ``scores`` claims.

    Means start at the buffer's min and max (as in Consistent Teacher), weights at 1/2,
    variances at the buffer's variance; EM runs ``iterations`` rounds. With fewer than
    ``min_scores`` scores, or scores that do not split (one mode), ``fallback``.
    """
    x = np.asarray(scores, dtype=np.float64).ravel()
    if x.size < min_scores:
        return fallback
    lo, hi = float(x.min()), float(x.max())
    if hi - lo < 1e-6:
        return fallback
    mu = np.array([lo, hi])
    var = np.full(2, max(float(x.var()), 1e-6))
    w = np.array([0.5, 0.5])
    for _ in range(iterations):
        log_p = -0.5 * (x[:, None] - mu) ** 2 / var - 0.5 * np.log(2 * math.pi * var) + np.log(w)
        log_p -= log_p.max(axis=1, keepdims=True)
        resp = np.exp(log_p)
        resp /= resp.sum(axis=1, keepdims=True)
        nk = resp.sum(axis=0) + 1e-12
        w = nk / x.size
        mu = (resp * x[:, None]).sum(axis=0) / nk
        var = np.maximum((resp * (x[:, None] - mu) ** 2).sum(axis=0) / nk, 1e-6)
    high = int(np.argmax(mu))
    log_p = -0.5 * (x[:, None] - mu) ** 2 / var - 0.5 * np.log(2 * math.pi * var) + np.log(w)
    claimed = x[(log_p[:, high] >= log_p[:, 1 - high]) & (x >= mu[1 - high])]
    if claimed.size == 0:
        return fallback
    return float(claimed.min())


def top_count(scores: Tensor) -> int:
    """How many of an image's boxes the per-image count rule keeps: round(sum of scores)."""
    return round(float(scores.sum())) if scores.numel() else 0


class ScoreBuffer:
    """The teacher's recent detection scores, per class, and the thresholds they give."""

    def __init__(self, n_classes: int, size: int, fallback: float, min_scores: int) -> None:
        self.buffers = [deque(maxlen=size) for _ in range(n_classes)]
        self.fallback, self.min_scores = fallback, min_scores

    def add(self, labels: Tensor, scores: Tensor) -> None:
        """Labels are the detector's, 1-based (0 is background)."""
        for lab, s in zip(labels.tolist(), scores.tolist(), strict=True):
            if 1 <= lab <= len(self.buffers):
                self.buffers[lab - 1].append(s)

    def thresholds(self) -> list[float]:
        return [
            gmm_threshold(np.fromiter(b, dtype=np.float64), self.fallback, self.min_scores)
            for b in self.buffers
        ]


def select_pseudo(
    boxes: Tensor,
    labels: Tensor,
    scores: Tensor,
    rule: str,
    thresholds: list[float] | float,
    ignore_low: float | None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Split one image's teacher detections into pseudo-boxes and ignored boxes.

    Returns (boxes, labels, scores) of the pseudo-boxes and the boxes of the ignore band.
    ``thresholds`` is one number or one per class (index = label - 1). Under the "topk"
    rule the kept boxes are the round(sum of scores) best; the ignore band is then the
    rest of the boxes scoring at least ``ignore_low``.
    """
    if rule == "topk":
        k = top_count(scores)
        order = torch.argsort(scores, descending=True, stable=True)
        keep = torch.zeros_like(scores, dtype=torch.bool)
        keep[order[:k]] = True
    else:
        if isinstance(thresholds, (int, float)):
            cut = torch.full_like(scores, float(thresholds))
        else:
            table = torch.tensor([1.0, *thresholds], dtype=scores.dtype, device=scores.device)
            cut = table[labels.clamp(0, len(thresholds))]
        keep = scores >= cut
    ignored = boxes[:0] if ignore_low is None else boxes[~keep & (scores >= ignore_low)]
    return boxes[keep], labels[keep], scores[keep], ignored


def merge_views(views: list[dict[str, Tensor]], iou: float = 0.5) -> dict[str, Tensor]:
    """One tile's teacher detections from several views (already in one frame) as one set.

    A box's score becomes the mean over the views of the best-overlapping box's score in
    each (IoU >= ``iou``, any class; 0 in a view that has none, its own score in its own
    view); then class-agnostic NMS at ``iou`` keeps the best of each cluster. A cell that
    every view sees keeps its score, one that a single view of two sees at 0.6 drops to
    0.3: the pseudo-labels then hold what the teacher sees however the tile is turned.
    """
    from torchvision.ops import box_iou, nms

    boxes = torch.cat([v["boxes"] for v in views])
    labels = torch.cat([v["labels"] for v in views])
    if len(views) == 1 or boxes.numel() == 0:
        return {"boxes": boxes, "labels": labels, "scores": torch.cat([v["scores"] for v in views])}
    total = torch.zeros(len(boxes), dtype=views[0]["scores"].dtype)
    for v in views:
        if len(v["boxes"]):
            overlap = box_iou(boxes, v["boxes"])
            best, j = overlap.max(dim=1)
            total += torch.where(best >= iou, v["scores"][j], torch.zeros_like(best))
    scores = total / len(views)
    keep = nms(boxes, scores, iou)
    return {"boxes": boxes[keep], "labels": labels[keep], "scores": scores[keep]}
