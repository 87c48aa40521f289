"""Reviewing predictions: the score cut, accepting, and boxes from the bundled nucleus model."""

from __future__ import annotations

import numpy as np
from qtpy.QtCore import Qt
from qtpy.QtWidgets import QDoubleSpinBox, QGroupBox, QHBoxLayout, QLabel, QPushButton, QSlider, QVBoxLayout

from ...data.errors import NapariRmtError
from ...data.scale import PLAUSIBLE
from ...model.bundled import LICENSE_NOTE
from ..state import AppState

HOVER_HINT = "point at a box for its class and score"
#: Where the slider (in hundredths) starts after Detect nuclei with a calibrated model: the
#: cut its scores were fitted to (``evaluate.calibration``), unless the user had it lower.
CALIBRATED_CUT = 50
#: Keys of the review loop, bound on the viewer: key -> (method of the panel, its arguments).
SHORTCUTS = {
    "Shift-A": ("accept_tile",),
    "Shift-Right": ("go", 1),
    "Shift-Left": ("go", -1),
    "Shift-N": ("suggest_next",),
}


class ReviewPanel(QGroupBox):
    def __init__(self, state: AppState, current_class, parent=None) -> None:
        """``current_class()`` is the class new boxes get (the classes panel's choice)."""
        super().__init__("Review predictions", parent)
        self.state = state
        self.current_class = current_class
        rl = QVBoxLayout(self)
        row = QHBoxLayout()
        self.score_label = QLabel("score > 0.50")
        self.score_slider = QSlider(Qt.Orientation.Horizontal)
        self.score_slider.setRange(0, 100)
        self.score_slider.setValue(50)
        self.score_slider.valueChanged.connect(self._on_score)
        row.addWidget(self.score_label)
        row.addWidget(self.score_slider, 1)
        rl.addLayout(row)
        self.hover_label = QLabel(HOVER_HINT)
        self.hover_label.setToolTip("the box under the pointer (on the selected boxes layer)")
        rl.addWidget(self.hover_label)
        state.hovered.connect(lambda text: self.hover_label.setText(text or HOVER_HINT))
        row = QHBoxLayout()
        self.accept_tile_btn = QPushButton("Accept tile")
        self.accept_tile_btn.setToolTip(
            "(Shift+A) Shown predictions become annotations and the tile becomes partly annotated (cells without "
            "a box are not taught as background); tick 'This tile is fully annotated' once every cell "
            "has a box. Predictions hidden by the score cut stay predictions"
        )
        self.accept_tile_btn.clicked.connect(self.accept_tile)
        self.accept_sel_btn = QPushButton("Accept selected")
        self.accept_sel_btn.clicked.connect(self.accept_selected)
        row.addWidget(self.accept_tile_btn)
        row.addWidget(self.accept_sel_btn)
        rl.addLayout(row)
        # moving on without a trip back to the Tiles tab
        row = QHBoxLayout()
        self.prev_btn = QPushButton("◀")
        self.prev_btn.setToolTip("previous tile (Shift+←)")
        self.prev_btn.clicked.connect(lambda: self.go(-1))
        self.next_btn = QPushButton("▶")
        self.next_btn.setToolTip("next tile (Shift+→)")
        self.next_btn.clicked.connect(lambda: self.go(1))
        self.suggest_btn = QPushButton("Suggest next")
        self.suggest_btn.setToolTip("go to the tile whose predictions the model is least sure of (Shift+N)")
        self.suggest_btn.clicked.connect(self.suggest_next)
        for b in (self.prev_btn, self.next_btn):
            row.addWidget(b)
        row.addWidget(self.suggest_btn, 1)
        rl.addLayout(row)
        row = QHBoxLayout()
        self.detect_btn = QPushButton("Detect nuclei")
        self.detect_btn.setToolTip(
            "Boxes from the bundled nucleus model on this tile, as predictions of the selected class: "
            "change a box's class with 1-9, then accept. The model was " + LICENSE_NOTE
        )
        self.detect_btn.clicked.connect(lambda: self.detect_nuclei(all_empty=False))
        self.detect_all_btn = QPushButton("… on all empty tiles")
        self.detect_all_btn.setToolTip("The same on every tile with no annotation and no prediction")
        self.detect_all_btn.clicked.connect(lambda: self.detect_nuclei(all_empty=True))
        row.addWidget(self.detect_btn)
        row.addWidget(self.detect_all_btn)
        rl.addLayout(row)
        row = QHBoxLayout()
        row.addWidget(QLabel("pixel size"))
        self.pixel_spin = QDoubleSpinBox()
        self.pixel_spin.setRange(0.0, PLAUSIBLE[1])
        self.pixel_spin.setDecimals(3)
        self.pixel_spin.setSingleStep(0.05)
        self.pixel_spin.setSuffix(" µm/px")
        self.pixel_spin.setSpecialValueText("not set: tiles as they are")
        self.pixel_spin.setToolTip(
            "How many micrometres one pixel of these tiles spans (about 0.25 at 40x, 0.5 at 20x; your "
            "scanner's metadata or QuPath's Image tab says). Set it when the tiles are not 40x: the nucleus "
            "model (trained at 0.25) then sees them resampled to its scale and finds many more nuclei; "
            "training records it as the model's own. Saved with the project."
        )
        self.pixel_spin.valueChanged.connect(self._on_pixel_size)
        row.addWidget(self.pixel_spin, 1)
        rl.addLayout(row)
        state.moved.connect(self.update_score_label)
        state.opened.connect(self._restore_cut)
        # review without the mouse: the viewer's keys (the layers keep 1-9 for classes)
        for key, action in SHORTCUTS.items():
            state.viewer.bind_key(key, lambda _viewer, a=action: getattr(self, a[0])(*a[1:]), overwrite=True)
        state.predictions_arrived.connect(self._on_predictions)
        state.busy_changed.connect(self._update_enabled)
        self._update_enabled()

    # ------------------------------------------------------------------ the score cut
    def _restore_cut(self) -> None:
        """A reopened project shows its predictions at the cut it was left at."""
        settings = self.state.project.settings
        cut = settings.get("score_cut")
        if isinstance(cut, (int, float)) and 0 <= cut <= 1:
            self.score_slider.setValue(round(100 * cut))
        size = settings.get("pixel_size")
        valid = isinstance(size, (int, float)) and PLAUSIBLE[0] <= size <= PLAUSIBLE[1]
        self.pixel_spin.blockSignals(True)
        self.pixel_spin.setValue(float(size) if valid else 0.0)
        self.pixel_spin.blockSignals(False)

    def _on_pixel_size(self, value: float) -> None:
        if self.state.project is None:
            return
        if value < PLAUSIBLE[0]:
            self.state.project.settings.pop("pixel_size", None)
        else:
            self.state.project.settings["pixel_size"] = round(float(value), 4)  # saved with the next autosave

    def _on_score(self, value: int) -> None:
        state = self.state
        if state.project is not None:
            state.project.settings["score_cut"] = value / 100  # saved with the next autosave
        if state.session is not None:
            state.session.set_score_threshold(value / 100)
        self.update_score_label()
        if state.whole is not None and len(state.whole.boxes):
            state.whole.show_predictions(score_threshold=value / 100)

    def update_score_label(self) -> None:
        """The cut and how many of this tile's predictions it hides: nothing hides silently."""
        text = f"score > {self.score_slider.value() / 100:.2f}"
        if self.state.session is not None:
            hidden = len(self.state.session._hidden_predictions)
            text += f" · {hidden} hidden" if hidden else ""
        self.score_label.setText(text)

    def _on_predictions(self, predictions) -> None:
        self.score_slider.setValue(self.start_cut(predictions))
        self.update_score_label()

    def start_cut(self, predictions) -> int:
        """Where the slider starts after a run: the cut that shows as many boxes as the
        model expects cells (the sum of its scores, which a calibrated model makes the
        expected count), so that a short run's low scores do not leave the canvas empty."""
        scores = np.sort(np.concatenate([b.scores for b in predictions] or [np.zeros(0)]))[::-1]
        expected = round(float(scores.sum())) if scores.size else 0
        if expected < 1:
            return self.score_slider.value()
        cut = float(scores[min(expected, scores.size) - 1])
        return max(0, min(self.score_slider.value(), int(100 * cut) - 1))

    # ------------------------------------------------------------------ moving
    def go(self, step: int) -> None:
        if self.state.session is not None:
            self.state.session.next_tile(step)
            self.state.moved.emit()

    def suggest_next(self) -> None:
        if self.state.session is not None:
            if self.state.session.suggest_next() is None:
                self.state.say("no tile left to review")
            else:
                self.state.say(self.state.session.suggestion)
            self.state.moved.emit()

    # ------------------------------------------------------------------ accepting
    def accept_tile(self) -> int:
        state = self.state
        if state.session is None:
            return 0
        try:
            n = state.session.accept_tile()
        except NapariRmtError as exc:
            state.report_error(exc, prefix="nothing accepted")
            return 0
        hidden = state.session.hidden_kept
        if state.session.tile.is_partial:
            state.say(
                f"accepted {n} boxes; the tile is partly annotated: cells without a box are not taught as "
                "background. Tick 'This tile is fully annotated' once every cell has one"
                + (f" ({hidden} predictions below the score cut are kept as predictions)" if hidden else "")
            )
        elif hidden:
            state.say(
                f"accepted {n} boxes; {hidden} predictions below the score cut are "
                "kept as predictions (lower the cut to see them)"
            )
        state.rows_changed.emit(False)
        state.refresh_grid()
        return n

    def accept_selected(self) -> int:
        if self.state.session is None:
            return 0
        n = self.state.session.accept_selected()
        self.state.rows_changed.emit(False)
        return n

    # ------------------------------------------------------------------ bundled nucleus model
    def detect_nuclei(self, all_empty: bool = False, synchronous: bool = False) -> None:
        """Boxes from the bundled nucleus model: on this tile (its predictions are replaced),
        or on every tile with no annotation and no prediction (nothing else is touched)."""
        state = self.state
        if state.session is None:
            state.report_error(NapariRmtError("open tiles first"))
            return
        if state.refuse_if_busy():
            return
        state.session.pull()
        ts = state.project.tileset
        if all_empty:
            tiles = [t for t in ts if not len(t.boxes) and not len(t.predictions)]
            if not tiles:
                state.say("no empty tile: every tile has annotations or predictions already")
                return
        else:
            tile = state.session.tile
            if len(tile.boxes):
                state.report_error(NapariRmtError(
                    f"{tile.name} has {len(tile.boxes)} annotations already; Detect nuclei is for tiles "
                    "without any (its boxes would sit on top of yours)"
                ))
                return
            tiles = [tile]
        from ..jobs import NucleusJob

        name = self.current_class() or ts.classes.names[0]
        self._detect_class = name
        state.progress.emit(0, len(tiles), "Detect nuclei: tiles")
        state.say(f"detecting nuclei on {len(tiles)} tile{'s' if len(tiles) > 1 else ''}…")
        job = NucleusJob(tiles, ts.classes.by_name(name).id, pixel_size=state.project.settings.get("pixel_size"))
        state.start_job(
            job,
            lambda msg: state.progress.emit(msg.done, msg.total, "Detect nuclei: tiles"),
            lambda result: self._on_detected(result, job.calibration),
            "Detect nuclei failed",
            synchronous,
        )

    def _on_detected(self, result, calibration: dict | None = None) -> None:
        state = self.state
        if result is None:
            state.say("Detect nuclei cancelled")
            return
        ts = state.project.tileset
        state.session.pull()
        for tile_id, boxes in result.items():
            tile = ts.by_id(tile_id)
            if not len(tile.boxes):  # the user may have drawn meanwhile: never cover that
                tile.predictions = boxes
        state.session.refresh()
        # a calibrated model's scores were fitted so that 0.5 is its best cut on nuclei it
        # never saw: the review starts there; otherwise from the scores' sum
        if calibration:
            self.score_slider.setValue(min(self.score_slider.value(), CALIBRATED_CUT))
        else:
            self.score_slider.setValue(self.start_cut(result.values()))
        self.update_score_label()
        state.rows_changed.emit(True)
        cut = self.score_slider.value() / 100
        n = sum(int((b.scores > cut).sum()) for b in result.values())
        why = " (the model's calibrated cut)" if calibration and self.score_slider.value() == CALIBRATED_CUT else ""
        state.say(
            f"{n} nuclei above score {cut:.2f}{why} on {len(result)} tile{'s' if len(result) > 1 else ''}, "
            f"as {self._detect_class}: "
            "select a box and press 1-9 for its class, then Accept tile"
        )
        state.changed()

    def _update_enabled(self) -> None:
        has, running = self.state.session is not None, self.state.busy
        for w in (self.accept_tile_btn, self.accept_sel_btn, self.score_slider, self.prev_btn, self.next_btn,
                  self.suggest_btn):
            w.setEnabled(has)
        self.detect_btn.setEnabled(has and not running)
        self.detect_all_btn.setEnabled(has and not running)
