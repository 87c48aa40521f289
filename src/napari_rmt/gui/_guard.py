"""Keep triton out of the napari process.

On software OpenGL (Mesa llvmpipe: CI, VMs, remote desktops), importing triton after
napari made its GL context crashes the process, and any ``torch.optim`` constructor
imports ``torch._dynamo``, which imports triton (shared/MACHINE.md, pitfall 1). The
plugin's training thread would then kill napari with the user's work in it. Marking
triton as absent makes torch fall back to its triton-free paths; the plugin never
uses ``torch.compile``, so nothing is lost. Call before torch is first used.
"""

from __future__ import annotations

import sys


def guard_triton() -> None:
    if "triton" not in sys.modules:
        sys.modules["triton"] = None  # type: ignore[assignment]
