"""Where a whole-slide window's time goes: the bundled model's stages (backbone + FPN, RPN,
box head) timed on tissue windows and on glass windows of a synthetic slide, with the
proposals each window gives the box head.

    python benchmarks/large_image_memory.py slide --size 8000 --out runs/slide8k
    python benchmarks/window_profile.py runs/slide8k/slide.svs --windows 8 --out runs/window_profile.json

One process, 2 torch threads, the windows of ``predict``'s defaults (512 px and 128 px of
context, the objectness floor and per-cell cap of ``model.wholeimage``), one window per
forward; the stages are timed by forward hooks on the detector's modules.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("slide")
    ap.add_argument("--windows", type=int, default=8, help="tissue windows and glass windows to time, each")
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--set", nargs="*", default=[], help="DetectOptions overrides KEY=VALUE (objectness, per_cell)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from napari_rmt.data.large import open_large_image, tile_grid
    from napari_rmt.data.tissue import tissue_mask
    from napari_rmt.model.backends import for_inference
    from napari_rmt.model.bundled import nucleus_path
    from napari_rmt.model.options import DetectOptions
    from napari_rmt.model.predict import image_tensor, predict_images
    from napari_rmt.model.wholeimage import DEFAULT_OBJECTNESS, _owned_xywh, read_region
    from napari_rmt.train.checkpoint import model_from_checkpoint, read_checkpoint

    model, _, _ = model_from_checkpoint(read_checkpoint(nucleus_path()))
    for_inference(model)
    image = open_large_image(args.slide)
    mask = tissue_mask(image)
    grid = tile_grid(image.width, image.height, args.window, 0)
    share = [(w, mask.covers(*_owned_xywh(w))) for w in grid]
    full = [w for w, c in share if c >= 0.99][: args.windows]
    glass = [w for w, c in share if c == 0][: args.windows]
    overrides = {k: json.loads(v) for k, v in (s.split("=", 1) for s in args.set)}
    options = DetectOptions(**{"objectness": DEFAULT_OBJECTNESS, **overrides})

    spent: dict[str, float] = {}
    starts: dict[str, float] = {}
    counts: dict[str, int] = {}

    def pre(name):
        def hook(_m, _a):
            starts[name] = time.perf_counter()
        return hook

    def post(name):
        def hook(_m, _a, out):
            spent[name] = spent.get(name, 0.0) + time.perf_counter() - starts[name]
            if name == "rpn":
                counts["proposals"] = counts.get("proposals", 0) + sum(len(p) for p in out[0])
        return hook

    stages = {"backbone": model.backbone, "rpn": model.rpn, "box_roi_pool": model.roi_heads.box_roi_pool,
              "box_head": model.roi_heads.box_head, "box_predictor": model.roi_heads.box_predictor,
              "roi_heads": model.roi_heads}
    for name, mod in stages.items():
        mod.register_forward_pre_hook(pre(name))
        mod.register_forward_hook(post(name))

    def run(windows):
        rows = []
        for w in windows:
            x = image_tensor(image.read(*read_region(w, image, args.context)))
            spent.clear()
            counts.clear()
            t0 = time.perf_counter()
            det = predict_images(model, [x], batch_size=1, options=options)[0]
            total = time.perf_counter() - t0
            rows.append({"total": total, **spent, **counts, "boxes": len(det["boxes"])})
        return rows

    run(full[:1])  # warm-up
    result = {"slide": args.slide, "window": args.window, "context": args.context, "threads": args.threads,
              "options": overrides}
    for label, windows in (("tissue", full), ("glass", glass)):
        rows = run(windows)
        result[label] = {k: round(statistics.median(r.get(k, 0.0) for r in rows), 4) for k in rows[0]}
        result[label]["n"] = len(rows)
        print(label, result[label], flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
