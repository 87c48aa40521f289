"""The viewer side of a project: one tile on screen at a time, kept in sync with the store.

The project's ``TileSet`` is the one record; the three layers (the tile's image, its
annotations, its predictions) are views of the current tile. Switching tiles first
writes the layers back into the store, then shows the new tile, so the Shapes layers
never hold more than one tile's boxes and stay fast with thousands of boxes in all.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from ..data.boxes import Boxes, BoxSource
from ..data.classes import ClassList
from ..data.errors import ImageReadError, NapariRmtError
from ..data.project import Project
from ..data.suggest import rank_unlabelled
from ..data.tiles import Tile, TileStatus
from .layers import (
    ANNOTATION_LAYER,
    EDGE_PX,
    IMAGE_LAYER,
    PREDICTION_LAYER,
    PREDICTION_SHADE,
    SOURCE_NAMES,
    boxes_to_rectangles,
    camera_of,
    class_colours,
    describe_shape,
    paint_boxes,
    rectangles_to_boxes,
)


class Session:
    """Binds a ``Project`` to a napari viewer."""

    def __init__(
        self,
        viewer,
        project: Project,
        on_change: Callable[[], None] | None = None,
        on_hover: Callable[[str], None] | None = None,
    ) -> None:
        self.viewer = viewer
        self.on_hover = on_hover
        self._edge: dict[str, float] = {}
        self._hover_text = ""
        self.project = project
        self.index = 0
        #: why *Suggest next* went where it went ("" before it has)
        self.suggestion = ""
        self.current_class = self.classes.names[0] if len(self.classes) else ""
        self.score_threshold = 0.5
        self.on_change = on_change
        self._updating = False
        self._hidden_predictions = Boxes()
        self.hidden_kept = 0  # predictions the last Accept tile left hidden (kept, not dropped)
        self.image_error: str | None = None  # why the tile on screen has no pixels, if it has none
        self._shown = False
        self._counts: dict[str, int] = {}
        self._make_layers()
        self.show_tile(0)
        viewer.reset_view()
        if self.tile.window:
            self.frame_tile()

    # ------------------------------------------------------------------ properties
    @property
    def tileset(self):
        return self.project.tileset

    @property
    def classes(self) -> ClassList:
        return self.project.tileset.classes

    @property
    def tile(self) -> Tile:
        return self.tileset[self.index]

    # ------------------------------------------------------------------ layers
    def _make_layers(self) -> None:
        for name in (IMAGE_LAYER, ANNOTATION_LAYER, PREDICTION_LAYER):
            if name in self.viewer.layers:
                self.viewer.layers.remove(name)
        first = self.tileset[0]
        self.image = self.viewer.add_image(
            np.zeros((first.height, first.width, 3), np.uint8), name=IMAGE_LAYER, rgb=True
        )
        self.annotations = self._add_shapes(ANNOTATION_LAYER)
        self.predictions = self._add_shapes(PREDICTION_LAYER)
        for layer in (self.annotations, self.predictions):
            layer.events.data.connect(self._on_data)
            layer.events.features.connect(self._on_data)
            layer.mouse_move_callbacks.append(self._on_mouse_move)
        self.viewer.layers.selection.active = self.annotations

    def _add_shapes(self, name: str):
        names = self.classes.names
        import pandas as pd

        layer = self.viewer.add_shapes(
            name=name,
            ndim=2,
            shape_type="rectangle",
            face_color="transparent",
            edge_width=self._edge.setdefault(name, self._edge_for(name)),
            opacity=1.0,
            features=pd.DataFrame(
                {
                    "class": pd.Categorical([], categories=names),
                    "score": np.zeros(0),
                    "source": pd.Categorical([], categories=list(SOURCE_NAMES.values())),
                    "class_doubt": np.zeros(0),
                }
            ),
        )
        layer.feature_defaults = feature_defaults(self.current_class)
        layer.current_edge_color = self.classes.by_name(self.current_class).hex if names else "white"
        if name == PREDICTION_LAYER and names:
            layer.current_face_color = self.classes.by_name(self.current_class).hex + PREDICTION_SHADE
        return layer

    def _edge_for(self, name: str) -> float:
        return EDGE_PX[name] / max(float(camera_of(self.viewer).zoom), 1e-6)

    def fit_edges(self) -> None:
        """Edges back to their screen width after a zoom (only when it moved by 10 %: each
        change redraws every shape)."""
        for layer in (self.annotations, self.predictions):
            width = self._edge_for(layer.name)
            if abs(self._edge.get(layer.name, 0.0) - width) > 0.1 * width:
                self._edge[layer.name] = width
                self._apply_edge(layer)

    def _apply_edge(self, layer) -> None:
        width = self._edge.get(layer.name)
        if width is None:
            return
        layer.current_edge_width = width
        if len(layer.data):
            layer.edge_width = width

    def _on_mouse_move(self, layer, event) -> None:
        """Say which box is under the pointer, with its score: napari's status bar shows a
        Shapes layer's index, not its features."""
        text = describe_shape(layer, layer.get_value(event.position, world=True))
        if text != self._hover_text and self.on_hover is not None:
            self._hover_text = text
            self.on_hover(text)

    def _on_data(self, event=None) -> None:
        if self._updating:
            return
        if event is not None and str(getattr(event, "action", "")) == "removing":
            self._remember_deleted(event)
            return  # the "removed" event that follows does the rest
        # New rectangles take the current class (napari's feature defaults do not always
        # reach a layer that was emptied); colours always follow the class feature.
        for layer in (self.annotations, self.predictions):
            n, before = len(layer.data), self._counts.get(layer.name, 0)
            if n > before and str(event is not None and getattr(event, "action", "")) != "adding":
                feats = layer.features.copy()
                feats.loc[before:, "class"] = self.current_class
                self._updating = True
                try:
                    layer.features = feats
                finally:
                    self._updating = False
            self._counts[layer.name] = n
        self._recolour(self.annotations)
        self._recolour(self.predictions)
        if self.on_change is not None:
            self.on_change()

    def _remember_deleted(self, event) -> None:
        """A box the user deletes (an annotation or a prediction) is a place they said
        holds no cell: the tile keeps it (``Tile.rejected``), so that the nucleus model's
        cells of a partial tile are not taught there. The layer is read before napari
        removes the shapes (the "removing" event)."""
        layer = event.source
        indices = [i for i in getattr(event, "data_indices", ()) if isinstance(i, int) and 0 <= i < len(layer.data)]
        if not indices:
            return
        xyxy, _ = rectangles_to_boxes([layer.data[i] for i in indices])
        self.tile.reject(xyxy)

    def _recolour(self, layer) -> None:
        n = len(layer.data)
        if n == 0:
            return
        names = [str(v) for v in layer.features["class"]]
        bad = [v for v in names if v not in self.classes]
        if bad:
            return
        ids = np.array([self.classes.by_name(v).id for v in names])
        self._paint(layer, ids)

    def _paint(self, layer, class_ids: np.ndarray) -> None:
        self._updating = True
        try:
            paint_boxes(layer, class_colours(self.classes, class_ids), shaded=layer.name == PREDICTION_LAYER)
        finally:
            self._updating = False

    def _set_layer_boxes(self, layer, boxes: Boxes) -> None:
        """Replace a layer's shapes in one assignment (napari builds each shape once)."""
        import pandas as pd

        self._updating = True
        try:
            layer.selected_data = set()
            if len(boxes) or len(layer.data):
                layer.data = list(boxes_to_rectangles(boxes.xyxy))
                layer.features = pd.DataFrame(
                    {
                        "class": pd.Categorical(
                            [self.classes.by_id(int(c)).name for c in boxes.class_ids],
                            categories=self.classes.names,
                        ),
                        "score": boxes.scores,
                        "source": pd.Categorical(
                            [SOURCE_NAMES[BoxSource(int(s))] for s in boxes.sources],
                            categories=list(SOURCE_NAMES.values()),
                        ),
                        "class_doubt": boxes.class_doubt,
                    }
                )
                if len(boxes):
                    self._paint(layer, boxes.class_ids)
                self._apply_edge(layer)  # napari gives new shapes width 1
            # Each of these assignments redraws the layer's thumbnail: only when they change.
            fd = layer.feature_defaults
            if (
                len(fd) != 1
                or str(fd["class"].iloc[0]) != self.current_class
                or fd["source"].iloc[0] != "manual"
            ):
                layer.feature_defaults = feature_defaults(self.current_class)
            colour = self.classes.by_name(self.current_class).hex
            if str(layer.current_edge_color).lower()[:7] != colour.lower()[:7]:
                layer.current_edge_color = colour
                if layer.name == PREDICTION_LAYER:
                    layer.current_face_color = colour + PREDICTION_SHADE
            self._counts[layer.name] = len(layer.data)
        finally:
            self._updating = False

    def _layer_boxes(self, layer) -> Boxes:
        n = len(layer.data)
        if n == 0:
            return Boxes()
        xyxy, _ = rectangles_to_boxes(layer.data)
        feats = layer.features
        ids = []
        for i, v in enumerate(feats["class"]):
            if str(v) not in self.classes:
                raise NapariRmtError(
                    f"{layer.name} shape {i}: class {v!r} is not one of {self.classes.names}"
                )
            ids.append(self.classes.by_name(str(v)).id)
        scores = np.asarray(feats["score"], dtype=float)
        by_name = {v: k for k, v in SOURCE_NAMES.items()}
        sources = [int(by_name.get(str(s), BoxSource.MANUAL)) for s in feats["source"]]
        t = self.tile
        xyxy[:, [0, 2]] = np.clip(xyxy[:, [0, 2]], 0, t.width)
        xyxy[:, [1, 3]] = np.clip(xyxy[:, [1, 3]], 0, t.height)
        keep = (xyxy[:, 2] > xyxy[:, 0]) & (xyxy[:, 3] > xyxy[:, 1])
        doubt = np.asarray(feats["class_doubt"], dtype=float) if "class_doubt" in feats else ()
        return Boxes(xyxy, ids, scores, sources, class_doubt=doubt)[keep]

    # ------------------------------------------------------------------ sync
    def pull(self) -> None:
        """Layers -> store for the tile on screen (before switching, training, saving)."""
        t = self.tile
        t.boxes = self._layer_boxes(self.annotations)
        shown = self._layer_boxes(self.predictions)
        t.predictions = Boxes.concatenate([shown, self._hidden_predictions])
        # a tile the user has not called complete is partial while it has boxes
        t.status = TileStatus.of_boxes(t.status, len(t.boxes))

    def show_tile(self, index: int) -> None:
        if not 0 <= index < len(self.tileset):
            raise NapariRmtError(f"tile index {index} is outside 0..{len(self.tileset) - 1}")
        if self._shown:
            self.pull()
        self.index = index
        self._shown = True
        t = self.tile
        try:
            self.image.data = t.pixels()
            self.image_error = None
        except ImageReadError as exc:
            # A missing or damaged image does not hide the tile's boxes: they are shown over
            # a grey field of the tile's size, and the error is kept for the widget to say.
            self.image.data = np.full((t.height, t.width, 3), 128, dtype=np.uint8)
            self.image_error = str(exc)
        self.image.metadata["tile_id"] = t.id
        # A window of a large image sits at its place over the whole-image overview;
        # layer data stay in tile pixels, the translation is napari's.
        offset = (float(t.origin[1]), float(t.origin[0])) if t.window else (0.0, 0.0)
        for layer in (self.image, self.annotations, self.predictions):
            if tuple(layer.translate) != offset:
                layer.translate = offset
        if t.window:
            camera_of(self.viewer).center = (offset[0] + t.height / 2, offset[1] + t.width / 2)
        self._set_layer_boxes(self.annotations, t.boxes)
        self._show_predictions()
        self._caption()

    def frame_tile(self) -> None:
        """Centre and zoom the camera on the tile (a window of a large image)."""
        t = self.tile
        h, w = self.viewer.canvas.size
        camera_of(self.viewer).center = (t.origin[1] + t.height / 2, t.origin[0] + t.width / 2)
        camera_of(self.viewer).zoom = 0.9 * min(h / t.height, w / t.width)

    def _show_predictions(self) -> None:
        p = self.tile.predictions
        visible = p.visible(self.score_threshold)
        self._hidden_predictions = p[~visible]
        self._set_layer_boxes(self.predictions, p[visible])

    def set_score_threshold(self, value: float) -> None:
        self.pull()
        self.score_threshold = float(value)
        self._show_predictions()

    def next_tile(self, step: int = 1) -> None:
        self.show_tile((self.index + step) % len(self.tileset))

    # ------------------------------------------------------------------ classes
    def set_class(self, name: str) -> None:
        """Make ``name`` the class of new boxes, and re-class the selected ones."""
        cls = self.classes.by_name(name)
        self.current_class = cls.name
        for layer in (self.annotations, self.predictions):
            layer.feature_defaults = feature_defaults(cls.name)
            layer.current_edge_color = cls.hex
            if layer is self.predictions:
                layer.current_face_color = cls.hex + PREDICTION_SHADE
            sel = sorted(layer.selected_data)
            if sel:
                feats = layer.features.copy()
                feats.loc[sel, "class"] = cls.name
                layer.features = feats
                self._recolour(layer)
        if self.on_change is not None:
            self.on_change()

    # ------------------------------------------------------------------ review
    def set_labelled(self, labelled: bool) -> None:
        """The user's word on whether every cell of the tile has a box; untold, a tile
        with boxes is partly annotated."""
        t = self.tile
        t.status = TileStatus.LABELLED if labelled else TileStatus.of_boxes(TileStatus.UNLABELLED, len(t.boxes))
        self._changed()

    def accept_tile(self) -> int:
        """The shown predictions become this tile's annotations.

        The tile becomes partly annotated, never fully by itself: the detector misses
        cells, and the score cut may hide some, so "every cell has a box" is the user's
        word (the fully-annotated tick), not the accept's. A tile already ticked stays so.
        Predictions hidden by the score cut are never dropped: they stay predictions
        (``hidden_kept`` says how many). When every prediction is hidden nothing is
        accepted and the tile keeps its status.
        """
        self.pull()
        t = self.tile
        accepted = self._layer_boxes(self.predictions)
        hidden = self._hidden_predictions
        self.hidden_kept = len(hidden)
        if not len(accepted) and len(hidden):
            raise NapariRmtError(
                f"all {len(hidden)} predictions of this tile are hidden by the score cut "
                f"({self.score_threshold:.2f}); lower the cut to review them, or accept selected boxes"
            )
        t.boxes = Boxes.concatenate([t.boxes, accepted.with_source(BoxSource.PREDICTED)])
        t.predictions = hidden
        t.status = TileStatus.of_boxes(t.status, len(t.boxes))
        self._set_layer_boxes(self.annotations, t.boxes)
        self._show_predictions()
        self._changed()
        return len(accepted)

    def accept_selected(self) -> int:
        """Move the selected predicted boxes into the annotations."""
        sel = sorted(self.predictions.selected_data)
        if not sel:
            return 0
        self.pull()
        shown = self._layer_boxes(self.predictions)
        mask = np.zeros(len(shown), dtype=bool)
        mask[sel] = True
        t = self.tile
        t.boxes = Boxes.concatenate([t.boxes, shown[mask].with_source(BoxSource.PREDICTED)])
        t.predictions = Boxes.concatenate([shown[~mask], self._hidden_predictions])
        t.status = TileStatus.of_boxes(t.status, len(t.boxes))
        self._set_layer_boxes(self.annotations, t.boxes)
        self._show_predictions()
        self._changed()
        return int(mask.sum())

    def suggest_next(self) -> Tile | None:
        """Go to the tile not fully annotated whose predictions the model is least sure of,
        about presence or class (``data.suggest``; None when all are fully annotated).
        ``suggestion`` says why, for the status line."""
        self.pull()
        ranked = rank_unlabelled(list(self.tileset))
        if not ranked:
            self.suggestion = ""
            return None
        target, doubt = ranked[0]
        self.show_tile(next(i for i, t in enumerate(self.tileset) if t.id == target.id))
        self.suggestion = f"{target.name}: {doubt.describe()}"
        return target

    def refresh(self) -> None:
        """Re-show the current tile after the store changed (new predictions)."""
        t = self.tile
        self._set_layer_boxes(self.annotations, t.boxes)
        self._show_predictions()
        self._caption()

    def _caption(self) -> None:
        """The tile's name, position and status in the canvas corner."""
        overlay = (
            self.viewer.canvas.overlays.text if hasattr(self.viewer, "canvas") else self.viewer.text_overlay
        )
        overlay.visible = True
        t = self.tile
        overlay.text = f"{t.name}  ({self.index + 1}/{len(self.tileset)}, {status_word(t)})"

    def _changed(self) -> None:
        self._caption()
        if self.on_change is not None:
            self.on_change()


def feature_defaults(class_name: str) -> dict:
    """What a box drawn by hand gets in a layer's features: the class picked, no score, no
    class doubt."""
    return {"class": class_name, "score": np.nan, "source": "manual", "class_doubt": np.nan}


def status_word(t: Tile) -> str:
    """How a tile's state reads in the list and on the canvas (one word, the same in both):
    its status, or "predicted" for an unlabelled tile that has predictions."""
    if t.status is TileStatus.UNLABELLED and len(t.predictions):
        return "predicted"
    return t.status.value
