"""Reading tiles as uint8 RGB, whatever the file holds.

The detector and the mixing step of the paper work on 8-bit RGB, so every image is
brought to ``(H, W, 3) uint8`` by one documented rule (see ``to_uint8_rgb``). Files are
read with Pillow, except TIFF, which goes through tifffile because Pillow cannot read
many scientific TIFFs (16-bit RGB, tiled, BigTIFF).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np

from .errors import DataWarning, ImageReadError

IMAGE_SUFFIXES = (".png", ".tif", ".tiff", ".jpg", ".jpeg")
#: Read through tifffile: TIFF and the TIFF-based slide formats it parses (Aperio SVS,
#: Hamamatsu NDPI, Leica SCN, Ventana BIF).
SLIDE_SUFFIXES = (".svs", ".ndpi", ".scn", ".bif")
_TIFF = (".tif", ".tiff", *SLIDE_SUFFIXES)
#: Slide formats that are not TIFF: read through OpenSlide (the ``slides`` extra,
#: ``data/openslide_reader.py``).
NOT_TIFF_SLIDES = (".mrxs", ".vms", ".vmu")


def to_uint8_rgb(array: np.ndarray, where: str = "image") -> np.ndarray:
    """Bring an image array to ``(H, W, 3) uint8``.

    The rule, in order:

    1. Layout: ``(H, W)`` and ``(H, W, 1)`` are grayscale; ``(H, W, 2)`` is grayscale
       plus alpha; ``(H, W, 3)`` is RGB; ``(H, W, 4)`` is RGBA. Channel-first arrays
       ``(C, H, W)`` with C in 1..4 and both H, W larger than 4 are moved to channel-last.
    2. Values: ``bool`` maps to 0 / 255; unsigned integers are scaled from their full
       dtype range (uint16: divided by 257, so 65535 -> 255), never stretched per image,
       so that the colours of tiles from one slide stay comparable; signed integers are
       clipped at 0 and scaled likewise, except 16-bit data that fits 10, 12 or 14 bits
       (a camera's depth), scaled by that depth, with a warning, and 32- or 64-bit integers
       whose values fit 8 to 16 bits, scaled by the smallest such depth, with a warning
       (numpy's default int holds 8-bit pixels); floats are taken as 0..1
       when their maximum is at most 1, else as 0..255, and clipped (with a warning when
       values fall outside).
    3. Alpha is composited over white, the colour of empty glass in brightfield H&E.
    4. Grayscale is repeated into three channels.
    """
    a = np.asarray(array)
    if a.ndim == 3 and a.shape[0] in (1, 2, 3, 4) and a.shape[-1] > 4 and min(a.shape[1:]) > 4:
        a = np.moveaxis(a, 0, -1)
    if a.ndim == 2:
        a = a[:, :, None]
    if a.ndim != 3 or a.shape[-1] not in (1, 2, 3, 4) or a.shape[0] == 0 or a.shape[1] == 0:
        raise ImageReadError(
            f"{where}: cannot use an image of shape {tuple(np.shape(array))}; expected "
            "(H, W), (H, W, 3) or (H, W, 4) (grayscale, RGB or RGBA)"
        )
    f = _to_unit_float(a, where)  # float32 in 0..1
    if f.shape[-1] in (2, 4):
        colour, alpha = f[..., :-1], f[..., -1:]
        f = colour * alpha + (1.0 - alpha)
    if f.shape[-1] == 1:
        f = np.repeat(f, 3, axis=-1)
    return np.round(f * 255.0).astype(np.uint8)


def _to_unit_float(a: np.ndarray, where: str) -> np.ndarray:
    if a.dtype == np.uint8:
        return a.astype(np.float32) / 255.0
    if a.dtype == bool:
        return a.astype(np.float32)
    if np.issubdtype(a.dtype, np.integer):
        top = float(np.iinfo(a.dtype).max)
        hi = int(a.max()) if a.size else 0
        if np.issubdtype(a.dtype, np.signedinteger) and a.size and int(a.min()) < 0:
            warnings.warn(
                DataWarning(f"{where}: signed {a.dtype} values down to {int(a.min())} are clipped at 0"),
                stacklevel=3,
            )
        if a.dtype == np.uint16:
            # 10-, 12- and 14-bit cameras store in 16-bit containers: scaled by 65535 such
            # data is near black and the detector finds nothing. Scale by the smallest
            # depth that holds the data, and say so.
            bits = next(b for b in (10, 12, 14, 16) if hi < 2**b)
            if bits < 16:
                warnings.warn(
                    DataWarning(
                        f"{where}: {a.dtype} values reach only {hi}; read as {bits}-bit data "
                        f"(0..{2**bits - 1} -> 0..255)"
                    ),
                    stacklevel=3,
                )
                top = float(2**bits - 1)
        elif a.dtype.itemsize > 2:
            # 32- and 64-bit integers (numpy's default int, a zarr written from one) hold 8- or
            # 16-bit pixels: scaled by 2**63 they read as black. Scaled by the smallest
            # common depth that holds the data, with a warning.
            bits = next((b for b in (8, 10, 12, 14, 16) if hi < 2**b), None)
            if bits is not None:
                warnings.warn(
                    DataWarning(f"{where}: {a.dtype} values reach {hi}; read as {bits}-bit data "
                                f"(0..{2**bits - 1} -> 0..255)"),
                    stacklevel=3,
                )
                top = float(2**bits - 1)
        return np.clip(a.astype(np.float64), 0, None).astype(np.float32) / np.float32(top)
    if np.issubdtype(a.dtype, np.floating):
        if not np.isfinite(a).all():
            raise ImageReadError(f"{where}: the image contains NaN or infinite values")
        lo = float(a.min()) if a.size else 0.0
        hi = float(a.max()) if a.size else 0.0
        scale = 1.0 if hi <= 1.0 else 255.0
        if hi > 255.0 or lo < 0.0:
            warnings.warn(
                DataWarning(
                    f"{where}: float values span {lo:g}..{hi:g}, outside 0..{scale:g}; they are clipped "
                    f"to it (rescale the data to 0..1 or 0..255 for a faithful image)"
                ),
                stacklevel=3,
            )
        return np.clip(a.astype(np.float32) / scale, 0.0, 1.0)
    raise ImageReadError(f"{where}: pixel type {a.dtype} is not supported")


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Read a tile as ``(H, W, 3) uint8``; errors name the file and the reason."""
    path = Path(path)
    if not path.exists():
        raise ImageReadError(f"{path}: image file not found")
    if path.is_dir():
        raise ImageReadError(f"{path}: is a folder, not an image file")
    try:
        raw = _read_raw(path)
    except ImageReadError:
        raise
    except Exception as exc:  # any decoder failure is a user-facing read error
        raise ImageReadError(f"{path}: cannot read image ({type(exc).__name__}: {exc})") from exc
    return to_uint8_rgb(raw, where=str(path))


def _read_raw(path: Path) -> np.ndarray:
    if path.suffix.lower() in _TIFF:
        import tifffile

        return tifffile.imread(path)
    from PIL import Image

    with Image.open(path) as im:
        im.load()
        mode = im.mode
        if mode == "P":
            im = im.convert("RGBA" if "transparency" in im.info else "RGB")
        elif mode in ("CMYK", "YCbCr", "LAB", "HSV"):
            im = im.convert("RGB")
        elif mode == "1":
            im = im.convert("L")
        elif mode in ("I;16", "I;16L", "I;16B", "I;16N"):
            return np.asarray(im).astype(np.uint16)
        elif mode == "I":
            arr = np.asarray(im)
            # 32-bit integer PNG/TIFF from Pillow: 16-bit data promoted; keep its range.
            return arr.astype(np.uint16) if arr.max(initial=0) <= 65535 else arr
        return np.asarray(im)


def image_size(path: str | os.PathLike) -> tuple[int, int]:
    """Width and height from the header only, so large folders open quickly."""
    path = Path(path)
    if not path.exists():
        raise ImageReadError(f"{path}: image file not found")
    if path.suffix.lower() in NOT_TIFF_SLIDES:
        from .openslide_reader import open_openslide

        return open_openslide(path).size
    try:
        if path.suffix.lower() in _TIFF:
            import tifffile

            with tifffile.TiffFile(path) as tf:
                shape = tf.series[0].shape
            arr_shape = tuple(int(s) for s in shape)
            h, w = _hw_from_shape(arr_shape)
            return w, h
        from PIL import Image

        with Image.open(path) as im:
            return int(im.width), int(im.height)
    except ImageReadError:
        raise
    except Exception as exc:
        from .openslide_reader import after_tifffile

        return after_tifffile(path, exc, "cannot read image header").size


def _hw_from_shape(shape: tuple[int, ...]) -> tuple[int, int]:
    if len(shape) == 2:
        return shape[0], shape[1]
    if len(shape) == 3:
        if shape[0] in (1, 2, 3, 4) and shape[-1] > 4:
            return shape[1], shape[2]
        return shape[0], shape[1]
    raise ImageReadError(f"image of shape {shape} is not a 2D grayscale, RGB or RGBA image")


def list_images(folder: str | os.PathLike) -> list[Path]:
    """Image files of a folder (not recursive), in natural name order."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ImageReadError(f"{folder}: not a folder")
    files = [p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
    return sorted(files, key=lambda p: _natural_key(p.name))


def _natural_key(name: str) -> list:
    import re

    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", name)]
