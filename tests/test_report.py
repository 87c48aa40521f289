"""Per-class figures on held-out annotated tiles, by hand."""

import numpy as np

from napari_rmt.data import Boxes, ClassList, Tile, TileStatus
from napari_rmt.evaluate.report import MIN_TILES_FOR_HOLDOUT, class_figures, holdout_split

CLASSES = ClassList.default()  # tumor 1, stromal 2, lymphocyte 3, other 4


def tile(i, status, boxes, classes):
    img = np.zeros((64, 64, 3), np.uint8)
    return Tile(id=i, name=f"t{i}", width=64, height=64, loader=lambda: img, status=status,
                boxes=Boxes(boxes, classes))


def test_full_tiles_give_f1_and_partial_tiles_recall_only():
    """A full tile with two tumor cells, one found, plus one wrong tumor box: precision 1/2,
    recall 1/2. A partial tile with one boxed tumor cell, found, and a prediction on an
    unboxed cell that counts against nothing: recall over both tiles 2/3, precision from
    the full tile only."""
    full = tile(1, TileStatus.LABELLED, [[0, 0, 10, 10], [20, 20, 30, 30]], [1, 1])
    part = tile(2, TileStatus.PARTIAL, [[0, 0, 10, 10]], [1])
    preds = [Boxes([[0, 0, 10, 10], [40, 40, 50, 50]], [1, 1], scores=[0.9, 0.8]),
             Boxes([[0, 0, 10, 10], [40, 40, 50, 50]], [1, 1], scores=[0.9, 0.8])]
    rows = {r.name: r for r in class_figures([full, part], preds, CLASSES, {"tumor": 7})}
    t = rows["tumor"]
    assert (t.train_boxes, t.held_boxes) == (7, 3)
    assert t.recall == 2 / 3 and t.precision == 1 / 2 and abs(t.f1 - 2 * (2 / 3) * 0.5 / (2 / 3 + 0.5)) < 1e-12
    assert "F1 0.57 (precision 0.50, recall 0.67) on 3 boxes of 2 held-out tiles" in t.line(2)
    assert rows["stromal"].held_boxes == 0 and "no box of it" in rows["stromal"].line(2)
    only_partial = class_figures([part], preds[1:], CLASSES, {})
    assert only_partial[0].precision is None and only_partial[0].recall == 1.0
    assert "recall 1.00 on 1 boxes" in only_partial[0].line(1)


def test_holdout_needs_enough_tiles_and_is_seeded():
    tiles = [tile(i, TileStatus.LABELLED, [[0, 0, 5, 5]], [1]) for i in range(1, MIN_TILES_FOR_HOLDOUT)]
    assert holdout_split(tiles, 0.2)[1] == []
    tiles.append(tile(99, TileStatus.PARTIAL, [[0, 0, 5, 5]], [1]))
    kept, held = holdout_split(tiles, 0.2, seed=3)
    assert len(held) == 2 and len(kept) == 8 and {t.id for t in held} == {t.id for t in holdout_split(tiles, 0.2, 3)[1]}
