"""``napari-rmt train``: train a detector on a COCO dataset (or resume a run)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..data.errors import NapariRmtError
from .common import (
    add_training_options,
    config_from_args,
    drop_replayed_events,
    in_range,
    load_dataset,
    read_ids,
    resume_config,
    run_training,
)


def add_parser(sub) -> None:
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
    train.add_argument(
        "--resume", default=None,
        help="continue an interrupted run: its folder, model.pt or training.pt (the state is training.pt)",
    )
    train.add_argument("--overwrite", action="store_true", help="replace an earlier run in --out")
    train.add_argument(
        "--out", required=True,
        help="run folder: model.pt (the model, for predict), training.pt (for --resume), config.json, events.jsonl",
    )
    train.add_argument(
        "--allow-outside-paths", action="store_true",
        help="read images named by absolute paths or ../ in the COCO file (refused by default)",
    )
    train.add_argument(
        "--holdout", type=in_range(0, 0.5), default=0.0,
        help="hold out this share of the annotated images (at least 10 of them needed) and print, after "
        "the run, each class's figures on them: F1 on fully annotated images, recall on partly annotated "
        "ones; written to class_report.json (default 0: train on all)",
    )
    add_training_options(train)
    train.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """One process's training; under ``torchrun`` each rank runs this, rank 0 writes."""
    from ..train.distributed import World, init_from_env, launched_by_torchrun, shutdown

    world = World()
    if launched_by_torchrun():
        world, args.device = init_from_env(args.device)
    try:
        return _run(args, world)
    finally:
        shutdown()


def _run(args: argparse.Namespace, world) -> int:
    from ..data.atomic import atomic_write_json, check_output
    from ..data.split import pick_labelled
    from ..train.checkpoint import MODEL_FILE, TRAINING_FILE, read_training_state
    from ..train.trainer import Trainer

    out_dir = Path(args.out)
    if out_dir.exists() and not out_dir.is_dir():
        raise NapariRmtError(f"--out {out_dir}: is a file; give a folder for the run")
    check_output(out_dir / MODEL_FILE, [args.coco], "--out")
    earlier = (MODEL_FILE, TRAINING_FILE, "events.jsonl")
    if not args.overwrite and any((out_dir / n).exists() for n in earlier):
        if not args.resume:
            raise NapariRmtError(
                f"--out {out_dir}: holds an earlier run; continue it with --resume {out_dir}, "
                "replace it with --overwrite, or choose another folder"
            )
        resumed = Path(args.resume) if Path(args.resume).is_dir() else Path(args.resume).parent
        if resumed.resolve() != out_dir.resolve():
            raise NapariRmtError(
                f"--out {out_dir}: holds another run than --resume {args.resume}; continue a run in its own "
                "folder, give an empty --out for the continued run, or --overwrite to replace this one"
            )
    if out_dir.is_dir():
        from ..data.atomic import remove_orphans

        # a run killed while writing a checkpoint left its temporary file; this run is the
        # folder's one writer, so whatever is left of its files is swept now, not in an hour
        for name in (MODEL_FILE, TRAINING_FILE):
            remove_orphans(out_dir / name, max_age=0)
    # Read once: the saved config decides the labelled pick (its seed) and the trainer's state.
    ckpt = read_training_state(args.resume) if args.resume else None
    cfg = resume_config(args, ckpt) if ckpt is not None else config_from_args(args)
    tileset = load_dataset(args)
    tiles = list(tileset)
    if args.labeled_ids:
        ids = read_ids(Path(args.labeled_ids))
        unknown = sorted(set(ids) - {t.id for t in tiles})
        if unknown:
            raise NapariRmtError(f"{args.labeled_ids}: image ids {unknown[:10]} are not in {args.coco}")
        labelled = [t for t in tiles if t.id in set(ids)]
        unlabelled = [t for t in tiles if t.id not in set(ids)]
    elif args.labeled_fraction is not None:
        labelled, unlabelled = pick_labelled(tiles, args.labeled_fraction, args.group_key, cfg.seed)
    else:
        labelled, unlabelled = tileset.labelled, tileset.unlabelled
    # partly annotated tiles (napari_rmt_status "partial"): true boxes, the rest unknown
    picked = {t.id for t in labelled}
    partial = [t for t in tileset.partial if t.id not in picked]
    unlabelled = [t for t in unlabelled if not t.is_partial]
    held: list = []
    if args.holdout and args.resume:
        raise NapariRmtError("--holdout picks the images a new run trains on; a resumed run keeps its own")
    if args.holdout:
        from ..evaluate.report import holdout_split

        kept, held = holdout_split([*labelled, *partial], args.holdout, cfg.seed)
        kept_ids = {t.id for t in kept}
        labelled = [t for t in labelled if t.id in kept_ids]
        partial = [t for t in partial if t.id in kept_ids]
    if not cfg.uses_unlabelled:
        unlabelled = []  # supervised never reads them (decoding them all would only cost time)
    out = Path(args.out)
    if cfg.model.weights is not None:
        start = f", weights {cfg.model.weights}"
    elif args.init_from:
        start = ""  # the warm start's own model
    else:
        start = ", from the bundled nucleus model" if cfg.init == "nucleus" else ", random init"
    if world.is_main:
        ranks = f" on {world.size} processes (lr x {world.size})" if world.size > 1 else ""
        print(
            f"napari-rmt: {cfg.method} on {len(labelled)} labelled + "
            + (f"{len(partial)} partly annotated + " if partial else "")
            + f"{len(unlabelled)} unlabelled tiles, "
            f"{cfg.iterations} iterations, {cfg.model.backbone}{start}{ranks}",
            file=sys.stderr,
        )
    if args.resume:
        from ..train.checkpoint import classes_from_checkpoint

        saved_names = classes_from_checkpoint(ckpt).names
        if saved_names != tileset.classes.names:
            raise NapariRmtError(
                f"--resume {args.resume}: the run learns classes {saved_names}, {args.coco} has "
                f"{tileset.classes.names}; resume on the run's own dataset (or start a new run)"
            )
        trainer = Trainer.resume(
            ckpt, labelled, unlabelled, config=cfg, checkpoint_path=out / TRAINING_FILE, model_path=out / MODEL_FILE,
            partial=partial,
        )
        if world.is_main:
            drop_replayed_events(out / "events.jsonl", trainer.iteration)
    else:
        trainer = Trainer(
            labelled,
            unlabelled,
            tileset.classes,
            cfg,
            init_from=args.init_from,
            checkpoint_path=out / TRAINING_FILE,
            model_path=out / MODEL_FILE,
            partial=partial,
        )
    if not world.is_main:
        for _ in trainer.run():  # rank 0 logs, checkpoints and writes the model
            pass
        return 0
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "labelled_ids.json", [t.id for t in labelled])
    records = run_training(trainer, out, append=bool(args.resume))
    if held:
        report_classes(trainer, [*labelled, *partial], held, tileset.classes, out)
    fin = records[-1] if records else {}
    print(
        f"napari-rmt: {fin.get('iteration', trainer.iteration)} iterations in "
        f"{fin.get('seconds', 0):.0f} s; wrote {out / MODEL_FILE} (and {TRAINING_FILE}, for --resume)"
    )
    return 0


def report_classes(trainer, trained, held, classes, out: Path) -> None:
    """Each class's figures on the held-out annotated images, printed and written to
    ``class_report.json``."""
    import dataclasses

    from ..data.atomic import atomic_write_json
    from ..evaluate.report import box_counts, class_figures
    from ..model.predict import predict_tiles

    preds = predict_tiles(trainer.model, held, classes, store=False, device=trainer.device, scale=trainer.tile_scale)
    rows = class_figures(held, preds, classes, box_counts(trained, classes))
    print(f"napari-rmt: per class, on {len(held)} held-out annotated images (score > 0.5, IoU >= 0.5):")
    for r in rows:
        print("  " + r.line(len(held)))
    atomic_write_json(out / "class_report.json", {
        "held_out_ids": [t.id for t in held],
        "classes": [{**dataclasses.asdict(r), "f1": r.f1} for r in rows],
    }, indent=1)
