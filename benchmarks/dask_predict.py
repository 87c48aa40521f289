"""Whole-image prediction on 1 and 2 local Dask workers against one process (issue 17).

The image: a 4 x 4 mosaic of MoNuSeg fields (4,000 x 4,000 px of real H&E, zarr on disk);
the model: the bundled nucleus model; 512 px windows with 128 px of context. Each
configuration runs as its own ``napari-rmt predict`` process, one after another, and its
wall time (start-up, cluster start and model load included) and its own "in N s" are
recorded, with the number of boxes and whether they equal the one-process boxes.

    python benchmarks/dask_predict.py --out runs/dask_predict
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from common import MONUSEG_IMAGES as FIELDS
from PIL import Image


def make(path: Path, side: int = 4) -> None:
    from napari_rmt.data.large import write_zarr_image

    names = sorted(FIELDS.glob("*.png"))[: side * side]
    rows = []
    for r in range(side):
        rows.append(np.concatenate(
            [np.asarray(Image.open(p).convert("RGB"))[:1000, :1000] for p in names[r * side : (r + 1) * side]], axis=1
        ))
    write_zarr_image(np.concatenate(rows, axis=0), path, chunks=1024)


def run(label: str, extra: list[str], image: Path, out: Path, env: dict[str, str]) -> dict:
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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    image = out / "mosaic.zarr"
    if not image.exists():
        make(image)
    env = dict(os.environ)
    results = [
        run("one_process", [], image, out, env),
        run("dask_1x2", ["--workers", "1", "--threads-per-worker", "2"], image, out, env),  # 2 torch threads
        run("dask_2x1", ["--workers", "2", "--threads-per-worker", "1"], image, out, env),
        # the same arithmetic as the 2 x 1 workers (one thread), for the byte-for-byte check
        run("one_process_1thread", [], image, out, {**env, "OMP_NUM_THREADS": "1"}),
    ]
    same = Path(results[2]["file"]).read_bytes() == Path(results[3]["file"]).read_bytes()
    same_2t = Path(results[1]["file"]).read_bytes() == Path(results[0]["file"]).read_bytes()
    report = {"machine": f"{platform.machine()}, {os.cpu_count()} cores", "image": "4,000 x 4,000 px",
              "results": results, "dask_2x1_equals_one_process_1thread": same,
              "dask_1x2_equals_one_process": same_2t}
    (out / "result.json").write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
