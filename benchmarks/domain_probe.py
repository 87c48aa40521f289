"""Is the teacher's gap between labelled and other tiles a colour or statistics shift? (issue 11)

The first teacher finds most cells of the labelled tiles and fewer than half of the others'
(``missed_cells_probe.py``). The labelled tiles come from 10 % of CoNSeP's source tiles. If
the gap were their colour, or BatchNorm statistics fitted to them, the unlabelled tiles
could close it without a label. This probe checks both on a saved supervised state, scoring
each variant on the seed's test split by the protocol (score > 0.5, IoU >= 0.5):

- the mean CIELAB colour (and its spread) of the labelled, unlabelled and test tiles;
- the state as it is;
- the test tiles with their colour mapped onto the labelled tiles' mean and spread
  (Reinhard's transfer, per tile in CIELAB);
- the BatchNorm running statistics recomputed (AdaBN) on the labelled tiles (a control),
  on the unlabelled tiles, and on both.

    python benchmarks/domain_probe.py runs/semi/s1/supervised_nuc/state_75.pt --seed 1
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from semi_wins import evaluate, split  # benchmarks/ is the script's folder
from skimage.color import lab2rgb, rgb2lab
from torch import nn

from napari_rmt.model.predict import image_tensor
from napari_rmt.train.checkpoint import load_model


def lab_stats(tiles) -> tuple[np.ndarray, np.ndarray]:
    """Per tile, the CIELAB mean and standard deviation of its pixels."""
    means, stds = [], []
    for t in tiles:
        lab = rgb2lab(t.pixels()[..., :3]).reshape(-1, 3)
        means.append(lab.mean(0))
        stds.append(lab.std(0))
    return np.array(means), np.array(stds)


class Recoloured:
    """A tile whose pixels are Reinhard-transferred onto a target CIELAB mean and spread."""

    def __init__(self, tile, mean: np.ndarray, std: np.ndarray) -> None:
        self.tile, self.mean, self.std = tile, mean, std
        self.boxes = tile.boxes

    def pixels(self) -> np.ndarray:
        lab = rgb2lab(self.tile.pixels()[..., :3])
        flat = lab.reshape(-1, 3)
        out = (lab - flat.mean(0)) / np.maximum(flat.std(0), 1e-6) * self.std + self.mean
        return (np.clip(lab2rgb(out), 0, 1) * 255).round().astype(np.uint8)


@torch.no_grad()
def recompute_batchnorm(model: nn.Module, tiles) -> None:
    """AdaBN: every BatchNorm's running statistics as the plain mean over ``tiles``."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        raise SystemExit("this state has no BatchNorm layers to recompute")
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative mean over every batch
    model.train()
    images = [image_tensor(t.pixels()) for t in tiles]
    for k in range(0, len(images), 4):
        batch, _ = model.transform(images[k : k + 4])
        model.backbone(batch.tensors)
    model.eval()


def say(name: str, f1: dict) -> None:
    a = f1["any"]
    print(f"| {name} | {a['f1']} ({a['precision']} / {a['recall']}) | {f1['mean_class_f1']} |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("state")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(2)
    ts, lab, unl, test = split(args.seed)
    colour = {name: lab_stats(tiles) for name, tiles in (("labelled", lab), ("unlabelled", unl), ("test", test))}
    print("| tiles | mean L* a* b* | mean spread within a tile |")
    print("|---|---|---|")
    for name, (m, s) in colour.items():
        print(f"| {name} | {np.round(m.mean(0), 1).tolist()} | {np.round(s.mean(0), 1).tolist()} |")
    print()
    print("| variant | any class (P / R) | mean per class |")
    print("|---|---|---|")
    say("as it is", evaluate(load_model(args.state)[0], test, ts.classes))
    target_mean, target_std = (v.mean(0) for v in colour["labelled"])
    recoloured = [Recoloured(t, target_mean, target_std) for t in test]
    say("test tiles recoloured to the labelled tiles", evaluate(load_model(args.state)[0], recoloured, ts.classes))
    for name, tiles in (("labelled", lab), ("unlabelled", unl), ("labelled + unlabelled", lab + unl)):
        model = load_model(args.state)[0]
        recompute_batchnorm(model, tiles)
        say(f"BatchNorm statistics from the {name} tiles", evaluate(model, test, ts.classes))


if __name__ == "__main__":
    main()
