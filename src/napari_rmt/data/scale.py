"""Pixel size: how many micrometres one pixel spans, read from a file or given, and the
resampling that brings an image to a model's own pixel size.

A detector learns nuclei at the size they had in its training tiles: the bundled nucleus
model, trained at 40x (about 0.25 µm per pixel), finds half as many nuclei on 20x tiles
(0.5 µm/px) as on the same tissue resampled to 40x (docs/benchmarks.md, CPM-15: F1 48.3
as they are, 60.8 resampled). So an image whose pixel size differs from the model's is
resampled by ``pixel size / model's pixel size`` before the detector sees it, and its
boxes are mapped back to the image's own pixels.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

import numpy as np

from .errors import NapariRmtError

#: Pixel sizes outside this range (µm/px) are not microscopy: a TIFF's default 72 dpi says
#: 353 µm/px, which is a file written by a tool that knew nothing of the scan.
PLAUSIBLE = (0.02, 20.0)
#: Pixel sizes within this share of each other are the same scale: no resampling.
SAME = 0.02


def check_pixel_size(value: float, where: str) -> float:
    """``value`` (µm/px) if it is a plausible pixel size, else a clear error naming ``where``
    (the command line's option type says the same)."""
    if not isinstance(value, (int, float)) or not math.isfinite(value) or not PLAUSIBLE[0] <= value <= PLAUSIBLE[1]:
        raise NapariRmtError(
            f"{where}: pixel size {value!r} µm/px is not a microscope's pixel size ({PLAUSIBLE[0]}-{PLAUSIBLE[1]}; "
            "about 0.25 at 40x, 0.5 at 20x)"
        )
    return float(value)


def scale_factor(pixel_size: float | None, model_pixel_size: float | None) -> float:
    """How much an image of ``pixel_size`` is enlarged for a model of ``model_pixel_size``
    (2.0: a 20x image for a 40x model); 1.0 when either is unknown or they agree."""
    if not pixel_size or not model_pixel_size:
        return 1.0
    factor = pixel_size / model_pixel_size
    return 1.0 if abs(factor - 1.0) <= SAME else factor


def scaled_size(width: int, height: int, factor: float) -> tuple[int, int]:
    return max(1, round(width * factor)), max(1, round(height * factor))


def resample(pixels: np.ndarray, factor: float) -> np.ndarray:
    """``(H, W, 3) uint8`` pixels enlarged (or shrunk) by ``factor``, bilinear; the result's
    size is ``scaled_size``. Boxes found on it map back by ``width / new width`` (and the
    height's ratio), exactly."""
    if factor == 1.0:
        return pixels
    from PIL import Image

    h, w = pixels.shape[:2]
    return np.array(Image.fromarray(pixels).resize(scaled_size(w, h, factor), Image.BILINEAR))


def pixel_size_of(path: str | os.PathLike) -> float | None:
    """The pixel size a file states (µm/px), or None: OME-TIFF's ``PhysicalSizeX``, an
    Aperio description's ``MPP``, or a TIFF resolution in centimetres or inches when it is
    a microscope's. Other formats (PNG, JPEG, zarr) state none we trust."""
    return stated_scale(path)[0]


def stated_scale(path: str | os.PathLike) -> tuple[float | None, float | None]:
    """The pixel size (``pixel_size_of``) and the objective (40 for 40x: OME's
    ``NominalMagnification``, an Aperio description's ``AppMag``, NDPI's magnification tag)
    a file states, each None when it states none, from one read of its header. The
    objective is shown to the user beside the pixel size; the pixel size sets the scale.
    Slides that only OpenSlide reads say both through it."""
    path = Path(path)
    from .imageio import _TIFF, NOT_TIFF_SLIDES

    if path.suffix.lower() in NOT_TIFF_SLIDES:
        from .openslide_reader import open_openslide

        image = open_openslide(path)
        return image.pixel_size, image.objective
    if path.suffix.lower() not in _TIFF:
        return None, None
    try:
        import tifffile

        with tifffile.TiffFile(path) as tf:
            found = _ome(tf.ome_metadata) if tf.is_ome else None
            page = tf.pages[0]
            description = getattr(page, "description", "") or ""
            if found is None:
                found = _aperio(description)
            if found is None:
                found = _resolution(page.tags)
            objective = _objective(tf, page, description)
    except Exception as exc:
        from .openslide_reader import after_tifffile

        image = after_tifffile(path, exc, "cannot read its header")
        return image.pixel_size, image.objective
    if found is not None and not PLAUSIBLE[0] <= found <= PLAUSIBLE[1]:
        found = None
    return found, objective


def _objective(tf, page, description: str) -> float | None:
    """The objective an open TIFF states, or None (a label: a value that does not parse states none)."""
    try:
        found = None
        if tf.is_ome and tf.ome_metadata:
            m = re.search(r'NominalMagnification="([0-9.eE+-]+)"', tf.ome_metadata)
            found = float(m.group(1)) if m else None
        if found is None:
            m = re.search(r"\bAppMag\s*=\s*([0-9.]+)", description)
            found = float(m.group(1)) if m else None
        if found is None and tf.is_ndpi:
            found = (getattr(page, "ndpi_tags", None) or {}).get("Magnification")
        value = float(found) if found is not None else None
    except Exception:
        return None
    return value if value is not None and 1.0 <= value <= 200.0 else None


_UNITS = {"µm": 1.0, "um": 1.0, "micron": 1.0, "nm": 1e-3, "mm": 1e3, "cm": 1e4, "m": 1e6}


def _ome(xml: str | None) -> float | None:
    if not xml:
        return None
    size = re.search(r'PhysicalSizeX="([0-9.eE+-]+)"', xml)
    if not size:
        return None
    unit = re.search(r'PhysicalSizeXUnit="([^"]+)"', xml)
    factor = _UNITS.get(unit.group(1) if unit else "µm")
    return float(size.group(1)) * factor if factor else None


def _aperio(description: str) -> float | None:
    found = re.search(r"\bMPP\s*=\s*([0-9.]+)", description)
    return float(found.group(1)) if found else None


def _resolution(tags) -> float | None:
    res, unit = tags.get("XResolution"), tags.get("ResolutionUnit")
    if res is None or unit is None:
        return None
    num, den = res.value if isinstance(res.value, tuple) else (res.value, 1)
    per_unit = num / den if den else 0.0
    if per_unit <= 0:
        return None
    micrometres = {2: 25400.0, 3: 10000.0}.get(int(unit.value))
    return micrometres / per_unit if micrometres else None
