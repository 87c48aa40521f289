"""Probe RMT's semi-supervised phase alone: warm-start from a trained supervised model,
run a few semi-supervised steps, and evaluate teacher and student on a quarter of the
CoNSeP test patches (every 4th). Cheap (about 60 steps) next to a full run, so settings
(pseudo-label threshold, λu, lr, method) can be compared.

    python benchmarks/semi_phase_probe.py --init runs/learn/supervised/model.pt \\
        --threshold 0.5 --lambda-u 4 --lr 0.02 --iterations 60 --method rmt
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from learn_consep import DATA, evaluate

from napari_rmt.data import read_coco
from napari_rmt.data.split import pick_labelled, split_by_group
from napari_rmt.model import ModelConfig
from napari_rmt.train import IterationEvent, TrainConfig, Trainer


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--init", required=True)
    ap.add_argument("--method", default="rmt")
    ap.add_argument("--threshold", type=float, default=0.5)
    ap.add_argument("--lambda-u", type=float, default=4.0)
    ap.add_argument("--lr", type=float, default=0.02)
    ap.add_argument("--iterations", type=int, default=60)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    ts = read_coco(DATA)
    train, _val, test = split_by_group(list(ts), "source_tile", seed=0)
    lab, unl = pick_labelled(train, 0.1, "source_tile", seed=0)
    cfg = TrainConfig(
        method=args.method, iterations=args.iterations, burn_in=0, warmup=0, lr=args.lr,
        labelled_batch=4, unlabelled_batch=2, threshold=args.threshold, lambda_u=args.lambda_u, seed=0,
        model=ModelConfig(backbone="resnet18", light_heads=True),
    )  # fmt: skip
    trainer = Trainer(lab, unl, ts.classes, cfg, init_from=args.init)
    sub = test[::4]
    print("start", json.dumps(evaluate(trainer.student, sub, ts.classes)["any"]), flush=True)
    t0 = time.time()
    for ev in trainer.run():
        if isinstance(ev, IterationEvent) and ev.iteration % 10 == 0:
            losses = {k: round(v, 3) for k, v in ev.losses.items() if "/" not in k}
            print(ev.iteration, sum(ev.pseudo_per_image), losses, round(time.time() - t0), flush=True)
    print("teacher", json.dumps(evaluate(trainer.teacher, sub, ts.classes)["any"]), flush=True)
    print("student", json.dumps(evaluate(trainer.student, sub, ts.classes)["any"]), flush=True)


if __name__ == "__main__":
    main()
