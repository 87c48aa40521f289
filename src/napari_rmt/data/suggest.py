"""Which tile to annotate next: the one the model is least sure about.

Two doubts are counted, each box adding at most 1:

- **presence**: the binary entropy of the box's score, in bits. A box at 0.5 adds 1, a box
  at 0.05 or 0.95 about 0.3. This is the classic uncertainty sampling of active learning.
- **class**: how close the box's class came to another, ``2 p2 / (p1 + p2)`` with ``p1``
  its class's probability and ``p2`` the best other class's over the same proposal: 1 for
  a tie, 0 when no other class has any. The margin ``p1 - p2`` is read relative to the
  pair's total so that a faint pair (0.08 / 0.07) counts as the tie it is. The detector
  gives it with each box (``Boxes.class_doubt``, ``model.heads.class_doubt``). Where it
  is not known (predictions read from a results file of another tool) it is estimated
  from the boxes: a nucleus a per-class detector splits between two classes shows as two
  overlapping boxes of different classes, their scores ``p1`` and ``p2``. A cell counts
  once, by the box that beats every rival over it.

Classes are where a few labels are worth most (issue 31: labelling every tile adds +0.5 to
+2.7 any-class F1 but +3.1 to +7.6 per class), so a tile whose cells the model cannot tell
apart is worth the user's next minutes as much as one whose cells it cannot find. Empty
tiles and tiles the model already gets with confidence rank last.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .boxes import Boxes, iou_matrix
from .tiles import Tile

#: Boxes overlapping at least this much (IoU) are taken as one cell seen as two classes.
SAME_CELL_IOU = 0.5


def _rivals(boxes: Boxes, iou: float) -> np.ndarray:
    """(N, N): box j is of another class than box i, over the same cell."""
    other_class = boxes.class_ids[:, None] != boxes.class_ids[None]
    return (iou_matrix(boxes.xyxy, boxes.xyxy) >= iou) & other_class


def _runner_up(scores: np.ndarray, rivals: np.ndarray) -> np.ndarray:
    return np.where(rivals, scores[None], 0.0).max(axis=1)


def runner_up_scores(boxes: Boxes, iou: float = SAME_CELL_IOU) -> np.ndarray:
    """Per box, the best score of a box of another class over the same cell (IoU >= ``iou``);
    0 where there is none."""
    if len(boxes) == 0:
        return np.zeros(0)
    return _runner_up(np.nan_to_num(boxes.scores, nan=1.0), _rivals(boxes, iou))


def class_doubts(boxes: Boxes, iou: float = SAME_CELL_IOU) -> np.ndarray:
    """Per cell (a box no rival over it beats; of tied ones, the first): the box's class
    doubt, or where the detector gave none, ``2 p2 / (p1 + p2)`` from its rivals; in [0, 1]."""
    if len(boxes) == 0:
        return np.zeros(0)
    p1 = np.nan_to_num(boxes.scores, nan=1.0)
    rivals = _rivals(boxes, iou)
    p2 = _runner_up(p1, rivals)
    order = np.arange(len(boxes))
    beats_me = (p1[None] > p1[:, None]) | ((p1[None] == p1[:, None]) & (order[None] < order[:, None]))
    winner = ~(rivals & beats_me).any(axis=1)
    total = p1 + p2
    estimate = np.where(total > 0, 2 * p2 / np.where(total > 0, total, 1), 0.0)
    doubt = np.where(np.isfinite(boxes.class_doubt), boxes.class_doubt, estimate)
    return np.clip(doubt[winner], 0.0, 1.0)


def presence_doubts(boxes: Boxes) -> np.ndarray:
    """Per box, the binary entropy of its score in bits."""
    s = np.clip(np.nan_to_num(boxes.scores, nan=1.0), 1e-6, 1 - 1e-6)
    return -(s * np.log2(s) + (1 - s) * np.log2(1 - s))


@dataclass(frozen=True)
class Doubt:
    """How unsure the model is about a tile's predictions: what *Suggest next* ranks by."""

    presence: float  # bits summed over the boxes
    classes: float  # class doubts summed over the cells
    torn: int  # cells whose two best classes are within a factor of 2 (doubt > 2/3)

    @property
    def total(self) -> float:
        return self.presence + self.classes

    def describe(self) -> str:
        return (f"the model hesitates on its boxes ({self.presence:.1f} bits)"
                + (f" and on the class of {self.torn} cell{'s' * (self.torn != 1)}" if self.torn else ""))


def tile_doubt(tile: Tile) -> Doubt:
    classes = class_doubts(tile.predictions)
    return Doubt(float(presence_doubts(tile.predictions).sum()), float(classes.sum()), int((classes > 2 / 3).sum()))


def rank_unlabelled(tiles: list[Tile]) -> list[tuple[Tile, Doubt]]:
    """Tiles not fully annotated (unlabelled and partial), most doubtful first (ties keep
    the tile order)."""
    scored = [(t, tile_doubt(t)) for t in tiles if not t.is_labelled]
    return sorted(scored, key=lambda td: -td[1].total)
