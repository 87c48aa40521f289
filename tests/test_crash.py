"""Kill -9 at random points: what was saved before the kill is all there after it.

A child process autosaves a project (adding a box before every save), trains with a
checkpoint every step, or predicts, and is killed with SIGKILL at a random moment
(seeded). After each kill the project reopens with every box whose save had returned,
each output is either absent, the old complete file or the new complete one, and
training resumes from its checkpoint.

The counts are small in the default run; ``NAPARI_RMT_KILLS=20`` (and
``NAPARI_RMT_CRASH_REPORT=FILE`` for the figures) is the benchmark of docs/benchmarks.md.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

KILLS = int(os.environ.get("NAPARI_RMT_KILLS", "0"))
REPORT: dict[str, dict[str, int]] = {}

AUTOSAVER = textwrap.dedent(
    """
    import os, sys
    from pathlib import Path
    import numpy as np
    from napari_rmt.data import Boxes, Tile, TileSet
    from napari_rmt.data.project import Project

    folder, ledger = Path(sys.argv[1]), Path(sys.argv[2])
    if Project.is_project(folder):
        project = Project.open(folder)
    else:
        rng = np.random.default_rng(0)
        tiles = [Tile(id=i + 1, name=f"t{i}", width=64, height=64,
                      loader=lambda a=rng.integers(0, 255, (64, 64, 3), dtype=np.uint8): a) for i in range(4)]
        project = Project(TileSet(tiles), folder)
    tiles = list(project.tileset)
    n = sum(len(t.boxes) for t in tiles)
    while True:
        t = tiles[n % len(tiles)]
        x = float(n % 50)
        t.boxes = Boxes(np.vstack([t.boxes.xyxy, [[x, 1, x + 5, 9]]]), [*t.boxes.class_ids, 1])
        t.predictions = Boxes([[2, 2, 8, 8]] * (n % 7), [2] * (n % 7), scores=[0.5] * (n % 7))
        project.save()
        n += 1
        with open(ledger, "a") as fh:  # written only once the save has returned
            fh.write(f"{n}\\n")
            fh.flush()
            os.fsync(fh.fileno())
    """
)


def _kill_after(cmd: list[str], delay: float, cwd: Path, after_write: Path | None = None) -> None:
    """Start ``cmd`` and SIGKILL it ``delay`` seconds later; with ``after_write``, the delay
    counts from the moment that file is (re)written, so that a slow machine's start-up
    (importing torch) does not let every kill land before the first checkpoint."""
    before = after_write.stat().st_mtime_ns if after_write is not None and after_write.exists() else None
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    if after_write is not None:
        deadline = time.perf_counter() + 120
        while time.perf_counter() < deadline and proc.poll() is None:
            if after_write.exists() and after_write.stat().st_mtime_ns != before:
                break
            time.sleep(0.05)
    time.sleep(delay)
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait()


def _record(name: str, **counts: int) -> None:
    REPORT[name] = counts
    out = os.environ.get("NAPARI_RMT_CRASH_REPORT")
    if out:
        Path(out).write_text(json.dumps(REPORT, indent=1))


def test_autosaving_project_killed_at_random_keeps_every_saved_box(tmp_path):
    from napari_rmt.data.project import Project

    kills = KILLS or 20
    script = tmp_path / "autosave.py"
    script.write_text(AUTOSAVER)
    folder, ledger = tmp_path / "proj", tmp_path / "ledger.txt"
    rng = random.Random(0)
    reopen_failures = lost = 0
    for _ in range(kills):
        _kill_after([sys.executable, str(script), str(folder), str(ledger)], rng.uniform(0.4, 1.5), tmp_path)
        confirmed = int(ledger.read_text().split()[-1]) if ledger.is_file() and ledger.read_text().split() else 0
        try:
            project = Project.open(folder)
        except Exception:
            reopen_failures += 1
            continue
        n = sum(len(t.boxes) for t in project.tileset)
        # every save that returned is there; the one in progress may or may not be
        lost += max(0, confirmed - n)
        assert confirmed <= n <= confirmed + 1, (confirmed, n)
        assert not project.problems, project.problems
    _record("project autosave", kills=kills, reopen_failures=reopen_failures, boxes_lost=lost)
    assert reopen_failures == 0 and lost == 0
    assert confirmed > kills  # the child did save between the kills


@pytest.fixture
def tiny_coco(tmp_path):
    from conftest import make_coco

    return make_coco(tmp_path / "data", n_images=4, size=(64, 64))


def test_training_and_prediction_killed_at_random_leave_whole_files_and_resume(tmp_path, tiny_coco):
    from napari_rmt.train import read_checkpoint

    kills = KILLS or 3
    exe = [sys.executable, "-m", "napari_rmt.cli"]
    run = tmp_path / "run"
    train = [*exe, "train", "--coco", str(tiny_coco), "--method", "rmt+", "--labeled-fraction", "0.5",
             "--iterations", "100000", "--burn-in", "3", "--batch", "1", "--warmup", "1",
             "--checkpoint-every", "1", "--out", str(run)]
    rng = random.Random(1)
    broken = 0
    last_iteration = 0
    for k in range(kills):
        fresh = k == 0 or not (run / "model.pt").is_file()
        cmd = [*train, "--overwrite"] if fresh else [*train, "--resume", str(run / "model.pt")]
        _kill_after(cmd, rng.uniform(0.0, 3.0), tmp_path, after_write=run / "model.pt")
        if (run / "model.pt").is_file():
            try:
                ckpt = read_checkpoint(run / "model.pt")
            except Exception:
                broken += 1
                continue
            assert ckpt["iteration"] >= last_iteration  # never a step back
            last_iteration = ckpt["iteration"]
    assert last_iteration > 0, "the child never wrote a checkpoint: kill later"
    # --resume continues where the last checkpoint left it
    done = subprocess.run([*train[:-2], "--out", str(run), "--resume", str(run / "model.pt"), "--iterations",
                           str(last_iteration + 2)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert read_checkpoint(run / "model.pt")["iteration"] == last_iteration + 2
    events = [json.loads(x) for x in (run / "events.jsonl").read_text().splitlines()]
    steps = [e["iteration"] for e in events if e["event"] == "IterationEvent"]
    assert len(steps) == len(set(steps)), "replayed steps logged twice"

    # prediction: the results file is absent or whole, never half written
    out = tmp_path / "pred.json"
    predict = [*exe, "predict", "--model", str(run / "model.pt"), "--coco", str(tiny_coco), "--out", str(out)]
    half = 0
    for _ in range(max(2, kills // 2)):
        _kill_after(predict, rng.uniform(2.0, 6.0), tmp_path)  # before, during or after the write
        if out.is_file():
            try:
                json.loads(out.read_text())
            except json.JSONDecodeError:
                half += 1
    leftovers = [p.name for p in tmp_path.glob(".pred.json.*")]
    _record("training", kills=kills, broken_checkpoints=broken, last_iteration=last_iteration)
    _record("prediction", kills=max(2, kills // 2), half_written=half, temp_files_left=len(leftovers))
    assert broken == 0 and half == 0
