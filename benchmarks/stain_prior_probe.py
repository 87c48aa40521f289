"""Can haematoxylin tell where a missing pseudo-box may still be a cell? (issue 11)

The premise of ``TrainConfig.unsup_stain_ignore`` (``train/stain_prior.py``): on the
first N unlabelled tiles of a seed's split, the share of the hidden true cells' boxes
that are at least f haematoxylin-positive (above the tile's Otsu cut), against the same
share for cell-sized boxes drawn at random away from every cell (IoU < 0.1: true
background the rule would no longer teach) and near one (IoU 0.1-0.5: the near misses).
With a saved state (``--state``, a branch's first teacher) it also gives the share for
the cells that teacher has no box on at all (score >= 0.05), the cells the rule is for,
and how many of those the rule spares: stained enough and under the "next to a
pseudo-box" IoU (``stain_prior.NEAR_PSEUDO_IOU``) of every pseudo-box (score >= 0.5). In
crowded tissue a missed nucleus touches a found one.

    python benchmarks/stain_prior_probe.py --seed 1 --tiles 150 \
        [--state runs/semi/s1/supervised_nuc/state_50.pt]
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from semi_wins import split  # benchmarks/ is the script's folder
from torchvision.ops import boxes as box_ops

from napari_rmt.model.predict import image_tensor, predict_images
from napari_rmt.train.checkpoint import load_model
from napari_rmt.train.stain_prior import box_cover, stain_integral

CUTS = (0.2, 0.3, 0.4, 0.5)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--tiles", type=int, default=150)
    ap.add_argument("--state", default=None, help="a saved state: also the cells it has no box on")
    ap.add_argument("--random", type=int, default=200, help="random boxes drawn per tile")
    ap.add_argument("--threshold", type=float, default=0.5, help="the pseudo-boxes' score")
    args = ap.parse_args()
    torch.set_num_threads(2)
    _ts, _lab, unl, _test = split(args.seed)
    tiles = unl[: args.tiles]
    model = load_model(args.state)[0] if args.state else None
    rng = np.random.default_rng(0)
    cells, missed, far, near, missed_near = [], [], [], [], []
    for tile in tiles:
        image = image_tensor(tile.pixels()[..., :3])
        integral = stain_integral(image)
        truth = torch.as_tensor(tile.boxes.xyxy, dtype=torch.float32).reshape(-1, 4)
        if not len(truth):
            continue
        cover = box_cover(integral, truth)
        cells.append(cover)
        if model is not None:
            det = predict_images(model, [image])[0]  # the model's own floor (0.05), as the trainer's
            if len(det["boxes"]):
                hit = box_ops.box_iou(truth, det["boxes"]).max(dim=1).values >= 0.5
            else:
                hit = torch.zeros(len(truth), dtype=torch.bool)
            missed.append(cover[~hit])
            pseudo = det["boxes"][det["scores"] >= args.threshold]
            touch = box_ops.box_iou(truth[~hit], pseudo).max(dim=1).values if len(pseudo) else torch.zeros(int((~hit).sum()))
            missed_near.append(touch)
        height, width = integral.shape[0] - 1, integral.shape[1] - 1
        wh = (truth[:, 2:] - truth[:, :2]).numpy()
        pick = wh[rng.integers(len(wh), size=args.random)]
        x0 = rng.uniform(0, np.maximum(width - pick[:, 0], 1))
        y0 = rng.uniform(0, np.maximum(height - pick[:, 1], 1))
        boxes = torch.as_tensor(np.stack([x0, y0, x0 + pick[:, 0], y0 + pick[:, 1]], 1), dtype=torch.float32)
        iou = box_ops.box_iou(boxes, truth).max(dim=1).values
        c = box_cover(integral, boxes)
        far.append(c[iou < 0.1])
        near.append(c[(iou >= 0.1) & (iou < 0.5)])
    groups = {"true cells": cells, "cells with no teacher box": missed, "random boxes, IoU < 0.1 with every cell": far,
              "random boxes, IoU 0.1-0.5 with a cell": near}
    print(f"seed {args.seed}, {len(tiles)} unlabelled tiles")
    print("| boxes | n | " + " | ".join(f"cover >= {f}" for f in CUTS) + " |")
    print("|---" * (len(CUTS) + 2) + "|")
    for name, parts in groups.items():
        if not parts:
            continue
        v = torch.cat(parts).numpy()
        print(f"| {name} | {len(v)} | " + " | ".join(f"{np.mean(v >= f):.2f}" for f in CUTS) + " |")
    if missed:
        cover, touch = torch.cat(missed).numpy(), torch.cat(missed_near).numpy()
        print("\n| next to a pseudo-box from IoU | cells with no teacher box that touch one | spared at cover >= 0.3 |")
        print("|---|---|---|")
        for near_iou in (0.05, 0.1, 0.2, 0.3):
            print(f"| {near_iou} | {np.mean(touch >= near_iou):.2f} | {np.mean((cover >= 0.3) & (touch < near_iou)):.2f} |")


if __name__ == "__main__":
    main()
