"""GeoJSON that QuPath imports (File > Import objects) and exports (File > Export objects).

QuPath reads a FeatureCollection whose features carry ``objectType`` and a
``classification`` with a name and an RGB colour; each box becomes a closed
rectangle polygon in whole-image pixel coordinates (tile origin added).
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from .atomic import atomic_write_json
from .boxes import Boxes, BoxSource
from .errors import AnnotationError, DataWarning, NapariRmtError
from .tiles import Tile, TileSet, TileStatus

#: The feature property that carries its tile's status (``TileStatus``) through a round trip.
STATUS_PROPERTY = "napari_rmt_status"


def geojson_dict(tileset: TileSet, tiles: Iterable[Tile] | None = None, predictions: bool = False) -> dict:
    features = []
    for tile in tileset if tiles is None else tiles:
        boxes = tile.predictions if predictions else tile.boxes
        ox, oy = tile.origin
        for (x0, y0, x1, y1), cid, score in zip(boxes.xyxy, boxes.class_ids, boxes.scores, strict=True):
            cls = tileset.classes.by_id(int(cid))
            x0, x1, y0, y1 = x0 + ox, x1 + ox, y0 + oy, y1 + oy
            ring = [[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]
            props: dict = {
                # QuPath: detections are light-weight objects, annotations are editable.
                "objectType": "detection" if predictions else "annotation",
                "classification": {"name": cls.name, "color": list(cls.colour)},
                "isLocked": False,
                "tile": tile.name,
            }
            if not predictions:
                # how complete the tile's annotation is (QuPath ignores it; the import reads it)
                props[STATUS_PROPERTY] = tile.status.value
            if np.isfinite(score):
                props["measurements"] = {"score": float(score)}
            features.append(
                {
                    "type": "Feature",
                    "geometry": {"type": "Polygon", "coordinates": [[[float(a), float(b)] for a, b in ring]]},
                    "properties": props,
                }
            )
    return {"type": "FeatureCollection", "features": features}


def write_geojson(
    tileset: TileSet,
    path: str | os.PathLike,
    tiles: Iterable[Tile] | None = None,
    predictions: bool = False,
) -> Path:
    """Write boxes (annotations, or predictions with their score) as QuPath GeoJSON."""
    return atomic_write_json(path, geojson_dict(tileset, tiles, predictions))


def geojson_extent(path: str | os.PathLike) -> tuple[float, float]:
    """The largest x and y any feature of the file reaches (its whole-image extent), for a
    file opened without its image; a malformed file is refused as ``read_geojson`` does."""
    features = _features(Path(path))
    x1 = y1 = 0.0
    for i, feat in enumerate(features):
        if isinstance(feat, dict):
            _, _, fx1, fy1 = _bounds(feat.get("geometry"), f"{path}: feature [{i}]")
            x1, y1 = max(x1, fx1), max(y1, fy1)
    return x1, y1


def write_geojson_per_image(
    tileset: TileSet, folder: str | os.PathLike, predictions: bool = False
) -> list[Path]:
    """QuPath's convention: one GeoJSON per image, in that image's pixel coordinates, named
    after it (``<image stem>.geojson``), so that *Import objects* on an image lays exactly
    its boxes over it. A tile that is its own file gets its own file; the windows of one
    large image share one file in whole-image coordinates. Returns the files written."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise NapariRmtError(f"{folder}: is a file; give a folder for the per-image GeoJSON files")
    groups: dict[tuple, list[Tile]] = {}
    for t in tileset:
        key = ("image", str(t.path)) if t.window and t.path is not None else ("tile", t.id)
        groups.setdefault(key, []).append(t)
    used: set[str] = set()
    written = []
    for tiles in groups.values():
        first = tiles[0]
        stem = Path(first.path).stem if first.path is not None else Path(first.name).stem
        stem = "".join(c if c.isalnum() or c in "-_. " else "_" for c in stem).strip() or f"tile_{first.id}"
        name = stem if stem not in used else f"{stem}-{first.id}"
        used.add(name)
        written.append(write_geojson(tileset, folder / f"{name}.geojson", tiles=tiles, predictions=predictions))
    return written


def read_geojson(path: str | os.PathLike, tileset: TileSet) -> TileSet:
    """Import QuPath GeoJSON (File > Export objects) onto the tiles it covers.

    Each feature's geometry (Polygon or MultiPolygon, whole-image pixels, as QuPath
    exports it) becomes its bounding box, on the tile named by its ``tile`` property or
    else on the tile whose region holds the box's centre, moved into that tile's
    coordinates and clipped to it. ``objectType`` "detection" features become predictions
    (score from ``measurements.score`` when there is one), all others annotations, added
    to what the tiles hold. A tile that gains annotations becomes partly annotated unless
    its features say otherwise (``napari_rmt_status``, written by ``write_geojson``): only
    the user says a tile is fully annotated. Classes are matched by name; a new name becomes a new class,
    and a feature without one is refused. Malformed features are refused naming their
    index; a box on no tile is skipped with a warning that names it.
    """
    path = Path(path)
    features = _features(path)
    tiles = list(tileset)
    by_name = {t.name: t for t in tiles}
    added: dict[int, tuple[list, list, list, list]] = {t.id: ([], [], [], []) for t in tiles}
    said: dict[int, TileStatus] = {}
    #: classes the file brings, added to the project only once every feature has been read
    new_classes: dict[str, list | None] = {}
    trial = tileset.classes.copy()
    for i, feat in enumerate(features):
        where = f"{path}: feature [{i}]"
        if not isinstance(feat, dict) or feat.get("type", "Feature") != "Feature":
            raise AnnotationError(f"{where} is not a GeoJSON Feature")
        props = feat.get("properties") or {}
        if not isinstance(props, dict):
            raise AnnotationError(f"{where}: 'properties' is not an object")
        x0, y0, x1, y1 = _bounds(feat.get("geometry"), where)
        cls_rec = props.get("classification")
        name = cls_rec.get("name") if isinstance(cls_rec, dict) else props.get("name")
        if not isinstance(name, str) or not name.strip():
            raise AnnotationError(f"{where}: no class (properties.classification.name)")
        if name not in tileset.classes and name not in new_classes:
            colour = cls_rec.get("color") if isinstance(cls_rec, dict) else None
            colour = colour if isinstance(colour, list) and len(colour) == 3 else None
            try:  # checked on a copy: the project's classes change only once every feature is read
                trial.add(name, colour)
            except NapariRmtError as exc:
                raise AnnotationError(f"{where}: class {name!r}: {exc}") from exc
            new_classes[name] = colour
        cid = name
        tile = by_name.get(props.get("tile")) if isinstance(props.get("tile"), str) else None
        if tile is None:
            cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
            tile = next(
                (t for t in tiles if t.origin[0] <= cx < t.origin[0] + t.width and t.origin[1] <= cy < t.origin[1] + t.height),
                None,
            )
        if tile is None:
            warnings.warn(DataWarning(f"{where}: box {[x0, y0, x1, y1]} lies on none of the tiles; skipped"), stacklevel=2)
            continue
        ox, oy = tile.origin
        box = [
            min(max(x0 - ox, 0.0), tile.width),
            min(max(y0 - oy, 0.0), tile.height),
            min(max(x1 - ox, 0.0), tile.width),
            min(max(y1 - oy, 0.0), tile.height),
        ]
        if box[2] <= box[0] or box[3] <= box[1]:
            warnings.warn(DataWarning(f"{where}: box has no area on tile {tile.name!r}; skipped"), stacklevel=2)
            continue
        detection = props.get("objectType") == "detection"
        status = props.get(STATUS_PROPERTY)
        if status is not None and not detection:
            try:
                said[tile.id] = TileStatus(status)
            except (ValueError, TypeError):
                raise AnnotationError(
                    f"{where}: {STATUS_PROPERTY} {status!r} is not one of {[s.value for s in TileStatus]}"
                ) from None
        meas = props.get("measurements")
        score = meas.get("score") if isinstance(meas, dict) else None
        if score is not None and not (isinstance(score, (int, float)) and math.isfinite(score)):
            raise AnnotationError(f"{where}: measurements.score {score!r} is not a finite number")
        lists = added[tile.id]
        lists[0].append(box)
        lists[1].append(cid)
        lists[2].append(float(score) if score is not None else (float("nan") if not detection else 1.0))
        lists[3].append(detection)
    for name, colour in new_classes.items():
        tileset.classes.add(name, colour)
    for tile in tiles:
        boxes, names, scores, det = added[tile.id]
        if not boxes:
            continue
        cids = [tileset.classes.by_name(n).id for n in names]
        det_a = np.array(det, dtype=bool)
        xyxy, cid_a, sc = np.array(boxes, dtype=np.float64), np.array(cids), np.array(scores)
        if (~det_a).any():
            tile.boxes = Boxes.concatenate([tile.boxes, Boxes(xyxy[~det_a], cid_a[~det_a], sc[~det_a])])
            tile.status = TileStatus.of_boxes(said.get(tile.id, tile.status), len(tile.boxes))
        if det_a.any():
            found = Boxes(xyxy[det_a], cid_a[det_a], sc[det_a], np.full(int(det_a.sum()), BoxSource.PREDICTED, dtype=np.int8))
            tile.predictions = Boxes.concatenate([tile.predictions, found])
    return tileset


def _features(path: Path) -> list:
    """The features of a GeoJSON file: a FeatureCollection's, a lone Feature, or a bare list
    (QuPath can export one); anything else refused naming the file."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise AnnotationError(f"{path}: GeoJSON file not found") from None
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise AnnotationError(f"{path}: not a JSON file ({exc})") from exc
    if isinstance(data, list):  # QuPath can export a bare list of features
        features = data
    elif isinstance(data, dict) and data.get("type") == "FeatureCollection":
        features = data.get("features")
    elif isinstance(data, dict) and data.get("type") == "Feature":
        features = [data]
    else:
        raise AnnotationError(f"{path}: not GeoJSON (expected a FeatureCollection, a Feature or a list of them)")
    if not isinstance(features, list):
        raise AnnotationError(f"{path}: 'features' is not a list")
    return features


def _bounds(geometry: object, where: str) -> tuple[float, float, float, float]:
    """The bounding box of a Polygon / MultiPolygon (a Point or a line has none)."""
    if not isinstance(geometry, dict):
        raise AnnotationError(f"{where}: no geometry")
    kind, coords = geometry.get("type"), geometry.get("coordinates")
    if kind == "Polygon":
        rings = [coords]
    elif kind == "MultiPolygon":
        rings = coords if isinstance(coords, list) else None
    else:
        raise AnnotationError(f"{where}: geometry {kind!r} is not a Polygon or MultiPolygon (a cell needs an area)")
    points = []
    try:
        for poly in rings:  # type: ignore[union-attr]
            for ring in poly:
                for pt in ring:
                    x, y = float(pt[0]), float(pt[1])
                    points.append((x, y))
    except (TypeError, ValueError, IndexError):
        raise AnnotationError(f"{where}: {kind} coordinates are not lists of [x, y] numbers") from None
    if not points:
        raise AnnotationError(f"{where}: {kind} has no coordinates")
    arr = np.array(points)
    if not np.isfinite(arr).all():
        raise AnnotationError(f"{where}: {kind} coordinates are not finite")
    x0, y0 = arr.min(axis=0)
    x1, y1 = arr.max(axis=0)
    if x1 <= x0 or y1 <= y0:
        raise AnnotationError(f"{where}: {kind} has no area ({[float(x0), float(y0), float(x1), float(y1)]})")
    return float(x0), float(y0), float(x1), float(y1)
