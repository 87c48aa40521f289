"""Synthetic whole slides for tests and benchmarks: islands of real H&E on white glass,
written as the formats a pure-Python writer can make (a pyramidal tiled TIFF read as an
Aperio SVS, and an OME-TIFF), with a known pixel size and a known tissue mask.

The slide is a function of its seed, rendered tile by tile at any level, so a 40,000 px
slide is written without ever holding it: tissue is a union of ellipses; inside them the
pixels come from the given H&E patches laid edge to edge (each patch once per cell of a
grid, mirrored where the grid cell is odd, so that seams do not repeat), outside is glass
(near-white with a little noise).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

TILE = 256


@dataclass
class SyntheticSlide:
    """A slide of ``width`` x ``height`` px: ``ellipses`` (cx, cy, rx, ry) of tissue filled
    with ``patches`` (HxWx3 uint8, all the same size)."""

    width: int
    height: int
    patches: Sequence[np.ndarray]
    ellipses: np.ndarray
    seed: int = 0

    @classmethod
    def make(cls, width: int, height: int, patches: Sequence[np.ndarray], tissue: float = 0.35,
             seed: int = 0) -> SyntheticSlide:
        """Islands placed at random until about ``tissue`` of the slide is covered."""
        rng = np.random.default_rng(seed)
        ellipses: list[tuple[float, float, float, float]] = []
        probe = cls(width, height, patches, np.zeros((0, 4)), seed)
        while probe.tissue_share() < tissue and len(ellipses) < 200:
            rx, ry = rng.uniform(0.08, 0.22) * width, rng.uniform(0.08, 0.22) * height
            ellipses.append((rng.uniform(rx, width - rx), rng.uniform(ry, height - ry), rx, ry))
            probe.ellipses = np.array(ellipses)
        return probe

    @functools.cached_property
    def _stack(self) -> np.ndarray:
        """The patches as one array, stacked once (``region`` runs for every tile)."""
        return np.stack(self.patches)

    def mask(self, x: int, y: int, w: int, h: int, step: int = 1) -> np.ndarray:
        """Tissue (True) of the region, sampled every ``step`` px."""
        ys = (np.arange(y, y + h, step) + 0.5)[:, None]
        xs = (np.arange(x, x + w, step) + 0.5)[None, :]
        out = np.zeros((len(ys), xs.shape[1]), bool)
        for cx, cy, rx, ry in self.ellipses:
            out |= ((xs - cx) / rx) ** 2 + ((ys - cy) / ry) ** 2 <= 1.0
        return out

    def tissue_share(self, step: int = 0) -> float:
        step = step or max(1, max(self.width, self.height) // 512)
        return float(self.mask(0, 0, self.width, self.height, step).mean())

    def region(self, x: int, y: int, w: int, h: int, step: int = 1) -> np.ndarray:
        """RGB pixels of the region, sampled every ``step`` px (a coarser level)."""
        ys = np.arange(y, y + h, step)
        xs = np.arange(x, x + w, step)
        ph, pw = self.patches[0].shape[:2]
        gy, gx = ys // ph, xs // pw
        # which patch fills each grid cell, mirrored on odd cells
        n = len(self.patches)
        out = np.empty((len(ys), len(xs), 3), np.uint8)
        which = (gy[:, None] * 7919 + gx[None, :] * 104729 + self.seed) % n
        iy = np.where(gy % 2 == 1, ph - 1 - ys % ph, ys % ph)
        ix = np.where(gx % 2 == 1, pw - 1 - xs % pw, xs % pw)
        out[:] = self._stack[which, iy[:, None], ix[None, :]]
        rng = np.random.default_rng((self.seed, x, y, step))
        glass = (242 + rng.integers(-4, 5, out.shape)).astype(np.uint8)
        tissue = self.mask(x, y, w, h, step)
        out[~tissue] = glass[~tissue]
        return out

    def tiles(self, step: int = 1) -> Iterator[np.ndarray]:
        """The level of downsample ``step`` in ``TILE`` px tiles, row by row (tifffile's order)."""
        w, h = -(-self.width // step), -(-self.height // step)
        for ty in range(0, h, TILE):
            for tx in range(0, w, TILE):
                tile = np.full((TILE, TILE, 3), 242, np.uint8)
                part = self.region(tx * step, ty * step, min(TILE, w - tx) * step, min(TILE, h - ty) * step, step)
                tile[: part.shape[0], : part.shape[1]] = part[:TILE, :TILE]
                yield tile

    def write(self, path: str | os.PathLike, pixel_size: float = 0.25, kind: str = "svs", levels: int = 3) -> Path:
        """Write the slide as ``kind`` "svs" (Aperio-style description: ``MPP``,
        ``AppMag``) or "ome" (OME-TIFF, ``PhysicalSizeX``), levels downsampled by 4."""
        import tifffile

        path = Path(path)
        steps = [4**k for k in range(levels) if max(self.width, self.height) // 4**k >= TILE]
        with tifffile.TiffWriter(path, bigtiff=True, ome=kind == "ome") as tif:
            if kind == "ome":
                meta = {"axes": "YXS", "PhysicalSizeX": pixel_size, "PhysicalSizeY": pixel_size,
                        "PhysicalSizeXUnit": "µm", "PhysicalSizeYUnit": "µm"}
                tif.write(self.tiles(1), shape=(self.height, self.width, 3), dtype=np.uint8, tile=(TILE, TILE),
                          photometric="rgb", compression="zlib", subifds=len(steps) - 1, metadata=meta)
                for step in steps[1:]:
                    tif.write(self.tiles(step), shape=(-(-self.height // step), -(-self.width // step), 3),
                              dtype=np.uint8, tile=(TILE, TILE), photometric="rgb", compression="zlib",
                              subfiletype=1)
            else:
                mag = round(10 / pixel_size)
                description = (f"Aperio Image Library v12.0.15 \r\n{self.width}x{self.height} [0,0 "
                               f"{self.width}x{self.height}] ({TILE}x{TILE}) JPEG/RGB Q=70|AppMag = {mag}"
                               f"|MPP = {pixel_size:.4f}")
                for k, step in enumerate(steps):
                    tif.write(self.tiles(step), shape=(-(-self.height // step), -(-self.width // step), 3),
                              dtype=np.uint8, tile=(TILE, TILE), photometric="rgb", compression="zlib",
                              description=description if k == 0 else None, metadata=None)
                    if k == 0:  # an SVS's second page is a stripped thumbnail, then the levels
                        thumb = max(1, max(self.width, self.height) // 512)
                        tif.write(self.region(0, 0, self.width, self.height, thumb), photometric="rgb",
                                  compression="zlib", metadata=None)
        return path
