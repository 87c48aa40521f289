"""What fixes a detector's architecture: plain data, importable without torch.

The command line's ``--help``, the training config and the widget's choices read it,
so that none of them pays torch's import to list the backbones.
"""

from __future__ import annotations

from dataclasses import dataclass

BACKBONES = ("resnet50", "resnet18", "mobilenet_v3_large")


@dataclass
class ModelConfig:
    """Everything that fixes the detector's architecture (saved with every checkpoint)."""

    backbone: str = "resnet18"
    #: None (random init), "imagenet" (torchvision's weights API: may download), or a
    #: path to a local file with a torchvision classification state dict.
    weights: str | None = None
    norm: str = "auto"  # "auto" | "batch" | "group" | "frozen"
    anchor_sizes: tuple[int, ...] = (8, 16, 32, 64, 128)
    aspect_ratios: tuple[float, ...] = (0.5, 1.0, 2.0)
    light_heads: bool = True
    focal_gamma: float = 1.5
    detections_per_img: int = 300
    box_score_thresh: float = 0.05
    box_nms_thresh: float = 0.5
