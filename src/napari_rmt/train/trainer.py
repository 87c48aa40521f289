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

import contextlib
import dataclasses
import math
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torchvision.ops import boxes as box_ops

from ..data.classes import ClassList
from ..data.errors import NapariRmtError
from ..data.tiles import Tile
from ..model.detector import build_detector
from ..model.predict import DeviceError, predict_images, resolve_device
from .augment import VIEW_FLIPS, flip_boxes, flip_image, hflip, strong_view, turn
from .checkpoint import (
    MODEL_FILE,
    TRAINING_FILE,
    CheckpointError,
    classes_from_checkpoint,
    config_from_checkpoint,
    is_model_only,
    load_state,
    predicting_state,
    read_checkpoint,
    save_checkpoint,
    save_model,
    transfer_weights,
)
from .config import TrainConfig
from .distributed import any_rank, current_world, from_main, sync_buffers, wrap
from .events import CheckpointEvent, Event, FinishedEvent, IterationEvent, PhaseEvent, ValidationEvent
from .losses import (
    ema_update,
    roi_class_weights,
    sparse_regulariser,
    supervised_loss,
    total_loss,
    unsupervised_loss,
)
from .mixing import PatchBank, mix_pseudo_boxes
from .partial import (
    PARTIAL_KEY,
    effective_number_weights,
    mark_partial,
    partial_rule,
    repeat_factors,
    with_known_boxes,
)
from .pseudo import ScoreBuffer, merge_views, select_pseudo
from .stain_prior import stain_integral, stain_unknown


class TrainingError(NapariRmtError):
    """Training cannot go on: no labelled data, a non-finite loss, a device problem."""


class _Cancelled(Exception):
    pass


#: Steps in the ETA's running mean of step seconds (per phase).
ETA_WINDOW = 40


class _Cycler:
    """Endless shuffled passes over indices, from a seeded generator; with ``pool``, over
    the pool's entries (an index may stand in it several times: class-balanced passes)."""

    def __init__(self, n: int, generator: torch.Generator, pool: list[int] | None = None) -> None:
        self.pool = pool
        self.n = len(pool) if pool is not None else n
        self.g, self.order, self.pos = generator, [], 0

    def take(self, k: int) -> list[int]:
        out = []
        for _ in range(k):
            if self.pos >= len(self.order):
                self.order, self.pos = torch.randperm(self.n, generator=self.g).tolist(), 0
            j = self.order[self.pos]
            out.append(self.pool[j] if self.pool is not None else j)
            self.pos += 1
        return out


@contextlib.contextmanager
def running_stats_frozen(model: nn.Module) -> Iterator[None]:
    """BatchNorm normalises with the batch's statistics but does not record them.

    The student's running statistics are what the teacher (by EMA) and prediction use,
    on weakly augmented or clean tiles. Strongly augmented, mixed unlabelled batches
    would shift them towards jittered colours and blur, so that the student, and in
    turn the teacher, see clean tiles as out of distribution: measured on CoNSeP, a
    student warm-started at 27 % F1 fell to 1 % within 60 semi-supervised steps.
    """
    saved = []
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
            saved.append(
                (m, m.momentum, m.num_batches_tracked.clone() if m.num_batches_tracked is not None else None)
            )
            m.momentum = 0.0
    try:
        yield
    finally:
        for m, momentum, count in saved:
            m.momentum = momentum
            if count is not None:
                m.num_batches_tracked.copy_(count)


class Trainer:
    """Trains a detector on labelled and unlabelled tiles with one of the five methods."""

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
        self.cfg = config or TrainConfig()
        self.cfg.validate()
        self.classes = classes
        if len(classes) == 0:
            raise TrainingError("there are no cell classes to learn")
        if not labelled and not partial:
            raise TrainingError(
                "no annotated tiles: box some cells (or mark a tile fully annotated) before training"
            )
        if self.cfg.method != "supervised" and not unlabelled and not partial:
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
        torch.manual_seed(self.cfg.seed + self.world.rank)
        #: Draws every rank makes alike (shuffles, flips of the global batch) ...
        self.gen = torch.Generator().manual_seed(self.cfg.seed)
        #: ... and draws for this rank's own images only (the mixing of Eq. 3).
        self._local_gen = (
            self.gen if self.world.size == 1 else torch.Generator().manual_seed(self.cfg.seed + 7919 * self.world.rank)
        )
        self.student = build_detector(len(classes), self.cfg.model).to(self.device)
        self.teacher: nn.Module | None = None
        self.iteration = 0
        #: Training seconds so far, over every run() of this trainer and the runs it resumes.
        self.elapsed_s = 0.0
        #: EMA updates the teacher has had (Eq. 7 steps), for ``predict_with`` "auto".
        self.ema_steps = 0
        self.scores = ScoreBuffer(len(classes), self.cfg.gmm_buffer, self.cfg.threshold, self.cfg.gmm_min_scores)
        #: The last step's pseudo-labels: (unlabelled index, flipped, boxes, labels) per
        #: image, for benchmarks that score them against hidden truth.
        self.last_pseudo: list[tuple[int, bool, Tensor, Tensor]] = []
        if init_from is not None:
            self._warm_start(init_from)
        elif self.cfg.init == "nucleus":
            self._init_nucleus()

        # Tiles become uint8 tensors once: re-reading PNGs every step would dominate on CPUs.
        # The partly annotated tiles follow the fully annotated ones in the labelled list and
        # the unlabelled ones in the unlabelled list (for the teacher to fill in), same tensors.
        self._labelled = [self._load_labelled(t) for t in [*labelled, *partial]]
        self._n_full = len(labelled)
        #: which tiles the run learns from, saved so that a resume on other tiles is refused
        self.tile_ids = {"labelled": [t.id for t in labelled], "partial": [t.id for t in partial]}
        self._unlabelled = [self._load_image(t) for t in unlabelled]
        #: Unlabelled-list index -> the user's (boxes, labels) of a partly annotated tile.
        self._known: dict[int, tuple[Tensor, Tensor]] = {}
        if self.cfg.uses_unlabelled:
            for k in range(self._n_full, len(self._labelled)):
                im, boxes, labels = self._labelled[k]
                self._known[len(self._unlabelled)] = (boxes, labels)
                self._unlabelled.append(im)
        self.missing_classes = [
            c.name
            for i, c in enumerate(classes, start=1)
            if not any((lab == i).any() for _, _, lab in self._labelled)
        ]
        self.bank = (
            PatchBank.from_labelled(
                [im.float() / 255 for im, _, _ in self._labelled],
                [b for _, b, _ in self._labelled],
                [lab for _, _, lab in self._labelled],
            )
            if self.cfg.uses_mixing
            else PatchBank()
        )
        self.strong = strong_view(self.cfg.strong_view, self._local_gen)
        pool = None
        if self.cfg.class_balance:
            repeats = repeat_factors([lab for _, _, lab in self._labelled], len(classes), self.cfg.class_balance)
            pool = [i for i, r in enumerate(repeats) for _ in range(r)]
        self._lab_cycle = _Cycler(len(self._labelled), self.gen, pool)
        #: Per-class weights of the labelled classification loss (background first), or None.
        self._class_weights = None
        if self.cfg.class_weight_beta:
            counts = [sum(int((lab == i).sum()) for _, _, lab in self._labelled) for i in range(1, len(classes) + 1)]
            self._class_weights = effective_number_weights(counts, self.cfg.class_weight_beta)
        self._unl_cycle = _Cycler(max(1, len(self._unlabelled)), self.gen)
        self._stac_targets: list[tuple[Tensor, Tensor]] | None = None

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

    def _out_of_time(self) -> bool:
        return bool(self.cfg.time_budget_s) and self.elapsed_s >= self.cfg.time_budget_s

    def progress(self) -> float:
        """How far the run is, 0..1: by iterations, or by time when a budget ends it sooner."""
        p = self.iteration / self.cfg.iterations
        if self.cfg.time_budget_s:
            p = max(p, self.elapsed_s / self.cfg.time_budget_s)
        return min(1.0, p)

    #: A semi-supervised step costs about this many burn-in steps (teacher pass, a second
    #: batch): for rmt+ with the sized ResNet-18 at 256 px, batch 4 + 2, 1.54-1.91 over
    #: five 20-minute CoNSeP runs (median 1.64; 1.87 in step_profile.py's isolated steps,
    #: docs/benchmarks.md). Used for the ETA until semi-supervised steps are measured.
    SEMI_STEP_COST = 1.7

    def _eta(self, recent: deque[float], recent_semi: deque[float] | None = None) -> float:
        """Seconds left: burn-in steps at the mean of the recent burn-in steps, semi-supervised
        ones at the mean of the recent semi-supervised steps once five are measured (before
        that, ``SEMI_STEP_COST`` burn-in steps each). Measured within 20 % from the first
        minute on 88-96 % of the steps of real runs (``benchmarks/eta_accuracy.py``)."""
        if not recent and not recent_semi:
            return 0.0
        burn_step = float(np.mean(recent)) if recent else float(np.mean(recent_semi)) / self.SEMI_STEP_COST
        semi_step = (
            float(np.mean(recent_semi))
            if recent_semi and (len(recent_semi) >= 5 or not recent)
            else burn_step * self.SEMI_STEP_COST
        )
        left = self.cfg.iterations - self.iteration
        if self.cfg.uses_teacher and self.teacher is None:
            burn_left = max(0, min(left, self.cfg.burn_in - self.iteration))
            eta = burn_step * burn_left + semi_step * (left - burn_left)
        elif self.cfg.method != "supervised" and self.teacher is not None:
            eta = semi_step * left
        else:
            eta = burn_step * left
        if self.cfg.time_budget_s:
            eta = min(eta, max(0.0, self.cfg.time_budget_s - self.elapsed_s))
        return eta

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
        if self.missing_classes:
            yield PhaseEvent(
                self.iteration,
                "warning",
                f"no labelled box of class(es) {', '.join(self.missing_classes)}: the model cannot learn to "
                "find them (nor can its teacher pseudo-label them). Box some of their cells (a few on "
                "each of several tiles will do) and train again.",
            )
        while self.iteration < cfg.iterations and not self._out_of_time():
            if self._cancel.is_set():
                break
            phase_event = self._phase_transition()
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
            (recent_semi if info.get("phase") in ("semi-supervised", "stac-student") else recent).append(dt)
            if self.iteration % max(1, cfg.log_every) == 0 or self.iteration == cfg.iterations:
                yield IterationEvent(
                    iteration=self.iteration,
                    total=cfg.iterations,
                    seconds=dt,
                    eta=self._eta(recent, recent_semi),
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

    # ------------------------------------------------------------------ phases
    def _burn_in_over(self) -> bool:
        cfg = self.cfg
        if self.iteration >= cfg.burn_in:
            return True
        return bool(cfg.time_budget_s) and cfg.burn_in_fraction is not None and (
            self.elapsed_s >= cfg.burn_in_fraction * cfg.time_budget_s
        )

    def _phase_transition(self) -> PhaseEvent | None:
        cfg = self.cfg
        if self.teacher is not None or cfg.method == "supervised" or not self._burn_in_over():
            return None
        self.teacher = self._frozen_copy(self.student.state_dict())
        if cfg.method == "stac":
            self._stac_targets = self._make_stac_pseudo_labels()
            n = sum(len(b) for b, _ in self._stac_targets)
            return PhaseEvent(
                self.iteration,
                "stac-student",
                f"STAC teacher fixed after {self.iteration} steps; {n} pseudo-boxes (score >= "
                f"{cfg.stac_threshold}) on {len(self._stac_targets)} unlabelled tiles",
            )
        return PhaseEvent(
            self.iteration, "semi-supervised", f"burn-in done; teacher = student at step {self.iteration}"
        )

    def _frozen_copy(self, state: dict[str, Tensor]) -> nn.Module:
        """A new detector holding ``state``, in eval mode with gradients off (the teacher).

        Built afresh rather than deep-copied: the student carries graph tensors of the
        last step (the box head's logits) that must not be duplicated.
        """
        model = build_detector(len(self.classes), self.cfg.model).to(self.device)
        model.load_state_dict(state)
        model.eval()
        model.requires_grad_(False)
        return model

    def _phase_name(self) -> str:
        if self.cfg.method == "supervised":
            return "supervised"
        if self.teacher is None:
            return "burn-in"
        return "stac-student" if self.cfg.method == "stac" else "semi-supervised"

    # ------------------------------------------------------------------ one step
    def _step(self) -> dict[str, Any]:
        cfg = self.cfg
        lr = self._set_lr()
        self.student.train()
        images, targets = self._labelled_batch()
        self._check_cancel()
        if self._class_weights is not None or any(PARTIAL_KEY in t for t in targets):
            with partial_rule(self.student, cfg.partial_stain_ignore, self._class_weights):
                sup_terms = self._forward(images, targets)
        else:
            sup_terms = self._forward(images, targets)
        l_sup = supervised_loss(sup_terms)
        zero = l_sup.new_zeros(())
        l_unsup, l_reg = zero, zero
        info: dict[str, Any] = {"pseudo_per_image": [], "mixed": 0, "unmixed": 0}
        unsup_terms: dict[str, Tensor] = {}
        phase = self._phase_name()
        if phase == "semi-supervised":
            self._check_cancel()
            u_images, u_targets, info, teacher_view = self._pseudo_labelled_batch()
            self._check_cancel()
            with running_stats_frozen(self.student), self._roi_weighting(teacher_view):
                unsup_terms = self.student(u_images, u_targets)
            l_unsup = unsupervised_loss(unsup_terms, cfg.unsup_objectness)
            if cfg.uses_reg:
                l_reg = sparse_regulariser(self.student.roi_heads.last_class_logits, cfg.p_norm)
        elif phase == "stac-student":
            self._check_cancel()
            u_images, u_targets, info = self._stac_batch()
            with running_stats_frozen(self.student):
                unsup_terms = self.student(u_images, u_targets)
            l_unsup = supervised_loss(unsup_terms)
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

    def _restore_buffers(self, saved: dict[str, Tensor]) -> None:
        with torch.no_grad():
            for name, buf in self.student.named_buffers():
                buf.copy_(saved[name])

    def _check_cancel(self) -> None:
        # Under torchrun a step is never abandoned half-way (the other ranks would wait in
        # its all-reduce): a cancel takes effect between steps, on every rank at once.
        if self._cancel.is_set() and self.world.size == 1:
            raise _Cancelled

    def _set_lr(self) -> float:
        cfg = self.cfg
        if cfg.warmup and self.iteration < cfg.warmup:
            factor = 0.001 + (1 - 0.001) * self.iteration / cfg.warmup
        else:
            factor = 1.0
        if cfg.lr_schedule == "cosine":
            factor *= 0.05 + 0.95 * 0.5 * (1.0 + math.cos(math.pi * self.progress()))
        semi = cfg.method != "supervised" and self.teacher is not None
        # the linear scaling rule: under torchrun the global batch is world-size times larger
        lr = (cfg.semi_lr if semi and cfg.semi_lr is not None else cfg.lr) * factor * self.world.size
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr

    # ------------------------------------------------------------------ batches
    def _coin(self) -> bool:
        """A fair coin from the generator every rank draws alike."""
        return bool(torch.rand((), generator=self.gen) < 0.5)

    def _this_rank(self, draws: list, batch: int) -> list:
        """This rank's ``batch`` of draws made alike for the global batch on every rank."""
        lo = self.world.rank * batch
        return draws[lo : lo + batch]

    def _own_share(self, cycle: _Cycler, batch: int) -> list[tuple[int, bool]]:
        """This rank's (index, flipped) share of the global batch: every rank draws the
        global batch's indices and flips alike (one process: the whole batch)."""
        idx = cycle.take(batch * self.world.size)
        return self._this_rank([(i, self._coin()) for i in idx], batch)

    def _own_turns(self, batch: int) -> list[tuple[bool, bool]]:
        """This rank's (vertical flip, transpose) share of the global labelled batch, drawn
        alike on every rank after the flips; none unless the labelled view is dihedral, so
        that "flip" runs draw exactly what they always drew."""
        if self.cfg.labelled_view != "dihedral":
            return [(False, False)] * batch
        return self._this_rank([(self._coin(), self._coin()) for _ in range(batch * self.world.size)], batch)

    def _labelled_batch(self) -> tuple[list[Tensor], list[dict[str, Tensor]]]:
        images, targets = [], []
        share = self._own_share(self._lab_cycle, self.cfg.labelled_batch)
        turns = self._own_turns(self.cfg.labelled_batch)
        for (i, flip), (vertical, transpose) in zip(share, turns, strict=True):
            im, boxes, labels = self._labelled[i]
            im = im.float().div(255)
            if flip:
                im, boxes = hflip(im, boxes)
            im, boxes = turn(im, boxes, vertical, transpose)
            images.append(im.to(self.device))
            target = {"boxes": boxes.to(self.device), "labels": labels.to(self.device)}
            if i >= self._n_full and self.cfg.partial_stain_ignore:
                mark_partial(target, im)
            targets.append(target)
        return images, targets

    def _pseudo_labelled_batch(
        self,
    ) -> tuple[list[Tensor], list[dict[str, Tensor]], dict[str, Any], dict[str, Any]]:
        """The student's unlabelled batch: strong views of the teacher's pseudo-labels.

        Also returns what the RoI weighting needs of the teacher (its features of the weak
        views), empty when neither soft negatives nor the ignore band is on.
        """
        cfg = self.cfg
        share = self._own_share(self._unl_cycle, cfg.unlabelled_batch)
        idx = [i for i, _ in share]
        weak_views, flips = [], []
        for i, flip in share:
            im = self._unlabelled[i].float().div(255)
            weak_views.append(im.flip(-1) if flip else im)
            flips.append(flip)
        assert self.teacher is not None
        adaptive = cfg.pseudo_rule != "fixed" or cfg.ignore_low is not None
        floor = self.teacher.roi_heads.score_thresh if adaptive else cfg.threshold
        if cfg.ignore_low is not None:
            floor = min(floor, cfg.ignore_low)
        dets, teacher_view = self._teacher_predict(
            weak_views, floor, keep_features=cfg.soft_negatives or cfg.soft_targets
        )
        if cfg.pseudo_rule == "gmm":
            for det in dets:
                self.scores.add(det["labels"], det["scores"])
            thresholds: list[float] | float = self.scores.thresholds()
        else:
            thresholds = cfg.threshold
        images, targets, per_image, ignored_per_image = [], [], [], []
        self.last_pseudo = []
        mixed = unmixed = 0
        for i, flip, view, det in zip(idx, flips, weak_views, dets, strict=True):
            boxes, labels, scores, ignored = select_pseudo(
                det["boxes"], det["labels"], det["scores"], cfg.pseudo_rule, thresholds, cfg.ignore_low
            )
            if i in self._known:
                boxes, labels, scores, ignored = with_known_boxes(
                    boxes, labels, scores, ignored, *self._known_view(i, flip, view)
                )
            per_image.append(len(boxes))
            ignored_per_image.append(len(ignored))
            self.last_pseudo.append((i, flip, boxes, labels))
            if cfg.uses_mixing and len(boxes):
                view, m, u = mix_pseudo_boxes(view, boxes, labels, scores, self.bank, self._local_gen)
                mixed, unmixed = mixed + m, unmixed + u
            images.append(self.strong(view).to(self.device))
            target = {"boxes": boxes.to(self.device), "labels": labels.to(self.device)}
            if cfg.ignore_low is not None:
                target["ignore_boxes"] = ignored.to(self.device)
            if cfg.unsup_stain_ignore:
                # the weak view's geometry is the strong view's; its colours are the tile's own
                target["stain_integral"] = stain_integral(view).to(self.device)
            targets.append(target)
        info = {
            "pseudo_per_image": per_image,
            "ignored_per_image": ignored_per_image,
            "thresholds": [round(float(t), 4) for t in thresholds]
            if isinstance(thresholds, list)
            else [float(thresholds)] * len(self.classes),
            "mixed": mixed,
            "unmixed": unmixed,
        }
        return images, targets, info, teacher_view

    @contextlib.contextmanager
    def _roi_weighting(self, teacher_view: dict[str, Any]) -> Iterator[None]:
        """During the student's unlabelled forward, weight its sampled RoIs' classification
        loss by the teacher's background probability (soft negatives) and drop the RoIs on
        ignored boxes (ignore band); a no-op when neither is on. ``unsup_normalise``
        "split" averages the foreground and the background RoIs apart. With the stain
        prior, background RoIs and RPN anchors that may be missed cells get no loss.

        With soft class targets instead, every RoI matched to no pseudo-box (those on
        ignored boxes too) learns the teacher's class distribution for its box, weight 1.
        """
        cfg = self.cfg
        heads = self.student.roi_heads
        rpn = self.student.rpn
        heads.split_normalise = cfg.unsup_normalise == "split"
        if cfg.unsup_stain_ignore:

            def anchor_unknown(anchors: Tensor, target: dict) -> Tensor:
                return stain_unknown(target["stain_integral"], anchors, target["boxes"], cfg.unsup_stain_ignore)

            rpn.anchor_unknown = anchor_unknown
        try:
            with self._roi_weighting_parts(teacher_view):
                yield
        finally:
            heads.split_normalise = False
            rpn.anchor_unknown = None

    @contextlib.contextmanager
    def _roi_weighting_parts(self, teacher_view: dict[str, Any]) -> Iterator[None]:
        """The soft targets or the per-RoI weights of ``_roi_weighting``."""
        cfg = self.cfg
        heads = self.student.roi_heads
        if cfg.soft_targets:

            def soft_targets(proposals: list[Tensor], labels: list[Tensor], _targets: list[dict]):
                probs = self._teacher_class_probs(teacher_view, proposals)
                if cfg.soft_temperature != 1.0:
                    probs = torch.softmax(torch.log(probs.clamp_min(1e-12)) / cfg.soft_temperature, dim=-1)
                return probs, torch.cat(labels) == 0

            heads.roi_soft_targets = soft_targets
            try:
                yield
            finally:
                heads.roi_soft_targets = None
            return
        fg_iou = heads.proposal_matcher.high_threshold
        # Nothing to weight: every RoI would weigh 1 in roi_class_weights below.
        if (
            not cfg.soft_negatives
            and cfg.ignore_low is None
            and cfg.unsup_background == 1.0
            and cfg.unsup_min_iou <= fg_iou
            and cfg.unsup_normalise == "joint"
            and not cfg.unsup_stain_ignore
        ):
            yield
            return

        def weighting(proposals: list[Tensor], labels: list[Tensor], targets: list[dict]) -> Tensor:
            bg_probs: list[Tensor | None] = [None] * len(proposals)
            if cfg.soft_negatives:
                bg = self._teacher_background(teacher_view, proposals)
                bg_probs = list(bg.split([len(p) for p in proposals]))
            out = []
            for props, lab, target, bg_p in zip(proposals, labels, targets, bg_probs, strict=True):
                ignore = target.get("ignore_boxes")
                on_ignored = loose = None
                if ignore is not None and ignore.numel() and props.numel():
                    on_ignored = box_ops.box_iou(props, ignore).max(dim=1).values >= fg_iou
                if "stain_integral" in target:
                    unknown = stain_unknown(target["stain_integral"], props, target["boxes"], cfg.unsup_stain_ignore)
                    on_ignored = unknown if on_ignored is None else on_ignored | unknown
                if cfg.unsup_min_iou > fg_iou and target["boxes"].numel() and props.numel():
                    loose = box_ops.box_iou(props, target["boxes"]).max(dim=1).values < cfg.unsup_min_iou
                out.append(roi_class_weights(lab, bg_p, on_ignored, cfg.unsup_background, loose))
            return torch.cat(out)

        heads.roi_weighting = weighting
        try:
            yield
        finally:
            heads.roi_weighting = None

    def _teacher_background(self, view: dict[str, Any], proposals: list[Tensor]) -> Tensor:
        """The teacher's background probability for each proposal box."""
        return self._teacher_class_probs(view, proposals)[:, 0]

    @torch.no_grad()
    def _teacher_class_probs(self, view: dict[str, Any], proposals: list[Tensor]) -> Tensor:
        """The teacher's class distribution (background first) for each proposal box, from
        its features of the weak views (the strong views share their geometry)."""
        assert self.teacher is not None
        props = [p.detach() for p in proposals]
        return self.teacher.roi_heads.class_probabilities(view["features"], props, view["image_sizes"])

    def _teacher_predict(
        self, views: list[Tensor], threshold: float, keep_features: bool = False
    ) -> tuple[list[dict[str, Tensor]], dict[str, Any]]:
        """Teacher detections for pseudo-labels: the teacher's own eval forward, scored as
        ``pseudo_score`` says, with boxes under ``threshold`` dropped inside the box head,
        before its NMS, which is where its post-processing spends. With ``keep_features``,
        also the feature maps the forward computed (for soft negatives and soft targets),
        caught on their way into the RPN."""
        assert self.teacher is not None
        teacher = self.teacher
        heads = teacher.roi_heads
        caught: dict[str, Any] = {}

        def catch(_rpn: nn.Module, args: tuple) -> None:
            caught["features"], caught["image_sizes"] = args[1], args[0].image_sizes

        saved = heads.score_thresh, heads.score_by
        heads.score_thresh, heads.score_by = threshold, self.cfg.pseudo_score
        hook = teacher.rpn.register_forward_pre_hook(catch) if keep_features else None
        try:
            dets = predict_images(teacher, views, batch_size=max(1, len(views)), device=self.device)
            if hook is not None:
                hook.remove()
                hook = None
            if self.cfg.teacher_views > 1:
                looks = [[d] for d in dets]
                for flip in VIEW_FLIPS[1 : self.cfg.teacher_views]:
                    turned = [flip_image(v, *flip) for v in views]
                    for look, v, d in zip(
                        looks, views, predict_images(teacher, turned, max(1, len(views)), self.device), strict=True
                    ):
                        look.append({**d, "boxes": flip_boxes(d["boxes"], v.shape[-1], v.shape[-2], *flip)})
                dets = [merge_views(look) for look in looks]
        finally:
            heads.score_thresh, heads.score_by = saved
            if hook is not None:
                hook.remove()
        return dets, caught

    def _known_view(self, i: int, flip: bool, view: Tensor) -> tuple[Tensor, Tensor]:
        """The user's boxes and labels of unlabelled-list tile ``i`` (partly annotated), in
        the frame of its weak view."""
        boxes, labels = self._known[i]
        if flip:
            boxes = flip_boxes(boxes, view.shape[-1], view.shape[-2], True, False)
        return boxes, labels

    def _make_stac_pseudo_labels(self) -> list[tuple[Tensor, Tensor]]:
        assert self.teacher is not None
        out = []
        for k in range(0, len(self._unlabelled), 8):
            views = [im.float().div(255) for im in self._unlabelled[k : k + 8]]
            for j, det in enumerate(self._teacher_predict(views, self.cfg.stac_threshold)[0], start=k):
                keep = det["scores"] >= self.cfg.stac_threshold
                boxes, labels = det["boxes"][keep], det["labels"][keep]
                if j in self._known:
                    boxes, labels, _, _ = with_known_boxes(
                        boxes, labels, det["scores"][keep], boxes[:0], *self._known[j]
                    )
                out.append((boxes, labels))
        return out

    def _stac_batch(self) -> tuple[list[Tensor], list[dict[str, Tensor]], dict[str, Any]]:
        assert self._stac_targets is not None
        images, targets, per_image = [], [], []
        for i, flip in self._own_share(self._unl_cycle, self.cfg.unlabelled_batch):
            boxes, labels = self._stac_targets[i]
            im = self._unlabelled[i].float().div(255)
            if flip:
                im, boxes = hflip(im, boxes)
            images.append(self.strong(im).to(self.device))
            targets.append({"boxes": boxes.to(self.device), "labels": labels.to(self.device)})
            per_image.append(len(boxes))
        return images, targets, {"pseudo_per_image": per_image, "mixed": 0, "unmixed": 0}

    # ------------------------------------------------------------------ data
    #: Smaller tiles leave a 1 x 1 map at the deepest level, which BatchNorm cannot train on.
    MIN_SIDE = 32
    #: Anchor-box matching holds anchors x boxes IoU values: cap its size, not the machine's memory.
    MAX_MATCH_BYTES = 1 << 30

    def _load_image(self, tile: Tile) -> Tensor:
        if min(tile.width, tile.height) < self.MIN_SIDE:
            raise TrainingError(
                f"tile {tile.name!r} is {tile.width}x{tile.height} px; tiles must be at least "
                f"{self.MIN_SIDE} px on each side to train on"
            )
        return torch.from_numpy(np.ascontiguousarray(tile.pixels())).permute(2, 0, 1).contiguous()

    def _load_labelled(self, tile: Tile) -> tuple[Tensor, Tensor, Tensor]:
        im = self._load_image(tile)
        b = tile.boxes
        label_of = {cid: i for i, cid in enumerate(self.classes.ids, start=1)}
        unknown = sorted(set(b.class_ids.tolist()) - set(label_of))
        if unknown:
            raise TrainingError(
                f"tile {tile.name!r}: boxes of class ids {unknown} are not in {self.classes.names}"
            )
        anchors = sum((tile.width // s + 1) * (tile.height // s + 1) for s in (4, 8, 16, 32, 64)) * len(
            self.cfg.model.aspect_ratios
        )
        if anchors * len(b) * 4 > self.MAX_MATCH_BYTES:
            most = self.MAX_MATCH_BYTES // (4 * anchors)
            raise TrainingError(
                f"tile {tile.name!r} has {len(b):,} boxes; at most {most:,} fit in a tile of "
                f"{tile.width}x{tile.height} px (matching them to the anchors would take "
                f"{anchors * len(b) * 4 / 2**30:.1f} GiB); cut it into smaller tiles"
            )
        keep = (b.xyxy[:, 2] > b.xyxy[:, 0]) & (b.xyxy[:, 3] > b.xyxy[:, 1])
        boxes = torch.as_tensor(b.xyxy[keep], dtype=torch.float32).reshape(-1, 4)
        labels = torch.as_tensor([label_of[int(c)] for c in b.class_ids[keep]], dtype=torch.int64)
        return im, boxes, labels

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
            "rng": {
                "generator": self.gen.get_state(),
                "torch": torch.get_rng_state(),
                "labelled_order": list(self._lab_cycle.order),
                "labelled_pos": self._lab_cycle.pos,
                "unlabelled_order": list(self._unl_cycle.order),
                "unlabelled_pos": self._unl_cycle.pos,
            },
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

    def _warm_start(self, source: str | os.PathLike | dict) -> None:
        """Start from an earlier model's predicting weights (student and, if used, teacher)."""
        ckpt = source if isinstance(source, dict) else read_checkpoint(source)
        where = ckpt.get("_path", "checkpoint")
        names = [c.name for c in classes_from_checkpoint(ckpt)]
        if names != self.classes.names:
            raise CheckpointError(f"{where}: trained for classes {names}, not {self.classes.names}")
        load_state(self.student, predicting_state(ckpt), where)

    def _init_nucleus(self) -> None:
        """Backbone, FPN, RPN and box regression from the bundled nucleus model."""
        from ..model.bundled import NUCLEUS

        ckpt = read_checkpoint(NUCLEUS)
        want = config_from_checkpoint(ckpt).model.architecture()
        differ = [
            f"{k} {v} (the nucleus model's: {want[k]})" for k, v in self.cfg.model.architecture().items() if v != want[k]
        ]
        if differ:
            raise TrainingError(
                "init 'nucleus' needs the bundled model's architecture; this run has " + "; ".join(differ)
                + ". Use init 'none' for another architecture."
            )
        transfer_weights(self.student, ckpt, ckpt["_path"])

    @classmethod
    def resume(
        cls,
        path: str | os.PathLike | dict,
        labelled: Sequence[Tile],
        unlabelled: Sequence[Tile],
        config: TrainConfig | None = None,
        **kwargs: Any,
    ) -> Trainer:
        """Continue an interrupted run where its checkpoint left it.

        With ``config`` the run continues under that config instead of the saved one (more
        iterations, another method after a shared burn-in, a longer budget); its model
        must be the checkpoint's, since the weights are. Without, the saved config.
        """
        ckpt = path if isinstance(path, dict) else read_checkpoint(path)  # a checkpoint read already
        if is_model_only(ckpt):
            raise CheckpointError(
                f"{ckpt.get('_path', 'checkpoint')}: holds only the trained model, not the training "
                f"state; resume from the run's {TRAINING_FILE}, or start a new run from it (init_from)"
            )
        saved = config_from_checkpoint(ckpt)
        cfg = config or saved
        # how boxes are scored is prediction, not the network: a branch may score otherwise
        if dataclasses.replace(cfg.model, box_score=saved.model.box_score) != saved.model:
            raise CheckpointError(
                f"{ckpt['_path']}: cannot resume with another model ({saved.model} was saved, "
                f"{cfg.model} asked for)"
            )
        classes = classes_from_checkpoint(ckpt)
        saved_world, world = int(ckpt.get("world_size", 1)), current_world().size
        if saved_world != world:
            raise CheckpointError(
                f"{ckpt.get('_path', 'checkpoint')}: the run was trained by {saved_world} process(es) and is "
                f"resumed by {world}; resume with the same torchrun --nproc_per_node x --nnodes (its data "
                "order and learning rate depend on it)"
            )
        # Built from the checkpoint in memory: the init the config names (the bundled model,
        # read from disk) would only be overwritten by the saved weights below.
        trainer = cls(labelled, unlabelled, classes, cfg, init_from=ckpt, **kwargs)
        load_state(trainer.student, ckpt["student"], ckpt["_path"])
        if ckpt.get("teacher") is not None and cfg.method != "supervised":
            load_state(trainer.student, ckpt["teacher"], ckpt["_path"])  # checks the shapes
            trainer.teacher = trainer._frozen_copy(trainer.student.state_dict())
            load_state(trainer.student, ckpt["student"], ckpt["_path"])
            if cfg.method == "stac":
                trainer._stac_targets = trainer._make_stac_pseudo_labels()
        if ckpt.get("optimizer"):
            trainer.optimizer.load_state_dict(ckpt["optimizer"])
        trainer.iteration = int(ckpt.get("iteration", 0))
        trainer.elapsed_s = float(ckpt.get("elapsed_s", 0.0))
        if "ema_steps" in ckpt:
            trainer.ema_steps = int(ckpt["ema_steps"])
        elif ckpt.get("teacher") is not None:  # saved before the count existed
            trainer.ema_steps = max(0, trainer.iteration - int((ckpt.get("config") or {}).get("burn_in", 0)))
        for buf, values in zip(trainer.scores.buffers, ckpt.get("score_buffers") or [], strict=False):
            buf.extend(float(v) for v in values)
        rng = ckpt.get("rng")
        saved_ids = ckpt.get("tile_ids")
        if saved_ids is not None and saved_ids != trainer.tile_ids:
            raise TrainingError(
                f"{ckpt['_path']}: the run was trained on other annotated tiles (ids "
                f"{saved_ids['labelled'][:5]}... fully, {saved_ids['partial'][:5]}... partly; now "
                f"{trainer.tile_ids['labelled'][:5]}..., {trainer.tile_ids['partial'][:5]}...); resume with the "
                "same tiles (or start a new run with --init-from)"
            )
        if rng and len(rng["labelled_order"]) not in (0, trainer._lab_cycle.n):
            raise TrainingError(
                f"{ckpt['_path']}: the run was trained on {len(rng['labelled_order'])} labelled tiles, "
                f"and {trainer._lab_cycle.n} are given now; resume with the same tiles (or start a "
                "new run with --init-from)"
            )
        if rng:
            trainer.gen.set_state(rng["generator"])
            torch.set_rng_state(rng["torch"])
            trainer._lab_cycle.order, trainer._lab_cycle.pos = (
                list(rng["labelled_order"]),
                rng["labelled_pos"],
            )
            if len(trainer._unlabelled) == len(rng["unlabelled_order"]) or not rng["unlabelled_order"]:
                trainer._unl_cycle.order, trainer._unl_cycle.pos = (
                    list(rng["unlabelled_order"]),
                    rng["unlabelled_pos"],
                )
        return trainer
