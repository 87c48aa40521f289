"""Zero-shot quality of a nucleus model on data it never saw (issues 13 and 32).

Class-agnostic: a prediction matches a nucleus of any class at IoU >= 0.5, score > 0.5
and NMS 0.5 (the paper's protocol), with precision and recall also at the 0.3 cut. Sets:

- ``split``: CoNSeP's test tiles of the split of ``benchmarks/semi_wins.py`` (7:1:2 by
  ``source_tile``, ``--seed``), at 40x and downscaled x0.5 (as they would look at 20x);
- ``consep48``: the 48 patches of the last three source tiles of CoNSeP's official test
  split (test_12, test_13, test_14), at 40x;
- ``cpm15``: CPM-15 (evaluation only: no licence stated), its 8 tiles at 40x as they are and
  its 7 tiles at 20x both as they are and upscaled x2 to the model's 40x (what a pixel size
  of 0.5 um/px resampled to 0.25 does).

- ``breakdown``: where the model's F1 goes, on the split's 40x test tiles: F1 at every cut
  from 0.05 to 0.7 (the best cut against the 0.5 one), recall at 0.5 by CoNSeP class, for
  nuclei cut by the patch edge against the others, and by size; and the same F1 curve on
  its own training sets (MoNuSeg, DSB2018 H&E: where its best cut lies on data it saw).
- ``proposals``: whether the region proposals limit it, on the split's 40x test tiles: the
  share of nuclei some proposal covers at IoU >= 0.5, and F1 / recall at 0.1, 0.3 and 0.5,
  with the RPN's default test-time counts (600 before NMS, 300 after) and with 2,000 / 1,000.

The box cap per image is lifted to 2,000 (CPM-15 tiles hold up to 351 nuclei, x2 up to
2064 px a side).

    python benchmarks/nucleus_model.py --seed 0 --out runs/nucleus_zero_shot.json
    python benchmarks/nucleus_model.py --model runs/nucleus2/model.pt --out runs/nucleus2_eval.json
    python benchmarks/nucleus_model.py --sets breakdown --out runs/nucleus_breakdown.json
    python benchmarks/nucleus_model.py --model runs/X/model.pt --sets --held-out runs/X/held_out.json
    python benchmarks/nucleus_model.py --sets proposals --out runs/nucleus_proposals.json

``--held-out`` (a training run's ``held_out.json``, ``train_nucleus_model.py --hold-out``):
the F1 curve on the images that run kept out, nuclei the model never saw that are neither
the evaluation set nor evaluation-only: where its scores' best cut lies.
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
from common import CONSEP, CPM15
from PIL import Image

from napari_rmt.data import Boxes
from napari_rmt.data.coco import read_coco
from napari_rmt.data.scale import scale_factor
from napari_rmt.data.split import split_by_group
from napari_rmt.evaluate.metrics import f1_scores, filter_predictions, iou_matrix, matched_pairs
from napari_rmt.model.bundled import NUCLEUS, nucleus_path
from napari_rmt.model.config import PREDICTION_FLOOR
from napari_rmt.model.predict import image_tensor, predict_tiles
from napari_rmt.train import load_model
from napari_rmt.train.checkpoint import native_pixel_size, read_checkpoint

DATA = CONSEP
LAST_THREE = ("test_12", "test_13", "test_14")


def scaled(tile, factor: float):
    """The tile resized by ``factor`` (bilinear), its boxes with it."""
    pixels = tile.pixels()
    h, w = pixels.shape[:2]
    size = (max(1, round(w * factor)), max(1, round(h * factor)))
    small = np.asarray(Image.fromarray(pixels).resize(size, Image.BILINEAR))
    boxes = dataclasses.replace(tile.boxes, xyxy=tile.boxes.xyxy * factor)
    return dataclasses.replace(tile, loader=lambda: small, path=None, width=size[0], height=size[1], boxes=boxes)


def predicted_pairs(model, classes, tiles, scale: float = 1.0) -> list[tuple[Boxes, Boxes]]:
    """(truth as one class, prediction) per tile, every box over the floor (predicted
    resampled by ``scale``, as ``predict --pixel-size`` does, boxes back in the tiles' pixels)."""
    preds = predict_tiles(model, tiles, classes, score_threshold=PREDICTION_FLOOR, store=False,
                          batch_size=8 if tiles[0].width <= 512 else 1, scale=scale)
    nucleus = classes.ids[0]
    return [(Boxes(xyxy=t.boxes.xyxy, class_ids=np.full(len(t.boxes), nucleus)), p) for t, p in zip(tiles, preds, strict=True)]


def score(model, classes, tiles, scale: float = 1.0) -> dict:
    """Class-agnostic F1 of the model on ``tiles`` (predicted resampled by ``scale``, as
    ``predict --pixel-size`` does, boxes back in the tiles' pixels)."""
    t0 = time.perf_counter()
    pairs = predicted_pairs(model, classes, tiles, scale)
    seconds = time.perf_counter() - t0
    nucleus = classes.ids[0]
    k = f1_scores(pairs, [nucleus])["any"]
    k3 = f1_scores(pairs, [nucleus], score_threshold=0.3)["any"]
    return {"f1": round(100 * k.f1, 1), "precision": round(100 * k.precision, 1), "recall": round(100 * k.recall, 1),
            "f1@0.3": round(100 * k3.f1, 1), "P/R@0.3": [round(100 * k3.precision, 1), round(100 * k3.recall, 1)],
            "n_pred": k.n_pred, "n_gt": k.n_gt, "tiles": len(tiles), "predict_s": round(seconds, 1)}


CUTS = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7)


def curve(pairs, nucleus: int) -> dict:
    """F1 (precision / recall) at each of ``CUTS``, and the best cut."""
    out = {}
    for cut in CUTS:
        k = f1_scores(pairs, [nucleus], score_threshold=cut)["any"]
        out[str(cut)] = [round(100 * k.f1, 1), round(100 * k.precision, 1), round(100 * k.recall, 1)]
    best = max(out, key=lambda c: out[c][0])
    return {"by_cut": out, "best_cut": float(best), "best_f1": out[best][0]}


def breakdown(model, classes, tiles, class_names: dict[int, str]) -> dict:
    """Recall at the 0.5 cut (the F1's own one-to-one matching) by the true nucleus's
    CoNSeP class, by whether it touches the patch's edge (cut by the patching), and by its
    longer side."""
    pairs = predicted_pairs(model, classes, tiles)
    found = []  # (class, touches the edge, longer side, matched)
    for tile, (truth, pred) in zip(tiles, pairs, strict=True):
        p = filter_predictions(pred, 0.5, 0.5)
        hit = {g for _p, g in matched_pairs(p.xyxy, np.nan_to_num(p.scores, nan=1.0), truth.xyxy, 0.5)}
        for i, (x0, y0, x1, y1) in enumerate(tile.boxes.xyxy):
            edge = x0 <= 1 or y0 <= 1 or x1 >= tile.width - 1 or y1 >= tile.height - 1
            found.append((int(tile.boxes.class_ids[i]), bool(edge), max(x1 - x0, y1 - y0), i in hit))

    def recall(rows) -> list:
        return [len(rows), round(100 * sum(r[3] for r in rows) / max(1, len(rows)), 1)]

    sizes = ((0, 10), (10, 14), (14, 18), (18, 24), (24, 10**6))
    return {
        "curve": curve(pairs, classes.ids[0]),
        "recall@0.5 [nuclei, %]": {
            **{f"class {name}": recall([r for r in found if r[0] == c]) for c, name in class_names.items()},
            "cut by the patch edge": recall([r for r in found if r[1]]),
            "inside the patch": recall([r for r in found if not r[1]]),
            **{f"longer side {lo}-{hi if hi < 10**6 else ''} px": recall([r for r in found if lo <= r[2] < hi])
               for lo, hi in sizes},
        },
    }


@torch.no_grad()
def proposal_recall(model, tiles) -> float:
    """Share of the true nuclei that some region proposal covers at IoU >= 0.5: what the box
    head could at best score (before its own regression moves a box)."""
    hit = total = 0
    model.eval()
    for tile in tiles:
        images, _ = model.transform([image_tensor(tile.pixels())])
        proposals, _ = model.rpn(images, model.backbone(images.tensors))
        seen_h = images.image_sizes[0][0]
        p = proposals[0].numpy() * (tile.height / seen_h)
        if len(tile.boxes) and len(p):
            hit += int((iou_matrix(tile.boxes.xyxy, p).max(axis=1) >= 0.5).sum())
        total += len(tile.boxes)
    return hit / max(1, total)


def proposals(model, classes, tiles) -> dict:
    """Proposal recall and F1 / recall at three cuts under two RPN test-time counts."""
    rpn, out = model.rpn, {}
    default = dict(rpn._pre_nms_top_n), dict(rpn._post_nms_top_n)
    try:
        for pre, post in ((default[0]["testing"], default[1]["testing"]), (2000, 1000)):
            rpn._pre_nms_top_n["testing"], rpn._post_nms_top_n["testing"] = pre, post
            pairs = predicted_pairs(model, classes, tiles)
            row = {"proposal recall@IoU0.5": round(100 * proposal_recall(model, tiles), 1)}
            for cut in (0.1, 0.3, 0.5):
                k = f1_scores(pairs, [classes.ids[0]], score_threshold=cut)["any"]
                row[f"F1 / recall @{cut}"] = [round(100 * k.f1, 1), round(100 * k.recall, 1)]
            out[f"{pre} / {post} proposals"] = row
    finally:
        rpn._pre_nms_top_n.update(default[0])
        rpn._post_nms_top_n.update(default[1])
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seed", type=int, default=0, help="the split's seed")
    ap.add_argument("--model", default=NUCLEUS)
    ap.add_argument("--out", default=None)
    ap.add_argument("--held-out", default=None,
                    help="a training run's held_out.json: the F1 curve on those images (nuclei the model did not see)")
    ap.add_argument("--sets", nargs="*", default=["split", "consep48", "cpm15"], choices=["split", "consep48", "cpm15", "breakdown", "proposals"])
    args = ap.parse_args()
    torch.set_num_threads(2)
    ts = read_coco(DATA)
    model, classes, _ = load_model(args.model)
    model.roi_heads.detections_per_img = 2000
    path = nucleus_path() if args.model == NUCLEUS else Path(args.model)
    res = {
        "model": str(path), "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
        "split_seed": args.seed, "machine": platform.machine(), "threads": torch.get_num_threads(),
    }
    if "split" in args.sets:
        _train, _val, test = split_by_group(list(ts), "source_tile", seed=args.seed)
        res["40x"] = score(model, classes, test)
        res["20x (x0.5)"] = score(model, classes, [scaled(t, 0.5) for t in test])
    if "consep48" in args.sets:
        res["consep48 40x"] = score(model, classes, [t for t in ts if t.meta.get("source_tile") in LAST_THREE])
    if "cpm15" in args.sets:
        cpm = list(read_coco(CPM15))
        at40 = [t for t in cpm if t.meta.get("magnification") == "40x"]
        at20 = [t for t in cpm if t.meta.get("magnification") == "20x"]
        res["cpm15 40x"] = score(model, classes, at40)
        res["cpm15 20x as is"] = score(model, classes, at20)
        res["cpm15 20x upscaled x2"] = score(model, classes, [scaled(t, 2.0) for t in at20])
        # the product's way: predict --pixel-size 0.5 (boxes back in the 20x tiles' own pixels)
        native = native_pixel_size(read_checkpoint(args.model))
        res["cpm15 20x --pixel-size 0.5"] = score(model, classes, at20, scale=scale_factor(0.5, native))
    if "breakdown" in args.sets:
        _train, _val, test = split_by_group(list(ts), "source_tile", seed=args.seed)
        res["breakdown 40x"] = breakdown(model, classes, test, dict(zip(ts.classes.ids, ts.classes.names, strict=True)))
        for name in ("monuseg", "dsb2018_he"):
            seen = list(read_coco(DATA.parents[1] / name / "annotations.json"))
            res[f"curve {name} (its training data)"] = curve(predicted_pairs(model, classes, seen), classes.ids[0])
    if "proposals" in args.sets:
        _train, _val, test = split_by_group(list(ts), "source_tile", seed=args.seed)
        res["proposals 40x"] = proposals(model, classes, test)
    if args.held_out:
        names = json.loads(Path(args.held_out).read_text())
        for name, kept in names.items():
            seen = [t for t in read_coco(DATA.parents[1] / name / "annotations.json") if t.name in set(kept)]
            res[f"curve {name}, {len(seen)} held-out images"] = curve(predicted_pairs(model, classes, seen), classes.ids[0])
    print(json.dumps(res, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
