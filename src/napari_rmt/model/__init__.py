"""The detector: torchvision Faster R-CNN + FPN with a focal-loss box head.

Names are loaded on first use (PEP 562), so that ``napari_rmt.model.config`` (plain
data) can be imported without importing torch.
"""

from __future__ import annotations

from .._lazy import lazy_getattr

_WHERE = {
    "BACKBONES": "config",
    "ModelConfig": "config",
    "build_detector": "detector",
    "load_backbone_weights": "detector",
    "FocalRoIHeads": "heads",
    "focal_loss": "heads",
}

__all__ = sorted(_WHERE)
__getattr__ = lazy_getattr(__name__, _WHERE)
