"""What fixes a detector's architecture: plain data, importable without torch.

The command line's ``--help``, the training config and the widget's choices read it,
so that none of them pays torch's import to list the backbones.
"""

from __future__ import annotations

from dataclasses import dataclass

BACKBONES = ("resnet50", "resnet18", "mobilenet_v3_large")
BOX_SCORES = ("class", "foreground")
#: How the CPU runs a model for prediction (``model.backends``). The default is the fastest
#: whose boxes match torch's (docs/benchmarks.md, "CPU inference backends"): channels-last,
#: 20.4 tiles/s against 19.9 (torch) and 19.2 (onnx), every box matched.
BACKENDS = ("torch", "channels-last", "onnx")
DEFAULT_BACKEND = "channels-last"

#: Architecture fields whose ``None`` means "what suits this backbone" (``ModelConfig.resolved``):
#: ResNet-18 is sized for nuclei, ResNet-50 is the paper's full FPN.
SIZED = {
    "resnet18": {"fpn_channels": 128, "resnet_stages": 3, "box_head_dim": 512},
    "resnet50": {"fpn_channels": 256, "resnet_stages": 4, "box_head_dim": 1024},
    "mobilenet_v3_large": {"fpn_channels": 256, "resnet_stages": 4, "box_head_dim": 1024},
}
#: What checkpoints written before these fields existed were built with.
LEGACY = {"fpn_channels": 256, "resnet_stages": 4, "box_head_dim": 1024}
#: The architecture fields sized per backbone.
SIZED_FIELDS = tuple(LEGACY)


#: The lowest score a prediction keeps, everywhere (the box head's floor, ``predict``,
#: evaluation, the demo): boxes under it are noise that no score cut shows, and the cut a
#: user moves (the slider, ``--score-threshold`` of evaluate) works above it.
PREDICTION_FLOOR = 0.05


@dataclass
class ModelConfig:
    """Everything that fixes the detector's architecture (saved with every checkpoint)."""

    backbone: str = "resnet18"
    #: None (random init), "imagenet" (torchvision's weights API: may download), or a
    #: path to a local file with a torchvision classification state dict.
    weights: str | None = None
    norm: str = "auto"  # "auto" | "batch" | "group" | "frozen"
    #: One size per feature map (None: 8 px on the finest map, doubling per map).
    anchor_sizes: tuple[int, ...] | None = None
    aspect_ratios: tuple[float, ...] = (0.5, 1.0, 2.0)
    light_heads: bool = True
    focal_gamma: float = 1.5
    detections_per_img: int = 300
    box_score_thresh: float = PREDICTION_FLOOR
    box_nms_thresh: float = 0.5
    #: IoU from which an anchor is a positive of a true box for the RPN (torchvision: 0.7).
    #: An anchor grid an octave apart seldom reaches 0.7 on a 10-16 px nucleus: such a cell
    #: then has only its best anchor as a positive (the low-quality match), whatever its IoU.
    rpn_fg_iou: float = 0.7
    #: What a predicted box's score is: "foreground", 1 - p(background) with the most
    #: probable class as its label (one detection per proposal), or "class", its class's
    #: probability (torchvision's one detection per class). A nucleus the head is sure is
    #: a cell but splits between two classes (0.4 / 0.35) passes a 0.5 cut only as
    #: "foreground": on CoNSeP it raised any-class F1 at 0.5 by 0.7-1.2 points for every
    #: model trained on 10 % of the tiles and by 4-7 for one trained on all, mean per-class
    #: F1 level (docs/benchmarks.md). Not part of the architecture: a checkpoint of either
    #: kind predicts either way (``napari-rmt predict --box-score``).
    box_score: str = "foreground"
    #: FPN (and RPN head) width. Nuclei are simple shapes: 128 channels lose no F1 against
    #: 256 and cost a quarter of the FPN's FLOPs (docs/benchmarks.md, issue 14).
    fpn_channels: int | None = None
    #: ResNet stages feeding the FPN: 3 stops at stride 16 (C4). Nuclei are 8-40 px at 40x;
    #: stride-32 features see none of them, and ResNet-18's last stage holds 75 % of its weights.
    resnet_stages: int | None = None
    #: Width of the box head's two fully connected layers.
    box_head_dim: int | None = None
    #: Keep 4-D weights (and so the convolutions' activations) channels-last: the same
    #: arithmetic in another memory order, 1.11-1.15x faster per training step on these
    #: CPUs (docs/benchmarks.md, issue 14). Not part of the architecture: a checkpoint
    #: loads into either layout.
    channels_last: bool = True

    def norm_kind(self) -> str:
        """``norm`` with "auto" decided: trainable BatchNorm from random init, frozen on weights."""
        if self.norm == "auto":
            return "batch" if self.weights is None else "frozen"
        return self.norm

    def resolved(self, key: str) -> int:
        """An architecture field's value, ``None`` turned into the backbone's sized default."""
        value = getattr(self, key)
        return int(value) if value is not None else SIZED[self.backbone][key]

    def architecture(self) -> dict[str, object]:
        """What fixes the weights' names and shapes (the class count aside): two configs
        with the same architecture can take each other's backbone, FPN, RPN and box head."""
        return {
            "backbone": self.backbone,
            "norm": self.norm_kind(),
            "anchor_sizes": self.anchor_sizes,
            **{k: self.resolved(k) for k in SIZED_FIELDS},
        }
