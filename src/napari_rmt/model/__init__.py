"""The detector: torchvision Faster R-CNN + FPN with a focal-loss box head.

Names are loaded on first use (PEP 562), so that ``napari_rmt.model.config`` (plain
data) can be imported without importing torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
    "BACKBONES": "config",
    "ModelConfig": "config",
    "build_detector": "detector",
    "load_backbone_weights": "detector",
    "FocalRoIHeads": "heads",
    "focal_loss": "heads",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
