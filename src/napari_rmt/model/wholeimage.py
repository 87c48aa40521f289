"""Detection over a whole large image: overlapping windows, batched, stitched.

Memory is bounded by one batch of windows (plus the boxes found): the image is read
window by window from its lazy array, never whole.

Each window of the grid is read with a margin of context around it (the detector
sees ``window + 2 * context`` px); the stitching rule, for a context wider than the
largest cell:

1. Each window's detections get the usual score threshold and class-agnostic NMS.
2. A box that touches an edge of the pixels read that lies inside the image is a cell
   cut by that edge; it is dropped, because the window that owns it sees it whole.
3. A box is kept only by the window that *owns* its centre (``Window.owned``: the owned
   regions meet in the middle of each overlap and partition the image), so a cell
   seen whole by two windows is counted once.
4. The same cell seen by two windows can still land with its centre on both sides of
   an owned border (the two windows see slightly different context); boxes whose
   centres lie near a border go through NMS together with the neighbouring windows'
   boxes near the same border, and the higher score wins.

Windows start on multiples of the stride (see ``data.large.tile_grid``) and only
windows of one shape are batched together, so the padding torchvision adds is the
padding a pass over the whole image would add at the image's right and bottom edges;
with a stride and a context that are multiples of 64 px (FPN's coarsest level) every
window sees its pixels in phase with the whole-image pass.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from torch import nn
from torchvision.ops import nms

from ..data.boxes import Boxes
from ..data.classes import ClassList
from ..data.errors import NapariRmtError
from ..data.large import LargeImage, Window, tile_grid
from ..data.scale import resample, scaled_size
from ..data.tissue import TissueMask
from .config import PREDICTION_FLOOR
from .options import DetectOptions
from .predict import detections_to_boxes, image_tensor, kept_boxes, map_back, predict_images, select

# A floor on RPN objectness for windows and whole images. Measured on a 768 px MoNuSeg
# window with a CoNSeP-trained ResNet-18: 0.01 kept every box that scored >= 0.3 without
# a floor and halved the time (the box head ran on fewer proposals); 0.05 lost 30 %.
DEFAULT_OBJECTNESS = 0.01


#: A window's proposals are pooled only where they reach its owned region grown by this many
#: image pixels (``DetectOptions.within``); None pools them all. A box is kept only by the
#: window that owns its centre, and a nucleus's box lies within a few pixels of its
#: proposal, so a proposal 32 px clear of the owned region cannot make a kept box. With
#: 128 px of context around a 512 px window, 44 % of the pixels read lie beyond it, and
#: RoIAlign and the box head were half of a tissue window's time: a slide with the mask now
#: takes 0.81 of the time, with the same boxes (docs/benchmarks.md).
OWNED_MARGIN: int | None = 32


def detect_options(
    per_image: int | None, objectness: float | None = None, per_cell: int | None = None
) -> DetectOptions:
    """What the RPN and the box head keep of a large input, by a local rule.

    Count limits are global to an input: which proposals survive a count depends on the
    rest of the window, so a cell could be found in a window and lost in a whole-image
    pass. With ``objectness`` (a floor on the RPN's proposal probability) the rule is
    local: the floor, and at most ``per_cell`` proposals per cell of the input
    (``model.proposals.LocalRPN``); no count per input applies. By default ``per_cell``
    gives a window the density of proposals that the model keeps on a 256 px tile
    (``proposals.tile_density_per_cell``), so whole images are judged as tiles are.
    Without a floor, ``per_image`` is the least number each stage may keep (torchvision's
    counts).
    """
    if objectness is not None:
        return DetectOptions(objectness=objectness, per_cell=per_cell)
    return DetectOptions(per_image=per_image)


def limit_for_area(width: int, height: int) -> int:
    """Proposals / detections to allow for a window when there is no objectness floor:
    one per 16 x 16 px of area.

    Nuclei at 40x are 12-30 px across (CoNSeP: one per ~1,500 px²), so this is several
    times the densest tissue's cells, though a weak model's proposals can outnumber it
    (see ``detect_options``).
    """
    return max(300, (width * height) // 256)


def read_region(w: Window, image: LargeImage, context: int) -> tuple[int, int, int, int]:
    """The pixels the detector sees for window ``w``: the window and ``context`` px of
    image around it, cut at the image border, as ``(x, y, width, height)``."""
    x0, y0 = max(0, w.x - context), max(0, w.y - context)
    x1 = min(image.width, w.x + w.width + context)
    y1 = min(image.height, w.y + w.height + context)
    return x0, y0, x1 - x0, y1 - y0


def _window_boxes(
    det: dict[str, torch.Tensor],
    w: Window,
    region: tuple[int, int, int, int],
    image: LargeImage,
    score_threshold: float,
    nms_iou: float | None,
    touch_px: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    keep = select(det["boxes"], det["scores"], det["labels"], score_threshold, nms_iou)
    boxes, scores, labels = det["boxes"][keep], det["scores"][keep], det["labels"][keep]
    rx, ry, rw, rh = region
    ok = torch.ones(len(boxes), dtype=torch.bool)
    if rx > 0:
        ok &= boxes[:, 0] > touch_px
    if ry > 0:
        ok &= boxes[:, 1] > touch_px
    if rx + rw < image.width:
        ok &= boxes[:, 2] < rw - touch_px
    if ry + rh < image.height:
        ok &= boxes[:, 3] < rh - touch_px
    boxes = boxes[ok] + torch.tensor([rx, ry, rx, ry], dtype=boxes.dtype)
    scores, labels = scores[ok], labels[ok]
    cx, cy = (boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2
    x0, y0, x1, y1 = w.owned
    owned = (cx >= x0) & (cx < x1) & (cy >= y0) & (cy < y1)
    return boxes[owned], scores[owned], labels[owned]


class _Stitcher:
    """Collects owned boxes window by window and settles duplicates at owned borders."""

    def __init__(self, image: LargeImage, margin: float, nms_iou: float) -> None:
        self.image = image
        self.margin = margin
        self.nms_iou = nms_iou
        self.boxes: list[torch.Tensor] = []
        self.scores: list[torch.Tensor] = []
        self.labels: list[torch.Tensor] = []
        self.alive: list[torch.Tensor] = []
        # (row, col) -> (chunk index, indices of boxes near an owned border)
        self.edge: dict[tuple[int, int], tuple[int, torch.Tensor]] = {}
        self.duplicates = 0

    def add(self, w: Window, boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor) -> None:
        k = len(self.boxes)
        self.boxes.append(boxes)
        self.scores.append(scores)
        self.labels.append(labels)
        self.alive.append(torch.ones(len(boxes), dtype=torch.bool))
        cx, cy = (boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2
        x0, y0, x1, y1 = w.owned
        m = self.margin
        near = torch.zeros(len(boxes), dtype=torch.bool)
        if x0 > 0:
            near |= cx < x0 + m
        if y0 > 0:
            near |= cy < y0 + m
        if x1 < self.image.width:
            near |= cx >= x1 - m
        if y1 < self.image.height:
            near |= cy >= y1 - m
        mine = torch.where(near)[0]
        self.edge[(w.row, w.col)] = (k, mine)
        neighbours = [
            self.edge[key]
            for key in (
                (w.row - 1, w.col - 1),
                (w.row - 1, w.col),
                (w.row - 1, w.col + 1),
                (w.row, w.col - 1),
            )
            if key in self.edge
        ]
        if mine.numel() and neighbours:
            self._settle([(k, mine), *neighbours])
        for key in [key for key in self.edge if key[0] < w.row - 1]:
            del self.edge[key]

    def _settle(self, groups: list[tuple[int, torch.Tensor]]) -> None:
        refs = [(k, idx[self.alive[k][idx]]) for k, idx in groups]
        refs = [(k, idx) for k, idx in refs if idx.numel()]
        if len(refs) < 2:
            return
        boxes = torch.cat([self.boxes[k][idx] for k, idx in refs])
        scores = torch.cat([self.scores[k][idx] for k, idx in refs])
        # Only pairs from different windows can be duplicates: within a window NMS ran already.
        survivors = torch.zeros(len(boxes), dtype=torch.bool)
        survivors[nms(boxes, scores, self.nms_iou)] = True
        start = 0
        for k, idx in refs:
            gone = idx[~survivors[start : start + len(idx)]]
            self.alive[k][gone] = False
            self.duplicates += int(gone.numel())
            start += len(idx)

    def result(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if not self.boxes:
            return torch.zeros((0, 4)), torch.zeros(0), torch.zeros(0, dtype=torch.int64)
        alive = torch.cat(self.alive)
        return (
            torch.cat(self.boxes)[alive],
            torch.cat(self.scores)[alive],
            torch.cat(self.labels)[alive],
        )


def iter_predict_large_image(
    model: nn.Module,
    image: LargeImage,
    classes: ClassList,
    window: int = 512,
    overlap: int = 0,
    context: int = 128,
    batch_size: int = 4,
    score_threshold: float = PREDICTION_FLOOR,
    nms_iou: float = 0.5,
    device: torch.device | str = "cpu",
    per_window_limit: int | None = None,
    objectness: float | None = DEFAULT_OBJECTNESS,
    per_cell: int | None = None,
    scale: float = 1.0,
    tissue: TissueMask | None = None,
) -> Generator[tuple[int, int], None, Boxes]:
    """Boxes over the whole image, in whole-image pixel coordinates.

    A generator: it yields ``(windows done, windows in all)`` after each batch (a GUI
    can stop between batches by not asking for more) and returns the boxes.

    ``window`` and ``overlap`` lay the grid (``data.large.tile_grid``); each window
    answers for its owned region. The detector sees each window with ``context`` px of
    the image around it, so that a cell near a window edge is judged with the same
    surroundings as in a whole-image pass: a CNN's features feel a window's edge far
    into it (measured on MoNuSeg, docs/benchmarks.md). ``context`` plus half the overlap
    must exceed the largest cell (the cut-cell rule relies on it). A stride
    ``window - overlap`` and a ``context`` that are multiples of 64 px keep every
    window in phase with the network's feature grid and with the cells of the
    proposal rule: an objectness floor (``objectness``) and at most ``per_cell``
    proposals per 64 px cell (``detect_options``), so that which proposals a cell gets
    does not depend on the window that sees it. With ``objectness=None`` torchvision's
    per-input counts apply instead, raised to ``per_window_limit``. With ``scale``
    (``data.scale``: the image's pixel size over the model's) the detector sees each read
    region resampled by it, and its boxes come back in the image's own pixels. With
    ``tissue`` (``data.tissue.tissue_mask``) windows that own only glass are not predicted.
    """
    plan = plan_windows(image, window, overlap, context, batch_size, per_window_limit, tissue)
    stitcher = plan.stitcher(nms_iou)
    done = 0
    options = detect_options(plan.limit, objectness, per_cell)
    for batch in plan.batches:
        for found in predict_window_batch(model, image, batch, score_threshold, nms_iou, device, options, scale):
            stitcher.add(*found)
        done += len(batch)
        yield done, plan.n_windows
    return stitched_boxes(stitcher, classes)


#: A batch of windows: each window with the region of the image its detector input covers.
WindowBatch = list[tuple[Window, tuple[int, int, int, int]]]


@dataclass
class WindowPlan:
    """How a large image is cut: batches of windows (row-major), the per-window box limit
    and the stitcher's margin. Computing the batches anywhere (another process, another
    machine) and stitching them here in this order gives the single-process result."""

    batches: list[WindowBatch]
    n_windows: int
    limit: int
    image: LargeImage
    margin: float
    #: windows of the grid left out (no tissue under their owned region)
    skipped: int = 0

    def stitcher(self, nms_iou: float) -> _Stitcher:
        return _Stitcher(self.image, margin=self.margin, nms_iou=nms_iou)


def plan_windows(
    image: LargeImage,
    window: int = 512,
    overlap: int = 0,
    context: int = 128,
    batch_size: int = 4,
    per_window_limit: int | None = None,
    tissue: TissueMask | None = None,
) -> WindowPlan:
    """The windows to predict, batched; with ``tissue``, only those whose owned region holds
    tissue (a box is kept by the window that owns its centre, so a window owning only glass
    could keep nothing but glass)."""
    if context < 0 or overlap // 2 + context < 16:
        raise NapariRmtError(
            f"whole-image prediction needs each window to see more than a cell beyond its edge "
            f"(overlap {overlap} / 2 + context {context} px < 16 px); use context=128"
        )
    grid = tile_grid(image.width, image.height, window, overlap)
    windows = grid if tissue is None else [w for w in grid if tissue.covers(*_owned_xywh(w)) > 0]
    side = window + 2 * context
    limit = per_window_limit or limit_for_area(min(side, image.width), min(side, image.height))
    # Row-major order matters to the stitcher; batches hold consecutive windows of one shape.
    batches: list[WindowBatch] = []
    for w in windows:
        region = read_region(w, image, context)
        if batches and len(batches[-1]) < batch_size and batches[-1][0][1][2:] == region[2:]:
            batches[-1].append((w, region))
        else:
            batches.append([(w, region)])
    return WindowPlan(batches, len(windows), limit, image, max(overlap / 2, 16.0), len(grid) - len(windows))


def _owned_xywh(w: Window) -> tuple[int, int, int, int]:
    x0, y0, x1, y1 = w.owned
    return x0, y0, x1 - x0, y1 - y0


def predict_window_batch(
    model: nn.Module,
    image: LargeImage,
    batch: WindowBatch,
    score_threshold: float,
    nms_iou: float,
    device: torch.device | str = "cpu",
    options: DetectOptions | None = None,
    scale: float = 1.0,
) -> list[tuple[Window, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Each window's owned boxes (whole-image coordinates) for one batch of windows, the
    detector keeping what ``options`` says (``detect_options`` of the plan's limit) and
    seeing each region resampled by ``scale``."""
    tensors = [image_tensor(resample(image.read(*region), scale)) for _, region in batch]
    if options is not None and options.objectness is not None and OWNED_MARGIN is not None:
        options = replace(
            options, within=tuple(_owned_in_input(w, region, t, OWNED_MARGIN) for (w, region), t in zip(batch, tensors, strict=True))
        )
    dets = predict_images(model, tensors, batch_size=len(batch), device=device, options=options)
    if scale != 1.0:
        dets = [
            {**d, "boxes": map_back(d["boxes"], region[2:], scaled_size(*region[2:], scale))}
            for d, (_, region) in zip(dets, batch, strict=True)
        ]
    return [
        (w, *_window_boxes(det, w, region, image, score_threshold, nms_iou, touch_px=1.0))
        for (w, region), det in zip(batch, dets, strict=True)
    ]


def _owned_in_input(
    w: Window, region: tuple[int, int, int, int], tensor: torch.Tensor, margin: int
) -> tuple[float, float, float, float]:
    """Window ``w``'s owned region grown by ``margin`` px, in the pixels of its detector
    input (the read ``region``, resampled to ``tensor``'s size)."""
    rx, ry, rw, rh = region
    sx, sy = tensor.shape[-1] / rw, tensor.shape[-2] / rh
    x0, y0, x1, y1 = w.owned
    return ((x0 - margin - rx) * sx, (y0 - margin - ry) * sy, (x1 + margin - rx) * sx, (y1 + margin - ry) * sy)


def stitched_boxes(stitcher: _Stitcher, classes: ClassList) -> Boxes:
    boxes, scores, labels = stitcher.result()
    order = torch.argsort(scores, descending=True)
    return detections_to_boxes(boxes[order], scores[order], labels[order], classes)


def predict_large_image(
    model: nn.Module,
    image: LargeImage,
    classes: ClassList,
    progress: Callable[[int, int], None] | None = None,
    **options: Any,
) -> Boxes:
    """``iter_predict_large_image`` run to the end, reporting ``(done, total)`` windows
    to ``progress``; ``options`` are that function's keyword arguments."""
    steps = iter_predict_large_image(model, image, classes, **options)
    while True:
        try:
            done, total = next(steps)
        except StopIteration as stop:
            return stop.value
        if progress is not None:
            progress(done, total)


def predict_whole_at_once(
    model: nn.Module,
    pixels: np.ndarray,
    classes: ClassList,
    score_threshold: float = PREDICTION_FLOOR,
    nms_iou: float = 0.5,
    device: torch.device | str = "cpu",
    limit: int | None = None,
    objectness: float | None = DEFAULT_OBJECTNESS,
    per_cell: int | None = None,
) -> Boxes:
    """One pass over an image that fits in memory, by the windows' rule for proposals.

    The reference that windowed prediction is checked against.
    """
    h, w = pixels.shape[:2]
    options = detect_options(limit or limit_for_area(w, h), objectness, per_cell)
    det = predict_images(model, [image_tensor(pixels)], batch_size=1, device=device, options=options)[0]
    keep = select(det["boxes"], det["scores"], det["labels"], score_threshold, nms_iou)
    return kept_boxes(det, keep, classes)
