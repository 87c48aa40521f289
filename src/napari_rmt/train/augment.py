"""Weak and strong augmentation (paper Sec. 2.3, after Unbiased Teacher).

Weak: random horizontal flip, boxes flipped with it (the trainer draws the flips, alike on
every rank); the teacher sees this view.
Strong: photometric only, so the student's view keeps the weak view's geometry and the
pseudo-boxes stay valid without any mapping. Two kinds (``TrainConfig.strong_view``):
"unbiased" is Unbiased Teacher's (colour jitter, Gaussian blur, random erasing), made for
photographs of a few large objects; "stain" varies what differs between H&E slides (the
amount of each stain, brightness, slight focus) and erases nothing: on a 256 px tile of
40 nuclei, erasing a fifth of it wipes out cells whose pseudo-boxes stay positives.
Images are float tensors (3, H, W) in 0..1.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchvision.transforms import v2

#: The flips of a tile (horizontal, vertical): the weak view is one of the first two, the
#: teacher's extra looks (``TrainConfig.teacher_views``) take them in this order; nuclei
#: have no up or left, and a flip is undone exactly.
VIEW_FLIPS: tuple[tuple[bool, bool], ...] = ((False, False), (True, False), (False, True), (True, True))


def flip_image(image: Tensor, horizontal: bool, vertical: bool) -> Tensor:
    dims = [d for d, on in ((-1, horizontal), (-2, vertical)) if on]
    return image.flip(dims) if dims else image


def flip_boxes(boxes: Tensor, width: int, height: int, horizontal: bool, vertical: bool) -> Tensor:
    """Boxes of an image flipped as said, in the flipped image's coordinates (a flip is its
    own inverse, so the same call maps them back)."""
    out = boxes.clone()
    if horizontal:
        out[:, 0], out[:, 2] = width - boxes[:, 2], width - boxes[:, 0]
    if vertical:
        out[:, 1], out[:, 3] = height - boxes[:, 3], height - boxes[:, 1]
    return out


def hflip(image: Tensor, boxes: Tensor) -> tuple[Tensor, Tensor]:
    """The weak view's flip of a labelled tile and its boxes."""
    return image.flip(-1), flip_boxes(boxes, image.shape[-1], image.shape[-2], True, False)


def turn(image: Tensor, boxes: Tensor, vertical: bool, transpose: bool) -> tuple[Tensor, Tensor]:
    """A vertical flip and / or a transpose of a tile and its boxes. After the weak view's
    horizontal flip these reach all eight symmetries of a square (a quarter turn is a
    transpose and a flip), the ``dihedral`` labelled view."""
    if vertical:
        image, boxes = image.flip(-2), flip_boxes(boxes, image.shape[-1], image.shape[-2], False, True)
    if transpose:
        image, boxes = image.transpose(-1, -2), boxes[:, [1, 0, 3, 2]]
    return image, boxes


#: Stain vectors of haematoxylin, eosin and DAB in optical density (rows), after Ruifrok
#: and Johnston (2001), "Quantification of histochemical staining by color deconvolution".
STAIN_VECTORS = torch.tensor([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])


def stain_jitter(image: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
    """Scale and shift each stain's concentration (colour deconvolution and back).

    ``scale`` and ``shift`` are (3,): per stain (H, E, DAB). Optical density is
    ``-log(rgb)``, the concentrations are OD times the inverse of ``STAIN_VECTORS``;
    ``scale`` 1 and ``shift`` 0 give the image back (up to the 1/255 floor)."""
    od = -torch.log(image.clamp(1.0 / 255.0, 1.0))  # (3, H, W)
    to_stains = torch.linalg.inv(STAIN_VECTORS)
    c = torch.einsum("chw,cs->shw", od, to_stains)
    c = c * scale[:, None, None] + shift[:, None, None]
    od2 = torch.einsum("shw,sc->chw", c, STAIN_VECTORS)
    return torch.exp(-od2).clamp_(0.0, 1.0)


class StainAugment:
    """The "stain" strong view: each stain's amount x0.7-1.3 (shift ±0.03 OD), brightness
    and contrast ±15 %, a slight blur (sigma 0.1-1, p 0.3); no erasing."""

    def __init__(self, generator: torch.Generator | None = None) -> None:
        self.gen = generator
        self.blur = v2.GaussianBlur(kernel_size=5, sigma=(0.1, 1.0))

    def _u(self, lo: float, hi: float, n: int = 1) -> Tensor:
        return lo + (hi - lo) * torch.rand(n, generator=self.gen)

    def __call__(self, image: Tensor) -> Tensor:
        out = stain_jitter(image, self._u(0.7, 1.3, 3), self._u(-0.03, 0.03, 3))
        mean = out.mean()
        out = (out - mean) * self._u(0.85, 1.15) + mean * self._u(0.85, 1.15)
        if float(self._u(0.0, 1.0)) < 0.3:
            out = self.blur(out)
        return out.clamp_(0.0, 1.0)


def strong_view(kind: str, generator: torch.Generator | None = None):
    """The strong augmentation named by ``TrainConfig.strong_view``."""
    return StainAugment(generator) if kind == "stain" else StrongAugment()


class StrongAugment:
    """Unbiased Teacher's strong view: jitter (p 0.8), blur (p 0.5), then erasing patches."""

    def __init__(self) -> None:
        self.jitter = v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8)
        self.blur = v2.RandomApply([v2.GaussianBlur(kernel_size=5, sigma=(0.1, 2.0))], p=0.5)
        self.erase = v2.Compose(
            [
                v2.RandomErasing(p=0.7, scale=(0.05, 0.2), ratio=(0.3, 3.3), value="random"),
                v2.RandomErasing(p=0.5, scale=(0.02, 0.2), ratio=(0.1, 6.0), value="random"),
                v2.RandomErasing(p=0.3, scale=(0.02, 0.2), ratio=(0.05, 8.0), value="random"),
            ]
        )

    def __call__(self, image: Tensor) -> Tensor:
        out = self.blur(self.jitter(image))
        return self.erase(out).clamp_(0.0, 1.0)
