"""GeoJSON export that QuPath imports (File > Import objects).

QuPath reads a FeatureCollection whose features carry ``objectType`` and a
``classification`` with a name and an RGB colour; each box becomes a closed
rectangle polygon in whole-image pixel coordinates (tile origin added).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from .atomic import atomic_write_json
from .tiles import Tile, TileSet


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
