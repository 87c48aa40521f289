"""The dock widget: the panels, assembled over one shared state, in three tabs.

Each panel (``gui/panels/``) owns its controls and acts through ``AppState``
(``gui/state.py``), which tells the others by its signals. This class only lays them
out and lends scripts and tests one object to drive: actions that would ask for a file
take a path argument too, so they run the same code the buttons do.
"""

from __future__ import annotations

from pathlib import Path

from ._guard import guard_triton

guard_triton()  # before anything imports torch in this process

import napari  # noqa: E402
from qtpy.QtCore import Qt  # noqa: E402
from qtpy.QtWidgets import QScrollArea, QTabWidget, QVBoxLayout, QWidget  # noqa: E402

from .panels.export import ExportPanel  # noqa: E402
from .panels.large import LargePanel  # noqa: E402
from .panels.review import ReviewPanel  # noqa: E402
from .panels.status import StatusPanel  # noqa: E402
from .panels.tiles import ClassesPanel, TilesPanel  # noqa: E402
from .panels.train import TrainPanel  # noqa: E402
from .state import AppState  # noqa: E402

DEFAULT_PROJECTS = Path.home() / ".napari-rmt" / "projects"


def _column(*panels: QWidget) -> QScrollArea:
    """Panels one under the other, in a scroll area (a short screen scrolls instead of
    squeezing them below their minimum; seen in the screenshots: the loss plot cut in half)."""
    scroll = QScrollArea()
    scroll.setWidgetResizable(True)
    scroll.setFrameShape(QScrollArea.Shape.NoFrame)
    scroll.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
    body = QWidget()
    layout = QVBoxLayout(body)
    for panel in panels:
        layout.addWidget(panel)
    layout.addStretch(1)
    scroll.setWidget(body)
    # The scroll area's width does not follow its content: ask for the content's own width
    # (plus the scroll bar), or rows get clipped on the right (seen in the screenshots).
    scroll.setMinimumWidth(body.sizeHint().width() + scroll.verticalScrollBar().sizeHint().width() + 8)
    return scroll


def _warm_imports() -> None:
    """Import torch's training stack now, on opening the widget, not in the training thread.

    The first ``torch.optim`` constructor imports ``torch._dynamo`` and friends, and the
    first detector build sets up convolution kernels; done in the worker, they held the
    interpreter for 0.3-0.4 s and froze the viewer.
    """
    import torch

    from ..model.detector import ModelConfig, build_detector

    torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    build_detector(1, ModelConfig(backbone="mobilenet_v3_large"))


class RMTWidget(QWidget):
    def __init__(self, viewer: napari.viewer.Viewer, parent=None) -> None:
        super().__init__(parent)
        self.viewer = viewer
        self.state = AppState(viewer, DEFAULT_PROJECTS, self)
        self.tiles = TilesPanel(self.state)
        self.large = LargePanel(self.state)
        self.classes = ClassesPanel(self.state)
        self.training = TrainPanel(self.state)
        self.review = ReviewPanel(self.state, lambda: self.classes.current)
        self.export = ExportPanel(self.state)
        self.status_panel = StatusPanel(self.state)
        # Tabs: Train, Review and Export are one click away at any window height (in one
        # long column they sat below the fold at 1000 px). The class of new boxes and the
        # status line stay visible under every tab.
        self.tabs = QTabWidget()
        for title, panels in (
            ("Tiles", (self.tiles, self.large)),
            ("Train", (self.training,)),
            ("Review", (self.review, self.export)),
        ):
            self.tabs.addTab(_column(*panels), title)
        outer = QVBoxLayout(self)
        outer.setContentsMargins(0, 0, 0, 0)
        outer.addWidget(self.classes)
        outer.addWidget(self.tabs, 1)
        outer.addWidget(self.status_panel)
        # A finished run's predictions are what the user wants to see next.
        self.state.predictions_arrived.connect(lambda _: self.tabs.setCurrentIndex(2))
        _warm_imports()

    # ------------------------------------------------------------------ the shared state
    @property
    def project(self):
        return self.state.project

    @property
    def session(self):
        return self.state.session

    @property
    def model_state(self) -> dict | None:
        return self.state.model_state

    @model_state.setter
    def model_state(self, value: dict | None) -> None:
        self.state.model_state = value

    @property
    def whole(self):
        return self.state.whole

    @property
    def worker(self):
        return self.state.worker

    @property
    def last_error(self) -> str | None:
        return self.state.last_error

    # ------------------------------------------------------------------ controls scripts read
    @property
    def tile_list(self):
        return self.tiles.tile_list

    @property
    def labelled_box(self):
        return self.tiles.labelled_box

    @property
    def score_slider(self):
        return self.review.score_slider

    @property
    def score_label(self):
        return self.review.score_label

    @property
    def status(self):
        return self.status_panel.status

    @property
    def progress(self):
        return self.status_panel.progress

    @property
    def train_btn(self):
        return self.training.train_btn

    @property
    def cancel_btn(self):
        return self.training.cancel_btn

    # ------------------------------------------------------------------ actions (the buttons' code)
    def set_tileset(self, tileset, name: str, folder: Path | None = None) -> None:
        self.state.open(tileset, name, folder)

    def open_sample(self) -> None:
        self.tiles.open_sample()

    def open_folder(self, folder: str | Path) -> None:
        self.tiles.open_folder(folder)

    def open_coco(self, path: str | Path, allow_outside: bool = False) -> None:
        self.tiles.open_coco(path, allow_outside)

    def open_project(self, folder: str | Path) -> None:
        self.tiles.open_project(folder)

    def open_image_layer(self) -> None:
        self.tiles.open_image_layer()

    def open_large_image(self, path: str | Path, tile: int | None = None, overlap: int | None = None) -> None:
        self.large.open_large_image(path, tile, overlap)

    def go(self, step: int) -> None:
        self.tiles.go(step)

    def show_tile(self, index: int) -> None:
        self.tiles.show_tile(index)

    def suggest_next(self) -> None:
        self.tiles.suggest_next()

    def set_class(self, name: str) -> None:
        self.classes.set_class(name)

    def add_class(self, name: str) -> None:
        self.classes.add_class(name)

    def _class_key(self, index: int):
        return self.classes.class_key(index)

    def training_config(self):
        return self.training.training_config()

    def train(self, config=None, synchronous: bool = False) -> None:
        self.training.train(config, synchronous)

    def cancel(self) -> None:
        self.training.cancel()

    def accept_tile(self) -> int:
        return self.review.accept_tile()

    def accept_selected(self) -> int:
        return self.review.accept_selected()

    def detect_nuclei(self, all_empty: bool = False, synchronous: bool = False) -> None:
        self.review.detect_nuclei(all_empty, synchronous)

    def predict_whole_image(self, synchronous: bool = False, window: int = 512, context: int = 128) -> None:
        self.large.predict_whole_image(synchronous, window, context)

    def export_whole_predictions(self, path: str | Path) -> Path:
        return self.large.export_whole_predictions(path)

    def export_annotations(self, path: str | Path) -> Path:
        return self.export.export_annotations(path)

    def export_geojson(self, folder: str | Path, predictions: bool = False) -> list[Path]:
        return self.export.export_geojson(folder, predictions)

    def export_predictions(self, path: str | Path) -> Path:
        return self.export.export_predictions(path)

    def import_geojson(self, path: str | Path) -> int:
        return self.export.import_geojson(path)

    def save_model(self, path: str | Path) -> Path:
        return self.export.save_model(path)

    def load_model(self, path: str | Path) -> None:
        self.export.load_model(path)

    def save_project(self) -> None:
        self.state.save_project()
