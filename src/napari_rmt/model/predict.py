"""Running a detector over tiles: batches, a score threshold, NMS, boxes back as ``Boxes``."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Sequence

import numpy as np
import torch
from torch import nn
from torchvision.ops import batched_nms, nms

from ..data.boxes import Boxes, BoxSource
from ..data.classes import ClassList
from ..data.errors import NapariRmtError
from ..data.scale import resample, scaled_size
from ..data.tiles import Tile
from .config import PREDICTION_FLOOR
from .options import DetectOptions, detecting


class DeviceError(NapariRmtError):
    """The device asked for cannot be used here."""


def resolve_device(name: str) -> torch.device:
    """``"auto"`` (a GPU when there is one), ``"cpu"``, ``"cuda"`` or ``"cuda:N"``, checked:
    prediction and training alike choose their device here."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError as exc:
        raise DeviceError(f"device {name!r} is not a valid torch device") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError(f"device {name!r} asked for, but CUDA is not available here")
    return dev


def image_tensor(pixels: np.ndarray) -> torch.Tensor:
    """``(H, W, 3) uint8`` -> ``(3, H, W) float32`` in 0..1, the detector's input."""
    return torch.from_numpy(np.ascontiguousarray(pixels)).permute(2, 0, 1).float().div_(255.0)


def select(
    boxes: torch.Tensor,
    scores: torch.Tensor,
    labels: torch.Tensor,
    score_threshold: float,
    nms_iou: float | None,
    class_agnostic: bool = True,
) -> torch.Tensor:
    """Indices kept after the score threshold and NMS (class-agnostic by default: one
    nucleus gets one box, whatever the classes the head hesitated between)."""
    keep = torch.where(scores >= score_threshold)[0]
    if nms_iou is not None and keep.numel():
        if class_agnostic:
            k = nms(boxes[keep], scores[keep], nms_iou)
        else:
            k = batched_nms(boxes[keep], scores[keep], labels[keep], nms_iou)
        keep = keep[k]
    return keep[torch.argsort(scores[keep], descending=True)]


def map_back(boxes: torch.Tensor, size: tuple[int, int], seen: tuple[int, int]) -> torch.Tensor:
    """Boxes found on an image resampled from ``size`` to ``seen`` (width, height), in the
    original image's pixels."""
    ratio = torch.tensor([size[0] / seen[0], size[1] / seen[1]] * 2, dtype=boxes.dtype)
    return boxes * ratio


def detections_to_boxes(
    boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor, classes: ClassList,
    class_doubt: torch.Tensor | None = None,
) -> Boxes:
    """Detector output (model labels 1..K) as ``Boxes`` with the class list's ids."""
    ids = np.array(classes.ids, dtype=np.int64)
    return Boxes(
        xyxy=boxes.numpy().astype(np.float64),
        class_ids=ids[labels.numpy() - 1],
        scores=scores.numpy().astype(np.float64),
        sources=np.full(len(boxes), BoxSource.PREDICTED, dtype=np.int8),
        class_doubt=np.full(len(boxes), np.nan) if class_doubt is None else class_doubt.numpy().astype(np.float64),
    )


def kept_boxes(det: dict[str, torch.Tensor], keep: torch.Tensor, classes: ClassList) -> Boxes:
    """The detections ``keep`` indexes, as ``Boxes`` (with their class doubt when the head
    gave one)."""
    doubt = det.get("class_doubt")
    return detections_to_boxes(det["boxes"][keep], det["scores"][keep], det["labels"][keep], classes,
                               None if doubt is None else doubt[keep])


@torch.no_grad()
def predict_images(
    model: nn.Module,
    images: Sequence[torch.Tensor],
    batch_size: int = 4,
    device: torch.device | str = "cpu",
    options: DetectOptions | None = None,
) -> list[dict[str, torch.Tensor]]:
    """Raw detector outputs (boxes, scores, model labels 1..K) per image, on the CPU; the
    detector keeps what ``options`` says (its own settings where they say None)."""
    was_training = model.training
    model.eval()
    out: list[dict[str, torch.Tensor]] = []
    try:
        for i in range(0, len(images), batch_size):
            batch = [im.to(device) for im in images[i : i + batch_size]]
            # ``within`` is per image of the call: each forward gets its own images' regions
            part = options
            if options is not None and options.within is not None:
                part = dataclasses.replace(options, within=options.within[i : i + batch_size])
            with detecting(part):
                for det in model(batch):
                    out.append({k: v.detach().cpu() for k, v in det.items()})
    finally:
        model.train(was_training)
    return out


#: Tiles larger than this many pixels are predicted one at a time under the local proposal
#: rule of whole images (``wholeimage.detect_options``): the per-image counts sized for
#: 256 px tiles (150 proposals, 300 boxes) would silently cap a 1000 px tile of dense tissue
#: (298 boxes for 818 nuclei, measured) where its windows find them all.
LARGE_TILE = 320 * 320


class PredictionWarning(UserWarning):
    """A tile was predicted with a caveat (named in the message)."""


class CapWarning(PredictionWarning):
    """A tile's predictions reached the detector's box cap: boxes may be missing."""


#: A tile at the cap warns when even its lowest box scores this much: the boxes the cap
#: dropped score less than that one, so below this they are noise no cut would show (an
#: untrained model fills every tile's 300 with scores of 0.05-0.1).
CAP_WARN_SCORE = 0.3

#: Smaller tiles leave the deepest feature map empty: what the detector says of them is noise
#: (a 2 x 2 px image got 4 boxes scoring up to 0.83). They get no boxes, with a warning.
MIN_SIDE = 32


def predict_tiles(
    model: nn.Module,
    tiles: Iterable[Tile],
    classes: ClassList,
    batch_size: int = 4,
    score_threshold: float = PREDICTION_FLOOR,
    nms_iou: float | None = 0.5,
    class_agnostic: bool = True,
    device: torch.device | str = "cpu",
    store: bool = True,
    progress: Callable[[int, int], None] | None = None,
    scale: float = 1.0,
) -> list[Boxes]:
    """Predict every tile; with ``store`` the result also becomes ``tile.predictions``.

    A tile larger than ``LARGE_TILE`` is judged as whole images are (local proposal caps,
    no count per image), so it gets the boxes its windows would; a tile whose boxes reach
    the detector's cap warns (``CapWarning``) naming it. With ``scale`` (``data.scale``:
    the tiles' pixel size over the model's) each tile is resampled by it for the detector
    and its boxes are mapped back to the tile's own pixels."""
    import warnings

    from .wholeimage import DEFAULT_OBJECTNESS

    tiles = list(tiles)
    results: list[Boxes] = []

    def pixels(tile: Tile) -> np.ndarray:
        return resample(tile.pixels(), scale)

    def seen(tile: Tile) -> tuple[int, int]:
        return scaled_size(tile.width, tile.height, scale) if scale != 1.0 else (tile.width, tile.height)

    cap = getattr(getattr(model, "roi_heads", None), "detections_per_img", None)
    done = 0
    for start in range(0, len(tiles), batch_size):
        chunk = tiles[start : start + batch_size]
        tiny = {k for k, t in enumerate(chunk) if min(seen(t)) < MIN_SIDE}
        for k in sorted(tiny):
            warnings.warn(PredictionWarning(
                f"tile {chunk[k].name!r} is {chunk[k].width}x{chunk[k].height} px; tiles under {MIN_SIDE} px a "
                "side get no boxes"), stacklevel=2)
        small = [k for k, t in enumerate(chunk) if seen(t)[0] * seen(t)[1] <= LARGE_TILE and k not in tiny]
        found = predict_images(model, [image_tensor(pixels(chunk[k])) for k in small], batch_size, device)
        dets = dict(zip(small, found, strict=True))
        for k, tile in enumerate(chunk):
            if k in tiny:
                det = {"boxes": torch.zeros((0, 4)), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.int64)}
            elif k in dets:
                det = dets[k]
            else:
                whole = DetectOptions(objectness=DEFAULT_OBJECTNESS)
                det = predict_images(model, [image_tensor(pixels(tile))], 1, device, options=whole)[0]
            if cap is not None and k in dets and len(det["boxes"]) >= cap and float(det["scores"].min()) >= CAP_WARN_SCORE:
                warnings.warn(CapWarning(
                    f"tile {tile.name!r}: {len(det['boxes'])} boxes, the detector's cap per tile; some cells may "
                    "have no box (cut the tile smaller)"), stacklevel=2)
            if scale != 1.0:
                det = {**det, "boxes": map_back(det["boxes"], (tile.width, tile.height), seen(tile))}
            keep = select(
                det["boxes"], det["scores"], det["labels"], score_threshold, nms_iou, class_agnostic
            )
            boxes = kept_boxes(det, keep, classes)
            if store:
                tile.predictions = boxes
            results.append(boxes)
        done += len(chunk)
        if progress is not None:
            progress(min(done, len(tiles)), len(tiles))
    return results
