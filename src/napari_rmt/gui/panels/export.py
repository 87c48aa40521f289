"""Exports (COCO, GeoJSON, predictions), GeoJSON import, and saving / loading the model."""

from __future__ import annotations

from pathlib import Path

from qtpy.QtWidgets import QFileDialog, QGridLayout, QGroupBox, QPushButton

from ...data.coco import write_coco
from ...data.errors import NapariRmtError
from ...data.geojson import write_geojson_per_image
from ...data.results import write_coco_results
from ..state import AppState
from .common import ask_save


class ExportPanel(QGroupBox):
    def __init__(self, state: AppState, parent=None) -> None:
        super().__init__("Export and model", parent)
        self.state = state
        el = QGridLayout(self)  # two rows of three: one row of six was wider than the dock
        for k, (text, slot) in enumerate(
            (
                ("Export COCO…", self._ask_export_coco),
                ("Export GeoJSON…", self._ask_export_geojson),
                ("Export predictions…", self._ask_export_predictions),
                ("Import GeoJSON…", self._ask_import_geojson),
                ("Save model…", self._ask_save_model),
                ("Load model…", self._ask_load_model),
            )
        ):
            b = QPushButton(text)
            b.clicked.connect(slot)
            el.addWidget(b, k // 3, k % 3)

    def export_annotations(self, path: str | Path) -> Path:
        self.state.session.pull()
        return write_coco(self.state.project.tileset, path)

    def export_geojson(self, folder: str | Path, predictions: bool = False) -> list[Path]:
        """One GeoJSON per image into ``folder``, as QuPath imports them (its image's pixel
        coordinates; the windows of a large image share one, in whole-image coordinates)."""
        self.state.session.pull()
        return write_geojson_per_image(self.state.project.tileset, folder, predictions=predictions)

    def export_predictions(self, path: str | Path) -> Path:
        self.state.session.pull()
        return write_coco_results(self.state.project.tileset, path)

    def import_geojson(self, path: str | Path) -> int:
        """Add QuPath's GeoJSON objects to the tiles they lie on (annotations stay
        annotations, detections become predictions); returns how many boxes came in."""
        from ...data.geojson import read_geojson

        state = self.state
        state.session.pull()
        ts = state.project.tileset
        before = sum(len(t.boxes) + len(t.predictions) for t in ts)
        names = list(ts.classes.names)
        read_geojson(path, ts)
        n = sum(len(t.boxes) + len(t.predictions) for t in ts) - before
        if ts.classes.names != names:
            # New classes: the layers' categorical features need them; the store already
            # holds everything, so the new session must not pull.
            state.rebuild_session(pull=False)
        else:
            state.session.refresh()
        state.rows_changed.emit(True)
        state.save_project()
        state.say(f"imported {n} boxes from {Path(path).name}")
        return n

    def save_model(self, path: str | Path) -> Path:
        if self.state.model_state is None:
            raise NapariRmtError("there is no trained model yet")
        from ...train.checkpoint import save_model

        # the predicting model (14 MB for the default), not the training state around it
        return save_model(path, self.state.model_state)

    def load_model(self, path: str | Path) -> None:
        from ...train.checkpoint import classes_from_checkpoint, read_checkpoint

        state = self.state
        ckpt = read_checkpoint(path)
        names = classes_from_checkpoint(ckpt).names
        if state.session is not None and names != state.project.tileset.classes.names:
            raise NapariRmtError(
                f"{path}: the model knows classes {names}, this project {state.project.tileset.classes.names}"
            )
        state.model_state = ckpt
        state.say(f"model loaded from {path}")

    # ------------------------------------------------------------------ dialogs
    def _ask_save(self, title: str, filt: str, fn) -> None:
        ask_save(self, self.state, title, filt, fn)

    def _ask_export_coco(self) -> None:
        self._ask_save("Export annotations", "COCO json (*.json)", self.export_annotations)

    def _ask_export_geojson(self) -> None:
        if self.state.session is None:
            return
        d = QFileDialog.getExistingDirectory(self, "Export GeoJSON (QuPath): a folder for one file per image")
        if d:
            self.state.guarded(lambda: self.state.say(
                f"wrote {len(self.export_geojson(d))} GeoJSON files (one per image) into {d}"))

    def _ask_export_predictions(self) -> None:
        self._ask_save("Export predictions", "COCO results (*.json)", self.export_predictions)

    def _ask_import_geojson(self) -> None:
        if self.state.session is None:
            return
        f, _ = QFileDialog.getOpenFileName(self, "Import GeoJSON (QuPath)", filter="GeoJSON (*.geojson *.json)")
        if f:
            self.state.guarded(lambda: self.import_geojson(f))

    def _ask_save_model(self) -> None:
        self._ask_save("Save model", "PyTorch (*.pt)", self.save_model)

    def _ask_load_model(self) -> None:
        f, _ = QFileDialog.getOpenFileName(self, "Load model", filter="PyTorch (*.pt)")
        if f:
            self.state.guarded(lambda: self.load_model(f))
