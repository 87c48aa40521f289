"""How good would the teacher's pseudo-labels be at each threshold? (issue 11)

Loads a state saved by ``semi_wins.py supervised`` (the network a branch starts its
semi-supervised phase from, i.e. the first teacher), predicts the unlabelled tiles of that
seed's split as the teacher sees them (no flip), and counts, for each threshold, the
pseudo-boxes per tile, their recall and precision against the tiles' hidden truth (any
class, IoU >= 0.5, one-to-one) and the share of matched ones whose class is right.

Two ways to score a teacher box:
- ``class``: its class probability (what torchvision's post-processing and the
  protocol's score are: one box per class, class-agnostic NMS after);
- ``foreground``: 1 - its background probability, labelled with its most probable
  class. A nucleus whose probability is split between two classes has a low class score
  but a high foreground score.

    python benchmarks/pseudo_thresholds.py runs/semi/s0/supervised_nuc/state_50.pt --seed 0
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from semi_wins import split  # benchmarks/ is the script's folder
from torchvision.ops import batched_nms, nms
from torchvision.ops import boxes as box_ops

from napari_rmt.evaluate.metrics import iou_matrix
from napari_rmt.model.predict import image_tensor
from napari_rmt.train.checkpoint import model_from_checkpoint, read_checkpoint

THRESHOLDS = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7)


@torch.no_grad()
def teacher_boxes(model, images: list[torch.Tensor]) -> list[dict[str, dict[str, np.ndarray]]]:
    """Per image, both scorings' boxes (score floor 0.05, NMS 0.5 as the protocol)."""
    images_t, _ = model.transform(images)
    features = model.backbone(images_t.tensors)
    proposals, _ = model.rpn(images_t, features)
    heads = model.roi_heads
    out = []
    for i, props in enumerate(proposals):
        feats = {k: v[i : i + 1] for k, v in features.items()}
        pooled = heads.box_roi_pool(feats, [props], [images_t.image_sizes[i]])
        logits, deltas = heads.box_predictor(heads.box_head(pooled))
        probs = torch.softmax(logits, -1)
        boxes = heads.box_coder.decode(deltas, [props]).reshape(len(props), -1, 4)
        boxes = box_ops.clip_boxes_to_image(boxes, images_t.image_sizes[i])
        n_cls = probs.shape[1]
        # class scoring: one box per (proposal, class), class-agnostic NMS
        cb = boxes[:, 1:].reshape(-1, 4)
        cs = probs[:, 1:].reshape(-1)
        cl = torch.arange(1, n_cls).repeat(len(props))
        keep = cs > 0.05
        cb, cs, cl = cb[keep], cs[keep], cl[keep]
        k = nms(cb, cs, 0.5)
        by_class = {"boxes": cb[k].numpy(), "scores": cs[k].numpy(), "labels": cl[k].numpy()}
        # foreground scoring: one box per proposal, its argmax class's box
        fg = 1 - probs[:, 0]
        lab = probs[:, 1:].argmax(1) + 1
        fb = boxes[torch.arange(len(props)), lab]
        keep = fg > 0.05
        fb, fg, lab = fb[keep], fg[keep], lab[keep]
        k = batched_nms(fb, fg, torch.zeros_like(lab), 0.5)
        by_fg = {"boxes": fb[k].numpy(), "scores": fg[k].numpy(), "labels": lab[k].numpy()}
        out.append({"class": by_class, "foreground": by_fg})
    return out


def match(pred: np.ndarray, truth: np.ndarray) -> list[tuple[int, int]]:
    """Greedy one-to-one matching at IoU >= 0.5, predictions in the given (score) order."""
    if not len(pred) or not len(truth):
        return []
    m = iou_matrix(pred.astype(np.float64), truth.astype(np.float64))
    used: set[int] = set()
    pairs = []
    for i, row in enumerate(m):
        for j in np.argsort(-row):
            if row[j] < 0.5:
                break
            if j not in used:
                used.add(int(j))
                pairs.append((i, int(j)))
                break
    return pairs


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("state")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out")
    args = ap.parse_args()
    torch.set_num_threads(2)
    _ts, _lab, unl, _test = split(args.seed)
    ckpt = read_checkpoint(args.state)
    model, classes, _cfg = model_from_checkpoint(ckpt)
    model.eval()
    class_ids = np.array(classes.ids, dtype=np.int64)  # the model's label k is classes.ids[k - 1]
    counts = {s: {t: {"n": 0, "tp": 0, "right": 0} for t in THRESHOLDS} for s in ("class", "foreground")}
    n_gt = 0
    for start in range(0, len(unl), 8):
        chunk = unl[start : start + 8]
        dets = teacher_boxes(model, [image_tensor(t.pixels()) for t in chunk])
        for tile, det in zip(chunk, dets, strict=True):
            truth = tile.boxes.xyxy
            truth_ids = tile.boxes.class_ids
            n_gt += len(truth)
            for scoring, d in det.items():
                order = np.argsort(-d["scores"])
                for t in THRESHOLDS:
                    sel = order[d["scores"][order] >= t]
                    pairs = match(d["boxes"][sel], truth)
                    ids = class_ids[d["labels"][sel] - 1]
                    c = counts[scoring][t]
                    c["n"] += len(sel)
                    c["tp"] += len(pairs)
                    c["right"] += sum(int(ids[i] == truth_ids[j]) for i, j in pairs)
    rows = []
    for scoring, by_t in counts.items():
        for t, c in by_t.items():
            rows.append({
                "scoring": scoring, "threshold": t, "per_tile": round(c["n"] / len(unl), 1),
                "recall": round(c["tp"] / max(1, n_gt), 3), "precision": round(c["tp"] / max(1, c["n"]), 3),
                "class_right": round(c["right"] / max(1, c["tp"]), 3),
            })
    print(f"{len(unl)} unlabelled tiles, {n_gt / len(unl):.1f} true cells per tile")
    print("| scoring | threshold | pseudo-boxes per tile | recall | precision | class right (of matched) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['scoring']} | {r['threshold']} | {r['per_tile']} | {r['recall']} | {r['precision']} | "
              f"{r['class_right']} |")
    if args.out:
        Path(args.out).write_text(json.dumps({"state": args.state, "seed": args.seed, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
