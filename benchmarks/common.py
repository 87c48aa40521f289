"""What the benchmarks share: where the data is, the CoNSeP split, driving and scoring a run.

Scoring goes through ``napari_rmt.evaluate`` (the product's own metrics), so a benchmark's
F1 is the one ``napari-rmt evaluate`` prints. Scripts import this module as ``common``
(``benchmarks/`` is the script's folder, first on ``sys.path``).
"""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

from napari_rmt.data import read_coco
from napari_rmt.data.split import pick_labelled, split_by_group
from napari_rmt.evaluate.metrics import coco_map, f1_scores, matched_pairs
from napari_rmt.model.config import PREDICTION_FLOOR
from napari_rmt.model.predict import predict_tiles
from napari_rmt.train import FinishedEvent, IterationEvent, PhaseEvent, Trainer
from napari_rmt.train.augment import flip_boxes

#: ``../shared`` beside the repository (in CI too).
SHARED = Path(__file__).resolve().parents[2] / "shared"
DATA_DIR = SHARED / "data"
CONSEP = DATA_DIR / "consep" / "annotations.json"
MONUSEG_IMAGES = DATA_DIR / "monuseg" / "images"
CPM15 = DATA_DIR / "cpm15" / "annotations.json"
YARDSTICK = SHARED / "yardstick" / "ref_supervised.py"


def split(seed: int, fraction: float = 0.1):
    ts = read_coco(CONSEP)
    train, _val, test = split_by_group(list(ts), "source_tile", seed=seed)
    lab, unl = pick_labelled(train, fraction, "source_tile", seed=seed)
    return ts, lab, unl, test


def as_batch(tiles, classes) -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    """Tiles as a detector's training batch: float images in [0, 1] and their true boxes."""
    label_of = {c.id: i + 1 for i, c in enumerate(classes)}
    images = [torch.from_numpy(t.pixels()).permute(2, 0, 1).float() / 255 for t in tiles]
    targets = [
        {"boxes": torch.tensor(t.boxes.xyxy, dtype=torch.float32),
         "labels": torch.tensor([label_of[int(c)] for c in t.boxes.class_ids])}
        for t in tiles
    ]
    return images, targets


def interleaved_step_times(models: dict, images, targets, steps: int, drop: int = 2) -> dict[str, list[float]]:
    """Seconds of each SGD step per ``{name: (model, optimizer)}``, their steps taken in
    turn so that every model sees the same machine; the first ``drop`` steps (warm-up) not kept."""
    times: dict[str, list[float]] = {k: [] for k in models}
    for step in range(steps):
        for name, (model, opt) in models.items():
            t0 = time.perf_counter()
            loss = sum(model(images, targets).values())
            opt.zero_grad()
            loss.backward()
            opt.step()
            if step >= drop:
                times[name].append(time.perf_counter() - t0)
    return times


def evaluate(model, tiles, classes) -> dict:
    preds = predict_tiles(model, tiles, classes, score_threshold=PREDICTION_FLOOR, store=False)
    counts = f1_scores(((t.boxes, p) for t, p in zip(tiles, preds, strict=True)), classes.ids)
    names = {str(c.id): c.name for c in classes}
    out = {
        names.get(k, k): {"f1": round(100 * v.f1, 1), "precision": round(100 * v.precision, 1),
                          "recall": round(100 * v.recall, 1), "n_pred": v.n_pred, "n_gt": v.n_gt}
        for k, v in counts.items()
    }
    present = [v["f1"] for k, v in out.items() if k in classes.names and v["n_gt"] > 0]
    out["mean_class_f1"] = round(float(np.mean(present)), 1)
    return out


def pseudo_quality(trainer: Trainer, unlabelled) -> dict:
    """Recall and precision (any class, IoU >= 0.5) of the last step's pseudo-boxes."""
    tp = n_gt = n_pseudo = 0
    for i, flipped, boxes, _labels in trainer.last_pseudo:
        truth = torch.from_numpy(unlabelled[i].boxes.xyxy)
        if flipped:
            height, width = trainer.data.unlabelled[i].shape[-2:]
            truth = flip_boxes(truth, width, height, True, False)
        n_gt += len(truth)
        n_pseudo += len(boxes)
        tp += len(box_pairs(boxes, truth))
    return {"tp": tp, "n_gt": n_gt, "n_pseudo": n_pseudo}


def box_pairs(boxes: torch.Tensor, truth: torch.Tensor, scores: torch.Tensor | None = None) -> list[tuple[int, int]]:
    """The scoring rule's one-to-one matching (IoU >= 0.5) of boxes to true cells, taken by
    ``scores`` (without them, best first as given)."""
    b = boxes.numpy().astype(np.float64)
    order = -np.arange(len(b), dtype=np.float64) if scores is None else scores.numpy().astype(np.float64)
    return matched_pairs(b, order, truth.numpy().astype(np.float64))


def drive(trainer: Trainer, out: Path, unlabelled, save_at: tuple[float, ...] = ()) -> float:
    budget = trainer.cfg.time_budget_s
    pending = [f for f in save_at if f * budget > trainer.elapsed_s]
    t0 = time.perf_counter()
    with open(out / "events.jsonl", "a") as log, open(out / "pseudo.jsonl", "a") as plog:
        for ev in trainer.run():
            if isinstance(ev, IterationEvent):
                log.write(json.dumps({
                    "it": ev.iteration, "phase": ev.phase, "s": round(ev.seconds, 3),
                    "elapsed": round(ev.elapsed, 1), "lr": round(ev.lr, 5),
                    "pseudo": ev.pseudo_per_image, "ignored": ev.ignored_per_image,
                    "thresholds": ev.thresholds,
                    "losses": {k: round(v, 4) for k, v in ev.losses.items()},
                }) + "\n")
                if ev.phase == "semi-supervised":
                    q = pseudo_quality(trainer, unlabelled)
                    plog.write(json.dumps({"it": ev.iteration, "elapsed": round(ev.elapsed, 1),
                                           "pseudo": ev.pseudo_per_image, "thresholds": ev.thresholds,
                                           **q}) + "\n")
                if ev.iteration % 20 == 0:
                    print(f"{ev.iteration} {ev.phase} loss {ev.losses['total']:.3f} lr {ev.lr:.4f} "
                          f"pseudo {ev.pseudo_per_image} thr {ev.thresholds} {ev.elapsed:.0f}s", flush=True)
                while pending and ev.elapsed >= pending[0] * budget:
                    path = out / f"state_{int(pending.pop(0) * 100)}.pt"
                    trainer.save(path)
                    print(f"saved {path} at step {ev.iteration}, {ev.elapsed:.0f}s", flush=True)
            elif isinstance(ev, (PhaseEvent, FinishedEvent)):
                print(ev, flush=True)
    return time.perf_counter() - t0


def result(trainer: Trainer, name: str, test, classes, wall: float) -> dict:
    res = {
        "run": name, "config": trainer.cfg.to_dict(), "iterations": trainer.iteration,
        "train_seconds": round(trainer.elapsed_s, 1), "this_process_seconds": round(wall, 1),
        "threads": torch.get_num_threads(), "machine": platform.machine(),
        "model": trainer.predict_with, "f1": evaluate(trainer.model, test, classes),
    }
    if trainer.teacher is not None:
        # The other network of the pair: the student when the teacher predicts, and back.
        other = trainer.student if trainer.predict_with == "teacher" else trainer.teacher
        res["student_f1" if trainer.predict_with == "teacher" else "teacher_f1"] = evaluate(other, test, classes)
    return res


def at_cuts(model, tiles, classes, cuts) -> dict:
    """Any-class F1 at each score cut (is a model worse, or only shyer?) and COCO mAP."""
    preds = predict_tiles(model, tiles, classes, score_threshold=PREDICTION_FLOOR, store=False)
    pairs = [(t.boxes, p) for t, p in zip(tiles, preds, strict=True)]
    out: dict = {}
    for cut in cuts:
        f = f1_scores(pairs, classes.ids, score_threshold=cut)
        out[f"any@{cut}"] = round(100 * f["any"].f1, 1)
        out[f"P/R@{cut}"] = [round(100 * f["any"].precision, 1), round(100 * f["any"].recall, 1)]
        present = [v.f1 for k, v in f.items() if k != "any" and v.n_gt > 0]
        out[f"class@{cut}"] = round(100 * float(np.mean(present)), 1)
    out.update({k: round(v, 3) for k, v in coco_map(pairs, classes.ids).items() if v is not None})
    return out
