"""*Suggest next*: presence doubt and class doubt, with hand-worked numbers."""

import math

import numpy as np
import pytest

from napari_rmt.data import Boxes, Tile, TileStatus
from napari_rmt.data.suggest import class_doubts, rank_unlabelled, runner_up_scores, tile_doubt


def _tile(name: str, boxes: Boxes, status: TileStatus = TileStatus.UNLABELLED) -> Tile:
    t = Tile(id=ord(name[0]), name=name, width=32, height=32,
             loader=lambda: np.zeros((32, 32, 3), np.uint8), status=status)
    t.predictions = boxes
    return t


def _h(p: float) -> float:
    return -(p * math.log2(p) + (1 - p) * math.log2(1 - p))


def test_a_cell_seen_as_two_classes_counts_once_with_its_runner_up():
    # one cell: class 1 at 0.45 and class 2 at 0.40 over nearly the same box; a lone cell elsewhere
    b = Boxes([[0, 0, 10, 10], [0, 0, 10, 11], [20, 20, 30, 30]], [1, 2, 1], [0.45, 0.40, 0.9])
    assert runner_up_scores(b) == pytest.approx([0.40, 0.45, 0.0])
    assert class_doubts(b) == pytest.approx([2 * 0.40 / 0.85, 0.0])  # the winner of the pair, the lone cell


def test_same_class_overlap_and_distant_rivals_are_no_class_doubt():
    same = Boxes([[0, 0, 10, 10], [0, 0, 10, 11]], [1, 1], [0.6, 0.5])
    apart = Boxes([[0, 0, 10, 10], [12, 0, 22, 10]], [1, 2], [0.6, 0.5])
    assert class_doubts(same) == pytest.approx([0.0, 0.0])
    assert class_doubts(apart) == pytest.approx([0.0, 0.0])
    tie = Boxes([[0, 0, 10, 10], [0, 0, 10, 10]], [1, 2], [0.5, 0.5])
    assert class_doubts(tie) == pytest.approx([1.0])  # a tie: one cell, full doubt


def test_class_doubt_moves_a_confidently_found_but_torn_cell_first():
    unsure_presence = _tile("a", Boxes([[0, 0, 10, 10]], [1], [0.5]))
    torn = _tile("b", Boxes([[0, 0, 10, 10], [0, 0, 10, 10]], [1, 2], [0.97, 0.96]))
    d = tile_doubt(torn)
    assert d.presence == pytest.approx(_h(0.97) + _h(0.96))
    assert d.classes == pytest.approx(2 * 0.96 / 1.93) and d.torn == 1
    assert d.presence < tile_doubt(unsure_presence).total < d.total  # presence alone would pick "a"
    ranked = rank_unlabelled([unsure_presence, torn])
    assert [t.name for t, _ in ranked] == ["b", "a"]
    assert "class of 1 cell" in ranked[0][1].describe()


def test_fully_annotated_tiles_are_never_suggested_partial_ones_are():
    boxes = Boxes([[0, 0, 10, 10]], [1], [0.5])
    tiles = [_tile("full", boxes, TileStatus.LABELLED), _tile("part", boxes, TileStatus.PARTIAL)]
    assert [t.name for t, _ in rank_unlabelled(tiles)] == ["part"]


def test_no_predictions_no_doubt():
    d = tile_doubt(_tile("e", Boxes()))
    assert (d.presence, d.classes, d.torn) == (0.0, 0.0, 0)


def test_the_detectors_class_doubt_is_used_where_it_is_known():
    # one box a cell (class-agnostic NMS left no rival): only the detector's own doubt tells
    b = Boxes([[0, 0, 10, 10], [20, 20, 30, 30]], [1, 2], [0.9, 0.8], class_doubt=[0.7, np.nan])
    assert class_doubts(b) == pytest.approx([0.7, 0.0])
    d = tile_doubt(_tile("k", b))
    assert d.classes == pytest.approx(0.7) and d.torn == 1
