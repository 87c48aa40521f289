"""Screenshots of the large-image workflow, for docs/.

Opens a MoNuSeg 1000 x 1000 field (../shared/data, research use; see its README) as a
large image cut into 256 px tiles, marks one tile annotated, loads a trained model and
predicts the whole field in the widget's thread worker; then zooms in so that the
boxes in view are drawn as rectangles.

    xvfb-run -a python scripts/screenshot_large.py --model runs/learn/supervised/model.pt
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

IMAGE = (
    Path(__file__).resolve().parents[2]
    / "shared"
    / "data"
    / "monuseg"
    / "images"
    / "TCGA-21-5784-01Z-00-DX1.png"
)
OUT = Path(__file__).resolve().parents[1] / "docs" / "images"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--image", default=str(IMAGE))
    args = ap.parse_args()

    from napari_rmt.gui._guard import guard_triton

    guard_triton()
    import napari
    from qtpy.QtWidgets import QApplication

    from napari_rmt.data import TileSet
    from napari_rmt.data.tiles import grid_tiles
    from napari_rmt.gui import widget as widget_mod
    from napari_rmt.gui.session import camera_of
    from napari_rmt.gui.widget import RMTWidget
    from napari_rmt.train.checkpoint import classes_from_checkpoint, read_checkpoint

    widget_mod.DEFAULT_PROJECTS = Path(tempfile.mkdtemp()) / "projects"
    ckpt = read_checkpoint(args.model)
    viewer = napari.Viewer(show=True)
    viewer.window.resize(1500, 1000)
    w = RMTWidget(viewer)
    viewer.window.add_dock_widget(w, name="Cell detection (RMT)")

    def settle(seconds: float = 1.0) -> None:
        end = time.time() + seconds
        while time.time() < end:
            QApplication.processEvents()
            time.sleep(0.02)

    def shot(name: str) -> None:
        settle()
        OUT.mkdir(parents=True, exist_ok=True)
        viewer.screenshot(str(OUT / name), canvas_only=False, flash=False)
        print("wrote", OUT / name)

    # the model's classes, so that its predictions are named as it learnt them
    path = Path(args.image)
    w.set_tileset(TileSet(grid_tiles(path, tile=256), classes_from_checkpoint(ckpt)), path.stem)
    w.show_tile(5)
    w.labelled_box.setChecked(True)
    w.model_state = ckpt
    camera_of(viewer).center = (500, 500)
    camera_of(viewer).zoom = 0.8
    shot("large-1-grid.png")
    w.predict_whole_image()
    while w.worker is not None:
        settle(0.5)
    camera_of(viewer).center = (500, 500)
    camera_of(viewer).zoom = 0.8
    shot("large-2-whole-predictions.png")
    camera_of(viewer).center = (620, 420)
    camera_of(viewer).zoom = 4.0
    settle(0.5)
    shot("large-3-zoomed.png")
    viewer.close()


if __name__ == "__main__":
    main()
