"""``napari-rmt evaluate``: per-class F1 and COCO mAP of predictions against annotations."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..data.errors import NapariRmtError
from .common import in_range


def add_parser(sub) -> None:
    ev = sub.add_parser("evaluate", help="per-class F1 and COCO mAP of predictions against annotations")
    ev.add_argument("--gt", required=True, help="COCO json with the true boxes")
    ev.add_argument("--pred", required=True, help="COCO results json (with scores)")
    ev.add_argument("--match", choices=("iou", "centre"), default="iou")
    ev.add_argument("--iou", type=in_range(0, 1, low_open=True), default=0.5,
                    help="IoU from which a prediction matches a true box (default 0.5, the paper's)")
    ev.add_argument("--radius", type=in_range(0, 1e6, low_open=True), default=6.0, help="centre distance in pixels (--match centre)")
    ev.add_argument("--score-threshold", type=in_range(0, 1), default=0.5,
                    help="predictions scoring above this count (default 0.5, the paper's)")
    ev.add_argument("--json", default=None, help="also write the numbers to this json")
    ev.add_argument(
        "--all-images", action="store_true",
        help="score every image of --gt; by default images the predictions do not cover at all (no box, "
        "and not in the results' .images.json index) are named and left out",
    )
    ev.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..data.atomic import atomic_write_json, check_output
    from ..data.coco import read_coco
    from ..data.results import read_coco_results
    from ..evaluate.metrics import coco_map, f1_scores

    if args.json:
        check_output(args.json, [args.gt, args.pred], "--json")
    dataset = read_coco(args.gt, check_files=False)
    read_coco_results(args.pred, dataset)
    tiles = list(dataset)
    covered = {t.id for t in tiles if len(t.predictions)} | predicted_by_index(Path(args.pred), dataset)
    uncovered = [t for t in tiles if t.id not in covered]
    if uncovered and not args.all_images:
        names = ", ".join(t.name for t in uncovered[:5]) + (" …" if len(uncovered) > 5 else "")
        print(
            f"napari-rmt: {len(uncovered)} of {len(tiles)} images have no prediction at all ({names}); "
            f"scored on the other {len(tiles) - len(uncovered)} (--all-images scores every image)",
            file=sys.stderr,
        )
        tiles = [t for t in tiles if t.id in covered]
        if not tiles:
            raise NapariRmtError(f"{args.pred}: no prediction on any image of {args.gt}; nothing to score")
    pairs = [(t.boxes, t.predictions) for t in tiles]
    radius = args.radius if args.match == "centre" else None
    counts = f1_scores(
        pairs, dataset.classes.ids, iou=args.iou, score_threshold=args.score_threshold, radius=radius
    )
    maps = coco_map(pairs, dataset.classes.ids, sizes=[(t.width, t.height) for t in tiles])
    names = {str(c.id): c.name for c in dataset.classes}
    crit = f"centre within {args.radius:g} px" if radius else f"IoU >= {args.iou:g}"
    print(f"{len(tiles)} images; predictions with score > {args.score_threshold:g}, NMS; match: {crit}")
    print(f"{'class':<16}{'F1 %':>8}{'prec %':>8}{'recall %':>10}{'pred':>8}{'true':>8}{'AP50 %':>8}")
    rows = {}
    for key, c in counts.items():
        name = names.get(key, key)
        ap = maps.get(f"AP50/{key}")
        # A class with no true box in the set has no F1, recall or AP: n/a, not a zero that
        # would drag a mean down.
        absent = c.n_gt == 0
        rows[name] = {
            "f1": None if absent else c.f1,
            "precision": c.precision,
            "recall": None if absent else c.recall,
            "tp": c.tp,
            "n_pred": c.n_pred,
            "n_gt": c.n_gt,
            "ap50": ap,
        }

        def pct(v, width=8):
            return f"{'n/a':>{width}}" if v is None else f"{100 * v:{width}.1f}"

        ap_s = pct(ap) if key != "any" else f"{'':>8}"
        print(
            f"{name:<16}{pct(rows[name]['f1'])}{100 * c.precision:8.1f}{pct(rows[name]['recall'], 10)}"
            f"{c.n_pred:8d}{c.n_gt:8d}{ap_s}"
        )
    print(f"mAP {100 * maps['mAP']:.1f} %   mAP@50 {100 * maps['mAP50']:.1f} %")
    if args.json:
        atomic_write_json(
            args.json,
            {
                "classes": rows,
                "mAP": maps["mAP"],
                "mAP50": maps["mAP50"],
                "match": args.match,
                "iou": args.iou,
                "radius": radius,
                "score_threshold": args.score_threshold,
            },
            indent=1,
        )
        print(f"wrote {args.json}")
    return 0


def predicted_by_index(pred: Path, dataset) -> set[int]:
    """The images a path-mode results file says it predicted (its ``.images.json`` index),
    as ids of ``dataset`` matched by file: an image predicted with no box is covered."""
    from ..data.results import tile_of_file, tiles_by_file

    index = pred.with_suffix(".images.json")
    if not index.is_file():
        return set()
    try:
        records = json.loads(index.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise NapariRmtError(f"{index}: the results' image index cannot be read ({exc})") from exc
    if not isinstance(records, list):
        raise NapariRmtError(f"{index}: the results' image index is not a list")
    by_file = tiles_by_file(dataset)
    return {tile_of_file(r.get("file_name") if isinstance(r, dict) else None, by_file, f"{index}: [{i}]")
            for i, r in enumerate(records)}
