"""How the student's unlabelled forward weighs its RoIs and anchors (the rules for an
unsure teacher, SPEC §5), as a ``LossSpec`` its targets carry, and BatchNorm statistics
kept off strongly augmented batches."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import Tensor, nn
from torchvision.ops import boxes as box_ops

from ..model.options import LossSpec
from .config import TrainConfig
from .losses import roi_class_weights
from .stain_prior import stain_unknown

#: The teacher's class distribution (background first) for each proposal box.
ClassProbs = Callable[[list[Tensor]], Tensor]


@contextlib.contextmanager
def running_stats_frozen(model: nn.Module) -> Iterator[None]:
    """BatchNorm normalises with the batch's statistics but does not record them.

    The student's running statistics are what the teacher (by EMA) and prediction use,
    on weakly augmented or clean tiles. Strongly augmented, mixed unlabelled batches
    would shift them towards jittered colours and blur, so that the student, and in
    turn the teacher, see clean tiles as out of distribution: measured on CoNSeP, a
    student warm-started at 27 % F1 fell to 1 % within 60 semi-supervised steps.
    """
    saved = []
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
            saved.append(
                (m, m.momentum, m.num_batches_tracked.clone() if m.num_batches_tracked is not None else None)
            )
            m.momentum = 0.0
    try:
        yield
    finally:
        for m, momentum, count in saved:
            m.momentum = momentum
            if count is not None:
                m.num_batches_tracked.copy_(count)


def weighs_rois(cfg: TrainConfig, fg_iou: float) -> bool:
    """Whether any rule weighs the unlabelled RoIs (else every RoI would weigh 1)."""
    return bool(
        cfg.soft_negatives
        or cfg.ignore_low is not None
        or cfg.unsup_background != 1.0
        or cfg.unsup_min_iou > fg_iou
        or cfg.unsup_normalise != "joint"
        or cfg.unsup_stain_ignore
    )


def unlabelled_spec(cfg: TrainConfig, fg_iou: float, class_probs: ClassProbs | None) -> LossSpec:
    """How the student's unlabelled forward weighs its losses: its sampled RoIs'
    classification loss by the teacher's background probability (soft negatives), none on
    ignored boxes (ignore band); ``unsup_normalise`` "split" averages the foreground and
    the background RoIs apart. With the stain prior, background RoIs and RPN anchors that
    may be missed cells get no loss. Every RoI weighs 1 when no rule is on.

    With soft class targets instead, every RoI matched to no pseudo-box (those on ignored
    boxes too) learns the teacher's class distribution for its box, weight 1.
    ``class_probs`` is the teacher's, needed by soft negatives and soft targets; ``fg_iou``
    the box head's foreground IoU.
    """
    spec = LossSpec(split_normalise=cfg.unsup_normalise == "split")
    if cfg.unsup_stain_ignore:

        def anchor_unknown(anchors: Tensor, target: dict) -> Tensor:
            return stain_unknown(target["stain_integral"], anchors, target["boxes"], cfg.unsup_stain_ignore)

        spec.anchor_unknown = anchor_unknown
    if cfg.soft_targets:
        spec.roi_soft_targets = _soft_targets(cfg, class_probs)
    elif weighs_rois(cfg, fg_iou):
        spec.roi_weighting = _weights(cfg, fg_iou, class_probs)
    return spec


def _soft_targets(cfg: TrainConfig, class_probs: ClassProbs | None):
    def soft_targets(proposals: list[Tensor], labels: list[Tensor], _targets: list[dict]):
        assert class_probs is not None
        probs = class_probs(proposals)
        if cfg.soft_temperature != 1.0:
            probs = torch.softmax(torch.log(probs.clamp_min(1e-12)) / cfg.soft_temperature, dim=-1)
        return probs, torch.cat(labels) == 0

    return soft_targets


def _weights(cfg: TrainConfig, fg_iou: float, class_probs: ClassProbs | None):
    def weighting(proposals: list[Tensor], labels: list[Tensor], targets: list[dict]) -> Tensor:
        bg_probs: list[Tensor | None] = [None] * len(proposals)
        if cfg.soft_negatives:
            assert class_probs is not None
            bg = class_probs(proposals)[:, 0]
            bg_probs = list(bg.split([len(p) for p in proposals]))
        out = []
        for props, lab, target, bg_p in zip(proposals, labels, targets, bg_probs, strict=True):
            ignore = target.get("ignore_boxes")
            on_ignored = loose = None
            if ignore is not None and ignore.numel() and props.numel():
                on_ignored = box_ops.box_iou(props, ignore).max(dim=1).values >= fg_iou
            if "stain_integral" in target:
                unknown = stain_unknown(target["stain_integral"], props, target["boxes"], cfg.unsup_stain_ignore)
                on_ignored = unknown if on_ignored is None else on_ignored | unknown
            if cfg.unsup_min_iou > fg_iou and target["boxes"].numel() and props.numel():
                loose = box_ops.box_iou(props, target["boxes"]).max(dim=1).values < cfg.unsup_min_iou
            out.append(roi_class_weights(lab, bg_p, on_ignored, cfg.unsup_background, loose))
        return torch.cat(out)

    return weighting
