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
from common import CONSEP as DATA


class _StackSampler:
    """Every thread's innermost frames, sampled by a thread of its own every 5 ms.

    A gap in the samples themselves means one thread held the GIL in a C call; the
    samples around the gap say which call.
    """

    def __init__(self, period: float = 0.005) -> None:
        import sys
        import threading
        import traceback

        self.samples: list[tuple[float, dict[str, str]]] = []
        self._running = True
        main_id = threading.main_thread().ident

        def where(frame) -> str:
            return " < ".join(
                f"{Path(f.filename).name}:{f.lineno} {f.name}"
                for f in reversed(traceback.extract_stack(frame)[-6:])
            )

        def run() -> None:
            me = threading.get_ident()
            while self._running:
                frames = sys._current_frames()
                self.samples.append(
                    (
                        time.perf_counter(),
                        {
                            ("GUI" if tid == main_id else str(tid)): where(f)
                            for tid, f in frames.items()
                            if tid != me
                        },
                    )
                )
                time.sleep(period)

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._running = False
        self._thread.join()

    def report(self, start: float, end: float) -> None:
        print(f"--- gap of {1000 * (end - start):.0f} ms")
        inside = [(t, st) for t, st in self.samples if start <= t <= end]
        times = [t for t, _ in inside]
        if len(times) > 1:
            print(f"    sampler's own longest gap inside: {1000 * float(np.diff(times).max()):.0f} ms")
        last = None
        for t, st in inside:
            gui = st.get("GUI", "")
            others = " || ".join(v for k, v in st.items() if k != "GUI" and "napari_rmt" in v)
            if (gui, others) != last:
                print(f"  +{1000 * (t - start):5.0f} ms GUI: {gui}\n             worker: {others}")
                last = (gui, others)


class _PaintLog:
    """Which widgets Qt painted, and when (an application-wide event filter)."""

    def __init__(self, app) -> None:
        from qtpy.QtCore import QEvent, QObject

        log = self.log = []

        class Filter(QObject):
            def eventFilter(self, obj, ev):
                kind = ev.type()
                if kind in (QEvent.Type.Paint, QEvent.Type.LayoutRequest, QEvent.Type.Resize):
                    chain, w = [], obj
                    while w is not None and len(chain) < 5:
                        chain.append(type(w).__name__)
                        w = w.parent() if hasattr(w, "parent") else None
                    log.append((time.perf_counter(), kind.name, type(obj).__name__, "<".join(chain)))
                return False

        self._filter = Filter()
        app.installEventFilter(self._filter)

    def report(self, start: float, end: float) -> None:
        from collections import Counter

        inside = Counter((k, c) for t, k, c, _ in self.log if start - 0.05 <= t <= end)
        print("    Qt events in the gap:", dict(inside.most_common(12)))
        for t, k, _, chain in [e for e in self.log if start - 1.0 <= e[0] <= end and e[1] == "LayoutRequest"][
            :12
        ]:
            print(f"      +{1000 * (t - start):5.0f} ms {k} {chain}")


def _settle(app, seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        app.processEvents()
        time.sleep(0.005)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--iterations", type=int, default=30, help="training iterations during the heartbeat")
    ap.add_argument("--backbone", default="resnet18")
    ap.add_argument("--switches", type=int, default=60)
    ap.add_argument("--skip-heartbeat", action="store_true")
    ap.add_argument(
        "--trace-stalls",
        action="store_true",
        help="sample every thread's stack each 5 ms and print where the GUI thread was during long gaps",
    )
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
        # Let the viewer finish showing the sample (layer controls, first draws) as it
        # would before a user clicks Train: that work is not training's.
        _settle(QApplication, 3.0)
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
        sampler = _StackSampler() if args.trace_stalls else None
        painter = _PaintLog(QApplication.instance()) if args.trace_stalls else None
        timer.start()
        t0 = time.perf_counter()
        w.train(config=cfg)
        while w.worker is not None:
            QApplication.processEvents()
            time.sleep(0.001)
        timer.stop()
        if sampler is not None:
            sampler.stop()
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
        if sampler is not None:
            for i in np.where(gaps > 100)[0]:
                sampler.report(beats[i], beats[i + 1])
                painter.report(beats[i], beats[i + 1])

    if args.switches == 0:
        viewer.close()
        return
    t0 = time.perf_counter()
    w.open_coco(DATA)
    open_s = time.perf_counter() - t0
    _settle(QApplication, 3.0)  # the viewer's first draws of the opened set are the open's, not a switch's
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
        "slowest_ms": [round(t, 1) for t in sorted(times)[-5:]],
        "first_ms": round(times[0], 1),
    }
    print(json.dumps(report["switching"]), flush=True)
    viewer.close()
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
