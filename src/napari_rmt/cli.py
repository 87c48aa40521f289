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
def _at_least(low: int):
    """An argparse type: an integer >= ``low``, with the allowed range in the message."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{value} must be at least {low}")
        return value

    return parse


def _in_range(low: float, high: float, low_open: bool = False):
    """An argparse type: a finite number in [low, high] (or (low, high] with ``low_open``)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not (low < value if low_open else low <= value) or not value <= high:
            raise argparse.ArgumentTypeError(f"{value} must be in {'(' if low_open else '['}{low}, {high}]")
        return value

    return parse


def _add_training_options(p: argparse.ArgumentParser) -> None:
    """Training options. Unset ones take the method's default (``TrainConfig.for_method``),
    so ``--method rmt`` is the paper's method and ``--method rmt+`` the recommended recipe."""
    from .model.config import BACKBONES
    from .train.config import METHODS, PSEUDO_RULES, RECOMMENDED, SCHEDULES

    p.add_argument("--method", choices=METHODS, default=None, help=f"default {RECOMMENDED}")
    p.add_argument("--iterations", type=_at_least(1), default=None, help="default 2000")
    p.add_argument("--burn-in", type=int, default=None, help="default: a quarter of the iterations")
    p.add_argument("--minutes", type=_in_range(0, 1e7, low_open=True), default=None, help="stop after this much training time")
    p.add_argument("--backbone", choices=BACKBONES, default=None, help="default resnet18")
    p.add_argument(
        "--weights",
        default=None,
        help="'imagenet' (torchvision's weights API, downloads) or a local weights file",
    )
    p.add_argument("--full-heads", action="store_true", help="torchvision's proposal counts (slower)")
    p.add_argument("--norm", choices=("auto", "batch", "group", "frozen"), default=None)
    p.add_argument("--focal-gamma", type=float, default=None, help="box head focal gamma (0: cross-entropy)")
    p.add_argument("--batch", type=_at_least(1), default=None, help="labelled and unlabelled images per step")
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--semi-lr", type=float, default=None, help="lr after burn-in (default: --lr)")
    p.add_argument("--lr-schedule", choices=SCHEDULES, default=None)
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--threshold", type=float, default=None, help="pseudo-label confidence")
    p.add_argument("--pseudo-rule", choices=PSEUDO_RULES, default=None)
    p.add_argument("--ignore-low", type=float, default=None, help="low edge of the ignore band")
    p.add_argument(
        "--soft-negatives", action=argparse.BooleanOptionalAction, default=None,
        help="weight unlabelled negatives by the teacher's background score",
    )
    p.add_argument("--lambda-u", type=float, default=None)
    p.add_argument("--lambda-r", type=float, default=None)
    p.add_argument("--p-norm", type=float, default=None)
    p.add_argument("--ema", type=float, default=None, help="EMA decay sigma (Eq. 7)")
    p.add_argument("--seed", type=int, default=None, help="default 0")
    p.add_argument("--device", default="auto")
    p.add_argument("--checkpoint-every", type=_at_least(0), default=0)


#: argparse destination -> TrainConfig field, for the options that default to the method's value.
_OVERRIDES = {
    "lr": "lr", "semi_lr": "semi_lr", "lr_schedule": "lr_schedule", "warmup": "warmup",
    "threshold": "threshold", "pseudo_rule": "pseudo_rule", "ignore_low": "ignore_low",
    "soft_negatives": "soft_negatives", "lambda_u": "lambda_u", "lambda_r": "lambda_r",
    "p_norm": "p_norm", "ema": "ema_decay",
}


def _training_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The training options the user gave (method-independent), as TrainConfig fields."""

    values: dict[str, Any] = {f: getattr(args, a) for a, f in _OVERRIDES.items() if getattr(args, a) is not None}
    iterations = args.iterations or 2000
    if args.burn_in is not None:
        values["burn_in"] = args.burn_in  # else the method's rule (TrainConfig.for_method)
    values.update(
        iterations=iterations,
        seed=args.seed or 0,
        device=args.device,
        checkpoint_every=args.checkpoint_every,
    )
    if args.batch is not None:
        values.update(labelled_batch=args.batch, unlabelled_batch=args.batch)
    if args.minutes is not None:
        values["time_budget_s"] = 60.0 * args.minutes
    model: dict[str, Any] = {
        "backbone": args.backbone or "resnet18",
        "weights": args.weights,
        "light_heads": not args.full_heads,
    }
    if args.norm is not None:
        model["norm"] = args.norm
    if args.focal_gamma is not None:
        model["focal_gamma"] = args.focal_gamma
    values["model"] = model
    return values


def _config_from_args(args: argparse.Namespace):
    from .train.config import RECOMMENDED, TrainConfig, burn_in_for

    values = _training_overrides(args)
    method = args.method or RECOMMENDED
    if method == "stac":
        burn = values.get("burn_in", burn_in_for(values["iterations"]))
        values["burn_in"] = min(max(1, burn), values["iterations"] - 1)
    return TrainConfig.for_method(method, **values)


#: Options a resumed run may change: how long it goes on and where it runs.
_RESUMABLE = {"iterations", "time_budget_s", "device", "checkpoint_every"}


def _resume_config(args: argparse.Namespace, path: str):
    """The saved run's config, with only the options that may change on a resume applied.

    Any other option given on the command line that differs from the saved one is
    refused by name: a resumed run is the run that was started, not a new one.
    """
    from .train.checkpoint import config_from_checkpoint, read_checkpoint

    saved = config_from_checkpoint(read_checkpoint(path))
    given = {a: getattr(args, a) for a in _OVERRIDES if getattr(args, a) is not None}
    differ = [f"--{a.replace('_', '-')} {v} (saved {getattr(saved, _OVERRIDES[a])})"
              for a, v in given.items() if getattr(saved, _OVERRIDES[a]) != v]
    for opt, value in (("method", args.method), ("backbone", args.backbone), ("burn_in", args.burn_in),
                       ("batch", args.batch), ("norm", args.norm), ("focal_gamma", args.focal_gamma)):
        if value is None:
            continue
        have = {"method": saved.method, "backbone": saved.model.backbone, "burn_in": saved.burn_in,
                "batch": saved.labelled_batch, "norm": saved.model.norm, "focal_gamma": saved.model.focal_gamma}[opt]
        if have != value:
            differ.append(f"--{opt.replace('_', '-')} {value} (saved {have})")
    if args.seed is not None and args.seed != saved.seed:
        differ.append(f"--seed {args.seed} (saved {saved.seed})")
    if differ:
        raise NapariRmtError(
            f"--resume {path}: continues the run as it was started; these options differ from it: "
            + "; ".join(differ)
            + ". Drop them, or start a new run from it with --init-from."
        )
    if args.iterations is not None:
        saved.iterations = args.iterations
    if args.minutes is not None:
        saved.time_budget_s = 60.0 * args.minutes
    saved.device, saved.checkpoint_every = args.device, args.checkpoint_every
    saved.validate()
    return saved


def _drop_replayed_events(log: Path, iteration: int) -> None:
    """Keep the events of a run's log up to the checkpoint a resume starts from, so the
    steps it replays are not logged twice."""
    if not log.is_file():
        return
    from .data.atomic import atomic_write

    kept = []
    for line in log.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by the crash
        if int(rec.get("iteration", 0)) <= iteration:
            kept.append(line)
    data = "".join(k + "\n" for k in kept).encode("utf-8")
    atomic_write(log, lambda fh: fh.write(data))


def _event_record(ev: Any) -> dict:
    from dataclasses import asdict

    return {"event": type(ev).__name__, **asdict(ev)}


def run_training(trainer, out: Path, quiet: bool = False, append: bool = False) -> list[dict]:
    """Drive a trainer with a progress bar; log every event to ``out/events.jsonl``
    (a fresh log, or appended to the resumed run's with ``append``)."""
    from .data.atomic import atomic_write_json
    from .train.events import CheckpointEvent, FinishedEvent, IterationEvent, PhaseEvent
    from .train.trainer import TrainingError

    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "config.json", trainer.cfg.to_dict(), indent=1)
    bar = ProgressBar(trainer.cfg.iterations, label=trainer.cfg.method, stream=sys.stderr)
    records = []
    with open(out / "events.jsonl", "a" if append else "w", encoding="utf-8") as log:
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
        except TrainingError:
            # The trainer is as it was after its last good step: keep that, as the message says.
            bar.close()
            trainer.save(out / "model.pt")
            raise
    trainer.save(out / "model.pt")
    return records


def _load_dataset(args: argparse.Namespace):
    from .data.coco import read_coco

    return read_coco(args.coco, images_dir=args.images, allow_outside=args.allow_outside_paths)


# ------------------------------------------------------------------ commands
def _cmd_train(args: argparse.Namespace) -> int:
    from .data.atomic import atomic_write_json, check_output
    from .data.split import pick_labelled
    from .train.trainer import Trainer

    out_dir = Path(args.out)
    if out_dir.exists() and not out_dir.is_dir():
        raise NapariRmtError(f"--out {out_dir}: is a file; give a folder for the run")
    check_output(out_dir / "model.pt", [args.coco], "--out")
    if args.resume and args.seed is None:
        from .train.checkpoint import config_from_checkpoint, read_checkpoint

        args.seed = config_from_checkpoint(read_checkpoint(args.resume)).seed  # the same labelled pick
    if not args.resume and not args.overwrite and any((out_dir / n).exists() for n in ("model.pt", "events.jsonl")):
        raise NapariRmtError(
            f"--out {out_dir}: holds an earlier run; continue it with --resume {out_dir / 'model.pt'}, "
            "replace it with --overwrite, or choose another folder"
        )
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
        labelled, unlabelled = pick_labelled(tiles, args.labeled_fraction, args.group_key, args.seed or 0)
    else:
        labelled, unlabelled = tileset.labelled, tileset.unlabelled
    out = Path(args.out)
    cfg = _resume_config(args, args.resume) if args.resume else _config_from_args(args)
    print(
        f"napari-rmt: {cfg.method} on {len(labelled)} labelled + {len(unlabelled)} unlabelled tiles, "
        f"{cfg.iterations} iterations, {cfg.model.backbone}"
        + (", random init" if cfg.model.weights is None else f", weights {cfg.model.weights}"),
        file=sys.stderr,
    )
    if args.resume:
        trainer = Trainer.resume(args.resume, labelled, unlabelled, config=cfg, checkpoint_path=out / "model.pt")
        _drop_replayed_events(out / "events.jsonl", trainer.iteration)
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
    records = run_training(trainer, out, append=bool(args.resume))
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


def _classes_by_name(model_classes, data_classes, where: str):
    """The model's classes under the dataset's category ids, matched by name.

    Boxes written under the model's own ids would be scored as other classes when the
    dataset numbers its categories differently; a class the dataset lacks is refused.
    """
    from .data.classes import CellClass, ClassList

    if model_classes.names == data_classes.names and model_classes.ids == data_classes.ids:
        return model_classes
    missing = [c.name for c in model_classes if c.name.lower() not in {n.lower() for n in data_classes.names}]
    if missing:
        raise NapariRmtError(
            f"{where}: the model predicts classes {missing} that the dataset's categories "
            f"{data_classes.names} lack; predict on image files instead, or add the categories"
        )
    return ClassList(
        CellClass(data_classes.by_name(c.name).id, data_classes.by_name(c.name).name, c.colour) for c in model_classes
    )


def _cmd_predict(args: argparse.Namespace) -> int:
    from .data.atomic import atomic_write_json, check_output
    from .data.boxstore import write_boxes_zarr
    from .data.coco import write_coco_results
    from .data.imageio import image_size
    from .data.large import is_zarr_path, open_large_image, tile_grid
    from .data.tiles import Tile, TileSet
    from .model.predict import predict_tiles
    from .model.wholeimage import predict_large_image
    from .train.checkpoint import load_model
    from .train.trainer import resolve_device

    # Every output is checked before hours of work, and none may be (inside) an input.
    inputs = [p for p in (args.model, args.coco, *(args.paths or [])) if p]
    check_output(args.out, inputs, "--out")
    if not args.coco:
        check_output(Path(args.out).with_suffix(".images.json"), inputs, "--out")
    if args.zarr:
        for p in args.paths or []:
            check_output(Path(args.zarr) / f"{Path(p).stem}.zarr", inputs, "--zarr", folder=True)
    model, classes, _ = load_model(args.model)
    device = resolve_device(args.device)
    model.to(device)
    if args.coco:
        tileset = _load_dataset(args)
        classes = _classes_by_name(classes, tileset.classes, args.coco)
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
    if not args.coco:
        # The index first, the results last; each result also names its file, so a crash
        # between the two writes cannot attribute boxes to the wrong image.
        atomic_write_json(
            Path(args.out).with_suffix(".images.json"),
            [{"id": t.id, "file_name": str(t.path), "width": t.width, "height": t.height} for t in tiles],
            indent=1,
        )
    out = write_coco_results(out_set, args.out, file_names=not args.coco)
    n = sum(len(t.predictions) for t in tiles)
    print(f"napari-rmt: {n} boxes on {len(tiles)} images in {time.perf_counter() - t0:.1f} s; wrote {out}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .data.coco import write_coco, write_coco_results
    from .data.geojson import write_geojson
    from .data.sample import load_sample
    from .model.detector import ModelConfig
    from .model.predict import predict_tiles
    from .train.config import TrainConfig, burn_in_for
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
        burn_in=burn_in_for(args.iterations),
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
    from .data.atomic import atomic_write_json, check_output
    from .data.coco import read_coco, read_coco_results
    from .evaluate.metrics import coco_map, f1_scores

    if args.json:
        check_output(args.json, [args.gt, args.pred], "--json")
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


def _cmd_experiment(args: argparse.Namespace) -> int:
    from .evaluate.experiment import ExperimentConfig, run_experiment
    from .train.events import IterationEvent

    cfg = ExperimentConfig(
        coco=args.coco,
        images=args.images,
        allow_outside=args.allow_outside_paths,
        out=args.out,
        group_key=args.group_key,
        fractions=args.fractions,
        methods=args.methods,
        seeds=args.seeds,
        split_seed=args.split_seed,
        labelled_by_group=args.labelled_by_group,
        score_threshold=args.eval_score_threshold,
        train_overrides=_training_overrides(args),
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
    train.add_argument("--overwrite", action="store_true", help="replace an earlier run in --out")
    train.add_argument("--out", required=True, help="run folder: model.pt, config.json, events.jsonl")
    train.add_argument(
        "--allow-outside-paths", action="store_true",
        help="read images named by absolute paths or ../ in the COCO file (refused by default)",
    )
    _add_training_options(train)
    train.set_defaults(func=_cmd_train)

    pred = sub.add_parser("predict", help="predict cells with a trained model")
    pred.add_argument("--model", required=True, help="model.pt (or its run folder)")
    pred.add_argument("--coco", default=None, help="predict every image of this COCO json, keeping ids")
    pred.add_argument("--images", default=None, help="image folder for --coco")
    pred.add_argument(
        "--allow-outside-paths", action="store_true",
        help="read images named by absolute paths or ../ in the COCO file (refused by default)",
    )
    pred.add_argument("paths", nargs="*", help="image files (when no --coco)")
    pred.add_argument("--out", required=True, help="COCO results json")
    pred.add_argument("--score-threshold", type=_in_range(0, 1), default=0.05)
    pred.add_argument("--nms", type=_in_range(0, 1, low_open=True), default=0.5, help="class-agnostic NMS IoU")
    pred.add_argument("--batch-size", type=_at_least(1), default=4)
    pred.add_argument("--device", default="auto")
    big = pred.add_argument_group(
        "large images",
        "image files larger than window + 2 x context (and zarr stores) are predicted in windows "
        "and stitched into whole-image boxes",
    )
    big.add_argument("--window", type=_at_least(16), default=512, help="window size in pixels (default 512)")
    big.add_argument("--overlap", type=_at_least(0), default=0, help="overlap between windows (default 0)")
    big.add_argument("--context", type=_at_least(0), default=128, help="pixels read around each window (default 128)")
    big.add_argument("--zarr", default=None, help="also write each large image's boxes to DIR/<name>.zarr")
    pred.set_defaults(func=_cmd_predict)

    ev = sub.add_parser("evaluate", help="per-class F1 and COCO mAP of predictions against annotations")
    ev.add_argument("--gt", required=True, help="COCO json with the true boxes")
    ev.add_argument("--pred", required=True, help="COCO results json (with scores)")
    ev.add_argument("--match", choices=("iou", "centre"), default="iou")
    ev.add_argument("--iou", type=_in_range(0, 1, low_open=True), default=0.5)
    ev.add_argument("--radius", type=_in_range(0, 1e6, low_open=True), default=6.0, help="centre distance in pixels (--match centre)")
    ev.add_argument("--score-threshold", type=_in_range(0, 1), default=0.5)
    ev.add_argument("--json", default=None, help="also write the numbers to this json")
    ev.set_defaults(func=_cmd_evaluate)

    from .train.config import METHODS

    ex = sub.add_parser("experiment", help="rerun the paper's comparison on a COCO dataset")
    ex.add_argument("--coco", required=True)
    ex.add_argument("--images", default=None)
    ex.add_argument("--allow-outside-paths", action="store_true", help="as for train")
    ex.add_argument("--group-key", default=None, help="split by this image field (e.g. source_tile)")
    ex.add_argument("--fractions", type=_in_range(0, 1, low_open=True), nargs="+", default=[0.02, 0.05, 0.1, 0.2])
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
    demo.add_argument("--iterations", type=_at_least(1), default=60)
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
