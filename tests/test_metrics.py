"""Hand-made cases for the detection metrics."""

import numpy as np
import pytest

from napari_rmt.data import Boxes
from napari_rmt.evaluate.metrics import f1_scores, iou_matrix, match_boxes, matched_pairs, nms_numpy


def B(rows, cls, scores=None):
    return Boxes(
        np.array(rows, dtype=float).reshape(-1, 4), cls, scores if scores is not None else [np.nan] * len(cls)
    )


def test_iou_by_hand():
    a = np.array([[0, 0, 2, 2]])
    b = np.array([[1, 1, 3, 3], [0, 0, 2, 2], [5, 5, 6, 6]])
    np.testing.assert_allclose(iou_matrix(a, b), [[1 / 7, 1.0, 0.0]])


def test_perfect_predictions_give_f1_one():
    gt = B([[0, 0, 10, 10], [20, 20, 30, 30]], [1, 2])
    pred = B([[0, 0, 10, 10], [20, 20, 30, 30]], [1, 2], [0.9, 0.8])
    c = f1_scores([(gt, pred)], [1, 2])
    assert c["1"].f1 == c["2"].f1 == c["any"].f1 == 1.0


def test_no_predictions_and_low_scores():
    gt = B([[0, 0, 10, 10]], [1])
    c = f1_scores([(gt, Boxes())], [1])
    assert c["1"].f1 == 0.0 and c["1"].n_gt == 1 and c["1"].recall == 0.0
    c = f1_scores([(gt, B([[0, 0, 10, 10]], [1], [0.5]))], [1])  # score must be > 0.5
    assert c["1"].n_pred == 0


def test_duplicates_count_once_and_nms_removes_them():
    gt = B([[0, 0, 10, 10]], [1])
    dup = B([[0, 0, 10, 10], [0, 0, 10, 9]], [1, 1], [0.9, 0.8])
    c = f1_scores([(gt, dup)], [1], nms_iou=None)
    assert (c["1"].tp, c["1"].n_pred) == (1, 2)
    assert c["1"].precision == 0.5 and c["1"].f1 == pytest.approx(2 / 3)
    c = f1_scores([(gt, dup)], [1])  # with the paper's NMS the duplicate goes
    assert (c["1"].tp, c["1"].n_pred) == (1, 1)


def test_wrong_class_is_a_miss_per_class_but_a_hit_class_agnostic():
    gt = B([[0, 0, 10, 10]], [1])
    pred = B([[0, 0, 10, 10]], [2], [0.9])
    c = f1_scores([(gt, pred)], [1, 2])
    assert c["1"].tp == 0 and c["2"].tp == 0 and c["any"].tp == 1


def test_iou_threshold_and_one_to_one():
    gt = np.array([[0, 0, 10, 10], [12, 0, 22, 10]], dtype=float)
    # One big box overlapping both at IoU < 0.5 matches neither; the exact one matches once.
    assert match_boxes(np.array([[0, 0, 22, 10]]), np.array([0.9]), gt) == 0
    assert match_boxes(np.array([[0, 0, 10, 10], [0, 0, 10, 10]]), np.array([0.9, 0.8]), gt) == 1


def test_matched_pairs_name_which_box_took_which_cell():
    gt = np.array([[0, 0, 10, 10], [12, 0, 22, 10]], dtype=float)
    # Prediction 1 scores higher, so it takes cell 0 (IoU 0.91) first; prediction 0 is the
    # exact box of cell 0 but finds it taken and cell 1 beyond reach: unmatched.
    # Prediction 2 takes cell 1. The pairs come in the order they were made.
    pred = np.array([[0, 0, 10, 10], [0, 0, 10, 11], [12, 0, 22, 10]], dtype=float)
    scores = np.array([0.6, 0.9, 0.7])
    assert iou_matrix(pred[1:2], gt[:1])[0, 0] == pytest.approx(100 / 110)
    assert matched_pairs(pred, scores, gt) == [(1, 0), (2, 1)]
    assert match_boxes(pred, scores, gt) == 2
    # Equal scores keep the given order: the exact box is first and takes cell 0.
    assert matched_pairs(pred, np.ones(3), gt) == [(0, 0), (2, 1)]
    assert matched_pairs(pred[:0], scores[:0], gt) == [] and matched_pairs(pred, scores, gt[:0]) == []


def test_nms_keeps_highest():
    xyxy = np.array([[0, 0, 10, 10], [1, 0, 10, 10], [20, 20, 30, 30]], dtype=float)
    assert nms_numpy(xyxy, np.array([0.5, 0.9, 0.1]), 0.5).tolist() == [1, 2]


def test_centre_matching():
    gt = B([[0, 0, 10, 10]], [1])  # centre (5, 5)
    near = B([[2, 2, 12, 12]], [1], [0.9])  # centre (7, 7): 2.83 px away, IoU 0.47
    c = f1_scores([(gt, near)], [1])
    assert c["1"].tp == 0  # fails IoU >= 0.5
    assert f1_scores([(gt, near)], [1], radius=3.0)["1"].tp == 1
    assert f1_scores([(gt, near)], [1], radius=2.5)["1"].tp == 0


def test_coco_map_perfect_none_and_wrong():
    from napari_rmt.evaluate.metrics import coco_map

    gt = B([[0, 0, 10, 10], [20, 20, 30, 32]], [1, 2])
    perfect = B([[0, 0, 10, 10], [20, 20, 30, 32]], [1, 2], [0.9, 0.8])
    m = coco_map([(gt, perfect)], [1, 2])
    assert m["mAP"] == pytest.approx(1.0) and m["mAP50"] == pytest.approx(1.0)
    assert m["AP50/1"] == pytest.approx(1.0)
    assert coco_map([(gt, Boxes())], [1, 2]) == {"mAP": 0.0, "mAP50": 0.0}
    wrong = B([[0, 0, 10, 10], [20, 20, 30, 32]], [2, 1], [0.9, 0.8])
    assert coco_map([(gt, wrong)], [1, 2])["mAP50"] == pytest.approx(0.0)
    half = B([[0, 0, 10, 10]], [1], [0.9])  # finds class 1 only
    m = coco_map([(gt, half)], [1, 2])
    assert m["AP50/1"] == pytest.approx(1.0) and m["AP50/2"] == pytest.approx(0.0)
    assert m["mAP50"] == pytest.approx(0.5)
