"""npe2 sample data: the bundled CoNSeP patches with their boxes."""

from __future__ import annotations

from ..data.sample import load_sample
from .layers import LayerData, tileset_to_layers


def make_sample_data() -> list[LayerData]:
    return tileset_to_layers(load_sample(), name="CoNSeP sample")
