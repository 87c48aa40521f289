"""When a run leaves burn-in, its learning rate at each step, and how long it has left.

Pure arithmetic on the config, the step count and the clock: what the trainer asks of it
is what a test can check by hand.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

import numpy as np

from .config import TrainConfig

#: Steps in the ETA's running mean of step seconds (per phase).
ETA_WINDOW = 40

#: A semi-supervised step costs about this many burn-in steps (teacher pass, a second
#: batch): for rmt+ with the sized ResNet-18 at 256 px, batch 4 + 2, 1.54-1.91 over five
#: 20-minute CoNSeP runs (median 1.64; 1.87 in step_profile.py's isolated steps,
#: docs/benchmarks.md). Used for the ETA until semi-supervised steps are measured.
SEMI_STEP_COST = 1.7


@dataclass
class Schedule:
    """The run's clock rules; ``world_size`` scales the rate (the linear scaling rule)."""

    cfg: TrainConfig
    world_size: int = 1

    def out_of_time(self, elapsed_s: float) -> bool:
        return bool(self.cfg.time_budget_s) and elapsed_s >= self.cfg.time_budget_s

    def progress(self, iteration: int, elapsed_s: float) -> float:
        """How far the run is, 0..1: by iterations, or by time when a budget ends it sooner."""
        p = iteration / self.cfg.iterations
        if self.cfg.time_budget_s:
            p = max(p, elapsed_s / self.cfg.time_budget_s)
        return min(1.0, p)

    def burn_in_over(self, iteration: int, elapsed_s: float) -> bool:
        cfg = self.cfg
        if iteration >= cfg.burn_in:
            return True
        return bool(cfg.time_budget_s) and cfg.burn_in_fraction is not None and (
            elapsed_s >= cfg.burn_in_fraction * cfg.time_budget_s
        )

    def lr(self, iteration: int, elapsed_s: float, semi: bool) -> float:
        """Warm-up, then constant or cosine down to 5 %; ``semi_lr`` for the steps that learn
        from unlabelled tiles when set; times the number of processes under torchrun (the
        global batch is that many times larger)."""
        cfg = self.cfg
        factor = 0.001 + (1 - 0.001) * iteration / cfg.warmup if cfg.warmup and iteration < cfg.warmup else 1.0
        if cfg.lr_schedule == "cosine":
            factor *= 0.05 + 0.95 * 0.5 * (1.0 + math.cos(math.pi * self.progress(iteration, elapsed_s)))
        return (cfg.semi_lr if semi and cfg.semi_lr is not None else cfg.lr) * factor * self.world_size

    def eta(
        self,
        iteration: int,
        elapsed_s: float,
        teacher_exists: bool,
        recent: deque[float],
        recent_semi: deque[float] | None = None,
    ) -> float:
        """Seconds left: burn-in steps at the mean of the recent burn-in steps, steps after it
        at the mean of the recent ones once five are measured (before that,
        ``SEMI_STEP_COST`` burn-in steps each). Measured within 20 % from the first minute on
        88-96 % of the steps of real runs (``benchmarks/semi_wins.py eta``)."""
        if not recent and not recent_semi:
            return 0.0
        burn_step = float(np.mean(recent)) if recent else float(np.mean(recent_semi)) / SEMI_STEP_COST
        semi_step = (
            float(np.mean(recent_semi))
            if recent_semi and (len(recent_semi) >= 5 or not recent)
            else burn_step * SEMI_STEP_COST
        )
        left = self.cfg.iterations - iteration
        if not self.cfg.uses_unlabelled:
            eta = burn_step * left
        elif teacher_exists:
            eta = semi_step * left
        else:
            burn_left = max(0, min(left, self.cfg.burn_in - iteration))
            eta = burn_step * burn_left + semi_step * (left - burn_left)
        if self.cfg.time_budget_s:
            eta = min(eta, max(0.0, self.cfg.time_budget_s - elapsed_s))
        return eta
