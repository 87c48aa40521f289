"""Per-call options of a detector forward: what one prediction keeps, how one training
forward weighs its losses. Never attributes set on the shared model.

A model is shared: by the trainer's student and its teacher's copy, by the GUI's worker
threads, by the Dask tasks of one worker process. Options set on it for one call leak into
another running beside it (measured before this module: 18,676 boxes instead of 13,419
with two Dask threads in one worker, each setting and restoring proposal limits).

- **Prediction** (``DetectOptions``): given to ``predict_images(..., options=)``, which
  holds them in a context variable for the duration of the call; the RPN and the box head
  read them there (``current``). A context variable is per thread (and per asyncio task),
  so two calls in two threads never see each other's options.
- **Training** (``LossSpec``): rides on the targets of the forward (``with_spec``), which
  torchvision hands unchanged to the RPN and the box head; the head writes the class logits
  the regulariser needs back onto the spec, not onto itself.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass

from torch import Tensor


@dataclass(frozen=True)
class DetectOptions:
    """What an eval forward keeps; ``None``: the model's own setting."""

    #: the box head's score floor (its ``score_thresh``)
    score_thresh: float | None = None
    #: "class" or "foreground" (``FocalRoIHeads.foreground_detections``)
    score_by: str | None = None
    #: a floor on the RPN's objectness; with it the proposals are capped per cell of the
    #: input (``proposals.LocalRPN``) and no count per input applies
    objectness: float | None = None
    #: proposals per cell under ``objectness`` (None: a 256 px tile's density)
    per_cell: int | None = None
    #: without ``objectness``: the least number of proposals and of boxes each image keeps
    per_image: int | None = None
    #: under ``objectness``, per image of the call: the region ``(x0, y0, x1, y1)`` (input
    #: pixels) that a proposal must reach to be pooled, or None for all of the image. A
    #: window of a large image keeps only boxes centred in the part it owns: proposals far
    #: outside it could only make boxes that are thrown away (``wholeimage.OWNED_MARGIN``)
    within: tuple[tuple[float, float, float, float] | None, ...] | None = None


_DEFAULTS = DetectOptions()
_CURRENT: ContextVar[DetectOptions | None] = ContextVar("napari_rmt_detect_options", default=None)


def current() -> DetectOptions:
    """The options of the prediction call this thread is in (defaults outside one)."""
    return _CURRENT.get() or _DEFAULTS


@contextlib.contextmanager
def detecting(options: DetectOptions | None) -> Iterator[None]:
    """Run the enclosed forwards of this thread under ``options`` (no-op for None)."""
    if options is None:
        yield
        return
    token = _CURRENT.set(options)
    try:
        yield
    finally:
        _CURRENT.reset(token)


#: ``(proposals, labels, targets)`` of the sampled RoIs -> one classification weight per RoI.
RoiWeighting = Callable[[list[Tensor], list[Tensor], list[dict]], Tensor]
#: The same arguments -> ``(probabilities (N, C), use_soft (N,))``.
RoiSoftTargets = Callable[[list[Tensor], list[Tensor], list[dict]], tuple[Tensor, Tensor]]
#: ``(anchors, target)`` -> per anchor, whether it would be background but is not known to be.
AnchorUnknown = Callable[[Tensor, dict], Tensor]

#: The target key that carries a forward's ``LossSpec``.
SPEC_KEY = "napari_rmt_loss_spec"


@dataclass
class LossSpec:
    """How one training forward weighs its losses (the unlabelled rules of SPEC §5, the
    partial rule), and where the box head leaves its class logits for the regulariser."""

    roi_weighting: RoiWeighting | None = None
    roi_soft_targets: RoiSoftTargets | None = None
    #: average the box head's classification loss over foreground and background apart
    split_normalise: bool = False
    anchor_unknown: AnchorUnknown | None = None
    #: written by the box head: the class logits of the sampled RoIs of this forward
    class_logits: Tensor | None = None


def with_spec(targets: list[dict], spec: LossSpec) -> list[dict]:
    """``targets`` (new dicts, same tensors) carrying ``spec`` for their forward."""
    return [{**t, SPEC_KEY: spec} for t in targets]


def spec_of(targets: list[dict] | None) -> LossSpec | None:
    """The ``LossSpec`` a forward's targets carry, if any."""
    return targets[0].get(SPEC_KEY) if targets else None
