"""Conversion between the core's tiles/boxes and napari layer data.

napari Shapes rectangles are ``(4, D)`` vertex arrays in (row, col) order, with a
leading plane index when the tiles are shown as a stack. Box coordinates are (x, y)
pixels. This module is the one place where that swap happens, and the one place
where a layer's scale/translate is applied (exactly once), so the rest of the code
never thinks about it. It imports neither napari nor Qt: layer data is plain tuples.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..data.boxes import Boxes, BoxSource
from ..data.classes import ClassList
from ..data.errors import AnnotationError
from ..data.tiles import Tile, TileSet, TileStatus

META_KEY = "napari_rmt"
SOURCE_NAMES = {BoxSource.MANUAL: "manual", BoxSource.PREDICTED: "predicted"}
_SOURCE_BY_NAME = {v: k for k, v in SOURCE_NAMES.items()}
LayerData = tuple[Any, dict, str]


# ------------------------------------------------------------------ boxes <-> rectangles
def boxes_to_rectangles(xyxy: np.ndarray, plane: np.ndarray | int | None = None) -> np.ndarray:
    """(N, 4) xyxy boxes to (N, 4, D) napari rectangle vertices in (row, col) order."""
    xyxy = np.asarray(xyxy, dtype=np.float64).reshape(-1, 4)
    x0, y0, x1, y1 = xyxy.T
    rows = np.stack([y0, y0, y1, y1], axis=1)
    cols = np.stack([x0, x1, x1, x0], axis=1)
    verts = np.stack([rows, cols], axis=2)
    if plane is None:
        return verts
    planes = np.broadcast_to(np.asarray(plane, dtype=np.float64).reshape(-1, 1), (len(xyxy), 4))
    return np.concatenate([planes[:, :, None], verts], axis=2)


def rectangles_to_boxes(data: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray | None]:
    """napari shapes (any polygon) to their bounding xyxy boxes, and plane indices if 3D."""
    if len(data) == 0:
        return np.zeros((0, 4)), None
    arr = [np.asarray(d, dtype=np.float64) for d in data]
    ndim = arr[0].shape[1]
    if any(a.ndim != 2 or a.shape[1] != ndim for a in arr):
        raise AnnotationError("shapes of different dimensionality in one layer")
    mins = np.stack([a.min(axis=0) for a in arr])
    maxs = np.stack([a.max(axis=0) for a in arr])
    xyxy = np.stack([mins[:, -1], mins[:, -2], maxs[:, -1], maxs[:, -2]], axis=1)
    planes = np.rint(mins[:, 0]).astype(np.int64) if ndim == 3 else None
    return xyxy, planes


IMAGE_LAYER = "tile"
ANNOTATION_LAYER = "annotations"
PREDICTION_LAYER = "predictions"
#: Predictions are shaded in their class colour at this opacity, annotations are outlines:
#: light enough to see the nucleus through, enough to tell the two apart at a glance.
PREDICTION_ALPHA = 0.22
PREDICTION_SHADE = f"{round(255 * PREDICTION_ALPHA):02x}"  # the same, as a hex colour's alpha
#: Edge widths in screen pixels, kept at any zoom: napari's widths are image pixels, and a
#: fixed image width grows over 10 px nuclei when zoomed in.
EDGE_PX = {ANNOTATION_LAYER: 2.0, PREDICTION_LAYER: 1.25}



def camera_of(viewer):
    """napari 0.9 moved the camera to ``viewer.scene``; older versions have ``viewer.camera``."""
    scene = getattr(viewer, "scene", None)
    return scene.camera if scene is not None and hasattr(scene, "camera") else viewer.camera


def paint_boxes(layer, colours: np.ndarray, shaded: bool) -> None:
    """Edges in the class colours (RGBA per box); with ``shaded`` (predictions) the faces
    too, at ``PREDICTION_ALPHA``, so that a prediction never looks like an annotation
    (napari draws no dashed edges). Each colour is set only when it changes: every
    assignment redraws the layer."""
    wanted = [("edge_color", colours)]
    if shaded:
        shade = colours.copy()
        shade[:, 3] = PREDICTION_ALPHA
        wanted.append(("face_color", shade))
    for attr, value in wanted:
        have = getattr(layer, attr)
        if have.shape != value.shape or not np.allclose(have, value):
            setattr(layer, attr, value)


def describe_shape(layer, value) -> str:
    """A boxes layer's shape in words, from its feature table: "prediction: tumor, score
    0.87". ``value`` is what ``layer.get_value`` gives (shape index, vertex), or an index;
    "" when it names no shape."""
    index = value[0] if isinstance(value, tuple) else value
    if index is None or not 0 <= int(index) < len(layer.features):
        return ""
    row = layer.features.iloc[int(index)]
    kind = "prediction" if layer.name == PREDICTION_LAYER else "annotation"
    score = float(row["score"])
    return f"{kind}: {row['class']}" + (f", score {score:.2f}" if score == score else "")


def class_colours(classes: ClassList, class_ids: np.ndarray) -> np.ndarray:
    """Explicit RGBA per box; napari's colour cycles sort by value, so we never use them."""
    table = {c.id: c.rgba for c in classes}
    if len(class_ids) == 0:
        return np.zeros((0, 4))
    return np.array([table[int(i)] for i in class_ids], dtype=np.float64)


# ------------------------------------------------------------------ tile set -> layers
def stack_shape(tiles: Sequence[Tile]) -> tuple[int, int]:
    """(height, width) of the stack: the largest tile; smaller tiles are padded white."""
    return max(t.height for t in tiles), max(t.width for t in tiles)


def image_layer_data(tileset: TileSet, name: str = "tiles") -> LayerData:
    """The tiles as one lazy image: 2D for a single tile, else an (N, H, W, 3) stack."""
    import dask
    import dask.array as da

    tiles = list(tileset)
    if not tiles:
        raise AnnotationError("there are no tiles to show")
    h, w = stack_shape(tiles)

    def padded(tile: Tile) -> np.ndarray:
        px = tile.pixels()
        if px.shape[:2] == (h, w):
            return px
        out = np.full((h, w, 3), 255, dtype=np.uint8)
        out[: px.shape[0], : px.shape[1]] = px
        return out

    planes = [da.from_delayed(dask.delayed(padded)(t), shape=(h, w, 3), dtype=np.uint8) for t in tiles]
    data = planes[0] if len(planes) == 1 else da.stack(planes)
    return data, {"name": name, "rgb": True, "metadata": {META_KEY: tile_records(tileset)}}, "image"


def shapes_layer_data(tileset: TileSet, predictions: bool = False, name: str | None = None) -> LayerData:
    """All boxes of all tiles as one Shapes layer, with class/score/source features."""
    tiles = list(tileset)
    stacked = len(tiles) > 1
    verts, cls, scores, sources = [], [], [], []
    for plane, tile in enumerate(tiles):
        b = tile.predictions if predictions else tile.boxes
        if len(b) == 0:
            continue
        verts.append(boxes_to_rectangles(b.xyxy, plane if stacked else None))
        cls.append(b.class_ids)
        scores.append(b.scores)
        sources.append(b.sources)
    ndim = 3 if stacked else 2
    data = np.concatenate(verts) if verts else np.zeros((0, 4, ndim))
    class_ids = np.concatenate(cls) if cls else np.zeros(0, dtype=np.int64)
    names = tileset.classes.names
    features = {
        "class": _categorical([tileset.classes.by_id(int(i)).name for i in class_ids], names),
        "score": np.concatenate(scores) if scores else np.zeros(0),
        "source": _categorical(
            [SOURCE_NAMES[BoxSource(int(s))] for s in (np.concatenate(sources) if sources else [])],
            list(SOURCE_NAMES.values()),
        ),
    }
    meta = {
        "name": name or ("predictions" if predictions else "annotations"),
        "shape_type": "rectangle",
        # An empty layer takes one colour (the first class's) as its current colour.
        "edge_color": class_colours(tileset.classes, class_ids)
        if len(class_ids)
        else (tileset.classes.by_id(tileset.classes.ids[0]).hex if len(tileset.classes) else "white"),
        "face_color": "transparent",
        "edge_width": 1.5,
        "opacity": 1.0,
        "ndim": ndim,
        "features": features,
        "feature_defaults": {"class": names[0] if names else "", "score": np.nan, "source": "manual"},
        "metadata": {META_KEY: tile_records(tileset)},
    }
    # napari wants a list of arrays, one per shape; an empty (0, 4, D) array is fine too.
    return list(data) if len(data) else data, meta, "shapes"


def _categorical(values: list[str], categories: list[str]):
    import pandas as pd

    return pd.Categorical(values, categories=categories)


def tile_records(tileset: TileSet) -> dict:
    """What a writer needs to rebuild tiles from a layer: ids, files, sizes, classes."""
    return {
        "classes": tileset.classes.to_json(),
        "tiles": [
            {
                "id": t.id,
                "name": t.name,
                "width": t.width,
                "height": t.height,
                "path": str(t.path) if t.path is not None else None,
                "status": t.status.value,
                "origin": list(t.origin),
                "window": t.window,
                "meta": t.meta,
            }
            for t in tileset
        ],
    }


def tileset_to_layers(tileset: TileSet, name: str = "tiles") -> list[LayerData]:
    layers = [image_layer_data(tileset, name=name), shapes_layer_data(tileset, name=f"{name} boxes")]
    if any(len(t.predictions) for t in tileset):
        layers.append(shapes_layer_data(tileset, predictions=True, name=f"{name} predictions"))
    return layers


# ------------------------------------------------------------------ layer -> tile set
def tileset_from_shapes(data: Sequence[np.ndarray], meta: Mapping[str, Any]) -> TileSet:
    """Rebuild tiles and boxes from a Shapes layer's data and attributes.

    Uses the tile records the reader left in ``metadata``; a layer drawn over some
    other image (no records) becomes one tile the size of the boxes' extent. The
    layer's scale and translate are applied here, once, to reach pixel coordinates.
    """
    records = (meta.get("metadata") or {}).get(META_KEY)
    features = meta.get("features")
    n = len(data)
    verts = [_to_pixel_space(np.asarray(d, dtype=np.float64), meta) for d in data]
    xyxy, planes = rectangles_to_boxes(verts)

    if records:
        classes = ClassList.from_json(records["classes"])
        tiles = [
            Tile(
                id=int(r["id"]),
                name=str(r["name"]),
                width=int(r["width"]),
                height=int(r["height"]),
                path=Path(r["path"]) if r.get("path") else None,
                status=TileStatus(r["status"]),
                origin=tuple(r.get("origin", (0, 0))),
                window=bool(r.get("window", False)),
                meta=dict(r.get("meta") or {}),
            )
            for r in records["tiles"]
        ]
    else:
        names = _feature(features, "class", n)
        classes = ClassList.from_names(dict.fromkeys(str(v) for v in names)) if n else ClassList.default()
        h = int(np.ceil(xyxy[:, 3].max())) if n else 1
        w = int(np.ceil(xyxy[:, 2].max())) if n else 1
        tiles = [
            Tile(id=1, name=str(meta.get("name", "image")), width=w, height=h, status=TileStatus.LABELLED)
        ]
    if planes is None:
        planes = np.zeros(n, dtype=np.int64)
    class_names = _feature(features, "class", n)
    scores = np.asarray(_feature(features, "score", n, default=np.nan), dtype=np.float64)
    srcs = _feature(features, "source", n, default="manual")
    for i, name in enumerate(class_names):
        if str(name) not in classes:
            raise AnnotationError(f"shape {i}: class {str(name)!r} is not one of {classes.names}")
    class_ids = np.array([classes.by_name(str(v)).id for v in class_names], dtype=np.int64)
    sources = np.array([_SOURCE_BY_NAME.get(str(s), BoxSource.MANUAL) for s in srcs], dtype=np.int8)
    out = TileSet(classes=classes)
    for plane, tile in enumerate(tiles):
        sel = planes == plane
        tile.boxes = Boxes(xyxy[sel], class_ids[sel], scores[sel], sources[sel])
        out.add(tile)
    bad = (planes < 0) | (planes >= len(tiles))
    if bad.any():
        raise AnnotationError(
            f"shape {int(np.flatnonzero(bad)[0])} lies on no tile (plane outside 0..{len(tiles) - 1})"
        )
    return out


def _to_pixel_space(v: np.ndarray, meta: Mapping[str, Any]) -> np.ndarray:
    """Layer data -> world (scale, translate) -> the tiles' pixel frame (the reader's image)."""
    nd = v.shape[1]
    scale = np.asarray(meta.get("scale", np.ones(nd)), dtype=np.float64)[-nd:]
    translate = np.asarray(meta.get("translate", np.zeros(nd)), dtype=np.float64)[-nd:]
    world = v * scale + translate
    records = (meta.get("metadata") or {}).get(META_KEY) or {}
    img_scale = np.asarray(records.get("image_scale", np.ones(nd)), dtype=np.float64)[-nd:]
    img_translate = np.asarray(records.get("image_translate", np.zeros(nd)), dtype=np.float64)[-nd:]
    return (world - img_translate) / img_scale


def _feature(features: Any, key: str, n: int, default: Any = None) -> list:
    if features is not None and key in features:
        values = list(np.asarray(features[key]))
        if len(values) != n:
            raise AnnotationError(f"layer feature {key!r} has {len(values)} values for {n} shapes")
        return values
    if default is None:
        raise AnnotationError(f"the layer has no {key!r} feature; cannot tell the boxes' classes")
    return [default] * n
