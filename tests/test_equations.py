"""Each equation of the paper with numbers worked out by hand."""

import math

import pytest
import torch
from torch import nn

from napari_rmt.model.heads import focal_loss
from napari_rmt.train.losses import ema_update, sparse_regulariser, total_loss, unsupervised_loss
from napari_rmt.train.mixing import PatchBank, mix_pseudo_boxes, pixel_bounds


def test_eq3_mixing_inside_and_outside_the_box():
    image = torch.zeros(3, 6, 8)
    bank = PatchBank({2: [torch.ones(3, 2, 2)]})  # one labelled cell of class 2, all ones
    boxes = torch.tensor([[1.0, 2.0, 4.0, 5.0]])  # x0, y0, x1, y1: 3 x 3 pixels
    out, mixed, unmixed = mix_pseudo_boxes(
        image, boxes, torch.tensor([2]), torch.tensor([0.7]), bank, torch.Generator().manual_seed(0)
    )
    assert (mixed, unmixed) == (1, 0)
    inside = out[:, 2:5, 1:4]
    # I_u * p + resize(I_a) * (1 - p) = 0 * 0.7 + 1 * 0.3 (a constant patch resizes to itself)
    torch.testing.assert_close(inside, torch.full_like(inside, 0.3))
    outside = out.clone()
    outside[:, 2:5, 1:4] = 0
    assert outside.abs().max() == 0
    assert image.abs().max() == 0  # the input is not modified


def test_eq3_bilinear_resize_and_confidence_weighting():
    image = torch.full((1, 4, 4), 0.5)
    patch = torch.tensor([[[0.0, 1.0]]])  # 1 x 2 patch, resized to 1 x 4 by bilinear interpolation
    bank = PatchBank({1: [patch]})
    out, _, _ = mix_pseudo_boxes(
        image,
        torch.tensor([[0.0, 0.0, 4.0, 1.0]]),
        torch.tensor([1]),
        torch.tensor([0.25]),
        bank,
        torch.Generator(),
    )
    # bilinear (align_corners=False) 2 -> 4: [0, 0.25, 0.75, 1]; mixed: 0.5*0.25 + r*0.75
    expected = torch.tensor([0.125, 0.3125, 0.6875, 0.875])
    torch.testing.assert_close(out[0, 0], expected)
    torch.testing.assert_close(out[0, 1:], torch.full((3, 4), 0.5))


def test_eq3_box_without_labelled_patch_stays_unmixed_and_is_counted():
    image = torch.rand(3, 5, 5)
    out, mixed, unmixed = mix_pseudo_boxes(
        image,
        torch.tensor([[0.0, 0.0, 2.0, 2.0], [1.0, 1.0, 1.0, 3.0]]),
        torch.tensor([3, 1]),
        torch.tensor([0.9, 0.9]),
        PatchBank({1: [torch.zeros(3, 1, 1)]}),
        torch.Generator(),
    )
    assert (mixed, unmixed) == (0, 2)  # class 3 has no patch; the second box has no pixel
    torch.testing.assert_close(out, image)


def test_pixel_bounds_floor_ceil_clip():
    assert pixel_bounds([1.2, 2.7, 3.1, 9.9], height=8, width=10) == (1, 2, 4, 8)


def test_eq5_sparse_regulariser_values():
    # Uniform over 2 classes: 2 * sqrt(0.5) = sqrt(2). One-hot-like: ~1 (the minimum).
    logits = torch.tensor([[0.0, 0.0], [100.0, 0.0]])
    value = sparse_regulariser(logits, p=0.5)
    assert value.item() == pytest.approx((math.sqrt(2) + 1.0) / 2, abs=1e-5)
    # p = 1 gives exactly 1 for every row (probabilities sum to one).
    assert sparse_regulariser(torch.randn(5, 4), p=1.0).item() == pytest.approx(1.0, abs=1e-6)
    # Three classes with probabilities (0.5, 0.25, 0.25): sqrt(.5) + 2 * sqrt(.25) = 1.7071
    lg = torch.log(torch.tensor([[0.5, 0.25, 0.25]]))
    assert sparse_regulariser(lg).item() == pytest.approx(math.sqrt(0.5) + 1.0, abs=1e-5)


def test_eq4_uses_classification_terms_only():
    terms = {
        "loss_classifier": torch.tensor(0.5),
        "loss_box_reg": torch.tensor(100.0),
        "loss_objectness": torch.tensor(0.25),
        "loss_rpn_box_reg": torch.tensor(100.0),
    }
    assert unsupervised_loss(terms).item() == 0.75
    assert unsupervised_loss(terms, objectness_weight=0.0).item() == 0.5  # the RPN left to the labels
    assert unsupervised_loss(terms, objectness_weight=0.5).item() == 0.625


def test_eq6_total_loss_weighting():
    out = total_loss(torch.tensor(1.0), torch.tensor(0.5), torch.tensor(0.25), lambda_u=4.0, lambda_r=1.0)
    assert out.item() == 1.0 + 4 * 0.5 + 1 * 0.25


def test_eq7_ema_after_two_steps():
    teacher, student = nn.Linear(1, 1), nn.Linear(1, 1)
    teacher.weight.data.fill_(0.0)
    student.weight.data.fill_(1.0)
    ema_update(teacher, student, decay=0.9)
    assert teacher.weight.item() == pytest.approx(0.1)  # 0.9 * 0 + 0.1 * 1
    student.weight.data.fill_(2.0)
    ema_update(teacher, student, decay=0.9)
    assert teacher.weight.item() == pytest.approx(0.9 * 0.1 + 0.1 * 2.0)  # 0.29


def test_ema_copies_integer_buffers():
    t, s = nn.BatchNorm1d(2), nn.BatchNorm1d(2)
    s.num_batches_tracked.fill_(7)
    s.running_mean.fill_(1.0)
    ema_update(t, s, decay=0.5)
    assert t.num_batches_tracked.item() == 7
    torch.testing.assert_close(t.running_mean, torch.full((2,), 0.5))


def test_focal_loss_by_hand():
    logits = torch.log(torch.tensor([[0.8, 0.2], [0.5, 0.5]]))
    labels = torch.tensor([0, 1])
    # (1 - p_t)^g * -log p_t, mean: ((0.2^1.5) * -log 0.8 + (0.5^1.5) * -log 0.5) / 2
    expected = (0.2**1.5 * -math.log(0.8) + 0.5**1.5 * -math.log(0.5)) / 2
    assert focal_loss(logits, labels, gamma=1.5).item() == pytest.approx(expected, rel=1e-5)
    ce = torch.nn.functional.cross_entropy(logits, labels)
    assert focal_loss(logits, labels, gamma=0.0).item() == pytest.approx(ce.item(), rel=1e-6)
