"""The large image in the viewer: the whole field, its tile grid, whole-image predictions.

The tile being annotated is still shown by the ``Session`` (its layers translated to
the tile's place), over an overview of the whole image. Whole-image predictions can
number hundreds of thousands: they are drawn as points (one per cell, coloured by
class), and as editable-looking rectangles only for the part of the image in view
when that part holds few enough boxes to draw at once.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..data.boxes import Boxes
from ..data.classes import ClassList
from ..data.large import LargeImage
from ..data.tiles import Tile, TileStatus
from .layers import boxes_to_rectangles, camera_of, class_colours

OVERVIEW_LAYER = "whole image"
TISSUE_LAYER = "tissue"
GRID_LAYER = "tile grid"
CELLS_LAYER = "whole-image cells"
IN_VIEW_LAYER = "cells in view"
MAX_IN_VIEW = 3000  # rectangles drawn at once; beyond that the points tell the story

_STATUS_COLOUR = {
    TileStatus.UNLABELLED: "#8c8c8c",
    TileStatus.PARTIAL: "#7fb8ff",
    TileStatus.LABELLED: "#ffffff",
    TileStatus.REVIEWED: "#ffd21f",
}


def overview_data(image: LargeImage) -> tuple[list[Any] | Any, bool]:
    """Lazy (y, x[, c]) arrays for napari, one per pyramid level, and whether RGB."""
    import dask.array as da

    def yxc(a):
        # an OpenSlide level states its chunks (one read_region each); numpy gets dask's
        arr = da.from_zarr(a) if hasattr(a, "store") else da.from_array(a, chunks=getattr(a, "chunks", "auto"))
        keep = [i for i, ax in enumerate(image.axes) if ax in "yxc"]
        index = tuple(slice(None) if ax in "yxc" else 0 for ax in image.axes)
        arr = arr[index]
        kept = [image.axes[i] for i in keep]
        return arr.transpose([kept.index(ax) for ax in "yxc" if ax in kept])

    levels = [yxc(a) for a in image.levels]
    rgb = "c" in image.axes and levels[0].shape[-1] in (3, 4)
    return (levels if len(levels) > 1 else levels[0]), rgb


class WholeImageView:
    """Owns the overview layers of one large image."""

    def __init__(self, viewer, image: LargeImage, classes: ClassList, tissue=None, on_tissue_edited=None) -> None:
        """``tissue``: a slide's saved (edited) mask, else it is computed;
        ``on_tissue_edited(mask)`` is told of each edit of the tissue layer."""
        self.viewer = viewer
        self.image = image
        self.classes = classes
        self.boxes = Boxes()
        self.score_threshold = 0.5
        for name in (OVERVIEW_LAYER, TISSUE_LAYER, GRID_LAYER, CELLS_LAYER, IN_VIEW_LAYER):
            if name in viewer.layers:
                viewer.layers.remove(name)
        data, rgb = overview_data(image)
        self.overview = viewer.add_image(
            data, name=OVERVIEW_LAYER, rgb=rgb, multiscale=isinstance(data, list), contrast_limits=[0, 255]
        )
        self.grid = viewer.add_shapes(
            name=GRID_LAYER, ndim=2, face_color="transparent", edge_width=2, opacity=0.6
        )
        self.cells = None
        self.in_view = None
        #: a slide's tissue mask (``data/tissue.py``), shown over the overview; None otherwise
        self.tissue = None
        self.tissue_layer = None
        if image.path is not None:
            from ..data.tissue import cached_tissue_mask, is_slide

            if tissue is not None or is_slide(image):
                self.tissue = tissue if tissue is not None else cached_tissue_mask(str(image.path))
                d = self.tissue.downsample
                # its outline: the tissue stays visible under it, the glass plain
                self.tissue_layer = viewer.add_labels(
                    self.tissue.mask.astype(np.uint8), name=TISSUE_LAYER, scale=(d, d), opacity=0.9,
                    translate=((d - 1) / 2, (d - 1) / 2),
                )
                self.tissue_layer.contour = 2
                # the mask is the user's to correct: paint tissue (label 1) or erase glass (0)
                self.tissue_layer.events.paint.connect(lambda _e: self._tissue_edited(on_tissue_edited))
        # the overview, the tissue and the grid lie under the tile's own layers
        for layer in (self.grid, self.tissue_layer, self.overview):
            if layer is not None:
                viewer.layers.move(viewer.layers.index(layer), 0)

    def _tissue_edited(self, tell) -> None:
        from ..data.tissue import TissueMask

        self.tissue = TissueMask(np.asarray(self.tissue_layer.data) > 0, self.tissue.downsample)
        if tell is not None:
            tell(self.tissue)

    def show_grid(self, tiles: list[Tile]) -> None:
        rects = [
            np.array([[y, x], [y, x + t.width], [y + t.height, x + t.width], [y + t.height, x]], float)
            for t in tiles
            for x, y in [t.origin]
        ]
        self.grid.data = rects
        self.grid.shape_type = "rectangle"
        self.grid.edge_color = [_STATUS_COLOUR[t.status] for t in tiles]

    def show_predictions(self, boxes: Boxes | None = None, score_threshold: float | None = None) -> int:
        """Draw whole-image boxes (those at or above the score threshold) as points."""
        if boxes is not None:
            self.boxes = boxes
        if score_threshold is not None:
            self.score_threshold = score_threshold
        shown = self._shown()
        centres = np.stack(
            [(shown.xyxy[:, 1] + shown.xyxy[:, 3]) / 2, (shown.xyxy[:, 0] + shown.xyxy[:, 2]) / 2], axis=1
        )
        sizes = np.maximum(shown.xyxy[:, 2] - shown.xyxy[:, 0], shown.xyxy[:, 3] - shown.xyxy[:, 1])
        colours = class_colours(self.classes, shown.class_ids) if len(shown) else np.zeros((0, 4))
        features = {
            "class": [self.classes.by_id(int(c)).name for c in shown.class_ids],
            "score": shown.scores,
        }
        if self.cells is None or CELLS_LAYER not in self.viewer.layers:
            self.cells = self.viewer.add_points(
                centres, name=CELLS_LAYER, size=sizes if len(shown) else 10, face_color=colours if len(shown) else "white",
                border_width=0, opacity=0.5, features=features,
            )  # fmt: skip
        else:
            self.cells.data = centres
            self.cells.features = features
            if len(shown):
                self.cells.size = sizes
                self.cells.face_color = colours
        self.update_in_view()
        return len(shown)

    def _shown(self) -> Boxes:
        return self.boxes[self.boxes.visible(self.score_threshold)]

    def visible_region(self) -> tuple[float, float, float, float]:
        """(x0, y0, x1, y1) of the image in view, in image pixels."""
        cam = camera_of(self.viewer)
        cy, cx = cam.center[-2:]
        h, w = self.viewer.canvas.size
        zoom = max(cam.zoom, 1e-9)
        return cx - w / 2 / zoom, cy - h / 2 / zoom, cx + w / 2 / zoom, cy + h / 2 / zoom

    def update_in_view(self) -> int:
        """Rectangles for the boxes in view, when few enough; returns how many are drawn."""
        if not len(self.boxes):
            return 0
        x0, y0, x1, y1 = self.visible_region()
        shown = self._shown()
        inside = (
            (shown.xyxy[:, 2] >= x0)
            & (shown.xyxy[:, 0] <= x1)
            & (shown.xyxy[:, 3] >= y0)
            & (shown.xyxy[:, 1] <= y1)
        )
        part = shown[inside] if inside.sum() <= MAX_IN_VIEW else Boxes()
        rects = list(boxes_to_rectangles(part.xyxy))
        if self.in_view is None or IN_VIEW_LAYER not in self.viewer.layers:
            self.in_view = self.viewer.add_shapes(
                rects, name=IN_VIEW_LAYER, ndim=2, shape_type="rectangle", face_color="transparent",
                edge_width=1.5, edge_color=class_colours(self.classes, part.class_ids) if len(part) else "white",
            )  # fmt: skip
        else:
            self.in_view.data = rects
            self.in_view.shape_type = "rectangle"
            if len(part):
                self.in_view.edge_color = class_colours(self.classes, part.class_ids)
        if self.cells is not None:
            # points are for the zoomed-out view; rectangles take over where they are drawn
            self.cells.visible = len(part) == 0
        return len(part)

    def remove(self) -> None:
        for name in (OVERVIEW_LAYER, TISSUE_LAYER, GRID_LAYER, CELLS_LAYER, IN_VIEW_LAYER):
            if name in self.viewer.layers:
                self.viewer.layers.remove(name)
