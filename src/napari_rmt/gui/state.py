"""What the widget's panels share: the open project, its session, the model, the running job.

Panels never call each other: they change the state and the state tells every panel
through its signals (a tileset opened, the current tile moved, tiles edited, a job
started or ended, a message to show). A panel can so be added, removed or tested alone.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from napari.utils.notifications import show_info
from qtpy.QtCore import QObject, QTimer, Signal

from ..data.errors import NapariRmtError
from ..data.project import Project
from ..data.tiles import TileSet
from .layers import camera_of
from .session import Session


class AppState(QObject):
    #: A tileset was opened: a new project and session (panels rebuild their lists).
    opened = Signal()
    #: Same project, new session (a class was added): key bindings and class lists renew.
    session_rebuilt = Signal()
    #: The current tile changed.
    moved = Signal()
    #: Tiles' boxes or status changed: True for every row, False for the current tile's.
    rows_changed = Signal(bool)
    #: A job started or ended.
    busy_changed = Signal()
    #: New predictions arrived on tiles (their ``Boxes``): the review panel sets its cut.
    predictions_arrived = Signal(object)
    #: A line for the status area: (text, is_error).
    message = Signal(str, bool)
    #: A warning that stays in sight until replaced ("" clears it): the status line is
    #: overwritten at every training iteration.
    warning = Signal(str)
    #: A job's progress: (done, total, what is counted: "Detect nuclei: tiles",
    #: "training: steps"), so that the bar never shows a bare "1 / 1".
    progress = Signal(int, int, str)
    #: the box under the pointer on the active boxes layer, in words ("" when none)
    hovered = Signal(str)

    def __init__(self, viewer, projects_root: Path, parent=None) -> None:
        super().__init__(parent)
        self.viewer = viewer
        self.projects_root = projects_root
        self.project: Project | None = None
        self.session: Session | None = None
        self.model_state: dict | None = None  # the latest trained checkpoint, in memory
        self.whole = None  # WholeImageView when the tiles are windows of a large image
        self.worker = None
        self.job = None
        self.last_error: str | None = None
        self.last_warning = ""
        self._autosave = QTimer(self)
        self._autosave.setSingleShot(True)
        self._autosave.setInterval(1000)
        self._autosave.timeout.connect(self.save_project)
        camera_of(viewer).events.zoom.connect(self._on_zoom)

    def _new_session(self) -> Session:
        return Session(self.viewer, self.project, on_change=self.changed, on_hover=self.hovered.emit)

    def _on_zoom(self, _event=None) -> None:
        if self.session is not None:
            self.session.fit_edges()

    # ------------------------------------------------------------------ messages
    @property
    def busy(self) -> bool:
        return self.worker is not None

    def say(self, text: str) -> None:
        """A message in the status area; it also clears an error shown there before (the
        next thing that works replaces the last thing that failed)."""
        self.last_error = None
        self.message.emit(text, False)

    def warn(self, text: str) -> None:
        """A warning under the status line, kept until the next one ("": none)."""
        self.last_warning = text
        self.warning.emit(text)

    def report_error(self, exc: Exception, prefix: str = "error") -> None:
        """An error in the status area (red), not a toast over the canvas."""
        msg = f"{prefix}: {exc}"
        self.last_error = msg
        self.message.emit(msg, True)

    def guarded(self, fn: Callable[[], Any]) -> None:
        """Run an action; a user error is shown, and a success clears an earlier one."""
        try:
            fn()
        except (NapariRmtError, OSError) as exc:
            self.report_error(exc)
            return
        if self.last_error is not None:
            self.say("")

    # ------------------------------------------------------------------ project
    def open(self, tileset: TileSet, name: str, folder: Path | None = None, settings: dict | None = None) -> None:
        """Make ``tileset`` the open project (in ``folder``, or a fresh one, with the view
        ``settings`` it was saved with) and show it."""
        if len(tileset) == 0:
            raise NapariRmtError("there are no tiles to open")
        self.flush()
        folder = folder or self.projects_root / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
        self.project = Project(tileset, folder)
        self.project.settings = dict(settings or {})
        self.model_state = None
        self.session = self._new_session()
        self._attach_whole(tileset)
        self.warn("")  # a warning was about the last project's run
        self.opened.emit()
        self.busy_changed.emit()
        self.save_project()

    def rebuild_session(self, pull: bool = True) -> None:
        """A new session on the same project (the layers' categorical features need a new
        class). ``pull=False`` when the store already holds everything (an import)."""
        index = self.session.index
        if pull:
            self.session.pull()
        self.session = self._new_session()
        self.session.show_tile(index)
        self.session_rebuilt.emit()

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
            show_info(f"tiles come from {len(sources)} large images; the overview shows {windows[0].path.name}")
        image = cached_large_image(str(windows[0].path))
        self.whole = WholeImageView(
            self.viewer, image, tileset.classes, tissue=self._saved_tissue(image), on_tissue_edited=self._save_tissue
        )
        self.refresh_grid()
        self.session.frame_tile()

    #: the project's file of an edited tissue mask (its downsample in the settings)
    TISSUE_FILE = "tissue.png"

    def _saved_tissue(self, image):
        """The project's edited tissue mask of ``image``, if it has one (else None: computed)."""
        from ..data.tissue import load_mask

        saved = self.project.settings.get("tissue") if self.project is not None else None
        folder = self.project.folder if self.project is not None else None
        if not isinstance(saved, dict) or saved.get("image") != image.name or folder is None:
            return None
        path = folder / self.TISSUE_FILE
        if not path.is_file():
            return None
        try:
            return load_mask(path, float(saved.get("downsample", 1.0)))
        except (NapariRmtError, OSError, ValueError) as exc:
            self.report_error(exc, prefix="the edited tissue mask is not used")
            return None

    def _save_tissue(self, tissue) -> None:
        """An edit of the tissue layer is saved in the project at once (its own file)."""
        from ..data.tissue import save_mask

        if self.project is None or self.project.folder is None or self.whole is None:
            return
        try:
            save_mask(tissue, self.project.folder / self.TISSUE_FILE)
        except OSError as exc:
            self.report_error(exc, prefix="the edited tissue mask could not be saved")
            return
        self.project.settings["tissue"] = {"image": self.whole.image.name, "downsample": tissue.downsample}
        self.changed()

    def refresh_grid(self) -> None:
        """The large image's grid shows each tile's status."""
        if self.whole is not None:
            path = str(self.whole.image.path)
            self.whole.show_grid([t for t in self.project.tileset if t.window and str(t.path) == path])

    # ------------------------------------------------------------------ persistence
    def changed(self) -> None:
        self._autosave.start()

    def save_project(self) -> None:
        if self.session is None:
            return
        self._autosave.stop()
        try:
            self.session.pull()
            self.project.save()
        except OSError as exc:
            # a full disk or a folder one may not write: the state stays in memory and the
            # folder keeps its last whole save (a save switches to the new state in one step)
            where = exc.filename or self.project.folder
            self.report_error(NapariRmtError(
                f"{exc.strerror or exc} writing {where}; nothing is lost: your work is kept here and the project "
                "folder keeps its last complete save. Free space (or fix the permission): the next change saves again"
            ), prefix="autosave failed")
        except NapariRmtError as exc:
            self.report_error(exc, prefix="autosave failed")

    def flush(self) -> None:
        if self.session is not None and self._autosave.isActive():
            self.save_project()

    # ------------------------------------------------------------------ jobs
    def refuse_if_busy(self) -> bool:
        """True (and the user told so) while a job runs: callers stop before doing any work."""
        if self.busy:
            show_info("busy: wait for the running job or cancel it")
        return self.busy

    def start_job(
        self,
        job,
        on_yielded: Callable[[Any], None],
        on_returned: Callable[[Any], None],
        error_prefix: str,
        synchronous: bool = False,
    ) -> bool:
        """Run ``job.run`` off the GUI thread (here when ``synchronous``); one job at a time."""
        if self.refuse_if_busy():
            return False
        from .jobs import run_job

        self.job = job
        self.last_error = None
        worker = run_job(
            job.run, on_yielded, on_returned, lambda exc: self.report_error(exc, prefix=error_prefix),
            self._on_finished, synchronous,
        )
        if worker is not None:
            self.worker = worker
            self.busy_changed.emit()
            worker.start()
        return True

    def cancel(self) -> None:
        if self.job is not None:
            self.job.cancel()
        if self.worker is not None:
            self.say("cancelling…")

    def _on_finished(self) -> None:
        self.worker = None
        self.job = None
        self.busy_changed.emit()
