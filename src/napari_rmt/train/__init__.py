"""Training: config, augmentation, mixing (Eq. 3), losses (Eqs. 4-7), the trainer, checkpoints.

Names are loaded on first use (PEP 562), so that ``napari_rmt.train.config`` (the
methods, their defaults and the options' ranges) can be imported without torch.
"""

from __future__ import annotations

from .._lazy import lazy_getattr

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
__getattr__ = lazy_getattr(__name__, _WHERE)
