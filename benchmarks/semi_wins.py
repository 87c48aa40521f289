"""Does semi-supervised training beat supervised in the same CPU minutes? (issue 11)

CoNSeP split 7:1:2 by ``source_tile`` (seeded), 10 % of the training source tiles
labelled (``--fraction``), the rest unlabelled; ResNet-18-FPN from random init at native
256 px; one wall-clock budget for every run. Scored by the paper's protocol: score > 0.5, NMS 0.5,
one-to-one matching at IoU >= 0.5, F1 per class and any class.

Three commands, run one after another on an idle machine (never two at once: the
budget is wall-clock):

    # supervised for the whole budget; its state is saved at 1/4, 1/2 and 3/4 of it
    python benchmarks/semi_wins.py supervised --seed 0 --minutes 20 --out runs/semi/s0
    # a semi-supervised method whose burn-in is the supervised run's first half
    # (the very same steps: same data order, same lr schedule), then the rest of the budget
    python benchmarks/semi_wins.py branch --seed 0 --minutes 20 --at 0.5 --method rmt+ --out runs/semi/s0
    # the yardstick (shared/yardstick/ref_supervised.py) on the very same split and budget
    python benchmarks/semi_wins.py yardstick --seed 0 --minutes 20 --out runs/semi/s0

A branch is exactly a run of that method with ``burn_in`` = the iteration reached at
that fraction of the budget: until burn-in every method takes the supervised steps.
Every step of a semi-supervised phase also logs its pseudo-boxes per unlabelled tile and
their recall / precision against the tiles' hidden truth (``pseudo.jsonl``);
``plot`` draws them. ``branch --oracle all|matched`` hands the student pseudo-labels made
from that hidden truth instead (``OracleLabeller``): how much better could a teacher do?
``--set seed=N`` with its own ``--tag`` reruns a pair under another training seed (the split
and the labelled pick stay the seed's); ``pairs --tags ...`` sets each supervised run beside
its branch, with the lead's mean and spread over the tags.

``eta --out SUPERVISED_RUN [--branch BRANCH_RUN]`` replays a run's step times through the
trainer's own ETA rule (``Schedule.eta``: the mean of the last ``ETA_WINDOW`` steps of each
phase, a semi-supervised step counted as ``SEMI_STEP_COST`` burn-in steps until five are
measured) as if the run had been bounded by its iterations instead of the clock, and
compares each step's ETA with the time the remaining steps took (issue 16: within 20 %
from the first minute):

    python benchmarks/semi_wins.py eta --out runs/semi/s0/supervised_nuc --branch runs/semi/s0/rmt+_at50_nuc
"""


from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
from collections import deque
from pathlib import Path

import numpy as np
import torch
from common import CONSEP, YARDSTICK, at_cuts, box_pairs, drive, evaluate, result, split

from napari_rmt.model.config import BOX_SCORES
from napari_rmt.train import TrainConfig, Trainer
from napari_rmt.train.augment import flip_boxes
from napari_rmt.train.batches import load_labelled
from napari_rmt.train.schedule import ETA_WINDOW, Schedule
from napari_rmt.train.teacher import PseudoLabeller

FRACTIONS = (0.25, 0.5, 0.75)




















class OracleLabeller(PseudoLabeller):
    """A pseudo-labeller whose teacher is helped by the unlabelled tiles' hidden truth, for
    ``branch --oracle``: the ceiling of any teacher ("all": the true boxes, score 1, in
    place of its detections), or of a teacher that is never wrong but finds no more cells
    than this one ("matched": each pseudo-box that matches a true cell at IoU >= 0.5
    becomes that cell's true box and class, the others above the threshold are dropped,
    and the doubtful boxes under it are kept for the ignore band).

    Everything else is the method's own: the teacher still runs (its features weigh soft
    negatives), the strong views, mixing, the stain prior and the loss weights are unchanged.
    """

    def __init__(self, base: PseudoLabeller, truth: list, oracle: str) -> None:
        super().__init__(**{f.name: getattr(base, f.name) for f in dataclasses.fields(base)})
        self.truth, self.oracle = truth, oracle

    def detect(self, teacher, views, share, threshold, keep_features=False):
        dets, caught = super().detect(teacher, views, share, threshold, keep_features)
        out = []
        for (i, flip), view, det in zip(share, views, dets, strict=True):
            boxes, labels = self.truth[i]
            if flip:
                boxes = flip_boxes(boxes, view.shape[-1], view.shape[-2], True, False)
            if self.oracle == "all":
                out.append({"boxes": boxes, "labels": labels, "scores": torch.ones(len(boxes))})
                continue
            sure = det["scores"] >= self.cfg.threshold
            hits = sorted(j for _, j in box_pairs(det["boxes"][sure], boxes, det["scores"][sure]))
            doubt = ~sure
            out.append({"boxes": torch.cat([boxes[hits], det["boxes"][doubt]]),
                        "labels": torch.cat([labels[hits], det["labels"][doubt]]),
                        "scores": torch.cat([torch.ones(len(hits)), det["scores"][doubt]])})
        return out, caught


def with_oracle(trainer: Trainer, unlabelled, oracle: str) -> Trainer:
    """``trainer`` with its teacher helped by the hidden truth of ``unlabelled`` (the boxes
    and labels as a labelled tile's are read: the model's labels, no empty boxes)."""
    truth = [load_labelled(tile, trainer.classes, trainer.cfg.model.aspect_ratios)[1:] for tile in unlabelled]
    trainer.labeller = OracleLabeller(trainer.labeller, truth, oracle)
    return trainer


def base_config(args, method: str) -> TrainConfig:
    return TrainConfig.for_method(
        method, iterations=1_000_000, burn_in=0, seed=args.seed, time_budget_s=args.minutes * 60,
        lr_schedule=args.schedule, labelled_batch=4, unlabelled_batch=args.unlabelled_batch,
        checkpoint_every_s=0, init=args.init, model={"focal_gamma": args.gamma, "norm": args.norm, **ARCH[args.arch]},
    )


def with_overrides(cfg: TrainConfig, pairs: list[str]) -> TrainConfig:
    """``cfg`` with each ``KEY=VALUE`` of ``--set`` laid over it (JSON values); ``model.KEY``
    names a field of the detector's config."""
    for key, value in (pair.split("=", 1) for pair in pairs):
        target, name = (cfg.model, key.removeprefix("model.")) if key.startswith("model.") else (cfg, key)
        setattr(target, name, json.loads(value))
    return cfg


#: "sized": the default since issue 14; "full": the default before it (the paper's FPN on ResNet-18).
#: The other three are "sized" with one of its three size changes undone, contiguous weights
#: as the "sized" and "full" runs of docs/benchmarks.md were (before channels-last).
ARCH = {
    "sized": {},
    "full": {"fpn_channels": 256, "resnet_stages": 4, "box_head_dim": 1024, "anchor_sizes": (8, 16, 32, 64, 128)},
    "stage4": {"resnet_stages": 4, "channels_last": False},
    "fpn256": {"fpn_channels": 256, "channels_last": False},
    "head1024": {"box_head_dim": 1024, "channels_last": False},
}


def step_times(supervised: Path, branch: Path | None) -> tuple[list[float], int]:
    sup = [json.loads(x) for x in (supervised / "events.jsonl").read_text().splitlines()]
    if branch is None:
        return [e["s"] for e in sup], len(sup)
    semi = [json.loads(x) for x in (branch / "events.jsonl").read_text().splitlines()]
    burn_in = semi[0]["it"] - 1
    return [e["s"] for e in sup[:burn_in]] + [e["s"] for e in semi], burn_in


def replay(times: list[float], burn_in: int, method: str) -> list[tuple[float, float, float]]:
    """(elapsed, ETA said, time the rest took) after each step."""
    cfg = TrainConfig.for_method(method, iterations=len(times), burn_in=max(1, burn_in))
    schedule = Schedule(cfg)
    elapsed, teacher = 0.0, False
    recent: deque[float] = deque(maxlen=ETA_WINDOW)
    recent_semi: deque[float] = deque(maxlen=ETA_WINDOW)
    left = float(np.sum(times))
    out = []
    for i, dt in enumerate(times, start=1):
        semi = cfg.uses_teacher and i > burn_in
        teacher = teacher or semi  # the teacher exists once burn-in is over
        elapsed += dt
        (recent_semi if semi else recent).append(dt)
        left -= dt
        out.append((elapsed, schedule.eta(i, elapsed, teacher, recent, recent_semi), left))
    return out

def eta_report(supervised: Path, branch: Path | None, after: float = 60.0, until: float = 0.95) -> dict:
    """How right the ETA was over a run: judged from ``after`` seconds until ``until`` of it."""
    times, burn_in = step_times(supervised, branch)
    rows = replay(times, burn_in, "rmt+" if branch else "supervised")
    total = rows[-1][0]
    judged = [(t, eta, left) for t, eta, left in rows if after <= t <= until * total and left > 0]
    err = np.array([(eta - left) / left for _, eta, left in judged])
    return {
        "run": f"{supervised.name}" + (f" + {branch.name}" if branch else ""),
        "steps": len(times), "burn_in": burn_in, "seconds": round(total),
        "judged_steps": len(judged), "median_error": round(float(np.median(err)), 3),
        "worst_under": round(float(err.min()), 3), "worst_over": round(float(err.max()), 3),
        "share_within_20pct": round(float(np.mean(np.abs(err) <= 0.2)), 3),
        "semi_step_cost_measured": round(float(np.median(times[burn_in:]) / np.median(times[:burn_in])), 2)
        if branch else None,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["supervised", "branch", "yardstick", "plot", "table", "pairs", "score", "eta"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--fraction", type=float, default=0.1,
                    help="the share of training source tiles labelled (the protocol: 0.1; name other runs by --tag)")
    ap.add_argument("--minutes", type=float, default=20)
    ap.add_argument("--out", required=True)
    ap.add_argument("--method", default="rmt+")
    ap.add_argument("--at", type=float, default=0.5, help="branch: the burn-in's share of the budget")
    ap.add_argument("--gamma", type=float, default=0.0, help="box head focal gamma (0: cross-entropy)")
    ap.add_argument("--norm", default="auto")
    ap.add_argument("--schedule", default="cosine")
    ap.add_argument("--unlabelled-batch", type=int, default=2)
    ap.add_argument("--set", nargs="*", default=[], help="config overrides KEY=VALUE (json values; model.KEY for the detector's); "
                    "a supervised run's are named by --tag, a branch's by --variant")
    ap.add_argument("--tag", default="", help="run names end with it; a branch starts from supervised<tag>")
    ap.add_argument("--variant", default="", help="branch: a suffix naming this branch's --set overrides")
    ap.add_argument("--oracle", choices=["all", "matched"],
                    help="branch: pseudo-labels from the unlabelled tiles' hidden truth (OracleLabeller); "
                    "name the run by --variant")
    ap.add_argument("--tags", nargs="*", default=[""],
                    help="pairs: the tags whose supervised run and branch to set side by side")
    ap.add_argument("--only", default="s*/*", help="plot: the runs to draw, a glob under --out")
    ap.add_argument("--plot-name", default="semi-pseudo-labels.png", help="plot: the file in docs/images/")
    ap.add_argument("--init", choices=["none", "nucleus"], default="none", help="random init or the bundled model")
    ap.add_argument("--arch", choices=sorted(ARCH), default="sized", help="the detector's size (issue 14)")
    ap.add_argument("--states", nargs="*", default=[], help="score: saved states (state_50.pt ...) to score")
    ap.add_argument("--box-score", choices=BOX_SCORES,
                    help="score: what a box's score is (the checkpoint's own when not given)")
    ap.add_argument("--cuts", nargs="*", type=float, default=[],
                    help="score: any-class F1 at each of these score cuts, and COCO mAP (threshold-free)")
    ap.add_argument("--branch", type=Path, default=None, help="eta: the branch run that followed --out's burn-in")
    args = ap.parse_args()
    out = Path(args.out)
    if args.mode == "eta":
        print(json.dumps(eta_report(out, args.branch)))
        return
    out.mkdir(parents=True, exist_ok=True)
    if args.mode == "plot":
        plot(out, args.only, args.plot_name)
        return
    if args.mode == "table":
        print(table(out))
        return
    if args.mode == "pairs":
        print(pairs(out, args.tags, args.method, args.at))
        return
    torch.set_num_threads(2)
    ts, lab, unl, test = split(args.seed, args.fraction)
    print(f"seed {args.seed}, fraction {args.fraction}: {len(lab)} labelled, {len(unl)} unlabelled, {len(test)} test", flush=True)
    if args.mode == "score":  # a saved state as it is (the network a branch starts from)
        from napari_rmt.train.checkpoint import load_model

        for path in args.states:
            model = load_model(path)[0]
            if args.box_score:
                model.roi_heads.score_by = args.box_score
            if args.cuts:
                print(path, json.dumps(at_cuts(model, test, ts.classes, args.cuts)), flush=True)
                continue
            f1 = evaluate(model, test, ts.classes)
            print(path, json.dumps({"any": f1["any"], "mean_class_f1": f1["mean_class_f1"]}), flush=True)
        return
    if args.mode == "yardstick":
        # named by --tag, so that a run at another --fraction keeps the protocol's files
        sp = out / f"split{args.tag}.json"
        sp.write_text(json.dumps({"labelled": [t.id for t in lab], "test": [t.id for t in test]}))
        res = out / f"yardstick{args.tag}.json"
        subprocess.run([sys.executable, str(YARDSTICK), str(CONSEP), "source_tile", str(args.fraction), str(args.minutes),
                        str(res), "--split", str(sp)], check=True)
        return
    if args.mode == "supervised":
        run = out / f"supervised{args.tag}"
        run.mkdir(exist_ok=True)
        cfg = with_overrides(base_config(args, "supervised"), args.set)
        cfg.validate()
        trainer = Trainer(lab, unl, ts.classes, cfg)
        wall = drive(trainer, run, unl, FRACTIONS)
    else:
        name = f"{args.method}_at{int(args.at * 100)}{args.tag}{args.variant}"
        run = out / name
        run.mkdir(exist_ok=True)
        state = out / f"supervised{args.tag}" / f"state_{int(args.at * 100)}.pt"
        ckpt = torch.load(state, map_location="cpu", weights_only=True)
        cfg = with_overrides(base_config(args, args.method), args.set)
        cfg.burn_in = int(ckpt["iteration"])
        cfg.validate()
        trainer = Trainer.resume(state, lab, unl, config=cfg)
        if args.oracle:
            trainer = with_oracle(trainer, unl, args.oracle)
        wall = drive(trainer, run, unl)
    trainer.save(run / "state_100.pt")  # the final networks, for scoring at other cuts
    res = result(trainer, run.name, test, ts.classes, wall)
    (run / "result.json").write_text(json.dumps(res, indent=1))
    print(json.dumps({k: v for k, v in res.items() if k != "config"}, indent=1))


def table(out: Path) -> str:
    """Every finished run under ``out`` (seed folders) as one markdown table."""
    classes = ["miscellaneous", "inflammatory", "epithelial", "spindle"]
    rows = ["| seed | run | steps | model | " + " | ".join(classes) + " | mean per class | any class |",
            "|---" * (len(classes) + 6) + "|"]
    for res_path in sorted(out.glob("s*/*/result.json")) + sorted(out.glob("s*/yardstick*.json")):
        r = json.loads(res_path.read_text())
        seed = res_path.parts[-3] if res_path.name == "result.json" else res_path.parts[-2]
        if res_path.name != "result.json":
            f = r["f1"]
            per = [f.get(c, 0.0) for c in classes]
            rows.append(f"| {seed} | {res_path.stem} | {r['iterations']} | plain | " + " | ".join(f"{v:.1f}" for v in per)
                        + f" | {np.mean(per):.1f} | **{r['f1_class_agnostic']:.1f}** |")
            continue
        for which in ("f1", "student_f1", "teacher_f1"):
            if which not in r or (which == "student_f1" and r["model"] == "student"):
                continue  # runs before teacher_f1 existed scored the student twice
            f = r[which]
            model = r["model"] if which == "f1" else which.split("_")[0]
            rows.append(f"| {seed} | {r['run']} | {r['iterations']} | {model} | "
                        + " | ".join(f"{f[c]['f1']:.1f}" for c in classes)
                        + f" | {f['mean_class_f1']:.1f} | **{f['any']['f1']:.1f}** |")
    return "\n".join(rows)


def pairs(out: Path, tags: list[str], method: str = "rmt+", at: float = 0.5) -> str:
    """Each ``supervised<tag>`` run beside its ``<method>_at<at><tag>`` branch, per seed
    folder, with the branch's lead (the network that predicts) and, over the tags, its mean
    and standard deviation: the same split and labelled pick under other training seeds
    (``--set seed=N``) say how far one pair's lead is from run-to-run noise."""
    rows = ["| seed | tag | supervised any / mean | branch any / mean | lead any | lead mean per class |",
            "|---|---|---|---|---|---|"]
    for seed_dir in sorted(out.glob("s*")):
        leads = []
        for tag in tags:
            sup, br = seed_dir / f"supervised{tag}" / "result.json", seed_dir / f"{method}_at{int(at * 100)}{tag}" / "result.json"
            if not (sup.exists() and br.exists()):
                continue
            a, b = (json.loads(x.read_text())["f1"] for x in (sup, br))
            lead = (b["any"]["f1"] - a["any"]["f1"], b["mean_class_f1"] - a["mean_class_f1"])
            leads.append(lead)
            rows.append(f"| {seed_dir.name} | {tag} | {a['any']['f1']:.1f} / {a['mean_class_f1']:.1f} | "
                        f"{b['any']['f1']:.1f} / {b['mean_class_f1']:.1f} | {lead[0]:+.1f} | {lead[1]:+.1f} |")
        if len(leads) > 1:
            m, sd = np.mean(leads, axis=0), np.std(leads, axis=0, ddof=1)
            rows.append(f"| {seed_dir.name} | mean ± sd of {len(leads)} | | | {m[0]:+.1f} ± {sd[0]:.1f} | {m[1]:+.1f} ± {sd[1]:.1f} |")
    return "\n".join(rows)


def plot(out: Path, only: str = "s*/*", name: str = "semi-pseudo-labels.png") -> None:
    """Pseudo-boxes per unlabelled tile and their recall over each semi-supervised run
    (the runs under ``out`` that match ``only``, e.g. ``s1/*_nuc*``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = sorted(p for p in out.glob(f"{only}/pseudo.jsonl") if p.stat().st_size)
    truth = []
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for p in runs:
        rows = [json.loads(line) for line in p.read_text().splitlines()]
        t = np.array([r["elapsed"] for r in rows]) / 60
        k = max(1, len(rows) // 20)

        def smooth(v, k=k):
            return np.convolve(v, np.ones(k) / k, mode="valid")

        per_tile = [np.mean(r["pseudo"]) for r in rows]
        truth += [r["n_gt"] / max(1, len(r["pseudo"])) for r in rows]
        recall = [r["tp"] / max(1, r["n_gt"]) for r in rows]
        precision = [r["tp"] / max(1, r["n_pseudo"]) for r in rows]
        ts = t[k - 1 :]
        label = f"{p.parent.parent.name}/{p.parent.name}"
        axes[0].plot(ts, smooth(per_tile), label=label)
        axes[1].plot(ts, smooth(recall), label=label)
        axes[2].plot(ts, smooth(precision), label=label)
    if truth:
        axes[0].axhline(float(np.mean(truth)), color="k", ls="--", lw=1, label="true cells per tile (mean)")
    gt = f"true: {np.mean(truth):.0f} per tile" if truth else ""
    for ax, title in zip(axes, [f"pseudo-boxes per unlabelled tile ({gt})", "teacher recall of the hidden truth",
                                "precision of the pseudo-boxes"], strict=True):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("training minutes (burn-in included)")
        ax.grid(alpha=0.3)
    axes[1].set_ylim(0, 1)
    axes[2].set_ylim(0, 1)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    dest = Path(__file__).resolve().parents[1] / "docs" / "images" / name
    fig.savefig(dest, dpi=90)
    print(dest)


if __name__ == "__main__":
    main()
