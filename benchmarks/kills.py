"""SIGKILL at random moments: does every run stay resumable and every project openable? (issue 33)

``train``: ``napari-rmt train`` on the bundled sample (rmt+, a checkpoint every 2 steps,
so that kills land in checkpoint writes too) is killed at a random moment ``--kills``
times, each restart resuming the last run (``--resume``). After each kill the run folder
must hold a readable training state and a loadable model once the first checkpoint
exists, the step count must never go back, and no orphaned temporary file may outlive
the next start (which sweeps them).

``project``: a process saves a project folder over and over, one more box each time,
printing the box count of each save it finished; it is killed at a random moment
``--kills`` times. After each kill the folder must open (``Project.open``) with all the
boxes of the last finished save, or of the one in flight, never fewer; and the temporary
files a kill left must be gone after the next start (whose first save sweeps them).

    python benchmarks/kills.py train --kills 50 --out runs/kills
    python benchmarks/kills.py project --kills 50 --out runs/kills
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

from napari_rmt.data.sample import load_sample, sample_annotations


def _temporaries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob(".*.tmp"))


def _kill_after(cmd: list[str], seconds: float) -> str:
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        out, _ = proc.communicate(timeout=seconds)
        return out  # ended by itself before the kill
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGKILL)
        out, _ = proc.communicate()
        return out


def kill_training(out: Path, kills: int, rng: random.Random) -> dict:
    from napari_rmt.train.checkpoint import load_model, read_training_state

    run = out / "run"
    first = [sys.executable, "-m", "napari_rmt.cli", "train", "--coco", str(sample_annotations()),
             "--method", "rmt+", "--labeled-fraction", "0.5", "--iterations", "100000", "--batch", "1",
             "--checkpoint-every", "2", "--out", str(run)]
    rows, last_step, orphans_after_start, unreadable, went_back = [], -1, 0, 0, 0
    for k in range(kills):
        state = run / "training.pt"
        cmd = first if not state.exists() else [*first[:-2], "--resume", str(run), "--out", str(run)]
        before = _temporaries(run) if run.exists() else []
        wait = rng.uniform(4.0, 16.0)  # imports take ~4 s; then steps and checkpoint writes
        said = _kill_after(cmd, wait)
        step = None
        if state.exists():
            try:
                step = int(read_training_state(run)["iteration"])
                load_model(run / "model.pt")
            except Exception as exc:
                unreadable += 1
                print(f"kill {k}: unreadable after the kill: {exc}", flush=True)
            if step is not None and step < last_step:
                went_back += 1
            last_step = max(last_step, step if step is not None else -1)
        # the temporaries this start found were swept by it (a kill may leave its own)
        orphans_after_start += len(set(before) & set(_temporaries(run)))
        rows.append({"kill": k, "after_s": round(wait, 1), "step": step, "temporaries": len(_temporaries(run))})
        print(json.dumps(rows[-1]), said.strip().splitlines()[-1:] if said.strip() else "", flush=True)
    return {"kills": kills, "unreadable_states": unreadable, "step_went_back": went_back,
            "orphans_surviving_a_start": orphans_after_start, "last_step": last_step,
            "temporaries_left_now": len(_temporaries(run)), "rows": rows}


_SAVER = r"""
import sys
import numpy as np
from napari_rmt.data import Boxes
from napari_rmt.data.project import Project
folder = sys.argv[1]
project = Project.open(folder)
tile = project.tileset[0]
while True:
    x = float(len(tile.boxes) % 200)
    tile.boxes = Boxes.concatenate([tile.boxes, Boxes([[x, x, x + 8, x + 8]], [int(tile.boxes.class_ids[0])])])
    project.save()
    print(sum(len(t.boxes) for t in project.tileset), flush=True)
"""


def kill_project(out: Path, kills: int, rng: random.Random) -> dict:
    from napari_rmt.data.project import Project

    folder = out / "project"
    project = Project(load_sample(), folder)
    project.save()
    count = sum(len(t.boxes) for t in project.tileset)
    rows, failures, orphans_after_start = [], 0, 0
    for k in range(kills):
        wait = rng.uniform(2.0, 6.0)
        before = _temporaries(folder)
        said = _kill_after([sys.executable, "-c", _SAVER, str(folder)], wait)
        orphans_after_start += len(set(before) & set(_temporaries(folder)))
        done = [int(x) for x in said.split() if x.isdigit()]
        finished = done[-1] if done else count
        try:
            opened = sum(len(t.boxes) for t in Project.open(folder).tileset)
            ok = finished <= opened <= finished + 1
        except Exception as exc:
            opened, ok = None, False
            print(f"kill {k}: the project does not open: {exc}", flush=True)
        failures += not ok
        count = opened if opened is not None else count
        rows.append({"kill": k, "after_s": round(wait, 1), "saves": len(done), "finished": finished,
                     "opened": opened, "ok": ok, "temporaries": len(_temporaries(folder))})
        print(json.dumps(rows[-1]), flush=True)
    return {"kills": kills, "failures": failures, "boxes_now": count, "orphans_surviving_a_start": orphans_after_start,
            "temporaries_left_now": len(_temporaries(folder)), "rows": rows}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=("train", "project"))
    ap.add_argument("--kills", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(args.seed)
    t0 = time.perf_counter()
    result = kill_training(out, args.kills, rng) if args.what == "train" else kill_project(out, args.kills, rng)
    result.update(seconds=round(time.perf_counter() - t0), machine=f"{platform.machine()}, {os.cpu_count()} cores")
    (out / f"{args.what}.json").write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k != "rows"}, indent=1))


if __name__ == "__main__":
    main()
