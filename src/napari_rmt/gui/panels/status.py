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
        state.message.connect(self._show_message)
        state.progress.connect(self._show_progress)

    def _show_message(self, text: str, error: bool) -> None:
        """Errors in red, not as a toast over the canvas; the whole text on hover."""
        self.status.setStyleSheet("color: #ff6b6b;" if error else "")
        self.status.setText(text)
        self.status.setToolTip(text)

    def _show_progress(self, done: int, total: int) -> None:
        self.progress.setMaximum(total)
        self.progress.setValue(done)
