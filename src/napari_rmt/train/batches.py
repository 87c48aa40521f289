"""The run's tiles as tensors, and the seeded draws that make each step's batches.

Under torchrun every rank draws the whole global batch's indices, flips and turns alike
from one generator and keeps its own share, so the ranks never disagree on the data order
and a resumed run continues the very same sequence (``rng_state``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..data.classes import ClassList
from ..data.errors import NapariRmtError
from ..data.scale import resample, scale_factor
from ..data.tiles import Tile
from ..model.predict import MIN_SIDE
from .augment import flip_boxes, hflip, turn
from .config import TrainConfig
from .distributed import World
from .partial import effective_number_weights, mark_partial, repeat_factors, unboxed_cells

#: Anchor-box matching holds anchors x boxes IoU values: cap its size, not the machine's memory.
MAX_MATCH_BYTES = 1 << 30


class TrainingError(NapariRmtError):
    """Training cannot go on: no labelled data, a non-finite loss, a device problem."""


class Cycler:
    """Endless shuffled passes over indices, from a seeded generator; with ``pool``, over
    the pool's entries (an index may stand in it several times: class-balanced passes)."""

    def __init__(self, n: int, generator: torch.Generator, pool: list[int] | None = None) -> None:
        self.pool = pool
        self.n = len(pool) if pool is not None else n
        self.g, self.order, self.pos = generator, [], 0

    def take(self, k: int) -> list[int]:
        out = []
        for _ in range(k):
            if self.pos >= len(self.order):
                self.order, self.pos = torch.randperm(self.n, generator=self.g).tolist(), 0
            j = self.order[self.pos]
            out.append(self.pool[j] if self.pool is not None else j)
            self.pos += 1
        return out


def load_image(tile: Tile, scale: float = 1.0) -> Tensor:
    """The tile's pixels as a uint8 CHW tensor, read once: re-reading PNGs every step
    would dominate on CPUs; resampled by ``scale`` (``data.scale.resample``: the tiles'
    pixel size over the model's). Under ``MIN_SIDE`` the deepest level's 1 x 1 map leaves
    BatchNorm nothing to train on."""
    if min(tile.width, tile.height) < MIN_SIDE:
        raise TrainingError(
            f"tile {tile.name!r} is {tile.width}x{tile.height} px; tiles must be at least "
            f"{MIN_SIDE} px on each side to train on"
        )
    pixels = resample(tile.pixels(), scale)
    return torch.from_numpy(np.ascontiguousarray(pixels)).permute(2, 0, 1).contiguous()


def as_trained(xyxy: np.ndarray, tile: Tile, image: Tensor) -> Tensor:
    """Boxes of ``tile`` in the pixels of ``image``, the tile as loaded for training: they
    scale as the image did, by its new size over the old, per axis (exactly; by 1 unscaled)."""
    height, width = image.shape[1:]
    ratio = np.array([width / tile.width, height / tile.height] * 2)
    return torch.as_tensor(np.asarray(xyxy, dtype=np.float64).reshape(-1, 4) * ratio, dtype=torch.float32)


def load_labelled(
    tile: Tile, classes: ClassList, aspect_ratios: Sequence[float], scale: float = 1.0
) -> tuple[Tensor, Tensor, Tensor]:
    """(image, boxes, labels) of an annotated tile, labels counted from 1 in ``classes``'
    order; empty boxes left out; image and boxes resampled by ``scale``."""
    im = load_image(tile, scale)
    b = tile.boxes
    label_of = {cid: i for i, cid in enumerate(classes.ids, start=1)}
    unknown = sorted(set(b.class_ids.tolist()) - set(label_of))
    if unknown:
        raise TrainingError(f"tile {tile.name!r}: boxes of class ids {unknown} are not in {classes.names}")
    height, width = im.shape[1:]
    anchors = sum((width // s + 1) * (height // s + 1) for s in (4, 8, 16, 32, 64)) * len(aspect_ratios)
    if anchors * len(b) * 4 > MAX_MATCH_BYTES:
        most = MAX_MATCH_BYTES // (4 * anchors)
        raise TrainingError(
            f"tile {tile.name!r} has {len(b):,} boxes; at most {most:,} fit in a tile of "
            f"{width}x{height} px as trained (matching them to the anchors would take "
            f"{anchors * len(b) * 4 / 2**30:.1f} GiB); cut it into smaller tiles"
        )
    keep = (b.xyxy[:, 2] > b.xyxy[:, 0]) & (b.xyxy[:, 3] > b.xyxy[:, 1])
    boxes = as_trained(b.xyxy[keep], tile, im)
    labels = torch.as_tensor([label_of[int(c)] for c in b.class_ids[keep]], dtype=torch.int64)
    return im, boxes, labels


class TrainingData:
    """Fully annotated, partly annotated and unlabelled tiles, and their batches.

    The partly annotated tiles follow the fully annotated ones in ``labelled`` and, for
    methods that read unlabelled tiles, the unlabelled ones in ``unlabelled`` (for the
    teacher to fill in; same tensors), with their user boxes in ``known``.
    """

    def __init__(
        self,
        labelled: Sequence[Tile],
        partial: Sequence[Tile],
        unlabelled: Sequence[Tile],
        classes: ClassList,
        cfg: TrainConfig,
        world: World,
        generator: torch.Generator,
        device: torch.device,
    ) -> None:
        self.cfg, self.world, self.gen, self.device = cfg, world, generator, device
        #: how much each tile is enlarged to the model's pixel size (1: as it is)
        self.scale = scale_factor(cfg.pixel_size, cfg.own_pixel_size)
        self.labelled = [load_labelled(t, classes, cfg.model.aspect_ratios, self.scale) for t in [*labelled, *partial]]
        self.n_full = len(labelled)
        #: which tiles the run learns from, saved so that a resume on other tiles is refused
        self.tile_ids = {"labelled": [t.id for t in labelled], "partial": [t.id for t in partial]}
        self.unlabelled = [load_image(t, self.scale) for t in unlabelled]
        #: Unlabelled-list index -> the user's (boxes, labels) of a partly annotated tile.
        self.known: dict[int, tuple[Tensor, Tensor]] = {}
        if cfg.uses_unlabelled:
            for k in range(self.n_full, len(self.labelled)):
                im, boxes, labels = self.labelled[k]
                self.known[len(self.unlabelled)] = (boxes, labels)
                self.unlabelled.append(im)
        #: Labelled-list index -> the nucleus model's cells nobody boxed on that partial
        #: tile (``partial_cells``), taught with the label one past the classes.
        self.cells: dict[int, Tensor] = {}
        self.any_cell = len(classes) + 1
        if cfg.partial_cells and len(self.labelled) > self.n_full:
            self.cells = self._unboxed_cells(cfg.partial_cells, partial)
        self.missing_classes = [
            c.name for i, c in enumerate(classes, start=1) if not any((lab == i).any() for _, _, lab in self.labelled)
        ]
        pool = None
        if cfg.class_balance:
            repeats = repeat_factors([lab for _, _, lab in self.labelled], len(classes), cfg.class_balance)
            pool = [i for i, r in enumerate(repeats) for _ in range(r)]
        self.lab_cycle = Cycler(len(self.labelled), generator, pool)
        self.unl_cycle = Cycler(max(1, len(self.unlabelled)), generator)
        #: Per-class weights of the labelled classification loss (background first), or None.
        self.class_weights: Tensor | None = None
        if cfg.class_weight_beta:
            counts = [sum(int((lab == i).sum()) for _, _, lab in self.labelled) for i in range(1, len(classes) + 1)]
            self.class_weights = effective_number_weights(counts, cfg.class_weight_beta)

    def _unboxed_cells(self, cut: float, partial: Sequence[Tile]) -> dict[int, Tensor]:
        """The bundled nucleus model's cells on the partial tiles (``partial.unboxed_cells``),
        at its own pixel size."""
        from ..model.bundled import NUCLEUS, NUCLEUS_PIXEL_SIZE
        from .checkpoint import load_model

        model, _, ncfg = load_model(NUCLEUS)
        model.to(self.device)
        factor = scale_factor(self.cfg.own_pixel_size, ncfg.own_pixel_size or NUCLEUS_PIXEL_SIZE)
        part = range(self.n_full, len(self.labelled))
        found = unboxed_cells(model, [self.labelled[k][0] for k in part], [self.labelled[k][1] for k in part],
                              cut, factor, rejected=[as_trained(t.rejected, t, self.labelled[k][0])
                                                     for k, t in zip(part, partial, strict=True)])
        return {k: boxes.to(self.labelled[k][1].device) for k, boxes in zip(part, found, strict=True)}

    # ------------------------------------------------------------------ draws
    def coin(self) -> bool:
        """A fair coin from the generator every rank draws alike."""
        return bool(torch.rand((), generator=self.gen) < 0.5)

    def _this_rank(self, draws: list, batch: int) -> list:
        lo = self.world.rank * batch
        return draws[lo : lo + batch]

    def own_share(self, cycle: Cycler, batch: int) -> list[tuple[int, bool]]:
        """This rank's (index, flipped) share of the global batch: every rank draws the
        global batch's indices and flips alike (one process: the whole batch)."""
        idx = cycle.take(batch * self.world.size)
        return self._this_rank([(i, self.coin()) for i in idx], batch)

    def own_turns(self, batch: int) -> list[tuple[bool, bool]]:
        """This rank's (vertical flip, transpose) share of the global labelled batch, drawn
        alike on every rank after the flips; none unless the labelled view is dihedral, so
        that "flip" runs draw exactly what they always drew."""
        if self.cfg.labelled_view != "dihedral":
            return [(False, False)] * batch
        return self._this_rank([(self.coin(), self.coin()) for _ in range(batch * self.world.size)], batch)

    # ------------------------------------------------------------------ batches
    def labelled_batch(self) -> tuple[list[Tensor], list[dict[str, Tensor]]]:
        """The weak views of the next labelled tiles and their targets; a partly annotated
        tile's target carries the partial rule's mark (``train/partial.py``)."""
        images, targets = [], []
        share = self.own_share(self.lab_cycle, self.cfg.labelled_batch)
        turns = self.own_turns(self.cfg.labelled_batch)
        for (i, flip), (vertical, transpose) in zip(share, turns, strict=True):
            im, boxes, labels = self.labelled[i]
            if i in self.cells:  # the unboxed cells ride along through the flips and turns
                cells = self.cells[i]
                boxes = torch.cat([boxes, cells])
                labels = torch.cat([labels, torch.full((len(cells),), self.any_cell, dtype=labels.dtype)])
            im = im.float().div(255)
            if flip:
                im, boxes = hflip(im, boxes)
            im, boxes = turn(im, boxes, vertical, transpose)
            images.append(im.to(self.device))
            target = {"boxes": boxes.to(self.device), "labels": labels.to(self.device)}
            if i >= self.n_full and self.cfg.partial_stain_ignore:
                mark_partial(target, im)
            targets.append(target)
        return images, targets

    def unlabelled_share(self) -> list[tuple[int, bool]]:
        """This rank's (index, flipped) share of the next unlabelled batch."""
        return self.own_share(self.unl_cycle, self.cfg.unlabelled_batch)

    def weak_view(self, i: int, flip: bool) -> Tensor:
        im = self.unlabelled[i].float().div(255)
        return im.flip(-1) if flip else im

    def known_view(self, i: int, flip: bool, view: Tensor) -> tuple[Tensor, Tensor] | None:
        """The user's boxes and labels of unlabelled-list tile ``i`` in the frame of its weak
        view, when it is a partly annotated tile; else None."""
        if i not in self.known:
            return None
        boxes, labels = self.known[i]
        if flip:
            boxes = flip_boxes(boxes, view.shape[-1], view.shape[-2], True, False)
        return boxes, labels

    # ------------------------------------------------------------------ state
    def rng_state(self) -> dict[str, Any]:
        return {
            "generator": self.gen.get_state(),
            "torch": torch.get_rng_state(),
            "labelled_order": list(self.lab_cycle.order),
            "labelled_pos": self.lab_cycle.pos,
            "unlabelled_order": list(self.unl_cycle.order),
            "unlabelled_pos": self.unl_cycle.pos,
        }

    def set_rng_state(self, rng: dict[str, Any], where: str) -> None:
        """Continue a saved run's draws; refused when it drew from another number of tiles."""
        if len(rng["labelled_order"]) not in (0, self.lab_cycle.n):
            raise TrainingError(
                f"{where}: the run was trained on {len(rng['labelled_order'])} labelled tiles, "
                f"and {self.lab_cycle.n} are given now; resume with the same tiles (or start a "
                "new run with --init-from)"
            )
        self.gen.set_state(rng["generator"])
        torch.set_rng_state(rng["torch"])
        self.lab_cycle.order, self.lab_cycle.pos = list(rng["labelled_order"]), rng["labelled_pos"]
        if len(self.unlabelled) == len(rng["unlabelled_order"]) or not rng["unlabelled_order"]:
            self.unl_cycle.order, self.unl_cycle.pos = list(rng["unlabelled_order"]), rng["unlabelled_pos"]
