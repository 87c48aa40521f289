"""Cell classes with stable ids and fixed colours.

Ids are stable so that a COCO export of the same project always uses the same
``category_id`` and a trained model's output index keeps meaning the same class.
Colours are fixed per class (never derived from sorted names, as napari's colour
cycles do), and the paper's figures fix the defaults: tumor red, stromal green,
lymphocyte blue.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace

from .errors import ClassListError

RGB = tuple[int, int, int]

#: Colours for well-known class names (lower case). CoNSeP's names map onto the
#: paper's: epithelial ~ tumor, spindle ~ stromal, inflammatory ~ lymphocyte.
KNOWN_COLOURS: dict[str, RGB] = {
    "tumor": (230, 25, 25),
    "epithelial": (230, 25, 25),
    "stromal": (30, 180, 40),
    "spindle": (30, 180, 40),
    "lymphocyte": (40, 80, 235),
    "inflammatory": (40, 80, 235),
    "other": (235, 200, 20),
    "miscellaneous": (235, 200, 20),
    "nucleus": (0, 200, 200),
}

#: Colours handed out, in order, to classes whose name is not known above.
PALETTE: tuple[RGB, ...] = (
    (255, 127, 14),
    (148, 103, 189),
    (23, 190, 207),
    (227, 119, 194),
    (140, 86, 75),
    (188, 189, 34),
    (127, 127, 127),
    (0, 128, 128),
)

DEFAULT_CLASS_NAMES = ("tumor", "stromal", "lymphocyte")


def _check_rgb(colour: Iterable[int], name: str) -> RGB:
    try:
        rgb = tuple(int(c) for c in colour)
    except (TypeError, ValueError) as exc:
        raise ClassListError(f"class {name!r}: colour {colour!r} is not three integers") from exc
    if len(rgb) != 3 or not all(0 <= c <= 255 for c in rgb):
        raise ClassListError(f"class {name!r}: colour {colour!r} must be three values in 0..255")
    return rgb  # type: ignore[return-value]


@dataclass(frozen=True)
class CellClass:
    """One class: the id is what files and models store, the name is what users see."""

    id: int
    name: str
    colour: RGB

    @property
    def hex(self) -> str:
        return "#{:02x}{:02x}{:02x}".format(*self.colour)

    @property
    def rgba(self) -> tuple[float, float, float, float]:
        """The colour as napari wants it: floats in 0..1 with opaque alpha."""
        r, g, b = self.colour
        return (r / 255.0, g / 255.0, b / 255.0, 1.0)


class ClassList:
    """An ordered set of classes, unique by id and by name (case-insensitive).

    The order is the user's (the order of the picker and of the model's outputs);
    ids are whatever the dataset brought, or 1, 2, 3... for new projects.
    """

    def __init__(self, classes: Iterable[CellClass] = ()) -> None:
        self._classes: list[CellClass] = []
        for c in classes:
            self._append(c)

    @classmethod
    def default(cls) -> ClassList:
        return cls.from_names(DEFAULT_CLASS_NAMES)

    @classmethod
    def from_names(cls, names: Iterable[str]) -> ClassList:
        out = cls()
        for name in names:
            out.add(name)
        return out

    # -- reading -----------------------------------------------------------------
    def __iter__(self) -> Iterator[CellClass]:
        return iter(self._classes)

    def __len__(self) -> int:
        return len(self._classes)

    def __contains__(self, key: object) -> bool:
        if isinstance(key, str):
            return self._find_name(key) is not None
        if isinstance(key, int):
            return any(c.id == key for c in self._classes)
        return False

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ClassList) and self._classes == other._classes

    def __repr__(self) -> str:
        return f"ClassList({[(c.id, c.name) for c in self._classes]})"

    @property
    def names(self) -> list[str]:
        return [c.name for c in self._classes]

    @property
    def ids(self) -> list[int]:
        return [c.id for c in self._classes]

    def by_id(self, class_id: int) -> CellClass:
        for c in self._classes:
            if c.id == class_id:
                return c
        raise ClassListError(f"unknown class id {class_id!r}; known ids: {self.ids}")

    def by_name(self, name: str) -> CellClass:
        c = self._find_name(name)
        if c is None:
            raise ClassListError(f"unknown class name {name!r}; known classes: {self.names}")
        return c

    def index_of(self, class_id: int) -> int:
        """Position of a class in the list: the model's label is this index + 1."""
        for i, c in enumerate(self._classes):
            if c.id == class_id:
                return i
        raise ClassListError(f"unknown class id {class_id!r}; known ids: {self.ids}")

    # -- editing -----------------------------------------------------------------
    def add(self, name: str, colour: Iterable[int] | None = None, id: int | None = None) -> CellClass:
        """Add a class; the id defaults to one past the largest, the colour by name."""
        name = self._check_name(name)
        if id is None:
            id = max(self.ids, default=0) + 1
        if colour is None:
            colour = self._default_colour(name)
        new = CellClass(int(id), name, _check_rgb(colour, name))
        self._append(new)
        return new

    def rename(self, class_id: int, new_name: str) -> CellClass:
        old = self.by_id(class_id)
        new_name = self._check_name(new_name, ignore_id=class_id)
        return self._swap(old, replace(old, name=new_name))

    def recolour(self, class_id: int, colour: Iterable[int]) -> CellClass:
        old = self.by_id(class_id)
        return self._swap(old, replace(old, colour=_check_rgb(colour, old.name)))

    def copy(self) -> ClassList:
        return ClassList(self._classes)

    def to_json(self) -> list[dict]:
        return [{"id": c.id, "name": c.name, "color": c.hex} for c in self._classes]

    @classmethod
    def from_json(cls, records: Iterable[dict]) -> ClassList:
        """The inverse of ``to_json`` (checkpoints and layer metadata store classes this way)."""
        try:
            return cls(
                CellClass(
                    int(r["id"]), str(r["name"]), tuple(int(r["color"][k : k + 2], 16) for k in (1, 3, 5))
                )
                for r in records
            )
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise ClassListError(f"bad class list ({type(exc).__name__}: {exc})") from exc

    # -- internals ---------------------------------------------------------------
    def _find_name(self, name: str) -> CellClass | None:
        key = name.strip().lower()
        for c in self._classes:
            if c.name.lower() == key:
                return c
        return None

    def _check_name(self, name: object, ignore_id: int | None = None) -> str:
        if not isinstance(name, str) or not name.strip():
            raise ClassListError(f"class name {name!r} must be a non-empty string")
        name = name.strip()
        existing = self._find_name(name)
        if existing is not None and existing.id != ignore_id:
            raise ClassListError(f"class name {name!r} is already used by id {existing.id}")
        return name

    def _append(self, c: CellClass) -> None:
        if isinstance(c.id, bool) or not isinstance(c.id, int) or c.id < 1:
            raise ClassListError(f"class {c.name!r}: id {c.id!r} must be a positive integer")
        if c.id in self.ids:
            raise ClassListError(f"class id {c.id} is used twice ({self.by_id(c.id).name!r}, {c.name!r})")
        self._check_name(c.name)
        self._classes.append(c)

    def _swap(self, old: CellClass, new: CellClass) -> CellClass:
        self._classes[self._classes.index(old)] = new
        return new

    def _default_colour(self, name: str) -> RGB:
        known = KNOWN_COLOURS.get(name.lower())
        if known is not None:
            return known
        used = {c.colour for c in self._classes}
        for colour in PALETTE:
            if colour not in used:
                return colour
        return PALETTE[len(self._classes) % len(PALETTE)]
