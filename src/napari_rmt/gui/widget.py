"""The dock widget: open tiles, annotate, train semi-supervised, review, export.

A thin Qt layer: every action calls the ``Session`` (layers <-> store) or the core;
training runs the core trainer in a napari thread worker so the viewer stays
responsive. Actions that would ask for a file take a path argument too, so tests
and scripts drive the same methods the buttons do.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from ._guard import guard_triton

guard_triton()  # before anything imports torch in this process

import napari  # noqa: E402
from napari.utils.notifications import show_info  # noqa: E402
from qtpy.QtCore import Qt, QTimer  # noqa: E402
from qtpy.QtWidgets import (  # noqa: E402
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QGridLayout,
    QGroupBox,
    QHBoxLayout,
    QInputDialog,
    QLabel,
    QListWidget,
    QMessageBox,
    QProgressBar,
    QPushButton,
    QScrollArea,
    QSlider,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from ..data.coco import read_coco, write_coco, write_coco_results  # noqa: E402
from ..data.errors import NapariRmtError  # noqa: E402
from ..data.geojson import write_geojson  # noqa: E402
from ..data.project import MODEL, TRAINING, Project  # noqa: E402
from ..data.sample import load_sample  # noqa: E402
from ..data.tiles import Tile, TileSet, TileStatus  # noqa: E402
from .session import Session, camera_of  # noqa: E402

DEFAULT_PROJECTS = Path.home() / ".napari-rmt" / "projects"


class LossPlot(QWidget):
    """Live loss curves (total, supervised, unsupervised, L_reg), painted with QPainter.

    A matplotlib canvas took 100-200 ms of the event loop per redraw on a software-GL
    CPU machine, once per iteration; polylines of a few thousand points take about 1 ms.
    """

    TERMS = (("total", "#e6e6e6"), ("sup", "#ff9f1c"), ("unsup", "#2ec4b6"), ("reg", "#e71d36"))

    def __init__(self, parent=None) -> None:
        super().__init__(parent)
        self.setMinimumHeight(140)
        self.reset()

    def reset(self) -> None:
        self.x: list[int] = []
        self.y: dict[str, list[float]] = {k: [] for k, _ in self.TERMS}
        self.update()

    def add(self, iteration: int, losses: dict[str, float]) -> None:
        self.x.append(iteration)
        for k, _ in self.TERMS:
            self.y[k].append(float(losses.get(k, 0.0)))
        self.update()  # a repaint is scheduled, merged with others, and cheap

    def redraw(self) -> None:
        self.update()

    def paintEvent(self, event) -> None:
        from qtpy.QtCore import QPointF, QRectF
        from qtpy.QtGui import QColor, QPainter, QPen, QPolygonF

        p = QPainter(self)
        p.setRenderHint(QPainter.RenderHint.Antialiasing)
        w, h = self.width(), self.height()
        left, right, top, bottom = 34, 8, 16, 16
        plot = QRectF(left, top, max(1, w - left - right), max(1, h - top - bottom))
        p.fillRect(self.rect(), QColor("#262930"))
        p.setPen(QPen(QColor("#6b6f7a")))
        p.drawRect(plot)
        values = [v for k, _ in self.TERMS for v in self.y[k] if v == v]
        if not self.x or not values:
            p.drawText(plot, Qt.AlignmentFlag.AlignCenter, "losses appear here while training")
            p.end()
            return
        x0, x1 = self.x[0], max(self.x[-1], self.x[0] + 1)
        y1 = max(values) * 1.05 or 1.0
        p.drawText(QPointF(2, top + 8), f"{y1:.2g}")
        p.drawText(QPointF(2, h - bottom), "0")
        p.drawText(QPointF(left, h - 3), f"{x0}")
        p.drawText(QPointF(w - right - 40, h - 3), f"it {self.x[-1]}")
        lx = left + 4
        for k, colour in self.TERMS:
            ys = self.y[k]
            if not any(ys):
                continue
            pen = QPen(QColor(colour))
            pen.setWidthF(1.3)
            p.setPen(pen)
            pts = QPolygonF(
                [
                    QPointF(
                        plot.left() + (xi - x0) / (x1 - x0) * plot.width(),
                        plot.bottom() - max(0.0, yi) / y1 * plot.height(),
                    )
                    for xi, yi in zip(self.x, ys, strict=True)
                ]
            )
            p.drawPolyline(pts)
            p.drawText(QPointF(lx, top - 3), k)
            lx += 8 * len(k) + 14
        p.end()


def _warm_imports() -> None:
    """Import torch's training stack now, on opening the widget, not in the training thread.

    The first ``torch.optim`` constructor imports ``torch._dynamo`` and friends, and the
    first detector build sets up convolution kernels; done in the worker, they held the
    interpreter for 0.3-0.4 s and froze the viewer.
    """
    import torch

    from ..model.detector import ModelConfig, build_detector

    torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    # The first detector build also runs the first convolutions (kernel set-up).
    build_detector(1, ModelConfig(backbone="mobilenet_v3_large"))


class RMTWidget(QWidget):
    def __init__(self, viewer: napari.viewer.Viewer, parent=None) -> None:
        super().__init__(parent)
        self.viewer = viewer
        self.session: Session | None = None
        self.model_state: dict | None = None  # the latest trained checkpoint, in memory
        self.worker = None
        self.job = None
        self.last_error: str | None = None
        self.whole = None  # WholeImageView when the tiles are windows of a large image
        self._camera_timer = QTimer(self)
        self._camera_timer.setSingleShot(True)
        self._camera_timer.setInterval(150)
        self._camera_timer.timeout.connect(self._update_in_view)
        camera_of(viewer).events.connect(self._on_camera)
        self._autosave = QTimer(self)
        self._autosave.setSingleShot(True)
        self._autosave.setInterval(1000)
        self._autosave.timeout.connect(self.save_project)
        self._build()
        self._update_enabled()
        _warm_imports()

    # ================================================================== layout
    def _build(self) -> None:
        # Everything in a scroll area: on a laptop screen the dock is taller than the window,
        # and Qt would otherwise squeeze the last groups below their minimum (seen in the
        # screenshots: the loss plot cut in half).
        outer = QVBoxLayout(self)
        outer.setContentsMargins(0, 0, 0, 0)
        scroll = QScrollArea()
        scroll.setWidgetResizable(True)
        scroll.setFrameShape(QScrollArea.Shape.NoFrame)
        scroll.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        body = QWidget()
        scroll.setWidget(body)
        outer.addWidget(scroll)
        root = QVBoxLayout(body)

        tiles = QGroupBox("Tiles")
        tl = QVBoxLayout(tiles)
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
        root.addWidget(tiles)

        large = QGroupBox("Large image")
        lg = QVBoxLayout(large)
        row = QHBoxLayout()
        b = QPushButton("Open large image…")
        b.setToolTip("TIFF, PNG, zarr or OME-Zarr; cut into a grid of tiles to annotate")
        b.clicked.connect(self._ask_large)
        row.addWidget(b, 2)
        row.addWidget(QLabel("tile"))
        self.grid_tile_spin = _spin(32, 8192, 256)
        row.addWidget(self.grid_tile_spin)
        row.addWidget(QLabel("overlap"))
        self.grid_overlap_spin = _spin(0, 4096, 0)
        row.addWidget(self.grid_overlap_spin)
        lg.addLayout(row)
        row = QHBoxLayout()
        self.predict_whole_btn = QPushButton("Predict whole image")
        self.predict_whole_btn.setToolTip(
            "Detect cells over the whole image in windows, stitched at their borders"
        )
        self.predict_whole_btn.clicked.connect(lambda: self.predict_whole_image())
        self.export_whole_btn = QPushButton("Export whole-image…")
        self.export_whole_btn.clicked.connect(self._ask_export_whole)
        row.addWidget(self.predict_whole_btn)
        row.addWidget(self.export_whole_btn)
        lg.addLayout(row)
        root.addWidget(large)

        classes = QGroupBox("Class of new boxes (keys 1–9)")
        cl = QHBoxLayout(classes)
        self.class_combo = QComboBox()
        self.class_combo.currentTextChanged.connect(self._on_class)
        cl.addWidget(self.class_combo, 1)
        add = QPushButton("Add…")
        add.clicked.connect(self._ask_class)
        cl.addWidget(add)
        root.addWidget(classes)
        # The colours of the classes, in words: a legend for what the boxes on the canvas mean.
        self.legend = QLabel("")
        self.legend.setWordWrap(True)
        self.legend.setToolTip("annotations: thicker edges; predictions: thinner edges")
        root.addWidget(self.legend)

        train = QGroupBox("Train")
        form = QFormLayout(train)
        self.method_combo = QComboBox()
        # Choices come from the core (torch is imported at widget open anyway, for warm
        # imports); the recommended method first.
        from ..model.config import BACKBONES, ModelConfig
        from ..train.config import METHODS, PSEUDO_RULES, RECOMMENDED

        self.method_combo.addItems([RECOMMENDED, *(m for m in METHODS if m != RECOMMENDED)])
        self.method_combo.setToolTip(
            "rmt+: the recommended recipe (RMT with soft negatives, an ignore band and adaptive "
            "thresholds); rmt: the paper's method; ubt, stac: the paper's baselines; supervised: "
            "labelled tiles only"
        )
        form.addRow("method", self.method_combo)
        self.backbone_combo = QComboBox()
        # the default (ModelConfig's) first, the others as the core lists them
        default_backbone = ModelConfig().backbone
        self.backbone_combo.addItems([default_backbone, *(b for b in BACKBONES if b != default_backbone)])
        form.addRow("backbone", self.backbone_combo)
        self.iter_spin = _spin(1, 1_000_000, 500)
        form.addRow("iterations", self.iter_spin)
        # 20 minutes: what a CPU user waits; 500 iterations would take about 30 (docs/benchmarks.md)
        self.minutes_spin = _dspin(0, 10_000, 20, 5, decimals=0)
        self.minutes_spin.setSpecialValueText("no limit")
        self.minutes_spin.setToolTip("stop after this many minutes of training, even before the iterations")
        form.addRow("minutes", self.minutes_spin)
        self.advanced = QGroupBox("advanced")
        self.advanced.setCheckable(True)
        self.advanced.setChecked(False)
        # The settings show only while "advanced" is ticked: a disabled form squeezed into
        # the dock's height was unreadable (seen in the screenshots).
        self.advanced_body = QWidget()
        adv = QFormLayout(self.advanced_body)
        adv.setContentsMargins(0, 0, 0, 0)
        QVBoxLayout(self.advanced).addWidget(self.advanced_body)
        self.advanced_body.setVisible(False)
        self.advanced.toggled.connect(self.advanced_body.setVisible)
        self.burn_spin = _spin(0, 1_000_000, 200)
        self.thr_spin = _dspin(0, 1, 0.7, 0.05)
        self.lu_spin = _dspin(0, 100, 4.0, 0.5)
        self.lr_spin = _dspin(0, 100, 1.0, 0.5)
        self.p_spin = _dspin(0.05, 1, 0.5, 0.05)
        self.ema_spin = _dspin(0, 1, 0.996, 0.001, decimals=4)
        self.lrate_spin = _dspin(0.0001, 1, 0.02, 0.005, decimals=4)
        self.batch_spin = _spin(1, 64, 2)
        self.rule_combo = QComboBox()
        self.rule_combo.addItems(PSEUDO_RULES)
        self.ignore_spin = _dspin(0, 1, 0.0, 0.05)
        self.ignore_spin.setSpecialValueText("off")
        self.soft_check = QCheckBox("soft negatives")
        for label, w, tip in (
            ("burn-in", self.burn_spin, "steps on labelled tiles only before the teacher starts labelling"),
            ("threshold", self.thr_spin, "teacher score from which a box becomes a pseudo-label (fixed rule; "
             "the fallback of the adaptive one)"),
            ("pseudo rule", self.rule_combo, "fixed: one threshold; gmm: a threshold per class fitted to the "
             "teacher's recent scores; topk: per tile the round(sum of scores) best boxes"),
            ("ignore from", self.ignore_spin, "teacher boxes scoring between this and the threshold are "
             "neither cells nor background for the student"),
            ("", self.soft_check, "a region the teacher half-believes is a cell counts as background only "
             "in proportion to the teacher's background score"),
            ("λu", self.lu_spin, "weight of the loss on pseudo-labelled tiles (Eq. 6)"),
            ("λr", self.lr_spin, "weight of the sparse regulariser that pushes class scores to be decisive (Eq. 6)"),
            ("p (L_reg)", self.p_spin, "the p of the regulariser's p-norm (Eq. 5); smaller is sparser"),
            ("σ (EMA)", self.ema_spin, "how slowly the teacher follows the student (Eq. 7); closer to 1 is slower"),
            ("learning rate", self.lrate_spin, "SGD learning rate after warm-up"),
            ("batch", self.batch_spin, "labelled (and unlabelled) tiles per step"),
        ):
            w.setToolTip(tip)
            adv.addRow(label, w)
        self.method_combo.currentTextChanged.connect(self._show_method_defaults)
        self._show_method_defaults(self.method_combo.currentText())
        form.addRow(self.advanced)
        row = QHBoxLayout()
        self.train_btn = QPushButton("Train semi-supervised")
        self.train_btn.clicked.connect(self.train)
        self.cancel_btn = QPushButton("Cancel")
        self.cancel_btn.clicked.connect(self.cancel)
        row.addWidget(self.train_btn, 2)
        row.addWidget(self.cancel_btn, 1)
        form.addRow(row)
        self.progress = QProgressBar()
        self.progress.setFormat("%v / %m")
        form.addRow(self.progress)
        self.status = QLabel("")
        self.status.setWordWrap(True)
        # Room for three lines, always: a label that grows with its text makes the dock ask
        # napari's main window for a new layout, which redraws the whole canvas (a 320 ms
        # stall on software OpenGL, measured when training starts).
        self.status.setFixedHeight(3 * self.status.fontMetrics().lineSpacing() + 4)
        self.status.setAlignment(Qt.AlignmentFlag.AlignLeft | Qt.AlignmentFlag.AlignTop)
        form.addRow(self.status)
        self.plot = LossPlot()
        form.addRow(self.plot)
        root.addWidget(train)

        review = QGroupBox("Review predictions")
        rl = QVBoxLayout(review)
        row = QHBoxLayout()
        self.score_label = QLabel("score > 0.50")
        self.score_slider = QSlider(Qt.Orientation.Horizontal)
        self.score_slider.setRange(0, 100)
        self.score_slider.setValue(50)
        self.score_slider.valueChanged.connect(self._on_score)
        row.addWidget(self.score_label)
        row.addWidget(self.score_slider, 1)
        rl.addLayout(row)
        row = QHBoxLayout()
        self.accept_tile_btn = QPushButton("Accept tile")
        self.accept_tile_btn.setToolTip(
            "Shown predictions become annotations and the tile becomes reviewed; predictions hidden "
            "by the score cut stay predictions"
        )
        self.accept_tile_btn.clicked.connect(self.accept_tile)
        self.accept_sel_btn = QPushButton("Accept selected")
        self.accept_sel_btn.clicked.connect(self.accept_selected)
        row.addWidget(self.accept_tile_btn)
        row.addWidget(self.accept_sel_btn)
        rl.addLayout(row)
        root.addWidget(review)

        export = QGroupBox("Export and model")
        el = QGridLayout(export)  # two rows of three: one row of six was wider than the dock
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
        root.addWidget(export)
        root.addStretch(1)
        # The dock takes the scroll area's width, which does not follow its content: ask for
        # the content's own width (plus the vertical scroll bar), or rows get clipped on the
        # right (seen in the screenshots).
        scroll.setMinimumWidth(body.sizeHint().width() + scroll.verticalScrollBar().sizeHint().width() + 40)

    # ================================================================== opening
    def set_tileset(self, tileset: TileSet, name: str, folder: Path | None = None) -> None:
        if len(tileset) == 0:
            raise NapariRmtError("there are no tiles to open")
        self._flush()
        folder = folder or _fresh_project_folder(name)
        self.project = Project(tileset, folder)
        self.model_state = None
        self.session = Session(self.viewer, self.project, on_change=self._changed)
        self._bind_keys()
        self.class_combo.blockSignals(True)
        self.class_combo.clear()
        self.class_combo.addItems(tileset.classes.names)
        self.class_combo.blockSignals(False)
        self._refresh_legend()
        # New boxes start with the class most boxes already have (not the first in the list,
        # which on CoNSeP is the rare "miscellaneous").
        counts = {c.id: sum(int((t.boxes.class_ids == c.id).sum()) for t in tileset) for c in tileset.classes}
        if counts and max(counts.values()) > 0:
            self.class_combo.setCurrentText(tileset.classes.by_id(max(counts, key=counts.get)).name)
        self.project_label.setText(f"project: {folder}")
        self._attach_whole(tileset)
        self._fill_list()
        self._sync_tile_controls()
        self._update_enabled()
        self.save_project()

    def _attach_whole(self, tileset: TileSet) -> None:
        """Show the large image the tiles are windows of (if they are), under them."""
        if self.whole is not None:
            self.whole.remove()
            self.whole = None
        windows = [t for t in tileset if t.window and t.path is not None]
        if not windows:
            return
        from ..data.large import cached_large_image
        from .wholeimage import WholeImageView

        sources = {str(t.path) for t in windows}
        if len(sources) > 1:
            show_info(
                f"tiles come from {len(sources)} large images; the overview shows {windows[0].path.name}"
            )
        self.whole = WholeImageView(self.viewer, cached_large_image(str(windows[0].path)), tileset.classes)
        self.whole.show_grid([t for t in tileset if t.window and str(t.path) == str(windows[0].path)])
        self.session.frame_tile()

    def open_large_image(self, path: str | Path, tile: int | None = None, overlap: int | None = None) -> None:
        """Cut a large image into a grid of tiles (all unlabelled) and show it whole."""
        from ..data.tiles import grid_tiles

        path = Path(path)
        tiles = grid_tiles(
            path,
            tile=tile or self.grid_tile_spin.value(),
            overlap=self.grid_overlap_spin.value() if overlap is None else overlap,
        )
        self.set_tileset(TileSet(tiles), path.stem)
        show_info(f"{path.name}: {len(tiles)} tiles; annotate a few and tick 'fully annotated'")

    def open_sample(self) -> None:
        self._guarded(lambda: self._open_sample())

    def _open_sample(self) -> None:
        """The bundled sample, in one project folder: opening it again reopens that project
        (with what the user did in it) instead of making a new folder every time."""
        from ..data.boxes import Boxes

        folder = DEFAULT_PROJECTS / "consep-sample"
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
        self.set_tileset(ts, "consep-sample", folder=folder)

    def open_folder(self, folder: str | Path) -> None:
        folder = Path(folder)
        if Project.is_project(folder):
            self.open_project(folder)
            return
        self.set_tileset(TileSet.from_folder(folder), folder.name)

    def open_coco(self, path: str | Path, allow_outside: bool = False) -> None:
        path = Path(path)
        self.set_tileset(read_coco(path, allow_outside=allow_outside), path.parent.name)

    def open_project(self, folder: str | Path) -> None:
        project = Project.open(folder)
        self.set_tileset(project.tileset, Path(folder).name, folder=Path(folder))
        from ..train.checkpoint import read_checkpoint

        if project.problems:
            show_info("opened with problems: " + "; ".join(project.problems))
        interrupted = Path(folder) / TRAINING
        if project.model_path is not None:
            self.model_state = read_checkpoint(project.model_path)
            self._say(f"model loaded from {project.model_path}")
            if interrupted.is_file():
                self._say(
                    f"model loaded from {project.model_path}; an interrupted run's last checkpoint "
                    f"is in {interrupted} (Load model… to use it)"
                )
        elif interrupted.is_file():
            # napari was closed or killed while training: its last checkpoint is the model.
            self.model_state = read_checkpoint(interrupted)
            self._say(
                f"restored the model of an interrupted training run (step "
                f"{self.model_state.get('iteration', '?')}) from {interrupted}"
            )

    def open_image_layer(self) -> None:
        self._guarded(self._open_image_layer)

    def _open_image_layer(self) -> None:
        layer = next(
            (
                lay
                for lay in self.viewer.layers.selection
                if isinstance(lay, napari.layers.Image) and lay.name != "tile"
            ),
            None,
        )
        if layer is None:
            layer = next(
                (
                    lay
                    for lay in self.viewer.layers
                    if isinstance(lay, napari.layers.Image) and lay.name != "tile"
                ),
                None,
            )
        if layer is None:
            raise NapariRmtError("select an image layer first")
        import numpy as np

        data = np.asarray(layer.data)
        planes = [data] if (data.ndim == 2 or (data.ndim == 3 and layer.rgb)) else list(data)
        tiles = [
            Tile(
                id=i + 1,
                name=f"{layer.name} [{i}]",
                width=p.shape[1],
                height=p.shape[0],
                loader=(lambda a=p: a),
            )
            for i, p in enumerate(planes)
        ]
        self.set_tileset(TileSet(tiles), layer.name)

    # ================================================================== navigation
    def go(self, step: int) -> None:
        if self.session is None:
            return
        self.session.next_tile(step)
        self._after_move()

    def show_tile(self, index: int) -> None:
        if self.session is None:
            return
        self.session.show_tile(index)
        self._after_move()
        if self.session.image_error:
            self._report_error(NapariRmtError(self.session.image_error), prefix="image not shown")

    def suggest_next(self) -> None:
        if self.session is None:
            return
        tile = self.session.suggest_next()
        if tile is None:
            show_info("every tile is labelled")
        self._after_move()

    def _after_move(self) -> None:
        self.tile_list.blockSignals(True)
        self.tile_list.setCurrentRow(self.session.index)
        self.tile_list.blockSignals(False)
        self._sync_tile_controls()
        self._refresh_list_rows()
        self._update_score_label()

    def _on_row(self, row: int) -> None:
        if self.session is not None and row >= 0 and row != self.session.index:
            self.show_tile(row)

    def _fill_list(self) -> None:
        self.tile_list.blockSignals(True)
        self.tile_list.clear()
        for t in self.project.tileset:
            self.tile_list.addItem(_row_text(t))
        self.tile_list.setCurrentRow(self.session.index)
        self.tile_list.blockSignals(False)

    def _refresh_list_rows(self, all_rows: bool = False) -> None:
        rows = range(len(self.project.tileset)) if all_rows else [self.session.index]
        for i in rows:
            self.tile_list.item(i).setText(_row_text(self.project.tileset[i]))

    def _sync_tile_controls(self) -> None:
        t = self.session.tile
        self.labelled_box.blockSignals(True)
        self.labelled_box.setChecked(t.is_labelled)
        self.labelled_box.blockSignals(False)

    # ================================================================== annotating
    def _on_labelled(self, checked: bool) -> None:
        if self.session is not None:
            self.session.pull()
            self.session.set_labelled(checked)
            self._refresh_list_rows()
            self._refresh_grid()

    def _on_class(self, name: str) -> None:
        if self.session is not None and name:
            self.session.set_class(name)

    def set_class(self, name: str) -> None:
        self.class_combo.setCurrentText(name)

    def _bind_keys(self) -> None:
        s = self.session
        for layer in (s.annotations, s.predictions, s.image):
            for k in range(1, 10):
                layer.bind_key(str(k), self._class_key(k - 1), overwrite=True)

    def _class_key(self, index: int):
        def pick(layer=None):
            names = self.project.tileset.classes.names
            if index < len(names):
                self.set_class(names[index])

        return pick

    def _refresh_legend(self) -> None:
        project = getattr(self, "project", None)
        classes = project.tileset.classes if project is not None else []
        self.legend.setText(
            " ".join(f'<span style="color:{c.hex}">■</span>&nbsp;{c.name}' for c in classes)
        )

    def _ask_class(self) -> None:
        name, ok = QInputDialog.getText(self, "New class", "class name:")
        if ok and name:
            self._guarded(lambda: self.add_class(name))

    def add_class(self, name: str) -> None:
        if self.session is None:
            raise NapariRmtError("open tiles first")
        self.project.tileset.classes.add(name)
        # The layers' categorical features need the new category: rebuild them.
        self.session.pull()
        self.session = Session(self.viewer, self.project, on_change=self._changed)
        self.session.show_tile(self.session.index)
        self._bind_keys()
        self.class_combo.addItem(name)
        self._refresh_legend()
        self._changed()

    # ================================================================== review
    def _on_score(self, value: int) -> None:
        if self.session is not None:
            self.session.set_score_threshold(value / 100)
        self._update_score_label()
        if self.whole is not None and len(self.whole.boxes):
            self.whole.show_predictions(score_threshold=value / 100)

    def _update_score_label(self) -> None:
        """The cut and how many of this tile's predictions it hides: nothing hides silently."""
        text = f"score > {self.score_slider.value() / 100:.2f}"
        if self.session is not None:
            hidden = len(self.session._hidden_predictions)
            text += f" · {hidden} hidden" if hidden else ""
        self.score_label.setText(text)

    def _start_cut(self, predictions) -> int:
        """Where the slider starts after a run: the cut that shows as many boxes as the
        model expects cells (the sum of its scores, which a calibrated model makes the
        expected count), so that a short run's low scores do not leave the canvas empty."""
        scores = np.sort(np.concatenate([b.scores for b in predictions] or [np.zeros(0)]))[::-1]
        expected = round(float(scores.sum())) if scores.size else 0
        if expected < 1:
            return self.score_slider.value()
        cut = float(scores[min(expected, scores.size) - 1])
        return max(0, min(self.score_slider.value(), int(100 * cut) - 1))

    def accept_tile(self) -> int:
        if self.session is None:
            return 0
        try:
            n = self.session.accept_tile()
        except NapariRmtError as exc:
            self._report_error(exc, prefix="nothing accepted")
            return 0
        if self.session.hidden_kept:
            self._say(
                f"accepted {n} boxes; {self.session.hidden_kept} predictions below the score cut are "
                "kept as predictions (lower the cut to see them)"
            )
        self._sync_tile_controls()
        self._refresh_list_rows()
        self._refresh_grid()
        return n

    def accept_selected(self) -> int:
        if self.session is None:
            return 0
        n = self.session.accept_selected()
        self._refresh_list_rows()
        return n

    # ================================================================== training
    def _show_method_defaults(self, method: str) -> None:
        """The advanced form shows the chosen method's own defaults (one source: the config)."""
        from ..train.config import TrainConfig

        cfg = TrainConfig.for_method(method, iterations=self.iter_spin.value())
        self.burn_spin.setValue(cfg.burn_in)
        self.thr_spin.setValue(cfg.threshold)
        self.rule_combo.setCurrentText(cfg.pseudo_rule)
        self.ignore_spin.setValue(cfg.ignore_low or 0.0)
        self.soft_check.setChecked(cfg.soft_negatives)
        self.lu_spin.setValue(cfg.lambda_u)
        self.lr_spin.setValue(cfg.lambda_r)
        self.p_spin.setValue(cfg.p_norm)
        self.ema_spin.setValue(cfg.ema_decay)
        self.lrate_spin.setValue(cfg.lr)
        self.batch_spin.setValue(cfg.labelled_batch)

    def training_config(self):
        """The method's defaults, with the advanced settings laid over them when ticked."""
        from ..train.config import TrainConfig, burn_in_for

        iterations = self.iter_spin.value()
        method = self.method_combo.currentText()
        values: dict = {
            "iterations": iterations,
            "warmup": min(100, iterations // 5),
            "model": {"backbone": self.backbone_combo.currentText()},
        }
        if self.minutes_spin.value() > 0:
            values["time_budget_s"] = 60.0 * self.minutes_spin.value()
        if self.advanced.isChecked():
            values.update(
                burn_in=self.burn_spin.value(),
                threshold=self.thr_spin.value(),
                pseudo_rule=self.rule_combo.currentText(),
                ignore_low=self.ignore_spin.value() or None,
                soft_negatives=self.soft_check.isChecked(),
                lambda_u=self.lu_spin.value(),
                lambda_r=self.lr_spin.value(),
                p_norm=self.p_spin.value(),
                ema_decay=self.ema_spin.value(),
                lr=self.lrate_spin.value(),
                labelled_batch=self.batch_spin.value(),
                unlabelled_batch=self.batch_spin.value(),
            )
        elif self.model_state is not None:
            # warm start: the teacher is already trained; else the method's own rule
            values["burn_in"] = burn_in_for(iterations, warm_start=True)
            values["burn_in_fraction"] = 0.1
        if method == "stac":
            values["burn_in"] = min(max(1, values.get("burn_in", burn_in_for(iterations))), iterations - 1)
        return TrainConfig.for_method(method, **values)

    def train(self, config=None, synchronous: bool = False) -> None:
        """Start training on the labelled tiles; the others are the unlabelled data."""
        if self.session is None:
            self._report_error(NapariRmtError("open tiles first"))
            return
        if self.worker is not None:
            show_info("training is already running")
            return
        self.session.pull()
        ts = self.project.tileset
        try:
            cfg = config or self.training_config()
            if not ts.labelled:
                raise NapariRmtError(
                    "no labelled tiles: tick 'This tile is fully annotated' on the tiles you finished"
                )
        except NapariRmtError as exc:
            self._report_error(exc)
            return
        from .jobs import TrainingJob

        init = self.model_state
        if init is not None:
            from ..train.checkpoint import classes_from_checkpoint, config_from_checkpoint

            same = (
                classes_from_checkpoint(init).names == ts.classes.names
                and config_from_checkpoint(init).model == cfg.model
            )
            if not same:
                init = None  # another architecture or class list: start afresh
        folder = self.project.folder
        self.job = TrainingJob(
            ts.labelled,
            ts.unlabelled,
            ts.classes,
            cfg,
            init_from=init,
            save_to=folder / MODEL if folder is not None else None,
            checkpoint_to=folder / TRAINING if folder is not None else None,
        )
        self.plot.reset()
        self.progress.setMaximum(cfg.iterations)
        self.progress.setValue(0)
        self._say(
            f"{cfg.method}: {len(ts.labelled)} labelled, {len(ts.unlabelled)} unlabelled tiles"
            + (" (warm start)" if init is not None else "")
        )
        self.last_error = None
        self._run_job(self.job.run, self._on_yielded, self._on_returned, self._on_errored, synchronous)

    def _run_job(self, run, on_yielded, on_returned, on_errored, synchronous: bool) -> None:
        """``jobs.run_job`` with the widget's bookkeeping (the worker, enabled buttons)."""
        from .jobs import run_job

        worker = run_job(run, on_yielded, on_returned, on_errored, self._on_finished, synchronous)
        if worker is not None:
            self.worker = worker
            self._update_enabled()
            worker.start()

    def cancel(self) -> None:
        if self.job is not None:
            self.job.cancel()
        if self.worker is not None:
            self._say("cancelling…")

    def _on_yielded(self, ev) -> None:
        from ..train.events import IterationEvent, PhaseEvent
        from .jobs import PredictProgress

        if isinstance(ev, IterationEvent):
            self.progress.setValue(ev.iteration)
            pseudo = (
                f", {sum(ev.pseudo_per_image) / len(ev.pseudo_per_image):.1f} pseudo-boxes/tile"
                if ev.pseudo_per_image
                else ""
            )
            self._say(
                f"{ev.phase}: iteration {ev.iteration}/{ev.total}, loss {ev.losses['total']:.3f}"
                f"{pseudo}, ETA {_eta(ev.eta)}"
            )
            self.plot.add(ev.iteration, ev.losses)
        elif isinstance(ev, PhaseEvent):
            # In the status line, not a notification: napari's toast over the canvas makes
            # software OpenGL redraw the whole scene (a 270-300 ms stall, measured).
            self._say(ev.message)
        elif isinstance(ev, PredictProgress):
            self._say(f"predicting unlabelled tiles {ev.done}/{ev.total}")

    def _on_returned(self, result) -> None:
        self.plot.redraw()
        if result.cancelled:
            kept = "the previous model is kept" if self.model_state is not None else "there is no model yet"
            self._say(f"cancelled after {result.iterations} iterations; {kept}")
            return
        self.model_state = result.checkpoint
        ts = self.project.tileset
        self.session.pull()
        for tile_id, boxes in result.predictions.items():
            tile = ts.by_id(tile_id)
            if not tile.is_labelled:
                tile.predictions = boxes
        self.session.refresh()
        self.score_slider.setValue(self._start_cut(result.predictions.values()))
        self._update_score_label()
        self._refresh_list_rows(all_rows=True)
        n = sum(len(b) for b in result.predictions.values())
        self._say(
            f"done: {result.iterations} iterations; {n} predicted boxes on "
            f"{len(result.predictions)} unlabelled tiles"
        )
        self._changed()

    def _on_errored(self, exc: Exception) -> None:
        self._report_error(exc, prefix="training failed")

    def _on_finished(self) -> None:
        self.worker = None
        self.job = None
        self._update_enabled()

    def _say(self, text: str) -> None:
        """A message in the status area; it also clears an error shown there before (the
        next thing that works replaces the last thing that failed)."""
        self.last_error = None
        self.status.setStyleSheet("")
        self.status.setText(text)
        self.status.setToolTip(text)

    def _report_error(self, exc: Exception, prefix: str = "error") -> None:
        """An error in the status area, in red, its full text on hover (the area shows three
        lines); not as a toast, which would cover the tile's caption on the canvas."""
        msg = f"{prefix}: {exc}"
        self.status.setStyleSheet("color: #ff6b6b;")
        self.status.setText(msg)
        self.status.setToolTip(msg)
        self.last_error = msg

    # ================================================================== large image
    def _on_camera(self, event=None) -> None:
        if self.whole is not None and len(self.whole.boxes):
            self._camera_timer.start()  # redraw the boxes in view once the camera rests

    def _update_in_view(self) -> None:
        if self.whole is not None:
            self.whole.update_in_view()

    def _refresh_grid(self) -> None:
        if self.whole is not None:
            path = str(self.whole.image.path)
            self.whole.show_grid([t for t in self.project.tileset if t.window and str(t.path) == path])

    def predict_whole_image(self, synchronous: bool = False, window: int = 512, context: int = 128) -> None:
        """Detect cells over the whole large image with the current model, in a thread."""
        if self.whole is None:
            self._report_error(NapariRmtError("open a large image first (Large image… )"))
            return
        if self.model_state is None:
            self._report_error(NapariRmtError("there is no model yet: train one or load one"))
            return
        if self.worker is not None:
            show_info("busy: wait for the running job or cancel it")
            return
        from .jobs import WholeImageJob

        image = self.whole.image
        self.job = WholeImageJob(self.model_state, image, window=window, context=context)
        self._say(f"predicting {image.name} ({image.width} x {image.height})…")
        self.last_error = None
        self._run_job(
            self.job.run,
            self._on_whole_progress,
            self._on_whole_returned,
            lambda exc: self._report_error(exc, prefix="whole-image prediction failed"),
            synchronous,
        )

    def _on_whole_progress(self, msg) -> None:
        self.progress.setMaximum(msg.total)
        self.progress.setValue(msg.done)
        self._say(f"predicting whole image: window {msg.done}/{msg.total}")

    def _on_whole_returned(self, boxes) -> None:
        if boxes is None:
            self._say("whole-image prediction cancelled")
            return
        n = self.whole.show_predictions(boxes, score_threshold=self.session.score_threshold)
        self._say(
            f"whole image: {len(boxes)} cells found, {n} shown at score > {self.session.score_threshold:.2f}"
        )

    def export_whole_predictions(self, path: str | Path) -> Path:
        """Whole-image boxes as COCO results (.json), a zarr box store (.zarr) or GeoJSON."""
        if self.whole is None or not len(self.whole.boxes):
            raise NapariRmtError("there are no whole-image predictions yet (Predict whole image)")
        from ..data.boxstore import write_whole_image_boxes

        image = self.whole.image
        return write_whole_image_boxes(
            path, self.whole.boxes, self.project.tileset.classes, image.name, image.size, image.path
        )

    # ================================================================== persistence
    def _changed(self) -> None:
        self._autosave.start()

    def save_project(self) -> None:
        if self.session is None:
            return
        self._autosave.stop()
        try:
            self.session.pull()
            self.project.save()
        except (NapariRmtError, OSError) as exc:
            self._report_error(exc, prefix="autosave failed")

    def _flush(self) -> None:
        if self.session is not None and self._autosave.isActive():
            self.save_project()

    def save_model(self, path: str | Path) -> Path:
        if self.model_state is None:
            raise NapariRmtError("there is no trained model yet")
        from ..train.checkpoint import save_checkpoint

        return save_checkpoint(path, self.model_state)

    def load_model(self, path: str | Path) -> None:
        from ..train.checkpoint import classes_from_checkpoint, read_checkpoint

        ckpt = read_checkpoint(path)
        names = classes_from_checkpoint(ckpt).names
        if self.session is not None and names != self.project.tileset.classes.names:
            raise NapariRmtError(
                f"{path}: the model knows classes {names}, this project {self.project.tileset.classes.names}"
            )
        self.model_state = ckpt
        self._say(f"model loaded from {path}")

    def export_annotations(self, path: str | Path) -> Path:
        self.session.pull()
        return write_coco(self.project.tileset, path)

    def export_geojson(self, path: str | Path, predictions: bool = False) -> Path:
        self.session.pull()
        return write_geojson(self.project.tileset, path, predictions=predictions)

    def import_geojson(self, path: str | Path) -> int:
        """Add QuPath's GeoJSON objects to the tiles they lie on (annotations stay
        annotations, detections become predictions); returns how many boxes came in."""
        from ..data.geojson import read_geojson

        self.session.pull()
        ts = self.project.tileset
        before = sum(len(t.boxes) + len(t.predictions) for t in ts)
        names = list(ts.classes.names)
        read_geojson(path, ts)
        n = sum(len(t.boxes) + len(t.predictions) for t in ts) - before
        if ts.classes.names != names:
            # New classes: the layers' categorical features need them (as in add_class);
            # the store already holds everything, so the new session must not pull.
            index = self.session.index
            self.session = Session(self.viewer, self.project, on_change=self._changed)
            self.session.show_tile(index)
            self._bind_keys()
            self.class_combo.addItems(ts.classes.names[len(names) :])
            self._refresh_legend()
        else:
            self.session.refresh()
        self._refresh_list_rows(all_rows=True)
        self.save_project()
        self._say(f"imported {n} boxes from {Path(path).name}")
        return n

    def export_predictions(self, path: str | Path) -> Path:
        self.session.pull()
        return write_coco_results(self.project.tileset, path)

    # ================================================================== dialogs
    def _guarded(self, fn) -> None:
        try:
            fn()
        except (NapariRmtError, OSError) as exc:
            self._report_error(exc)
            return
        if self.last_error is not None:
            self._say("")  # it worked: the earlier error no longer stands

    def _ask_folder(self) -> None:
        d = QFileDialog.getExistingDirectory(self, "Folder of tiles")
        if d:
            self._guarded(lambda: self.open_folder(d))

    def _ask_project(self) -> None:
        d = QFileDialog.getExistingDirectory(self, "napari-rmt project folder")
        if d:
            self._guarded(lambda: self.open_project(d))

    def _ask_coco(self) -> None:
        f, _ = QFileDialog.getOpenFileName(self, "COCO annotations", filter="COCO json (*.json)")
        if f:
            self._guarded(lambda: self._open_coco_asking(f))

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

    def _ask_save(self, title: str, filt: str, fn) -> None:
        if self.session is None:
            return
        f, _ = QFileDialog.getSaveFileName(self, title, filter=filt)
        if f:
            self._guarded(lambda: show_info(f"wrote {fn(f)}"))

    def _ask_large(self) -> None:
        f, _ = QFileDialog.getOpenFileName(
            self, "Large image", filter="Images (*.tif *.tiff *.png *.jpg *.jpeg);;All files (*)"
        )
        if not f:
            f = QFileDialog.getExistingDirectory(self, "…or a zarr / OME-Zarr folder")
        if f:
            self._guarded(lambda: self.open_large_image(f))

    def _ask_export_whole(self) -> None:
        self._ask_save(
            "Export whole-image predictions",
            "COCO results (*.json);;zarr box store (*.zarr);;GeoJSON (*.geojson)",
            self.export_whole_predictions,
        )

    def _ask_export_coco(self) -> None:
        self._ask_save("Export annotations", "COCO json (*.json)", self.export_annotations)

    def _ask_export_geojson(self) -> None:
        self._ask_save("Export GeoJSON (QuPath)", "GeoJSON (*.geojson *.json)", self.export_geojson)

    def _ask_import_geojson(self) -> None:
        if self.session is None:
            return
        f, _ = QFileDialog.getOpenFileName(self, "Import GeoJSON (QuPath)", filter="GeoJSON (*.geojson *.json)")
        if f:
            self._guarded(lambda: self.import_geojson(f))

    def _ask_export_predictions(self) -> None:
        self._ask_save("Export predictions", "COCO results (*.json)", self.export_predictions)

    def _ask_save_model(self) -> None:
        self._ask_save("Save model", "PyTorch (*.pt)", self.save_model)

    def _ask_load_model(self) -> None:
        f, _ = QFileDialog.getOpenFileName(self, "Load model", filter="PyTorch (*.pt)")
        if f:
            self._guarded(lambda: self.load_model(f))

    def _update_enabled(self) -> None:
        has = self.session is not None
        running = self.worker is not None
        for w in (
            self.prev_btn,
            self.next_btn,
            self.suggest_btn,
            self.labelled_box,
            self.accept_tile_btn,
            self.accept_sel_btn,
            self.score_slider,
        ):
            w.setEnabled(has)
        self.train_btn.setEnabled(has and not running)
        self.cancel_btn.setEnabled(running)
        self.predict_whole_btn.setEnabled(self.whole is not None and not running)
        self.export_whole_btn.setEnabled(self.whole is not None)


def _row_text(t: Tile) -> str:
    status = t.status.value
    if not t.is_labelled and len(t.predictions):
        status = "predicted"
    text = f"{t.name} — {status} — {len(t.boxes)} boxes"
    if len(t.predictions):
        text += f", {len(t.predictions)} predicted"
    return text


def _eta(seconds: float) -> str:
    s = int(max(0, seconds))
    return f"{s // 60}:{s % 60:02d}"


def _spin(lo: int, hi: int, value: int) -> QSpinBox:
    w = QSpinBox()
    w.setRange(lo, hi)
    w.setValue(value)
    return w


def _dspin(lo: float, hi: float, value: float, step: float, decimals: int = 2) -> QDoubleSpinBox:
    w = QDoubleSpinBox()
    w.setDecimals(decimals)
    w.setRange(lo, hi)
    w.setSingleStep(step)
    w.setValue(value)
    return w


def _fresh_project_folder(name: str) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return DEFAULT_PROJECTS / f"{name}-{stamp}"
