"""Training: config, augmentation, mixing (Eq. 3), losses (Eqs. 4-7), the trainer, checkpoints."""

from .checkpoint import CheckpointError, load_model, read_checkpoint
from .config import METHODS, TrainConfig
from .events import CheckpointEvent, Event, FinishedEvent, IterationEvent, PhaseEvent, ValidationEvent
from .trainer import Trainer, TrainingError

__all__ = [
    "METHODS",
    "CheckpointError",
    "CheckpointEvent",
    "Event",
    "FinishedEvent",
    "IterationEvent",
    "PhaseEvent",
    "TrainConfig",
    "Trainer",
    "TrainingError",
    "ValidationEvent",
    "load_model",
    "read_checkpoint",
]
