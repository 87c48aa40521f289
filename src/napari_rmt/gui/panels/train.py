"""Training: the method and its settings, Train / Cancel, live losses."""

from __future__ import annotations

from napari.utils.notifications import show_info
from qtpy.QtCore import Qt
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from ...data.errors import NapariRmtError
from ...data.project import MODEL, TRAINING
from ...evaluate.report import MIN_TILES_FOR_HOLDOUT, holdout_split
from ...model.bundled import LICENSE_NOTE
from ...train.config import WIDGET_ITERATIONS, WIDGET_MINUTES
from ..state import AppState
from .common import dspin, spin
from .tunables import TunableForm

#: The share of the annotated tiles "report each class on held-out tiles" keeps out of training.
HOLDOUT = 0.1


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
        #: (iteration, label) of phase changes, drawn as dashed vertical lines
        self.marks: list[tuple[int, str]] = []
        self.update()

    def mark(self, iteration: int, label: str) -> None:
        """A phase change at ``iteration`` (the end of burn-in: the unlabelled terms arrive
        there, and the total jumps by design, not by divergence)."""
        self.marks.append((iteration, label))
        self.update()

    def add(self, iteration: int, losses: dict[str, float]) -> None:
        self.x.append(iteration)
        for k, _ in self.TERMS:
            self.y[k].append(float(losses.get(k, 0.0)))
        self.update()  # a repaint is scheduled, merged with others, and cheap

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
        dash = QPen(QColor("#b0b4bd"))
        dash.setStyle(Qt.PenStyle.DashLine)
        for it, label in self.marks:
            if x0 <= it <= x1:
                mx = plot.left() + (it - x0) / (x1 - x0) * plot.width()
                p.setPen(dash)
                p.drawLine(QPointF(mx, plot.top()), QPointF(mx, plot.bottom()))
                p.drawText(QPointF(min(mx + 3, plot.right() - 60), plot.top() + 12), label)
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



class TrainPanel(QGroupBox):
    def __init__(self, state: AppState, parent=None) -> None:
        super().__init__("Train", parent)
        self.state = state
        form = QFormLayout(self)
        self.method_combo = QComboBox()
        # Choices come from the core (torch is imported at widget open anyway, for warm
        # imports); the recommended method first.
        from ...model.config import BACKBONES, ModelConfig
        from ...train.config import METHODS, RECOMMENDED

        self.method_combo.addItems([RECOMMENDED, *(m for m in METHODS if m != RECOMMENDED)])
        self.method_combo.setToolTip(
            "rmt+: the recommended recipe (RMT with soft negatives and an ignore band for an unsure "
            "teacher; docs/tuning.md); rmt: the paper's method; ubt, stac: the paper's baselines; supervised: "
            "labelled tiles only"
        )
        form.addRow("method", self.method_combo)
        self.backbone_combo = QComboBox()
        # the default (ModelConfig's) first, the others as the core lists them
        default_backbone = ModelConfig().backbone
        self.backbone_combo.addItems([default_backbone, *(b for b in BACKBONES if b != default_backbone)])
        form.addRow("backbone", self.backbone_combo)
        self.init_combo = QComboBox()
        self.init_combo.addItems(["nucleus model", "random weights"])
        self.init_combo.setToolTip(
            "nucleus model: start from the bundled H&E nucleus detector (a fresh classifier for your "
            "classes), for resnet18; it was " + LICENSE_NOTE + ". random weights: start from scratch"
        )
        form.addRow("start from", self.init_combo)
        self.iter_spin = spin(1, 1_000_000, WIDGET_ITERATIONS)
        form.addRow("iterations", self.iter_spin)
        self._iterations_shown = self.iter_spin.value()
        self.minutes_spin = dspin(0, 10_000, WIDGET_MINUTES, 5, decimals=0)
        self.minutes_spin.setSpecialValueText("no limit")
        self.minutes_spin.setToolTip("stop after this many minutes of training, even before the iterations")
        form.addRow("minutes", self.minutes_spin)
        self.holdout_box = QCheckBox("report each class on held-out tiles")
        self.holdout_box.setToolTip(
            f"keep {HOLDOUT:.0%} of the annotated tiles (when there are at least {MIN_TILES_FOR_HOLDOUT}) out of "
            "training, and after the run say how well each class is found on them: F1 on fully annotated "
            "tiles, recall on partly annotated ones"
        )
        form.addRow(self.holdout_box)
        self.advanced = QGroupBox("advanced")
        self.advanced.setCheckable(True)
        self.advanced.setChecked(False)
        # The settings show only while "advanced" is ticked: a disabled form squeezed into
        # the dock's height was unreadable (seen in the screenshots).
        self.form = TunableForm()
        QVBoxLayout(self.advanced).addWidget(self.form)
        self.form.setVisible(False)
        self.advanced.toggled.connect(self.form.setVisible)
        self.method_combo.currentTextChanged.connect(self._show_method_defaults)
        self._show_method_defaults(self.method_combo.currentText())
        self.iter_spin.valueChanged.connect(self._follow_iterations)
        form.addRow(self.advanced)
        row = QHBoxLayout()
        self.train_btn = QPushButton("Train semi-supervised")
        self.train_btn.clicked.connect(lambda: self.train())
        self.cancel_btn = QPushButton("Cancel")
        self.cancel_btn.clicked.connect(self.cancel)
        row.addWidget(self.train_btn, 2)
        row.addWidget(self.cancel_btn, 1)
        form.addRow(row)
        self.plot = LossPlot()
        form.addRow(self.plot)
        #: the last run's per-class figures on its held-out tiles (``evaluate.report``)
        self.report: list = []
        state.busy_changed.connect(self._update_enabled)
        state.opened.connect(self._update_enabled)
        self._update_enabled()

    def _show_method_defaults(self, method: str) -> None:
        """The advanced form shows the chosen method's own defaults (one source: the config)."""
        from ...train.config import TrainConfig

        self.form.show_config(TrainConfig.for_method(method, iterations=self.iter_spin.value()))

    def _follow_iterations(self, iterations: int) -> None:
        """The burn-in keeps its share of the run when the iterations change: a burn-in
        derived from 500 iterations must not make a 20-iteration run all burn-in."""
        burn = self.form["burn_in"]
        share = burn.value() / max(1, self._iterations_shown)
        burn.setValue(max(0, min(iterations - 1, round(share * iterations))))
        self._iterations_shown = iterations

    def training_config(self):
        """The method's defaults, with the advanced settings laid over them when ticked."""
        from ...model.config import ModelConfig
        from ...train.config import TrainConfig, burn_in_for, default_init

        iterations = self.iter_spin.value()
        method = self.method_combo.currentText()
        values: dict = {
            "iterations": iterations,
            "warmup": min(100, iterations // 5),
            "model": {"backbone": self.backbone_combo.currentText()},
        }
        wants_nucleus = self.init_combo.currentText() == "nucleus model"
        values["init"] = default_init(ModelConfig(backbone=self.backbone_combo.currentText())) if wants_nucleus else "none"
        if self.minutes_spin.value() > 0:
            values["time_budget_s"] = 60.0 * self.minutes_spin.value()
        size = self.state.project.settings.get("pixel_size") if self.state.project is not None else None
        if isinstance(size, (int, float)):
            values["pixel_size"] = float(size)  # resampled to the start's scale (TrainConfig.model_pixel_size)
        if self.advanced.isChecked():
            values.update(self.form.values())
        elif self.state.model_state is not None:
            # warm start: the teacher is already trained; else the method's own rule
            values["burn_in"] = burn_in_for(iterations, warm_start=True)
            values["burn_in_fraction"] = 0.1
        cfg = TrainConfig.for_method(method, **values)
        if cfg.uses_teacher and cfg.burn_in >= cfg.iterations:
            # a time limit could end burn-in sooner, but a run this short never reaches it
            raise NapariRmtError(
                f"burn-in {cfg.burn_in} must be below the {cfg.iterations} iterations: every step would be "
                "burn-in and nothing semi-supervised (lower the burn-in in 'advanced')"
            )
        return cfg

    def train(self, config=None, synchronous: bool = False) -> None:
        """Start training on the labelled tiles; the others are the unlabelled data."""
        if self.state.session is None:
            self.state.report_error(NapariRmtError("open tiles first"))
            return
        if self.state.busy:
            show_info("training is already running")
            return
        self.state.session.pull()
        ts = self.state.project.tileset
        try:
            cfg = config or self.training_config()
            if not ts.labelled and not ts.partial:
                raise NapariRmtError(
                    "no annotated tiles: box some cells of each class (or tick 'This tile is fully "
                    "annotated' on the tiles you finished)"
                )
        except NapariRmtError as exc:
            self.state.report_error(exc)
            return
        from ..jobs import TrainingJob

        init = self.state.model_state
        if init is not None:
            from ...train.checkpoint import classes_from_checkpoint, config_from_checkpoint

            same = (
                classes_from_checkpoint(init).names == ts.classes.names
                and config_from_checkpoint(init).model == cfg.model
            )
            if not same:
                init = None  # another architecture or class list: start afresh
        folder = self.state.project.folder
        labelled, partial, held = ts.labelled, ts.partial, []
        if self.holdout_box.isChecked():
            kept, held = holdout_split([*labelled, *partial], HOLDOUT, cfg.seed)
            labelled, partial = [t for t in kept if t.is_labelled], [t for t in kept if t.is_partial]
        job = TrainingJob(
            labelled,
            ts.unlabelled,
            ts.classes,
            cfg,
            init_from=init,
            save_to=folder / MODEL if folder is not None else None,
            checkpoint_to=folder / TRAINING if folder is not None else None,
            partial=partial,
            held=held,
        )
        self.plot.reset()
        self.report = []
        self.state.warn("")  # the last run's warning is about the last run
        self.state.progress.emit(0, cfg.iterations, "training: steps")
        self.state.say(
            f"{cfg.method}: {len(ts.labelled)} fully annotated, {len(ts.partial)} partly annotated, "
            f"{len(ts.unlabelled)} unlabelled tiles"
            + (" (warm start)" if init is not None else "")
            + ("; the nucleus model looks at the partly annotated tiles first" if cfg.partial_cells and ts.partial
               else "")
        )
        self.state.start_job(job, self._on_yielded, self._on_returned, "training failed", synchronous)

    def cancel(self) -> None:
        self.state.cancel()

    def _on_yielded(self, ev) -> None:
        from ...train.events import IterationEvent, PhaseEvent
        from ..jobs import PredictProgress

        if isinstance(ev, IterationEvent):
            self.state.progress.emit(ev.iteration, ev.total, "training: steps")
            pseudo = (
                f", {sum(ev.pseudo_per_image) / len(ev.pseudo_per_image):.1f} pseudo-boxes/tile"
                if ev.pseudo_per_image
                else ""
            )
            self.state.say(
                f"{ev.phase}: iteration {ev.iteration}/{ev.total}, loss {ev.losses['total']:.3f}"
                f"{pseudo}, ETA {_eta(ev.eta)}"
            )
            self.plot.add(ev.iteration, ev.losses)
        elif isinstance(ev, PhaseEvent):
            # In the status line, not a notification: napari's toast over the canvas makes
            # software OpenGL redraw the whole scene (a 270-300 ms stall, measured).
            if ev.phase in ("semi-supervised", "stac-student"):
                self.plot.mark(ev.iteration, "burn-in ends")
            if ev.phase == "warning":
                self.state.warn(ev.message)  # kept in sight: the next step's line replaces this one
            self.state.say(ev.message)
        elif isinstance(ev, PredictProgress):
            self.state.say(f"predicting unlabelled tiles {ev.done}/{ev.total}")

    def _on_returned(self, result) -> None:
        self.plot.update()
        if result.cancelled:
            kept = "the previous model is kept" if self.state.model_state is not None else "there is no model yet"
            self.state.say(f"cancelled after {result.iterations} iterations; {kept}")
            return
        self.state.model_state = result.checkpoint
        # a run that ended on its time limit did fewer steps than planned: the bar ends full
        self.state.progress.emit(result.iterations, result.iterations, "training: steps")
        ts = self.state.project.tileset
        self.state.session.pull()
        for tile_id, boxes in result.predictions.items():
            tile = ts.by_id(tile_id)
            if not tile.is_labelled:
                # on a partial tile, cells boxed since the run started are not predicted again
                tile.predictions = boxes.not_covered_by(tile.boxes) if tile.is_partial else boxes
        self.state.session.refresh()
        if not len(self.state.session.tile.predictions) and result.predictions:
            # after a run, something new on screen: the tile whose predictions are most in doubt
            self.state.session.suggest_next()
            self.state.moved.emit()
        self.state.predictions_arrived.emit(list(result.predictions.values()))
        self.state.rows_changed.emit(True)
        n = sum(len(b) for b in result.predictions.values())
        self.state.say(
            f"done: {result.iterations} iterations; {n} predicted boxes on "
            f"{len(result.predictions)} unlabelled tiles"
        )
        if result.report:
            self.report = result.report
            self.state.say(
                "done; per class on held-out tiles: "
                + ", ".join(
                    f"{r.name} " + (f"F1 {r.f1:.2f}" if r.f1 is not None else
                                    f"recall {r.recall:.2f}" if r.recall is not None else "no box")
                    for r in result.report
                )
            )
        self.state.changed()


    def _update_enabled(self) -> None:
        self.train_btn.setEnabled(self.state.session is not None and not self.state.busy)
        self.cancel_btn.setEnabled(self.state.busy)


def _eta(seconds: float) -> str:
    s = int(max(0, seconds))
    return f"{s // 60}:{s % 60:02d}"
