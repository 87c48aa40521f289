"""The nucleus detector shipped inside the package (``model/weights/nucleus.pt``).

It finds nuclei of any type in H&E (one class, "nucleus"): boxes before the first
annotation, and the start of every training (backbone, FPN, RPN and box regression; the
classifier is made fresh for the user's classes). How it was trained, on what data and
under which license is in ``weights/README.md``. Nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path

#: The name that stands for the bundled model wherever a ``model.pt`` path is asked for.
NUCLEUS = "nucleus"
#: Said wherever the model is offered: the training data's license binds its use.
LICENSE_NOTE = (
    "trained on MoNuSeg (CC BY-NC-SA 4.0) and DSB2018 H&E (CC0): research and non-commercial use only"
)
#: The bundled model's pixel size (µm/px): MoNuSeg's fields are 40x scans at about 0.25
#: (``weights/README.md``). Its file states it too; files from before the setting did not,
#: so it is also stated here.
NUCLEUS_PIXEL_SIZE = 0.25


def nucleus_path() -> Path:
    """Where the bundled weights are, in a source tree or an installed wheel alike."""
    from importlib.resources import files

    return Path(str(files("napari_rmt.model").joinpath("weights", "nucleus.pt")))


def is_bundled(path: str | Path | None) -> bool:
    """Whether ``path`` is the bundled model's file."""
    if path is None:
        return False
    try:
        return Path(path).resolve() == nucleus_path().resolve()
    except OSError:
        return False


def resolve_model(path: str | Path) -> Path:
    """``"nucleus"`` (when no such file is in the current folder) is the bundled model."""
    if str(path) == NUCLEUS and not Path(path).exists():
        return nucleus_path()
    return Path(path)
