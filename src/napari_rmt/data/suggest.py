"""Which unlabelled tile to annotate next: the one the model is least sure about.

A tile's uncertainty is the sum, over its predicted boxes, of the binary entropy of
the box's score, in bits. A box at 0.5 adds 1, a box at 0.05 or 0.95 adds about 0.3:
tiles full of cells the model hesitates on rank first, while empty tiles and tiles
the model already gets with confidence rank last. This is the classic uncertainty
sampling of active learning, computed from what the teacher already output.
"""

from __future__ import annotations

import numpy as np

from .tiles import Tile


def tile_uncertainty(tile: Tile) -> float:
    s = np.clip(np.nan_to_num(tile.predictions.scores, nan=1.0), 1e-6, 1 - 1e-6)
    return float(-(s * np.log2(s) + (1 - s) * np.log2(1 - s)).sum())


def rank_unlabelled(tiles: list[Tile]) -> list[tuple[Tile, float]]:
    """Unlabelled tiles, most uncertain first (ties keep the tile order)."""
    scored = [(t, tile_uncertainty(t)) for t in tiles if not t.is_labelled]
    return sorted(scored, key=lambda ts: -ts[1])
