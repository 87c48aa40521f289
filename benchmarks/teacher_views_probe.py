"""Would a teacher that looks at a tile more than one way hand out better pseudo-labels?
(issue 11, ``TrainConfig.teacher_views``)

Loads a state saved by ``semi_wins.py supervised`` (a branch's first teacher), predicts
the first N unlabelled tiles of that seed's split as they are and flipped, merges the
looks as the trainer does (``pseudo.merge_views``: each box's score the mean over the
looks, then NMS), and counts at each threshold the pseudo-boxes' recall and precision
against the tiles' hidden truth (any class, IoU >= 0.5, one-to-one).

    python benchmarks/teacher_views_probe.py runs/semi/s1/supervised_nuc/state_50.pt --seed 1 --tiles 150
"""

from __future__ import annotations

import argparse

import torch
from pseudo_thresholds import match  # benchmarks/ is the script's folder
from semi_wins import split

from napari_rmt.model.predict import image_tensor, predict_images
from napari_rmt.train.augment import VIEW_FLIPS, flip_boxes, flip_image
from napari_rmt.train.checkpoint import model_from_checkpoint, read_checkpoint
from napari_rmt.train.pseudo import merge_views


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("state")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tiles", type=int, default=150)
    args = ap.parse_args()
    torch.set_num_threads(2)
    _ts, _lab, unl, _test = split(args.seed)
    model = model_from_checkpoint(read_checkpoint(args.state))[0]
    model.roi_heads.score_thresh = 0.05
    tiles = unl[: args.tiles]
    images = [image_tensor(t.pixels()) for t in tiles]
    looks = []  # per flip, per tile: detections in the tile's own frame
    for flip in VIEW_FLIPS:
        dets = predict_images(model, [flip_image(im, *flip) for im in images], batch_size=4)
        looks.append([
            {**d, "boxes": flip_boxes(d["boxes"], im.shape[-1], im.shape[-2], *flip)}
            for d, im in zip(dets, images, strict=True)
        ])
    for views in (1, 2, 4):
        merged = [merge_views([looks[v][i] for v in range(views)]) for i in range(len(tiles))]
        for thr in (0.3, 0.4, 0.5, 0.7):
            tp = n_pred = n_gt = 0
            for tile, det in zip(tiles, merged, strict=True):
                pred = det["boxes"][det["scores"] >= thr].numpy().astype(float)
                tp += len(match(pred, tile.boxes.xyxy))
                n_pred += len(pred)
                n_gt += len(tile.boxes)
            r, p = tp / n_gt, tp / max(1, n_pred)
            print(f"views {views} threshold {thr}: recall {r:.3f} precision {p:.3f} "
                  f"boxes/tile {n_pred / len(tiles):.1f}", flush=True)


if __name__ == "__main__":
    main()
