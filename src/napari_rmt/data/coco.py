"""COCO detection json in and out.

Reading validates every field it uses and raises ``AnnotationError`` naming the file
and the item (``images[3].width``, ``annotation id 17``) for anything malformed, so a
bad file never ends in a bare ``KeyError`` deep inside training. Boxes outside the
image are clipped and zero-area boxes dropped, each with a ``DataWarning``.

Writing follows what pycocotools and other tools expect: ids from 1, an ``info``
block, ``area`` and ``iscrowd`` on every annotation, stable category ids, image sizes.
Project state that COCO has no field for (tile status, tile origin) travels in
``napari_rmt_*`` keys on the image records, which other tools ignore.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from .. import __version__
from .atomic import atomic_write_json
from .boxes import Boxes, BoxSource, sanitize_boxes
from .classes import ClassList
from .errors import AnnotationError, ClassListError, DataWarning, ImageReadError
from .tiles import Tile, TileSet, TileStatus, window_name

STATUS_KEY = "napari_rmt_status"
ORIGIN_KEY = "napari_rmt_origin"
# true: file_name is a large image and the record is its window at the origin
WINDOW_KEY = "napari_rmt_window"
# the tile's name where it is not its file's (a tile from an image layer saved into a project)
NAME_KEY = "napari_rmt_name"
# boxes the user deleted on the tile, [x, y, w, h] each (``Tile.rejected``)
REJECTED_KEY = "napari_rmt_rejected"
_IMAGE_CORE_KEYS = {"id", "file_name", "width", "height", STATUS_KEY, ORIGIN_KEY, WINDOW_KEY, NAME_KEY, REJECTED_KEY}


# --------------------------------------------------------------------------- reading
def read_coco(
    path: str | os.PathLike,
    images_dir: str | os.PathLike | None = None,
    *,
    default_status: TileStatus | None = None,
    check_files: bool = True,
    allow_outside: bool = False,
) -> TileSet:
    """Read a COCO detection file into a ``TileSet``.

    ``images_dir`` is where ``file_name`` is resolved (default: the json's folder).
    A tile's status comes from its ``napari_rmt_status`` key when present; otherwise
    from ``default_status``, or, when that is None, LABELLED for images that have at
    least one annotation and UNLABELLED for the others.

    An image whose ``file_name`` is absolute or climbs out of ``images_dir`` (``../..``)
    is refused unless ``allow_outside``: a file from elsewhere must not be able to make
    the program read any file on the machine. A project's own files allow it (it saves
    the absolute paths of tiles that lie outside its folder).
    """
    path = Path(path)
    if not path.is_file():
        raise AnnotationError(f"{path}: annotation file not found")
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise AnnotationError(f"{path}: not a JSON file ({exc})") from exc
    base = Path(images_dir) if images_dir is not None else path.parent
    tileset = parse_coco(
        data, source=str(path), images_dir=base, default_status=default_status, allow_outside=allow_outside
    )
    if check_files:
        _check_files_exist(tileset, str(path))
    return tileset


def parse_coco(
    data: Any,
    source: str = "COCO data",
    images_dir: str | os.PathLike = ".",
    default_status: TileStatus | None = None,
    allow_outside: bool = True,
) -> TileSet:
    """Turn an already-parsed COCO dict into a ``TileSet`` (see ``read_coco``)."""
    if not isinstance(data, Mapping):
        raise AnnotationError(
            f"{source}: not a COCO file (top level is {type(data).__name__}, not an object)"
        )
    for key in ("images", "categories"):
        if key not in data:
            raise AnnotationError(f"{source}: not a COCO file (no {key!r} list)")
    images = _list(data, "images", source)
    categories = _list(data, "categories", source)
    annotations = _list(data, "annotations", source) if "annotations" in data else []

    classes = _parse_categories(categories, source)
    images_dir = Path(images_dir)
    tiles: dict[int, Tile] = {}
    for i, rec in enumerate(images):
        tile = _parse_image(rec, f"{source}: images[{i}]", images_dir, allow_outside)
        if tile.id in tiles:
            raise AnnotationError(f"{source}: image id {tile.id} is used twice (images[{i}])")
        tiles[tile.id] = tile

    per_image: dict[int, list[tuple[list[float], int, float, object]]] = {k: [] for k in tiles}
    seen_ids: set[int] = set()
    for i, rec in enumerate(annotations):
        where = f"{source}: annotations[{i}]"
        if not isinstance(rec, Mapping):
            raise AnnotationError(f"{where} is not an object")
        ann_id = rec.get("id", i + 1)
        if not _is_int(ann_id):
            raise AnnotationError(f"{where}: id {ann_id!r} is not an integer")
        label = f"annotation id {ann_id}"
        where = f"{source}: {label}"
        if ann_id in seen_ids:
            warnings.warn(f"{where}: id is used twice; both boxes kept", DataWarning, stacklevel=2)
        seen_ids.add(ann_id)
        image_id = _field(rec, "image_id", where, int)
        if image_id not in tiles:
            raise AnnotationError(f"{where}: image_id {image_id} is not in the images list")
        category_id = _field(rec, "category_id", where, int)
        if category_id not in classes:
            raise AnnotationError(
                f"{where}: category_id {category_id} is not in the categories list {classes.ids}"
            )
        if rec.get("iscrowd", 0) not in (0, False):
            warnings.warn(
                f"{where}: crowd region (iscrowd=1) is not a cell box; skipped", DataWarning, stacklevel=2
            )
            continue
        bbox = _field(rec, "bbox", where, list)
        if len(bbox) != 4 or not all(_is_number(v) for v in bbox):
            raise AnnotationError(f"{where}: bbox {bbox!r} is not four numbers [x, y, w, h]")
        x, y, w, h = (float(v) for v in bbox)
        if not all(math.isfinite(v) for v in (x, y, w, h)):
            raise AnnotationError(f"{where}: bbox {bbox!r} has non-finite values")
        if w < 0 or h < 0:
            warnings.warn(
                f"{where}: bbox {bbox!r} has a negative width or height; dropped", DataWarning, stacklevel=2
            )
            continue
        score = rec.get("score")
        if score is not None and (not _is_number(score) or not math.isfinite(float(score))):
            raise AnnotationError(f"{where}: score {score!r} is not a finite number")
        per_image[image_id].append(
            ([x, y, x + w, y + h], category_id, math.nan if score is None else float(score), label)
        )

    out = TileSet(classes=classes)
    for image_id, tile in tiles.items():
        rows = per_image[image_id]
        if rows:
            boxes = Boxes(
                xyxy=[r[0] for r in rows],
                class_ids=[r[1] for r in rows],
                scores=[r[2] for r in rows],
                sources=[BoxSource.MANUAL] * len(rows),
            )
            tile.boxes = sanitize_boxes(
                boxes,
                tile.width,
                tile.height,
                where=f"{source}: image {tile.name!r}",
                labels=[r[3] for r in rows],
            )
        explicit = tile.meta.pop(STATUS_KEY, None)
        if explicit is not None:
            tile.status = explicit
        elif default_status is not None:
            tile.status = default_status
        else:
            tile.status = TileStatus.LABELLED if rows else TileStatus.UNLABELLED
        out.add(tile)
    return out


def _parse_categories(categories: list, source: str) -> ClassList:
    classes = ClassList()
    for i, rec in enumerate(categories):
        where = f"{source}: categories[{i}]"
        if not isinstance(rec, Mapping):
            raise AnnotationError(f"{where} is not an object")
        cid = _field(rec, "id", where, int)
        name = _field(rec, "name", where, str)
        colour = rec.get("color")
        try:
            classes.add(name, colour=_parse_colour(colour, where), id=cid)
        except ClassListError as exc:
            raise AnnotationError(f"{where}: {exc}") from exc
    return classes


def _parse_colour(value: Any, where: str) -> tuple[int, int, int] | None:
    if value is None:
        return None
    if isinstance(value, str) and len(value) == 7 and value.startswith("#"):
        try:
            return tuple(int(value[k : k + 2], 16) for k in (1, 3, 5))  # type: ignore[return-value]
        except ValueError:
            pass
    if isinstance(value, list) and len(value) == 3 and all(_is_int(v) and 0 <= v <= 255 for v in value):
        return tuple(value)  # type: ignore[return-value]
    raise AnnotationError(f"{where}: color {value!r} is neither '#rrggbb' nor [r, g, b]")


#: The largest image a tile may declare (pixels): a larger one is a large image, read in windows.
MAX_TILE_PIXELS = 1 << 28


def _parse_image(rec: Any, where: str, images_dir: Path, allow_outside: bool = True) -> Tile:
    if not isinstance(rec, Mapping):
        raise AnnotationError(f"{where} is not an object")
    image_id = _field(rec, "id", where, int)
    file_name = _field(rec, "file_name", where, str)
    if not file_name:
        raise AnnotationError(f"{where}: file_name is empty")
    width = _field(rec, "width", where, int)
    height = _field(rec, "height", where, int)
    if width <= 0 or height <= 0:
        raise AnnotationError(f"{where}: size {width}x{height} must be positive")
    window_rec = rec.get(WINDOW_KEY, False) is True
    if not window_rec and width * height > MAX_TILE_PIXELS:
        raise AnnotationError(
            f"{where}: size {width}x{height} is too large for a tile ({width * height:,} pixels; at most "
            f"{MAX_TILE_PIXELS:,}); open such an image as a large image, which is read window by window"
        )
    meta = {k: v for k, v in rec.items() if k not in _IMAGE_CORE_KEYS}
    status = rec.get(STATUS_KEY)
    if status is not None:
        try:
            meta[STATUS_KEY] = TileStatus(status)
        except (ValueError, TypeError):
            raise AnnotationError(
                f"{where}: {STATUS_KEY} {status!r} is not one of {[s.value for s in TileStatus]}"
            ) from None
    origin = rec.get(ORIGIN_KEY, [0, 0])
    if not (isinstance(origin, list) and len(origin) == 2 and all(_is_int(v) for v in origin)):
        raise AnnotationError(f"{where}: {ORIGIN_KEY} {origin!r} is not two integers [x, y]")
    window = rec.get(WINDOW_KEY, False)
    if not isinstance(window, bool):
        raise AnnotationError(f"{where}: {WINDOW_KEY} {window!r} is not true or false")
    if window and (origin[0] < 0 or origin[1] < 0):
        raise AnnotationError(f"{where}: window origin {origin} is negative")
    path = Path(file_name)
    if not allow_outside:
        inside = not path.is_absolute() and (images_dir / path).resolve().is_relative_to(images_dir.resolve())
        if not inside:
            raise AnnotationError(
                f"{where}: file_name {file_name!r} lies outside the dataset folder {images_dir}; "
                "images are read only from inside it (move them there, or allow outside paths: "
                "--allow-outside-paths on the command line)"
            )
    if not path.is_absolute():
        path = images_dir / path
    name = window_name(path, origin[0], origin[1]) if window else Path(file_name).name
    given = rec.get(NAME_KEY)
    if given is not None:
        if not isinstance(given, str) or not given:
            raise AnnotationError(f"{where}: {NAME_KEY} {given!r} is not a name")
        name = given
    tile = Tile(
        id=image_id,
        name=name,
        window=window,
        width=width,
        height=height,
        path=path,
        origin=(origin[0], origin[1]),
        meta=meta,
    )
    tile.reject(_parse_rejected(rec.get(REJECTED_KEY, []), where))
    return tile


def _parse_rejected(value: Any, where: str) -> np.ndarray:
    """``napari_rmt_rejected`` as (N, 4) xyxy: a list of [x, y, w, h] of finite numbers."""
    if not isinstance(value, list):
        raise AnnotationError(f"{where}: {REJECTED_KEY} {value!r} is not a list of [x, y, w, h] boxes")
    out = np.zeros((len(value), 4))
    for k, box in enumerate(value):
        if not (isinstance(box, list) and len(box) == 4 and all(_is_number(v) and math.isfinite(v) for v in box)):
            raise AnnotationError(f"{where}: {REJECTED_KEY}[{k}] {box!r} is not four finite numbers [x, y, w, h]")
        x, y, w, h = (float(v) for v in box)
        out[k] = (x, y, x + w, y + h)
    return out


def _check_files_exist(tileset: TileSet, source: str) -> None:
    # a window's large image may be a zarr folder
    missing = [
        t.path
        for t in tileset
        if t.path is not None and not (t.path.exists() if t.window else t.path.is_file())
    ]
    if missing:
        shown = ", ".join(str(p) for p in missing[:5])
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise ImageReadError(f"{source}: {len(missing)} image file(s) not found: {shown}{more}")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _list(data: Mapping, key: str, source: str) -> list:
    value = data[key]
    if not isinstance(value, list):
        raise AnnotationError(f"{source}: {key!r} is {type(value).__name__}, not a list")
    return value


def _field(rec: Mapping, key: str, where: str, kind: type) -> Any:
    if key not in rec:
        raise AnnotationError(f"{where}: missing {key!r}")
    value = rec[key]
    ok = _is_int(value) if kind is int else isinstance(value, kind)
    if not ok:
        raise AnnotationError(
            f"{where}: {key} {value!r} is not {'an integer' if kind is int else kind.__name__}"
        )
    return value


# --------------------------------------------------------------------------- writing
def coco_dict(
    tileset: TileSet,
    json_dir: str | os.PathLike | None = None,
    tiles: Iterable[Tile] | None = None,
    description: str = "napari-rmt annotations",
) -> dict:
    """The COCO dict of the tiles' manual annotations (all tiles by default)."""
    json_dir = Path(json_dir) if json_dir is not None else None
    chosen = list(tileset if tiles is None else tiles)
    images, annotations = [], []
    next_id = 1
    for tile in chosen:
        images.append(_image_record(tile, json_dir))
        for xywh, cid, area in zip(tile.boxes.xywh, tile.boxes.class_ids, tile.boxes.areas, strict=True):
            annotations.append(
                {
                    "id": next_id,
                    "image_id": tile.id,
                    "category_id": int(cid),
                    "bbox": [float(v) for v in xywh],
                    "area": float(area),
                    "iscrowd": 0,
                }
            )
            next_id += 1
    return {
        "info": _info(description),
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": _categories(tileset.classes),
    }


def write_coco(
    tileset: TileSet,
    path: str | os.PathLike,
    tiles: Iterable[Tile] | None = None,
) -> Path:
    """Write the annotations as COCO json, atomically; file names relative to the json."""
    path = Path(path)
    return atomic_write_json(path, coco_dict(tileset, json_dir=path.parent.resolve(), tiles=tiles))


def _image_record(tile: Tile, json_dir: Path | None) -> dict:
    rec: dict[str, Any] = {k: v for k, v in tile.meta.items() if k not in _IMAGE_CORE_KEYS}
    rec.update(
        id=tile.id,
        file_name=_relative_name(tile, json_dir),
        width=int(tile.width),
        height=int(tile.height),
    )
    rec[STATUS_KEY] = tile.status.value
    if tuple(tile.origin) != (0, 0) or tile.window:
        rec[ORIGIN_KEY] = [int(tile.origin[0]), int(tile.origin[1])]
    if tile.window:
        rec[WINDOW_KEY] = True
    if tile.path is not None and not tile.window and tile.name != Path(tile.path).name:
        rec[NAME_KEY] = tile.name
    if len(tile.rejected):
        x0, y0, x1, y1 = np.asarray(tile.rejected, dtype=np.float64).T
        rec[REJECTED_KEY] = [
            [round(float(a), 2), round(float(b), 2), round(float(c - a), 2), round(float(d - b), 2)]
            for a, b, c, d in zip(x0, y0, x1, y1, strict=True)
        ]
    return rec


def _relative_name(tile: Tile, json_dir: Path | None) -> str:
    """Relative to the json when the image lies in its folder tree, else absolute.

    A relative name keeps a dataset folder movable; ``../..`` chains would break as
    soon as the json is copied elsewhere, so outside files keep their absolute path.
    """
    if tile.path is None:
        return tile.name
    path = Path(tile.path).resolve()
    if json_dir is not None and path.is_relative_to(json_dir.resolve()):
        return path.relative_to(json_dir.resolve()).as_posix()
    return path.as_posix()


def _categories(classes: ClassList) -> list[dict]:
    return [{"id": c.id, "name": c.name, "supercategory": "cell", "color": c.hex} for c in classes]


def _info(description: str) -> dict:
    now = datetime.datetime.now(datetime.timezone.utc)
    return {
        "description": description,
        "version": "1.0",
        "year": now.year,
        "contributor": f"napari-rmt {__version__}",
        "date_created": now.isoformat(timespec="seconds"),
        "url": "",
    }
