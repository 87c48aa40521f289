"""Where a run's weights come from: an earlier model (warm start), the bundled nucleus
model, or its own saved training state (resume), each checked against the run first."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from torch import nn

from ..data.classes import ClassList
from ..data.tiles import Tile
from ..model.config import ModelConfig
from .batches import TrainingError
from .checkpoint import (
    TRAINING_FILE,
    CheckpointError,
    classes_from_checkpoint,
    config_from_checkpoint,
    is_model_only,
    load_state,
    native_pixel_size,
    predicting_state,
    read_checkpoint,
    transfer_weights,
)
from .config import TrainConfig
from .distributed import current_world
from .teacher import frozen_copy

if TYPE_CHECKING:
    from .trainer import Trainer


def warm_start(student: nn.Module, classes: ClassList, source: str | os.PathLike | dict) -> None:
    """Start from an earlier model's predicting weights; its classes must be the run's."""
    ckpt = source if isinstance(source, dict) else read_checkpoint(source)
    where = ckpt.get("_path", "checkpoint")
    names = [c.name for c in classes_from_checkpoint(ckpt)]
    if names != classes.names:
        raise CheckpointError(f"{where}: trained for classes {names}, not {classes.names}")
    load_state(student, predicting_state(ckpt), where)


def with_model_pixel_size(cfg: TrainConfig, init_from: dict | None) -> TrainConfig:
    """``cfg`` with the pixel size the model learns at: the start's (the model ``init_from``,
    else the bundled nucleus model under init "nucleus") when the tiles' ``pixel_size``
    differs from it, so that the tiles are resampled to the scale the start learnt its
    nuclei at (20x tiles seen at 40x) and the trained model keeps that scale; else ``cfg``
    (tiles as they are, the model's pixel size theirs)."""
    from ..data.scale import scale_factor
    from ..model.bundled import NUCLEUS_PIXEL_SIZE

    if cfg.pixel_size is None or cfg.model_pixel_size is not None:
        return cfg
    if init_from is not None:
        start = native_pixel_size(init_from)
    elif cfg.init == "nucleus":
        start = NUCLEUS_PIXEL_SIZE
    else:
        return cfg
    if start is None or scale_factor(cfg.pixel_size, start) == 1.0:
        return cfg
    return dataclasses.replace(cfg, model_pixel_size=start)


def init_nucleus(student: nn.Module, model: ModelConfig) -> None:
    """Backbone, FPN, RPN and box regression from the bundled nucleus model."""
    from ..model.bundled import NUCLEUS

    ckpt = read_checkpoint(NUCLEUS)
    want = config_from_checkpoint(ckpt).model.architecture()
    differ = [f"{k} {v} (the nucleus model's: {want[k]})" for k, v in model.architecture().items() if v != want[k]]
    if differ:
        raise TrainingError(
            "init 'nucleus' needs the bundled model's architecture; this run has " + "; ".join(differ)
            + ". Use init 'none' for another architecture."
        )
    transfer_weights(student, ckpt, ckpt["_path"])


def _check_training_state(ckpt: dict) -> None:
    if is_model_only(ckpt):
        raise CheckpointError(
            f"{ckpt.get('_path', 'checkpoint')}: holds only the trained model, not the training state; "
            f"resume from the run's {TRAINING_FILE}, or start a new run from it (init_from)"
        )


def _check_resumable(ckpt: dict, cfg: TrainConfig, saved: TrainConfig) -> None:
    where = ckpt.get("_path", "checkpoint")
    # how boxes are scored is prediction, not the network: a branch may score otherwise
    if dataclasses.replace(cfg.model, box_score=saved.model.box_score) != saved.model:
        raise CheckpointError(
            f"{where}: cannot resume with another model ({saved.model} was saved, {cfg.model} asked for)"
        )
    saved_world, world = int(ckpt.get("world_size", 1)), current_world().size
    if saved_world != world:
        raise CheckpointError(
            f"{where}: the run was trained by {saved_world} process(es) and is resumed by {world}; resume "
            "with the same torchrun --nproc_per_node x --nnodes (its data order and learning rate depend on it)"
        )


def resume_trainer(
    cls: type[Trainer],
    path: str | os.PathLike | dict,
    labelled: Sequence[Tile],
    unlabelled: Sequence[Tile],
    config: TrainConfig | None = None,
    **kwargs: Any,
) -> Trainer:
    """``Trainer.resume``: a trainer built on the given tiles, then given the checkpoint's
    weights, teacher, optimizer, step count, clock and random state."""
    ckpt = path if isinstance(path, dict) else read_checkpoint(path)  # a checkpoint read already
    _check_training_state(ckpt)
    saved = config_from_checkpoint(ckpt)
    cfg = config or saved
    _check_resumable(ckpt, cfg, saved)
    # Built from the checkpoint in memory: the init the config names (the bundled model,
    # read from disk) would only be overwritten by the saved weights below.
    trainer = cls(labelled, unlabelled, classes_from_checkpoint(ckpt), cfg, init_from=ckpt, **kwargs)
    where = ckpt["_path"]
    load_state(trainer.student, ckpt["student"], where)
    if ckpt.get("teacher") is not None and cfg.uses_unlabelled:
        load_state(trainer.student, ckpt["teacher"], where)  # checks the shapes
        trainer.teacher = frozen_copy(trainer.student.state_dict(), len(trainer.classes), cfg.model, trainer.device)
        load_state(trainer.student, ckpt["student"], where)
        if cfg.spec.teacher == "fixed":
            trainer.stac_targets = trainer.labeller.fixed_targets(trainer.teacher)
    if ckpt.get("optimizer"):
        trainer.optimizer.load_state_dict(ckpt["optimizer"])
    trainer.iteration = int(ckpt.get("iteration", 0))
    trainer.elapsed_s = float(ckpt.get("elapsed_s", 0.0))
    if "ema_steps" in ckpt:
        trainer.ema_steps = int(ckpt["ema_steps"])
    elif ckpt.get("teacher") is not None:  # saved before the count existed
        trainer.ema_steps = max(0, trainer.iteration - int((ckpt.get("config") or {}).get("burn_in", 0)))
    for buf, values in zip(trainer.scores.buffers, ckpt.get("score_buffers") or [], strict=False):
        buf.extend(float(v) for v in values)
    saved_ids = ckpt.get("tile_ids")
    if saved_ids is not None and saved_ids != trainer.tile_ids:
        raise TrainingError(
            f"{where}: the run was trained on other annotated tiles (ids {saved_ids['labelled'][:5]}... "
            f"fully, {saved_ids['partial'][:5]}... partly; now {trainer.tile_ids['labelled'][:5]}..., "
            f"{trainer.tile_ids['partial'][:5]}...); resume with the same tiles (or start a new run with "
            "--init-from)"
        )
    if ckpt.get("rng"):
        trainer.data.set_rng_state(ckpt["rng"], where)
    return trainer
