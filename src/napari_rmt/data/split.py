"""Splitting tiles the way the paper's experiments do, without leaking between splits.

Patches cut from one slide region look alike, so splits are made by a group key
(CoNSeP's ``source_tile``) whenever the data has one: every tile of a group lands in
the same split. Without a key each tile is its own group.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .errors import NapariRmtError
from .tiles import Tile


def group_of(tile: Tile, key: str | None) -> str:
    if key is None:
        return f"tile:{tile.id}"
    if key not in tile.meta:
        raise NapariRmtError(f"tile {tile.name!r} (id {tile.id}) has no {key!r} field to group by")
    return str(tile.meta[key])


def _groups(tiles: Sequence[Tile], key: str | None, seed: int) -> list[list[Tile]]:
    by: dict[str, list[Tile]] = {}
    for t in tiles:
        by.setdefault(group_of(t, key), []).append(t)
    names = sorted(by)
    order = np.random.default_rng(seed).permutation(len(names))
    return [by[names[i]] for i in order]


def split_by_group(
    tiles: Sequence[Tile],
    key: str | None,
    ratios: tuple[float, float, float] = (0.7, 0.1, 0.2),
    seed: int = 0,
) -> tuple[list[Tile], list[Tile], list[Tile]]:
    """Train / val / test by group, shuffled with ``seed``; sizes by the number of groups."""
    if len(ratios) != 3 or any(r < 0 for r in ratios) or sum(ratios) <= 0:
        raise NapariRmtError(f"split ratios {ratios} must be three non-negative numbers")
    groups = _groups(tiles, key, seed)
    n = len(groups)
    total = sum(ratios)
    n_val = round(n * ratios[1] / total)
    n_test = round(n * ratios[2] / total)
    if ratios[1] > 0 and n >= 3:
        n_val = max(1, n_val)
    if ratios[2] > 0 and n >= 3:
        n_test = max(1, n_test)
    n_train = n - n_val - n_test
    if n_train < 1:
        raise NapariRmtError(f"only {n} group(s): too few to split {ratios} into train/val/test")
    flat = [
        [t for g in part for t in g]
        for part in (groups[:n_train], groups[n_train : n_train + n_val], groups[n_train + n_val :])
    ]
    return flat[0], flat[1], flat[2]


def pick_labelled(
    tiles: Sequence[Tile], fraction: float, key: str | None = None, seed: int = 0
) -> tuple[list[Tile], list[Tile]]:
    """Labelled and unlabelled parts: whole groups, until ``fraction`` of the tiles is reached.

    At least one group is labelled, so that 2 % of a small set is not zero tiles.
    """
    if not 0.0 < fraction <= 1.0:
        raise NapariRmtError(f"labelled fraction {fraction} must be in (0, 1]")
    groups = _groups(tiles, key, seed + 1000)  # not the same shuffle as the split's
    target = fraction * len(tiles)
    labelled: list[Tile] = []
    for g in groups:
        if labelled and len(labelled) + len(g) / 2 > target:
            break
        labelled.extend(g)
    chosen = {t.id for t in labelled}
    return labelled, [t for t in tiles if t.id not in chosen]
