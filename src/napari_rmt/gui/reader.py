"""npe2 reader: a COCO json (with its images) or a folder of tiles -> image + Shapes layers;
a zarr / OME-Zarr store -> a lazy (multiscale) image layer; a QuPath GeoJSON -> Shapes
layers of its annotations and detections in its own (whole-image) pixel coordinates."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from ..data.coco import read_coco
from ..data.imageio import list_images
from ..data.project import Project
from ..data.tiles import TileSet
from .layers import LayerData, shapes_layer_data, tileset_to_layers


def get_reader(path: str | list[str]) -> Callable[[str | list[str]], list[LayerData]] | None:
    """Claim a path only when it is a COCO json or a folder holding images.

    napari's contract: return None (never raise) for anything we cannot read, so that
    other readers get their turn.
    """
    if isinstance(path, list):
        if len(path) != 1:
            return None
        path = path[0]
    p = Path(path)
    from ..data.large import is_zarr_path

    if is_zarr_path(p):
        return read_zarr_image
    if p.is_dir():
        try:
            return read_path if list_images(p) or Project.is_project(p) else None
        except OSError:
            return None
    if p.suffix.lower() == ".json" and p.is_file() and _looks_like_coco(p):
        return read_path
    if p.suffix.lower() == ".geojson" and p.is_file():
        return read_geojson_path
    return None


def read_geojson_path(path: str | list[str]) -> list[LayerData]:
    """A GeoJSON's boxes (QuPath's export, or ours) as Shapes layers over the region they
    cover: annotations, and detections as predictions with their scores; classes by name."""
    import math

    from ..data.geojson import geojson_extent, read_geojson
    from ..data.tiles import Tile

    if isinstance(path, list):
        path = path[0]
    p = Path(path)
    x1, y1 = geojson_extent(p)
    region = Tile(id=1, name=p.stem, width=max(1, math.ceil(x1)), height=max(1, math.ceil(y1)))
    tileset = read_geojson(p, TileSet([region]))
    layers = [shapes_layer_data(tileset, name=f"{p.stem} annotations")]
    if len(region.predictions):
        layers.append(shapes_layer_data(tileset, predictions=True, name=f"{p.stem} detections"))
    return layers


def _looks_like_coco(path: Path) -> bool:
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(data, dict) and "images" in data and "categories" in data


def read_path(path: str | list[str]) -> list[LayerData]:
    if isinstance(path, list):
        path = path[0]
    p = Path(path)
    if p.is_dir():
        tileset = Project.open(p).tileset if Project.is_project(p) else TileSet.from_folder(p)
        name = p.name
    else:
        tileset = read_coco(p)
        name = p.stem if p.stem != "annotations" else p.parent.name
    return tileset_to_layers(tileset, name=name)


def read_zarr_image(path: str | list[str]) -> list[LayerData]:
    """A zarr array or OME-Zarr multiscale group as one lazy (multiscale) image layer;
    the widget's "Open large image…" cuts it into tiles for annotation."""
    from ..data.large import open_large_image
    from .wholeimage import overview_data

    if isinstance(path, list):
        path = path[0]
    image = open_large_image(path)
    data, rgb = overview_data(image)
    meta = {"name": image.name, "rgb": rgb, "multiscale": isinstance(data, list)}
    return [(data, meta, "image")]
