"""napari-rmt: semi-supervised cell detection (Robust Mean Teacher) for H&E tiles.

The package is layered so that a reader sees the architecture from the folder names:
``data`` (tiles, boxes, classes, file formats) at the bottom, then the learning code,
then the two faces on top: ``gui`` (napari) and ``cli``. Nothing here imports torch or
napari at import time, so that opening napari with the plugin installed stays fast.
"""

__version__ = "0.1.0"
