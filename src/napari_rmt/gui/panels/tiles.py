"""Opening tiles, moving between them, marking them annotated, and the class of new boxes."""

from __future__ import annotations

from pathlib import Path

import napari
import numpy as np
from napari.utils.notifications import show_info
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QFileDialog,
    QGridLayout,
    QGroupBox,
    QHBoxLayout,
    QInputDialog,
    QLabel,
    QListWidget,
    QMessageBox,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from ...data.coco import read_coco
from ...data.errors import NapariRmtError
from ...data.project import TRAINING, Project
from ...data.sample import load_sample
from ...data.tiles import FEW_BOXES, Tile, TileSet, TileStatus
from ..session import status_word
from ..state import AppState


class TilesPanel(QGroupBox):
    """Open a folder, a COCO file, a project, an image layer or the sample; the tile list."""

    def __init__(self, state: AppState, parent=None) -> None:
        super().__init__("Tiles", parent)
        self.state = state
        tl = QVBoxLayout(self)
        row = QGridLayout()
        for k, (text, slot) in enumerate(
            (
                ("Open folder…", self._ask_folder),
                ("Open COCO…", self._ask_coco),
                ("Open project…", self._ask_project),
                ("Image layer", self.open_image_layer),
                ("Sample", self.open_sample),
            )
        ):
            b = QPushButton(text)
            b.clicked.connect(slot)
            row.addWidget(b, k // 3, k % 3)
        tl.addLayout(row)
        self.project_label = QLabel("no project")
        self.project_label.setWordWrap(True)
        tl.addWidget(self.project_label)
        self.tile_list = QListWidget()
        self.tile_list.setMinimumHeight(120)
        self.tile_list.currentRowChanged.connect(self._on_row)
        tl.addWidget(self.tile_list)
        row = QHBoxLayout()
        self.prev_btn = QPushButton("◀ Previous")
        self.prev_btn.clicked.connect(lambda: self.go(-1))
        self.next_btn = QPushButton("Next ▶")
        self.next_btn.clicked.connect(lambda: self.go(1))
        self.suggest_btn = QPushButton("Suggest next")
        self.suggest_btn.setToolTip("Go to the unlabelled tile the model is least sure about")
        self.suggest_btn.clicked.connect(self.suggest_next)
        for b in (self.prev_btn, self.next_btn, self.suggest_btn):
            row.addWidget(b)
        tl.addLayout(row)
        self.labelled_box = QCheckBox("This tile is fully annotated (use it as labelled data)")
        self.labelled_box.toggled.connect(self._on_labelled)
        tl.addWidget(self.labelled_box)
        state.opened.connect(self._on_opened)
        state.moved.connect(self._on_moved)
        state.rows_changed.connect(self._refresh_rows)
        state.busy_changed.connect(self._update_enabled)
        self._update_enabled()

    # ------------------------------------------------------------------ opening
    def open_sample(self) -> None:
        self.state.guarded(self._open_sample)

    def _open_sample(self) -> None:
        """The bundled sample, in one project folder: opening it again reopens that project
        (with what the user did in it) instead of making a new folder every time."""
        from ...data.boxes import Boxes

        folder = self.state.projects_root / "consep-sample"
        if Project.is_project(folder):
            self.open_project(folder)
            return
        ts = load_sample()
        # The workflow starts from a few annotated tiles: keep two per slide region,
        # and make the other eight unlabelled tiles with no boxes.
        kept: dict[str, int] = {}
        for t in ts:
            region = str(t.meta.get("source_tile"))
            kept[region] = kept.get(region, 0) + 1
            if kept[region] > 2:
                t.boxes = Boxes()
                t.status = TileStatus.UNLABELLED
        self.state.open(ts, "consep-sample", folder=folder)

    def open_folder(self, folder: str | Path) -> None:
        folder = Path(folder)
        if Project.is_project(folder):
            self.open_project(folder)
            return
        self.state.open(TileSet.from_folder(folder), folder.name)

    def open_coco(self, path: str | Path, allow_outside: bool = False) -> None:
        path = Path(path)
        self.state.open(read_coco(path, allow_outside=allow_outside), path.parent.name)

    def open_project(self, folder: str | Path) -> None:
        from ...train.checkpoint import read_checkpoint

        state = self.state
        project = Project.open(folder)
        state.open(project.tileset, Path(folder).name, folder=Path(folder), settings=project.settings)
        if project.problems:
            show_info("opened with problems: " + "; ".join(project.problems))
        interrupted = Path(folder) / TRAINING
        if project.model_path is not None:
            state.model_state = read_checkpoint(project.model_path)
            state.say(f"model loaded from {project.model_path}")
            if interrupted.is_file():
                state.say(
                    f"model loaded from {project.model_path}; an interrupted run's last checkpoint "
                    f"is in {interrupted} (Load model… to use it)"
                )
        elif interrupted.is_file():
            # napari was closed or killed while training: its last checkpoint is the model.
            state.model_state = read_checkpoint(interrupted)
            state.say(
                f"restored the model of an interrupted training run (step "
                f"{state.model_state.get('iteration', '?')}) from {interrupted}"
            )

    def open_image_layer(self) -> None:
        self.state.guarded(self._open_image_layer)

    def _open_image_layer(self) -> None:
        viewer = self.state.viewer

        def usable(lay) -> bool:
            return isinstance(lay, napari.layers.Image) and lay.name != "tile"

        layer = next((lay for lay in viewer.layers.selection if usable(lay)), None)
        layer = layer or next((lay for lay in viewer.layers if usable(lay)), None)
        if layer is None:
            raise NapariRmtError("select an image layer first")
        data = np.asarray(layer.data)
        planes = [data] if (data.ndim == 2 or (data.ndim == 3 and layer.rgb)) else list(data)
        tileset = self._boxes_beside(layer, planes)
        if tileset is None:
            tiles = [
                Tile(id=i + 1, name=f"{layer.name} [{i}]", width=p.shape[1], height=p.shape[0], loader=(lambda a=p: a))
                for i, p in enumerate(planes)
            ]
            tileset = TileSet(tiles)
        self.state.open(tileset, layer.name)

    def _boxes_beside(self, image_layer, planes: list) -> TileSet | None:
        """The tiles, boxes and statuses of the plugin's Shapes layers that came with this
        image (a sample, a reader's COCO or folder): the boxes layer whose tile records fit
        the image's planes, its predictions layer too. Those layers are hidden: the widget's
        own layers show the same boxes. None when there is no such layer."""
        from ..layers import META_KEY, tileset_from_shapes

        def fits(lay) -> bool:
            recs = (lay.metadata or {}).get(META_KEY) if isinstance(lay, napari.layers.Shapes) else None
            return bool(recs) and len(recs["tiles"]) == len(planes) and all(
                (r["height"], r["width"]) == p.shape[:2] for r, p in zip(recs["tiles"], planes, strict=True)
            )

        def as_tiles(lay) -> TileSet:
            return tileset_from_shapes(lay.data, {"features": lay.features, "metadata": lay.metadata,
                                                  "scale": lay.scale, "translate": lay.translate, "name": lay.name})

        shapes = [lay for lay in self.state.viewer.layers if fits(lay)]
        boxes = next((lay for lay in shapes if not lay.name.endswith("predictions")), None)
        if boxes is None:
            return None
        tileset = as_tiles(boxes)
        preds = next((lay for lay in shapes if lay.name.endswith("predictions")), None)
        if preds is not None:
            for t, p in zip(tileset, as_tiles(preds), strict=True):
                t.predictions = p.boxes
        for t, pixels in zip(tileset, planes, strict=True):
            if t.path is None or not Path(t.path).exists():
                t.path, t.window, t.loader = None, False, (lambda a=pixels: a)
        for lay in (image_layer, *shapes):
            lay.visible = False
        return tileset

    def _ask_folder(self) -> None:
        d = QFileDialog.getExistingDirectory(self, "Folder of tiles")
        if d:
            self.state.guarded(lambda: self.open_folder(d))

    def _ask_project(self) -> None:
        d = QFileDialog.getExistingDirectory(self, "napari-rmt project folder")
        if d:
            self.state.guarded(lambda: self.open_project(d))

    def _ask_coco(self) -> None:
        f, _ = QFileDialog.getOpenFileName(self, "COCO annotations", filter="COCO json (*.json)")
        if f:
            self.state.guarded(lambda: self._open_coco_asking(f))

    def _open_coco_asking(self, path: str) -> None:
        """Open a COCO file; if it names images outside its folder, ask before reading them."""
        try:
            self.open_coco(path)
        except NapariRmtError as exc:
            if "lies outside the dataset folder" not in str(exc):
                raise
            answer = QMessageBox.question(
                self,
                "Images outside the dataset folder",
                f"{exc}\n\nRead images from outside {Path(path).parent} for this file?",
            )
            if answer == QMessageBox.StandardButton.Yes:
                self.open_coco(path, allow_outside=True)

    # ------------------------------------------------------------------ navigation
    def go(self, step: int) -> None:
        if self.state.session is None:
            return
        self.state.session.next_tile(step)
        self.state.moved.emit()

    def show_tile(self, index: int) -> None:
        session = self.state.session
        if session is None:
            return
        session.show_tile(index)
        self.state.moved.emit()
        if session.image_error:
            self.state.report_error(NapariRmtError(session.image_error), prefix="image not shown")

    def suggest_next(self) -> None:
        if self.state.session is None:
            return
        if self.state.session.suggest_next() is None:
            show_info("every tile is labelled")
        else:
            self.state.say(self.state.session.suggestion)
        self.state.moved.emit()

    def _on_opened(self) -> None:
        self.project_label.setText(f"project: {self.state.project.folder}")
        self.tile_list.blockSignals(True)
        self.tile_list.clear()
        for t in self.state.project.tileset:
            self.tile_list.addItem(row_text(t))
        self.tile_list.setCurrentRow(self.state.session.index)
        self.tile_list.blockSignals(False)
        self._sync_labelled()

    def _on_moved(self) -> None:
        self.tile_list.blockSignals(True)
        self.tile_list.setCurrentRow(self.state.session.index)
        self.tile_list.blockSignals(False)
        self._sync_labelled()
        self._refresh_rows(False)

    def _on_row(self, row: int) -> None:
        if self.state.session is not None and row >= 0 and row != self.state.session.index:
            self.show_tile(row)

    def _refresh_rows(self, all_rows: bool) -> None:
        if self.state.session is None:
            return
        tileset = self.state.project.tileset
        for i in range(len(tileset)) if all_rows else [self.state.session.index]:
            self.tile_list.item(i).setText(row_text(tileset[i]))
        self._sync_labelled()

    def _sync_labelled(self) -> None:
        self.labelled_box.blockSignals(True)
        self.labelled_box.setChecked(self.state.session.tile.is_labelled)
        self.labelled_box.blockSignals(False)

    def _on_labelled(self, checked: bool) -> None:
        session = self.state.session
        if session is not None:
            session.pull()
            session.set_labelled(checked)
            self._refresh_rows(False)
            self.state.refresh_grid()

    def _update_enabled(self) -> None:
        has = self.state.session is not None
        for w in (self.prev_btn, self.next_btn, self.suggest_btn, self.labelled_box):
            w.setEnabled(has)


class ClassesPanel(QWidget):
    """The class new boxes get (keys 1-9 pick it, and reclassify selected boxes), and a legend."""

    def __init__(self, state: AppState, parent=None) -> None:
        super().__init__(parent)
        self.state = state
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 8, 0, 0)  # room for the group's title at the dock's top
        box = QGroupBox("Class of new boxes (keys 1–9)")
        cl = QHBoxLayout(box)
        self.class_combo = QComboBox()
        self.class_combo.currentTextChanged.connect(self._on_class)
        cl.addWidget(self.class_combo, 1)
        add = QPushButton("Add…")
        add.clicked.connect(self._ask_class)
        cl.addWidget(add)
        layout.addWidget(box)
        # The colours of the classes, in words: what the boxes on the canvas mean.
        self.legend = QLabel("")
        self.legend.setWordWrap(True)
        self.legend.setToolTip("annotations: outlines; predictions: shaded, with thinner edges")
        layout.addWidget(self.legend)
        state.opened.connect(self._on_opened)
        state.session_rebuilt.connect(self._on_rebuilt)
        state.rows_changed.connect(lambda _all=True: self._show_legend())

    @property
    def current(self) -> str:
        return self.class_combo.currentText()

    def set_class(self, name: str) -> None:
        self.class_combo.setCurrentText(name)

    def class_key(self, index: int):
        """What key ``index + 1`` does: select that class (and reclassify the selection)."""

        def pick(layer=None):
            names = self.state.project.tileset.classes.names
            if index < len(names):
                self.set_class(names[index])

        return pick

    def add_class(self, name: str) -> None:
        if self.state.session is None:
            raise NapariRmtError("open tiles first")
        self.state.project.tileset.classes.add(name)
        self.state.rebuild_session()
        self.state.changed()

    def _on_opened(self) -> None:
        tileset = self.state.project.tileset
        self._fill(tileset.classes.names)
        # New boxes start with the class most boxes already have (not the first in the list,
        # which on CoNSeP is the rare "miscellaneous").
        counts = {c.id: sum(int((t.boxes.class_ids == c.id).sum()) for t in tileset) for c in tileset.classes}
        if counts and max(counts.values()) > 0:
            self.class_combo.setCurrentText(tileset.classes.by_id(max(counts, key=counts.get)).name)
        self._bind_keys()

    def _on_rebuilt(self) -> None:
        current = self.current
        self._fill(self.state.project.tileset.classes.names)
        self.class_combo.setCurrentText(current)
        self._on_class(current)
        self._bind_keys()

    def _fill(self, names: list[str]) -> None:
        self.class_combo.blockSignals(True)
        self.class_combo.clear()
        self.class_combo.addItems(names)
        self.class_combo.blockSignals(False)
        self._show_legend()

    def _show_legend(self) -> None:
        """Each class's colour and how many boxes of it the training learns from; a class
        under ``FEW_BOXES`` in orange, with the reason on hover."""
        if self.state.project is None:
            return
        tileset = self.state.project.tileset
        counts = tileset.annotated_counts()
        few = [name for name, n in counts.items() if n < FEW_BOXES]
        parts = []
        for c in tileset.classes:
            n = counts[c.name]
            label = f"{c.name} ({n})"
            if n < FEW_BOXES:
                label = f'<span style="color:#ffa500">{label}</span>'
            parts.append(f'<span style="color:{c.hex}">■</span>&nbsp;{label}')
        self.legend.setText(
            " ".join(parts)
            + "<br>□&nbsp;annotation (outline) &nbsp; ▣&nbsp;prediction (shaded); (n): boxes to learn from"
        )
        self.legend.setToolTip(
            "annotations: outlines; predictions: shaded, with thinner edges. The number after a class is "
            "how many of its boxes the training learns from (on fully or partly annotated tiles)"
            + (f"; under {FEW_BOXES} ({', '.join(few)}) a class is learnt poorly: box more of its cells" if few else "")
        )

    def _bind_keys(self) -> None:
        s = self.state.session
        for layer in (s.annotations, s.predictions, s.image):
            for k in range(1, 10):
                layer.bind_key(str(k), self.class_key(k - 1), overwrite=True)

    def _on_class(self, name: str) -> None:
        if self.state.session is not None and name:
            self.state.session.set_class(name)

    def _ask_class(self) -> None:
        name, ok = QInputDialog.getText(self, "New class", "class name:")
        if ok and name:
            self.state.guarded(lambda: self.add_class(name))


def row_text(t: Tile) -> str:
    text = f"{t.name} — {status_word(t)} — {len(t.boxes)} boxes"
    if len(t.predictions):
        text += f", {len(t.predictions)} predicted"
    return text
