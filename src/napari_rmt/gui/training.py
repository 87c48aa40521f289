"""The training job the widget runs in a napari thread worker.

A plain generator over the core trainer's events, then prediction of the unlabelled
tiles, so that tests can drive it synchronously and the widget in a thread. It works
on copies of the tiles' boxes taken when it starts: the user may keep editing while
it runs, and nothing they do is overwritten by the job.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Generator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..data.boxes import Boxes
from ..data.classes import ClassList
from ..data.tiles import Tile


@dataclass
class PredictProgress:
    done: int
    total: int


@dataclass
class JobResult:
    checkpoint: dict[str, Any]
    predictions: dict[int, Boxes]
    cancelled: bool
    iterations: int


def snapshot(tiles: list[Tile]) -> list[Tile]:
    """Copies that share pixels (by path or loader) but not boxes."""
    return [
        dataclasses.replace(t, boxes=t.boxes.copy(), predictions=Boxes(), meta=dict(t.meta)) for t in tiles
    ]


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
    ) -> None:
        self.labelled = snapshot(labelled)
        self.unlabelled = snapshot(unlabelled)
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
        from ..model.predict import predict_tiles
        from ..train.events import FinishedEvent
        from ..train.trainer import Trainer, TrainingError

        unl_for_training = self.unlabelled if self.config.method != "supervised" else []
        self.trainer = Trainer(
            self.labelled,
            unl_for_training,
            self.classes,
            self.config,
            init_from=self.init_from,
            checkpoint_path=self.checkpoint_to,
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
            total = len(self.unlabelled)
            for start in range(0, total, self.predict_batch):
                if self._cancel:
                    cancelled = True
                    break
                chunk = self.unlabelled[start : start + self.predict_batch]
                out = predict_tiles(
                    self.trainer.model,
                    chunk,
                    self.classes,
                    batch_size=self.predict_batch,
                    store=False,
                    device=self.trainer.device,
                )
                predictions.update({t.id: b for t, b in zip(chunk, out, strict=True)})
                yield PredictProgress(min(start + self.predict_batch, total), total)
        state = self.trainer.state_dict()
        if not cancelled and self.save_to is not None:
            from ..train.checkpoint import save_checkpoint

            save_checkpoint(self.save_to, state)  # a 100 MB write must not block the viewer
        if self.checkpoint_to is not None:
            Path(self.checkpoint_to).unlink(missing_ok=True)
        return JobResult(state, predictions, cancelled, self.trainer.iteration)
