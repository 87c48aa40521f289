"""Does the engine learn on real data? Train on CoNSeP, report F1 on the test tiles.

CoNSeP split 7:1:2 by ``source_tile`` (seeded), 10 % of the training patches labelled
(whole source tiles), the rest unlabelled; ResNet-18-FPN from random init at native
256 px. Test-time protocol of the paper: score > 0.5, NMS 0.5, one-to-one matching at
IoU >= 0.5, per class and class-agnostic ("any").

    python benchmarks/learn_consep.py --method supervised --iterations 480 --out runs/learn/supervised
    python benchmarks/learn_consep.py --method rmt --iterations 400 --burn-in 280 \
        --unlabelled-batch 2 --threshold 0.5 --out runs/learn/rmt
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from napari_rmt.data import read_coco
from napari_rmt.data.split import pick_labelled, split_by_group
from napari_rmt.evaluate.metrics import f1_scores
from napari_rmt.model import ModelConfig
from napari_rmt.model.predict import predict_tiles
from napari_rmt.train import FinishedEvent, IterationEvent, PhaseEvent, TrainConfig, Trainer

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "consep" / "annotations.json"


def evaluate(model, tiles, classes) -> dict:
    preds = predict_tiles(model, tiles, classes, score_threshold=0.05, store=False)
    counts = f1_scores(((t.boxes, p) for t, p in zip(tiles, preds, strict=True)), classes.ids)
    names = {str(c.id): c.name for c in classes}
    return {
        names.get(k, k): {
            "f1": round(100 * v.f1, 1),
            "precision": round(100 * v.precision, 1),
            "recall": round(100 * v.recall, 1),
            "n_pred": v.n_pred,
            "n_gt": v.n_gt,
        }
        for k, v in counts.items()
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--method", default="supervised")
    ap.add_argument("--iterations", type=int, default=480)
    ap.add_argument("--burn-in", type=int, default=0)
    ap.add_argument("--labelled-batch", type=int, default=4)
    ap.add_argument("--unlabelled-batch", type=int, default=2)
    ap.add_argument("--threshold", type=float, default=0.7)
    ap.add_argument("--semi-lr", type=float, default=None, help="lr after burn-in (default 0.02, as before)")
    ap.add_argument("--backbone", default="resnet18")
    ap.add_argument("--full-heads", action="store_true")
    ap.add_argument("--fraction", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ts = read_coco(DATA)
    train, _val, test = split_by_group(list(ts), "source_tile", seed=args.seed)
    lab, unl = pick_labelled(train, args.fraction, "source_tile", seed=args.seed)
    cfg = TrainConfig(
        method=args.method,
        iterations=args.iterations,
        burn_in=args.burn_in,
        warmup=100,
        lr=0.02,
        semi_lr=args.semi_lr,
        labelled_batch=args.labelled_batch,
        unlabelled_batch=args.unlabelled_batch,
        threshold=args.threshold,
        seed=args.seed,
        model=ModelConfig(backbone=args.backbone, light_heads=not args.full_heads),
    )
    print(f"{args.method}: {len(lab)} labelled, {len(unl)} unlabelled, {len(test)} test patches", flush=True)
    trainer = Trainer(lab, unl, ts.classes, cfg)
    t0 = time.perf_counter()
    with open(out / "events.jsonl", "w") as log:
        for ev in trainer.run():
            if isinstance(ev, IterationEvent):
                log.write(
                    json.dumps(
                        {
                            "it": ev.iteration,
                            "phase": ev.phase,
                            "s": round(ev.seconds, 3),
                            "pseudo": ev.pseudo_per_image,
                            "mixed": ev.mixed,
                            "losses": {k: round(v, 4) for k, v in ev.losses.items()},
                        }
                    )
                    + "\n"
                )
                if ev.iteration % 20 == 0:
                    print(
                        f"{ev.iteration}/{ev.total} {ev.phase} loss {ev.losses['total']:.3f} "
                        f"pseudo {ev.pseudo_per_image} {time.perf_counter() - t0:.0f}s",
                        flush=True,
                    )
            elif isinstance(ev, (PhaseEvent, FinishedEvent)):
                print(ev, flush=True)
    train_s = time.perf_counter() - t0
    trainer.save(out / "model.pt")
    result = {
        "method": args.method,
        "config": cfg.to_dict(),
        "train_seconds": round(train_s, 1),
        "labelled": len(lab),
        "unlabelled": len(unl),
        "test": len(test),
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "model_f1": evaluate(trainer.model, test, ts.classes),
    }
    if trainer.teacher is not None:
        result["student_f1"] = evaluate(trainer.student, test, ts.classes)
    (out / "result.json").write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k != "config"}, indent=1))


if __name__ == "__main__":
    main()
