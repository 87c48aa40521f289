"""Large images read window by window, and the tile grid laid over them.

A field of view of tens of thousands of pixels does not fit in memory as 8-bit RGB
(20,000² px is 1.2 GB), so a ``LargeImage`` keeps a lazy array (zarr, a TIFF seen
through tifffile's zarr store, an OME-Zarr multiscale group) and converts only the
window it is asked for. PNG and JPEG cannot be decoded in parts: they are read whole
once and kept (see ``open_large_image``).

The grid is the one place that decides where windows lie. Origins sit on multiples
of the stride (``tile - overlap``) and the last window of a row or column is cut at
the image border rather than shifted inwards, so that, with a stride that is a
multiple of the detector's coarsest feature stride (64 px for FPN), every window sees
the pixels at the same phase as a pass over the whole image would.
"""

from __future__ import annotations

import functools
import math
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import DataWarning, ImageReadError, NapariRmtError
from .imageio import _TIFF, IMAGE_SUFFIXES, NOT_TIFF_SLIDES, read_image, to_uint8_rgb


@dataclass(frozen=True)
class Window:
    """One window of the grid, in whole-image pixels.

    ``x, y, width, height`` are the pixels the window reads (cut at the image border).
    ``owned`` is ``(x0, y0, x1, y1)``, the part of the image this window answers for:
    the owned regions of a grid partition the image, so a detection is kept by exactly
    one window, the one that owns its centre.
    """

    row: int
    col: int
    x: int
    y: int
    width: int
    height: int
    owned: tuple[int, int, int, int]


def _starts(size: int, tile: int, stride: int) -> list[int]:
    n = 1 if size <= tile else math.ceil((size - tile) / stride) + 1
    return [k * stride for k in range(n)]


def tile_grid(width: int, height: int, tile: int = 256, overlap: int = 0) -> list[Window]:
    """Windows of ``tile`` px, ``overlap`` px shared between neighbours, row by row.

    An image smaller than a tile gives one window of the image's size; sizes that are
    not a multiple of the stride give a narrower last column / shorter last row.
    """
    for name, v in (("width", width), ("height", height), ("tile size", tile)):
        if not isinstance(v, (int, np.integer)) or v <= 0:
            raise NapariRmtError(f"tile grid: {name} must be a positive integer, got {v!r}")
    if not isinstance(overlap, (int, np.integer)) or overlap < 0 or overlap >= tile:
        raise NapariRmtError(
            f"tile grid: overlap must be an integer from 0 to tile size - 1 ({tile - 1}), got {overlap!r}"
        )
    stride = tile - overlap
    xs, ys = _starts(width, tile, stride), _starts(height, tile, stride)
    lo = overlap // 2  # owned boundary between neighbours: mid-overlap
    windows = []
    for r, y in enumerate(ys):
        oy0 = 0 if r == 0 else y + lo
        oy1 = height if r == len(ys) - 1 else y + stride + lo
        for c, x in enumerate(xs):
            ox0 = 0 if c == 0 else x + lo
            ox1 = width if c == len(xs) - 1 else x + stride + lo
            windows.append(
                Window(
                    row=r,
                    col=c,
                    x=x,
                    y=y,
                    width=min(tile, width - x),
                    height=min(tile, height - y),
                    owned=(ox0, oy0, ox1, oy1),
                )
            )
    return windows


# --------------------------------------------------------------------------- images
class LargeImage:
    """A 2D image read region by region as ``(h, w, 3) uint8``.

    ``array`` is anything with ``shape``, ``dtype`` and numpy-style slicing (a zarr
    array, a dask array, a numpy array); ``axes`` names its dimensions ('y', 'x', 'c'
    and singleton 't' / 'z'). ``levels`` are coarser copies (a multiscale pyramid, finest
    first, ``array`` included) that napari can show without reading full resolution.
    """

    def __init__(
        self,
        array: Any,
        name: str = "image",
        axes: str | None = None,
        levels: Sequence[Any] | None = None,
        path: Path | None = None,
    ) -> None:
        self.array = array
        self.name = name
        self.path = path
        shape = tuple(int(s) for s in array.shape)
        self.axes = axes or _guess_axes(shape)
        if len(self.axes) != len(shape):
            raise ImageReadError(f"{name}: axes {self.axes!r} do not fit an array of shape {shape}")
        extra = [a for a in self.axes if a not in "yxc"]
        for a in extra:
            if shape[self.axes.index(a)] != 1:
                raise ImageReadError(
                    f"{name}: axis {a!r} has {shape[self.axes.index(a)]} planes; only 2D images "
                    "(one time point, one z plane) can be tiled"
                )
        if "y" not in self.axes or "x" not in self.axes:
            raise ImageReadError(f"{name}: axes {self.axes!r} lack 'y' or 'x'")
        self.height = shape[self.axes.index("y")]
        self.width = shape[self.axes.index("x")]
        if self.height == 0 or self.width == 0:
            raise ImageReadError(f"{name}: the image is empty (shape {shape})")
        channels = shape[self.axes.index("c")] if "c" in self.axes else 1
        if channels not in (1, 2, 3, 4):
            raise ImageReadError(f"{name}: {channels} channels; expected 1 (grayscale), 3 (RGB) or 4 (RGBA)")
        self.levels = list(levels) if levels else [array]
        #: µm per pixel, when the file states it (``data/scale.py``); None when unknown
        self.pixel_size: float | None = None
        #: the scanner's objective (40 for 40x), when the file states it; shown, not used
        #: (the pixel size decides the model's scale)
        self.objective: float | None = None
        #: what reads the pixels: "tifffile", "zarr", "pillow" or "openslide"
        self.reader: str = "zarr"
        self._float_scale: float | None = None

    @property
    def size(self) -> tuple[int, int]:
        return self.width, self.height

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.array.dtype)

    def read(self, x: int, y: int, width: int, height: int) -> np.ndarray:
        """Pixels ``[y, y + height) x [x, x + width)`` as ``(h, w, 3) uint8``.

        Conversion follows ``to_uint8_rgb``, except that a float image's scale (0..1
        or 0..255) is decided once for the whole image, so that windows agree.
        """
        if width <= 0 or height <= 0 or x < 0 or y < 0 or x + width > self.width or y + height > self.height:
            raise NapariRmtError(
                f"{self.name}: region x={x} y={y} {width}x{height} is outside the "
                f"{self.width}x{self.height} image"
            )
        index = []
        for a in self.axes:
            if a == "y":
                index.append(slice(y, y + height))
            elif a == "x":
                index.append(slice(x, x + width))
            elif a == "c":
                index.append(slice(None))
            else:
                index.append(0)
        try:
            raw = np.asarray(self.array[tuple(index)])
        except (OSError, ValueError, RuntimeError, TypeError, KeyError) as exc:
            # a damaged chunk of a zarr store, a truncated TIFF strip: the codec's own error
            raise ImageReadError(
                f"{self.path or self.name}: the region x={x} y={y} {width}x{height} cannot be read "
                f"({type(exc).__name__}: {exc}); the file may be damaged there"
            ) from exc
        kept = [a for a in self.axes if a in "yxc"]
        order = [kept.index(a) for a in "yxc" if a in kept]
        raw = np.transpose(raw, order)  # (h, w[, c])
        if np.issubdtype(raw.dtype, np.floating) or raw.dtype == np.uint16:
            raw = np.clip(raw.astype(np.float32) / self.float_scale(), 0.0, 1.0)
        return to_uint8_rgb(raw, where=f"{self.name} at x={x} y={y}")

    def float_scale(self) -> float:
        """The value that maps to white, decided once for the whole image (read in row
        strips) so that windows agree: a float image is 0..1 or 0..255; a 16-bit one is
        read at the smallest depth of 10, 12, 14, 16 bits that holds its maximum (as
        ``to_uint8_rgb`` does for a tile), with a warning below 16."""
        if self._float_scale is None:
            top, low = 0.0, 0.0
            step = max(1, 2**24 // max(1, self.width * 4))
            for y in range(0, self.height, step):
                h = min(step, self.height - y)
                index = [slice(y, y + h) if a == "y" else slice(None) if a in "xc" else 0 for a in self.axes]
                block = np.asarray(self.array[tuple(index)])
                if np.issubdtype(block.dtype, np.floating) and not np.isfinite(block).all():
                    raise ImageReadError(f"{self.name}: the image contains NaN or infinite values")
                top = max(top, float(block.max(initial=0)))
                low = min(low, float(block.min(initial=0)))
            if np.issubdtype(self.dtype, np.floating):
                self._float_scale = 1.0 if top <= 1.0 else 255.0
                if top > 255.0 or low < 0.0:
                    warnings.warn(
                        DataWarning(
                            f"{self.name}: float values span {low:g}..{top:g}, outside "
                            f"0..{self._float_scale:g}; they are clipped to it"
                        ),
                        stacklevel=2,
                    )
            else:
                bits = next(b for b in (10, 12, 14, 16) if top < 2**b)
                if bits < 16:
                    warnings.warn(
                        DataWarning(f"{self.name}: {self.dtype} values reach only {top:g}; read as {bits}-bit data"),
                        stacklevel=2,
                    )
                self._float_scale = float(2**bits - 1)
        return self._float_scale

    def __repr__(self) -> str:
        return f"LargeImage({self.name!r}, {self.width}x{self.height}, {self.dtype}, {len(self.levels)} level(s))"


def _guess_axes(shape: tuple[int, ...]) -> str:
    if len(shape) == 2:
        return "yx"
    if len(shape) == 3:
        if shape[-1] in (1, 2, 3, 4):
            return "yxc"
        if shape[0] in (1, 2, 3, 4):
            return "cyx"
    raise ImageReadError(
        f"cannot tell the axes of an array of shape {shape}; expected (y, x), (y, x, c) or (c, y, x)"
    )


def is_zarr_path(path: str | os.PathLike) -> bool:
    p = Path(path)
    return p.is_dir() and (
        p.suffix.lower() == ".zarr" or any((p / f).exists() for f in (".zarray", ".zgroup", "zarr.json"))
    )


def open_large_image(path: str | os.PathLike) -> LargeImage:
    """Open a TIFF, PNG/JPEG, zarr array or OME-Zarr multiscale group lazily.

    TIFF and zarr are read window by window through zarr (a tiled or pyramidal TIFF
    gives its levels too). PNG and JPEG have no random access: they are decoded once
    here and held in memory; convert very large ones to TIFF or zarr.
    """
    p = Path(path)
    if not p.exists():
        raise ImageReadError(f"{p}: image not found")
    if is_zarr_path(p):
        return _open_zarr(p)
    if p.is_dir():
        raise ImageReadError(f"{p}: is a folder but not a zarr store")
    suffix = p.suffix.lower()
    if suffix in _TIFF:
        return _open_tiff(p)
    if suffix in IMAGE_SUFFIXES:
        image = LargeImage(_read_whole(p), name=p.name, axes="yxc", path=p)
        image.reader = "pillow"
        return image
    if suffix in NOT_TIFF_SLIDES:
        from .openslide_reader import open_openslide

        return open_openslide(p)
    raise ImageReadError(
        f"{p}: {suffix or 'no suffix'} is not a known image type (TIFF, OME-TIFF, SVS, NDPI, SCN, BIF, PNG, JPEG, "
        "zarr, OME-Zarr; MRXS, VMS, VMU through OpenSlide)"
    )


def _read_whole(p: Path) -> np.ndarray:
    from PIL import Image

    saved = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None  # the user asked for this large image on purpose
    try:
        return read_image(p)
    finally:
        Image.MAX_IMAGE_PIXELS = saved


def _open_tiff(p: Path) -> LargeImage:
    import tifffile
    import zarr

    try:
        store = tifffile.imread(p, aszarr=True)
        node = zarr.open(store, mode="r")
    except Exception as exc:
        from .openslide_reader import after_tifffile

        return after_tifffile(p, exc, "cannot open TIFF")
    if hasattr(node, "shape"):
        return _with_pixel_size(LargeImage(node, name=p.name, path=p))
    # A pyramidal TIFF: a group of levels named 0, 1, ...
    keys = sorted((k for k in node.array_keys()), key=lambda k: int(k) if k.isdigit() else 1 << 30)
    levels = [node[k] for k in keys]
    if not levels:
        raise ImageReadError(f"{p}: the TIFF holds no image")
    return _with_pixel_size(LargeImage(levels[0], name=p.name, levels=levels, path=p))


def _with_pixel_size(image: LargeImage) -> LargeImage:
    """The pixel size (OME, Aperio, resolution tags) and objective (OME, Aperio, NDPI) the
    file states, when it states them."""
    from .scale import stated_scale

    image.reader = "tifffile"
    if image.path is not None:
        image.pixel_size, image.objective = stated_scale(image.path)
    return image


def _open_zarr(p: Path) -> LargeImage:
    import zarr

    try:
        node = zarr.open(str(p), mode="r")
    except Exception as exc:
        raise ImageReadError(f"{p}: cannot open zarr ({type(exc).__name__}: {exc})") from exc
    if hasattr(node, "shape"):
        return LargeImage(node, name=p.name, path=p)
    attrs = dict(node.attrs)
    ms = attrs.get("multiscales") or attrs.get("ome", {}).get("multiscales")
    if not ms:
        arrays = list(node.array_keys())
        raise ImageReadError(
            f"{p}: a zarr group without OME-Zarr 'multiscales' metadata"
            + (f" (it holds arrays {arrays[:5]}; open one of them directly)" if arrays else "")
        )
    try:
        first = ms[0]
        paths = [d["path"] for d in first["datasets"]]
        axes_meta = first.get("axes")
    except (KeyError, IndexError, TypeError) as exc:
        raise ImageReadError(f"{p}: malformed OME-Zarr multiscales metadata ({exc})") from exc
    axes = None
    if axes_meta:
        names = [a["name"] if isinstance(a, dict) else str(a) for a in axes_meta]
        axes = "".join(n[0].lower() for n in names)
    try:
        levels = [node[q] for q in paths]
    except KeyError as exc:
        raise ImageReadError(f"{p}: OME-Zarr level {exc} is missing") from exc
    return LargeImage(levels[0], name=p.name, axes=axes, levels=levels, path=p)


@functools.lru_cache(maxsize=8)
def cached_large_image(path: str) -> LargeImage:
    """One open handle per file for the tiles cut from it (PNGs are decoded once)."""
    return open_large_image(path)


def write_zarr_image(
    array: np.ndarray | None,
    path: str | os.PathLike,
    shape: tuple[int, ...] | None = None,
    chunks: int = 1024,
) -> Any:
    """A ``(y, x, 3) uint8`` zarr array on disk, from ``array`` or empty of ``shape``."""
    import zarr

    shape = tuple(array.shape) if array is not None else tuple(shape or ())
    if len(shape) != 3 or shape[-1] != 3:
        raise NapariRmtError(f"write_zarr_image: expected a (y, x, 3) shape, got {shape}")
    z = zarr.open(str(path), mode="w", shape=shape, chunks=(chunks, chunks, 3), dtype="u1")
    if array is not None:
        z[...] = np.asarray(array, dtype=np.uint8)
    return z
