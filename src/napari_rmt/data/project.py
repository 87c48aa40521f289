"""A project folder: the tile set, its boxes and statuses, predictions and the model.

The folder is the user's safety net: the GUI autosaves into it as they work, so a crash
or a closed window loses nothing, and opening the folder again restores everything.

    project/
      project.json              the manifest: which files make the current state
      annotations.<n>.json      COCO of every tile (status in napari_rmt_status), manual boxes
      predictions.<n>.json      COCO results of the latest predictions (with scores)
      (the files of state n - 1: the backup, kept until state n + 1 is written)
      model.pt                  the latest trained model (written by the trainer)
      training.pt               the periodic checkpoint of a run in progress (only after a crash)
      images/                   pixels of tiles that came from memory (a napari image layer),
                                written once, so that the project reopens without the layer
      tissue.png                a slide's tissue mask as the user edited it (its downsample in
                                the manifest's settings)

One state is written as a unit: its files under new names first, then the manifest is
switched to them by an atomic rename. A crash at any point leaves the manifest naming a
complete earlier state (never accepted boxes counted again as predictions, as when the
two files were replaced one by one). Folders from before the manifest (``annotations.json``
and ``predictions.json``) still open, and are converted on the next save.
"""

from __future__ import annotations

import contextlib
import json
import os
import warnings
from pathlib import Path

from PIL import Image

from .atomic import atomic_write, atomic_write_json
from .coco import read_coco, write_coco
from .errors import AnnotationError, DataWarning, NapariRmtError
from .results import read_coco_results, write_coco_results
from .tiles import TileSet

MANIFEST = "project.json"
FORMAT = "napari-rmt-project"
IMAGES = "images"
ANNOTATIONS = "annotations.json"  # the files of a folder from before the manifest
PREDICTIONS = "predictions.json"
MODEL = "model.pt"
TRAINING = "training.pt"  # a running training's periodic checkpoint; left only by a crash


class Project:
    """A tile set bound to a folder it saves into."""

    def __init__(self, tileset: TileSet, folder: str | os.PathLike | None = None) -> None:
        self.tileset = tileset
        self.folder = Path(folder) if folder is not None else None
        #: What opening could not restore (a damaged file, a missing image), in words.
        self.problems: list[str] = []
        #: The user's view settings saved with the state (the review's score cut), JSON values.
        self.settings: dict = {}
        self._version = 0

    @property
    def model_path(self) -> Path | None:
        if self.folder is None:
            return None
        p = self.folder / MODEL
        return p if p.is_file() else None

    def save(self) -> Path:
        """Write the state as a unit (see the module's docstring); the previous state stays
        as a backup until the next save."""
        if self.folder is None:
            raise NapariRmtError("this project has no folder to save into; choose one first")
        self.folder.mkdir(parents=True, exist_ok=True)
        self._sweep()
        self._keep_pixels()
        manifest, _ = _manifest_or_rebuilt(self.folder)
        version = max(self._version, int(manifest.get("version", 0)) if manifest else 0) + 1
        ann, pred = f"annotations.{version}.json", f"predictions.{version}.json"
        write_coco(self.tileset, self.folder / ann)
        write_coco_results(self.tileset, self.folder / pred)
        previous = {k: manifest[k] for k in ("annotations", "predictions")} if manifest else None
        atomic_write_json(
            self.folder / MANIFEST,
            {"format": FORMAT, "version": version, "annotations": ann, "predictions": pred, "previous": previous,
             "settings": self.settings},
            indent=1,
        )
        self._version = version
        keep = {ann, pred, *(previous.values() if previous else ())}
        for old in [*self.folder.glob("annotations.*.json"), *self.folder.glob("predictions.*.json")]:
            if old.name not in keep:
                with contextlib.suppress(OSError):
                    old.unlink()
        for legacy in (ANNOTATIONS, PREDICTIONS):
            with contextlib.suppress(OSError):
                (self.folder / legacy).unlink()
        return self.folder

    def _sweep(self) -> None:
        """Remove the temporary files that a killed save left (its states are numbered, so
        no later save writes the same name and sweeps them): the project has one writer,
        this one, so none of them is a write in progress."""
        for pattern in (".annotations.*.json.*.tmp", ".predictions.*.json.*.tmp", f".{MANIFEST}.*.tmp"):
            for tmp in self.folder.glob(pattern):
                with contextlib.suppress(OSError):
                    tmp.unlink()

    def _keep_pixels(self) -> None:
        """Give every tile that has pixels only in memory a PNG in ``images/``.

        Without it such a tile is saved under its name alone ("layer [0]") and the
        project can never be reopened: its boxes become unreachable. The PNG holds the
        tile as the detector sees it (uint8 RGB, by the one reading rule), so a reopened
        tile trains and predicts exactly as before. A window of an in-memory large image
        becomes a plain tile with its origin kept, so its boxes still map back.
        """
        assert self.folder is not None
        for tile in self.tileset:
            if tile.path is not None or tile.loader is None:
                continue
            dest = self.folder / IMAGES / f"tile_{tile.id:06d}.png"
            pixels = tile.pixels()
            atomic_write(dest, lambda fh, a=pixels: Image.fromarray(a).save(fh, format="PNG"))
            tile.path = dest
            tile.window = False

    @classmethod
    def open(cls, folder: str | os.PathLike) -> Project:
        """Open what can be opened: the current state, else its backup; predictions that
        cannot be read and images that are missing are listed in ``problems`` (and
        warned about) instead of blocking the tiles and their annotations."""
        folder = Path(folder)
        manifest, rebuilt = _manifest_or_rebuilt(folder)
        problems: list[str] = [rebuilt] if rebuilt else []
        candidates: list[tuple[str, str | None]] = []
        if manifest:
            candidates.append((manifest["annotations"], manifest.get("predictions")))
            if manifest.get("previous"):
                candidates.append((manifest["previous"]["annotations"], manifest["previous"].get("predictions")))
        if (folder / ANNOTATIONS).is_file():
            candidates.append((ANNOTATIONS, PREDICTIONS))
        if not candidates:
            raise NapariRmtError(f"{folder}: not a napari-rmt project (no {MANIFEST} or {ANNOTATIONS})")
        tileset, errors = None, []
        ann_name, pred_name = candidates[0]
        for ann_name, pred_name in candidates:  # noqa: B007 (the pair that opened is used below)
            try:
                # its own file: tiles may lie elsewhere (absolute paths are what it saved)
                tileset = read_coco(folder / ann_name, check_files=False, allow_outside=True)
                break
            except NapariRmtError as exc:
                errors.append(str(exc))
        if tileset is None:
            raise NapariRmtError(f"{folder}: no readable annotations: " + " | ".join(errors))
        if errors:
            problems.append(f"the latest annotations could not be read ({errors[0]}); opened the backup {ann_name}")
        if pred_name and (folder / pred_name).is_file():
            try:
                read_coco_results(folder / pred_name, tileset)
            except NapariRmtError as exc:
                problems.append(f"predictions not restored: {exc}")
        elif pred_name and pred_name != PREDICTIONS:
            problems.append(f"predictions not restored: {pred_name}, which the project names, is missing")
        missing = [t for t in tileset if t.path is not None and not Path(t.path).exists()]
        if missing:
            names = ", ".join(str(t.path) for t in missing[:5]) + (" …" if len(missing) > 5 else "")
            problems.append(f"{len(missing)} image(s) missing, their boxes kept: {names}")
        for p in problems:
            warnings.warn(DataWarning(f"{folder}: {p}"), stacklevel=2)
        project = cls(tileset, folder)
        project.problems = problems
        settings = manifest.get("settings") if manifest else None
        project.settings = dict(settings) if isinstance(settings, dict) else {}
        project._version = int(manifest.get("version", 0)) if manifest else 0
        return project

    @staticmethod
    def is_project(folder: str | os.PathLike) -> bool:
        folder = Path(folder)
        return (folder / MANIFEST).is_file() or (folder / ANNOTATIONS).is_file() or bool(_states(folder))


def _read_manifest(folder: Path) -> dict | None:
    path = folder / MANIFEST
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise AnnotationError(f"{path}: damaged project manifest ({exc})") from exc
    if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("annotations"), str):
        raise AnnotationError(f"{path}: not a napari-rmt project manifest")
    version, previous = data.get("version", 0), data.get("previous")
    if not isinstance(version, int) or isinstance(version, bool) or version < 0:
        raise AnnotationError(f"{path}: version {version!r} is not a whole number")
    if previous is not None and not isinstance(previous, dict):
        raise AnnotationError(f"{path}: previous {previous!r} is not a pair of files")
    for name in (data["annotations"], data.get("predictions"), *((previous or {}).values())):
        # the project's own files only: a manifest never sends the reader outside its folder
        if name is not None and (not isinstance(name, str) or Path(name).name != name or name in ("", ".", "..")):
            raise AnnotationError(f"{path}: {name!r} is not a file of the project folder")
    return data


def _states(folder: Path) -> list[int]:
    """The numbers n of the ``annotations.<n>.json`` files in ``folder``, highest first."""
    out = []
    for p in folder.glob("annotations.*.json"):
        middle = p.name[len("annotations."):-len(".json")]
        if middle.isdigit():
            out.append(int(middle))
    return sorted(out, reverse=True)


def _manifest_or_rebuilt(folder: Path) -> tuple[dict | None, str | None]:
    """The manifest, or, when it is missing, empty or damaged while state files are there,
    one rebuilt from the newest ``annotations.<n>.json`` (and the one before as its backup),
    with a sentence saying so. A folder with neither gives (None, None)."""
    try:
        manifest = _read_manifest(folder)
        damage = None
    except AnnotationError as exc:
        manifest, damage = None, str(exc)
    if manifest is not None:
        return manifest, None
    states = _states(folder)
    if not states:
        if damage:
            raise AnnotationError(damage)
        return None, None

    def pair(n: int) -> dict:
        pred = f"predictions.{n}.json"
        return {"annotations": f"annotations.{n}.json", "predictions": pred if (folder / pred).is_file() else None}

    rebuilt = {"format": FORMAT, "version": states[0], **pair(states[0]),
               "previous": pair(states[1]) if len(states) > 1 else None}
    why = damage or f"{folder / MANIFEST} is missing"
    return rebuilt, f"{why}; rebuilt from annotations.{states[0]}.json (the next save writes a new manifest)"
