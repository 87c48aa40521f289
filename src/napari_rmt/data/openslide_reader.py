"""Slides that only OpenSlide reads (3DHISTECH MRXS, Hamamatsu VMS / VMU), as ``LargeImage``.

tifffile reads the TIFF-based formats (SVS, NDPI, SCN, BIF, OME-TIFF) without a native
library, so those stay on it; MRXS is a folder of JPEG tiles and an index, which only
OpenSlide parses. OpenSlide is the ``slides`` extra (``openslide-python`` with the
``openslide-bin`` wheel: no system package). A TIFF-based slide that tifffile cannot parse
is tried with OpenSlide too, when it is installed.

Each pyramid level is wrapped as a read-only ``(height, width, 3) uint8`` array
(``OpenSlideLevel``) so that the rest of the code (windows, tissue mask, napari's
multiscale layer, Dask workers reopening the path) sees what it sees for a zarr level.
Regions OpenSlide reports as transparent (not scanned) are glass: composited over white.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ImageReadError

#: What to install when a slide needs OpenSlide and it is missing.
INSTALL = "pip install 'napari-rmt[slides]'"


def openslide_available() -> bool:
    try:
        import openslide  # noqa: F401
    except (ImportError, OSError):  # OSError: the package without its shared library
        return False
    return True


class OpenSlideLevel:
    """One pyramid level of an OpenSlide handle as a ``(h, w, 3) uint8`` array: numpy-style
    slicing reads the region (``read_region`` takes level-0 coordinates, so the origin is
    scaled by the level's downsample)."""

    dtype = np.dtype(np.uint8)
    ndim = 3

    def __init__(self, slide: Any, level: int, name: str) -> None:
        self._slide = slide
        self.level = level
        self.name = name
        w, h = slide.level_dimensions[level]
        self.shape = (int(h), int(w), 3)
        self.downsample = float(slide.level_downsamples[level])
        #: what one read should cover when a viewer pages the level (dask's chunks): a
        #: screenful, not the "auto" hundreds of megapixels
        self.chunks = (min(1024, self.shape[0]), min(1024, self.shape[1]), 3)

    @property
    def size(self) -> int:
        return self.shape[0] * self.shape[1] * 3

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index: Any) -> np.ndarray:
        if not isinstance(index, tuple):
            index = (index,)
        index = index + (slice(None),) * (3 - len(index))
        if len(index) != 3:
            raise IndexError(f"{self.name}: an index of {len(index)} axes for a 3-axis level")
        ys, xs, cs = index
        (y0, y1, ystep), squeeze_y = _span(ys, self.shape[0])
        (x0, x1, xstep), squeeze_x = _span(xs, self.shape[1])
        # the region read, then the index within it (an integer drops its axis, as numpy's)
        within = (0 if squeeze_y else slice(None, None, ystep), 0 if squeeze_x else slice(None, None, xstep), cs)
        return self._region(x0, y0, x1 - x0, y1 - y0)[within]

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        out = self._region(0, 0, self.shape[1], self.shape[0])
        return out.astype(dtype) if dtype is not None else out

    def _region(self, x: int, y: int, width: int, height: int) -> np.ndarray:
        if width <= 0 or height <= 0:
            return np.zeros((max(height, 0), max(width, 0), 3), dtype=np.uint8)
        origin = (round(x * self.downsample), round(y * self.downsample))
        try:
            rgba = np.asarray(self._slide.read_region(origin, self.level, (int(width), int(height))))
        except Exception as exc:  # openslide.OpenSlideError, a damaged tile's decoder error
            raise ImageReadError(
                f"{self.name}: level {self.level}, region x={x} y={y} {width}x{height} cannot be read "
                f"({type(exc).__name__}: {exc}); the slide may be damaged there"
            ) from exc
        alpha = rgba[..., 3:4].astype(np.float32) / 255.0
        rgb = rgba[..., :3].astype(np.float32) * alpha + 255.0 * (1.0 - alpha)
        return np.round(rgb).astype(np.uint8)


def _span(index: Any, size: int) -> tuple[tuple[int, int, int], bool]:
    """(start, stop, step) of one axis' index and whether it drops the axis (an integer)."""
    if isinstance(index, (int, np.integer)):
        i = int(index) + (size if index < 0 else 0)
        if not 0 <= i < size:
            raise IndexError(f"index {index} is out of bounds for an axis of {size}")
        return (i, i + 1, 1), True
    if isinstance(index, slice):
        start, stop, step = index.indices(size)
        if step <= 0:
            raise IndexError("only forward slices read a slide region")
        return (start, max(start, stop), step), False
    raise IndexError(f"a slide level takes integers and slices, not {type(index).__name__}")


def fallback(path: Path) -> bool:
    """Whether a TIFF-based slide that tifffile could not parse goes to OpenSlide instead."""
    from .imageio import SLIDE_SUFFIXES

    return path.suffix.lower() in SLIDE_SUFFIXES and openslide_available()


def after_tifffile(path: Path, exc: Exception, what: str):
    """The slide OpenSlide opens when tifffile refused ``path`` (a scanner's TIFF variant it
    does not parse), or the error that says ``what`` failed and why, in both readers' words.

    One rule for every reader of a file's header or pixels (``image_size``, ``stated_scale``,
    ``open_large_image``), so that a slide one of them can read, all of them can. Call it
    inside the ``except`` that caught tifffile's ``exc``."""
    if not fallback(path):
        raise ImageReadError(f"{path}: {what} ({type(exc).__name__}: {exc})") from exc
    try:
        return open_openslide(path)
    except ImageReadError as second:
        raise ImageReadError(f"{path}: {what}: tifffile says {type(exc).__name__}: {exc}; {second}") from exc


def open_openslide(path: str | os.PathLike):
    """The slide at ``path`` through OpenSlide: its levels, and the pixel size (µm/px) and
    objective it states (``openslide.mpp-x``, ``openslide.objective-power``)."""
    from .large import LargeImage
    from .scale import PLAUSIBLE

    p = Path(path)
    if not openslide_available():
        raise ImageReadError(
            f"{p}: {p.suffix or 'this'} slides are read through OpenSlide, which is not installed: {INSTALL} "
            "(or export the slide as OME-TIFF: QuPath, File > Export images > OME TIFF)"
        )
    import openslide

    try:
        slide = openslide.OpenSlide(str(p))
    except Exception as exc:  # OpenSlideUnsupportedFormatError, OpenSlideError
        raise ImageReadError(
            f"{p}: OpenSlide cannot open it ({type(exc).__name__}: {exc}); it reads Aperio SVS, Hamamatsu "
            "NDPI / VMS / VMU, 3DHISTECH MRXS (the .mrxs file with its data folder beside it), Leica SCN, "
            "Ventana BIF, Philips TIFF, Sakura SVSLIDE and generic tiled TIFF"
        ) from exc
    levels = [OpenSlideLevel(slide, k, p.name) for k in range(slide.level_count)]
    image = LargeImage(levels[0], name=p.name, axes="yxc", levels=levels, path=p)
    props = slide.properties
    mpp = _number(props.get("openslide.mpp-x"))
    image.pixel_size = mpp if mpp is not None and PLAUSIBLE[0] <= mpp <= PLAUSIBLE[1] else None
    image.objective = _number(props.get("openslide.objective-power"))
    image.reader = "openslide"
    return image


def _number(text: str | None) -> float | None:
    try:
        value = float(text) if text is not None else None
    except ValueError:
        return None
    return value if value is not None and np.isfinite(value) and value > 0 else None
