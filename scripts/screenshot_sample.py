"""Open the bundled sample in napari and save a screenshot for the docs.

Needs a display (run under ``xvfb-run -a`` on a headless machine):

    xvfb-run -a python scripts/screenshot_sample.py [--out docs/images/sample.png]
"""

from __future__ import annotations

import argparse
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(Path(__file__).parents[1] / "docs" / "images" / "sample.png"))
    ap.add_argument("--tile", type=int, default=0, help="which tile of the stack to show")
    args = ap.parse_args()

    import napari
    from qtpy.QtWidgets import QApplication

    viewer = napari.Viewer(show=True)
    viewer.window.resize(1100, 820)
    viewer.open_sample("napari-rmt", "consep")
    viewer.dims.set_current_step(0, args.tile)
    viewer.reset_view()
    for _ in range(5):
        QApplication.processEvents()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    viewer.screenshot(args.out, canvas_only=False, flash=False)
    viewer.close()
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
