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
from torchvision.ops import boxes as box_ops


def focal_loss(logits: Tensor, labels: Tensor, gamma: float = 1.5) -> Tensor:
    """Softmax focal loss ``mean_n (1 - p_t)^gamma * (-log p_t)``; gamma = 0 is cross-entropy."""
    if logits.numel() == 0:
        return logits.sum() * 0.0
    ce = F.cross_entropy(logits, labels, reduction="none")
    p_t = torch.exp(-ce)
    return ((1.0 - p_t) ** gamma * ce).mean()


def weighted_mean(losses: Tensor, weights: Tensor, labels: Tensor, split: bool = False) -> Tensor:
    """The per-RoI ``losses`` averaged under ``weights``.

    Joint (``split`` False): ``sum_n w_n l_n / sum_n w_n``, one average over all RoIs, as
    Soft Teacher's released code does. Split: the foreground RoIs' weighted average plus
    the background RoIs' weighted average, as Soft Teacher's paper writes it (and SPEC
    §5): however few pseudo-boxes a tile has, its cells weigh as much as its background,
    so a shy teacher's many negatives cannot drown its few positives.
    """
    if not split:
        total = weights.sum()
        return (losses * weights).sum() / total if float(total) > 0 else losses.sum() * 0.0
    out = losses.sum() * 0.0
    for part in (labels > 0, labels == 0):
        w = weights[part]
        if float(w.sum()) > 0:
            out = out + (losses[part] * w).sum() / w.sum()
    return out


def weighted_focal_loss(
    logits: Tensor, labels: Tensor, weights: Tensor, gamma: float = 1.5, split: bool = False
) -> Tensor:
    """``focal_n`` averaged under the weights (``weighted_mean``): with all weights equal
    and ``split`` off it is ``focal_loss``.

    Soft Teacher's normalisation: the loss is an average under the weights, so that
    down-weighting doubtful negatives does not shrink the loss as a whole.
    """
    if logits.numel() == 0 or float(weights.sum()) <= 0:
        return logits.sum() * 0.0
    ce = F.cross_entropy(logits, labels, reduction="none")
    p_t = torch.exp(-ce)
    return weighted_mean((1.0 - p_t) ** gamma * ce, weights, labels, split)


def soft_target_loss(
    logits: Tensor, labels: Tensor, soft: Tensor, use_soft: Tensor, weights: Tensor, split: bool = False
) -> Tensor:
    """``ce_n`` averaged under the weights (``weighted_mean``), where ``ce_n`` is
    cross-entropy against ``soft[n]`` (a probability vector) where ``use_soft[n]``, else
    against the hard label ``labels[n]``."""
    if logits.numel() == 0 or float(weights.sum()) <= 0:
        return logits.sum() * 0.0
    log_p = F.log_softmax(logits, dim=-1)
    hard = F.one_hot(labels, logits.shape[-1]).to(log_p.dtype)
    target = torch.where(use_soft[:, None], soft.to(log_p.dtype), hard)
    ce = -(target * log_p).sum(dim=-1)
    return weighted_mean(ce, weights, labels, split)


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
        #: Set by the trainer for an unlabelled forward with soft class targets: the same
        #: arguments -> ``(targets (N, C), use_soft (N,))``: a probability vector per sampled
        #: RoI, used where ``use_soft`` (the RoI's hard label elsewhere).
        self.roi_soft_targets: Callable[[list[Tensor], list[Tensor], list[dict]], tuple[Tensor, Tensor]] | None = None
        #: What an eval forward scores a box by: "class" (torchvision's one detection per
        #: class) or "foreground" (``foreground_detections``); the teacher's pseudo-label
        #: choice sets it (``TrainConfig.pseudo_score``), prediction keeps "class".
        self.score_by = "class"
        #: Set by the trainer for an unlabelled forward: average the classification loss
        #: over foreground and background RoIs apart (``weighted_mean``).
        self.split_normalise = False

    def forward(self, features, proposals, image_shapes, targets=None):  # type: ignore[override]
        if not self.training:
            self.last_class_logits = None
            if self.score_by == "foreground":
                return self.foreground_detections(features, proposals, image_shapes, self.score_thresh), {}
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
        if self.roi_soft_targets is not None:
            soft, use_soft = self.roi_soft_targets(proposals, labels, targets)
            weights = (
                self.roi_weighting(proposals, labels, targets)
                if self.roi_weighting is not None
                else torch.ones_like(labels_t, dtype=class_logits.dtype)
            )
            cls_loss = soft_target_loss(class_logits, labels_t, soft, use_soft, weights, self.split_normalise)
        elif self.roi_weighting is not None:
            weights = self.roi_weighting(proposals, labels, targets)
            cls_loss = weighted_focal_loss(class_logits, labels_t, weights, self.gamma, self.split_normalise)
        else:
            cls_loss = focal_loss(class_logits, labels_t, self.gamma)
        losses = {
            "loss_classifier": cls_loss,
            "loss_box_reg": box_regression_loss(box_regression, labels_t, targets_t),
        }
        return [], losses

    def class_probabilities(self, features, boxes: list[Tensor], image_shapes) -> Tensor:
        """The class distribution (background first) for each of the given boxes of each
        image, concatenated: what the head thinks of a box it did not propose itself (a
        teacher's view of the student's RoIs, or of a true cell's box)."""
        pooled = self.box_roi_pool(features, boxes, image_shapes)
        logits, _ = self.box_predictor(self.box_head(pooled))
        return F.softmax(logits, dim=-1)

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

    @torch.no_grad()
    def foreground_detections(
        self, features, proposals: list[Tensor], image_shapes, score_thresh: float
    ) -> list[dict[str, Tensor]]:
        """One detection per proposal scored by how sure the head is that it is a cell.

        Score ``1 - p(background)``, label the most probable class, box that class's
        regression; boxes under ``score_thresh`` and tiny ones dropped, then one
        class-agnostic NMS at ``nms_thresh``. A nucleus whose probability the head splits
        between two classes (0.4 / 0.35) scores 0.75 here but under 0.5 per class, which is
        what the teacher's pseudo-label choice needs to see (``TrainConfig.pseudo_score``).
        """
        counts = [len(p) for p in proposals]
        if sum(counts) == 0:
            empty = proposals[0].new_zeros((0, 4)) if proposals else torch.zeros(0, 4)
            return [{"boxes": empty, "labels": empty.new_zeros(0, dtype=torch.int64),
                     "scores": empty.new_zeros(0)} for _ in proposals]
        logits, deltas = self._chunked_outputs(features, proposals, image_shapes)  # one chunk when few
        probs = F.softmax(logits, -1)
        boxes_all = self.box_coder.decode(deltas, proposals)
        out = []
        for probs_i, boxes_i, shape in zip(probs.split(counts), boxes_all.split(counts), image_shapes, strict=True):
            fg = 1.0 - probs_i[:, 0]
            labels = probs_i[:, 1:].argmax(dim=1) + 1
            boxes = boxes_i[torch.arange(len(labels), device=labels.device), labels]
            boxes = box_ops.clip_boxes_to_image(boxes, shape)
            keep = torch.where(fg > score_thresh)[0]
            keep = keep[box_ops.remove_small_boxes(boxes[keep], min_size=1e-2)]
            keep = keep[box_ops.nms(boxes[keep], fg[keep], self.nms_thresh)][: self.detections_per_img]
            out.append({"boxes": boxes[keep], "labels": labels[keep], "scores": fg[keep]})
        return out

