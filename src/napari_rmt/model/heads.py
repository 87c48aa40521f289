"""The box head's training losses: focal classification (as in Unbiased Teacher), smooth L1 boxes.

torchvision's ``RoIHeads`` hard-wires cross-entropy; this subclass reuses its sampling and
pooling and replaces the loss. A training forward weighs its RoIs as the ``LossSpec`` on
its targets says and leaves its class logits there for the sparse regulariser (Eq. 5); an
eval forward keeps boxes as the call's ``DetectOptions`` say (``model/options.py``), and
runs the box head over the proposals in chunks, so that a large window with tens of
thousands of proposals does not hold all their pooled features at once.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.ops import boxes as box_ops

from .options import LossSpec, current, spec_of


def cell_cross_entropy(logits: Tensor, labels: Tensor) -> Tensor:
    """Per-RoI cross-entropy, where a label one past the last class (``logits.shape[1]``)
    means "a cell of some class" (``train/partial.py``: a nucleus the user did not box):
    ``-log(1 - p_background)``, which teaches that it is no background and nothing of
    its class."""
    n_out = logits.shape[1]
    any_cell = labels >= n_out
    ce = F.cross_entropy(logits, labels.clamp_max(n_out - 1), reduction="none")
    if bool(any_cell.any()):
        not_background = torch.logsumexp(logits, dim=1) - torch.logsumexp(logits[:, 1:], dim=1)
        ce = torch.where(any_cell, not_background, ce)
    return ce


def focal_loss(logits: Tensor, labels: Tensor, gamma: float = 1.5) -> Tensor:
    """Softmax focal loss ``mean_n (1 - p_t)^gamma * (-log p_t)``; gamma = 0 is cross-entropy."""
    if logits.numel() == 0:
        return logits.sum() * 0.0
    ce = cell_cross_entropy(logits, labels)
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
    ce = cell_cross_entropy(logits, labels)
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
    """Smooth L1 on the positives' class-specific deltas, normalised by all sampled RoIs.
    A cell of unknown class (``cell_cross_entropy``) has no class whose box to learn."""
    n = box_regression.shape[0]
    n_out = box_regression.size(-1) // 4
    pos = torch.where((labels > 0) & (labels < n_out))[0]
    if pos.numel() == 0:
        return box_regression.sum() * 0.0
    deltas = box_regression.reshape(n, n_out, 4)
    loss = F.smooth_l1_loss(deltas[pos, labels[pos]], regression_targets[pos], beta=1.0 / 9, reduction="sum")
    return loss / labels.numel()


def class_doubt(probs: Tensor) -> Tensor:
    """(N, K) class probabilities (background left out) -> (N, K): how close each class came
    to the best other one over the same proposal, ``2 min(p, q) / (p + q)`` with ``p`` the
    class's probability and ``q`` the best other class's; 1 for a tie, 0 when no other
    class has any (and 0 with one class). What *Suggest next* ranks class doubt by
    (``data.suggest``): the margin read relative to the pair's total, so a faint pair
    (0.08 / 0.07) counts as the tie it is."""
    if probs.shape[1] < 2:
        return torch.zeros_like(probs)
    top2 = probs.topk(2, dim=1).values
    is_best = probs >= top2[:, :1]
    other = torch.where(is_best, top2[:, 1:2], top2[:, :1])  # the best class but this one
    total = probs + other
    return torch.where(total > 0, 2 * torch.minimum(probs, other) / total.clamp_min(1e-12), torch.zeros_like(probs))


class FocalRoIHeads(RoIHeads):
    """``RoIHeads`` whose training loss is focal (classification) + smooth L1 (boxes)."""

    #: Proposals pooled at once at inference: 4,096 RoIs of 256 x 7 x 7 floats are 200 MB.
    eval_chunk = 4096

    def __init__(self, *args, gamma: float = 1.5, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.gamma = gamma
        #: What an eval forward scores a box by unless the call says otherwise
        #: (``DetectOptions.score_by``): "class" (one detection per class) or "foreground"
        #: (``foreground_detections``); the model's ``box_score``.
        self.score_by = "class"

    def forward(self, features, proposals, image_shapes, targets=None):  # type: ignore[override]
        if not self.training:
            opts = current()
            thresh = self.score_thresh if opts.score_thresh is None else opts.score_thresh
            limit = max(self.detections_per_img, opts.per_image or 0) if opts.objectness is None else None
            if (opts.score_by or self.score_by) == "foreground":
                return self.foreground_detections(features, proposals, image_shapes, thresh, limit), {}
            class_logits, box_regression = self._chunked_outputs(features, proposals, image_shapes)
            return self.class_detections(class_logits, box_regression, proposals, image_shapes, thresh, limit), {}
        if targets is None:
            raise ValueError("targets are needed in training mode")
        spec = spec_of(targets) or LossSpec()
        proposals, _, labels, regression_targets = self.select_training_samples(proposals, targets)
        pooled = self.box_roi_pool(features, proposals, image_shapes)
        class_logits, box_regression = self.box_predictor(self.box_head(pooled))
        labels_t = torch.cat(labels, dim=0)
        targets_t = torch.cat(regression_targets, dim=0)
        spec.class_logits = class_logits
        if spec.roi_soft_targets is not None:
            soft, use_soft = spec.roi_soft_targets(proposals, labels, targets)
            weights = (
                spec.roi_weighting(proposals, labels, targets)
                if spec.roi_weighting is not None
                else torch.ones_like(labels_t, dtype=class_logits.dtype)
            )
            cls_loss = soft_target_loss(class_logits, labels_t, soft, use_soft, weights, spec.split_normalise)
        elif spec.roi_weighting is not None:
            weights = spec.roi_weighting(proposals, labels, targets)
            cls_loss = weighted_focal_loss(class_logits, labels_t, weights, self.gamma, spec.split_normalise)
        else:
            cls_loss = focal_loss(class_logits, labels_t, self.gamma)
        losses = {
            "loss_classifier": cls_loss,
            "loss_box_reg": box_regression_loss(box_regression, labels_t, targets_t),
        }
        return [], losses

    def class_detections(
        self, class_logits: Tensor, box_regression: Tensor, proposals: list[Tensor], image_shapes,
        score_thresh: float, limit: int | None,
    ) -> list[dict[str, Tensor]]:
        """One detection per proposal and class: the class's probability and its regressed
        box, those over ``score_thresh`` and not tiny, NMS within each class at
        ``nms_thresh``, the best ``limit`` per image (all with None)."""
        counts = [len(p) for p in proposals]
        boxes_all = self.box_coder.decode(box_regression, proposals)
        probs_all = F.softmax(class_logits, -1)
        out = []
        for boxes, probs, shape in zip(boxes_all.split(counts), probs_all.split(counts), image_shapes, strict=True):
            boxes = box_ops.clip_boxes_to_image(boxes, shape)[:, 1:].reshape(-1, 4)  # background left out
            n_cls = probs.shape[1] - 1
            labels = torch.arange(1, n_cls + 1, device=probs.device).repeat(len(probs))
            scores = probs[:, 1:].reshape(-1)
            doubt = class_doubt(probs[:, 1:]).reshape(-1)
            keep = torch.where(scores > score_thresh)[0]
            boxes, scores, labels, doubt = boxes[keep], scores[keep], labels[keep], doubt[keep]
            keep = box_ops.remove_small_boxes(boxes, min_size=1e-2)
            boxes, scores, labels, doubt = boxes[keep], scores[keep], labels[keep], doubt[keep]
            keep = box_ops.batched_nms(boxes, scores, labels, self.nms_thresh)
            if limit is not None:
                keep = keep[:limit]
            out.append({"boxes": boxes[keep], "labels": labels[keep], "scores": scores[keep],
                        "class_doubt": doubt[keep]})
        return out

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
        self, features, proposals: list[Tensor], image_shapes, score_thresh: float, limit: int | None = -1
    ) -> list[dict[str, Tensor]]:
        """One detection per proposal scored by how sure the head is that it is a cell.

        Score ``1 - p(background)``, label the most probable class, box that class's
        regression; boxes under ``score_thresh`` and tiny ones dropped, then one
        class-agnostic NMS at ``nms_thresh``. A nucleus whose probability the head splits
        between two classes (0.4 / 0.35) scores 0.75 here but under 0.5 per class, which is
        what the teacher's pseudo-label choice needs to see (``TrainConfig.pseudo_score``).
        At most ``limit`` per image (-1: ``detections_per_img``; None: all).
        """
        if limit == -1:
            limit = self.detections_per_img
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
            doubt = class_doubt(probs_i[:, 1:]).gather(1, (labels - 1)[:, None])[:, 0]
            boxes = boxes_i[torch.arange(len(labels), device=labels.device), labels]
            boxes = box_ops.clip_boxes_to_image(boxes, shape)
            keep = torch.where(fg > score_thresh)[0]
            keep = keep[box_ops.remove_small_boxes(boxes[keep], min_size=1e-2)]
            keep = keep[box_ops.nms(boxes[keep], fg[keep], self.nms_thresh)]
            if limit is not None:
                keep = keep[:limit]
            out.append({"boxes": boxes[keep], "labels": labels[keep], "scores": fg[keep], "class_doubt": doubt[keep]})
        return out

