"""Training: config, augmentation, mixing (Eq. 3), losses (Eqs. 4-7), the trainer, checkpoints.

Names are loaded on first use (PEP 562), so that ``napari_rmt.train.config`` (the
methods, their defaults and the options' ranges) can be imported without torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
    "METHODS": "config",
    "TrainConfig": "config",
    "CheckpointError": "checkpoint",
    "load_model": "checkpoint",
    "read_checkpoint": "checkpoint",
    "CheckpointEvent": "events",
    "Event": "events",
    "FinishedEvent": "events",
    "IterationEvent": "events",
    "PhaseEvent": "events",
    "ValidationEvent": "events",
    "Trainer": "trainer",
    "TrainingError": "trainer",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
