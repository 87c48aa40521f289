"""The training panel's advanced form, generated from the core's table of settings.

``train.config.TUNABLES`` gives each setting's label, range and help; the command line
builds its options from the same table, so the two front ends offer the same settings
with the same ranges, and a new setting needs one row there, none here.
"""

from __future__ import annotations

from typing import Any

from qtpy.QtWidgets import QCheckBox, QComboBox, QFormLayout, QWidget

from ...train.tunables import TUNABLES, Tunable
from .common import dspin, spin


class TunableForm(QWidget):
    """One widget per ``Tunable``; ``show`` fills them from a config, ``values`` reads them."""

    def __init__(self, parent=None) -> None:
        super().__init__(parent)
        layout = QFormLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        self.widgets: dict[str, QWidget] = {}
        for t in TUNABLES:
            w = _make(t)
            w.setToolTip(t.help)
            self.widgets[t.name] = w
            layout.addRow("" if t.kind == "bool" else t.label, w)

    def __getitem__(self, name: str) -> QWidget:
        return self.widgets[name]

    def show_config(self, cfg: Any) -> None:
        for t in TUNABLES:
            _set(self.widgets[t.name], t, getattr(cfg, t.name))

    def values(self) -> dict[str, Any]:
        """The form's settings as ``TrainConfig`` fields."""
        out: dict[str, Any] = {}
        for t in TUNABLES:
            value = _get(self.widgets[t.name], t)
            out[t.name] = value
            out.update(dict.fromkeys(t.also, value))
        return out


def _make(t: Tunable) -> QWidget:
    if t.kind == "bool":
        return QCheckBox(t.label)
    if t.kind == "choice":
        w = QComboBox()
        w.addItems(t.choices)
        return w
    if t.kind == "int":
        return spin(int(t.low), int(t.high), int(t.low))
    w = dspin(t.low, t.high, t.low, t.step, decimals=t.decimals)
    if t.optional:
        w.setSpecialValueText("off")  # shown at the lowest value, which means None
    return w


def _set(w: QWidget, t: Tunable, value: Any) -> None:
    if t.kind == "bool":
        w.setChecked(bool(value))
    elif t.kind == "choice":
        w.setCurrentText(value)
    else:
        w.setValue(t.low if value is None else value)


def _get(w: QWidget, t: Tunable) -> Any:
    if t.kind == "bool":
        return w.isChecked()
    if t.kind == "choice":
        return w.currentText()
    value = w.value()
    if t.optional and value <= t.low:
        return None
    return value
