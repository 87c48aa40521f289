"""The box head's training losses: focal classification (as in Unbiased Teacher), smooth L1 boxes.

torchvision's ``RoIHeads`` hard-wires cross-entropy; this subclass reuses its sampling,
pooling and post-processing and replaces only the loss. It also keeps the class logits
of the last training forward, which the sparse regulariser (Eq. 5) needs, and at
inference runs the box head over the proposals in chunks, so that a large window with
tens of thousands of proposals does not hold all their pooled features at once.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.models.detection.roi_heads import RoIHeads


def focal_loss(logits: Tensor, labels: Tensor, gamma: float = 1.5) -> Tensor:
    """Softmax focal loss ``mean_n (1 - p_t)^gamma * (-log p_t)``; gamma = 0 is cross-entropy."""
    if logits.numel() == 0:
        return logits.sum() * 0.0
    ce = F.cross_entropy(logits, labels, reduction="none")
    p_t = torch.exp(-ce)
    return ((1.0 - p_t) ** gamma * ce).mean()


def weighted_focal_loss(logits: Tensor, labels: Tensor, weights: Tensor, gamma: float = 1.5) -> Tensor:
    """``sum_n w_n * focal_n / sum_n w_n``: with all weights equal it is ``focal_loss``.

    Soft Teacher's normalisation: the loss is an average under the weights, so that
    down-weighting doubtful negatives does not shrink the loss as a whole.
    """
    if logits.numel() == 0 or float(weights.sum()) <= 0:
        return logits.sum() * 0.0
    ce = F.cross_entropy(logits, labels, reduction="none")
    p_t = torch.exp(-ce)
    return ((1.0 - p_t) ** gamma * ce * weights).sum() / weights.sum()


def box_regression_loss(box_regression: Tensor, labels: Tensor, regression_targets: Tensor) -> Tensor:
    """Smooth L1 on the positives' class-specific deltas, normalised by all sampled RoIs."""
    pos = torch.where(labels > 0)[0]
    if pos.numel() == 0:
        return box_regression.sum() * 0.0
    n = box_regression.shape[0]
    deltas = box_regression.reshape(n, box_regression.size(-1) // 4, 4)
    loss = F.smooth_l1_loss(deltas[pos, labels[pos]], regression_targets[pos], beta=1.0 / 9, reduction="sum")
    return loss / labels.numel()


class FocalRoIHeads(RoIHeads):
    """``RoIHeads`` whose training loss is focal (classification) + smooth L1 (boxes)."""

    #: Proposals pooled at once at inference: 4,096 RoIs of 256 x 7 x 7 floats are 200 MB.
    eval_chunk = 4096

    def __init__(self, *args, gamma: float = 1.5, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.gamma = gamma
        self.last_class_logits: Tensor | None = None
        #: Set by the trainer for an unlabelled forward: ``(proposals, labels, targets)`` of
        #: the sampled RoIs -> one classification weight per RoI (soft negatives, ignore band).
        self.roi_weighting: Callable[[list[Tensor], list[Tensor], list[dict]], Tensor] | None = None

    def forward(self, features, proposals, image_shapes, targets=None):  # type: ignore[override]
        if not self.training:
            self.last_class_logits = None
            if sum(len(p) for p in proposals) <= self.eval_chunk:
                return super().forward(features, proposals, image_shapes, targets)
            class_logits, box_regression = self._chunked_outputs(features, proposals, image_shapes)
            boxes, scores, labels = self.postprocess_detections(
                class_logits, box_regression, proposals, image_shapes
            )
            return [
                {"boxes": b, "labels": lab, "scores": s}
                for b, s, lab in zip(boxes, scores, labels, strict=True)
            ], {}
        if targets is None:
            raise ValueError("targets are needed in training mode")
        proposals, _, labels, regression_targets = self.select_training_samples(proposals, targets)
        pooled = self.box_roi_pool(features, proposals, image_shapes)
        class_logits, box_regression = self.box_predictor(self.box_head(pooled))
        labels_t = torch.cat(labels, dim=0)
        targets_t = torch.cat(regression_targets, dim=0)
        self.last_class_logits = class_logits
        if self.roi_weighting is not None:
            weights = self.roi_weighting(proposals, labels, targets)
            cls_loss = weighted_focal_loss(class_logits, labels_t, weights, self.gamma)
        else:
            cls_loss = focal_loss(class_logits, labels_t, self.gamma)
        losses = {
            "loss_classifier": cls_loss,
            "loss_box_reg": box_regression_loss(box_regression, labels_t, targets_t),
        }
        return [], losses

    def _chunked_outputs(self, features, proposals, image_shapes) -> tuple[Tensor, Tensor]:
        """Box-head outputs for all proposals, in their order, ``eval_chunk`` at a time.

        Each chunk is a slice of the proposals concatenated over the batch; the pooler gets
        the whole batch's features and image shapes (its level rule depends on them) and
        an empty proposal list for images outside the slice.
        """
        counts = [len(p) for p in proposals]
        starts = [sum(counts[:i]) for i in range(len(counts))]
        total = sum(counts)
        logits, deltas = [], []
        for lo in range(0, total, self.eval_chunk):
            hi = min(total, lo + self.eval_chunk)
            part = [
                p[min(max(lo - s, 0), n) : min(max(hi - s, 0), n)]
                for p, s, n in zip(proposals, starts, counts, strict=True)
            ]
            pooled = self.box_roi_pool(features, part, image_shapes)
            c, r = self.box_predictor(self.box_head(pooled))
            logits.append(c)
            deltas.append(r)
        return torch.cat(logits), torch.cat(deltas)
