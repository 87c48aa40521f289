"""Peak memory of whole-image prediction on a synthetic 20,000 x 20,000 image (zarr on disk).

Three steps, each in its own process so that the figure is prediction's alone:

1. ``make``: a synthetic H&E-like image (pink stroma, dark purple nuclei of 8-24 px) is
   written chunk by chunk to ``OUT/image.zarr`` (1.2 GB of pixels; never all in memory),
   with the true nucleus boxes in ``OUT/truth.npy``.
2. ``train``: a small detector (MobileNetV3-FPN, random init) learns the synthetic
   nuclei from 256 px crops of the image's first rows, so that its proposals are
   nuclei, as a real model's would be (an untrained model proposes everywhere).
3. ``predict``: ``predict_large_image`` over the whole image; the process's peak
   resident memory (``ru_maxrss``), time, windows and boxes are written to
   ``OUT/result.json``, with the recall of the true nuclei and the duplicate count.

    python benchmarks/large_image_memory.py --size 20000 --out runs/large20k

``slide`` (issue 36): a synthetic SVS of ``--size`` px, islands of CoNSeP's H&E on glass
covering ``--tissue`` of it (``napari_rmt.data.synthetic``), predicted by ``napari-rmt
predict --model nucleus`` once with the tissue mask and once over the whole field, each in
its own process one after the other: wall time, peak memory, windows, and whether the
boxes on tissue are the same.

    python benchmarks/large_image_memory.py slide --size 8000 --out runs/slide8k

``dask`` (issue 17; was ``dask_predict.py``): a 4 x 4 mosaic of MoNuSeg fields (4,000 x
4,000 px, zarr), the bundled model, 512 px windows with 128 px of context, predicted in one
process, on one Dask worker with 2 threads, on 2 workers of 1 thread, and in one process
with 1 thread; each its own ``napari-rmt predict`` process, one after another: wall time
(start-up, cluster start and model load included), its own "in N s", the boxes, and
whether they equal the one-process boxes byte for byte.

    python benchmarks/large_image_memory.py dask --out runs/dask_predict

``windows`` (issue 36): the slide of ``slide`` predicted with the mask at window sizes
``--sizes`` in turn for ``--rounds`` rounds (128 px of context each): seconds, peak memory,
and how the boxes agree with the first size's. A window reads its context too (a 512 px
window reads 768 px: 2.25 times the pixels it answers for, 1.56 for a 1024 px one).

    python benchmarks/large_image_memory.py windows --out runs/slide8k --rounds 2

``backends`` (issue 36): tiles per second of the bundled model at batch 8 on ``--tiles``
256 px CoNSeP tiles for every backend ``predict --backend`` offers
(``napari_rmt.model.backends``), in one process, the backends taking turns for
``--rounds`` rounds so that each sees the same machine (the median round is reported);
and whether each one's boxes match the ``torch`` backend's (a box of the same class at IoU
>= 0.9, both ways; the issue's bar is 99 %).

    python benchmarks/large_image_memory.py backends --out runs/backends
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

CHUNK = 1000  # generation chunks: deliberately not the window size, so cells cross windows


def make(out: Path, size: int, seed: int) -> None:
    import zarr

    z = zarr.open(
        str(out / "image.zarr"), mode="w", shape=(size, size, 3), chunks=(1024, 1024, 3), dtype="u1"
    )
    truth = []
    n_side = (size + CHUNK - 1) // CHUNK
    for cy in range(n_side):
        for cx in range(n_side):
            rng = np.random.default_rng(seed * 100_003 + cy * n_side + cx)
            h, w = min(CHUNK, size - cy * CHUNK), min(CHUNK, size - cx * CHUNK)
            yy, xx = np.mgrid[0:h, 0:w]
            base = np.empty((h, w, 3), dtype=np.float32)
            base[..., 0], base[..., 1], base[..., 2] = 232, 180, 205
            base += rng.normal(0, 6, size=(h, w, 1)).astype(np.float32)
            for _ in range(int(rng.integers(250, 450))):
                rx, ry = rng.uniform(4, 12, size=2)
                x, y = rng.uniform(rx, w - rx), rng.uniform(ry, h - ry)
                x0, x1 = int(x - rx), int(np.ceil(x + rx))
                y0, y1 = int(y - ry), int(np.ceil(y + ry))
                inside = ((xx[y0:y1, x0:x1] - x) / rx) ** 2 + ((yy[y0:y1, x0:x1] - y) / ry) ** 2 <= 1
                colour = np.array([95, 60, 140], np.float32) + rng.normal(0, 10, 3).astype(np.float32)
                base[y0:y1, x0:x1][inside] = colour
                truth.append(
                    (cx * CHUNK + x - rx, cy * CHUNK + y - ry, cx * CHUNK + x + rx, cy * CHUNK + y + ry)
                )
            z[cy * CHUNK : cy * CHUNK + h, cx * CHUNK : cx * CHUNK + w] = np.clip(base, 0, 255).astype(
                np.uint8
            )
    np.save(out / "truth.npy", np.array(truth, dtype=np.float32))
    print(f"wrote {size}x{size} image with {len(truth)} nuclei to {out / 'image.zarr'}", flush=True)


def train(out: Path, iterations: int) -> None:
    import torch

    from napari_rmt.data import Boxes, ClassList
    from napari_rmt.data.boxes import boxes_in_window
    from napari_rmt.data.large import open_large_image
    from napari_rmt.data.tiles import TileStatus, grid_tiles
    from napari_rmt.model import ModelConfig
    from napari_rmt.train import TrainConfig, Trainer

    image = open_large_image(out / "image.zarr")
    truth = np.load(out / "truth.npy").astype(np.float64)
    boxes = Boxes(xyxy=truth, class_ids=np.ones(len(truth), dtype=np.int64))
    tiles = [t for t in grid_tiles(image, tile=256) if t.origin[1] < 1024 and t.origin[0] < 4096]
    near = (truth[:, 1] < 1400) & (truth[:, 0] < 4500)
    for t in tiles:
        t.boxes = boxes_in_window(boxes[near], *t.origin, t.width, t.height)
        t.status = TileStatus.LABELLED
    cfg = TrainConfig(
        method="supervised", iterations=iterations, warmup=20, lr=0.02, labelled_batch=4, seed=0,
        model=ModelConfig(backbone="mobilenet_v3_large"),
    )  # fmt: skip
    trainer = Trainer(tiles, [], ClassList.from_names(["nucleus"]), cfg)
    torch.set_num_threads(2)
    for ev in trainer.run():
        if getattr(ev, "iteration", 0) % 20 == 0 and hasattr(ev, "losses"):
            print(f"train {ev.iteration}/{iterations} loss {ev.losses['total']:.3f}", flush=True)
    trainer.save(out / "model.pt")


def predict(out: Path, window: int, context: int, batch: int) -> None:
    import torch

    from napari_rmt.data.boxstore import write_boxes_zarr
    from napari_rmt.data.large import open_large_image, tile_grid
    from napari_rmt.model.wholeimage import predict_large_image
    from napari_rmt.train.checkpoint import load_model

    torch.set_num_threads(2)
    model, classes, _ = load_model(out / "model.pt")
    image = open_large_image(out / "image.zarr")
    n_windows = len(tile_grid(image.width, image.height, window, 0))
    t0 = time.perf_counter()
    last = [t0]

    def progress(done: int, total: int) -> None:
        if time.perf_counter() - last[0] > 60 or done == total:
            last[0] = time.perf_counter()
            rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
            print(f"{done}/{total} windows, {last[0] - t0:.0f} s, peak {rss:.2f} GiB", flush=True)

    boxes = predict_large_image(
        model, image, classes, window=window, context=context, batch_size=batch, progress=progress
    )
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    write_boxes_zarr(boxes, out / "pred.zarr", classes, image.size, source=str(out / "image.zarr"))
    keep = boxes.scores >= 0.5
    confident, conf_scores = boxes.xyxy[keep], boxes.scores[keep]
    truth = np.load(out / "truth.npy").astype(np.float64)
    tp, dup = _check(confident, conf_scores, truth, image.width, image.height)
    result = {
        "image": f"{image.width}x{image.height} RGB uint8 zarr, chunks 1024",
        "window": window,
        "context": context,
        "batch": batch,
        "windows": n_windows,
        "seconds": round(seconds, 1),
        "peak_rss_gib": round(peak, 3),
        "boxes": len(boxes),
        "boxes_score_ge_0.5": len(confident),
        "true_nuclei": len(truth),
        "recall_at_0.5": round(tp / max(1, len(truth)), 4),
        "precision_at_0.5": round(tp / max(1, len(confident)), 4),
        "duplicate_pairs_iou_gt_0.5": dup,
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
    }
    (out / "result.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1), flush=True)


def _check(
    pred: np.ndarray, scores: np.ndarray, truth: np.ndarray, width: int, height: int, block: int = 1000
):
    """True positives (IoU >= 0.5, one-to-one) and duplicate pairs (IoU > 0.5), block by
    block of box centres so that the matrices stay small; a pair is looked for in the
    block of its first box's centre, with a 32 px halo."""
    from napari_rmt.evaluate.metrics import iou_matrix, match_boxes

    def centres(b):
        return (b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2

    pcx, pcy = centres(pred)
    tcx, tcy = centres(truth)
    tp = dup = 0
    for y in range(0, height, block):
        for x in range(0, width, block):
            core_p = (pcx >= x) & (pcx < x + block) & (pcy >= y) & (pcy < y + block)
            core_t = (tcx >= x) & (tcx < x + block) & (tcy >= y) & (tcy < y + block)
            tp += match_boxes(pred[core_p], scores[core_p], truth[core_t], iou=0.5)
            halo = (pcx >= x - 32) & (pcx < x + block + 32) & (pcy >= y - 32) & (pcy < y + block + 32)
            idx_core, idx_halo = np.where(core_p)[0], np.where(halo)[0]
            if len(idx_core) and len(idx_halo):
                iou = iou_matrix(pred[idx_core], pred[idx_halo])
                later = idx_halo[None, :] > idx_core[:, None]  # each pair once
                dup += int(((iou > 0.5) & later).sum())
    return tp, dup


def measured(args: list[str], env: dict[str, str] | None = None) -> tuple[list[str], float, float]:
    """Run ``args`` as a child of a fresh Python that reports it: the child's last output
    lines, its wall seconds and its peak resident memory in GiB (``ru_maxrss``; a process of
    its own, so that the figure is the command's alone)."""
    wrapper = ("import resource, subprocess, sys, time; t = time.perf_counter(); "
               "r = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
               "print(r.stdout[-3000:], r.stderr[-500:]); print('WALL', time.perf_counter() - t); "
               "print('RSS', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    done = subprocess.run([sys.executable, "-c", wrapper, *args], capture_output=True, text=True, check=True, env=env)
    lines = done.stdout.splitlines()
    wall = float(next(x for x in lines if x.startswith("WALL")).split()[1])
    rss = int(next(x for x in lines if x.startswith("RSS")).split()[1]) / 2**20
    return lines, wall, rss


def share_matched(a: list[dict], b: list[dict]) -> float:
    """The share of ``a``'s boxes (per image: ``boxes``, ``labels``) that have a box of the
    same class at IoU >= 0.9 in ``b``'s image. ``a``'s boxes are taken 2,048 at a time: a
    whole slide's 17,697 x 17,697 IoU matrix at once needs tens of GiB in box_iou."""
    from torchvision.ops import box_iou

    hit = total = 0
    for da, db in zip(a, b, strict=True):
        total += len(da["boxes"])
        if not (len(da["boxes"]) and len(db["boxes"])):
            continue
        for lo in range(0, len(da["boxes"]), 2048):
            iou = box_iou(da["boxes"][lo : lo + 2048], db["boxes"])
            iou[da["labels"][lo : lo + 2048, None] != db["labels"][None]] = 0
            hit += int((iou.max(1).values >= 0.9).sum())
    return hit / max(total, 1)


def slide(out: Path, size: int, tissue: float, seed: int, make_only: bool = False) -> None:
    from common import CONSEP

    from napari_rmt.data.coco import read_coco
    from napari_rmt.data.synthetic import SyntheticSlide

    path = out / "slide.svs"
    t0 = time.perf_counter()
    made = SyntheticSlide.make(size, size, [t.pixels() for t in list(read_coco(CONSEP))[:64]], tissue, seed)
    if not path.exists():
        made.write(path, pixel_size=0.25)
    print(f"slide {size} px, {100 * made.tissue_share():.1f} % tissue, written in {time.perf_counter() - t0:.0f} s",
          flush=True)
    if make_only:  # written ahead, so that the timed runs can start on a machine kept free for them
        return
    runs = {}
    for mode in ("off", "on"):
        pred = out / f"pred_tissue_{mode}.json"
        args = [sys.executable, "-m", "napari_rmt.cli", "predict", "--model", "nucleus", str(path),
                "--tissue", mode, "--out", str(pred), "--overwrite"]
        lines, wall, rss = measured(args)
        runs[mode] = {
            "wall_s": round(wall, 1),
            "peak_rss_gib": round(rss, 2),
            "said": [x for x in lines if "napari-rmt" in x][-2:],
            "boxes": len(json.loads(pred.read_text())),
        }
        print(mode, runs[mode], flush=True)
    whole = {tuple(round(v, 2) for v in r["bbox"]) for r in json.loads((out / "pred_tissue_off.json").read_text())}
    masked = {tuple(round(v, 2) for v in r["bbox"]) for r in json.loads((out / "pred_tissue_on.json").read_text())}
    on_glass = [b for b in whole - masked if not made.mask(int(b[0] + b[2] / 2), int(b[1] + b[3] / 2), 1, 1)[0, 0]]
    result = {"size": size, "tissue_share": round(made.tissue_share(), 3), "runs": runs,
              "masked_subset_of_whole": masked <= whole, "only_whole": len(whole - masked),
              "only_whole_on_glass": len(on_glass), "time_ratio": round(runs["on"]["wall_s"] / runs["off"]["wall_s"], 3),
              "machine": platform.machine()}
    (out / "slide_result.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


def windows(out: Path, sizes: list[int], rounds: int, context: int) -> None:
    """The slide of ``slide`` (``OUT/slide.svs``) predicted with the mask at each window
    size in turn, ``rounds`` times (each its own ``napari-rmt predict`` process): the
    seconds ``predict`` says, the peak memory, and how the boxes of each size match the
    first size's (a box of the same class at IoU >= 0.9, both ways; and exactly equal)."""
    import torch

    path = out / "slide.svs"
    if not path.exists():
        raise SystemExit(f"{path}: make it first (large_image_memory.py slide --out {out})")
    runs: dict[int, list[dict]] = {w: [] for w in sizes}
    for r in range(rounds):
        for w in sizes:
            pred = out / f"windows_{w}.json"
            args = [sys.executable, "-m", "napari_rmt.cli", "predict", "--model", "nucleus", str(path),
                    "--tissue", "on", "--window", str(w), "--context", str(context), "--out", str(pred), "--overwrite"]
            lines, _wall, rss = measured(args)
            said = re.search(r"(\d+) boxes on \d+ images in ([\d.]+) s", "\n".join(lines))
            if said is None:
                raise SystemExit("\n".join(lines))
            runs[w].append({"round": r, "predict_s": float(said.group(2)), "boxes": int(said.group(1)),
                            "peak_rss_gib": round(rss, 2)})
            print(w, runs[w][-1], flush=True)

    def load(w):
        """The size's COCO results as one image's boxes (xyxy) and labels, and the rows."""
        rows = json.loads((out / f"windows_{w}.json").read_text())
        xywh = torch.tensor([r["bbox"] for r in rows], dtype=torch.float64).reshape(-1, 4)
        found = {"boxes": torch.cat([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], 1),
                 "labels": torch.tensor([r["category_id"] for r in rows])}
        return [found], rows

    first, first_rows = load(sizes[0])
    agree = {}
    for w in sizes[1:]:
        other, other_rows = load(w)
        exact = {(tuple(r["bbox"]), r["score"]) for r in first_rows} & {(tuple(r["bbox"]), r["score"]) for r in other_rows}
        agree[str(w)] = {
            f"of {sizes[0]}'s matched": round(100 * share_matched(first, other), 2),
            f"its matched in {sizes[0]}'s": round(100 * share_matched(other, first), 2),
            "exactly equal boxes": len(exact),
        }
    median = {str(w): float(np.median([x["predict_s"] for x in runs[w]])) for w in sizes}
    result = {"context": context, "runs": {str(w): v for w, v in runs.items()}, "median_predict_s": median,
              "vs_first": {str(w): round(median[str(w)] / median[str(sizes[0])], 3) for w in sizes},
              "boxes_vs_first": agree, "machine": f"{platform.machine()}, {os.cpu_count()} cores"}
    (out / "windows_result.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


def make_mosaic(path: Path, side: int = 4) -> None:
    """A 4 x 4 mosaic of MoNuSeg fields (4,000 x 4,000 px of real H&E) as a zarr."""
    from common import MONUSEG_IMAGES as FIELDS
    from PIL import Image

    from napari_rmt.data.large import write_zarr_image

    names = sorted(FIELDS.glob("*.png"))[: side * side]
    rows = []
    for r in range(side):
        rows.append(np.concatenate(
            [np.asarray(Image.open(p).convert("RGB"))[:1000, :1000] for p in names[r * side : (r + 1) * side]], axis=1
        ))
    write_zarr_image(np.concatenate(rows, axis=0), path, chunks=1024)


def run_predict(label: str, extra: list[str], image: Path, out: Path, env: dict[str, str]) -> dict:
    dest = out / f"{label}.json"
    cmd = [sys.executable, "-m", "napari_rmt.cli", "predict", "--model", "nucleus", str(image),
           "--window", "512", "--context", "128", "--out", str(dest), *extra]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        raise SystemExit(done.stderr[-2000:])
    said = re.search(r"(\d+) boxes on \d+ images in ([\d.]+) s", done.stdout)
    return {"run": label, "args": extra, "wall_s": round(wall, 1), "predict_s": float(said.group(2)),
            "boxes": int(said.group(1)), "file": str(dest)}


def dask(out: Path) -> None:
    image = out / "mosaic.zarr"
    if not image.exists():
        make_mosaic(image)
    env = dict(os.environ)
    results = [
        run_predict("one_process", [], image, out, env),
        run_predict("dask_1x2", ["--workers", "1", "--threads-per-worker", "2"], image, out, env),  # 2 torch threads
        run_predict("dask_2x1", ["--workers", "2", "--threads-per-worker", "1"], image, out, env),
        # the same arithmetic as the 2 x 1 workers (one thread), for the byte-for-byte check
        run_predict("one_process_1thread", [], image, out, {**env, "OMP_NUM_THREADS": "1"}),
    ]
    same = Path(results[2]["file"]).read_bytes() == Path(results[3]["file"]).read_bytes()
    same_2t = Path(results[1]["file"]).read_bytes() == Path(results[0]["file"]).read_bytes()
    report = {"machine": f"{platform.machine()}, {os.cpu_count()} cores", "image": "4,000 x 4,000 px",
              "results": results, "dask_2x1_equals_one_process_1thread": same,
              "dask_1x2_equals_one_process": same_2t}
    (out / "result.json").write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))


def backends(out: Path, n_tiles: int, rounds: int) -> None:
    import torch
    from common import CONSEP

    from napari_rmt.data import read_coco
    from napari_rmt.model.backends import BACKENDS, for_inference
    from napari_rmt.model.bundled import nucleus_path
    from napari_rmt.model.predict import image_tensor, predict_images
    from napari_rmt.train.checkpoint import load_model

    torch.set_num_threads(os.cpu_count() or 1)
    tiles = list(read_coco(CONSEP))[:n_tiles]
    images = [image_tensor(t.pixels()) for t in tiles]
    models = {b: for_inference(load_model(nucleus_path())[0], b) for b in BACKENDS}
    for m in models.values():
        predict_images(m, images[:8], batch_size=8)  # warm-up (oneDNN primitives, ORT arenas)
    seconds: dict[str, list[float]] = {b: [] for b in BACKENDS}
    found: dict[str, list] = {}
    for _ in range(rounds):
        for b, m in models.items():
            t0 = time.perf_counter()
            found[b] = predict_images(m, images, batch_size=8)
            seconds[b].append(time.perf_counter() - t0)

    rows = []
    for b in BACKENDS:
        med = float(np.median(seconds[b]))
        rows.append({"backend": b, "tiles_per_s": round(len(images) / med, 2), "median_s": round(med, 2),
                     "rounds_s": [round(x, 2) for x in seconds[b]], "boxes": sum(len(d["boxes"]) for d in found[b]),
                     "of_torch_matched": round(share_matched(found["torch"], found[b]), 4),
                     "matched_in_torch": round(share_matched(found[b], found["torch"]), 4)})
    base = rows[0]["tiles_per_s"]
    for r in rows:
        r["speed_vs_torch"] = round(r["tiles_per_s"] / base, 3)
    report = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
              "threads": torch.get_num_threads(), "tiles": len(images), "batch": 8, "rounds": rounds, "results": rows}
    (out / "result.json").write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))


def codes(out: Path, sources: list[str], rounds: int, modes: list[str]) -> None:
    """The slide of ``slide`` (``OUT/slide.svs``) predicted by two or more versions of the
    code (each a ``src`` folder, e.g. of a ``git worktree`` at another commit) taking turns,
    ``rounds`` times, with the mask and without (``modes``), each its own ``napari-rmt
    predict`` process: the seconds ``predict`` says, the peak memory, and whether every
    version's boxes are the first version's exactly (box, score and class)."""
    path = out / "slide.svs"
    if not path.exists():
        raise SystemExit(f"{path}: make it first (large_image_memory.py slide --out {out})")
    runs: dict[str, list[dict]] = {}
    found: dict[str, set] = {}
    for r in range(rounds):
        for mode in modes:
            for k, src in enumerate(sources):
                key = f"{k}:{mode}"
                pred = out / f"codes_{k}_{mode}.json"
                env = {**os.environ, "PYTHONPATH": str(Path(src).resolve())}
                args = [sys.executable, "-m", "napari_rmt.cli", "predict", "--model", "nucleus", str(path),
                        "--tissue", mode, "--out", str(pred), "--overwrite"]
                lines, _wall, rss = measured(args, env)
                said = re.search(r"(\d+) boxes on \d+ images in ([\d.]+) s", "\n".join(lines))
                if said is None:
                    raise SystemExit("\n".join(lines))
                runs.setdefault(key, []).append({"round": r, "predict_s": float(said.group(2)),
                                                 "boxes": int(said.group(1)), "peak_rss_gib": round(rss, 2)})
                found[key] = {(tuple(x["bbox"]), x["score"], x["category_id"]) for x in json.loads(pred.read_text())}
                print(key, src, runs[key][-1], flush=True)
    median = {key: float(np.median([x["predict_s"] for x in v])) for key, v in runs.items()}
    result = {
        "sources": sources, "runs": runs, "median_predict_s": median,
        "vs_first": {key: round(median[key] / median[f"0:{key.split(':')[1]}"], 3) for key in runs},
        "same_boxes_as_first": {key: found[key] == found[f"0:{key.split(':')[1]}"] for key in runs},
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
    }
    (out / "codes_result.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("step", nargs="?", choices=("all", "make", "train", "predict", "slide", "windows", "dask", "backends", "codes"),
                    default="all")
    ap.add_argument("--tiles", type=int, default=64, help="backends: tiles per round")
    ap.add_argument("--rounds", type=int, default=5, help="backends: rounds")
    ap.add_argument("--sizes", type=int, nargs="+", default=[512, 1024], help="windows: the window sizes")
    ap.add_argument("--tissue", type=float, default=0.35, help="slide: the share of tissue")
    ap.add_argument("--sources", nargs="+", default=["src"], help="codes: the versions' src folders")
    ap.add_argument("--modes", nargs="+", default=["on", "off"], choices=("on", "off"), help="codes: --tissue")
    ap.add_argument("--size", type=int, default=20000)
    ap.add_argument("--make-only", action="store_true", help="slide: write the slide and stop")
    ap.add_argument("--iterations", type=int, default=150)
    ap.add_argument("--window", type=int, default=1024)
    ap.add_argument("--context", type=int, default=64)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.step == "make":
        make(out, args.size, args.seed)
    elif args.step == "train":
        train(out, args.iterations)
    elif args.step == "predict":
        predict(out, args.window, args.context, args.batch)
    elif args.step == "slide":
        slide(out, args.size, args.tissue, args.seed, args.make_only)
    elif args.step == "windows":
        windows(out, args.sizes, args.rounds, 128)
    elif args.step == "dask":
        dask(out)
    elif args.step == "codes":
        codes(out, args.sources, args.rounds, args.modes)
    elif args.step == "backends":
        backends(out, args.tiles, args.rounds)
    else:
        for step in ("make", "train", "predict"):
            subprocess.run([sys.executable, __file__, step, *sys.argv[2:]] if len(sys.argv) > 1 and sys.argv[1] == "all"
                           else [sys.executable, __file__, step, *sys.argv[1:]], check=True)  # fmt: skip


if __name__ == "__main__":
    main()
