"""Label cells, not tiles: the same annotation budget spread over every tile or concentrated
on a few (issue 31).

CoNSeP split 7:1:2 by ``source_tile`` (the split and labelled pick of
``benchmarks/semi_wins.py``), nucleus init, one wall-clock budget per run, scored by the
protocol (score > 0.5, IoU >= 0.5): any-class F1 and the mean of the per-class F1 over
the classes present in the test tiles. B is the number of boxes on the pick of
``--budget`` of the training tiles (by source tile). Arms:

- ``concentrated``: those tiles fully annotated, every other training tile unlabelled
  (what users are asked to do today);
- ``spread``: B cells drawn at random from all training tiles' cells (rare classes as rare
  as in the data), each tile that holds a drawn cell PARTIAL with those boxes, the others
  unlabelled: the partial rule (``train/partial.py``);
- ``spread-naive``: the same boxes on the same tiles, the tiles taken as fully annotated
  (what *Accept tile* used to do: the unboxed nuclei are taught as background);
- ``all``: every training tile fully annotated (the ceiling of the same minutes).

One run at a time on an idle machine (the budget is wall-clock):

    python benchmarks/partial_labels.py --seed 0 --arm spread --method rmt+ --minutes 20 --out runs/partial
    python benchmarks/partial_labels.py --seed 0 --arm spread --method supervised --minutes 20 --out runs/partial
    python benchmarks/partial_labels.py --seed 0 --arm spread-naive --method supervised --minutes 20 --out runs/partial
    python benchmarks/partial_labels.py --seed 0 --arm concentrated --method supervised --minutes 20 --out runs/partial
    python benchmarks/partial_labels.py table --out runs/partial

The nucleus model's unboxed cells on the partial tiles are taught as cells of unknown
class (``train/partial.py``, ``partial_cells``) by default since the twentieth session;
``--set partial_cells=null`` gives the stain rule alone (the rows before it without
"cells").

``--nucleus FILE`` starts from another nucleus model than the bundled one (issue 32: the
new model's worth as the start of training), its name in the run's folder via ``--tag``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import numpy as np
import torch
from common import box_pairs, drive, result, split
from torchvision.ops import box_iou

from napari_rmt.data import Boxes, TileStatus
from napari_rmt.train import TrainConfig, Trainer

ARMS = ("concentrated", "spread", "spread-naive", "all")


def spread_boxes(tiles, n_boxes: int, seed: int):
    """``n_boxes`` cells drawn uniformly from all of ``tiles``' boxes: copies of the tiles
    that hold a drawn cell, with those boxes only, and copies of the others with none."""
    owners = np.concatenate([np.full(len(t.boxes), k) for k, t in enumerate(tiles)])
    rows = np.concatenate([np.arange(len(t.boxes)) for t in tiles])
    rng = np.random.default_rng(10_000 + seed)
    drawn = rng.choice(len(owners), size=min(n_boxes, len(owners)), replace=False)
    keep: dict[int, list[int]] = {}
    for j in drawn:
        keep.setdefault(int(owners[j]), []).append(int(rows[j]))
    boxed, empty = [], []
    for k, t in enumerate(tiles):
        if k in keep:
            boxed.append(dataclasses.replace(t, boxes=t.boxes[np.sort(keep[k])], status=TileStatus.PARTIAL))
        else:
            empty.append(dataclasses.replace(t, boxes=Boxes(), status=TileStatus.UNLABELLED))
    return boxed, empty


def arm_tiles(arm: str, seed: int, budget: float):
    """(labelled, partial, unlabelled, test, classes, B) of an arm."""
    _ts, lab, unl, test = split(seed, budget)
    return _arm(arm, seed, lab, unl, test, _ts.classes)


def _arm(arm: str, seed: int, lab, unl, test, classes):
    n_boxes = sum(len(t.boxes) for t in lab)
    if arm == "concentrated":
        return lab, [], unl, test, classes, n_boxes
    if arm == "all":
        return [*lab, *unl], [], [], test, classes, n_boxes
    boxed, empty = spread_boxes([*lab, *unl], n_boxes, seed)
    if arm == "spread-naive":
        return [dataclasses.replace(t, status=TileStatus.LABELLED) for t in boxed], [], empty, test, classes, n_boxes
    return [], boxed, empty, test, classes, n_boxes


def run(args) -> None:
    torch.set_num_threads(2)
    if args.nucleus:
        import napari_rmt.model.bundled as bundled

        path = Path(args.nucleus).resolve()
        if not path.is_file():
            raise SystemExit(f"--nucleus {args.nucleus}: no such file")
        bundled.nucleus_path = lambda: path  # init 'nucleus' reads this model instead
    lab, part, unl, test, classes, n_boxes = arm_tiles(args.arm, args.seed, args.budget)
    cfg = TrainConfig.for_method(
        args.method, iterations=1_000_000, seed=args.seed, time_budget_s=args.minutes * 60,
        checkpoint_every_s=0, init="nucleus", **{k: json.loads(v) for k, v in (kv.split("=", 1) for kv in args.set)},
    )
    name = f"{args.arm}_{args.method}_b{round(100 * args.budget)}{args.tag}"
    out = Path(args.out) / f"s{args.seed}" / name
    out.mkdir(parents=True, exist_ok=True)
    counts = {c.name: int(sum((t.boxes.class_ids == c.id).sum() for t in [*lab, *part])) for c in classes}
    print(f"{name}: B = {n_boxes} boxes; {len(lab)} full, {len(part)} partial, {len(unl)} unlabelled tiles; "
          f"boxes by class {counts}", flush=True)
    trainer = Trainer(lab, unl if cfg.uses_unlabelled else [], classes, cfg, partial=part)
    # the hidden truth of the teacher's tiles, in the trainer's order (unlabelled, then partial),
    # for the pseudo-labels' recall and precision in pseudo.jsonl
    _ts, full_lab, full_unl, _test = split(args.seed, args.budget)
    truth = {t.id: t for t in [*full_lab, *full_unl]}
    cells = cell_quality(trainer, part, truth)
    if cells:
        print(f"the nucleus model's unboxed cells on the partial tiles: {cells}", flush=True)
    wall = drive(trainer, out, [truth[t.id] for t in [*unl, *part]] if cfg.uses_unlabelled else [])
    trainer.save(out / "state_100.pt")
    res = result(trainer, name, test, classes, wall)
    res.update(nucleus=args.nucleus or "bundled", arm=args.arm, budget=args.budget, boxes=n_boxes, boxes_by_class=counts,
               tiles={"full": len(lab), "partial": len(part), "unlabelled": len(unl)}, cells=cells)
    (out / "result.json").write_text(json.dumps(res, indent=1))
    f1 = res["f1"]
    print(json.dumps({"run": name, "any": f1["any"], "mean_class_f1": f1["mean_class_f1"],
                      "iterations": res["iterations"]}), flush=True)


def cell_quality(trainer: Trainer, part, truth) -> dict:
    """How many of the partial tiles' unboxed true cells the nucleus model's cells
    (``partial_cells``) are, one to one at IoU >= 0.5: their precision against the hidden
    truth, and the share of unboxed cells they cover. Empty without cells."""
    if not trainer.data.cells:
        return {}
    n_cells = n_unboxed = hits = 0
    for k, tile in enumerate(part):
        cells = trainer.data.cells[trainer.data.n_full + k]
        user = torch.as_tensor(tile.boxes.xyxy, dtype=torch.float32).reshape(-1, 4)
        full = torch.as_tensor(truth[tile.id].boxes.xyxy, dtype=torch.float32).reshape(-1, 4)
        if len(user) and len(full):  # the true cells the user did not box
            full = full[box_iou(full, user).max(dim=1).values < 0.99]
        n_cells, n_unboxed = n_cells + len(cells), n_unboxed + len(full)
        hits += len(box_pairs(cells, full)) if len(cells) and len(full) else 0
    return {"cells": n_cells, "unboxed_true_cells": n_unboxed, "precision": round(100 * hits / max(1, n_cells), 1),
            "recall": round(100 * hits / max(1, n_unboxed), 1)}


def table(out: Path) -> str:
    rows = ["| seed | arm | method | start | B | tiles full / partial / unlabelled | steps | any-class F1 (P / R) "
            "| mean per class | per class |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for path in sorted(out.glob("s*/*/result.json")):
        r = json.loads(path.read_text())
        t, f1 = r["tiles"], r["f1"]
        per = " / ".join(f"{v['f1']}" for k, v in f1.items() if isinstance(v, dict) and k != "any")
        start = "bundled" if r.get("nucleus", "bundled") == "bundled" else Path(r["nucleus"]).stem
        if r["config"].get("partial_cells"):
            start += f", cells ≥ {r['config']['partial_cells']}"
        if r["config"].get("class_weight_beta"):
            start += f", class weights β {r['config']['class_weight_beta']}"
        rows.append(f"| {path.parent.parent.name} | {r['arm']} | {r['config']['method']} | {start} | {r['boxes']} | "
                    f"{t['full']} / {t['partial']} / {t['unlabelled']} | {r['iterations']} | "
                    f"{f1['any']['f1']} ({f1['any']['precision']} / {f1['any']['recall']}) | "
                    f"{f1['mean_class_f1']} | {per} |")
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", nargs="?", default="run", choices=["run", "table"])
    ap.add_argument("--seed", type=int, default=0, help="the split's and the pick's seed")
    ap.add_argument("--arm", choices=ARMS, default="spread")
    ap.add_argument("--method", default="rmt+")
    ap.add_argument("--budget", type=float, default=0.1, help="B = the boxes of this share of the tiles")
    ap.add_argument("--minutes", type=float, default=20)
    ap.add_argument("--tag", default="")
    ap.add_argument("--nucleus", default=None, help="a nucleus model file to start from instead of the bundled one")
    ap.add_argument("--set", nargs="*", default=[], help="TrainConfig overrides KEY=VALUE (json values), "
                    "e.g. partial_cells=0.5; name the run with --tag")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    if args.mode == "table":
        print(table(Path(args.out)))
        return
    run(args)


if __name__ == "__main__":
    main()
