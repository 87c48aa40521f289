"""The training engine: one step at a time, reporting events, for every method.

``Trainer.run()`` is a generator. Each ``next()`` does at most one training step and
yields what happened, so the GUI's thread worker, the command line's progress bar and
the tests drive the very same code, and a cancel lands between (or inside) steps
without losing the last finished one.

Per step (paper Sec. 2; SPEC §2):

- every method: a labelled batch, weakly augmented, gives ``L_sup`` (Eq. 1);
- ``ubt``/``rmt``/``rmt-noreg`` after burn-in: the frozen teacher labels a weakly
  augmented unlabelled batch (score >= threshold); ``rmt*`` blend labelled cells into
  the pseudo-boxes (Eq. 3); the student sees a strong photometric view and learns the
  classification terms only (Eq. 4); ``rmt`` adds ``L_reg`` (Eq. 5); the sum is Eq. 6;
  then the teacher follows by EMA (Eq. 7);
- ``stac``: the first ``burn_in`` steps train the teacher on labelled data, then its
  pseudo-labels (score >= 0.9) are made once and the student (initialised from it)
  trains on them with all four detector losses, as in STAC.

The loop is written for one process; data-parallel training only needs the student
wrapped in DistributedDataParallel, per-rank samplers (``seed + rank``) and EMA on rank 0
with a broadcast, since every piece of state lives on this object.
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..data.classes import ClassList
from ..data.tiles import Tile
from ..model.detector import build_detector
from ..model.options import with_spec
from ..model.predict import DeviceError, resolve_device
from .augment import strong_view
from .batches import MIN_SIDE, TrainingData, TrainingError
from .checkpoint import MODEL_FILE, TRAINING_FILE, read_checkpoint, save_checkpoint, save_model
from .config import TrainConfig
from .distributed import any_rank, current_world, from_main, sync_buffers, wrap
from .events import CheckpointEvent, Event, FinishedEvent, IterationEvent, PhaseEvent, ValidationEvent
from .losses import ema_update, sparse_regulariser, supervised_loss, total_loss, unsupervised_loss
from .mixing import PatchBank
from .partial import PARTIAL_KEY, partial_spec
from .pseudo import ScoreBuffer
from .resume import init_nucleus, resume_trainer, warm_start, with_model_pixel_size
from .schedule import ETA_WINDOW, SEMI_STEP_COST, Schedule
from .teacher import PseudoLabeller, class_probabilities, frozen_copy
from .weighting import running_stats_frozen, unlabelled_spec

__all__ = ["ETA_WINDOW", "MIN_SIDE", "Trainer", "TrainingError", "running_stats_frozen"]


class _Cancelled(Exception):
    pass


class Trainer:
    """Trains a detector on labelled and unlabelled tiles with one of the methods.

    What a method does after burn-in is its row of ``train/methods.py`` and, by the name of
    that phase, its step in ``STEPS``; the batches are ``TrainingData``'s, the teacher's
    pseudo-labels ``PseudoLabeller``'s, the clock ``Schedule``'s.
    """

    #: The unlabelled terms of each phase after burn-in (``Method.after_burn_in``).
    STEPS: ClassVar[dict[str, str]] = {"semi-supervised": "_mean_teacher_terms", "stac-student": "_fixed_teacher_terms"}
    SEMI_STEP_COST = SEMI_STEP_COST

    def __init__(
        self,
        labelled: Sequence[Tile],
        unlabelled: Sequence[Tile],
        classes: ClassList,
        config: TrainConfig | None = None,
        *,
        init_from: str | os.PathLike | dict | None = None,
        validate: Callable[[nn.Module], dict[str, float]] | None = None,
        checkpoint_path: str | os.PathLike | None = None,
        model_path: str | os.PathLike | None = None,
        partial: Sequence[Tile] = (),
    ) -> None:
        """``labelled`` tiles are fully annotated, ``partial`` ones partly (``train/partial.py``
        says how each is learnt), ``unlabelled`` ones not at all."""
        if init_from is not None and not isinstance(init_from, dict):
            init_from = read_checkpoint(init_from)
        # the scale the model learns at: the start's, when the tiles' pixel size differs
        self.cfg = with_model_pixel_size(config or TrainConfig(), init_from)
        self.cfg.validate()
        self.classes = classes
        if len(classes) == 0:
            raise TrainingError("there are no cell classes to learn")
        if not labelled and not partial:
            raise TrainingError(
                "no annotated tiles: box some cells (or mark a tile fully annotated) before training"
            )
        if self.cfg.uses_unlabelled and not unlabelled and not partial:
            raise TrainingError(
                f"method {self.cfg.method!r} needs unlabelled or partly annotated tiles, and every tile is "
                "fully annotated; use method 'supervised' or leave some tiles unlabelled"
            )
        try:
            self.device = resolve_device(self.cfg.device)
        except DeviceError as exc:
            raise TrainingError(str(exc)) from exc
        self.validate_fn = validate
        #: Periodic checkpoints write the training state to ``checkpoint_path`` and, when
        #: given, the predicting model to ``model_path`` (a run folder's two files).
        self.checkpoint_path = Path(checkpoint_path) if checkpoint_path else None
        self.model_path = Path(model_path) if model_path else None
        self._cancel = threading.Event()

        #: Under torchrun, this process's rank and the number of processes (train/distributed.py).
        self.world = current_world()
        self.schedule = Schedule(self.cfg, self.world.size)
        torch.manual_seed(self.cfg.seed + self.world.rank)
        #: Draws every rank makes alike (shuffles, flips of the global batch) ...
        self.gen = torch.Generator().manual_seed(self.cfg.seed)
        #: ... and draws for this rank's own images only (the mixing of Eq. 3).
        local_gen = (
            self.gen if self.world.size == 1 else torch.Generator().manual_seed(self.cfg.seed + 7919 * self.world.rank)
        )
        self.student = build_detector(len(classes), self.cfg.model).to(self.device)
        self.teacher: nn.Module | None = None
        self.iteration = 0
        #: Training seconds so far, over every run() of this trainer and the runs it resumes.
        self.elapsed_s = 0.0
        #: EMA updates the teacher has had (Eq. 7 steps), for ``predict_with`` "auto".
        self.ema_steps = 0
        if init_from is not None:
            warm_start(self.student, self.classes, init_from)
        elif self.cfg.init == "nucleus":
            init_nucleus(self.student, self.cfg.model)

        self.data = TrainingData(labelled, partial, unlabelled, classes, self.cfg, self.world, self.gen, self.device)
        self.missing_classes = self.data.missing_classes
        self.tile_ids = self.data.tile_ids
        labelled_tensors = self.data.labelled
        self.bank = (
            PatchBank.from_labelled(
                [im.float() / 255 for im, _, _ in labelled_tensors],
                [b for _, b, _ in labelled_tensors],
                [lab for _, _, lab in labelled_tensors],
            )
            if self.cfg.uses_mixing
            else PatchBank()
        )
        self.strong = strong_view(self.cfg.strong_view, local_gen)
        self.scores = ScoreBuffer(len(classes), self.cfg.gmm_buffer, self.cfg.threshold, self.cfg.gmm_min_scores)
        self.labeller = PseudoLabeller(self.cfg, self.data, self.scores, self.bank, self.strong, local_gen, self.device)
        #: STAC's fixed pseudo-labels of each unlabelled tile, made when burn-in ends.
        self.stac_targets: list[tuple[Tensor, Tensor]] | None = None

        #: The student as the labelled forward calls it: wrapped in DDP under torchrun (its
        #: gradients are averaged over the ranks in backward), the student itself otherwise.
        self._forward = self.student
        if self.world.size > 1:
            self._forward = wrap(self.student, self.device)
            self.student = self._forward.module
        params = [p for p in self.student.parameters() if p.requires_grad]
        self.optimizer = torch.optim.SGD(
            params, lr=self.cfg.lr, momentum=self.cfg.momentum, weight_decay=self.cfg.weight_decay
        )

    # ------------------------------------------------------------------ public API
    def cancel(self) -> None:
        """Ask the run to stop; the step in progress is abandoned, the last finished one kept."""
        self._cancel.set()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    @property
    def last_pseudo(self) -> list[tuple[int, bool, Tensor, Tensor]]:
        """The last step's pseudo-labels: (unlabelled index, flipped, boxes, labels) per
        image, for benchmarks that score them against hidden truth."""
        return self.labeller.last

    @property
    def predict_with(self) -> str:
        """Which network predicts: for mean-teacher methods once a teacher exists, the one
        the config names (the teacher by default; "auto": the teacher from the nucleus
        init once it has had the EMA's memory of updates, else the student); the student
        otherwise."""
        if self.cfg.uses_teacher and self.teacher is not None:
            if self.cfg.predict_with == "auto":
                # the EMA's memory is about 1 / (1 - sigma) steps: a teacher that has had
                # fewer is still mostly the burn-in's network (a one-minute demo)
                settled = self.ema_steps >= 1.0 / max(1e-6, 1.0 - self.cfg.ema_decay)
                return "teacher" if self.cfg.init == "nucleus" and settled else "student"
            return self.cfg.predict_with
        return "student"

    @property
    def model(self) -> nn.Module:
        return self.teacher if self.predict_with == "teacher" else self.student  # type: ignore[return-value]

    @property
    def tile_scale(self) -> float:
        """How much the run's tiles are enlarged for the model (``TrainConfig.model_pixel_size``);
        predicting them after the run takes the same ``scale``."""
        return self.data.scale

    @property
    def phase(self) -> str:
        """"supervised" for a method without unlabelled tiles; else "burn-in" until the
        teacher exists, then the method's phase after burn-in."""
        if not self.cfg.uses_unlabelled:
            return "supervised"
        return "burn-in" if self.teacher is None else self.cfg.spec.after_burn_in

    def progress(self) -> float:
        """How far the run is, 0..1: by iterations, or by time when a budget ends it sooner."""
        return self.schedule.progress(self.iteration, self.elapsed_s)

    def eta(self, recent: deque[float], recent_semi: deque[float] | None = None) -> float:
        """Seconds left, from the recent step times of each phase (``Schedule.eta``)."""
        return self.schedule.eta(self.iteration, self.elapsed_s, self.teacher is not None, recent, recent_semi)

    def lr(self) -> float:
        """The learning rate of the next step."""
        return self.schedule.lr(self.iteration, self.elapsed_s, self.cfg.uses_unlabelled and self.teacher is not None)

    def make_teacher(self) -> PhaseEvent | None:
        """At the end of burn-in, the teacher: a frozen copy of the student (for STAC also
        its fixed pseudo-labels); the phase event that says so, else None."""
        cfg = self.cfg
        if self.teacher is not None or not cfg.uses_unlabelled:
            return None
        if not self.schedule.burn_in_over(self.iteration, self.elapsed_s):
            return None
        self.teacher = frozen_copy(self.student.state_dict(), len(self.classes), cfg.model, self.device)
        if cfg.spec.teacher == "fixed":
            self.stac_targets = self.labeller.fixed_targets(self.teacher)
            n = sum(len(b) for b, _ in self.stac_targets)
            return PhaseEvent(
                self.iteration,
                self.phase,
                f"{cfg.method.upper()} teacher fixed after {self.iteration} steps; {n} pseudo-boxes (score >= "
                f"{cfg.stac_threshold}) on {len(self.stac_targets)} unlabelled tiles",
            )
        return PhaseEvent(self.iteration, self.phase, f"burn-in done; teacher = student at step {self.iteration}")

    def run(self) -> Iterator[Event]:
        cfg = self.cfg
        start = time.perf_counter()
        elapsed_before = self.elapsed_s
        last_save = time.perf_counter()
        # step seconds of the last burn-in / supervised steps, and of the semi-supervised
        # ones; 40 steps: steadier than 20 and still follows the step time as it falls
        # over a run (docs/benchmarks.md, the ETA)
        recent: deque[float] = deque(maxlen=ETA_WINDOW)
        recent_semi: deque[float] = deque(maxlen=ETA_WINDOW)
        if self.data.cells:
            found = sum(len(c) for c in self.data.cells.values())
            yield PhaseEvent(
                self.iteration,
                "cells",
                f"the nucleus model found {found} cells nobody boxed on {len(self.data.cells)} partly annotated "
                f"tile(s): taught as cells of unknown class (partial_cells {cfg.partial_cells:g}; 0 turns it off)",
            )
        if self.missing_classes:
            yield PhaseEvent(
                self.iteration,
                "warning",
                f"no labelled box of class(es) {', '.join(self.missing_classes)}: the model cannot learn to "
                "find them (nor can its teacher pseudo-label them). Box some of their cells (a few on "
                "each of several tiles will do) and train again.",
            )
        while self.iteration < cfg.iterations and not self.schedule.out_of_time(self.elapsed_s):
            if self._cancel.is_set():
                break
            phase_event = self.make_teacher()
            if phase_event is not None:
                yield phase_event
            t0 = time.perf_counter()
            # A step's forward passes already move BatchNorm statistics; an abandoned step
            # (cancel, non-finite loss) puts them back, so the model is exactly the last step's.
            buffers = {n: b.detach().clone() for n, b in self.student.named_buffers()}
            try:
                info = self._step()
            except (_Cancelled, TrainingError) as exc:
                self._restore_buffers(buffers)
                if isinstance(exc, TrainingError):
                    raise
                break
            self.iteration += 1
            dt = time.perf_counter() - t0
            self.elapsed_s = elapsed_before + time.perf_counter() - start
            if self.world.size > 1:
                # rank 0's clock and cancel decide for all, or the ranks would part ways
                self.elapsed_s, stop = from_main([self.elapsed_s, float(self._cancel.is_set())], self.world)
                if stop:
                    self._cancel.set()
            (recent_semi if info["phase"] in self.STEPS else recent).append(dt)
            if self.iteration % max(1, cfg.log_every) == 0 or self.iteration == cfg.iterations:
                yield IterationEvent(
                    iteration=self.iteration,
                    total=cfg.iterations,
                    seconds=dt,
                    eta=self.eta(recent, recent_semi),
                    elapsed=self.elapsed_s,
                    **info,
                )
            if not self.world.is_main:
                continue  # events, validation and checkpoints are rank 0's
            if self.validate_fn and cfg.validate_every and self.iteration % cfg.validate_every == 0:
                yield ValidationEvent(self.iteration, self.validate_fn(self.model))
            due = bool(cfg.checkpoint_every) and self.iteration % cfg.checkpoint_every == 0
            due = due or (bool(cfg.checkpoint_every_s) and time.perf_counter() - last_save >= cfg.checkpoint_every_s)
            if self.checkpoint_path and due:
                self._save_files(self.checkpoint_path, self.model_path)
                yield CheckpointEvent(self.iteration, str(self.checkpoint_path))
                last_save = time.perf_counter()
        yield FinishedEvent(self.iteration, self._cancel.is_set(), time.perf_counter() - start)

    # ------------------------------------------------------------------ one step
    def _step(self) -> dict[str, Any]:
        cfg = self.cfg
        lr = self.lr()
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.student.train()
        images, targets = self.data.labelled_batch()
        self._check_cancel()
        if self.data.class_weights is not None or any(PARTIAL_KEY in t for t in targets):
            targets = with_spec(targets, partial_spec(cfg.partial_stain_ignore, self.data.class_weights))
        sup_terms = self._forward(images, targets)
        l_sup = supervised_loss(sup_terms)
        zero = l_sup.new_zeros(())
        l_unsup, l_reg = zero, zero
        info: dict[str, Any] = {"pseudo_per_image": [], "mixed": 0, "unmixed": 0}
        unsup_terms: dict[str, Tensor] = {}
        phase = self.phase
        if phase in self.STEPS:
            self._check_cancel()
            unsup_terms, l_unsup, l_reg, info = getattr(self, self.STEPS[phase])()
        loss = total_loss(l_sup, l_unsup, l_reg, cfg.lambda_u, cfg.lambda_r)
        terms = {"sup": l_sup, "unsup": l_unsup, "reg": l_reg, "total": loss}
        terms.update({f"sup/{k}": v for k, v in sup_terms.items()})
        terms.update({f"unsup/{k}": v for k, v in unsup_terms.items()})
        values = {k: float(v.detach()) for k, v in terms.items()}
        bad = [k for k, v in values.items() if not math.isfinite(v)]
        if any_rank(bool(bad), self.world, self.device) and not bad:
            bad = ["on another rank"]
        if bad:
            raise TrainingError(
                f"the loss became non-finite at step {self.iteration + 1} ({', '.join(bad)}); "
                f"training stopped with the model as it was after step {self.iteration}. "
                f"Try a lower lr (now {cfg.lr})."
            )
        self._check_cancel()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.student.parameters(), cfg.grad_clip)
        self.optimizer.step()
        sync_buffers(self.student, self.world)
        if self.teacher is not None and cfg.uses_teacher:
            ema_update(self.teacher, self.student, cfg.ema_decay)
            self.ema_steps += 1
        return {"phase": phase, "losses": values, "lr": lr, **info}

    def _mean_teacher_terms(self) -> tuple[dict[str, Tensor], Tensor, Tensor, dict[str, Any]]:
        """Eqs. 3-5: the teacher's pseudo-labels on strong views, classification terms
        weighted by the rules for an unsure teacher, and the regulariser."""
        assert self.teacher is not None
        teacher = self.teacher
        u_images, u_targets, info, teacher_view = self.labeller.batch(teacher)
        self._check_cancel()

        def class_probs(proposals: list[Tensor]) -> Tensor:
            return class_probabilities(teacher, teacher_view, proposals)

        fg_iou = self.student.roi_heads.proposal_matcher.high_threshold
        spec = unlabelled_spec(self.cfg, fg_iou, class_probs)
        with running_stats_frozen(self.student):
            terms = self.student(u_images, with_spec(u_targets, spec))
        l_unsup = unsupervised_loss(terms, self.cfg.unsup_objectness)
        l_reg = terms["loss_classifier"].new_zeros(())
        if self.cfg.uses_reg:
            l_reg = sparse_regulariser(spec.class_logits, self.cfg.p_norm)
        return terms, l_unsup, l_reg, info

    def _fixed_teacher_terms(self) -> tuple[dict[str, Tensor], Tensor, Tensor, dict[str, Any]]:
        """STAC: the fixed pseudo-labels on strong views, all four detector losses."""
        assert self.stac_targets is not None
        u_images, u_targets, info = self.labeller.fixed_batch(self.stac_targets)
        with running_stats_frozen(self.student):
            terms = self.student(u_images, u_targets)
        l_unsup = supervised_loss(terms)
        return terms, l_unsup, l_unsup.new_zeros(()), info

    def _restore_buffers(self, saved: dict[str, Tensor]) -> None:
        with torch.no_grad():
            for name, buf in self.student.named_buffers():
                buf.copy_(saved[name])

    def _check_cancel(self) -> None:
        # Under torchrun a step is never abandoned half-way (the other ranks would wait in
        # its all-reduce): a cancel takes effect between steps, on every rank at once.
        if self._cancel.is_set() and self.world.size == 1:
            raise _Cancelled

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {
            "config": self.cfg.to_dict(),
            "classes": self.classes.to_json(),
            "iteration": self.iteration,
            "elapsed_s": float(self.elapsed_s),
            "ema_steps": self.ema_steps,
            "world_size": self.world.size,
            "score_buffers": [list(b) for b in self.scores.buffers],
            "tile_ids": self.tile_ids,
            "predict_with": self.predict_with,
            "student": {k: v.detach().cpu() for k, v in self.student.state_dict().items()},
            "teacher": None
            if self.teacher is None
            else {k: v.detach().cpu() for k, v in self.teacher.state_dict().items()},
            "optimizer": self.optimizer.state_dict(),
            # Random state, so a resumed run continues the very same sequence.
            "rng": self.data.rng_state(),
        }

    def save(self, path: str | os.PathLike) -> Path:
        """The whole training state (what ``resume`` continues)."""
        return save_checkpoint(path, self.state_dict())

    def save_model(self, path: str | os.PathLike) -> Path:
        """The predicting model only (``checkpoint.model_payload``): a run's ``model.pt``."""
        return save_model(path, self.state_dict())

    def save_run(self, folder: str | os.PathLike) -> Path:
        """``training.pt`` then ``model.pt`` into a run folder; returns the model's path.

        In that order, so that a kill between the two leaves a model no newer than the
        training state that ``--resume`` continues."""
        folder = Path(folder)
        self._save_files(folder / TRAINING_FILE, folder / MODEL_FILE)
        return folder / MODEL_FILE

    def _save_files(self, training: Path, model: Path | None) -> None:
        """The training state, then (when given) the predicting model, from one state dict."""
        state = self.state_dict()
        save_checkpoint(training, state)
        if model is not None:
            save_model(model, state)

    @classmethod
    def resume(
        cls,
        path: str | os.PathLike | dict,
        labelled: Sequence[Tile],
        unlabelled: Sequence[Tile],
        config: TrainConfig | None = None,
        **kwargs: Any,
    ) -> Trainer:
        """Continue an interrupted run where its checkpoint left it (``train/resume.py``).

        With ``config`` the run continues under that config instead of the saved one (more
        iterations, another method after a shared burn-in, a longer budget); its model
        must be the checkpoint's, since the weights are. Without, the saved config.
        """
        return resume_trainer(cls, path, labelled, unlabelled, config, **kwargs)
