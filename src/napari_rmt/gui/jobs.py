"""The widget's background jobs: training and whole-image prediction, one kind of each.

A job is a plain generator (progress items, then a result) with a ``cancel()``, so that
one runner (``run_job``) drives either in a napari thread worker or, for tests and
scripts, synchronously, through the same callbacks: the same progress, cancel and error
path for both. Jobs work on copies taken when they start: the user may keep editing while
they run, and nothing they do is overwritten.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..data.boxes import Boxes
from ..data.classes import ClassList
from ..data.tiles import Tile


@dataclass
class PredictProgress:
    """Prediction of the unlabelled tiles after training: tiles done of total."""

    done: int
    total: int


@dataclass
class WindowProgress:
    """Whole-image prediction: windows done of total."""

    done: int
    total: int


@dataclass
class JobResult:
    checkpoint: dict[str, Any]
    predictions: dict[int, Boxes]
    cancelled: bool
    iterations: int
    #: per-class figures on the held-out annotated tiles (``evaluate.report``), if any were
    report: list = dataclasses.field(default_factory=list)


def snapshot(tiles: list[Tile]) -> list[Tile]:
    """Copies that share pixels (by path or loader) but not boxes."""
    return [
        dataclasses.replace(t, boxes=t.boxes.copy(), predictions=Boxes(), meta=dict(t.meta)) for t in tiles
    ]


def predict_in_chunks(
    model, tiles: list[Tile], classes: ClassList, batch: int, cancelled: Callable[[], bool], device="cpu",
    scale: float = 1.0,
) -> Generator[PredictProgress, None, dict[int, Boxes] | None]:
    """Predict ``tiles`` a batch at a time (resampled by ``scale``, ``data/scale.py``),
    yielding progress and checking for a cancel between batches; returns the boxes per
    tile id, or None when cancelled."""
    from ..model.predict import predict_tiles

    out: dict[int, Boxes] = {}
    total = len(tiles)
    for start in range(0, total, batch):
        if cancelled():
            return None
        chunk = tiles[start : start + batch]
        boxes = predict_tiles(model, chunk, classes, batch_size=batch, store=False, device=device, scale=scale)
        out.update({t.id: b for t, b in zip(chunk, boxes, strict=True)})
        yield PredictProgress(min(start + batch, total), total)
    return out


class TrainingJob:
    def __init__(
        self,
        labelled: list[Tile],
        unlabelled: list[Tile],
        classes: ClassList,
        config,
        init_from: dict | None = None,
        predict_batch: int = 4,
        save_to=None,
        checkpoint_to=None,
        partial: Sequence[Tile] = (),
        held: Sequence[Tile] = (),
    ) -> None:
        self.labelled = snapshot(labelled)
        self.unlabelled = snapshot(unlabelled)
        #: partly annotated tiles: trained on (their boxes), and predicted for their other cells
        self.partial = snapshot(list(partial))
        #: annotated tiles kept out of training, to report each class on after the run
        self.held = snapshot(list(held))
        self.classes = classes.copy()
        self.config = config
        self.init_from = init_from
        self.predict_batch = predict_batch
        self.save_to = save_to  # where a finished run's model goes (written in this thread)
        #: Where the run checkpoints every few minutes (the config's ``checkpoint_every_s``),
        #: so a killed napari keeps the run's work; removed when the run ends normally.
        self.checkpoint_to = checkpoint_to
        self.trainer = None
        self._cancel = False

    def cancel(self) -> None:
        self._cancel = True
        if self.trainer is not None:
            self.trainer.cancel()

    def run(self) -> Generator[Any, None, JobResult]:
        from ._guard import guard_triton

        guard_triton()
        from ..train.events import FinishedEvent
        from ..train.trainer import Trainer, TrainingError

        unl_for_training = self.unlabelled if self.config.uses_unlabelled else []
        self.trainer = Trainer(
            self.labelled,
            unl_for_training,
            self.classes,
            self.config,
            init_from=self.init_from,
            checkpoint_path=self.checkpoint_to,
            partial=self.partial,
        )
        if self._cancel:
            self.trainer.cancel()
        finished = None
        try:
            for ev in self.trainer.run():
                yield ev
                if isinstance(ev, FinishedEvent):
                    finished = ev
        except TrainingError as exc:
            # A non-finite loss leaves the trainer at its last good step: keep that, where
            # the user can load it, and say so; the widget's current model stays as it was.
            if self.checkpoint_to is not None and self.trainer.iteration > 0:
                from ..train.checkpoint import save_checkpoint

                save_checkpoint(self.checkpoint_to, self.trainer.state_dict())
                raise TrainingError(
                    f"{exc} Its last good state is saved in {self.checkpoint_to} (Load model… to use it); "
                    "the current model is unchanged."
                ) from exc
            raise
        cancelled = bool(finished and finished.cancelled)
        predictions: dict[int, Boxes] = {}
        if not cancelled:
            done = yield from predict_in_chunks(
                self.trainer.model, [*self.unlabelled, *self.partial], self.classes, self.predict_batch,
                lambda: self._cancel, self.trainer.device, scale=self.trainer.tile_scale,
            )
            cancelled = done is None
            predictions = done or {}
            for t in self.partial:  # the cells the user boxed are not predicted again
                if t.id in predictions:
                    predictions[t.id] = predictions[t.id].not_covered_by(t.boxes)
        report = []
        if not cancelled and self.held:
            from ..evaluate.report import box_counts, class_figures

            done = yield from predict_in_chunks(
                self.trainer.model, self.held, self.classes, self.predict_batch,
                lambda: self._cancel, self.trainer.device, scale=self.trainer.tile_scale,
            )
            if done is not None:
                trained = box_counts([*self.labelled, *self.partial], self.classes)
                report = class_figures(self.held, [done[t.id] for t in self.held], self.classes, trained)
        state = self.trainer.state_dict()
        if not cancelled and self.save_to is not None:
            from ..train.checkpoint import save_model

            save_model(self.save_to, state)  # the model only (the GUI warm-starts, never resumes)
        if self.checkpoint_to is not None:
            Path(self.checkpoint_to).unlink(missing_ok=True)
        return JobResult(state, predictions, cancelled, self.trainer.iteration, report)


class NucleusJob:
    """Boxes from the bundled nucleus model on tiles with nothing on them yet.

    The model knows one class, "nucleus"; its boxes are given ``class_id`` (the class the
    user has selected), to be reclassified with the keys 1-9 and accepted: annotation by
    correction instead of drawing.
    """

    def __init__(self, tiles: list[Tile], class_id: int, batch: int = 4, pixel_size: float | None = None) -> None:
        self.tiles = snapshot(tiles)
        self.class_id = class_id
        self.batch = batch
        #: the tiles' µm/px (the project's setting): resampled to the model's 40x when set
        self.pixel_size = pixel_size
        #: the model file's score calibration (``evaluate.calibration``), read by ``run``:
        #: with one, 0.5 is the cut its scores were fitted to, and the review starts there
        self.calibration: dict[str, Any] | None = None
        self._cancel = False

    def cancel(self) -> None:
        self._cancel = True

    def run(self) -> Generator[PredictProgress, None, dict[int, Boxes] | None]:
        """Yields progress; returns the boxes per tile id, or None when cancelled."""
        from ._guard import guard_triton

        guard_triton()
        from ..data.scale import scale_factor
        from ..model.bundled import NUCLEUS
        from ..train.checkpoint import model_from_checkpoint, native_pixel_size, read_checkpoint

        ckpt = read_checkpoint(NUCLEUS)
        self.calibration = ckpt.get("calibration")
        model, classes, _ = model_from_checkpoint(ckpt)
        scale = scale_factor(self.pixel_size, native_pixel_size(ckpt))
        out = yield from predict_in_chunks(model, self.tiles, classes, self.batch, lambda: self._cancel, scale=scale)
        for boxes in (out or {}).values():
            boxes.class_ids[:] = self.class_id
        return out


class WholeImageJob:
    """Detect cells over a whole large image with a checkpoint's model, window by window."""

    def __init__(
        self, checkpoint: dict[str, Any], image, window: int = 512, context: int = 128,
        pixel_size: float | None = None, tissue=None,
    ) -> None:
        self.checkpoint, self.image, self.window, self.context = checkpoint, image, window, context
        self.pixel_size = pixel_size
        #: a slide's tissue mask: windows that own only glass are skipped
        self.tissue = tissue
        self._cancel = False

    def cancel(self) -> None:
        self._cancel = True

    def run(self) -> Generator[WindowProgress, None, Boxes | None]:
        """Yields progress; returns the stitched boxes, or None when cancelled."""
        from ._guard import guard_triton

        guard_triton()
        from ..data.scale import scale_factor
        from ..model.wholeimage import iter_predict_large_image
        from ..train.checkpoint import model_from_checkpoint, native_pixel_size

        model, classes, _ = model_from_checkpoint(self.checkpoint)
        scale = scale_factor(self.pixel_size, native_pixel_size(self.checkpoint))
        steps = iter_predict_large_image(
            model, self.image, classes, window=self.window, context=self.context, scale=scale, tissue=self.tissue
        )
        while True:
            if self._cancel:
                return None
            try:
                done, total = next(steps)
            except StopIteration as stop:
                return stop.value
            yield WindowProgress(done, total)


def run_job(
    run: Callable[[], Generator[Any, None, Any]],
    on_yielded: Callable[[Any], None],
    on_returned: Callable[[Any], None],
    on_errored: Callable[[Exception], None],
    on_finished: Callable[[], None],
    synchronous: bool = False,
):
    """Run a job generator in a napari thread worker (returned, started), or here when
    ``synchronous``, through the same callbacks; errors go to ``on_errored``."""
    if synchronous:
        gen = run()
        try:
            while True:
                on_yielded(next(gen))
        except StopIteration as stop:
            on_returned(stop.value)
        except Exception as exc:
            on_errored(exc)
        on_finished()
        return None
    from napari.qt.threading import create_worker

    worker = create_worker(run, _start_thread=False, _ignore_errors=True)
    worker.yielded.connect(on_yielded)
    worker.returned.connect(on_returned)
    worker.errored.connect(on_errored)
    worker.finished.connect(on_finished)
    return worker
