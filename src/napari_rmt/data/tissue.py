"""Tissue or glass: a mask computed on a coarse level of a slide, so that windows of glass
are never predicted (most of a slide is glass).

The rule: on a level of about ``MASK_SIDE`` px, a pixel is tissue when its optical density
(the sum over R, G, B of ``-log10((v + 1) / 256)``) is above Otsu's threshold of the
image's densities, held between ``MIN_DENSITY`` (clean glass is under it, so that a slide
of glass and dust has no tissue) and ``MAX_DENSITY`` (pale stroma is over it; Otsu's cut
alone can fall between stroma and nuclei). Pixel by pixel that misses the pale parts of
tissue (lumens, fat, white space between cells: a quarter of CoNSeP's tissue is under 0.12),
so the mask is closed, opened, cleared of specks, its holes filled, and grown by ``margin``
px of the full image so that a nucleus at a tissue edge lies inside.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .large import LargeImage, Window

#: The long side of the level the mask is computed on (coarser levels are read whole).
MASK_SIDE = 2048
#: Optical density (sum of the three channels) under which nothing is tissue: clean glass
#: is about 0.0-0.09, pale stroma about 0.2-0.3, nuclei over 1.
MIN_DENSITY = 0.12
MAX_DENSITY = 0.2
#: Specks under this share of the mask's pixels are dust, not tissue.
SPECK = 2e-5


def optical_density(rgb: np.ndarray) -> np.ndarray:
    """Per pixel, the summed optical density of R, G and B (0 for white)."""
    return (-np.log10((rgb.astype(np.float32) + 1.0) / 256.0)).sum(axis=-1)


def otsu(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold: the cut that maximises the between-class variance of a histogram."""
    hist, edges = np.histogram(values, bins=bins)
    centres = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * centres)
    mu0 = m0 / np.maximum(w0, 1)
    mu1 = (m0[-1] - m0) / np.maximum(w1, 1)
    between = w0 * w1 * (mu0 - mu1) ** 2
    return float(centres[int(np.argmax(between[:-1]))])


@dataclass
class TissueMask:
    """``mask`` (True: tissue) over the image at ``downsample`` full-resolution px per mask px."""

    mask: np.ndarray
    downsample: float

    @property
    def fraction(self) -> float:
        return float(self.mask.mean())

    def covers(self, x: int, y: int, width: int, height: int) -> float:
        """The share of tissue in a region given in full-resolution pixels."""
        d = self.downsample
        y0, x0 = int(y // d), int(x // d)
        y1 = max(y0 + 1, int(np.ceil((y + height) / d)))
        x1 = max(x0 + 1, int(np.ceil((x + width) / d)))
        part = self.mask[y0:y1, x0:x1]
        return float(part.mean()) if part.size else 0.0

    def has_tissue(self, w: Window) -> bool:
        return self.covers(w.x, w.y, w.width, w.height) > 0.0


def save_mask(tissue: TissueMask, path: str | os.PathLike) -> Path:
    """The mask as a black-and-white PNG (white: tissue), written atomically: a user's
    edited mask is part of their project."""
    from PIL import Image

    from .atomic import atomic_write

    image = Image.fromarray(np.where(tissue.mask, 255, 0).astype(np.uint8))
    return atomic_write(path, lambda fh: image.save(fh, format="PNG"))


def load_mask(path: str | os.PathLike, downsample: float) -> TissueMask:
    from PIL import Image

    from .errors import ImageReadError

    try:
        with Image.open(path) as im:
            return TissueMask(np.asarray(im.convert("L")) > 127, float(downsample))
    except (OSError, ValueError) as exc:
        raise ImageReadError(f"{path}: cannot read the tissue mask ({type(exc).__name__}: {exc})") from exc


def coarse_level(image: LargeImage, side: int = MASK_SIDE) -> tuple[np.ndarray, float]:
    """The finest pyramid level whose long side is at most ``side`` px, read whole as RGB,
    or, without such a level, the coarsest level read in row strips and subsampled; with
    its downsample (full-resolution px per returned px).

    The coarsest level, not the full resolution: a 40,000 px slide whose levels go down to
    2,500 px took 112 s to mask from its full resolution (4.8 GB of pixels decompressed)."""
    coarsest = image
    for level in image.levels[1:]:
        coarse = LargeImage(level, name=image.name, axes=image.axes)
        if max(coarse.width, coarse.height) <= side:
            return coarse.read(0, 0, coarse.width, coarse.height), image.width / coarse.width
        coarsest = coarse
    step = max(1, int(np.ceil(max(coarsest.width, coarsest.height) / side)))
    rows = 256 * step
    strips = [coarsest.read(0, y, coarsest.width, min(rows, coarsest.height - y))[::step, ::step]
              for y in range(0, coarsest.height, rows)]
    return np.concatenate(strips, axis=0), image.width / coarsest.width * step


def is_slide(image: LargeImage) -> bool:
    """A scanner's slide (a pyramid, or a slide format): mostly glass, masked by default."""
    from .imageio import NOT_TIFF_SLIDES, SLIDE_SUFFIXES

    suffix = image.path.suffix.lower() if image.path is not None else ""
    return len(image.levels) > 1 or suffix in (*SLIDE_SUFFIXES, *NOT_TIFF_SLIDES)


@functools.lru_cache(maxsize=4)
def cached_tissue_mask(path: str) -> TissueMask:
    """The tissue mask of the slide at ``path``, computed once per file (the GUI asks for it
    when the slide opens, when its tiles are cut and when it is predicted)."""
    from .large import cached_large_image

    return tissue_mask(cached_large_image(path))


def tissue_mask(image: LargeImage, margin: int = 16) -> TissueMask:
    """The tissue of ``image`` (see the module's docstring)."""
    from scipy import ndimage

    rgb, downsample = coarse_level(image)
    density = optical_density(rgb)
    cut = min(max(otsu(density), MIN_DENSITY), MAX_DENSITY) if density.max() > MIN_DENSITY else np.inf
    mask = ndimage.binary_closing(density > cut, iterations=2)
    mask = ndimage.binary_opening(mask, iterations=1)
    labels, n = ndimage.label(mask)
    if n:
        sizes = np.bincount(labels.ravel())
        keep = sizes >= max(1, SPECK * mask.size)
        keep[0] = False
        mask = keep[labels]
    mask = ndimage.binary_fill_holes(mask)  # a lumen or a fat cell inside tissue is tissue's
    grow = int(np.ceil(margin / downsample))
    if grow:
        mask = ndimage.binary_dilation(mask, iterations=grow)
    return TissueMask(mask, downsample)
