"""The model card's picture of where the bundled nucleus model fails (docs/nucleus_model.md).

Left: the densest CoNSeP test patch of source tiles test_12-14 (40x), the true nuclei in
green and the model's boxes above the 0.5 cut in red. Right: a CPM-15 20x tile as it is,
then predicted with ``--pixel-size 0.5`` (resampled to the model's 40x), same colours.

    python scripts/nucleus_failure_figure.py --out docs/images/nucleus-failures.png
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from napari_rmt.data.coco import read_coco
from napari_rmt.model.bundled import NUCLEUS
from napari_rmt.model.predict import predict_tiles
from napari_rmt.train.checkpoint import load_model

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def panel(tile, boxes, title: str, side: int = 420) -> Image.Image:
    im = Image.fromarray(tile.pixels()).convert("RGB")
    scale = side / max(im.size)
    im = im.resize((round(im.width * scale), round(im.height * scale)), Image.BILINEAR)
    draw = ImageDraw.Draw(im)
    for b in tile.boxes.xyxy:
        draw.rectangle([float(v) * scale for v in b], outline=(40, 220, 60), width=2)
    for b, s in zip(boxes.xyxy, boxes.scores, strict=True):
        if s > 0.5:
            draw.rectangle([float(v) * scale for v in b], outline=(230, 30, 30), width=2)
    found = int((boxes.scores > 0.5).sum())
    out = Image.new("RGB", (im.width, im.height + 34), "white")
    out.paste(im, (0, 34))
    ImageDraw.Draw(out).text((6, 4), f"{title}\n{len(tile.boxes)} true nuclei (green), {found} boxes > 0.5 (red)",
                             fill="black")
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    model, classes, _ = load_model(NUCLEUS)
    consep = [t for t in read_coco(DATA / "consep" / "annotations.json")
              if t.meta.get("source_tile") in ("test_12", "test_13", "test_14")]
    dense = max(consep, key=lambda t: len(t.boxes))
    cpm = [t for t in read_coco(DATA / "cpm15" / "annotations.json") if t.meta.get("magnification") == "20x"]
    at20 = max(cpm, key=lambda t: len(t.boxes) / (t.width * t.height))
    panels = [
        panel(dense, predict_tiles(model, [dense], classes, store=False)[0], "CoNSeP, dense colorectal, 40x"),
        panel(at20, predict_tiles(model, [at20], classes, store=False)[0], "CPM-15 20x, as it is"),
        panel(at20, predict_tiles(model, [at20], classes, store=False, scale=2.0)[0], "CPM-15 20x, --pixel-size 0.5"),
    ]
    sheet = Image.new("RGB", (sum(p.width for p in panels) + 20, max(p.height for p in panels)), "white")
    x = 0
    for p in panels:
        sheet.paste(p, (x, 0))
        x += p.width + 10
    args.out.parent.mkdir(parents=True, exist_ok=True)
    sheet.quantize(256, method=Image.Quantize.MEDIANCUT).save(args.out, optimize=True)  # a small file for the docs
    print(args.out, dense.name, at20.name, np.round(sheet.size))


if __name__ == "__main__":
    main()
