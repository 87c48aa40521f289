"""Where does the detector lose the cells it does not find? (issue 11)

Recall at IoU >= 0.5 bounds F1 at the protocol's cut, and labels of more tiles did not
raise it in 20 CPU minutes (docs/benchmarks.md, "More labels instead"). This follows a
saved state's test cells through the detector, stage by stage, and counts at each stage the
share of true cells (CoNSeP test split of ``--seed``) that still have a box at IoU >= 0.5:

- ``anchors``: the anchor grid itself (no network: what the RPN can start from);
- ``proposals``: the RPN's proposals (the box head sees only these);
- ``regressed``: each proposal's box refined by the box head (its most probable class's);
- ``foreground``: those whose background probability is below 0.95;
- ``score``: boxes after the model's post-processing whose score passes the cut (what the
  protocol counts), scored by ``--box-score`` (default: the checkpoint's own; the table in
  docs/benchmarks.md is by "class").

By cell size (square root of the box area), because nuclei of 8-16 px sit between the
anchors of the two finest maps.

    python benchmarks/recall_ceiling.py runs/semi/s1/supervised_nuc40/state_100.pt --seed 1 --box-score class
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch
from semi_wins import split  # benchmarks/ is the script's folder
from torchvision.ops import boxes as box_ops

from napari_rmt.evaluate.metrics import iou_matrix
from napari_rmt.model.config import BOX_SCORES
from napari_rmt.model.predict import image_tensor
from napari_rmt.train.checkpoint import load_model

STAGES = ("anchors", "proposals", "regressed", "foreground", "score")
SIZES = ((0, 10), (10, 16), (16, 24), (24, 10_000))


def best_iou(boxes: torch.Tensor, truth: np.ndarray) -> np.ndarray:
    """Each true cell's best IoU with any of ``boxes`` (0 where there are none)."""
    if not len(boxes):
        return np.zeros(len(truth))
    return iou_matrix(boxes.detach().numpy().astype(np.float64), truth).max(0)


@torch.no_grad()
def stages(model, image: torch.Tensor, truth: np.ndarray, cut: float) -> dict[str, np.ndarray]:
    images, _ = model.transform([image])
    features = model.backbone(images.tensors)
    anchors = model.rpn.anchor_generator(images, list(features.values()))[0]
    proposals = model.rpn(images, features)[0][0]
    heads = model.roi_heads
    pooled = heads.box_roi_pool(features, [proposals], images.image_sizes)
    logits, deltas = heads.box_predictor(heads.box_head(pooled))
    probs = torch.softmax(logits, -1)
    boxes = heads.box_coder.decode(deltas, [proposals]).reshape(len(proposals), -1, 4)
    boxes = box_ops.clip_boxes_to_image(boxes, images.image_sizes[0])
    best = boxes[torch.arange(len(proposals)), probs[:, 1:].argmax(1) + 1]
    # the eval forward's last step on the features and proposals above (native size: no
    # rescaling back), instead of a second pass through the backbone
    detections = heads(features, [proposals], images.image_sizes)[0][0]
    return {
        "anchors": best_iou(anchors, truth),
        "proposals": best_iou(proposals, truth),
        "regressed": best_iou(best, truth),
        "foreground": best_iou(best[probs[:, 0] < 0.95], truth),
        "score": best_iou(detections["boxes"][detections["scores"] > cut], truth),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("state")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cut", type=float, default=0.5)
    ap.add_argument("--box-score", choices=BOX_SCORES, help="default: the checkpoint's own")
    args = ap.parse_args()
    torch.set_num_threads(2)
    _ts, _lab, _unl, test = split(args.seed)
    model = load_model(args.state)[0].eval()
    if args.box_score:
        model.roi_heads.score_by = args.box_score
    found = {s: [] for s in STAGES}
    sizes = []
    for tile in test:
        truth = tile.boxes.xyxy.astype(np.float64)
        if not len(truth):
            continue
        sizes.append(np.sqrt((truth[:, 2] - truth[:, 0]) * (truth[:, 3] - truth[:, 1])))
        for name, iou in stages(model, image_tensor(tile.pixels()), truth, args.cut).items():
            found[name].append(iou >= 0.5)
    size = np.concatenate(sizes)
    rows = {}
    for name in STAGES:
        hit = np.concatenate(found[name])
        rows[name] = {"all": round(float(hit.mean()), 3)}
        for lo, hi in SIZES:
            rows[name][f"{lo}-{hi}px"] = round(float(hit[(size >= lo) & (size < hi)].mean()), 3)
    shares = {f"{lo}-{hi}px": round(float(((size >= lo) & (size < hi)).mean()), 3) for lo, hi in SIZES}
    print(json.dumps({"state": args.state, "cells": len(size), "size_shares": shares, "recall": rows}, indent=1))


if __name__ == "__main__":
    main()
