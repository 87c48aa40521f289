"""The ``napari-rmt`` command line: the same core as the GUI, for scripts and servers.

One module per subcommand (``add_parser`` and ``run``), over ``common``. Errors about the
user's input (``NapariRmtError``) are printed as one line naming the file and the item,
with exit status 2; anything else is a bug and keeps its traceback. Heavy imports (torch)
happen inside the commands, so ``--help`` is instant.
"""

from __future__ import annotations

import argparse
import errno
import sys
import warnings
from collections.abc import Sequence

from .. import __version__
from ..data.errors import DataWarning, NapariRmtError
from . import demo, evaluate, experiment, predict, train
from .common import ProgressBar, run_training

__all__ = ["ProgressBar", "build_parser", "main", "run_training"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="napari-rmt",
        description="Semi-supervised cell detection (Robust Mean Teacher) for H&E tiles.",
    )
    parser.add_argument("--version", action="version", version=f"napari-rmt {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for command in (train, predict, evaluate, experiment, demo):
        command.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    with warnings.catch_warnings():
        warnings.simplefilter("always", DataWarning)
        warnings.showwarning = _show_data_warning  # one clean line per repaired item
        try:
            return int(args.func(args) or 0)
        except NapariRmtError as exc:
            print(f"napari-rmt: error: {exc}", file=sys.stderr)
            return 2
        except OSError as exc:
            # the machine's, not the input's: a full disk, a folder one may not write
            if exc.errno not in _ENVIRONMENT:
                raise
            where = f" writing {exc.filename}" if exc.filename else ""
            print(
                f"napari-rmt: error: {exc.strerror}{where}; nothing earlier was replaced (files are written "
                "whole or not at all): free the space or fix the permission and run the command again",
                file=sys.stderr,
            )
            return 2


#: OSError numbers that say the machine refused a write: one line, not a traceback.
_ENVIRONMENT = {errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EROFS, errno.EPERM}


def _show_data_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"napari-rmt: warning: {message}", file=sys.stderr)
