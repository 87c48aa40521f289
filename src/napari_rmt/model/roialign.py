"""RoIAlign on every CPU core at inference.

torchvision's CPU RoIAlign loops over the RoIs in one thread whatever ``torch.set_num_threads``
says. On a whole-slide window of tissue (768 px read, about 2,500 proposals under the
objectness floor) it was half of the window's time, and as long with one thread as with two
(``benchmarks/window_profile.py``, docs/benchmarks.md). Each RoI is pooled on its own, so
pooling the RoIs in slices on several threads gives the very same numbers: the operator
releases the GIL, so the slices run side by side.

Training keeps torchvision's single call: its backward adds every RoI's gradient into the
shared feature maps, and chunks would change the order of those sums.
"""

from __future__ import annotations

import concurrent.futures
import threading

import torch
from torch import Tensor
from torchvision.ops import MultiScaleRoIAlign

#: Under this many RoIs a slice costs more in threads than it saves.
MIN_SLICE = 128
#: RoIs pooled at once by one thread: 512 RoIs of 128 x 7 x 7 floats are 13 MB.
SLICE = 512

_POOL: concurrent.futures.ThreadPoolExecutor | None = None
_POOL_SIZE = 0
_POOL_LOCK = threading.Lock()


def _submit(workers: int, fn, times: int) -> list[concurrent.futures.Future]:
    """``fn`` submitted ``times`` to the process-wide pool, which is replaced by a larger one
    when more threads are asked for. The old pool is shut down (its idle threads would
    otherwise live as long as the process); work already on it finishes. Replacing and
    submitting hold one lock, so no call submits to a pool that is shut down."""
    global _POOL, _POOL_SIZE
    with _POOL_LOCK:
        if _POOL is None or workers > _POOL_SIZE:
            old = _POOL
            _POOL = concurrent.futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="roialign")
            _POOL_SIZE = workers
            if old is not None:
                old.shutdown(wait=False)
        return [_POOL.submit(fn) for _ in range(times)]


class ChunkedRoIAlign(MultiScaleRoIAlign):
    """``MultiScaleRoIAlign`` that, without gradients, pools the RoIs in slices of at most
    ``SLICE`` on up to ``torch.get_num_threads()`` threads, each slice written into its
    rows of the result as it is done (memory: the result and a slice per thread); the
    result is the single call's, row for row. No parameters: a checkpoint is the same
    either way."""

    def forward(self, x: dict[str, Tensor], boxes: list[Tensor], image_shapes: list[tuple[int, int]]) -> Tensor:
        total = sum(len(b) for b in boxes)
        threads = min(torch.get_num_threads(), total // MIN_SLICE)
        on_cpu = all(b.device.type == "cpu" for b in boxes)
        if torch.is_grad_enabled() or threads < 2 or not on_cpu:
            return super().forward(x, boxes, image_shapes)
        # the operator makes its input contiguous: once here, not once per slice
        x = {k: v.contiguous() if k in self.featmap_names else v for k, v in x.items()}
        if self.scales is None or self.map_levels is None:
            # set once, here, before threads read them (as the parent does on its first call)
            super().forward(x, [b[:0] for b in boxes], image_shapes)
        first = next(v for k, v in x.items() if k in self.featmap_names)
        out = first.new_empty((total, first.shape[1], *self.output_size))
        counts = [len(b) for b in boxes]
        starts = [sum(counts[:i]) for i in range(len(counts))]
        step = max(MIN_SLICE, min(SLICE, -(-total // threads)))
        inference = torch.is_inference_mode_enabled()

        def pool(lo: int) -> None:
            hi = min(total, lo + step)
            # the slice [lo, hi) of the boxes concatenated over the images, image by image
            part = [b[min(max(lo - s, 0), n) : min(max(hi - s, 0), n)]
                    for b, s, n in zip(boxes, starts, counts, strict=True)]
            with torch.inference_mode() if inference else torch.no_grad():
                out[lo:hi] = MultiScaleRoIAlign.forward(self, x, part, image_shapes)

        # the calling thread works too: one new thread (and its malloc arena) fewer
        todo, lock = iter(range(0, total, step)), threading.Lock()

        def work() -> None:
            while True:
                with lock:
                    lo = next(todo, None)
                if lo is None:
                    return
                pool(lo)

        helpers = _submit(threads - 1, work, threads - 1)
        try:
            work()
        finally:
            for f in helpers:
                f.result()
        return out
