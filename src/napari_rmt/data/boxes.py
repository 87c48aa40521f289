"""Cell boxes, stored column-wise.

A tile can hold hundreds of boxes and a project tens of thousands, and every consumer
(the detector, the metrics, napari's Shapes layer) wants arrays, so boxes live in one
``Boxes`` record of parallel numpy columns rather than in a list of objects.
Coordinates are pixels, ``x0 <= x1`` and ``y0 <= y1``, in the tile's own frame.
"""

from __future__ import annotations

import enum
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from .errors import AnnotationError, DataWarning


class BoxSource(enum.IntEnum):
    """Who made a box: the user draws MANUAL boxes, the model PREDICTED ones."""

    MANUAL = 0
    PREDICTED = 1


@dataclass(frozen=True)
class CellBox:
    """One box, for code that handles boxes one at a time (the GUI, tests)."""

    x0: float
    y0: float
    x1: float
    y1: float
    class_id: int
    score: float | None = None
    source: BoxSource = BoxSource.MANUAL

    @property
    def width(self) -> float:
        return self.x1 - self.x0

    @property
    def height(self) -> float:
        return self.y1 - self.y0


def _empty_f(n: int = 0, cols: int | None = None) -> np.ndarray:
    return np.zeros((n, cols) if cols else (n,), dtype=np.float64)


@dataclass
class Boxes:
    """Parallel columns: ``xyxy`` (N, 4), ``class_ids`` (N,), ``scores`` (N,), ``sources`` (N,),
    ``class_doubt`` (N,).

    ``scores`` is NaN where a box has no score (every manual box). ``class_doubt`` is how
    close the predicted class came to another (``model.heads.class_doubt``: 1 a tie, 0
    sure), NaN where unknown (manual boxes, predictions read from elsewhere).
    """

    xyxy: np.ndarray = field(default_factory=lambda: _empty_f(0, 4))
    class_ids: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    scores: np.ndarray = field(default_factory=_empty_f)
    sources: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int8))
    class_doubt: np.ndarray = field(default_factory=_empty_f)

    def __post_init__(self) -> None:
        self.xyxy = np.asarray(self.xyxy, dtype=np.float64).reshape(-1, 4)
        n = len(self.xyxy)
        self.class_ids = np.asarray(self.class_ids, dtype=np.int64).reshape(-1)
        self.scores = np.asarray(self.scores, dtype=np.float64).reshape(-1)
        self.sources = np.asarray(self.sources, dtype=np.int8).reshape(-1)
        if len(self.scores) == 0 and n:
            self.scores = np.full(n, np.nan)
        if len(self.sources) == 0 and n:
            self.sources = np.full(n, BoxSource.MANUAL, dtype=np.int8)
        self.class_doubt = np.asarray(self.class_doubt, dtype=np.float64).reshape(-1)
        if len(self.class_doubt) == 0 and n:
            self.class_doubt = np.full(n, np.nan)
        lengths = {len(self.class_ids), len(self.scores), len(self.sources), len(self.class_doubt)}
        if lengths != {n}:
            raise ValueError(
                f"Boxes columns differ in length: xyxy {n}, class_ids {len(self.class_ids)}, "
                f"scores {len(self.scores)}, sources {len(self.sources)}, class_doubt {len(self.class_doubt)}"
            )

    def visible(self, cut: float) -> np.ndarray:
        """Which boxes pass a score cut: score > ``cut`` (the paper's rule, the same for
        what the review shows and what evaluation counts); a box without a score (drawn
        by hand) always passes."""
        return np.isnan(self.scores) | (self.scores > cut)

    # -- construction ------------------------------------------------------------
    @classmethod
    def from_cells(cls, cells: Sequence[CellBox]) -> Boxes:
        return cls(
            xyxy=[[c.x0, c.y0, c.x1, c.y1] for c in cells],
            class_ids=[c.class_id for c in cells],
            scores=[np.nan if c.score is None else c.score for c in cells],
            sources=[int(c.source) for c in cells],
        )

    @classmethod
    def from_xywh(cls, xywh: np.ndarray, class_ids, scores=None, source=BoxSource.MANUAL) -> Boxes:
        xywh = np.asarray(xywh, dtype=np.float64).reshape(-1, 4)
        xyxy = xywh.copy()
        xyxy[:, 2:] += xyxy[:, :2]
        n = len(xyxy)
        return cls(
            xyxy=xyxy,
            class_ids=class_ids,
            scores=np.full(n, np.nan) if scores is None else scores,
            sources=np.full(n, int(source), dtype=np.int8),
        )

    @staticmethod
    def concatenate(parts: Sequence[Boxes]) -> Boxes:
        if not parts:
            return Boxes()
        return Boxes(
            xyxy=np.concatenate([p.xyxy for p in parts]),
            class_ids=np.concatenate([p.class_ids for p in parts]),
            scores=np.concatenate([p.scores for p in parts]),
            sources=np.concatenate([p.sources for p in parts]),
            class_doubt=np.concatenate([p.class_doubt for p in parts]),
        )

    # -- reading -----------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.xyxy)

    def __iter__(self) -> Iterator[CellBox]:
        for (x0, y0, x1, y1), c, s, src in zip(
            self.xyxy, self.class_ids, self.scores, self.sources, strict=True
        ):
            yield CellBox(
                float(x0),
                float(y0),
                float(x1),
                float(y1),
                int(c),
                None if np.isnan(s) else float(s),
                BoxSource(int(src)),
            )

    def __getitem__(self, index) -> Boxes:
        """Select rows with an index array, mask or slice; always returns ``Boxes``."""
        if isinstance(index, (int, np.integer)):
            index = [index]
        return Boxes(self.xyxy[index], self.class_ids[index], self.scores[index], self.sources[index],
                     self.class_doubt[index])

    @property
    def xywh(self) -> np.ndarray:
        out = self.xyxy.copy()
        out[:, 2:] -= out[:, :2]
        return out

    @property
    def areas(self) -> np.ndarray:
        return (self.xyxy[:, 2] - self.xyxy[:, 0]) * (self.xyxy[:, 3] - self.xyxy[:, 1])

    def counts_by_class(self) -> dict[int, int]:
        ids, counts = np.unique(self.class_ids, return_counts=True)
        return {int(i): int(c) for i, c in zip(ids, counts, strict=True)}

    def copy(self) -> Boxes:
        return Boxes(self.xyxy.copy(), self.class_ids.copy(), self.scores.copy(), self.sources.copy(),
                     self.class_doubt.copy())

    def with_source(self, source: BoxSource) -> Boxes:
        out = self.copy()
        out.sources[:] = int(source)
        return out

    def not_covered_by(self, other: Boxes, iou: float = 0.5) -> Boxes:
        """These boxes less those at ``iou`` or more of one of ``other``'s: a model's
        predictions on a partly annotated tile, less the cells the user already boxed."""
        if not len(self) or not len(other):
            return self.copy()
        return self[iou_matrix(self.xyxy, other.xyxy).max(axis=1) < iou]


def iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of every box in ``a`` (N, 4) with every box in ``b`` (M, 4), xyxy."""
    a = np.asarray(a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(b, dtype=np.float64).reshape(-1, 4)
    if len(a) == 0 or len(b) == 0:
        return np.zeros((len(a), len(b)))
    ix0 = np.maximum(a[:, None, 0], b[None, :, 0])
    iy0 = np.maximum(a[:, None, 1], b[None, :, 1])
    ix1 = np.minimum(a[:, None, 2], b[None, :, 2])
    iy1 = np.minimum(a[:, None, 3], b[None, :, 3])
    inter = np.clip(ix1 - ix0, 0, None) * np.clip(iy1 - iy0, 0, None)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    union = area_a[:, None] + area_b[None, :] - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, inter / union, 0.0)


def sanitize_boxes(
    boxes: Boxes,
    width: int,
    height: int,
    where: str,
    labels: Sequence[object] | None = None,
) -> Boxes:
    """Clip boxes to the image and drop those left with zero area, warning for each.

    ``where`` names the file or tile and ``labels`` names each box (an annotation id)
    so that the warning says exactly which box was changed. Non-finite coordinates
    cannot be repaired and raise.
    """
    if len(boxes) == 0:
        return boxes
    names = list(labels) if labels is not None else [f"#{i}" for i in range(len(boxes))]
    xyxy = boxes.xyxy
    bad = ~np.isfinite(xyxy).all(axis=1)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise AnnotationError(f"{where}: box {names[i]} has non-finite coordinates {xyxy[i].tolist()}")
    # Accept boxes given corner-swapped, as some tools write them.
    fixed = np.stack(
        [
            np.minimum(xyxy[:, 0], xyxy[:, 2]),
            np.minimum(xyxy[:, 1], xyxy[:, 3]),
            np.maximum(xyxy[:, 0], xyxy[:, 2]),
            np.maximum(xyxy[:, 1], xyxy[:, 3]),
        ],
        axis=1,
    )
    clipped = fixed.copy()
    clipped[:, [0, 2]] = np.clip(fixed[:, [0, 2]], 0, width)
    clipped[:, [1, 3]] = np.clip(fixed[:, [1, 3]], 0, height)
    moved = np.flatnonzero((clipped != fixed).any(axis=1))
    keep = (clipped[:, 2] > clipped[:, 0]) & (clipped[:, 3] > clipped[:, 1])
    for i in moved:
        if keep[i]:
            warnings.warn(
                f"{where}: box {names[i]} {fixed[i].tolist()} extends outside the "
                f"{width}x{height} image; clipped to {clipped[i].tolist()}",
                DataWarning,
                stacklevel=3,
            )
    for i in np.flatnonzero(~keep):
        warnings.warn(
            f"{where}: box {names[i]} {xyxy[i].tolist()} has zero area inside the "
            f"{width}x{height} image; dropped",
            DataWarning,
            stacklevel=3,
        )
    out = Boxes(clipped, boxes.class_ids, boxes.scores, boxes.sources)
    return out if keep.all() else out[keep]


def boxes_in_window(boxes, x: int, y: int, width: int, height: int, min_visible: float = 0.5):
    """Whole-image boxes seen through a window, in the window's coordinates.

    A cell cut by the window edge is kept, clipped, when at least ``min_visible`` of its
    box lies inside (enough of it to learn from); smaller slivers are left out rather
    than taught as whole cells.
    """
    if len(boxes) == 0:
        return Boxes()
    xyxy = boxes.xyxy - np.array([x, y, x, y], dtype=np.float64)
    clipped = np.clip(xyxy, 0, [width, height, width, height])
    area = np.prod(np.clip(xyxy[:, 2:] - xyxy[:, :2], 0, None), axis=1)
    inside = np.prod(np.clip(clipped[:, 2:] - clipped[:, :2], 0, None), axis=1)
    keep = (inside > 0) & (inside >= min_visible * np.maximum(area, 1e-12))
    return Boxes(
        xyxy=clipped[keep],
        class_ids=boxes.class_ids[keep],
        scores=boxes.scores[keep],
        sources=boxes.sources[keep],
    )


def boxes_to_image(boxes, origin: tuple[int, int]):
    """A window's boxes in whole-image coordinates."""
    shift = np.array([origin[0], origin[1], origin[0], origin[1]], dtype=np.float64)
    return Boxes(
        xyxy=boxes.xyxy + shift, class_ids=boxes.class_ids, scores=boxes.scores, sources=boxes.sources
    )
