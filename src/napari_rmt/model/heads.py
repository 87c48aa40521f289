"""The box head's training losses: focal classification (as in Unbiased Teacher), smooth L1 boxes.

torchvision's ``RoIHeads`` hard-wires cross-entropy; this subclass reuses its sampling,
pooling and post-processing and replaces only the loss. It also keeps the class logits
of the last training forward, which the sparse regulariser (Eq. 5) needs.
"""

from __future__ import annotations

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

    def __init__(self, *args, gamma: float = 1.5, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.gamma = gamma
        self.last_class_logits: Tensor | None = None

    def forward(self, features, proposals, image_shapes, targets=None):  # type: ignore[override]
        if not self.training:
            self.last_class_logits = None
            return super().forward(features, proposals, image_shapes, targets)
        if targets is None:
            raise ValueError("targets are needed in training mode")
        proposals, _, labels, regression_targets = self.select_training_samples(proposals, targets)
        pooled = self.box_roi_pool(features, proposals, image_shapes)
        class_logits, box_regression = self.box_predictor(self.box_head(pooled))
        labels_t = torch.cat(labels, dim=0)
        targets_t = torch.cat(regression_targets, dim=0)
        self.last_class_logits = class_logits
        losses = {
            "loss_classifier": focal_loss(class_logits, labels_t, self.gamma),
            "loss_box_reg": box_regression_loss(box_regression, labels_t, targets_t),
        }
        return [], losses
