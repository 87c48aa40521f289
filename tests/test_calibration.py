"""Score calibration (issue 32): the one-pass F1 curve, the fitted cut, the shift folded
into a detector's classifier."""

import math

import numpy as np
import pytest
import torch

from napari_rmt.data import Boxes
from napari_rmt.evaluate.calibration import CLS_BIAS, Curve, f1_curve, fold_shift, shift_for, shifted
from napari_rmt.evaluate.metrics import f1_scores
from napari_rmt.model import ModelConfig, build_detector
from napari_rmt.model.predict import predict_images


def _scene(rng: np.random.Generator, n_true: int = 30) -> tuple[Boxes, Boxes]:
    """Truth on a grid and predictions that are jittered copies, duplicates and strays."""
    xy = np.stack(np.meshgrid(np.arange(6) * 40.0, np.arange(5) * 40.0), -1).reshape(-1, 2)[:n_true]
    truth = np.concatenate([xy, xy + 20], axis=1)
    jitter = truth + rng.normal(0, 3, truth.shape)
    dupes = truth[:8] + rng.normal(0, 2, (8, 4))
    strays = np.concatenate([c := rng.uniform(0, 220, (10, 2)), c + 15], axis=1)
    pred = np.concatenate([jitter, dupes, strays])
    scores = rng.uniform(0.06, 1.0, len(pred))
    return (Boxes(xyxy=truth, class_ids=np.ones(len(truth), dtype=np.int64)),
            Boxes(xyxy=pred, class_ids=np.ones(len(pred), dtype=np.int64), scores=scores))


def test_one_pass_curve_equals_matching_at_each_cut():
    """NMS and matching go in score order, so one matching over the floor gives every cut's
    counts; checked against the protocol's own per-cut scoring."""
    rng = np.random.default_rng(3)
    pairs = [_scene(rng) for _ in range(5)]
    cuts = (0.1, 0.25, 0.5, 0.73, 0.9)
    curve = f1_curve(pairs, cuts)
    for cut, f1, p, r in zip(cuts, curve.f1, curve.precision, curve.recall, strict=True):
        k = f1_scores(pairs, [1], score_threshold=cut)["any"]
        assert (f1, p, r) == pytest.approx((k.f1, k.precision, k.recall))
    assert curve.n_gt == 150


def test_best_cut_is_the_middle_of_the_flat_top():
    cuts = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6)
    flat = Curve(cuts, (0.50, 0.600, 0.603, 0.601, 0.55, 0.4), (0,) * 6, (0,) * 6, 10)
    assert flat.best_cut() == pytest.approx(0.3)  # 0.2-0.4 within half a point of 60.3
    assert flat.best_cut(plateau=0.1) == pytest.approx(0.3)
    assert flat.best_cut(plateau=6.0) == pytest.approx(0.35)  # 0.2-0.5 by then
    assert Curve(cuts, (0.1, 0.2, 0.3, 0.4, 0.5, 0.6), (0,) * 6, (0,) * 6, 10).best_cut() == 0.6


def test_shift_maps_the_cut_to_a_half_by_hand():
    assert shift_for(0.2) == pytest.approx(math.log(4))
    assert shifted(np.array([0.2, 0.5, 0.8]), math.log(4)) == pytest.approx([0.5, 0.8, 16 / 17])
    assert shift_for(0.5) == 0.0
    with pytest.raises(ValueError, match=r"0\.010"):
        shift_for(0.01)
    with pytest.raises(ValueError, match="not a score"):
        shift_for(1.0)


def test_folded_shift_gives_shifted_scores_and_the_same_boxes():
    """Adding the shift to the classifier's logit bias is the calibration map itself: the
    same boxes in the same order, every score sigmoid(logit(s) + b)."""
    torch.manual_seed(0)
    model = build_detector(1, ModelConfig(backbone="resnet18", box_score_thresh=0.0)).eval()
    image = [torch.rand(3, 96, 96)]
    before = predict_images(model, image)[0]
    assert len(before["scores"]) > 5
    b = 1.3
    model.load_state_dict(fold_shift(model.state_dict(), b))
    after = predict_images(model, image)[0]
    torch.testing.assert_close(after["boxes"], before["boxes"])
    assert after["scores"].numpy() == pytest.approx(shifted(before["scores"].numpy(), b), abs=1e-5)
    state = {CLS_BIAS: torch.tensor([0.25, -0.5], dtype=torch.float16)}
    assert fold_shift(state, b)[CLS_BIAS].tolist() == pytest.approx([0.25, 0.8], abs=1e-3)
    assert fold_shift(state, b)[CLS_BIAS].dtype == torch.float16
    with pytest.raises(KeyError, match="cls_score"):
        fold_shift({}, b)
