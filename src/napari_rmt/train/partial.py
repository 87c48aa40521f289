"""Partly annotated tiles: the user's boxes are cells; an unboxed region is not known.

Pathologists box the cells they are sure of, a few of each kind, and rarely every
nucleus of a tile. Taught as a full tile, such a tile says "no cell here" for every
nucleus nobody boxed, and the detector learns to be shy of exactly the cells that were
left out. The rule on a PARTIAL tile, for every method:

- its boxes are positives with their class (every Faster R-CNN term, as on a full tile);
- in the labelled loss, a region that would be background (a box-head RoI, an RPN
  anchor) but is at least ``partial_stain_ignore`` haematoxylin-positive and not next to
  a user box may be an unboxed nucleus: it gets no loss. Elsewhere (glass, stroma
  without nuclei, the near misses around a user box) background is taught as usual;
- the mean-teacher methods also hand the tile to the teacher like an unlabelled one:
  its pseudo-labels, soft negatives, ignore band and stain prior fill in the unboxed
  part, and the user's boxes join the pseudo-boxes at score 1, replacing the teacher's
  box of the same cell (``with_known_boxes``).

With ``partial_cells`` set, the bundled nucleus model also looks at each partial tile
once, before the run: a nucleus it finds (score at least ``partial_cells``) that is no
user box's cell becomes a **cell of unknown class** in the labelled loss. Its anchors
are objectness positives, and the box head's RoIs on it learn "not background"
(``-log(1 - p_background)``, ``model.heads.cell_cross_entropy``) and nothing of a class
or a box. Without it a partial tile teaches its few boxed cells and spares the rest:
the detector sees a handful of cells per tile where a full tile shows it all of them.

The same region on a LABELLED tile is background: the user said every cell is boxed.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torchvision.ops import boxes as box_ops

from ..model.options import LossSpec
from .losses import roi_class_weights
from .stain_prior import stain_integral, stain_unknown

#: The target key that marks a labelled batch's image as partly annotated: the summed-area
#: table of its haematoxylin-positive pixels (``stain_prior.stain_integral``).
PARTIAL_KEY = "partial_stain"

#: A teacher's box at this IoU of a user's box is the same cell: the user's box and class win.
KNOWN_IOU = 0.5

#: A nucleus-model box at this IoU of a user's box is that box's cell (the user's box wins).
CELL_IOU = 0.3


def mark_partial(target: dict[str, Tensor], image: Tensor) -> dict[str, Tensor]:
    """``target`` of a partly annotated ``image`` (the view the student sees), marked so
    that ``partial_rule`` spares its unboxed nuclei."""
    target[PARTIAL_KEY] = stain_integral(image).to(target["boxes"].device)
    return target


def partial_unknown(target: dict[str, Tensor], regions: Tensor, min_cover: float) -> Tensor:
    """Which ``regions`` of one image are not known to be background: on a partly
    annotated image, those at least ``min_cover`` stained and not next to a user box;
    none on a fully annotated one."""
    integral = target.get(PARTIAL_KEY)
    if integral is None or not min_cover:
        return torch.zeros(len(regions), dtype=torch.bool, device=regions.device)
    return stain_unknown(integral, regions, target["boxes"], min_cover)


def partial_spec(min_cover: float | None, class_weights: Tensor | None = None) -> LossSpec:
    """How a labelled forward weighs its losses: background RoIs and RPN anchors that may
    be an unboxed nucleus of a partly annotated image get no loss, and (with
    ``class_weights``, index = label, background first) each RoI's classification loss is
    weighted by its label's weight. Fully annotated images are unchanged by it."""

    def weighting(proposals: list[Tensor], labels: list[Tensor], targets: list[dict]) -> Tensor:
        out = []
        for props, lab, target in zip(proposals, labels, targets, strict=True):
            unknown = partial_unknown(target, props, min_cover or 0.0)
            w = roi_class_weights(lab, None, unknown)
            if class_weights is not None:  # a cell of unknown class (one past the classes) weighs 1
                cw = torch.cat([class_weights, class_weights.new_ones(1)]).to(w.device)
                w = w * cw[lab.clamp_max(len(cw) - 1)]
            out.append(w)
        return torch.cat(out)

    def anchor_unknown(anchors: Tensor, target: dict) -> Tensor:
        return partial_unknown(target, anchors, min_cover or 0.0)

    return LossSpec(roi_weighting=weighting, anchor_unknown=anchor_unknown)


def unboxed_cells(
    nucleus: nn.Module,
    images: Sequence[Tensor],
    known: Sequence[Tensor],
    cut: float,
    factor: float = 1.0,
    batch_size: int = 8,
    rejected: Sequence[Tensor] | None = None,
) -> list[Tensor]:
    """The nucleus model's boxes on each partly annotated ``images`` (uint8 CHW, as
    trained) that score at least ``cut`` and are no user box's cell (under ``CELL_IOU``
    of every box of ``known``): the cells the user did not box, as far as the model sees.
    A box over one the user deleted (``rejected``, IoU at least ``CELL_IOU``) is left out
    too: the user said no cell is there. ``factor`` enlarges the images to the nucleus
    model's pixel size first (its boxes are mapped back)."""
    from ..data.scale import resample
    from ..model.predict import image_tensor, map_back, predict_images

    # resampled as prediction resamples a tile (``data.scale.resample``), boxes mapped back alike
    views = [image_tensor(resample(im.permute(1, 2, 0).numpy(), factor)) for im in images]
    device = next(nucleus.parameters()).device
    with torch.inference_mode():
        found = predict_images(nucleus, views, batch_size=batch_size, device=device)
    out = []
    no = rejected if rejected is not None else [torch.zeros((0, 4))] * len(images)
    for det, view, im, mine, deleted in zip(found, views, images, known, no, strict=True):
        boxes = det["boxes"][det["scores"] >= cut]
        boxes = map_back(boxes, (im.shape[-1], im.shape[-2]), (view.shape[-1], view.shape[-2]))
        for other in (mine, deleted):
            if len(boxes) and len(other):
                boxes = boxes[box_ops.box_iou(boxes, other.to(boxes.dtype)).max(dim=1).values < CELL_IOU]
        out.append(boxes.reshape(-1, 4).float())
    return out


def with_known_boxes(
    boxes: Tensor,
    labels: Tensor,
    scores: Tensor,
    ignored: Tensor,
    known_boxes: Tensor,
    known_labels: Tensor,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One partly annotated image's pseudo-labels: the user's boxes (score 1, their class)
    and the teacher's pseudo-boxes and ignored boxes that are no user box's cell (under
    ``KNOWN_IOU`` of every user box)."""
    if known_boxes.numel() == 0:
        return boxes, labels, scores, ignored
    known_boxes = known_boxes.to(boxes.device, boxes.dtype)
    if boxes.numel():
        other = box_ops.box_iou(boxes, known_boxes).max(dim=1).values < KNOWN_IOU
        boxes, labels, scores = boxes[other], labels[other], scores[other]
    if ignored.numel():
        ignored = ignored[box_ops.box_iou(ignored, known_boxes).max(dim=1).values < KNOWN_IOU]
    return (
        torch.cat([known_boxes, boxes]),
        torch.cat([known_labels.to(labels.device, labels.dtype), labels]),
        torch.cat([torch.ones(len(known_boxes), dtype=scores.dtype, device=scores.device), scores]),
        ignored,
    )


#: No class weighs more than this many times the average labelled box (a class of two
#: boxes would otherwise outweigh all the others together).
MAX_CLASS_WEIGHT = 10.0


def effective_number_weights(counts: list[int], beta: float) -> Tensor:
    """Per-class loss weights from the classes' labelled box counts (Cui et al., "Class-
    Balanced Loss Based on Effective Number of Samples", CVPR 2019): ``(1 - beta) / (1 -
    beta^n)``, scaled so that the average labelled box weighs 1 (the cells as a whole
    keep their weight against the background, index 0, which weighs 1), at most
    ``MAX_CLASS_WEIGHT``; a class with no box gets the largest weight of the others (it
    has no RoI anyway).

    Scaled instead to a mean of 1 over the classes, the sample's counts (120, 73, 53 and
    2 boxes) gave the three common classes 0.07-0.14 against the background's 1: every
    cell became background (any-class F1 3 %, measured on the demo's tiles)."""
    if not 0.0 < beta < 1.0:
        raise ValueError(f"beta {beta} must be in (0, 1)")
    n = torch.tensor(counts, dtype=torch.float64)
    w = torch.where(n > 0, (1.0 - beta) / (1.0 - beta**n.clamp_min(1)), torch.zeros_like(n))
    if (n > 0).any():
        w = w / ((n * w).sum() / n.sum())  # the average box weighs 1
        w = torch.where(n > 0, w, w[n > 0].max()).clamp_max(MAX_CLASS_WEIGHT)
    else:
        w = torch.ones_like(w)
    return torch.cat([torch.ones(1, dtype=torch.float64), w]).float()


def repeat_factors(labels_per_tile: list[Tensor], n_classes: int, threshold: float) -> list[int]:
    """How many times each labelled tile enters a pass over them (repeat factor sampling,
    Gupta et al., LVIS, CVPR 2019): a class on a share ``f_c`` of the tiles has
    ``r_c = max(1, sqrt(threshold / f_c))``; a tile repeats ``round(max r_c)`` of the
    classes it holds (at least once). A rare class's tiles then come round more often."""
    n = max(1, len(labels_per_tile))
    holds = [set(int(v) for v in lab.tolist()) for lab in labels_per_tile]
    share = [sum(c in h for h in holds) / n for c in range(1, n_classes + 1)]
    r = [max(1.0, (threshold / f) ** 0.5) if f > 0 else 1.0 for f in share]
    return [max(1, round(max([r[c - 1] for c in h if 1 <= c <= n_classes], default=1.0))) for h in holds]
