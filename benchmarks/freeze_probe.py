"""How much of a training step do the backbone's first stages cost? (issue 11's budget)

From the bundled nucleus model the backbone's first stages already know what H&E edges
and haematoxylin blobs look like. A stage that does not train needs no backward pass, and
below the first trainable stage autograd keeps no graph at all. This probe takes the
default detector from the nucleus init several times, each with the backbone's body frozen
from the input up to another stage (weights without gradients, BatchNorm on its recorded
statistics), and times SGD steps on the same 4 labelled CoNSeP tiles of seed 0's split,
interleaved step by step so that all see the same machine; medians after 2 dropped steps.

    python benchmarks/freeze_probe.py --steps 12

The fourteenth session also trained with the body frozen (``freeze_backbone`` of commit
3ba863b, since removed: it cost 7.8 points any class for 1.13x the steps; the figures are
in docs/benchmarks.md, "Frozen first stages").
"""

from __future__ import annotations

import argparse
import statistics

import torch
from semi_wins import as_batch, interleaved_step_times, split

from napari_rmt.model import ModelConfig
from napari_rmt.model.bundled import NUCLEUS
from napari_rmt.model.detector import build_detector
from napari_rmt.train.checkpoint import read_checkpoint, transfer_weights

#: The ResNet body's children in input order, and how many of them each setting freezes.
BODY = ("conv1", "bn1", "layer1", "layer2", "layer3")
UPTO = {"none": 0, "stem": 2, "layer1": 3, "layer2": 4, "layer3": 5}


def freeze_backbone(model: torch.nn.Module, upto: str) -> None:
    """No gradients for the body's parts up to ``upto``; their BatchNorm in eval mode (the
    probe never calls ``train()`` again, so it stays there)."""
    for name in BODY[: UPTO[upto]]:
        part = getattr(model.backbone.body, name)
        part.requires_grad_(False)
        part.eval()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--stages", nargs="+", default=list(UPTO), choices=list(UPTO))
    args = ap.parse_args()
    torch.set_num_threads(2)
    ts, lab, _unl, _test = split(0)
    images, targets = as_batch(lab[:4], ts.classes)
    models, trainable = {}, {}
    for stage in args.stages:
        torch.manual_seed(0)
        model = build_detector(len(ts.classes), ModelConfig(backbone="resnet18", focal_gamma=0.0)).train()
        transfer_weights(model, read_checkpoint(NUCLEUS), "nucleus model")
        freeze_backbone(model, stage)
        params = [p for p in model.parameters() if p.requires_grad]
        models[stage] = (model, torch.optim.SGD(params, lr=0.001))
        trainable[stage] = sum(p.numel() for p in params)
    times = interleaved_step_times(models, images, targets, args.steps)
    base = statistics.median(times[args.stages[0]])
    for stage, n in trainable.items():
        med = statistics.median(times[stage])
        print(f"freeze {stage:>6}: {med:.3f} s per step, {n / 1e6:.2f} M trainable, "
              f"{base / med:.2f}x the steps of '{args.stages[0]}'", flush=True)


if __name__ == "__main__":
    main()
