"""The ``napari-rmt`` command line: the same core as the GUI, for scripts and servers.

Errors about the user's input (``NapariRmtError``) are printed as one line naming the
file and the item, with exit status 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

from . import __version__
from .data.errors import DataWarning, NapariRmtError


def _cmd_demo(args: argparse.Namespace) -> int:
    from .data.coco import write_coco
    from .data.geojson import write_geojson
    from .data.sample import load_sample

    out = Path(args.out)
    tileset = load_sample()
    coco_path = write_coco(tileset, out / "annotations.json")
    geo_path = write_geojson(tileset, out / "annotations.geojson")
    counts = ", ".join(f"{k} {v}" for k, v in tileset.counts_by_class().items())
    print(f"sample: {len(tileset)} tiles, {counts}")
    print(f"wrote {coco_path}")
    print(f"wrote {geo_path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="napari-rmt",
        description="Semi-supervised cell detection (Robust Mean Teacher) for H&E tiles.",
    )
    parser.add_argument("--version", action="version", version=f"napari-rmt {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="run the main job on the bundled CoNSeP sample")
    demo.add_argument("--out", default="demo_out", help="output folder (default: demo_out)")
    demo.set_defaults(func=_cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    with warnings.catch_warnings():
        warnings.simplefilter("always", DataWarning)
        warnings.showwarning = _show_data_warning  # one clean line per repaired item
        try:
            return int(args.func(args) or 0)
        except NapariRmtError as exc:
            print(f"napari-rmt: error: {exc}", file=sys.stderr)
            return 2


def _show_data_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"napari-rmt: warning: {message}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
