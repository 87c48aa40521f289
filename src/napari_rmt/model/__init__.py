"""The detector: torchvision Faster R-CNN + FPN with a focal-loss box head."""

from .detector import BACKBONES, ModelConfig, build_detector, load_backbone_weights
from .heads import FocalRoIHeads, focal_loss

__all__ = [
    "BACKBONES",
    "FocalRoIHeads",
    "ModelConfig",
    "build_detector",
    "focal_loss",
    "load_backbone_weights",
]
