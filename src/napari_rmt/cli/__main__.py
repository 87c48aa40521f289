"""``python -m napari_rmt.cli``: the command line."""

import sys

from . import main

sys.exit(main())
