"""What the subcommands share: the progress bar, option types, the training options and
how they become a ``TrainConfig``, driving a trainer with its log, reading datasets."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from ..data.errors import NapariRmtError
from ..model.config import SIZED_FIELDS  # plain data: no torch import for --help
from ..train.tunables import CLI_TUNABLES


def pixel_size(text: str) -> float:
    """An option's pixel size in µm/px, in a microscope's range (``data.scale``)."""
    from ..data.scale import check_pixel_size

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of µm per pixel") from None
    try:
        return check_pixel_size(value, "--pixel-size")
    except NapariRmtError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


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
def at_least(low: int):
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


def in_range(low: float, high: float, low_open: bool = False, integer: bool = False):
    """An argparse type: a finite number in [low, high] (or (low, high] with ``low_open``);
    with ``integer``, a whole number, returned as an int (a config field of type int must
    not receive 2.0: it slices)."""

    def parse(text: str) -> float:
        try:
            value = int(text) if integer else float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if integer else 'a number'}") from None
        if not (low < value if low_open else low <= value) or not value <= high:
            raise argparse.ArgumentTypeError(f"{value} must be in {'(' if low_open else '['}{low}, {high}]")
        return value

    return parse


def within(bounds, integer: bool = False):
    """An argparse type: a number its ``train.config.Bounds`` admit (the range ``validate()``
    checks, declared once); with ``integer`` a whole number, returned as an int."""

    def parse(text: str) -> float:
        try:
            value = int(text) if integer else float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if integer else 'a number'}") from None
        if not bounds.admits(value):
            raise argparse.ArgumentTypeError(f"{value} must be {bounds.describe()}")
        return value

    return parse


def add_training_options(p: argparse.ArgumentParser, method: bool = True) -> None:
    """Training options. Unset ones take the method's default (``TrainConfig.for_method``),
    so ``--method rmt`` is the paper's method and ``--method rmt+`` the recommended recipe."""
    from ..model.bundled import LICENSE_NOTE
    from ..model.config import BACKBONES
    from ..train.config import INITS, METHODS, PRESETS, RECOMMENDED, SCHEDULES

    if method:  # experiment has its own --methods
        p.add_argument("--method", choices=METHODS, default=None, help=f"default {RECOMMENDED}")
    p.add_argument(
        "--preset", choices=PRESETS, default="recipe",
        help="recipe (default): every method on the product's recipe (cross-entropy head, cosine "
        "schedule, batch 4; docs/tuning.md); paper: the paper's settings for its methods",
    )
    p.add_argument("--iterations", type=at_least(1), default=None, help="default 2000")
    p.add_argument(
        "--burn-in", type=int, default=None,
        help=f"default: {RECOMMENDED} {_share(RECOMMENDED)} of the run, other methods {_share('rmt')}",
    )
    p.add_argument("--minutes", type=in_range(0, 1e7, low_open=True), default=None, help="stop after this much training time")
    p.add_argument("--backbone", choices=BACKBONES, default=None, help="default resnet18")
    p.add_argument(
        "--weights",
        default=None,
        help="'imagenet' (torchvision's weights API, downloads) or a local weights file",
    )
    p.add_argument(
        "--init", choices=INITS, default=None,
        help="start from the bundled nucleus model (backbone, FPN, RPN, box regression; a fresh "
        "classifier for your classes) or from random weights ('none'). Default: nucleus with the "
        f"resnet18 backbone and no --weights, else none. The nucleus model is {LICENSE_NOTE}",
    )
    p.add_argument("--full-heads", action="store_true", help="torchvision's proposal counts (slower)")
    p.add_argument("--fpn-channels", type=at_least(8), default=None, help="FPN width (default: resnet18 128, else 256)")
    p.add_argument(
        "--resnet-stages", type=int, choices=(3, 4), default=None,
        help="ResNet stages under the FPN: 3 ends at stride 16 (resnet18's default), 4 at 32 (the paper's)",
    )
    p.add_argument("--box-head-dim", type=at_least(16), default=None, help="box head width (default: resnet18 512, else 1024)")
    p.add_argument(
        "--norm", choices=("auto", "batch", "group", "frozen"), default=None,
        help="the backbone's normalisation (default auto: trainable BatchNorm from random init or the nucleus "
        "model, frozen with --weights)",
    )
    p.add_argument("--focal-gamma", type=in_range(0, 10), default=None, help="box head focal gamma (0: cross-entropy)")
    p.add_argument("--batch", type=at_least(1), default=None, help="labelled and unlabelled images per step")
    p.add_argument("--semi-lr", type=float, default=None, help="lr after burn-in (default: --lr)")
    p.add_argument("--lr-schedule", choices=SCHEDULES, default=None,
                   help="constant after warm-up, or cosine down to 5%% (default: the method's; cosine for the recipe)")
    p.add_argument("--warmup", type=int, default=None, help="steps of linear lr warm-up (default 100)")
    p.add_argument(
        "--pixel-size", type=pixel_size, default=None, metavar="UM",
        help="the training tiles' pixel size in µm (about 0.25 at 40x, 0.5 at 20x), saved as the model's own: "
        "predict then resamples images of another pixel size to it",
    )
    for t in CLI_TUNABLES:  # the widget's advanced form offers the same, from the same table
        if t.kind == "bool":
            p.add_argument(t.option, action=argparse.BooleanOptionalAction, default=None, help=t.help)
        elif t.kind == "choice":
            p.add_argument(t.option, choices=t.choices, default=None, help=t.help)
        else:
            p.add_argument(t.option, type=within(t.bounds, integer=t.kind == "int"), default=None, help=t.help)
    p.add_argument("--seed", type=int, default=None, help="default 0")
    p.add_argument("--device", default="auto", help="auto (a GPU when there is one), cpu, cuda or cuda:N")
    p.add_argument("--checkpoint-every", type=at_least(0), default=0,
                   help="also checkpoint every N steps (default 0: every 5 minutes and at the end)")


def _share(method: str) -> str:
    """A method's default burn-in as a share of the run, for the help text."""
    from ..train.config import METHOD_DEFAULTS

    fraction = METHOD_DEFAULTS.get(method, {}).get("burn_in_fraction", 0.5)
    return f"{fraction:.0%}%"  # doubled: argparse formats help with %


#: argparse destination -> TrainConfig field, for the options that default to the method's value.
_OVERRIDES = {
    "semi_lr": "semi_lr", "lr_schedule": "lr_schedule", "warmup": "warmup", "pixel_size": "pixel_size",
    **{t.option[2:].replace("-", "_"): t.name for t in CLI_TUNABLES},
}


def training_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The training options the user gave (method-independent), as TrainConfig fields."""
    from ..train.config import TrainConfig

    values: dict[str, Any] = {f: getattr(args, a) for a, f in _OVERRIDES.items() if getattr(args, a) is not None}
    iterations = args.iterations or TrainConfig.iterations
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
    for key in SIZED_FIELDS:
        if getattr(args, key) is not None:
            model[key] = getattr(args, key)
    values["model"] = model
    if args.init is None:
        from ..model.config import ModelConfig
        from ..train.config import default_init

        values["init"] = default_init(ModelConfig(**model))
    else:
        values["init"] = args.init
    return values


def config_from_args(args: argparse.Namespace):
    from ..train.config import RECOMMENDED, TrainConfig

    return TrainConfig.for_method(args.method or RECOMMENDED, preset=args.preset, **training_overrides(args))


def resume_config(args: argparse.Namespace, ckpt: dict[str, Any]):
    """The saved run's config (of the loaded checkpoint ``ckpt``), with only the options
    that may change on a resume applied: iterations, minutes, device, checkpoint interval.

    Any other option given on the command line that differs from the saved one is
    refused by name: a resumed run is the run that was started, not a new one.
    """
    from ..train.checkpoint import config_from_checkpoint

    saved = config_from_checkpoint(ckpt)
    given = [(a, getattr(args, a), getattr(saved, f)) for a, f in _OVERRIDES.items()]
    given += [
        ("method", args.method, saved.method),
        ("backbone", args.backbone, saved.model.backbone),
        ("burn_in", args.burn_in, saved.burn_in),
        ("batch", args.batch, saved.labelled_batch),
        ("norm", args.norm, saved.model.norm),
        ("focal_gamma", args.focal_gamma, saved.model.focal_gamma),
        ("seed", args.seed, saved.seed),
        ("init", args.init, saved.init),
        *((k, getattr(args, k), saved.model.resolved(k)) for k in SIZED_FIELDS),
    ]
    differ = [f"--{a.replace('_', '-')} {v} (saved {have})" for a, v, have in given if v is not None and v != have]
    if differ:
        raise NapariRmtError(
            f"--resume {ckpt['_path']}: continues the run as it was started; these options differ from it: "
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


def drop_replayed_events(log: Path, iteration: int) -> None:
    """Keep the events of a run's log up to the checkpoint a resume starts from, so the
    steps it replays are not logged twice."""
    if not log.is_file():
        return
    from ..data.atomic import atomic_write

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
    from ..data.atomic import atomic_write_json
    from ..train.events import CheckpointEvent, FinishedEvent, IterationEvent, PhaseEvent
    from ..train.trainer import TrainingError

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
            trainer.save_run(out)
            raise
    trainer.save_run(out)
    return records


def load_dataset(args: argparse.Namespace):
    from ..data.coco import read_coco

    return read_coco(args.coco, images_dir=args.images, allow_outside=args.allow_outside_paths)


def read_ids(path: Path) -> list[int]:
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
