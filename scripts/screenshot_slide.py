"""The README's whole-slide screenshot: a synthetic SVS (the sample's H&E on glass) opened
in the widget, its tissue mask and tile grid over it, the bundled model's cells predicted
on tissue only.

    xvfb-run -a -s "-screen 0 1600x1000x24" python scripts/screenshot_slide.py --out docs/images/slide.png
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True, help="the overview; OUT-zoomed.png: a tissue edge up close")
    ap.add_argument("--size", type=int, nargs=2, default=(4000, 3000))
    args = ap.parse_args()

    import napari
    from qtpy.QtWidgets import QApplication

    import napari_rmt.gui.widget as wm
    from napari_rmt.data.sample import load_sample
    from napari_rmt.data.synthetic import SyntheticSlide
    from napari_rmt.model.bundled import NUCLEUS
    from napari_rmt.train.checkpoint import read_checkpoint

    tmp = Path(tempfile.mkdtemp())
    wm.DEFAULT_PROJECTS = tmp / "projects"
    slide = SyntheticSlide.make(*args.size, [t.pixels() for t in load_sample()], tissue=0.35, seed=7)
    path = slide.write(tmp / "slide.svs", pixel_size=0.25)
    viewer = napari.Viewer(show=True)
    viewer.window.resize(1600, 1000)
    w = wm.RMTWidget(viewer)
    viewer.window.add_dock_widget(w, name="Cell detection (RMT)")
    w.open_large_image(path, tile=512, overlap=0)
    w.state.model_state = read_checkpoint(NUCLEUS)
    w.predict_whole_image(synchronous=True)
    w.score_slider.setValue(50)

    end = time.perf_counter() + 1.0
    while time.perf_counter() < end:
        QApplication.processEvents()
        time.sleep(0.01)
    viewer.reset_view()
    QApplication.processEvents()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    viewer.screenshot(str(args.out), canvas_only=False, flash=False)
    # up close: the left edge of the first island, where tissue meets glass
    cx, cy, rx, _ = slide.ellipses[0]
    camera = viewer.camera
    camera.center = (cy, cx - rx + 150)
    camera.zoom = 1.2
    end = time.perf_counter() + 1.0
    while time.perf_counter() < end:
        QApplication.processEvents()
        time.sleep(0.01)
    w.whole.update_in_view()
    QApplication.processEvents()
    zoomed = args.out.with_name(args.out.stem + "-zoomed.png")
    viewer.screenshot(str(zoomed), canvas_only=False, flash=False)
    print(args.out, zoomed, w.status.text())


if __name__ == "__main__":
    main()
