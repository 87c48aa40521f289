"""Peak resident memory of an RMT training run (default: ResNet-50-FPN, 256 px tiles).

Runs a few iterations past burn-in on CoNSeP patches, with the pseudo-label threshold
lowered so the (untrained) teacher hands the student many pseudo-boxes: the heaviest
case. Reports the process's peak RSS (``ru_maxrss``), imports included.

    python benchmarks/peak_memory.py --backbone resnet50 --iterations 6
"""

from __future__ import annotations

import argparse
import json
import resource
from pathlib import Path

from napari_rmt.data import read_coco
from napari_rmt.model import ModelConfig
from napari_rmt.train import IterationEvent, TrainConfig, Trainer

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "consep" / "annotations.json"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--backbone", default="resnet50")
    ap.add_argument("--iterations", type=int, default=6)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--full-heads", action="store_true")
    ap.add_argument("--threshold", type=float, default=0.3)
    args = ap.parse_args()
    ts = read_coco(DATA)
    tiles = list(ts)
    cfg = TrainConfig(
        method="rmt",
        iterations=args.iterations,
        burn_in=1,
        warmup=0,
        lr=0.005,
        labelled_batch=args.batch,
        unlabelled_batch=args.batch,
        threshold=args.threshold,
        model=ModelConfig(backbone=args.backbone, light_heads=not args.full_heads),
    )
    pseudo = []
    for ev in Trainer(tiles[:32], tiles[32:96], ts.classes, cfg).run():
        if isinstance(ev, IterationEvent) and ev.pseudo_per_image:
            pseudo.append(sum(ev.pseudo_per_image))
    peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    print(
        json.dumps(
            {
                "backbone": args.backbone,
                "batch": args.batch,
                "tile": 256,
                "light_heads": not args.full_heads,
                "pseudo_boxes_per_step": pseudo,
                "peak_rss_gib": round(peak_gib, 2),
            }
        )
    )


if __name__ == "__main__":
    main()
