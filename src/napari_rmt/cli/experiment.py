"""``napari-rmt experiment``: the paper's comparison on a COCO dataset, resumable."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .common import ProgressBar, add_training_options, at_least, in_range, training_overrides


def add_parser(sub) -> None:
    from ..train.config import METHODS

    ex = sub.add_parser("experiment", help="rerun the paper's comparison on a COCO dataset")
    ex.add_argument("--coco", required=True)
    ex.add_argument("--images", default=None)
    ex.add_argument("--allow-outside-paths", action="store_true", help="as for train")
    ex.add_argument("--group-key", default=None, help="split by this image field (e.g. source_tile)")
    ex.add_argument("--fractions", type=in_range(0, 1, low_open=True), nargs="+", default=[0.02, 0.05, 0.1, 0.2])
    ex.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    ex.add_argument("--seeds", type=at_least(0), nargs="+", default=[0], help="training seeds, one run each (0 or more)")
    ex.add_argument("--split-seed", type=at_least(0), default=0, help="seed of the train / val / test split (0 or more)")
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
    add_training_options(ex, method=False)
    ex.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..data.atomic import check_output
    from ..data.errors import NapariRmtError
    from ..evaluate.experiment import ExperimentConfig, run_experiment
    from ..train.events import IterationEvent

    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise NapariRmtError(f"--out {args.out}: is a file; give a folder for the experiment")
    check_output(Path(args.out) / "results.json", [args.coco, *([args.images] if args.images else [])], "--out")
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
        train_overrides=training_overrides(args),
        preset=args.preset,
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
