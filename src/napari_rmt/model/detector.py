"""Detector factory: Faster R-CNN + FPN on ResNet-50 (the paper's), ResNet-18 or MobileNet-v3.

Choices made for cells rather than COCO objects:

- Images are used at their native size. torchvision would rescale every tile to 800 px;
  a 256 px tile at 40x would be blown up threefold for no gain.
- Anchors start at 8 px: nuclei at 40x are 12-30 px, below torchvision's 32 px minimum.
- With no pretrained weights the backbone uses trainable BatchNorm (``FrozenBatchNorm``
  on random weights does not normalise at all); with pretrained weights it is frozen.
- ``light_heads`` trims proposal counts and RoI samples: at small tiles the heads, not the
  backbone, dominate CPU time (measured in shared/MACHINE.md).
- ResNet-18 is sized for nuclei (``ModelConfig.resolved``): stages 1-3 only (strides 4-16;
  stride 32 sees no 8-40 px nucleus, and stage 4 holds three quarters of ResNet-18's
  weights), a 128-channel FPN and a 512-wide box head: 6.9 M weights instead of 28 M, a
  step in less than half the time (docs/benchmarks.md). ResNet-50 keeps the paper's full FPN.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch
from torch import nn
from torchvision.models import mobilenetv3 as torchvision_mobilenet
from torchvision.models import resnet as torchvision_resnet
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN, _mobilenet_extractor
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.rpn import RPNHead
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool
from torchvision.ops.misc import Conv2dNormActivation, FrozenBatchNorm2d

from ..data.errors import NapariRmtError
from .config import BACKBONES, BOX_SCORES, ModelConfig
from .heads import FocalRoIHeads
from .proposals import LocalRPN
from .roialign import ChunkedRoIAlign


class WeightsError(NapariRmtError):
    """A weights file is missing, unreadable, or does not fit the chosen backbone."""


class NativeSizeTransform(GeneralizedRCNNTransform):
    """Normalise and batch, but never resize: tiles keep their pixel scale."""

    def resize(self, image, target=None):  # type: ignore[override]
        return image, target


def _norm_layer(cfg: ModelConfig):
    norm = cfg.norm_kind()
    if norm == "batch":
        return nn.BatchNorm2d
    if norm == "frozen":
        return FrozenBatchNorm2d
    if norm == "group":
        return lambda c: nn.GroupNorm(32 if c % 32 == 0 else 8 if c % 8 == 0 else 1, c)
    raise NapariRmtError(f"norm {cfg.norm!r} is not one of auto, batch, group, frozen")


def _imagenet_enum(name: str):
    from torchvision.models import MobileNet_V3_Large_Weights, ResNet18_Weights, ResNet50_Weights

    return {
        "resnet50": ResNet50_Weights.IMAGENET1K_V1,
        "resnet18": ResNet18_Weights.IMAGENET1K_V1,
        "mobilenet_v3_large": MobileNet_V3_Large_Weights.IMAGENET1K_V1,
    }[name]


def build_detector(num_classes: int, cfg: ModelConfig | None = None) -> FasterRCNN:
    """A Faster R-CNN for ``num_classes`` cell classes (background is added here)."""
    cfg = cfg or ModelConfig()
    if cfg.backbone not in BACKBONES:
        raise NapariRmtError(f"backbone {cfg.backbone!r} is not one of {BACKBONES}")
    if num_classes < 1:
        raise NapariRmtError("a detector needs at least one cell class")
    if cfg.box_score not in BOX_SCORES:
        raise NapariRmtError(f"box_score {cfg.box_score!r} is not one of {BOX_SCORES}")
    if not 0.3 < cfg.rpn_fg_iou <= 1.0:
        raise NapariRmtError(f"rpn_fg_iou {cfg.rpn_fg_iou} must be in (0.3, 1]: above the RPN's background IoU 0.3")
    api_weights = _imagenet_enum(cfg.backbone) if cfg.weights == "imagenet" else None
    norm_layer = _norm_layer(cfg)
    # With GroupNorm the FPN and the RPN head are normalised too (He et al., "Rethinking
    # ImageNet Pre-training": from scratch, every layer normalised); with BatchNorm they
    # stay as torchvision builds them. The box head is an MLP and has no normalisation.
    group = norm_layer is not nn.BatchNorm2d and norm_layer is not FrozenBatchNorm2d
    head_norm = norm_layer if group else None
    try:
        if cfg.backbone.startswith("resnet"):
            body = getattr(torchvision_resnet, cfg.backbone)(weights=api_weights, norm_layer=norm_layer)
        else:
            body = torchvision_mobilenet.mobilenet_v3_large(weights=api_weights, norm_layer=norm_layer)
    except OSError as exc:  # URLError and its kin: the weights API could not download
        raise WeightsError(
            f"the ImageNet weights of {cfg.backbone} could not be downloaded ({type(exc).__name__}: {exc}); "
            "on a machine without internet, download the torchvision weights file elsewhere and pass "
            "it with --weights FILE, or train without weights"
        ) from exc
    channels = cfg.resolved("fpn_channels")
    if cfg.backbone.startswith("resnet"):
        backbone = _resnet_fpn(body, cfg.resolved("resnet_stages"), channels, cfg.weights is None, head_norm)
    else:
        # Stages 2..(last) of MobileNet-v3 give strides 8, 16 and 32: the stride-8 map is
        # what sees 12 px nuclei.
        backbone = _mobilenet_extractor(
            body, True, 6 if cfg.weights is None else 3, returned_layers=[2, 3, 4], norm_layer=head_norm
        )
        if channels != backbone.out_channels:
            raise NapariRmtError(f"mobilenet_v3_large has a {backbone.out_channels}-channel FPN, not {channels}")
    if cfg.weights not in (None, "imagenet"):
        load_backbone_weights(backbone, cfg.weights, cfg.backbone)

    names = _feature_map_names(backbone)
    n_maps = len(names)
    sizes = _split_sizes(cfg.anchor_sizes or tuple(8 * 2**i for i in range(n_maps)), n_maps)
    anchors = AnchorGenerator(sizes=sizes, aspect_ratios=(tuple(cfg.aspect_ratios),) * n_maps)
    # RoIs are pooled from the FPN levels proper; the extra max-pooled level serves the RPN only.
    # (in chunks on every CPU thread at inference, ``model.roialign``: the same numbers)
    roi_pool = ChunkedRoIAlign(
        featmap_names=[n for n in names if n != "pool"] or names, output_size=7, sampling_ratio=2
    )
    rep = cfg.resolved("box_head_dim")
    box_head = TwoMLPHead(backbone.out_channels * 7 * 7, rep)
    light = cfg.light_heads
    model = FasterRCNN(
        backbone,
        num_classes=None,
        rpn_anchor_generator=anchors,
        rpn_head=_rpn_head(backbone.out_channels, anchors.num_anchors_per_location()[0], head_norm),
        box_roi_pool=roi_pool,
        box_head=box_head,
        box_predictor=FastRCNNPredictor(rep, num_classes + 1),
        rpn_pre_nms_top_n_train=600 if light else 2000,
        rpn_post_nms_top_n_train=300 if light else 2000,
        rpn_pre_nms_top_n_test=600 if light else 1000,
        rpn_post_nms_top_n_test=300 if light else 1000,
        box_batch_size_per_image=128 if light else 512,
        box_score_thresh=cfg.box_score_thresh,
        box_nms_thresh=cfg.box_nms_thresh,
        rpn_fg_iou_thresh=cfg.rpn_fg_iou,
        box_detections_per_img=cfg.detections_per_img,
    )
    old = model.roi_heads
    model.roi_heads = FocalRoIHeads(
        old.box_roi_pool,
        old.box_head,
        old.box_predictor,
        fg_iou_thresh=0.5,
        bg_iou_thresh=0.5,
        batch_size_per_image=old.fg_bg_sampler.batch_size_per_image,
        positive_fraction=old.fg_bg_sampler.positive_fraction,
        bbox_reg_weights=None,
        score_thresh=old.score_thresh,
        nms_thresh=old.nms_thresh,
        detections_per_img=old.detections_per_img,
        gamma=cfg.focal_gamma,
    )
    model.roi_heads.score_by = cfg.box_score
    model.rpn = LocalRPN.from_rpn(model.rpn)
    t = model.transform
    model.transform = NativeSizeTransform(
        min_size=t.min_size, max_size=t.max_size, image_mean=t.image_mean, image_std=t.image_std
    )
    if cfg.channels_last:
        # 4-D weights only; the convolutions then hand channels-last activations on from
        # the ordinary input batch, and load_state_dict copies into this layout.
        model = model.to(memory_format=torch.channels_last)
    return model


def _resnet_fpn(body: nn.Module, stages: int, channels: int, train_all: bool, norm_layer) -> BackboneWithFPN:
    """ResNet stages 1..``stages`` under an FPN of ``channels``, plus a max-pooled level.

    Stages past ``stages`` are dropped from the module (no weights, no FLOPs). From random
    init every layer trains; from ImageNet weights the stem and first stage stay frozen,
    as torchvision does.
    """
    if stages not in (3, 4):
        raise NapariRmtError(f"resnet_stages {stages} must be 3 (strides 4-16) or 4 (strides 4-32)")
    if channels < 8 or channels % 8:
        raise NapariRmtError(f"fpn_channels {channels} must be a positive multiple of 8")
    trainable = ["layer4", "layer3", "layer2", "layer1", "conv1"][: 5 if train_all else 3]
    if train_all:
        trainable.append("bn1")
    for name, parameter in body.named_parameters():
        if not any(name.startswith(layer) for layer in trainable):
            parameter.requires_grad_(False)
    width = body.inplanes // 8  # 64 for ResNet-18 (basic blocks), 256 for ResNet-50
    return BackboneWithFPN(
        body,
        return_layers={f"layer{i + 1}": str(i) for i in range(stages)},
        in_channels_list=[width * 2**i for i in range(stages)],
        out_channels=channels,
        extra_blocks=LastLevelMaxPool(),
        norm_layer=norm_layer,
    )


def _rpn_head(channels: int, anchors: int, norm_layer) -> RPNHead:
    """torchvision's RPN head; with ``norm_layer`` its 3x3 conv is normalised (no bias)."""
    head = RPNHead(channels, anchors)
    if norm_layer is not None:
        head.conv = nn.Sequential(Conv2dNormActivation(channels, channels, kernel_size=3, norm_layer=norm_layer))
        for layer in head.conv.modules():
            if isinstance(layer, nn.Conv2d):
                nn.init.normal_(layer.weight, std=0.01)
    return head


def _feature_map_names(backbone: nn.Module) -> list[str]:
    with torch.no_grad():
        was = backbone.training
        backbone.eval()
        out = backbone(torch.zeros(1, 3, 64, 64))
        backbone.train(was)
    return list(out.keys())


def _split_sizes(sizes: tuple[int, ...], n_maps: int) -> tuple[tuple[int, ...], ...]:
    """One anchor size per map when they match; otherwise spread sizes evenly over maps.

    Every map must have the same number of anchors per location (one RPN head serves all).
    """
    sizes = tuple(int(s) for s in sizes)
    if len(sizes) == n_maps:
        return tuple((s,) for s in sizes)
    per = -(-len(sizes) // n_maps)
    extra = per * n_maps - len(sizes)
    padded = sizes + tuple(sizes[-1] * 2 ** (k + 1) for k in range(extra))
    return tuple(tuple(padded[i * per : (i + 1) * per]) for i in range(n_maps))


def load_backbone_weights(backbone: nn.Module, path: str | os.PathLike, name: str) -> None:
    """Load a local torchvision classification state dict into the FPN backbone's body.

    Loaded with ``weights_only=True``. A file that fits less than 90 % of the body's
    tensors is refused: it is for another architecture.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: weights file not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise WeightsError(f"{path}: not a loadable weights file ({type(exc).__name__}: {exc})") from exc
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise WeightsError(f"{path}: expected a state dict, found {type(state).__name__}")
    body = backbone.body
    own = body.state_dict()
    prefix = "features." if name.startswith("mobilenet") else ""
    fitting = {}
    for key, value in state.items():
        k = key[len(prefix) :] if prefix and key.startswith(prefix) else key
        if k in own and isinstance(value, torch.Tensor) and own[k].shape == value.shape:
            fitting[k] = value
    tensors = [k for k in own if not k.endswith("num_batches_tracked")]
    if len(fitting) < 0.9 * len(tensors):
        raise WeightsError(
            f"{path}: only {len(fitting)} of {len(tensors)} backbone tensors fit a {name}; "
            "is this a weights file for another architecture?"
        )
    missing = body.load_state_dict(fitting, strict=False).missing_keys
    if [k for k in missing if not k.endswith("num_batches_tracked")]:
        warnings.warn(f"{path}: {len(missing)} backbone tensors kept their initial values", stacklevel=2)
