"""``napari-rmt demo``: train briefly on the bundled sample and write predictions."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..data.errors import NapariRmtError
from .common import at_least, run_training

#: What the demo writes into --out.
FILES = ("model.pt", "training.pt", "annotations.json", "predictions.json", "predictions.geojson", "events.jsonl",
         "prediction.png")


def add_parser(sub) -> None:
    demo = sub.add_parser(
        "demo", help="train rmt+ briefly on the bundled sample, from the bundled nucleus model, and write predictions"
    )
    demo.add_argument("--out", default="demo_out", help="output folder (default: demo_out)")
    # 100: the fewest of 60 / 100 / 150 at which the sample's stromal cells are learnt at all
    # (stromal F1 0 % at 60 steps, 8 % at 100; any class 61 -> 64 %; docs/benchmarks.md)
    demo.add_argument("--iterations", type=at_least(1), default=100, help="training steps (default 100)")
    demo.add_argument("--init", choices=("nucleus", "none"), default="nucleus", help="default: the bundled nucleus model")
    demo.add_argument("--overwrite", action="store_true", help="replace the files of an earlier demo (or run) in --out")
    demo.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..data.atomic import check_output
    from ..data.coco import write_coco
    from ..data.geojson import write_geojson
    from ..data.results import write_coco_results
    from ..data.sample import load_sample
    from ..evaluate.metrics import f1_scores
    from ..model.bundled import LICENSE_NOTE
    from ..model.config import PREDICTION_FLOOR
    from ..model.detector import ModelConfig
    from ..model.predict import predict_tiles
    from ..train.config import TrainConfig, burn_in_for
    from ..train.trainer import Trainer

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise NapariRmtError(f"--out {out}: is a file; give a folder for the demo's files")
    for name in FILES:  # every output is checked before the work: nothing of the user's is replaced
        check_output(out / name, what="--out", overwrite=args.overwrite)
    tileset = load_sample()
    # One tile of each of the sample's four slide regions is 'annotated'; the other
    # twelve are unlabelled, as in the workflow the plugin is made for.
    labelled, seen = [], set()
    for t in tileset:
        if t.meta.get("source_tile") not in seen:
            seen.add(t.meta.get("source_tile"))
            labelled.append(t)
    unlabelled = [t for t in tileset if t not in labelled]
    cfg = TrainConfig.for_method(
        "rmt+",
        iterations=args.iterations,
        burn_in=burn_in_for(args.iterations, fraction=0.5),
        warmup=10,
        labelled_batch=2,
        unlabelled_batch=2,
        seed=0,
        init=args.init,
        checkpoint_every_s=0,
        model=ModelConfig(backbone="resnet18", focal_gamma=0.0),
    )
    start = f"the bundled nucleus model ({LICENSE_NOTE})" if args.init == "nucleus" else "random init"
    print(
        f"napari-rmt demo: rmt+ on {len(labelled)} labelled + {len(unlabelled)} unlabelled CoNSeP tiles, "
        f"{cfg.iterations} iterations of {cfg.model.backbone} from {start}",
        file=sys.stderr,
    )
    trainer = Trainer(labelled, unlabelled, tileset.classes, cfg)
    run_training(trainer, out)
    predict_tiles(trainer.model, unlabelled, tileset.classes, score_threshold=PREDICTION_FLOOR)
    write_coco(tileset, out / "annotations.json", tiles=labelled)
    write_coco_results(tileset, out / "predictions.json", tiles=unlabelled)
    write_geojson(tileset, out / "predictions.geojson", tiles=unlabelled, predictions=True)
    n = sum(len(t.predictions) for t in unlabelled)
    n50 = sum(int((t.predictions.scores > 0.5).sum()) for t in unlabelled)
    truth = sum(len(t.boxes) for t in unlabelled)
    counts = f1_scores(((t.boxes, t.predictions) for t in unlabelled), tileset.classes.ids)
    per_class = ", ".join(
        f"{c.name} {100 * counts[str(c.id)].f1:.0f} %" for c in tileset.classes if counts[str(c.id)].n_gt
    )
    print(
        f"napari-rmt demo: {n} predicted boxes (score > {PREDICTION_FLOOR}; {n50} above 0.5) on the 12 unlabelled tiles, "
        f"which hold {truth} annotated cells. F1 against them (IoU 0.5, score > 0.5): any class "
        f"{100 * counts['any'].f1:.0f} %; {per_class}"
    )
    picture(unlabelled[0], tileset.classes, out / "prediction.png")
    for name in FILES:
        print(f"wrote {out / name}")
    return 0


def picture(tile, classes, path: Path, cut: float = 0.5) -> Path:
    """The tile twice, side by side: its annotated cells (left) and the predictions above
    ``cut`` (right), each box in its class's colour."""
    from PIL import Image, ImageDraw

    pixels = Image.fromarray(tile.pixels()).convert("RGB")
    w, h = pixels.size
    scale = 2  # 256 px tiles are small on a screen
    legend = 22  # a strip under the panels: which colour is which class
    canvas = Image.new("RGB", (2 * w * scale + 8, h * scale + legend), "white")
    key = ImageDraw.Draw(canvas)
    x = 6
    for c in classes:
        key.rectangle([x, h * scale + 5, x + 12, h * scale + 17], outline=c.hex, width=3)
        key.text((x + 18, h * scale + 5), c.name, fill="black")
        x += 18 + 7 * len(c.name) + 16
    for k, boxes in enumerate((tile.boxes, tile.predictions[tile.predictions.scores > cut])):
        panel = pixels.resize((w * scale, h * scale), Image.NEAREST)
        draw = ImageDraw.Draw(panel)
        for (x0, y0, x1, y1), cid in zip(boxes.xyxy * scale, boxes.class_ids, strict=True):
            draw.rectangle([x0, y0, x1, y1], outline=classes.by_id(int(cid)).hex, width=2)
        label = "annotated" if k == 0 else f"predicted (score > {cut:g})"
        draw.rectangle([0, 0, 8 + 7 * len(label), 16], fill="white")
        draw.text((4, 2), label, fill="black")
        canvas.paste(panel, (k * (w * scale + 8), 0))
    canvas.save(path)
    return path
