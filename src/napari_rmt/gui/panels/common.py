"""Small Qt helpers the panels share."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from qtpy.QtWidgets import QDoubleSpinBox, QFileDialog, QSpinBox, QWidget

from ..state import AppState


def spin(lo: int, hi: int, value: int) -> QSpinBox:
    w = QSpinBox()
    w.setRange(lo, hi)
    w.setValue(value)
    return w


def dspin(lo: float, hi: float, value: float, step: float, decimals: int = 2) -> QDoubleSpinBox:
    w = QDoubleSpinBox()
    w.setDecimals(decimals)
    w.setRange(lo, hi)
    w.setSingleStep(step)
    w.setValue(value)
    return w


def ask_save(parent: QWidget, state: AppState, title: str, filt: str, write: Callable[[str], Path]) -> None:
    """Ask where to write, then ``write_and_say`` there."""
    if state.session is None:
        return
    f, _ = QFileDialog.getSaveFileName(parent, title, filter=filt)
    if f:
        write_and_say(state, write, f)


def write_and_say(state: AppState, write: Callable[[str], Path], path: str) -> None:
    """Write, and say where it went in the status line (a toast would cover the tile's
    caption); an error goes there too."""
    state.guarded(lambda: state.say(f"wrote {write(path)}"))
