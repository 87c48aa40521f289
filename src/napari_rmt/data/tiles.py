"""Tiles and the tile set: the one record of a project that every part shares.

A tile knows where its pixels come from but loads them only when asked, so that a
folder of hundreds of tiles opens at once. Its status says how far its annotations
can be trusted: on LABELLED (or REVIEWED) tiles every cell has a box, so an unboxed
region is background; on PARTIAL tiles the boxes are true cells but an unboxed region
may be a cell nobody boxed (the trainer never teaches it as background with
certainty); UNLABELLED tiles are unlabelled data for the semi-supervised loss.
"""

from __future__ import annotations

import enum
import functools
import os
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .boxes import Boxes
from .classes import ClassList
from .errors import AnnotationError, DataWarning, ImageReadError
from .imageio import image_size, list_images, read_image, to_uint8_rgb
from .large import LargeImage, cached_large_image, open_large_image, tile_grid

#: Under this many boxes the user vouches for, a class is learnt poorly: the widget says so.
FEW_BOXES = 20


class TileStatus(str, enum.Enum):
    """Whether a tile's annotations can be trusted as complete."""

    UNLABELLED = "unlabelled"
    #: Some cells are boxed (drawn or accepted), the others are not known: the user has not
    #: said that every cell of the tile has a box.
    PARTIAL = "partial"
    LABELLED = "labelled"  # the user marked it fully annotated
    REVIEWED = "reviewed"  # fully annotated, from predictions the user checked and accepted

    @property
    def is_labelled(self) -> bool:
        """Fully annotated: every unboxed region is background."""
        return self in (TileStatus.LABELLED, TileStatus.REVIEWED)

    @property
    def has_labels(self) -> bool:
        """Holds boxes the user vouches for (fully or partly annotated)."""
        return self is not TileStatus.UNLABELLED

    @classmethod
    def of_boxes(cls, current: TileStatus, n_boxes: int) -> TileStatus:
        """The status a tile's box count implies when the user has not said otherwise: a
        tile that is not fully annotated is partial while it has boxes, unlabelled
        without. A fully annotated tile stays so (an empty one says "no cells here")."""
        if current.is_labelled:
            return current
        return cls.PARTIAL if n_boxes else cls.UNLABELLED


PixelSource = Callable[[], np.ndarray]


@dataclass
class Tile:
    """One image tile.

    ``path`` (a file) or ``loader`` (any callable) gives the pixels; with ``window``
    the file is a large image and the tile is the part of it at ``origin``. ``origin`` is the tile's (x, y) offset in a larger image, so boxes map
    back to whole-image coordinates; ``meta`` keeps the extra fields of the source
    file (CoNSeP's ``source_tile``, say) so that an export gives them back.
    """

    id: int
    name: str
    width: int
    height: int
    path: Path | None = None
    loader: PixelSource | None = None
    status: TileStatus = TileStatus.UNLABELLED
    boxes: Boxes = field(default_factory=Boxes)
    predictions: Boxes = field(default_factory=Boxes)
    origin: tuple[int, int] = (0, 0)
    meta: dict[str, Any] = field(default_factory=dict)
    window: bool = False  # ``path`` is a large image and the tile is its window at ``origin``
    #: (N, 4) xyxy: boxes the user deleted, annotations or predictions alike. Each says "no
    #: cell here" where a detector saw one, so the nucleus model's cells of a partial tile
    #: (``TrainConfig.partial_cells``) are never taught over them.
    rejected: np.ndarray = field(default_factory=lambda: np.zeros((0, 4)))

    def reject(self, xyxy: np.ndarray) -> None:
        """Remember deleted boxes (clipped to the tile; empty ones are left out)."""
        xyxy = np.asarray(xyxy, dtype=np.float64).reshape(-1, 4).copy()
        xyxy[:, [0, 2]] = np.clip(xyxy[:, [0, 2]], 0, self.width)
        xyxy[:, [1, 3]] = np.clip(xyxy[:, [1, 3]], 0, self.height)
        xyxy = xyxy[(xyxy[:, 2] > xyxy[:, 0]) & (xyxy[:, 3] > xyxy[:, 1])]
        if len(xyxy):
            self.rejected = np.concatenate([np.asarray(self.rejected, dtype=np.float64).reshape(-1, 4), xyxy])

    def pixels(self) -> np.ndarray:
        """The tile as ``(H, W, 3) uint8``; read each time (callers cache if they need)."""
        if self.loader is not None:
            arr = to_uint8_rgb(self.loader(), where=f"tile {self.name!r}")
        elif self.window and self.path is not None:
            image = cached_large_image(str(self.path))
            arr = image.read(int(self.origin[0]), int(self.origin[1]), self.width, self.height)
        elif self.path is not None:
            arr = read_image(self.path)
        else:
            raise ImageReadError(f"tile {self.name!r} has neither a file nor a pixel source")
        if arr.shape[:2] != (self.height, self.width):
            raise ImageReadError(
                f"{self.path or self.name}: image is {arr.shape[1]}x{arr.shape[0]} but the "
                f"annotations say {self.width}x{self.height}"
            )
        return arr

    @property
    def is_labelled(self) -> bool:
        return self.status.is_labelled

    @property
    def is_partial(self) -> bool:
        return self.status is TileStatus.PARTIAL


class TileSet:
    """Ordered tiles with unique ids, and the classes their boxes refer to."""

    def __init__(self, tiles: Iterable[Tile] = (), classes: ClassList | None = None) -> None:
        self.classes = classes if classes is not None else ClassList.default()
        self._tiles: list[Tile] = []
        self._by_id: dict[int, Tile] = {}
        for t in tiles:
            self.add(t)

    def add(self, tile: Tile) -> Tile:
        if tile.id in self._by_id:
            raise AnnotationError(f"tile id {tile.id} is used twice ({tile.name!r})")
        unknown = set(np.unique(tile.boxes.class_ids).tolist()) | set(
            np.unique(tile.predictions.class_ids).tolist()
        )
        unknown -= set(self.classes.ids)
        if unknown:
            raise AnnotationError(
                f"tile {tile.name!r}: boxes refer to unknown class ids {sorted(unknown)}; "
                f"known: {self.classes.ids}"
            )
        self._tiles.append(tile)
        self._by_id[tile.id] = tile
        return tile

    def __iter__(self) -> Iterator[Tile]:
        return iter(self._tiles)

    def __len__(self) -> int:
        return len(self._tiles)

    def __getitem__(self, index: int) -> Tile:
        return self._tiles[index]

    def by_id(self, tile_id: int) -> Tile:
        try:
            return self._by_id[tile_id]
        except KeyError:
            raise AnnotationError(f"no tile with id {tile_id}") from None

    @property
    def labelled(self) -> list[Tile]:
        """The fully annotated tiles."""
        return [t for t in self._tiles if t.is_labelled]

    @property
    def partial(self) -> list[Tile]:
        """The partly annotated tiles: true boxes, unknown elsewhere."""
        return [t for t in self._tiles if t.is_partial]

    @property
    def unlabelled(self) -> list[Tile]:
        """The tiles with no annotation the user vouches for."""
        return [t for t in self._tiles if t.status is TileStatus.UNLABELLED]

    def annotated_counts(self) -> dict[str, int]:
        """Boxes per class name on the tiles the training learns from (fully or partly
        annotated), every class listed, zero included."""
        counts = dict.fromkeys(self.classes.names, 0)
        for t in self._tiles:
            if t.status.has_labels:
                for cid, n in t.boxes.counts_by_class().items():
                    counts[self.classes.by_id(cid).name] += n
        return counts

    def counts_by_class(self, predictions: bool = False) -> dict[str, int]:
        """Number of boxes per class name (every class listed, zero included)."""
        counts = dict.fromkeys(self.classes.names, 0)
        for t in self._tiles:
            for cid, n in (t.predictions if predictions else t.boxes).counts_by_class().items():
                counts[self.classes.by_id(cid).name] += n
        return counts

    @classmethod
    def from_folder(cls, folder: str | os.PathLike, classes: ClassList | None = None) -> TileSet:
        """Every readable image of a folder as an unlabelled tile with no boxes.

        A file that cannot be read does not block the others: it is left out with a
        warning that names it (and the reason); only a folder with no readable image is
        an error.
        """
        files = list_images(folder)
        if not files:
            raise ImageReadError(f"{folder}: no PNG, TIFF or JPEG images in this folder")
        tiles, bad = [], []
        for f in files:
            try:
                w, h = image_size(f)
            except ImageReadError as exc:
                bad.append(str(exc))
                continue
            tiles.append(Tile(id=len(tiles) + 1, name=f.name, width=w, height=h, path=f))
        if bad:
            warnings.warn(
                DataWarning(f"{folder}: {len(bad)} file(s) left out, unreadable: " + "; ".join(bad)),
                stacklevel=2,
            )
        if not tiles:
            raise ImageReadError(f"{folder}: none of its {len(files)} images can be read: " + "; ".join(bad[:3]))
        return cls(tiles, classes)


def window_name(path: Path, x: int, y: int) -> str:
    """How a window of a large image is called in lists: the image and the offset."""
    return f"{path.stem} x{x} y{y}"


def grid_tiles(
    image: LargeImage | str | os.PathLike,
    tile: int = 256,
    overlap: int = 0,
    start_id: int = 1,
    keep=None,
) -> list:
    """Tiles of the grid over a large image, unlabelled, ready to join a ``TileSet``; with
    ``keep`` (a ``Window`` -> bool, e.g. ``TissueMask.has_tissue``) only those it keeps.

    With a file behind the image the tiles refer to it by path and origin (they save to
    COCO and reopen); an in-memory image (a napari layer) is read through a loader.
    """
    img = image if isinstance(image, LargeImage) else open_large_image(image)
    tiles = []
    windows = [w for w in tile_grid(img.width, img.height, tile, overlap) if keep is None or keep(w)]
    for k, w in enumerate(windows):
        common = dict(
            id=start_id + k,
            width=w.width,
            height=w.height,
            origin=(w.x, w.y),
            meta={"grid_row": w.row, "grid_col": w.col},
        )
        if img.path is not None:
            tiles.append(Tile(name=window_name(img.path, w.x, w.y), path=img.path, window=True, **common))
        else:
            tiles.append(
                Tile(
                    name=f"{img.name} x{w.x} y{w.y}",
                    loader=functools.partial(img.read, w.x, w.y, w.width, w.height),
                    **common,
                )
            )
    return tiles
