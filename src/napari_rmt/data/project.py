"""A project folder: the tile set, its boxes and statuses, predictions and the model.

The folder is the user's safety net: the GUI autosaves into it as they work, so a crash
or a closed window loses nothing, and opening the folder again restores everything.

    project/
      annotations.json   COCO of every tile (status in napari_rmt_status), manual boxes
      predictions.json   COCO results of the latest predictions (with scores)
      model.pt           the latest trained model (written by the trainer)
"""

from __future__ import annotations

import os
from pathlib import Path

from .coco import read_coco, read_coco_results, write_coco, write_coco_results
from .errors import NapariRmtError
from .tiles import TileSet

ANNOTATIONS = "annotations.json"
PREDICTIONS = "predictions.json"
MODEL = "model.pt"


class Project:
    """A tile set bound to a folder it saves into."""

    def __init__(self, tileset: TileSet, folder: str | os.PathLike | None = None) -> None:
        self.tileset = tileset
        self.folder = Path(folder) if folder is not None else None

    @property
    def model_path(self) -> Path | None:
        if self.folder is None:
            return None
        p = self.folder / MODEL
        return p if p.is_file() else None

    def save(self) -> Path:
        """Write annotations and predictions atomically; the previous files stay until replaced."""
        if self.folder is None:
            raise NapariRmtError("this project has no folder to save into; choose one first")
        self.folder.mkdir(parents=True, exist_ok=True)
        write_coco(self.tileset, self.folder / ANNOTATIONS)
        write_coco_results(self.tileset, self.folder / PREDICTIONS)
        return self.folder

    @classmethod
    def open(cls, folder: str | os.PathLike) -> Project:
        folder = Path(folder)
        ann = folder / ANNOTATIONS
        if not ann.is_file():
            raise NapariRmtError(f"{folder}: not a napari-rmt project (no {ANNOTATIONS})")
        tileset = read_coco(ann)
        pred = folder / PREDICTIONS
        if pred.is_file():
            read_coco_results(pred, tileset)
        return cls(tileset, folder)

    @staticmethod
    def is_project(folder: str | os.PathLike) -> bool:
        return (Path(folder) / ANNOTATIONS).is_file()
