"""Zero-shot quality of the bundled nucleus model on CoNSeP (issue 13).

The model saw MoNuSeg only. Scored on CoNSeP's test split (7:1:2 by ``source_tile``,
the split of ``benchmarks/semi_wins.py``), class-agnostic: a prediction matches a
nucleus of any class at IoU >= 0.5, score > 0.5 and NMS 0.5 (the paper's protocol).
Also on the same test tiles downscaled x0.5, as they would look at 20x.

    python benchmarks/nucleus_model.py --seed 0 --out runs/nucleus_zero_shot.json
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from napari_rmt.data import Boxes
from napari_rmt.data.coco import read_coco
from napari_rmt.data.split import split_by_group
from napari_rmt.evaluate.metrics import f1_scores
from napari_rmt.model.bundled import NUCLEUS, nucleus_path
from napari_rmt.model.predict import predict_tiles
from napari_rmt.train import load_model

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "consep" / "annotations.json"


def scaled(tile, factor: float):
    """The tile resized by ``factor`` (bilinear), its boxes with it."""
    pixels = tile.pixels()
    h, w = pixels.shape[:2]
    size = (max(1, round(w * factor)), max(1, round(h * factor)))
    small = np.asarray(Image.fromarray(pixels).resize(size, Image.BILINEAR))
    boxes = dataclasses.replace(tile.boxes, xyxy=tile.boxes.xyxy * factor)
    return dataclasses.replace(tile, loader=lambda: small, path=None, width=size[0], height=size[1], boxes=boxes)


def score(model, classes, tiles) -> dict:
    t0 = time.perf_counter()
    preds = predict_tiles(model, tiles, classes, score_threshold=0.05, store=False, batch_size=8)
    seconds = time.perf_counter() - t0
    nucleus = classes.ids[0]
    pairs = [(Boxes(xyxy=t.boxes.xyxy, class_ids=np.full(len(t.boxes), nucleus)), p) for t, p in zip(tiles, preds, strict=True)]
    k = f1_scores(pairs, [nucleus])["any"]
    return {"f1": round(100 * k.f1, 1), "precision": round(100 * k.precision, 1), "recall": round(100 * k.recall, 1),
            "n_pred": k.n_pred, "n_gt": k.n_gt, "tiles": len(tiles), "predict_s": round(seconds, 1)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seed", type=int, default=0, help="the split's seed")
    ap.add_argument("--model", default=NUCLEUS)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(2)
    ts = read_coco(DATA)
    _train, _val, test = split_by_group(list(ts), "source_tile", seed=args.seed)
    model, classes, _ = load_model(args.model)
    path = nucleus_path() if args.model == NUCLEUS else Path(args.model)
    res = {
        "model": str(path), "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
        "split_seed": args.seed, "machine": platform.machine(), "threads": torch.get_num_threads(),
        "40x": score(model, classes, test),
        "20x (x0.5)": score(model, classes, [scaled(t, 0.5) for t in test]),
    }
    print(json.dumps(res, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
