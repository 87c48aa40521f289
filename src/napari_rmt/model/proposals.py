"""Region proposals whose selection is local: capped per cell of the image, not per image.

torchvision's RPN keeps the top ``n`` proposals of an input, before and after its NMS.
Such a count is global: whether a cell's proposal survives depends on everything else
in the input, so a nucleus found in a 768 px window can be lost in a whole-image pass
(measured on MoNuSeg: a 1000 px field had 36,936 proposals above an objectness of 0.01
where an area-sized count kept 20,000, and 8 % of the window-found nuclei were missing).
Lifting the counts instead lets a weak model's proposals swamp the box head (a 1,152 px
window: 78,324 proposals, 48 s in the box head on two cores).

Here the cap is per square cell of ``cell`` px of the input: at most ``per_cell``
proposals per cell after NMS (and ``4 * per_cell`` per cell and pyramid level before it),
chosen by objectness among the proposals whose centre lies in the cell. A window read at
an offset that is a multiple of ``cell`` has the same cells as the whole image, so a
cell's proposals are the same whichever window sees it, and the total stays bounded by
the area, like the count it replaces.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchvision.models.detection.rpn import RegionProposalNetwork
from torchvision.ops import boxes as box_ops

from .options import current, spec_of


def top_per_cell(boxes: Tensor, scores: Tensor, groups: Tensor | None, cell: int, k: int) -> Tensor:
    """Indices of the ``k`` best-scoring boxes of each (cell of the box centre, group),
    in descending score order."""
    if boxes.numel() == 0:
        return torch.zeros(0, dtype=torch.int64, device=boxes.device)
    cx = ((boxes[:, 0] + boxes[:, 2]) / 2).div(cell, rounding_mode="floor").long()
    cy = ((boxes[:, 1] + boxes[:, 3]) / 2).div(cell, rounding_mode="floor").long()
    key = cy * (int(cx.max()) + 1) + cx
    if groups is not None:
        key = key * (int(groups.max()) + 1) + groups
    order = torch.argsort(scores, descending=True, stable=True)
    by_key = torch.argsort(key[order], stable=True)  # grouped by key, best first in each
    sorted_keys = key[order][by_key]
    pos = torch.arange(len(sorted_keys), device=boxes.device)
    first = torch.ones_like(sorted_keys, dtype=torch.bool)
    first[1:] = sorted_keys[1:] != sorted_keys[:-1]
    rank = pos - torch.cummax(torch.where(first, pos, 0), dim=0).values
    keep = order[by_key[rank < k]]
    return keep[torch.argsort(scores[keep], descending=True, stable=True)]


def tile_density_per_cell(cell: int, per_tile: int, tile: int = 256) -> int:
    """Proposals per ``cell`` px cell at the density of ``per_tile`` per ``tile`` px tile
    (light heads: 300 per 256 px tile, 19 per 64 px cell).

    Measured on a MoNuSeg field with a briefly trained ResNet-18 (docs/benchmarks.md):
    its box head scores nuclei well from proposals the RPN ranks low, so caps matter;
    the density the model is used with on tiles keeps whole images consistent with them.
    """
    return max(1, round(per_tile * cell**2 / tile**2))


class LocalRPN(RegionProposalNetwork):
    """``RegionProposalNetwork`` that, at inference under an objectness floor
    (``DetectOptions.objectness``), caps proposals per cell of the input instead of per
    input (see the module's docstring); in training, leaves out the anchors that a
    forward's ``LossSpec`` or its ignored boxes say are not known to be background."""

    cell = 64

    def pre_nms_top_n(self) -> int:
        n = self._pre_nms_top_n["training" if self.training else "testing"]
        opts = current()
        return max(n, 16 * opts.per_image) if not self.training and opts.per_image else n

    def post_nms_top_n(self) -> int:
        n = self._post_nms_top_n["training" if self.training else "testing"]
        opts = current()
        return max(n, opts.per_image) if not self.training and opts.per_image else n

    @classmethod
    def from_rpn(cls, rpn: RegionProposalNetwork) -> LocalRPN:
        new = cls(
            rpn.anchor_generator,
            rpn.head,
            fg_iou_thresh=rpn.proposal_matcher.high_threshold,
            bg_iou_thresh=rpn.proposal_matcher.low_threshold,
            batch_size_per_image=rpn.fg_bg_sampler.batch_size_per_image,
            positive_fraction=rpn.fg_bg_sampler.positive_fraction,
            pre_nms_top_n=dict(rpn._pre_nms_top_n),
            post_nms_top_n=dict(rpn._post_nms_top_n),
            nms_thresh=rpn.nms_thresh,
            score_thresh=rpn.score_thresh,
        )
        new.proposal_matcher = rpn.proposal_matcher  # keeps allow_low_quality_matches as built
        return new

    def assign_targets_to_anchors(self, anchors, targets):  # type: ignore[override]
        """torchvision's assignment, then anchors on an ignored box are left out.

        A target may carry ``ignore_boxes`` (the teacher's doubtful detections, SPEC §5):
        an anchor that would be background but overlaps one of them by at least the
        background IoU threshold is neither positive nor negative (label -1); so is one
        that the forward's ``LossSpec.anchor_unknown`` names.
        """
        labels, matched = super().assign_targets_to_anchors(anchors, targets)
        spec = spec_of(targets)
        unknown = spec.anchor_unknown if spec is not None else None
        for lab, anchors_i, target in zip(labels, anchors, targets, strict=True):
            if unknown is not None:
                lab[(lab == 0) & unknown(anchors_i, target)] = -1.0
            ignore = target.get("ignore_boxes")
            if ignore is None or ignore.numel() == 0:
                continue
            overlap = box_ops.box_iou(ignore, anchors_i).max(dim=0).values
            lab[(lab == 0) & (overlap >= self.proposal_matcher.low_threshold)] = -1.0
        return labels, matched

    def filter_proposals(self, proposals, objectness, image_shapes, num_anchors_per_level):  # type: ignore[override]
        opts = current()
        if self.training or opts.objectness is None:
            return super().filter_proposals(proposals, objectness, image_shapes, num_anchors_per_level)
        per_cell = opts.per_cell or tile_density_per_cell(self.cell, self._post_nms_top_n["testing"])
        n_images = proposals.shape[0]
        prob = torch.sigmoid(objectness.detach().reshape(n_images, -1))
        levels = torch.cat(
            [
                torch.full((n,), i, dtype=torch.int64, device=proposals.device)
                for i, n in enumerate(num_anchors_per_level)
            ]
        )
        final_boxes, final_scores = [], []
        within = opts.within or (None,) * n_images  # one region per image: the zip below is strict
        for boxes, scores, shape, region in zip(proposals, prob, image_shapes, within, strict=True):
            keep = torch.where(scores >= opts.objectness)[0]
            boxes, scores, lvl = box_ops.clip_boxes_to_image(boxes[keep], shape), scores[keep], levels[keep]
            keep = box_ops.remove_small_boxes(boxes, self.min_size)
            boxes, scores, lvl = boxes[keep], scores[keep], lvl[keep]
            keep = top_per_cell(boxes, scores, lvl, self.cell, 4 * per_cell)
            boxes, scores, lvl = boxes[keep], scores[keep], lvl[keep]
            keep = box_ops.batched_nms(boxes, scores, lvl, self.nms_thresh)
            boxes, scores = boxes[keep], scores[keep]
            keep = top_per_cell(boxes, scores, None, self.cell, per_cell)
            if region is not None:  # after the local rules: what the region keeps is what it had
                b = boxes[keep]
                x0, y0, x1, y1 = region
                keep = keep[(b[:, 2] > x0) & (b[:, 0] < x1) & (b[:, 3] > y0) & (b[:, 1] < y1)]
            final_boxes.append(boxes[keep])
            final_scores.append(scores[keep])
        return final_boxes, final_scores
