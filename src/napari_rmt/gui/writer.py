"""npe2 writer: Shapes layer(s) -> one COCO json."""

from __future__ import annotations

from typing import Any

from ..data.coco import write_coco
from ..data.errors import AnnotationError
from ..data.tiles import TileSet
from .layers import tileset_from_shapes


def write_coco_layers(path: str, layer_data: list[tuple[Any, dict, str]]) -> list[str]:
    """Write the boxes of every given Shapes layer; tiles are merged by id.

    Boxes of several layers that describe the same tiles (the reader's records) are
    combined, so "annotations" and "predictions" can be saved together.
    """
    merged: TileSet | None = None
    for data, meta, layer_type in layer_data:
        if layer_type != "shapes":
            continue
        part = tileset_from_shapes(data, meta)
        if merged is None:
            merged = part
            continue
        if merged.classes.names != part.classes.names:
            raise AnnotationError(
                f"layer {meta.get('name')!r} uses classes {part.classes.names}, "
                f"not {merged.classes.names}; save it on its own"
            )
        from ..data.boxes import Boxes

        for tile in part:
            target = merged.by_id(tile.id)
            target.boxes = Boxes.concatenate([target.boxes, tile.boxes])
    if merged is None:
        raise AnnotationError("no Shapes layer to save as COCO")
    write_coco(merged, path)
    return [str(path)]
