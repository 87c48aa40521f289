"""Detector factory, weights loading and augmentation."""

import pytest
import torch
from torch import nn
from torchvision.models import mobilenet_v3_large, resnet18
from torchvision.ops.misc import FrozenBatchNorm2d

from napari_rmt.model import ModelConfig, build_detector
from napari_rmt.model.detector import WeightsError
from napari_rmt.train.augment import StrongAugment, hflip, weak


def _norm_types(model):
    return {
        type(m) for m in model.backbone.body.modules() if isinstance(m, (nn.BatchNorm2d, FrozenBatchNorm2d))
    }


def test_random_init_uses_trainable_batchnorm_and_native_size():
    model = build_detector(3, ModelConfig(backbone="resnet18"))
    assert _norm_types(model) == {nn.BatchNorm2d}
    assert model.roi_heads.box_predictor.cls_score.out_features == 4  # 3 classes + background
    model.eval()
    with torch.no_grad():
        out = model([torch.rand(3, 96, 80)])
    assert out[0]["boxes"].shape[1] == 4
    # Native size: a 96 x 80 image is not rescaled to 800 px.
    images, _ = model.transform([torch.rand(3, 96, 80)])
    assert images.image_sizes == [(96, 80)]
    sizes = model.rpn.anchor_generator.sizes
    assert sizes[0] == (8,) and len(sizes) == 5


def test_local_weights_file_loads_into_the_backbone(tmp_path):
    ref = resnet18(weights=None)
    with torch.no_grad():
        ref.conv1.weight.fill_(0.125)
    path = tmp_path / "resnet18.pth"
    torch.save(ref.state_dict(), path)
    model = build_detector(2, ModelConfig(backbone="resnet18", weights=str(path)))
    assert torch.all(model.backbone.body.conv1.weight == 0.125)
    assert _norm_types(model) == {FrozenBatchNorm2d}  # pretrained weights: frozen statistics


def test_foreign_or_missing_weights_are_refused(tmp_path):
    other = tmp_path / "mobilenet.pth"
    torch.save(mobilenet_v3_large(weights=None).state_dict(), other)
    with pytest.raises(WeightsError, match=r"mobilenet\.pth: only 0 of .* fit a resnet18"):
        build_detector(2, ModelConfig(backbone="resnet18", weights=str(other)))
    with pytest.raises(WeightsError, match="weights file not found"):
        build_detector(2, ModelConfig(backbone="resnet18", weights=str(tmp_path / "nope.pth")))


def test_mobilenet_backbone_builds_and_runs():
    model = build_detector(2, ModelConfig(backbone="mobilenet_v3_large"))
    model.train()
    losses = model(
        [torch.rand(3, 64, 64)], [{"boxes": torch.tensor([[4.0, 4, 20, 20]]), "labels": torch.tensor([1])}]
    )
    assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"}


def test_weak_flip_moves_boxes_with_the_image():
    img = torch.zeros(3, 4, 10)
    img[:, :, 1] = 1.0  # a bright column at x = 1
    out, boxes = hflip(img, torch.tensor([[1.0, 0.0, 3.0, 4.0]]))
    assert out[0, 0].argmax().item() == 8  # column 1 -> 10 - 1 - 1
    assert boxes.tolist() == [[7.0, 0.0, 9.0, 4.0]]
    g = torch.Generator().manual_seed(0)
    flips = sum(not torch.equal(weak(img, torch.zeros(0, 4), g)[0], img) for _ in range(200))
    assert 60 < flips < 140  # about half


def test_strong_augmentation_is_photometric():
    torch.manual_seed(0)
    img = torch.rand(3, 32, 48)
    out = StrongAugment()(img)
    assert out.shape == img.shape and out.min() >= 0 and out.max() <= 1
    assert not torch.equal(out, img)
