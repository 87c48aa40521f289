"""The ``napari-rmt`` command line: the same core as the GUI, for scripts and servers.

Errors about the user's input (``NapariRmtError``) are printed as one line naming the
file and the item, with exit status 2; anything else is a bug and keeps its traceback.
Heavy imports (torch) happen inside the commands, so ``--help`` is instant.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from . import __version__
from .data.errors import DataWarning, NapariRmtError


# ------------------------------------------------------------------ progress
class ProgressBar:
    """A one-line terminal progress bar (a plain line every 5 % when not on a terminal)."""

    def __init__(self, total: int, label: str = "", stream=None, width: int = 28) -> None:
        self.total, self.label, self.width = max(1, total), label, width
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self._last_pct = -5

    def update(self, done: int, extra: str = "", eta: float | None = None) -> None:
        frac = min(1.0, done / self.total)
        pct = int(frac * 100)
        eta_s = f" ETA {_hms(eta)}" if eta is not None else ""
        if self.tty:
            filled = int(frac * self.width)
            bar = "#" * filled + "." * (self.width - filled)
            self.stream.write(f"\r{self.label} [{bar}] {done}/{self.total} {extra}{eta_s}\033[K")
            self.stream.flush()
        elif pct >= self._last_pct + 5 or done == self.total:
            self._last_pct = pct
            self.stream.write(f"{self.label} {done}/{self.total} ({pct}%) {extra}{eta_s}\n")
            self.stream.flush()

    def close(self) -> None:
        if self.tty:
            self.stream.write("\n")


def _hms(seconds: float) -> str:
    s = int(max(0, seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


# ------------------------------------------------------------------ shared pieces
def _add_training_options(p: argparse.ArgumentParser) -> None:
    from .model.detector import BACKBONES
    from .train.config import METHODS

    p.add_argument("--method", choices=METHODS, default="rmt")
    p.add_argument("--iterations", type=int, default=2000)
    p.add_argument("--burn-in", type=int, default=None, help="default: a quarter of the iterations")
    p.add_argument("--backbone", choices=BACKBONES, default="resnet18")
    p.add_argument(
        "--weights",
        default=None,
        help="'imagenet' (torchvision's weights API, downloads) or a local weights file",
    )
    p.add_argument("--full-heads", action="store_true", help="torchvision's proposal counts (slower)")
    p.add_argument("--batch", type=int, default=2, help="labelled and unlabelled images per step")
    p.add_argument("--lr", type=float, default=0.02)
    p.add_argument("--semi-lr", type=float, default=None, help="lr after burn-in (default: --lr)")
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--threshold", type=float, default=0.7, help="pseudo-label confidence")
    p.add_argument("--lambda-u", type=float, default=4.0)
    p.add_argument("--lambda-r", type=float, default=1.0)
    p.add_argument("--p-norm", type=float, default=0.5)
    p.add_argument("--ema", type=float, default=0.996, help="EMA decay sigma (Eq. 7)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--checkpoint-every", type=int, default=0)


def _config_from_args(args: argparse.Namespace):
    from .model.detector import ModelConfig
    from .train.config import TrainConfig

    burn_in = args.burn_in if args.burn_in is not None else max(1, args.iterations // 4)
    if args.method == "stac":
        burn_in = min(max(1, burn_in), args.iterations - 1)
    return TrainConfig(
        method=args.method,
        iterations=args.iterations,
        burn_in=burn_in,
        labelled_batch=args.batch,
        unlabelled_batch=args.batch,
        lr=args.lr,
        semi_lr=args.semi_lr,
        warmup=args.warmup,
        threshold=args.threshold,
        lambda_u=args.lambda_u,
        lambda_r=args.lambda_r,
        p_norm=args.p_norm,
        ema_decay=args.ema,
        seed=args.seed,
        device=args.device,
        checkpoint_every=args.checkpoint_every,
        model=ModelConfig(backbone=args.backbone, weights=args.weights, light_heads=not args.full_heads),
    )


def _event_record(ev: Any) -> dict:
    from dataclasses import asdict

    return {"event": type(ev).__name__, **asdict(ev)}


def run_training(trainer, out: Path, quiet: bool = False) -> list[dict]:
    """Drive a trainer with a progress bar; log every event to ``out/events.jsonl``."""
    from .data.atomic import atomic_write_json
    from .train.events import CheckpointEvent, FinishedEvent, IterationEvent, PhaseEvent

    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "config.json", trainer.cfg.to_dict(), indent=1)
    bar = ProgressBar(trainer.cfg.iterations, label=trainer.cfg.method, stream=sys.stderr)
    records = []
    with open(out / "events.jsonl", "a", encoding="utf-8") as log:
        try:
            for ev in trainer.run():
                rec = _event_record(ev)
                records.append(rec)
                log.write(json.dumps(rec) + "\n")
                log.flush()
                if quiet:
                    continue
                if isinstance(ev, IterationEvent):
                    extra = f"loss {ev.losses['total']:.3f}"
                    if ev.pseudo_per_image:
                        extra += f" pseudo/img {sum(ev.pseudo_per_image) / len(ev.pseudo_per_image):.1f}"
                    bar.update(ev.iteration, extra, ev.eta)
                elif isinstance(ev, PhaseEvent):
                    bar.close()
                    print(f"napari-rmt: {ev.message}", file=sys.stderr)
                elif isinstance(ev, CheckpointEvent):
                    pass
                elif isinstance(ev, FinishedEvent):
                    bar.close()
        except KeyboardInterrupt:
            trainer.cancel()
            bar.close()
            print("napari-rmt: interrupted; saving the last finished step", file=sys.stderr)
    trainer.save(out / "model.pt")
    return records


def _load_dataset(args: argparse.Namespace):
    from .data.coco import read_coco

    return read_coco(args.coco, images_dir=args.images)


# ------------------------------------------------------------------ commands
def _cmd_train(args: argparse.Namespace) -> int:
    from .data.atomic import atomic_write_json
    from .data.split import pick_labelled
    from .train.trainer import Trainer

    tileset = _load_dataset(args)
    tiles = list(tileset)
    if args.labeled_ids:
        ids = _read_ids(Path(args.labeled_ids))
        unknown = sorted(set(ids) - {t.id for t in tiles})
        if unknown:
            raise NapariRmtError(f"{args.labeled_ids}: image ids {unknown[:10]} are not in {args.coco}")
        labelled = [t for t in tiles if t.id in set(ids)]
        unlabelled = [t for t in tiles if t.id not in set(ids)]
    elif args.labeled_fraction is not None:
        labelled, unlabelled = pick_labelled(tiles, args.labeled_fraction, args.group_key, args.seed)
    else:
        labelled, unlabelled = tileset.labelled, tileset.unlabelled
    out = Path(args.out)
    cfg = _config_from_args(args)
    print(
        f"napari-rmt: {cfg.method} on {len(labelled)} labelled + {len(unlabelled)} unlabelled tiles, "
        f"{cfg.iterations} iterations, {cfg.model.backbone}"
        + (", random init" if cfg.model.weights is None else f", weights {cfg.model.weights}"),
        file=sys.stderr,
    )
    if args.resume:
        trainer = Trainer.resume(args.resume, labelled, unlabelled, checkpoint_path=out / "model.pt")
    else:
        trainer = Trainer(
            labelled,
            unlabelled,
            tileset.classes,
            cfg,
            init_from=args.init_from,
            checkpoint_path=out / "model.pt",
        )
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "labelled_ids.json", [t.id for t in labelled])
    records = run_training(trainer, out)
    fin = records[-1] if records else {}
    print(
        f"napari-rmt: {fin.get('iteration', trainer.iteration)} iterations in "
        f"{fin.get('seconds', 0):.0f} s; wrote {out / 'model.pt'}"
    )
    return 0


def _read_ids(path: Path) -> list[int]:
    if not path.is_file():
        raise NapariRmtError(f"{path}: labelled-ids file not found")
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text)
        items = data if isinstance(data, list) else None
    except json.JSONDecodeError:
        items = text.split()
    if items is None:
        raise NapariRmtError(f"{path}: expected a JSON list of image ids or one id per line")
    try:
        return [int(v) for v in items]
    except (TypeError, ValueError) as exc:
        raise NapariRmtError(f"{path}: not all entries are integer image ids ({exc})") from exc


def _cmd_predict(args: argparse.Namespace) -> int:
    from .data.atomic import atomic_write_json
    from .data.coco import write_coco_results
    from .data.imageio import image_size
    from .data.large import is_zarr_path, open_large_image, tile_grid
    from .data.tiles import Tile, TileSet
    from .model.predict import predict_tiles
    from .model.wholeimage import predict_large_image, write_boxes_zarr
    from .train.checkpoint import load_model
    from .train.trainer import resolve_device

    model, classes, _ = load_model(args.model)
    device = resolve_device(args.device)
    model.to(device)
    if args.coco:
        tileset = _load_dataset(args)
        if tileset.classes.names != classes.names:
            print(
                f"napari-rmt: note: the model's classes {classes.names} differ from the dataset's "
                f"{tileset.classes.names}; predictions use the model's",
                file=sys.stderr,
            )
        tiles = list(tileset)
    else:
        if not args.paths:
            raise NapariRmtError("give --coco ANN.json or image paths to predict")
        tiles = []
        for i, p in enumerate(args.paths, start=1):
            w, h = open_large_image(p).size if is_zarr_path(p) else image_size(p)
            tiles.append(Tile(id=i, name=Path(p).name, width=w, height=h, path=Path(p)))
    # Images larger than one window (and zarr stores) are predicted window by window
    # and stitched; the rest in batches of whole tiles.
    side = args.window + 2 * args.context
    large = [
        t for t in tiles if not args.coco and (t.width > side or t.height > side or is_zarr_path(t.path))
    ]
    small = [t for t in tiles if t not in large]
    t0 = time.perf_counter()
    if small:
        bar = ProgressBar(len(small), label="predict")
        predict_tiles(
            model,
            small,
            classes,
            batch_size=args.batch_size,
            score_threshold=args.score_threshold,
            nms_iou=args.nms,
            device=device,
            progress=lambda d, n: bar.update(d),
        )
        bar.close()
    for t in large:
        image = open_large_image(t.path)
        n_windows = len(tile_grid(image.width, image.height, args.window, args.overlap))
        bar = ProgressBar(n_windows, label=f"{t.name[:24]} windows")
        started = time.perf_counter()
        t.predictions = predict_large_image(
            model,
            image,
            classes,
            window=args.window,
            overlap=args.overlap,
            context=args.context,
            batch_size=args.batch_size,
            score_threshold=args.score_threshold,
            nms_iou=args.nms,
            device=device,
            progress=lambda d, n, b=bar, s0=started: b.update(
                d, eta=(time.perf_counter() - s0) / d * (n - d)
            ),
        )
        bar.close()
        if args.zarr:
            folder = Path(args.zarr)
            folder.mkdir(parents=True, exist_ok=True)
            store = write_boxes_zarr(
                t.predictions, folder / f"{Path(t.name).stem}.zarr", classes, image.size, source=str(t.path)
            )
            print(f"napari-rmt: {len(t.predictions)} boxes of {t.name} -> {store}")
    out_set = TileSet(tiles=[], classes=classes)
    for t in tiles:
        out_set.add(
            Tile(id=t.id, name=t.name, width=t.width, height=t.height, path=t.path, predictions=t.predictions)
        )
    out = write_coco_results(out_set, args.out)
    if not args.coco:
        atomic_write_json(
            Path(args.out).with_suffix(".images.json"),
            [{"id": t.id, "file_name": str(t.path), "width": t.width, "height": t.height} for t in tiles],
            indent=1,
        )
    n = sum(len(t.predictions) for t in tiles)
    print(f"napari-rmt: {n} boxes on {len(tiles)} images in {time.perf_counter() - t0:.1f} s; wrote {out}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .data.coco import write_coco, write_coco_results
    from .data.geojson import write_geojson
    from .data.sample import load_sample
    from .model.detector import ModelConfig
    from .model.predict import predict_tiles
    from .train.config import TrainConfig
    from .train.trainer import Trainer

    out = Path(args.out)
    tileset = load_sample()
    # One tile of each of the sample's four slide regions is 'annotated'; the other
    # twelve are unlabelled, as in the workflow the plugin is made for.
    labelled, seen = [], set()
    for t in tileset:
        if t.meta.get("source_tile") not in seen:
            seen.add(t.meta.get("source_tile"))
            labelled.append(t)
    unlabelled = [t for t in tileset if t not in labelled]
    cfg = TrainConfig(
        method="rmt",
        iterations=args.iterations,
        burn_in=max(1, args.iterations // 2),
        warmup=10,
        lr=0.01,
        labelled_batch=2,
        unlabelled_batch=2,
        seed=0,
        model=ModelConfig(backbone="mobilenet_v3_large", light_heads=True),
    )
    print(
        f"napari-rmt demo: RMT on {len(labelled)} labelled + {len(unlabelled)} unlabelled CoNSeP tiles, "
        f"{cfg.iterations} iterations ({cfg.model.backbone}, random init; a real run needs thousands)",
        file=sys.stderr,
    )
    trainer = Trainer(labelled, unlabelled, tileset.classes, cfg)
    run_training(trainer, out)
    predict_tiles(trainer.model, unlabelled, tileset.classes, score_threshold=0.05)
    write_coco(tileset, out / "annotations.json", tiles=labelled)
    write_coco_results(tileset, out / "predictions.json", tiles=unlabelled)
    write_geojson(tileset, out / "predictions.geojson", tiles=unlabelled, predictions=True)
    n = sum(len(t.predictions) for t in unlabelled)
    n50 = sum(int((t.predictions.scores > 0.5).sum()) for t in unlabelled)
    truth = sum(len(t.boxes) for t in unlabelled)
    print(
        f"napari-rmt demo: {n} predicted boxes (score > 0.05; {n50} above 0.5) on the 12 unlabelled tiles, "
        f"which hold {truth} annotated cells"
    )
    for name in ("model.pt", "annotations.json", "predictions.json", "predictions.geojson", "events.jsonl"):
        print(f"wrote {out / name}")
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from .data.atomic import atomic_write_json
    from .data.coco import read_coco, read_coco_results
    from .evaluate.metrics import coco_map, f1_scores

    dataset = read_coco(args.gt, check_files=False)
    read_coco_results(args.pred, dataset)
    tiles = list(dataset)
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
        rows[name] = {
            "f1": c.f1,
            "precision": c.precision,
            "recall": c.recall,
            "tp": c.tp,
            "n_pred": c.n_pred,
            "n_gt": c.n_gt,
            "ap50": ap,
        }
        ap_s = f"{100 * ap:8.1f}" if ap is not None else f"{'':>8}"
        print(
            f"{name:<16}{100 * c.f1:8.1f}{100 * c.precision:8.1f}{100 * c.recall:10.1f}{c.n_pred:8d}{c.n_gt:8d}{ap_s}"
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


def _cmd_experiment(args: argparse.Namespace) -> int:
    from .evaluate.experiment import ExperimentConfig, run_experiment
    from .train.events import IterationEvent

    cfg = ExperimentConfig(
        coco=args.coco,
        images=args.images,
        out=args.out,
        group_key=args.group_key,
        fractions=args.fractions,
        methods=args.methods,
        seeds=args.seeds,
        split_seed=args.split_seed,
        labelled_by_group=args.labelled_by_group,
        score_threshold=args.eval_score_threshold,
        train=_config_from_args(args),
    )
    bars: dict[str, ProgressBar] = {}

    def on_event(rid, ev):
        if isinstance(ev, IterationEvent):
            bar = bars.setdefault(rid, ProgressBar(ev.total, label=rid))
            bar.update(ev.iteration, f"loss {ev.losses['total']:.3f}", ev.eta)
            if ev.iteration == ev.total:
                bar.close()

    run_experiment(cfg, on_event=on_event, log=lambda m: print(f"napari-rmt: {m}", file=sys.stderr))
    out = Path(args.out)
    print((out / "table.md").read_text())
    for name in ("results.json", "results.csv", "table.md", "map.png"):
        if (out / name).exists():
            print(f"wrote {out / name}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="napari-rmt",
        description="Semi-supervised cell detection (Robust Mean Teacher) for H&E tiles.",
    )
    parser.add_argument("--version", action="version", version=f"napari-rmt {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train a detector on a COCO dataset")
    train.add_argument("--coco", required=True, help="COCO json of the training images")
    train.add_argument("--images", default=None, help="image folder (default: the json's folder)")
    which = train.add_mutually_exclusive_group()
    which.add_argument(
        "--labeled-fraction",
        type=float,
        default=None,
        help="label this fraction of the images; the rest are unlabelled",
    )
    which.add_argument("--labeled-ids", default=None, help="file with the labelled image ids")
    train.add_argument(
        "--group-key",
        default=None,
        help="pick labelled images by whole groups of this image field (e.g. source_tile)",
    )
    train.add_argument("--init-from", default=None, help="warm start from an earlier model.pt")
    train.add_argument("--resume", default=None, help="continue an interrupted run from its model.pt")
    train.add_argument("--out", required=True, help="run folder: model.pt, config.json, events.jsonl")
    _add_training_options(train)
    train.set_defaults(func=_cmd_train)

    pred = sub.add_parser("predict", help="predict cells with a trained model")
    pred.add_argument("--model", required=True, help="model.pt (or its run folder)")
    pred.add_argument("--coco", default=None, help="predict every image of this COCO json, keeping ids")
    pred.add_argument("--images", default=None, help="image folder for --coco")
    pred.add_argument("paths", nargs="*", help="image files (when no --coco)")
    pred.add_argument("--out", required=True, help="COCO results json")
    pred.add_argument("--score-threshold", type=float, default=0.05)
    pred.add_argument("--nms", type=float, default=0.5, help="class-agnostic NMS IoU")
    pred.add_argument("--batch-size", type=int, default=4)
    pred.add_argument("--device", default="auto")
    big = pred.add_argument_group(
        "large images",
        "image files larger than window + 2 x context (and zarr stores) are predicted in windows "
        "and stitched into whole-image boxes",
    )
    big.add_argument("--window", type=int, default=512, help="window size in pixels (default 512)")
    big.add_argument("--overlap", type=int, default=0, help="overlap between windows (default 0)")
    big.add_argument("--context", type=int, default=128, help="pixels read around each window (default 128)")
    big.add_argument("--zarr", default=None, help="also write each large image's boxes to DIR/<name>.zarr")
    pred.set_defaults(func=_cmd_predict)

    ev = sub.add_parser("evaluate", help="per-class F1 and COCO mAP of predictions against annotations")
    ev.add_argument("--gt", required=True, help="COCO json with the true boxes")
    ev.add_argument("--pred", required=True, help="COCO results json (with scores)")
    ev.add_argument("--match", choices=("iou", "centre"), default="iou")
    ev.add_argument("--iou", type=float, default=0.5)
    ev.add_argument("--radius", type=float, default=6.0, help="centre distance in pixels (--match centre)")
    ev.add_argument("--score-threshold", type=float, default=0.5)
    ev.add_argument("--json", default=None, help="also write the numbers to this json")
    ev.set_defaults(func=_cmd_evaluate)

    from .train.config import METHODS

    ex = sub.add_parser("experiment", help="rerun the paper's comparison on a COCO dataset")
    ex.add_argument("--coco", required=True)
    ex.add_argument("--images", default=None)
    ex.add_argument("--group-key", default=None, help="split by this image field (e.g. source_tile)")
    ex.add_argument("--fractions", type=float, nargs="+", default=[0.02, 0.05, 0.1, 0.2])
    ex.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    ex.add_argument("--seeds", type=int, nargs="+", default=[0])
    ex.add_argument("--split-seed", type=int, default=0)
    ex.add_argument(
        "--labelled-by-group",
        action="store_true",
        help="pick labelled images by whole groups (default: image by image, as the paper)",
    )
    ex.add_argument(
        "--eval-score-threshold",
        type=float,
        default=0.5,
        help="test predictions kept above this score for F1 (the paper: 0.5)",
    )
    ex.add_argument("--out", required=True)
    _add_training_options(ex)
    ex.set_defaults(func=_cmd_experiment)

    demo = sub.add_parser("demo", help="train RMT briefly on the bundled sample and write predictions")
    demo.add_argument("--out", default="demo_out", help="output folder (default: demo_out)")
    demo.add_argument("--iterations", type=int, default=60)
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
