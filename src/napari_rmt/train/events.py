"""What the trainer reports, step by step: the GUI, the CLI and tests all read these."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class IterationEvent:
    iteration: int  # 1-based, the step just finished
    total: int
    phase: str  # "burn-in" | "semi-supervised" | "supervised" | "stac-student"
    losses: dict[str, float]
    lr: float
    pseudo_per_image: list[int] = field(default_factory=list)
    ignored_per_image: list[int] = field(default_factory=list)  # teacher boxes in the ignore band
    thresholds: list[float] = field(default_factory=list)  # pseudo-label threshold per class
    mixed: int = 0
    unmixed: int = 0
    seconds: float = 0.0  # this iteration's wall time
    eta: float = 0.0  # seconds left, from the recent mean (and the time budget)
    elapsed: float = 0.0  # training seconds so far, resumed runs included


@dataclass
class PhaseEvent:
    iteration: int
    phase: str
    message: str


@dataclass
class ValidationEvent:
    iteration: int
    metrics: dict[str, float]


@dataclass
class CheckpointEvent:
    iteration: int
    path: str


@dataclass
class FinishedEvent:
    iteration: int
    cancelled: bool
    seconds: float


Event = IterationEvent | PhaseEvent | ValidationEvent | CheckpointEvent | FinishedEvent
