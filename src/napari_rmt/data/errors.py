"""The plugin's own error and warning types.

Every problem with user input surfaces as one of these, with a message that names the
file and the item, so the GUI can show it and the command line can print it without a
traceback. They subclass ``ValueError`` so that generic callers still catch them.
"""

from __future__ import annotations


class NapariRmtError(ValueError):
    """Base class for every error the plugin raises about user input."""


class ImageReadError(NapariRmtError):
    """An image file is missing, unreadable, or has a layout we cannot turn into RGB."""


class AnnotationError(NapariRmtError):
    """An annotation file is malformed (not COCO, wrong types, dangling references)."""


class ClassListError(NapariRmtError):
    """A class (category) operation is invalid: duplicate name or id, unknown class."""


class DataWarning(UserWarning):
    """Something in the input was repaired (box clipped) or skipped (zero-area box)."""
