"""How much of a training step do the backbone's first stages cost? (issue 11's budget)

From the bundled nucleus model the backbone's first stages already know what H&E edges
and haematoxylin blobs look like. A stage that does not train needs no backward pass, and
below the first trainable stage autograd keeps no graph at all. This probe takes the
default detector from the nucleus init several times, each with the backbone frozen up to
another stage (``TrainConfig.freeze_backbone``), and times SGD steps on the same 4
labelled CoNSeP tiles of seed 0's split, interleaved step by step so that all see the same
machine; medians after 2 dropped steps.

    python benchmarks/freeze_probe.py --steps 10
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from semi_wins import split

from napari_rmt.model import ModelConfig
from napari_rmt.model.bundled import NUCLEUS
from napari_rmt.model.detector import build_detector
from napari_rmt.train.checkpoint import read_checkpoint, transfer_weights
from napari_rmt.train.config import FREEZE_STAGES
from napari_rmt.train.freeze import freeze_backbone


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--stages", nargs="+", default=list(FREEZE_STAGES))
    args = ap.parse_args()
    torch.set_num_threads(2)
    ts, lab, _unl, _test = split(0)
    label_of = {c.id: i + 1 for i, c in enumerate(ts.classes)}
    images = [torch.from_numpy(t.pixels()).permute(2, 0, 1).float() / 255 for t in lab[:4]]
    targets = [
        {"boxes": torch.tensor(t.boxes.xyxy, dtype=torch.float32),
         "labels": torch.tensor([label_of[int(c)] for c in t.boxes.class_ids])}
        for t in lab[:4]
    ]
    models = {}
    for stage in args.stages:
        torch.manual_seed(0)
        model = build_detector(len(ts.classes), ModelConfig(backbone="resnet18", focal_gamma=0.0)).train()
        transfer_weights(model, read_checkpoint(NUCLEUS), "nucleus model")
        freeze_backbone(model, stage)
        params = [p for p in model.parameters() if p.requires_grad]
        models[stage] = (model, torch.optim.SGD(params, lr=0.001), sum(p.numel() for p in params))
    times: dict[str, list[float]] = {k: [] for k in models}
    for step in range(args.steps):
        for stage, (model, opt, _n) in models.items():
            t0 = time.perf_counter()
            loss = sum(model(images, targets).values())
            opt.zero_grad()
            loss.backward()
            opt.step()
            if step >= 2:
                times[stage].append(time.perf_counter() - t0)
    base = statistics.median(times[args.stages[0]])
    for stage, (_m, _o, n) in models.items():
        med = statistics.median(times[stage])
        print(f"freeze {stage:>6}: {med:.3f} s per step, {n / 1e6:.2f} M trainable, "
              f"{base / med:.2f}x the steps of '{args.stages[0]}'", flush=True)


if __name__ == "__main__":
    main()
