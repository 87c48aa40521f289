"""The teacher and its pseudo-labels: what it detects on the weak views, which of its boxes
become pseudo-boxes (Eq. 3's input), and the student's strongly augmented batch of them.

``PseudoLabeller.pseudo_labels`` is the public way to ask a teacher for a batch's
pseudo-labels (benchmarks score them against hidden truth, or swap the detections for an
oracle's by overriding ``detect``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..model.config import ModelConfig
from ..model.detector import build_detector
from ..model.options import DetectOptions
from ..model.predict import predict_images
from .augment import VIEW_FLIPS, flip_boxes, flip_image, hflip
from .batches import TrainingData
from .config import TrainConfig
from .mixing import PatchBank, mix_pseudo_boxes
from .partial import with_known_boxes
from .pseudo import ScoreBuffer, merge_views, select_pseudo
from .stain_prior import stain_integral


def frozen_copy(state: dict[str, Tensor], n_classes: int, model: ModelConfig, device: torch.device) -> nn.Module:
    """A new detector holding ``state``, in eval mode with gradients off (the teacher).

    Built afresh rather than deep-copied: the student carries graph tensors of the last
    step (the box head's logits) that must not be duplicated.
    """
    net = build_detector(n_classes, model).to(device)
    net.load_state_dict(state)
    net.eval()
    net.requires_grad_(False)
    return net


def teacher_detect(
    teacher: nn.Module,
    views: list[Tensor],
    threshold: float,
    cfg: TrainConfig,
    device: torch.device,
    keep_features: bool = False,
) -> tuple[list[dict[str, Tensor]], dict[str, Any]]:
    """Teacher detections for pseudo-labels: the teacher's own eval forward, scored as
    ``cfg.pseudo_score`` says, with boxes under ``threshold`` dropped inside the box head,
    before its NMS, which is where its post-processing spends; merged over
    ``cfg.teacher_views`` flipped looks. With ``keep_features``, also the feature maps the
    forward computed (for soft negatives and soft targets), caught on their way into the
    RPN."""
    caught: dict[str, Any] = {}

    def catch(_rpn: nn.Module, args: tuple) -> None:
        caught["features"], caught["image_sizes"] = args[1], args[0].image_sizes

    options = DetectOptions(score_thresh=threshold, score_by=cfg.pseudo_score)
    hook = teacher.rpn.register_forward_pre_hook(catch) if keep_features else None
    try:
        batch = max(1, len(views))
        dets = predict_images(teacher, views, batch, device, options)
        if hook is not None:
            hook.remove()
            hook = None
        if cfg.teacher_views > 1:
            looks = [[d] for d in dets]
            for flip in VIEW_FLIPS[1 : int(cfg.teacher_views)]:
                turned = [flip_image(v, *flip) for v in views]
                for look, v, d in zip(looks, views, predict_images(teacher, turned, batch, device, options),
                                      strict=True):
                    look.append({**d, "boxes": flip_boxes(d["boxes"], v.shape[-1], v.shape[-2], *flip)})
            dets = [merge_views(look) for look in looks]
    finally:
        if hook is not None:
            hook.remove()
    return dets, caught


@torch.no_grad()
def class_probabilities(teacher: nn.Module, view: dict[str, Any], proposals: list[Tensor]) -> Tensor:
    """The teacher's class distribution (background first) for each proposal box, from its
    features of the weak views (the strong views share their geometry)."""
    props = [p.detach() for p in proposals]
    return teacher.roi_heads.class_probabilities(view["features"], props, view["image_sizes"])


@dataclass
class PseudoLabels:
    """One image's pseudo-labels, in the frame of its weak view."""

    index: int
    flipped: bool
    view: Tensor
    boxes: Tensor
    labels: Tensor
    scores: Tensor
    ignored: Tensor


@dataclass
class PseudoLabeller:
    """Turns the teacher's detections into the student's unlabelled batches."""

    cfg: TrainConfig
    data: TrainingData
    scores: ScoreBuffer
    bank: PatchBank
    strong: Callable[[Tensor], Tensor]
    generator: torch.Generator
    device: torch.device
    #: The last batch's pseudo-labels: (unlabelled index, flipped, boxes, labels) per image.
    last: list[tuple[int, bool, Tensor, Tensor]] = field(default_factory=list)

    def detect(
        self, teacher: nn.Module, views: list[Tensor], share: list[tuple[int, bool]], threshold: float,
        keep_features: bool = False,
    ) -> tuple[list[dict[str, Tensor]], dict[str, Any]]:
        """The teacher's detections on ``views`` (the weak views of ``share``)."""
        return teacher_detect(teacher, views, threshold, self.cfg, self.device, keep_features)

    def pseudo_labels(
        self, teacher: nn.Module, share: list[tuple[int, bool]]
    ) -> tuple[list[PseudoLabels], dict[str, Any], list[float] | float]:
        """Each image's pseudo-labels under the method's rule, with a partly annotated
        tile's own boxes joining as score-1 boxes; also the teacher's features (for the RoI
        weighting; empty unless it needs them) and the thresholds used."""
        cfg = self.cfg
        views = [self.data.weak_view(i, flip) for i, flip in share]
        adaptive = cfg.pseudo_rule != "fixed" or cfg.ignore_low is not None
        floor = teacher.roi_heads.score_thresh if adaptive else cfg.threshold
        if cfg.ignore_low is not None:
            floor = min(floor, cfg.ignore_low)
        dets, teacher_view = self.detect(teacher, views, share, floor, cfg.soft_negatives or cfg.soft_targets)
        if cfg.pseudo_rule == "gmm":
            for det in dets:
                self.scores.add(det["labels"], det["scores"])
            thresholds: list[float] | float = self.scores.thresholds()
        else:
            thresholds = cfg.threshold
        out = []
        for (i, flip), view, det in zip(share, views, dets, strict=True):
            picked = select_pseudo(
                det["boxes"], det["labels"], det["scores"], cfg.pseudo_rule, thresholds, cfg.ignore_low
            )
            known = self.data.known_view(i, flip, view)
            if known is not None:
                picked = with_known_boxes(*picked, *known)
            out.append(PseudoLabels(i, flip, view, *picked))
        return out, teacher_view, thresholds

    def batch(self, teacher: nn.Module) -> tuple[list[Tensor], list[dict[str, Tensor]], dict[str, Any], dict]:
        """The student's unlabelled batch: strong views of the teacher's pseudo-labels,
        mixed with labelled cells when the method mixes; with the step's figures and the
        teacher's features of the weak views."""
        cfg = self.cfg
        labels, teacher_view, thresholds = self.pseudo_labels(teacher, self.data.unlabelled_share())
        images, targets = [], []
        self.last = []
        mixed = unmixed = 0
        for p in labels:
            self.last.append((p.index, p.flipped, p.boxes, p.labels))
            view = p.view
            if cfg.uses_mixing and len(p.boxes):
                view, m, u = mix_pseudo_boxes(view, p.boxes, p.labels, p.scores, self.bank, self.generator)
                mixed, unmixed = mixed + m, unmixed + u
            images.append(self.strong(view).to(self.device))
            target = {"boxes": p.boxes.to(self.device), "labels": p.labels.to(self.device)}
            if cfg.ignore_low is not None:
                target["ignore_boxes"] = p.ignored.to(self.device)
            if cfg.unsup_stain_ignore:
                # the weak view's geometry is the strong view's; its colours are the tile's own
                target["stain_integral"] = stain_integral(view).to(self.device)
            targets.append(target)
        info = {
            "pseudo_per_image": [len(p.boxes) for p in labels],
            "ignored_per_image": [len(p.ignored) for p in labels],
            "thresholds": [round(float(t), 4) for t in thresholds]
            if isinstance(thresholds, list)
            else [float(thresholds)] * len(self.scores.buffers),
            "mixed": mixed,
            "unmixed": unmixed,
        }
        return images, targets, info, teacher_view

    # ------------------------------------------------------------------ STAC
    def fixed_targets(self, teacher: nn.Module) -> list[tuple[Tensor, Tensor]]:
        """A fixed teacher's pseudo-labels of every unlabelled tile, made once (STAC)."""
        out = []
        unlabelled = self.data.unlabelled
        for k in range(0, len(unlabelled), 8):
            views = [im.float().div(255) for im in unlabelled[k : k + 8]]
            share = [(j, False) for j in range(k, k + len(views))]
            for (j, _), view, det in zip(share, views, self.detect(teacher, views, share, self.cfg.stac_threshold)[0],
                                         strict=True):
                keep = det["scores"] >= self.cfg.stac_threshold
                boxes, labels = det["boxes"][keep], det["labels"][keep]
                known = self.data.known_view(j, False, view)
                if known is not None:
                    boxes, labels, _, _ = with_known_boxes(boxes, labels, det["scores"][keep], boxes[:0], *known)
                out.append((boxes, labels))
        return out

    def fixed_batch(self, targets: list[tuple[Tensor, Tensor]]) -> tuple[list[Tensor], list[dict[str, Tensor]], dict]:
        """The STAC student's batch: strong views of the fixed pseudo-labels."""
        images, batch_targets, per_image = [], [], []
        for i, flip in self.data.unlabelled_share():
            boxes, labels = targets[i]
            im = self.data.unlabelled[i].float().div(255)
            if flip:
                im, boxes = hflip(im, boxes)
            images.append(self.strong(im).to(self.device))
            batch_targets.append({"boxes": boxes.to(self.device), "labels": labels.to(self.device)})
            per_image.append(len(boxes))
        return images, batch_targets, {"pseudo_per_image": per_image, "mixed": 0, "unmixed": 0}
