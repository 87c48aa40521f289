"""Shared fixtures: tiny synthetic tiles and COCO files, and the path to the real data."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def pytest_addoption(parser):
    parser.addoption("--slow", action="store_true", help="also run tests marked slow")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--slow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


def write_tiles(folder: Path, n: int = 3, size: tuple[int, int] = (32, 48), seed: int = 0) -> list[Path]:
    """n random RGB PNG tiles of (height, width) = size."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        arr = rng.integers(0, 256, size=(*size, 3), dtype=np.uint8)
        p = folder / f"tile_{i}.png"
        Image.fromarray(arr).save(p)
        paths.append(p)
    return paths


def make_coco(tmp: Path, n_images: int = 3, size: tuple[int, int] = (32, 48)) -> Path:
    """A small valid COCO dataset: images/ + annotations.json with 2 boxes per image."""
    paths = write_tiles(tmp / "images", n_images, size)
    h, w = size
    images = [
        {"id": i + 1, "file_name": f"images/{p.name}", "width": w, "height": h} for i, p in enumerate(paths)
    ]
    anns = []
    for img in images:
        for k, cat in enumerate((1, 2)):
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": img["id"],
                    "category_id": cat,
                    "bbox": [2.0 + 10 * k, 3.0, 8.5, 6.25],
                    "area": 8.5 * 6.25,
                    "iscrowd": 0,
                }
            )
    coco = {
        "info": {"description": "test"},
        "images": images,
        "annotations": anns,
        "categories": [
            {"id": 1, "name": "tumor"},
            {"id": 2, "name": "stromal"},
            {"id": 3, "name": "lymphocyte"},
        ],
    }
    path = tmp / "annotations.json"
    path.write_text(json.dumps(coco))
    return path


@pytest.fixture
def coco_file(tmp_path: Path) -> Path:
    return make_coco(tmp_path)


@pytest.fixture
def consep_dir() -> Path:
    d = SHARED_DATA / "consep"
    if not (d / "annotations.json").is_file():
        pytest.skip("../shared/data/consep is not beside the repository")
    return d


@pytest.fixture(scope="session")
def monuseg_dir() -> Path:
    d = SHARED_DATA / "monuseg"
    if not (d / "annotations.json").is_file():
        pytest.skip("../shared/data/monuseg is not here")
    return d


def synthetic_tiles(n: int = 6, size: int = 64, seed: int = 0, n_classes: int = 3):
    """Tiles with dark square 'nuclei' on a pink background; class = size bucket.

    Labelled by construction, so tests can hide the boxes of some tiles to make them
    unlabelled. Pixels come from a loader, not a file.
    """
    from napari_rmt.data import Boxes, Tile, TileStatus

    rng = np.random.default_rng(seed)
    tiles = []
    for i in range(n):
        img = np.empty((size, size, 3), dtype=np.uint8)
        img[:] = (230, 180, 210)
        boxes, labels = [], []
        for k in range(3):
            cls = (i + k) % n_classes + 1
            side = 6 + 4 * cls
            x0 = int(rng.integers(0, size - side))
            y0 = int(rng.integers(0, size - side))
            img[y0 : y0 + side, x0 : x0 + side] = (80 + 20 * cls, 40, 120)
            boxes.append([x0, y0, x0 + side, y0 + side])
            labels.append(cls)
        tiles.append(
            Tile(
                id=i + 1,
                name=f"syn_{i}",
                width=size,
                height=size,
                loader=lambda a=img: a,
                status=TileStatus.LABELLED,
                boxes=Boxes(boxes, labels),
            )
        )
    return tiles


@pytest.fixture
def tiny_tiles():
    return synthetic_tiles()
