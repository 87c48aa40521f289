"""What a run learnt, class by class, on annotated tiles it did not train on.

A user about to trust the stromal predictions needs "stromal: 12 boxes to learn from,
F1 0.18 on held-out tiles" first. The figures come from annotated tiles held out of the
run (``holdout_split``). On a fully annotated tile every prediction can be judged, so it
gives precision and recall; on a partly annotated one only the user's boxes are known, so
it gives recall alone (a prediction on an unboxed cell is neither right nor wrong there).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..data.classes import ClassList
from ..data.tiles import Tile, TileSet
from .metrics import f1_scores

#: Fewer annotated tiles than this and none is held out: each one is needed for training.
MIN_TILES_FOR_HOLDOUT = 10


def holdout_split(tiles: Sequence[Tile], share: float, seed: int = 0) -> tuple[list[Tile], list[Tile]]:
    """(kept for training, held out): ``share`` of the annotated tiles, at least one, drawn
    with ``seed``; none held out when there are fewer than ``MIN_TILES_FOR_HOLDOUT``."""
    tiles = list(tiles)
    if share <= 0 or len(tiles) < MIN_TILES_FOR_HOLDOUT:
        return tiles, []
    n = max(1, round(share * len(tiles)))
    held = set(np.random.default_rng(seed).choice(len(tiles), size=n, replace=False).tolist())
    return [t for i, t in enumerate(tiles) if i not in held], [t for i, t in enumerate(tiles) if i in held]


@dataclass
class ClassFigures:
    """One class's figures at the score cut: recall over the held-out tiles' boxes of the
    class, precision and F1 over the fully annotated ones (None without such a tile)."""

    name: str
    train_boxes: int
    held_boxes: int
    recall: float | None
    precision: float | None

    @property
    def f1(self) -> float | None:
        if self.precision is None or self.recall is None or self.precision + self.recall == 0:
            return None if self.precision is None or self.recall is None else 0.0
        return 2 * self.precision * self.recall / (self.precision + self.recall)

    def line(self, n_tiles: int) -> str:
        head = f"{self.name}: {self.train_boxes} boxes to learn from"
        if not self.held_boxes:
            return f"{head}; no box of it on the {n_tiles} held-out tiles"
        if self.f1 is not None:
            return (f"{head}, F1 {self.f1:.2f} (precision {self.precision:.2f}, recall {self.recall:.2f}) "
                    f"on {self.held_boxes} boxes of {n_tiles} held-out tiles")
        return f"{head}, recall {self.recall:.2f} on {self.held_boxes} boxes of {n_tiles} held-out tiles"


def class_figures(
    held: Sequence[Tile],
    predictions: Sequence,
    classes: ClassList,
    train_counts: dict[str, int],
    cut: float = 0.5,
) -> list[ClassFigures]:
    """Per-class figures of ``predictions`` (one ``Boxes`` per held-out tile) against the
    held-out tiles' boxes, at score ``cut`` (IoU 0.5, one-to-one, the protocol's rule)."""
    full = [(t.boxes, p) for t, p in zip(held, predictions, strict=True) if t.is_labelled]
    part = [(t.boxes, p) for t, p in zip(held, predictions, strict=True) if not t.is_labelled]
    on_full = f1_scores(full, classes.ids, score_threshold=cut)
    on_part = f1_scores(part, classes.ids, score_threshold=cut)
    out = []
    for c in classes:
        f, p = on_full[str(c.id)], on_part[str(c.id)]
        n_gt = f.n_gt + p.n_gt
        out.append(ClassFigures(
            name=c.name,
            train_boxes=train_counts.get(c.name, 0),
            held_boxes=n_gt,
            recall=(f.tp + p.tp) / n_gt if n_gt else None,
            precision=f.tp / f.n_pred if full and f.n_pred else (0.0 if full and f.n_gt else None),
        ))
    return out


def box_counts(tiles: Sequence[Tile], classes: ClassList) -> dict[str, int]:
    """Boxes per class name over ``tiles``, every class listed."""
    return TileSet(tiles, classes).counts_by_class()
