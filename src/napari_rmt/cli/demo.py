"""``napari-rmt demo``: train briefly on the bundled sample and write predictions."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .common import at_least, run_training


def add_parser(sub) -> None:
    demo = sub.add_parser("demo", help="train RMT briefly on the bundled sample and write predictions")
    demo.add_argument("--out", default="demo_out", help="output folder (default: demo_out)")
    demo.add_argument("--iterations", type=at_least(1), default=60)
    demo.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..data.coco import write_coco, write_coco_results
    from ..data.geojson import write_geojson
    from ..data.sample import load_sample
    from ..model.detector import ModelConfig
    from ..model.predict import predict_tiles
    from ..train.config import TrainConfig, burn_in_for
    from ..train.trainer import Trainer

    out = Path(args.out)
    tileset = load_sample()
    # One tile of each of the sample's four slide regions is 'annotated'; the other
    # twelve are unlabelled, as in the workflow the plugin is made for.
    labelled, seen = [], set()
    for t in tileset:
        if t.meta.get("source_tile") not in seen:
            seen.add(t.meta.get("source_tile"))
            labelled.append(t)
    unlabelled = [t for t in tileset if t not in labelled]
    cfg = TrainConfig(
        method="rmt",
        iterations=args.iterations,
        burn_in=burn_in_for(args.iterations),
        warmup=10,
        lr=0.01,
        labelled_batch=2,
        unlabelled_batch=2,
        seed=0,
        model=ModelConfig(backbone="mobilenet_v3_large", light_heads=True),
    )
    print(
        f"napari-rmt demo: RMT on {len(labelled)} labelled + {len(unlabelled)} unlabelled CoNSeP tiles, "
        f"{cfg.iterations} iterations ({cfg.model.backbone}, random init; a real run needs thousands)",
        file=sys.stderr,
    )
    trainer = Trainer(labelled, unlabelled, tileset.classes, cfg)
    run_training(trainer, out)
    predict_tiles(trainer.model, unlabelled, tileset.classes, score_threshold=0.05)
    write_coco(tileset, out / "annotations.json", tiles=labelled)
    write_coco_results(tileset, out / "predictions.json", tiles=unlabelled)
    write_geojson(tileset, out / "predictions.geojson", tiles=unlabelled, predictions=True)
    n = sum(len(t.predictions) for t in unlabelled)
    n50 = sum(int((t.predictions.scores > 0.5).sum()) for t in unlabelled)
    truth = sum(len(t.boxes) for t in unlabelled)
    print(
        f"napari-rmt demo: {n} predicted boxes (score > 0.05; {n50} above 0.5) on the 12 unlabelled tiles, "
        f"which hold {truth} annotated cells"
    )
    for name in ("model.pt", "annotations.json", "predictions.json", "predictions.geojson", "events.jsonl"):
        print(f"wrote {out / name}")
    return 0
