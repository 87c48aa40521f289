"""How closely stitched windows reproduce a whole-image pass, on MoNuSeg 1000 x 1000 fields.

For each grid setting (window, overlap, context) the same model predicts one field at
once and in windows; reported: boxes of each, the share of whole-image boxes with a
stitched box within 1 px on every side (and the reverse), duplicates (IoU > 0.5 among
stitched boxes), and times. Both passes select proposals by the same local rule (an
objectness floor and a count per 64 px cell, ``model.proposals.LocalRPN``); ``--per-cell``
changes that count (0: no count at all).

    python benchmarks/stitch_monuseg.py --model runs/learn/supervised/model.pt \\
        --grid 256x64x128 512x0x128 256x64x0 512x128x0
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from common import MONUSEG_IMAGES

from napari_rmt.data.large import open_large_image
from napari_rmt.evaluate.metrics import iou_matrix
from napari_rmt.model.wholeimage import predict_large_image, predict_whole_at_once
from napari_rmt.train.checkpoint import load_model

DATA = MONUSEG_IMAGES


def within_1px(a: np.ndarray, b: np.ndarray) -> float:
    if len(a) == 0:
        return 1.0
    if len(b) == 0:
        return 0.0
    d = np.abs(a[:, None, :] - b[None, :, :]).max(axis=2).min(axis=1)
    return float((d <= 1.0).mean())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--image", default="TCGA-21-5784-01Z-00-DX1.png")
    ap.add_argument("--grid", nargs="+", default=["256x64x128", "512x0x128", "256x64x0", "512x128x0"])
    ap.add_argument("--score-threshold", type=float, default=0.5)
    ap.add_argument("--per-cell", type=int, default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    model, classes, _ = load_model(args.model)
    image = open_large_image(DATA / args.image)
    per_cell = None if args.per_cell is None else args.per_cell or 1 << 30
    t0 = time.perf_counter()
    whole = predict_whole_at_once(
        model, image.read(0, 0, image.width, image.height), classes, args.score_threshold, per_cell=per_cell
    )
    t_whole = time.perf_counter() - t0
    rows = []
    for spec in args.grid:
        window, overlap, context = map(int, spec.split("x"))
        t0 = time.perf_counter()
        st = predict_large_image(
            model, image, classes, window=window, overlap=overlap, context=max(context, 0),
            score_threshold=args.score_threshold, per_cell=per_cell,
        )  # fmt: skip
        iou = iou_matrix(st.xyxy, st.xyxy)
        np.fill_diagonal(iou, 0)
        row = {
            "window": window,
            "overlap": overlap,
            "context": context,
            "whole_boxes": len(whole),
            "stitched_boxes": len(st),
            "whole_matched_1px": round(within_1px(whole.xyxy, st.xyxy), 4),
            "stitched_matched_1px": round(within_1px(st.xyxy, whole.xyxy), 4),
            "duplicates": int((np.triu(iou) > 0.5).sum()),
            "seconds_whole": round(t_whole, 1),
            "seconds_stitched": round(time.perf_counter() - t0, 1),
            "threads": torch.get_num_threads(),
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
