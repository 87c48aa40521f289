"""The paper's experiment as a product feature: every method, every labelled fraction.

``run_experiment`` splits a COCO dataset 7:1:2 by a group key, picks the labelled part of
the training images per fraction and seed, trains each method with the same iteration
budget, evaluates the teacher (and the student) on the test split with the paper's
protocol, and writes ``results.json``, ``results.csv``, ``table.md`` (laid out like the
paper's Table 1) and ``map.png`` (like its Fig. 3). Finished runs are skipped and an
interrupted run resumes from its last checkpoint, so a long grid survives a restart.
"""

from __future__ import annotations

import csv
import io
import json
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..data.atomic import atomic_write, atomic_write_json
from ..data.classes import ClassList
from ..data.coco import read_coco
from ..data.errors import NapariRmtError
from ..data.split import pick_labelled, split_by_group
from ..data.tiles import Tile
from ..model.config import PREDICTION_FLOOR
from ..model.predict import predict_tiles
from ..train.checkpoint import MODEL_FILE, TRAINING_FILE
from ..train.config import METHODS, TrainConfig
from ..train.events import Event
from ..train.trainer import Trainer
from .metrics import coco_map, f1_scores


@dataclass
class ExperimentConfig:
    coco: str
    out: str
    images: str | None = None
    allow_outside: bool = False  # read images named by absolute or ../ paths (see read_coco)
    group_key: str | None = "source_tile"
    fractions: Sequence[float] = (0.1,)
    methods: Sequence[str] = METHODS
    seeds: Sequence[int] = (0,)
    split_seed: int = 0
    ratios: tuple[float, float, float] = (0.7, 0.1, 0.2)
    #: Labelled images are picked by whole groups (as in the split) or one by one (the paper).
    labelled_by_group: bool = False
    score_threshold: float = 0.5
    iou: float = 0.5
    checkpoint_every: int = 100
    #: TrainConfig fields for every method; each method starts from its own defaults
    #: (``TrainConfig.for_method``), so ``rmt`` stays the paper's and ``rmt+`` the recipe.
    train_overrides: dict[str, Any] = field(default_factory=dict)
    #: "recipe": every method on the product's recipe; "paper": the paper's settings
    #: (``TrainConfig.for_method``).
    preset: str = "recipe"


def run_id(method: str, fraction: float, seed: int) -> str:
    return f"{method}_f{fraction:g}_s{seed}"


def evaluate_model(model, tiles: Sequence[Tile], classes: ClassList, cfg: ExperimentConfig, device) -> dict:
    preds = predict_tiles(model, tiles, classes, score_threshold=PREDICTION_FLOOR, store=False, device=device)
    pairs = [(t.boxes, p) for t, p in zip(tiles, preds, strict=True)]
    counts = f1_scores(pairs, classes.ids, iou=cfg.iou, score_threshold=cfg.score_threshold)
    names = {str(c.id): c.name for c in classes}
    out: dict[str, Any] = {
        "f1": {names.get(k, k): round(100 * v.f1, 2) for k, v in counts.items()},
        "precision": {names.get(k, k): round(100 * v.precision, 2) for k, v in counts.items()},
        "recall": {names.get(k, k): round(100 * v.recall, 2) for k, v in counts.items()},
    }
    m = coco_map(pairs, classes.ids, sizes=[(t.width, t.height) for t in tiles])
    out["mAP"] = round(100 * m["mAP"], 2)
    out["mAP50"] = round(100 * m["mAP50"], 2)
    return out


def run_experiment(
    cfg: ExperimentConfig,
    on_event: Callable[[str, Event], None] | None = None,
    log: Callable[[str], None] = print,
) -> list[dict]:
    out = Path(cfg.out)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    dataset = read_coco(cfg.coco, images_dir=cfg.images, allow_outside=cfg.allow_outside)
    train, val, test = split_by_group(list(dataset), cfg.group_key, cfg.ratios, seed=cfg.split_seed)
    atomic_write_json(
        out / "split.json",
        {
            "train": [t.id for t in train],
            "val": [t.id for t in val],
            "test": [t.id for t in test],
            "group_key": cfg.group_key,
            "seed": cfg.split_seed,
        },
        indent=1,
    )
    log(f"split by {cfg.group_key}: {len(train)} train, {len(val)} val, {len(test)} test images")
    records = []
    for fraction in cfg.fractions:
        for seed in cfg.seeds:
            lab, unl = pick_labelled(train, fraction, cfg.group_key if cfg.labelled_by_group else None, seed)
            for method in cfg.methods:
                rid = run_id(method, fraction, seed)
                run_dir = out / "runs" / rid
                result_path = run_dir / "result.json"
                if result_path.is_file():
                    try:
                        done = json.loads(result_path.read_text())
                    except (OSError, json.JSONDecodeError, RecursionError) as exc:
                        raise NapariRmtError(
                            f"{result_path}: unreadable ({exc}); remove that run's folder to run it again"
                        ) from exc
                    _check_same_run(done, _run_config(cfg, method, seed), result_path)
                    log(f"{rid}: done before, skipped")
                    records.append(done)
                    continue
                records.append(
                    _one_run(
                        cfg, dataset.classes, method, fraction, seed, lab, unl, test, run_dir, on_event, log
                    )
                )
    write_reports(records, out, dataset.classes.names)
    return records


def _run_config(cfg: ExperimentConfig, method: str, seed: int) -> TrainConfig:
    return TrainConfig.for_method(
        method, preset=cfg.preset, **{**cfg.train_overrides, "seed": seed, "checkpoint_every": cfg.checkpoint_every}
    )


def _check_same_run(done: dict, tcfg: TrainConfig, where: Path) -> None:
    """A finished run counts for this grid only if it was trained with the same settings."""
    saved = done.get("config") if isinstance(done, dict) else None
    if not isinstance(saved, dict):
        raise NapariRmtError(f"{where}: holds no training config; remove that run's folder to run it again")
    now = json.loads(json.dumps(tcfg.to_dict()))  # as saved: tuples become lists
    differ = sorted(k for k in set(now) | set(saved) if now.get(k) != saved.get(k) and k != "device")
    if differ:
        shown = ", ".join(f"{k} {saved.get(k)!r} -> {now.get(k)!r}" for k in differ[:4])
        raise NapariRmtError(
            f"{where}: this run was trained with other settings ({shown}); use another --out for the new "
            "settings, or remove that run's folder to run it again"
        )


def _one_run(cfg, classes, method, fraction, seed, lab, unl, test, run_dir: Path, on_event, log) -> dict:
    rid = run_id(method, fraction, seed)
    tcfg = _run_config(cfg, method, seed)
    unl_used = unl if tcfg.uses_unlabelled else []
    state, model = run_dir / TRAINING_FILE, run_dir / MODEL_FILE
    if state.is_file():
        trainer = Trainer.resume(state, lab, unl_used, checkpoint_path=state, model_path=model)
        log(f"{rid}: resuming at iteration {trainer.iteration}")
    else:
        trainer = Trainer(lab, unl_used, classes, tcfg, checkpoint_path=state, model_path=model)
    log(f"{rid}: {len(lab)} labelled, {len(unl_used)} unlabelled, {tcfg.iterations} iterations")
    t0 = time.perf_counter()
    for ev in trainer.run():
        if on_event is not None:
            on_event(rid, ev)
    seconds = time.perf_counter() - t0
    trainer.save_run(run_dir)
    record = {
        "run": rid,
        "method": method,
        "fraction": fraction,
        "seed": seed,
        "labelled": len(lab),
        "unlabelled": len(unl_used),
        "test": len(test),
        "train_seconds": round(seconds, 1),
        "config": trainer.cfg.to_dict(),
        "labelled_ids": [t.id for t in lab],
        "predicts_with": trainer.predict_with,
        "eval": {"score_threshold": cfg.score_threshold, "iou": cfg.iou, "nms": 0.5},
        "model": evaluate_model(trainer.model, test, classes, cfg, trainer.device),
    }
    if trainer.teacher is not None and trainer.predict_with == "teacher":
        record["student"] = evaluate_model(trainer.student, test, classes, cfg, trainer.device)
    atomic_write_json(run_dir / "result.json", record, indent=1)
    log(f"{rid}: F1 {record['model']['f1']}, mAP {record['model']['mAP']} ({seconds:.0f} s)")
    return record


# ------------------------------------------------------------------ reports
def _mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def write_reports(records: list[dict], out: Path, class_names: Sequence[str]) -> None:
    atomic_write_json(out / "results.json", records, indent=1)
    buf = io.StringIO()
    cols = ["run", "method", "fraction", "seed", "model", "train_seconds", "mAP", "mAP50"]
    cols += [f"f1/{c}" for c in [*class_names, "any"]]
    w = csv.DictWriter(buf, fieldnames=cols)
    w.writeheader()
    for r in records:
        for which in ("model", "student"):
            if which not in r:
                continue
            m = r[which]
            row = {
                "run": r["run"],
                "method": r["method"],
                "fraction": r["fraction"],
                "seed": r["seed"],
                "model": r.get("predicts_with", "student") if which == "model" else "student",
                "train_seconds": r["train_seconds"],
                "mAP": m["mAP"],
                "mAP50": m["mAP50"],
            }
            row.update({f"f1/{c}": m["f1"].get(c, "") for c in [*class_names, "any"]})
            w.writerow(row)
    data = buf.getvalue().encode()
    atomic_write(out / "results.csv", lambda fh: fh.write(data))
    table = results_table(records, class_names)
    atomic_write(out / "table.md", lambda fh: fh.write(table.encode()))
    plot_map(records, out / "map.png")


def _grid(records: list[dict]):
    methods = [m for m in METHODS if any(r["method"] == m for r in records)]
    fractions = sorted({r["fraction"] for r in records})
    return methods, fractions


def results_table(records: list[dict], class_names: Sequence[str]) -> str:
    """F1 (%) per class per fraction, mean ± sd over seeds, best per column in bold."""
    methods, fractions = _grid(records)
    cols = [(f, c) for f in fractions for c in [*class_names, "any"]] + [(f, "mAP") for f in fractions]
    cells: dict[tuple[str, float, str], tuple[float, float]] = {}
    for m in methods:
        for f in fractions:
            runs = [r for r in records if r["method"] == m and r["fraction"] == f]
            if not runs:
                continue
            for c in [*class_names, "any"]:
                cells[(m, f, c)] = _mean_sd([r["model"]["f1"][c] for r in runs])
            cells[(m, f, "mAP")] = _mean_sd([r["model"]["mAP"] for r in runs])
    best = {}
    for f, c in cols:
        vals = [cells[(m, f, c)][0] for m in methods if (m, f, c) in cells]
        best[(f, c)] = max(vals) if vals else None
    n_seeds = {len({r["seed"] for r in records if r["method"] == m}) for m in methods}
    ev = records[0].get("eval", {}) if records else {}
    thr, iou = ev.get("score_threshold", 0.5), ev.get("iou", 0.5)
    header = "| method | " + " | ".join(f"{f:g} {c}" for f, c in cols) + " |"
    lines = [header, "|---" * (len(cols) + 1) + "|"]
    for m in methods:
        row = [m]
        for f, c in cols:
            if (m, f, c) not in cells:
                row.append("")
                continue
            mean, sd = cells[(m, f, c)]
            text = f"{mean:.1f}" + (f" ± {sd:.1f}" if max(n_seeds) > 1 else "")
            row.append(
                f"**{text}**" if best[(f, c)] is not None and abs(mean - best[(f, c)]) < 1e-9 else text
            )
        lines.append("| " + " | ".join(row) + " |")
    note = (
        f"\nF1 % of the teacher (mean teacher methods) or the trained model, on the test split; "
        f"score > {thr:g}, NMS, IoU >= {iou:g}; mAP = COCO AP@[.5:.95] % (all scores). "
        f"Seeds per cell: {sorted(n_seeds)}.\n"
    )
    return "\n".join(lines) + "\n" + note


def plot_map(records: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods, fractions = _grid(records)
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for m in methods:
        xs, ys, es = [], [], []
        for f in fractions:
            vals = [r["model"]["mAP"] for r in records if r["method"] == m and r["fraction"] == f]
            if vals:
                mean, sd = _mean_sd(vals)
                xs.append(100 * f)
                ys.append(mean)
                es.append(sd)
        ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=m)
    ax.set_xlabel("labelled training images (%)")
    ax.set_ylabel("mAP (%)")
    ax.set_xticks([100 * f for f in fractions])
    ax.set_title("Detection mAP against labelled fraction")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    data = buf.getvalue()
    atomic_write(path, lambda fh: fh.write(data))
