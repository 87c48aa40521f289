"""Seconds per training iteration of each method, and RMT's ratio to supervised.

Same tiles, batch and tile size for every method; the first iterations (warm-up of the
allocator and of BatchNorm) are dropped. Semi-supervised methods are timed after
burn-in, on real CoNSeP patches, with the pseudo-label threshold lowered so that the
teacher (untrained here) yields a realistic number of pseudo-boxes.

    python benchmarks/iteration_time.py --backbone resnet18 --iterations 12
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from napari_rmt.data import read_coco
from napari_rmt.model import ModelConfig
from napari_rmt.train import IterationEvent, TrainConfig, Trainer

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "consep" / "annotations.json"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--backbone", default="resnet18")
    ap.add_argument("--iterations", type=int, default=12, help="timed iterations per method")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--full-heads", action="store_true")
    ap.add_argument("--threshold", type=float, default=0.3)
    ap.add_argument("--methods", nargs="+", default=["supervised", "ubt", "rmt"])
    ap.add_argument(
        "--init-from",
        default=None,
        help="start student (and so the teacher) from this model.pt: realistic pseudo-labels",
    )
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    dataset = read_coco(DATA)
    tiles, classes = list(dataset), dataset.classes
    lab, unl = tiles[:32], tiles[32:96]
    skip = 3
    results = {}
    for method in args.methods:
        cfg = TrainConfig(
            method=method,
            iterations=args.iterations + skip,
            burn_in=0,
            warmup=0,
            lr=0.005,
            labelled_batch=args.batch,
            unlabelled_batch=args.batch,
            threshold=args.threshold,
            model=ModelConfig(backbone=args.backbone, light_heads=not args.full_heads),
        )
        trainer = Trainer(lab, unl, classes, cfg, init_from=args.init_from)
        times, pseudo = [], []
        t0 = time.perf_counter()
        for ev in trainer.run():
            if isinstance(ev, IterationEvent) and ev.iteration > skip:
                times.append(ev.seconds)
                if ev.pseudo_per_image:
                    pseudo.append(sum(ev.pseudo_per_image) / len(ev.pseudo_per_image))
        results[method] = {
            "median_s": statistics.median(times),
            "mean_s": statistics.fmean(times),
            "pseudo_per_image": statistics.fmean(pseudo) if pseudo else 0.0,
            "wall_s": time.perf_counter() - t0,
        }
        print(method, json.dumps(results[method]))
    if "supervised" in results:
        for m in results:
            results[m]["ratio_to_supervised"] = results[m]["median_s"] / results["supervised"]["median_s"]
    report = {
        "backbone": args.backbone,
        "init_from": args.init_from,
        "threshold": args.threshold,
        "batch": args.batch,
        "tile": 256,
        "light_heads": not args.full_heads,
        "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        "results": results,
    }
    print(json.dumps(report, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
