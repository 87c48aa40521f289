"""How responsive the viewer stays: event-loop stalls while training, and tile switching.

1. Heartbeat: a 10 ms QTimer records when the Qt event loop runs while the widget trains
   in its thread worker (real CoNSeP sample tiles, the widget's own code path). The
   largest gap between beats, minus the 10 ms period, is the longest stall.
2. Tile switching: the whole CoNSeP set (656 tiles, ~28,500 boxes) opened in the
   widget; time ``show_tile`` (store sync + image + boxes) over random switches.

Needs a display: ``xvfb-run -a python benchmarks/gui_responsiveness.py``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "consep" / "annotations.json"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--iterations", type=int, default=30, help="training iterations during the heartbeat")
    ap.add_argument("--backbone", default="resnet18")
    ap.add_argument("--switches", type=int, default=60)
    ap.add_argument("--skip-heartbeat", action="store_true")
    args = ap.parse_args()

    import napari
    from qtpy.QtCore import QTimer
    from qtpy.QtWidgets import QApplication

    import napari_rmt.gui.widget as wm
    from napari_rmt.model import ModelConfig
    from napari_rmt.train import TrainConfig

    wm.DEFAULT_PROJECTS = Path(tempfile.mkdtemp()) / "projects"
    viewer = napari.Viewer(show=True)
    w = wm.RMTWidget(viewer)
    viewer.window.add_dock_widget(w)
    report: dict = {}

    if not args.skip_heartbeat:
        w.open_sample()
        beats: list[float] = []
        timer = QTimer()
        timer.setInterval(10)
        marks: list[tuple[float, int]] = []

        def beat() -> None:
            beats.append(time.perf_counter())
            marks.append((beats[-1], w.progress.value()))

        timer.timeout.connect(beat)
        cfg = TrainConfig(
            method="rmt",
            iterations=args.iterations,
            burn_in=args.iterations // 3,
            warmup=5,
            threshold=0.3,
            model=ModelConfig(backbone=args.backbone),
        )
        timer.start()
        t0 = time.perf_counter()
        w.train(config=cfg)
        while w.worker is not None:
            QApplication.processEvents()
            time.sleep(0.001)
        timer.stop()
        gaps = np.diff(beats) * 1000
        report["heartbeat"] = {
            "training_seconds": round(time.perf_counter() - t0, 1),
            "iterations": args.iterations,
            "backbone": args.backbone,
            "beats": len(beats),
            "max_gap_ms": round(float(gaps.max()), 1),
            "p99_gap_ms": round(float(np.percentile(gaps, 99)), 1),
            "median_gap_ms": round(float(np.median(gaps)), 1),
            "gaps_over_100ms": int((gaps > 100).sum()),
            "error": w.last_error,
            # where the long gaps fell: seconds since start, gap, iteration shown at its end
            "long_gaps": [
                (round(marks[i + 1][0] - t0, 2), round(float(g), 1), marks[i + 1][1])
                for i, g in enumerate(gaps)
                if g > 100
            ],
        }
        print(json.dumps(report["heartbeat"]), flush=True)

    t0 = time.perf_counter()
    w.open_coco(DATA)
    open_s = time.perf_counter() - t0
    n_boxes = sum(len(t.boxes) for t in w.project.tileset)
    rng = np.random.default_rng(0)
    times = []
    for i in rng.integers(0, len(w.project.tileset), args.switches):
        t = time.perf_counter()
        w.show_tile(int(i))
        QApplication.processEvents()
        times.append((time.perf_counter() - t) * 1000)
    report["switching"] = {
        "tiles": len(w.project.tileset),
        "boxes": n_boxes,
        "open_seconds": round(open_s, 2),
        "switches": args.switches,
        "median_ms": round(statistics.median(times), 1),
        "max_ms": round(max(times), 1),
        "p95_ms": round(float(np.percentile(times, 95)), 1),
    }
    print(json.dumps(report["switching"]), flush=True)
    viewer.close()
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
