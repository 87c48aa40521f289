"""Whole-image boxes in a zarr group: many millions of cells, read back without the model.

``xyxy`` (N, 4) float32 in whole-image pixels, ``class_id`` (N,) int32, ``score`` (N,)
float32; class names and colours and the image size in the group's attributes.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .atomic import replace_folder
from .boxes import Boxes, BoxSource
from .classes import ClassList
from .errors import AnnotationError


def is_box_store(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a zarr group written by ``write_boxes_zarr``."""
    import zarr

    try:
        return "napari_rmt" in dict(zarr.open_group(str(path), mode="r").attrs)
    except Exception:
        return False


def write_boxes_zarr(
    boxes: Boxes,
    path: str | os.PathLike,
    classes: ClassList,
    image_size: tuple[int, int],
    source: str = "",
) -> Path:
    """Whole-image boxes as a zarr group: ``xyxy`` (N, 4), ``class_id``, ``score``.

    Class names and colours and the image size are in the group's attributes, so the
    store is read without the model.
    """
    import zarr

    def build(folder: Path) -> None:
        root = zarr.open_group(str(folder), mode="w")
        n = len(boxes)
        chunk = max(1, min(n, 1 << 16))
        create = getattr(root, "create_array", None) or root.create_dataset
        for name, data in (
            ("xyxy", boxes.xyxy.astype(np.float32).reshape(n, 4)),
            ("class_id", boxes.class_ids.astype(np.int32)),
            ("score", boxes.scores.astype(np.float32)),
        ):
            arr = create(name, shape=data.shape, chunks=(chunk, *data.shape[1:]), dtype=data.dtype)
            if n:
                arr[...] = data
        root.attrs.update(
            {
                "napari_rmt": {
                    "classes": classes.to_json(),
                    "image_width": int(image_size[0]),
                    "image_height": int(image_size[1]),
                    "source": source,
                    "coordinates": "xyxy, whole-image pixels",
                }
            }
        )

    # Written beside and swapped in: an existing store is replaced only if it is an
    # earlier box store (an image store at that path was once wiped by ``mode="w"``).
    path = replace_folder(path, build, is_box_store)
    return path


def read_boxes_zarr(path: str | os.PathLike) -> tuple[Boxes, ClassList, tuple[int, int]]:
    import zarr

    path = Path(path)
    try:
        root = zarr.open_group(str(path), mode="r")
        meta = dict(root.attrs)["napari_rmt"]
        xyxy = np.asarray(root["xyxy"][...], dtype=np.float64)
        cid = np.asarray(root["class_id"][...], dtype=np.int64)
        score = np.asarray(root["score"][...], dtype=np.float64)
        classes = ClassList.from_json(meta["classes"])
    except Exception as exc:
        raise AnnotationError(f"{path}: not a napari-rmt box store ({type(exc).__name__}: {exc})") from exc
    boxes = Boxes(
        xyxy=xyxy, class_ids=cid, scores=score, sources=np.full(len(cid), BoxSource.PREDICTED, np.int8)
    )
    return boxes, classes, (int(meta["image_width"]), int(meta["image_height"]))


def write_whole_image_boxes(
    path: str | os.PathLike,
    boxes: Boxes,
    classes: ClassList,
    image_name: str,
    image_size: tuple[int, int],
    image_path: str | os.PathLike | None = None,
) -> Path:
    """One large image's boxes, in whole-image pixels, in the format the suffix names:
    a zarr box store (``.zarr``), QuPath GeoJSON (``.geojson``) or COCO results (else)."""
    from .geojson import write_geojson
    from .results import write_coco_results
    from .tiles import Tile, TileSet

    path = Path(path)
    if path.suffix.lower() == ".zarr":
        return write_boxes_zarr(boxes, path, classes, image_size, source=str(image_path or image_name))
    whole = TileSet(
        [
            Tile(
                id=1,
                name=image_name,
                width=image_size[0],
                height=image_size[1],
                path=Path(image_path) if image_path is not None else None,
                predictions=boxes,
            )
        ],
        classes,
    )
    if path.suffix.lower() == ".geojson":
        return write_geojson(whole, path, predictions=True)
    return write_coco_results(whole, path)
