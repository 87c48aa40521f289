"""How right is the training ETA? (issue 16: within 20 % from the first minute)

Replays the step times of real runs through the trainer's own ETA rule
(``Schedule.eta``: the mean of the last ``ETA_WINDOW`` steps of each phase, a semi-supervised step
counted as ``SEMI_STEP_COST`` burn-in steps until five are measured) as if the run had been bounded by
its number of iterations instead of the clock, and compares each step's ETA with the
time the remaining steps actually took. A run is a supervised run's events up to the
burn-in followed by a branch's semi-supervised events (``semi_wins.py``), exactly the
steps a run of that method took.

    python benchmarks/eta_accuracy.py runs/semi/s0/supervised_nuc runs/semi/s0/rmt+_at50_nuc
"""

from __future__ import annotations

import argparse
import json
from collections import deque
from pathlib import Path

import numpy as np

from napari_rmt.train import TrainConfig
from napari_rmt.train.schedule import ETA_WINDOW, Schedule


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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("supervised", type=Path)
    ap.add_argument("branch", type=Path, nargs="?")
    ap.add_argument("--after", type=float, default=60.0, help="judge the ETA from this many seconds on")
    ap.add_argument("--until", type=float, default=0.95, help="... until this share of the run (the end is noise)")
    args = ap.parse_args()
    times, burn_in = step_times(args.supervised, args.branch)
    method = "rmt+" if args.branch else "supervised"
    rows = replay(times, burn_in, method)
    total = rows[-1][0]
    judged = [(t, eta, left) for t, eta, left in rows if args.after <= t <= args.until * total and left > 0]
    err = np.array([(eta - left) / left for _, eta, left in judged])
    print(json.dumps({
        "run": f"{args.supervised.name}" + (f" + {args.branch.name}" if args.branch else ""),
        "steps": len(times), "burn_in": burn_in, "seconds": round(total),
        "judged_steps": len(judged), "median_error": round(float(np.median(err)), 3),
        "worst_under": round(float(err.min()), 3), "worst_over": round(float(err.max()), 3),
        "share_within_20pct": round(float(np.mean(np.abs(err) <= 0.2)), 3),
        "semi_step_cost_measured": round(float(np.median(times[burn_in:]) / np.median(times[:burn_in])), 2)
        if args.branch else None,
    }))


if __name__ == "__main__":
    main()
