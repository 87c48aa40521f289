"""Does ``channels_last`` speed up a training step on this CPU? (issue 14, item 3)

The default detector twice (same seed), one with ``ModelConfig.channels_last`` (the
default since this probe: ``build_detector`` converts 4-D weights with
``model.to(memory_format=torch.channels_last)``, and the convolutions then produce
channels-last activations from the ordinary input batch), the other without; each taking SGD steps on
the same 4 labelled CoNSeP tiles of seed 0's split, interleaved step by step so that both
see the same machine; medians after 2 dropped steps.

    python benchmarks/channels_last.py --steps 10
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from semi_wins import as_batch, interleaved_step_times, split

from napari_rmt.model import ModelConfig
from napari_rmt.model.detector import build_detector


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=10)
    args = ap.parse_args()
    torch.set_num_threads(2)
    ts, lab, _unl, _test = split(0)
    images, targets = as_batch(lab[:4], ts.classes)
    models = {}
    for layout in ("contiguous", "channels_last"):
        torch.manual_seed(0)
        cfg = ModelConfig(backbone="resnet18", focal_gamma=0.0, channels_last=layout == "channels_last")
        model = build_detector(len(ts.classes), cfg).train()
        models[layout] = (model, torch.optim.SGD(model.parameters(), lr=0.001))
    times = interleaved_step_times(models, images, targets, args.steps)
    med = {k: round(statistics.median(v), 3) for k, v in times.items()}
    print({**med, "speed-up": round(med["contiguous"] / med["channels_last"], 2)}, flush=True)
    # prediction: tiles per second at batch 8 (8 test tiles), the same interleaving
    tiles = [torch.from_numpy(t.pixels()).permute(2, 0, 1).float() / 255 for t in _test[:8]]
    rates: dict[str, list[float]] = {k: [] for k in models}
    with torch.no_grad():
        for step in range(args.steps):
            for layout, (model, _opt) in models.items():
                model.eval()
                t0 = time.perf_counter()
                model(tiles)
                if step >= 2:
                    rates[layout].append(len(tiles) / (time.perf_counter() - t0))
    med = {k: round(statistics.median(v), 2) for k, v in rates.items()}
    print({"tiles/s": med, "speed-up": round(med["channels_last"] / med["contiguous"], 2)})


if __name__ == "__main__":
    main()
