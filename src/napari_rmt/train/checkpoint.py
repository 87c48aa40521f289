"""Checkpoints: what prediction needs, and what resuming a run needs, in two files.

A run folder holds ``model.pt``, the model a user predicts with (the predicting network
in fp16 storage, its config and class list: 14 MB for the default ResNet-18), and
``training.pt``, the whole training state (student, teacher, optimizer, random state:
several times that) that ``--resume`` reads. Both are the same format; a model file is
marked ``kind: model``.

Everything stored is a tensor, a number, a string or a container of those, so the file
loads with ``torch.load(weights_only=True)``: a tampered file that carries code is
refused by PyTorch's restricted unpickler instead of being run.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..data.atomic import atomic_write
from ..data.classes import ClassList
from ..data.errors import NapariRmtError
from ..model.bundled import resolve_model
from ..model.detector import build_detector
from .config import TrainConfig

FORMAT = "napari-rmt-checkpoint"
VERSION = 1
MODEL_FILE = "model.pt"
TRAINING_FILE = "training.pt"


class CheckpointError(NapariRmtError):
    """A checkpoint is missing, tampered with, or made for another architecture."""


def save_checkpoint(path: str | os.PathLike, payload: dict[str, Any]) -> Path:
    """Write atomically; a payload read back by ``read_checkpoint`` can be saved as it is."""
    body = {k: v for k, v in payload.items() if k not in ("format", "version", "_path")}
    buf = io.BytesIO()
    torch.save({"format": FORMAT, "version": VERSION, **body}, buf)
    data = buf.getvalue()
    return atomic_write(path, lambda fh: fh.write(data))


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load and check a checkpoint file (weights_only); errors name the file.

    ``"nucleus"`` is the bundled nucleus model (``model/bundled.py``).
    """
    path = resolve_model(path)
    if path.is_dir():
        path = path / "model.pt"
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        # torch's message goes on to advise loading with weights_only=False, which would run
        # whatever code the file carries: never passed on to a user.
        raise CheckpointError(
            f"{path}: refused to load: not a napari-rmt checkpoint, or it holds something other "
            f"than weights and settings (damaged or tampered with; {type(exc).__name__}). Only "
            "checkpoints written by napari-rmt load."
        ) from exc
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a napari-rmt checkpoint (no '{FORMAT}' marker)")
    if ckpt.get("version") != VERSION:
        raise CheckpointError(f"{path}: checkpoint version {ckpt.get('version')} is not {VERSION}")
    for key in ("config", "classes", "student"):
        if key not in ckpt:
            raise CheckpointError(f"{path}: checkpoint lacks {key!r}")
    ckpt["_path"] = str(path)
    return ckpt


def model_payload(state: dict[str, Any], half: bool = True) -> dict[str, Any]:
    """A training state reduced to what prediction and warm starts need.

    The predicting network's weights in fp16 storage with ``half`` (they load into the
    fp32 model; predictions differ from the fp32 weights' by rounding only), config,
    class list and how far the run got. No optimizer, no second network, no random state.
    """
    weights = predicting_state(state)
    if half:
        weights = {k: (v.half() if v.is_floating_point() else v) for k, v in weights.items()}
    return {
        "kind": "model",
        "config": state["config"],
        "classes": state["classes"],
        "iteration": state.get("iteration", 0),
        "elapsed_s": state.get("elapsed_s", 0.0),
        "predict_with": "student",
        "student": weights,
        "teacher": None,
    }


def save_model(path: str | os.PathLike, state: dict[str, Any]) -> Path:
    """Write the predicting model of a training state (``model_payload``) atomically."""
    return save_checkpoint(path, model_payload(state))


def is_model_only(ckpt: dict[str, Any]) -> bool:
    return ckpt.get("kind") == "model"


def read_training_state(path: str | os.PathLike) -> dict[str, Any]:
    """The training state ``--resume`` continues: ``path`` itself when it is one, else the
    ``training.pt`` of its run folder (``path`` may be the folder or its ``model.pt``)."""
    path = Path(path)
    if path.is_dir():
        path = path / TRAINING_FILE
    ckpt = read_checkpoint(path)
    if not is_model_only(ckpt):
        return ckpt
    state = path.parent / TRAINING_FILE
    if not state.is_file():
        raise CheckpointError(
            f"{path}: holds only the trained model (what prediction needs); resuming needs the run's "
            f"training state, {state}, which is missing. Start a new run from this model with --init-from."
        )
    return read_checkpoint(state)


def classes_from_checkpoint(ckpt: dict[str, Any]) -> ClassList:
    try:
        return ClassList.from_json(ckpt["classes"])
    except (KeyError, NapariRmtError) as exc:
        raise CheckpointError(f"{ckpt.get('_path', 'checkpoint')}: bad class list ({exc})") from exc


def config_from_checkpoint(ckpt: dict[str, Any]) -> TrainConfig:
    try:
        return TrainConfig.from_dict(dict(ckpt["config"]))
    except (TypeError, ValueError, AttributeError, KeyError, NapariRmtError) as exc:
        raise CheckpointError(f"{ckpt.get('_path', 'checkpoint')}: bad config ({exc})") from exc


def native_pixel_size(ckpt: dict[str, Any]) -> float | None:
    """The pixel size (µm/px) a model was trained at: its config's (``model_pixel_size``,
    else ``pixel_size``), or for the bundled
    nucleus model (saved before the setting existed) the 40x of its training fields
    (``model/weights/README.md``); None when unknown."""
    from ..model.bundled import NUCLEUS_PIXEL_SIZE, is_bundled

    config = ckpt.get("config") or {}
    size = config.get("model_pixel_size") or config.get("pixel_size")
    if size is None and is_bundled(ckpt.get("_path")):
        return NUCLEUS_PIXEL_SIZE
    return float(size) if size is not None else None


def load_state(model: nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    """``load_state_dict`` (strict) that names the file and the first mismatches."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [k for k in own if k in state and tuple(own[k].shape) != tuple(state[k].shape)]
    if missing or unexpected or wrong:
        parts = []
        if wrong:
            parts.append(f"shape mismatch at {wrong[:3]}")
        if missing:
            parts.append(f"missing {missing[:3]}")
        if unexpected:
            parts.append(f"unexpected {unexpected[:3]}")
        raise CheckpointError(
            f"{where}: weights do not fit this detector (another backbone or class list?): "
            + "; ".join(parts)
        )
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise CheckpointError(
            f"{where}: the weights hold NaN or infinite values ({bad[:3]}{' …' if len(bad) > 3 else ''}); "
            "such a model predicts nothing. Use an earlier checkpoint."
        )
    model.load_state_dict(state)


def load_model(path: str | os.PathLike) -> tuple[nn.Module, ClassList, TrainConfig]:
    """The model a checkpoint predicts with (the teacher for mean-teacher methods)."""
    return model_from_checkpoint(read_checkpoint(path))


def model_from_checkpoint(ckpt: dict[str, Any]) -> tuple[nn.Module, ClassList, TrainConfig]:
    """``load_model`` for a checkpoint already in memory (the GUI keeps its latest)."""
    classes = classes_from_checkpoint(ckpt)
    cfg = config_from_checkpoint(ckpt)
    model = build_detector(len(classes), cfg.model)
    load_state(model, predicting_state(ckpt), ckpt.get("_path", "checkpoint"))
    model.eval()
    return model, classes, cfg


def predicting_state(ckpt: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The weights a checkpoint predicts with: its ``predict_with`` network (the teacher or
    the student), the student when there is no teacher."""
    return ckpt.get(ckpt.get("predict_with", "student")) or ckpt["student"]


def transfer_weights(model: nn.Module, ckpt: dict[str, Any], where: str) -> None:
    """Start ``model`` from a model trained for other classes: everything but the classifier.

    Backbone, FPN, RPN and box head are taken as they are. The box regression is
    class-specific; each of ``model``'s classes starts from the source's first class (for
    the nucleus model, its only one), which knows how a nucleus box is drawn. The
    classifier keeps its fresh initialisation: the classes are the user's.
    """
    state = predicting_state(ckpt)
    own = model.state_dict()
    cls_key, reg_key = "roi_heads.box_predictor.cls_score.", "roi_heads.box_predictor.bbox_pred."
    taken = {k: v for k, v in state.items() if not k.startswith((cls_key, reg_key))}
    taken.update({k: v for k, v in own.items() if k.startswith(cls_key)})
    for part in ("weight", "bias"):
        source, n_classes = state.get(reg_key + part), own[reg_key + part].shape[0] // 4 - 1
        if source is None or source.shape[0] < 8:
            raise CheckpointError(f"{where}: has no box regression to start from")
        taken[reg_key + part] = torch.cat([source[:4]] + [source[4:8]] * n_classes)
    load_state(model, taken, where)
