"""The status line and the progress bar, under every tab: what any job or action says."""

from __future__ import annotations

from qtpy.QtCore import Qt
from qtpy.QtWidgets import QLabel, QProgressBar, QVBoxLayout, QWidget

from ..state import AppState


class StatusPanel(QWidget):
    def __init__(self, state: AppState, parent=None) -> None:
        super().__init__(parent)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        self.progress = QProgressBar()
        self.progress.setFormat("%v / %m")
        layout.addWidget(self.progress)
        self.status = QLabel("")
        self.status.setWordWrap(True)
        # Room for three lines, always: a label that grows with its text makes the dock ask
        # napari's main window for a new layout, which redraws the whole canvas (a 320 ms
        # stall on software OpenGL, measured when training starts).
        self.status.setFixedHeight(3 * self.status.fontMetrics().lineSpacing() + 4)
        self.status.setAlignment(Qt.AlignmentFlag.AlignLeft | Qt.AlignmentFlag.AlignTop)
        layout.addWidget(self.status)
        # A warning of the last run (a class with no labelled box), in sight from every
        # tab until the next run: shown and hidden once per run at most, never per step.
        self.warning = QLabel("")
        self.warning.setWordWrap(True)
        self.warning.setStyleSheet("color: #ffb347;")
        self.warning.setAlignment(Qt.AlignmentFlag.AlignLeft | Qt.AlignmentFlag.AlignTop)
        self.warning.setVisible(False)
        layout.addWidget(self.warning)
        state.message.connect(self._show_message)
        state.warning.connect(self._show_warning)
        state.progress.connect(self._show_progress)

    def _show_message(self, text: str, error: bool) -> None:
        """Errors in red, not as a toast over the canvas; the whole text on hover."""
        self.status.setStyleSheet("color: #ff6b6b;" if error else "")
        self.status.setText(text)
        self.status.setToolTip(text)

    def _show_warning(self, text: str) -> None:
        self.warning.setText(f"warning: {text}" if text else "")
        self.warning.setToolTip(text)
        if self.warning.isHidden() == bool(text):  # a layout change only when it appears or goes
            self.warning.setVisible(bool(text))

    def _show_progress(self, done: int, total: int, what: str) -> None:
        """``what`` is "job: unit" ("Detect nuclei: tiles"): the bar reads "Detect nuclei:
        3 / 16 tiles"."""
        job, _, unit = what.rpartition(": ")
        self.progress.setFormat(f"{job}: %v / %m {unit}" if job else f"%v / %m {unit}".strip())
        self.progress.setMaximum(total)
        self.progress.setValue(done)
