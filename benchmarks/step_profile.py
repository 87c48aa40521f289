"""Where a training step's time and FLOPs go, old default against new (issue 14).

For each architecture: FLOPs per part of a supervised step (``torch.utils.flop_counter``:
backbone body, FPN, RPN, box head forward; the whole step forward and backward), the forward time of
each part and the backward time, the achieved GFLOP/s against the machine's measured
fp32 matmul peak; then the FLOPs and time of an rmt+ step (after burn-in) and the
prediction throughput (tiles/s, 256 px, batch 8). Real CoNSeP tiles; the first steps
are dropped; configs run interleaved, step by step, so both see the same machine.

    python benchmarks/step_profile.py --steps 8 --out runs/step_profile.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from common import CONSEP
from torch.utils.flop_counter import FlopCounterMode

from napari_rmt.data import read_coco
from napari_rmt.model import ModelConfig, build_detector
from napari_rmt.model.predict import image_tensor, predict_images
from napari_rmt.train import IterationEvent, TrainConfig, Trainer

DATA = CONSEP
ARCHS = {
    "old (256-ch FPN, C2-C5, 1024 head)": {
        "fpn_channels": 256, "resnet_stages": 4, "box_head_dim": 1024, "anchor_sizes": (8, 16, 32, 64, 128)},
    "new (128-ch FPN, C2-C4, 512 head)": {},
}
PARTS = ("body", "fpn", "rpn", "roi_heads")


def matmul_peak(n: int = 1024, repeats: int = 20) -> float:
    """GFLOP/s of a square fp32 matmul: what this CPU can do at best."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):
        a @ b
    t0 = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * n**3 * repeats / (time.perf_counter() - t0) / 1e9


def batch(tiles, classes, k: int, start: int):
    chosen = [tiles[(start + i) % len(tiles)] for i in range(k)]
    images = [image_tensor(t.pixels()) for t in chosen]
    index = {c: i + 1 for i, c in enumerate(classes.ids)}
    targets = [{"boxes": torch.as_tensor(t.boxes.xyxy, dtype=torch.float32),
                "labels": torch.as_tensor([index[int(c)] for c in t.boxes.class_ids], dtype=torch.int64)}
               for t in chosen]
    return images, targets


def staged_step(model, images, targets) -> tuple[dict[str, float], float, torch.Tensor]:
    """One supervised step, part by part: forward seconds per part, backward seconds, loss."""
    times = {}
    il, tg = model.transform(images, targets)
    t = time.perf_counter()
    body = model.backbone.body(il.tensors)
    times["body"] = time.perf_counter() - t
    t = time.perf_counter()
    feats = model.backbone.fpn(body)
    times["fpn"] = time.perf_counter() - t
    t = time.perf_counter()
    proposals, rpn_losses = model.rpn(il, feats, tg)
    times["rpn"] = time.perf_counter() - t
    t = time.perf_counter()
    _, roi_losses = model.roi_heads(feats, proposals, il.image_sizes, tg)
    times["roi_heads"] = time.perf_counter() - t
    loss = sum(rpn_losses.values()) + sum(roi_losses.values())
    t = time.perf_counter()
    loss.backward()
    backward = time.perf_counter() - t
    return times, backward, loss


def part_flops(model, images, targets) -> dict[str, dict[str, float]]:
    """GFLOPs of each part's forward, and of the whole step's forward and backward."""
    out: dict[str, dict[str, float]] = {}
    il, tg = model.transform(images, targets)
    with FlopCounterMode(display=False) as c:
        body = model.backbone.body(il.tensors)
    out["body"] = {"forward": c.get_total_flops() / 1e9}
    with FlopCounterMode(display=False) as c:
        feats = model.backbone.fpn(body)
    out["fpn"] = {"forward": c.get_total_flops() / 1e9}
    with FlopCounterMode(display=False) as c:
        proposals, rpn_losses = model.rpn(il, feats, tg)
    out["rpn"] = {"forward": c.get_total_flops() / 1e9}
    with FlopCounterMode(display=False) as c:
        _, roi_losses = model.roi_heads(feats, proposals, il.image_sizes, tg)
    out["roi_heads"] = {"forward": c.get_total_flops() / 1e9}
    loss = sum(rpn_losses.values()) + sum(roi_losses.values())
    with FlopCounterMode(display=False) as bwd:
        loss.backward()
    model.zero_grad(set_to_none=True)
    out["total"] = {"forward": sum(v["forward"] for v in out.values()), "backward": bwd.get_total_flops() / 1e9}
    return out


def flops_only() -> None:
    """The FLOPs table alone (a count, not a timing: it may run beside other work)."""
    ds = read_coco(DATA)
    tiles, classes = list(ds), ds.classes
    images, targets = batch(tiles, classes, 4, 0)
    for name, arch in ARCHS.items():
        torch.manual_seed(0)
        model = build_detector(len(classes), ModelConfig(focal_gamma=0.0, **arch)).train()
        flops = part_flops(model, images, targets)
        print(json.dumps({name: {p: {k: round(v, 2) for k, v in f.items()} for p, f in flops.items()}}))


def rmt_step(arch: dict, tiles, classes, steps: int) -> dict:
    """Seconds and GFLOPs of rmt+ steps after burn-in, and of supervised steps of the same trainer kind."""
    res = {}
    for method in ("supervised", "rmt+"):
        cfg = TrainConfig.for_method(method, iterations=steps + 3, burn_in=1, warmup=1, lr=0.005,
                                     labelled_batch=4, unlabelled_batch=2, checkpoint_every_s=0,
                                     model={"focal_gamma": 0.0, **arch})
        trainer = Trainer(tiles[:64], tiles[64:192], classes, cfg)
        seconds, flops = [], []
        gen = trainer.run()
        for ev in gen:
            if isinstance(ev, IterationEvent) and ev.iteration == 2:
                break
        while True:
            with FlopCounterMode(display=False) as fc:
                ev = next(gen, None)
            if ev is None or not isinstance(ev, IterationEvent):
                break
            seconds.append(ev.seconds)
            flops.append(fc.get_total_flops() / 1e9)
        gen.close()
        res[method] = {"s_per_step": statistics.median(seconds), "gflop_per_step": statistics.median(flops)}
    res["ratio"] = res["rmt+"]["s_per_step"] / res["supervised"]["s_per_step"]
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=8, help="timed steps per architecture (after 2 dropped)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--flops-only", action="store_true", help="only the FLOPs per part (no timing)")
    args = ap.parse_args()
    torch.set_num_threads(2)
    if args.flops_only:
        flops_only()
        return
    torch.manual_seed(0)
    ds = read_coco(DATA)
    tiles, classes = list(ds), ds.classes
    peak = matmul_peak()
    models = {name: build_detector(len(classes), ModelConfig(focal_gamma=0.0, **arch)) for name, arch in ARCHS.items()}
    for m in models.values():
        m.train()
    fwd: dict[str, dict[str, list[float]]] = {n: {p: [] for p in PARTS} for n in models}
    bwd: dict[str, list[float]] = {n: [] for n in models}
    for step in range(args.steps + 2):  # interleaved: one step of each, in turn
        images, targets = batch(tiles, classes, 4, 4 * step)
        for name, model in models.items():
            times, backward, _ = staged_step(model, images, targets)
            model.zero_grad(set_to_none=True)
            if step >= 2:
                for p in PARTS:
                    fwd[name][p].append(times[p])
                bwd[name].append(backward)
    images, targets = batch(tiles, classes, 4, 0)
    report = {"machine": platform.machine(), "threads": torch.get_num_threads(), "torch": torch.__version__,
              "matmul_peak_gflops": round(peak, 1), "archs": {}}
    for name, model in models.items():
        flops = part_flops(model, images, targets)
        f_time = {p: statistics.median(fwd[name][p]) for p in PARTS}
        step_s = sum(f_time.values()) + statistics.median(bwd[name])
        total = flops["total"]["forward"] + flops["total"]["backward"]
        report["archs"][name] = {
            "params_M": round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
            "gflop": {p: {k: round(v, 2) for k, v in flops[p].items()} for p in (*PARTS, "total")},
            "forward_s": {p: round(v, 3) for p, v in f_time.items()},
            "backward_s": round(statistics.median(bwd[name]), 3),
            "step_s": round(step_s, 3),
            "achieved_gflops": round(total / step_s, 1),
            "share_of_peak": round(total / step_s / peak, 2),
        }
        model.eval()
        pred_images = [image_tensor(t.pixels()) for t in tiles[:32]]
        predict_images(model, pred_images[:8], batch_size=8)
        t0 = time.perf_counter()
        predict_images(model, pred_images, batch_size=8)
        report["archs"][name]["predict_tiles_per_s"] = round(len(pred_images) / (time.perf_counter() - t0), 2)
        report["archs"][name]["rmt"] = rmt_step(ARCHS[name], tiles, classes, max(3, args.steps // 2))
    names = list(models)
    old, new = report["archs"][names[0]], report["archs"][names[1]]
    report["speedup_step"] = round(old["step_s"] / new["step_s"], 2)
    report["speedup_predict"] = round(new["predict_tiles_per_s"] / old["predict_tiles_per_s"], 2)
    print(json.dumps(report, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
