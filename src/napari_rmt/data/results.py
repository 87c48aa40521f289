"""COCO results files (``loadRes`` input: one record per box, with its score) in and out.

A record names its image by ``image_id`` or, for results of image files given by path, by
``file_name``: the file decides then, never an id that may be another image's. A box's
class doubt (``Boxes.class_doubt``), when known, rides along as ``napari_rmt_class_doubt``
(other tools ignore keys they do not know), so a reopened project ranks *Suggest next*
as before.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from .atomic import atomic_write_json
from .boxes import Boxes, BoxSource
from .coco import _field, _is_number
from .errors import AnnotationError, DataWarning
from .tiles import Tile, TileSet

#: The record key of a box's class doubt.
CLASS_DOUBT_KEY = "napari_rmt_class_doubt"


def coco_results(
    tileset: TileSet, tiles: Iterable[Tile] | None = None, file_names: bool = False
) -> list[dict]:
    """Predictions as a COCO results list (``loadRes`` input): one record per box, with score.

    With ``file_names`` each record also names its image file, so that a results file
    made without a COCO dataset (images given by path) says which image each box is on by
    itself, whatever happens to a separate image index.
    """
    out = []
    for tile in tileset if tiles is None else tiles:
        p = tile.predictions
        extra = {"file_name": str(tile.path) if tile.path is not None else tile.name} if file_names else {}
        for xywh, cid, score, doubt in zip(p.xywh, p.class_ids, p.scores, p.class_doubt, strict=True):
            out.append(
                {
                    "image_id": tile.id,
                    "category_id": int(cid),
                    "bbox": [float(v) for v in xywh],
                    "score": float(score) if np.isfinite(score) else 1.0,
                    **({CLASS_DOUBT_KEY: round(float(doubt), 4)} if np.isfinite(doubt) else {}),
                    **extra,
                }
            )
    return out


def write_coco_results(
    tileset: TileSet, path: str | os.PathLike, tiles: Iterable[Tile] | None = None, file_names: bool = False
) -> Path:
    return atomic_write_json(path, coco_results(tileset, tiles, file_names))


def tiles_by_file(tileset: TileSet) -> dict[str, list[int]]:
    """Tile ids by their image file: the resolved path and the bare file name."""
    out: dict[str, list[int]] = {}
    for t in tileset:
        if t.path is not None and not t.window:
            for key in {str(Path(t.path).resolve()), Path(t.path).name}:
                out.setdefault(key, []).append(t.id)
    return out


def tile_of_file(file_name: Any, by_file: dict[str, list[int]], where: str) -> int:
    if not isinstance(file_name, str) or not file_name:
        raise AnnotationError(f"{where}: file_name {file_name!r} is not a file name")
    for key in (str(Path(file_name).resolve()), Path(file_name).name):
        ids = by_file.get(key, [])
        if len(ids) == 1:
            return ids[0]
        if len(ids) > 1:
            raise AnnotationError(f"{where}: file_name {file_name!r} fits {len(ids)} of the dataset's images")
    raise AnnotationError(f"{where}: file_name {file_name!r} is none of the dataset's images")


def read_coco_results(path: str | os.PathLike, tileset: TileSet) -> TileSet:
    """Load a COCO results list as the tiles' predictions (replacing earlier ones)."""
    path = Path(path)
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except FileNotFoundError:
        raise AnnotationError(f"{path}: predictions file not found") from None
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise AnnotationError(f"{path}: not a JSON file ({exc})") from exc
    if isinstance(data, Mapping) and "annotations" in data:
        data = data["annotations"]
    if not isinstance(data, list):
        raise AnnotationError(f"{path}: a COCO results file is a list of detections")
    per_tile: dict[int, list[tuple[list[float], int, float, float]]] = {t.id: [] for t in tileset}
    by_file = tiles_by_file(tileset)
    for i, rec in enumerate(data):
        where = f"{path}: detection [{i}]"
        if not isinstance(rec, Mapping):
            raise AnnotationError(f"{where} is not an object")
        image_id = _field(rec, "image_id", where, int)
        if "file_name" in rec:
            # results of image files (``predict`` on paths) number the images their own way:
            # the file they name decides, never an id that may be another image's
            image_id = tile_of_file(rec["file_name"], by_file, where)
        if image_id not in per_tile:
            raise AnnotationError(f"{where}: image_id {image_id} is not one of the dataset's images")
        cid = _field(rec, "category_id", where, int)
        if cid not in tileset.classes:
            raise AnnotationError(f"{where}: category_id {cid} is not a known category")
        bbox = _field(rec, "bbox", where, list)
        if len(bbox) != 4 or not all(_is_number(v) and math.isfinite(v) for v in bbox):
            raise AnnotationError(f"{where}: bbox {bbox!r} is not four finite numbers")
        score = rec.get("score", 1.0)
        if not _is_number(score) or not math.isfinite(score):
            raise AnnotationError(f"{where}: score {score!r} is not a finite number")
        doubt = rec.get(CLASS_DOUBT_KEY, math.nan)
        if not _is_number(doubt) or not (math.isnan(doubt) or 0.0 <= doubt <= 1.0):
            raise AnnotationError(f"{where}: {CLASS_DOUBT_KEY} {doubt!r} is not a number in [0, 1]")
        x, y, w, h = (float(v) for v in bbox)
        if w <= 0 or h <= 0:
            # no box at all: scored, it would count as a false positive nobody can see
            warnings.warn(DataWarning(f"{where}: bbox {bbox!r} has no area (width or height <= 0); left out"),
                          stacklevel=2)
            continue
        per_tile[image_id].append(([x, y, x + w, y + h], cid, float(score), float(doubt)))
    for tile in tileset:
        rows = per_tile[tile.id]
        tile.predictions = Boxes(
            xyxy=[r[0] for r in rows],
            class_ids=[r[1] for r in rows],
            scores=[r[2] for r in rows],
            sources=[BoxSource.PREDICTED] * len(rows),
            class_doubt=[r[3] for r in rows],
        )
    return tileset
