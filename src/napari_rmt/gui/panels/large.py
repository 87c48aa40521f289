"""A large image: cut into a grid of tiles to annotate, predicted whole, exported whole."""

from __future__ import annotations

from pathlib import Path

from napari.utils.notifications import show_info
from qtpy.QtCore import QTimer
from qtpy.QtWidgets import QFileDialog, QGroupBox, QHBoxLayout, QLabel, QPushButton, QVBoxLayout

from ...data.errors import NapariRmtError
from ...data.tiles import TileSet
from ..layers import camera_of
from ..state import AppState
from .common import ask_save, spin


class LargePanel(QGroupBox):
    def __init__(self, state: AppState, parent=None) -> None:
        super().__init__("Large image", parent)
        self.state = state
        lg = QVBoxLayout(self)
        row = QHBoxLayout()
        b = QPushButton("Open large image…")
        b.setToolTip("A slide (SVS, NDPI, SCN, BIF, pyramidal TIFF, OME-TIFF), TIFF, PNG, zarr or OME-Zarr; cut "
                     "into a grid of tiles to annotate (a slide's on tissue only)")
        b.clicked.connect(self._ask_large)
        row.addWidget(b, 2)
        row.addWidget(QLabel("tile"))
        self.grid_tile_spin = spin(32, 8192, 256)
        row.addWidget(self.grid_tile_spin)
        row.addWidget(QLabel("overlap"))
        self.grid_overlap_spin = spin(0, 4096, 0)
        row.addWidget(self.grid_overlap_spin)
        lg.addLayout(row)
        row = QHBoxLayout()
        self.predict_whole_btn = QPushButton("Predict whole image")
        self.predict_whole_btn.setToolTip("Detect cells over the whole image in windows, stitched at their borders")
        self.predict_whole_btn.clicked.connect(lambda: self.predict_whole_image())
        self.export_whole_btn = QPushButton("Export whole-image…")
        self.export_whole_btn.clicked.connect(self._ask_export_whole)
        row.addWidget(self.predict_whole_btn)
        row.addWidget(self.export_whole_btn)
        lg.addLayout(row)
        # Boxes in view are redrawn once the camera rests, not on every pan step.
        self._camera_timer = QTimer(self)
        self._camera_timer.setSingleShot(True)
        self._camera_timer.setInterval(150)
        self._camera_timer.timeout.connect(self._update_in_view)
        camera_of(state.viewer).events.connect(self._on_camera)
        state.busy_changed.connect(self._update_enabled)
        self._update_enabled()

    def open_large_image(self, path: str | Path, tile: int | None = None, overlap: int | None = None) -> None:
        """Cut a large image into a grid of tiles (all unlabelled) and show it whole; a
        slide's tiles are those on tissue (its mask is shown over it), and the pixel size
        its file states becomes the project's."""
        from ...data.large import cached_large_image
        from ...data.tiles import grid_tiles
        from ...data.tissue import cached_tissue_mask, is_slide

        path = Path(path)
        image = cached_large_image(str(path))
        tissue = cached_tissue_mask(str(path)) if is_slide(image) else None
        tiles = grid_tiles(
            image,
            tile=tile or self.grid_tile_spin.value(),
            overlap=self.grid_overlap_spin.value() if overlap is None else overlap,
            keep=tissue.has_tissue if tissue is not None else None,
        )
        settings = {"pixel_size": image.pixel_size} if image.pixel_size else {}
        self.state.open(TileSet(tiles), path.stem, settings=settings)
        where = f" on tissue ({100 * tissue.fraction:.0f} % of the slide)" if tissue is not None else ""
        size = f"; {image.pixel_size:g} µm/px from the file" if image.pixel_size else ""
        if image.objective:
            size += f" ({image.objective:g}x objective)"
        show_info(f"{path.name}: {len(tiles)} tiles{where}{size}; annotate a few cells")

    def predict_whole_image(self, synchronous: bool = False, window: int = 512, context: int = 128) -> None:
        """Detect cells over the whole large image with the current model, in a thread."""
        state = self.state
        if state.whole is None:
            state.report_error(NapariRmtError("open a large image first (Large image… )"))
            return
        if state.model_state is None:
            state.report_error(NapariRmtError("there is no model yet: train one or load one"))
            return
        from ..jobs import WholeImageJob

        if state.refuse_if_busy():
            return
        image = state.whole.image
        state.say(f"predicting {image.name} ({image.width} x {image.height})…")
        job = WholeImageJob(state.model_state, image, window=window, context=context,
                            pixel_size=state.project.settings.get("pixel_size") if state.project else None,
                            tissue=state.whole.tissue)
        state.start_job(job, self._on_progress, self._on_returned, "whole-image prediction failed", synchronous)

    def _on_progress(self, msg) -> None:
        self.state.progress.emit(msg.done, msg.total, "whole image: windows")
        self.state.say(f"predicting whole image: window {msg.done}/{msg.total}")

    def _on_returned(self, boxes) -> None:
        state = self.state
        if boxes is None:
            state.say("whole-image prediction cancelled")
            return
        n = state.whole.show_predictions(boxes, score_threshold=state.session.score_threshold)
        state.say(f"whole image: {len(boxes)} cells found, {n} shown at score > {state.session.score_threshold:.2f}")

    def export_whole_predictions(self, path: str | Path) -> Path:
        """Whole-image boxes as COCO results (.json), a zarr box store (.zarr) or GeoJSON."""
        whole = self.state.whole
        if whole is None or not len(whole.boxes):
            raise NapariRmtError("there are no whole-image predictions yet (Predict whole image)")
        from ...data.boxstore import write_whole_image_boxes

        image = whole.image
        return write_whole_image_boxes(
            path, whole.boxes, self.state.project.tileset.classes, image.name, image.size, image.path
        )

    def _on_camera(self, event=None) -> None:
        if self.state.whole is not None and len(self.state.whole.boxes):
            self._camera_timer.start()

    def _update_in_view(self) -> None:
        if self.state.whole is not None:
            self.state.whole.update_in_view()

    def _ask_large(self) -> None:
        f, _ = QFileDialog.getOpenFileName(
            self, "Large image", filter="Images and slides (*.tif *.tiff *.svs *.ndpi *.scn *.bif *.mrxs *.vms *.vmu *.png *.jpg *.jpeg);;"
            "All files (*)"
        )
        if not f:
            f = QFileDialog.getExistingDirectory(self, "…or a zarr / OME-Zarr folder")
        if f:
            self.state.guarded(lambda: self.open_large_image(f))

    def _ask_export_whole(self) -> None:
        ask_save(
            self, self.state, "Export whole-image predictions",
            "COCO results (*.json);;zarr box store (*.zarr);;GeoJSON (*.geojson)", self.export_whole_predictions,
        )

    def _update_enabled(self) -> None:
        has_whole = self.state.whole is not None
        self.predict_whole_btn.setEnabled(has_whole and not self.state.busy)
        self.export_whole_btn.setEnabled(has_whole)
