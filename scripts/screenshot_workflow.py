"""Screenshots of each step of the workflow, for the README and docs/.

Opens the bundled CoNSeP sample (its own classes: tumor, stromal, lymphocyte, other) in
the widget, keeps the boxes of half of its tiles (fully annotated) and clears the others
(unlabelled), optionally loads a trained model (warm start), trains in the widget's thread
worker, then reviews and accepts predictions (the tile becomes partly annotated).

    xvfb-run -a python scripts/screenshot_workflow.py
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "docs" / "images"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--iterations", type=int, default=20)
    ap.add_argument("--method", default="rmt+")
    ap.add_argument("--threshold", type=float, default=None, help="pseudo-label threshold (default: the method's)")
    ap.add_argument("--show-score", type=float, default=None, help="score slider for the review shots")
    ap.add_argument("--detect-only", action="store_true", help="only the first shot (Detect nuclei), then quit")
    args = ap.parse_args()

    import napari
    from qtpy.QtWidgets import QApplication

    import napari_rmt.gui.widget as wm
    from napari_rmt.train import TrainConfig

    tmp = Path(tempfile.mkdtemp())
    wm.DEFAULT_PROJECTS = tmp / "projects"
    viewer = napari.Viewer(show=True)
    viewer.window.resize(1600, 1000)
    w = wm.RMTWidget(viewer)
    viewer.window.add_dock_widget(w, name="Cell detection (RMT)")
    w.open_sample()
    from napari_rmt.data import Boxes, TileStatus

    for k, t in enumerate(w.project.tileset):
        if k % 2:
            t.boxes, t.status = Boxes(), TileStatus.UNLABELLED
    w.show_tile(0)
    if args.model:
        w.load_model(args.model)

    def pump(seconds: float = 0.3) -> None:
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            QApplication.processEvents()
            time.sleep(0.01)

    def shot(name: str, reset: bool = True) -> None:
        pump()
        if reset:  # after the dock widget has taken its room, fit the tile to the canvas
            viewer.reset_view()
            pump(0.1)
        viewer.screenshot(str(OUT / name), canvas_only=False, flash=False)
        print("wrote", OUT / name, flush=True)

    OUT.mkdir(parents=True, exist_ok=True)
    # Annotation by correction: the bundled nucleus model's boxes on an empty tile.
    w.show_tile(next(i for i, t in enumerate(w.project.tileset) if not t.is_labelled))
    w.set_class("lymphocyte")
    w.detect_nuclei(synchronous=True)
    viewer.layers.selection.active = w.session.predictions
    shot("workflow-0-detect.png")
    print("status:", w.status.text(), flush=True)
    if args.detect_only:
        viewer.close()
        return
    w.show_tile(0)
    shot("workflow-1-annotate.png")

    extra = {"threshold": args.threshold} if args.threshold is not None else {}
    cfg = TrainConfig.for_method(
        args.method,
        iterations=args.iterations,
        burn_in=1 if args.model else args.iterations // 2,
        warmup=1,
        lr=0.005 if args.model else 0.02,
        model={"backbone": "resnet18", "focal_gamma": 0.0},
        init="none" if args.model else "nucleus",
        **extra,
    )
    w.tabs.setCurrentIndex(1)  # where the Train button is
    w.training.iter_spin.setValue(args.iterations)  # the form shows the run it starts
    w.training.minutes_spin.setValue(0)
    w.train(config=cfg)
    while w.worker is not None and w.progress.value() < max(2, args.iterations * 2 // 3):
        pump(0.2)
    shot("workflow-2-training.png")
    while w.worker is not None:
        pump(0.2)
    print("status:", w.status.text(), flush=True)

    unl = next(i for i, t in enumerate(w.project.tileset) if not t.is_labelled)
    w.show_tile(unl)
    if args.show_score is not None:
        w.score_slider.setValue(round(100 * args.show_score))  # else where the run left it
    viewer.layers.selection.active = w.session.predictions
    shot("workflow-3-review.png")
    w.accept_tile()
    shot("workflow-4-accepted.png")
    # Export: what the "Export COCO…" button does once its file dialog has answered.
    from napari_rmt.gui.panels.common import write_and_say

    write_and_say(w.state, w.export_annotations, str(tmp / "annotations.json"))
    shot("workflow-5-export.png")
    print("status:", w.status.text(), flush=True)
    w.save_project()
    viewer.close()


if __name__ == "__main__":
    main()
