"""Where the bundled CoNSeP sample lives, installed or in a source checkout."""

from __future__ import annotations

from pathlib import Path

from .errors import ImageReadError


def sample_dir() -> Path:
    """The sample folder: inside the installed package, else at the repository's top."""
    here = Path(__file__).resolve()
    for candidate in (here.parents[1] / "sample_data", here.parents[3] / "sample_data"):
        if (candidate / "annotations.json").is_file():
            return candidate
    raise ImageReadError(
        "the bundled sample (sample_data/annotations.json) is missing from this installation"
    )


def sample_annotations() -> Path:
    return sample_dir() / "annotations.json"


def load_sample():
    """The sample as a ``TileSet`` (all 16 tiles labelled, with their real boxes)."""
    from .coco import read_coco

    return read_coco(sample_annotations())
