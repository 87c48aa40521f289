"""Tiles, cell boxes, classes and their file formats: the bottom layer, free of torch and napari."""

from .boxes import Boxes, BoxSource, CellBox, sanitize_boxes
from .classes import CellClass, ClassList
from .coco import (
    coco_dict,
    parse_coco,
    read_coco,
    write_coco,
)
from .errors import AnnotationError, ClassListError, DataWarning, ImageReadError, NapariRmtError
from .geojson import read_geojson, write_geojson
from .imageio import read_image, to_uint8_rgb
from .results import coco_results, read_coco_results, write_coco_results
from .tiles import Tile, TileSet, TileStatus

__all__ = [
    "AnnotationError",
    "BoxSource",
    "Boxes",
    "CellBox",
    "CellClass",
    "ClassList",
    "ClassListError",
    "DataWarning",
    "ImageReadError",
    "NapariRmtError",
    "Tile",
    "TileSet",
    "TileStatus",
    "coco_dict",
    "coco_results",
    "parse_coco",
    "read_coco",
    "read_coco_results",
    "read_geojson",
    "read_image",
    "sanitize_boxes",
    "to_uint8_rgb",
    "write_coco",
    "write_coco_results",
    "write_geojson",
]
