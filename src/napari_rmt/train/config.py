"""One config for a training run, with the paper's defaults; saved with every checkpoint."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from ..data.errors import NapariRmtError
from ..data.scale import PLAUSIBLE
from ..model.config import LEGACY, ModelConfig
from .methods import METHODS, TABLE, Method

#: The method the GUI and ``napari-rmt train`` use unless told otherwise.
RECOMMENDED = "rmt+"
#: A run's length unless told: the command line's is ``TrainConfig.iterations`` (2000); the
#: widget's is shorter, with a 20-minute time limit beside it (what a CPU user waits; 500
#: steps take about 30 minutes on 2 cores, docs/benchmarks.md).
WIDGET_ITERATIONS = 500
WIDGET_MINUTES = 20
PSEUDO_RULES = ("fixed", "gmm", "topk")
PSEUDO_SCORES = ("class", "foreground")
SCHEDULES = ("constant", "cosine")
STRONG_VIEWS = ("unbiased", "stain")
LABELLED_VIEWS = ("flip", "dihedral")
UNSUP_NORMALISE = ("joint", "split")
#: Where a training starts: random init, or the bundled nucleus model.
INITS = ("none", "nucleus")

#: The recipe every method a user picks shares (docs/tuning.md): a cross-entropy box head
#: whose scores mean what the cut says, a cosine schedule, four labelled tiles a step. The
#: paper's focal head at a constant rate was unstable on a set never seen before
#: (supervised, nucleus init, 12 CPU minutes: 12.8 any-class F1 at 454 steps, 45.8 at 300).
RECIPE: dict[str, Any] = {
    "lr_schedule": "cosine",
    "labelled_batch": 4,
    "model": {"focal_gamma": 0.0},
}

#: What a method changes from the dataclass defaults (which are the paper's), under the
#: "recipe" preset. ``rmt+`` is ``rmt`` with the published rules for an unsure teacher
#: (SPEC §5) on the recipe; why each is there is in docs/tuning.md. ``supervised`` is the
#: recipe without the unlabelled terms: the fair baseline, and what a user without
#: unlabelled tiles gets. The "paper" preset keeps the paper's settings for its methods.
METHOD_DEFAULTS: dict[str, dict[str, Any]] = {
    "supervised": RECIPE,
    "rmt+": {
        **RECIPE,
        "soft_negatives": True,
        "ignore_low": 0.2,
        "unsup_stain_ignore": 0.3,
        "pseudo_rule": "fixed",
        "threshold": 0.5,
        "lambda_u": 0.5,
        "ema_decay": 0.99,
        "burn_in_fraction": 0.75,
        "predict_with": "auto",
    },
}
#: "recipe": every method on the product's recipe (``METHOD_DEFAULTS``); "paper": the
#: paper's settings for its methods (``rmt+``, not in the paper, keeps its recipe).
PRESETS = ("recipe", "paper")


def default_init(model: ModelConfig) -> str:
    """Where a run starts unless told: the bundled nucleus model where it fits the
    architecture asked for (the CLI's and the widget's default), else random init.

    The bundled model is the default ``resnet18`` from random init (its README), so this
    needs no read of the file; ``Trainer`` checks against the file's own config."""
    fits = model.weights is None and model.architecture() == ModelConfig(backbone="resnet18").architecture()
    return "nucleus" if fits else "none"


def burn_in_for(iterations: int, warm_start: bool = False, fraction: float | None = None) -> int:
    """The burn-in when none is given (CLI, widget, experiment alike).

    From random init, ``fraction`` of the run (a method's ``burn_in_fraction``, else half):
    the teacher has to be right about most cells before its pseudo-labels help (measured,
    docs/benchmarks.md). Warm-started from a trained model, a tenth: the teacher is
    already trained.
    """
    share = 0.1 if warm_start else (fraction if fraction is not None else 0.5)
    return max(0, min(iterations - 1, max(1, int(iterations * share))))


@dataclass
class TrainConfig:
    """A training run. Defaults follow the paper (Sec. 2) and Unbiased Teacher where it is silent.

    ``iterations`` counts student steps, burn-in included. For ``stac`` the first
    ``burn_in`` steps train the teacher on labelled data, the rest train the student.
    """

    method: str = "rmt"
    iterations: int = 2000
    burn_in: int = 500
    labelled_batch: int = 2
    unlabelled_batch: int = 2
    lr: float = 0.02
    #: lr after burn-in (None: ``lr``). From random init the teacher is under-confident
    #: when burn-in ends, and at lr 0.02 the unlabelled loss overwhelms the labelled one
    #: (measured, docs/benchmarks.md); a lower rate for the semi-supervised phase holds it.
    semi_lr: float | None = None
    warmup: int = 100
    momentum: float = 0.9
    weight_decay: float = 1e-4
    grad_clip: float = 10.0
    lambda_u: float = 4.0  # Eq. 6
    lambda_r: float = 1.0  # Eq. 6
    p_norm: float = 0.5  # Eq. 5
    ema_decay: float = 0.996  # Eq. 7, sigma
    threshold: float = 0.7  # pseudo-label confidence (Unbiased Teacher); the fallback of "gmm"
    #: How pseudo-boxes are chosen from the teacher's detections: "fixed" (score >=
    #: ``threshold``), "gmm" (a threshold per class fitted to a rolling buffer of the
    #: teacher's scores, Consistent Teacher), "topk" (per image the round(sum of scores)
    #: best boxes).
    pseudo_rule: str = "fixed"
    #: What the teacher's score of a box is when pseudo-boxes are chosen: "class" (its
    #: class probability, as the paper and the protocol score) or "foreground" (1 - its
    #: background probability, labelled with its most probable class): a cell the teacher
    #: is sure of but whose class it hesitates over is a pseudo-box, not background.
    pseudo_score: str = "class"
    gmm_buffer: int = 2000  # teacher scores kept per class for the "gmm" rule
    gmm_min_scores: int = 100  # below this many scores a class uses ``threshold``
    #: Soft Teacher's negatives: a student proposal matched to no pseudo-box counts as
    #: background with the teacher's background probability for that box as its weight.
    soft_negatives: bool = False
    #: Soft class targets (after Humble Teacher, Tang et al. 2021): a student proposal
    #: matched to no pseudo-box learns the teacher's class distribution for that box (the
    #: background included) instead of "background", at ``soft_temperature`` (below 1
    #: sharpens it). The doubtful cells of the ignore band then teach their likely class
    #: instead of nothing. Replaces soft negatives' weights for those proposals.
    soft_targets: bool = False
    soft_temperature: float = 1.0
    #: Weight of the RPN's objectness term in the unlabelled loss (Eq. 4 has 1). Anchors
    #: on the cells a shy teacher missed are RPN negatives there; 0 leaves the RPN to the
    #: labelled tiles.
    unsup_objectness: float = 1.0
    #: Weight of the background RoIs in the unlabelled classification loss (Eq. 4 has 1;
    #: with soft negatives it multiplies the teacher's background probability). A teacher
    #: that finds half of the cells makes the other half background RoIs there, whatever
    #: it thinks of them; 0 learns only the pseudo-boxes' classes from the unlabelled tiles
    #: and leaves "not a cell" to the labelled ones. (With ``soft_targets`` the teacher's
    #: distribution is every unmatched RoI's target at weight 1, and this is not used.)
    unsup_background: float = 1.0
    #: Stain prior for the cells a shy teacher missed (``train/stain_prior.py``): on a
    #: pseudo-labelled tile, a region that would be background (a box-head RoI or an RPN
    #: anchor) but is at least this share haematoxylin-stained, and not next to a
    #: pseudo-box, gets no loss instead of "not a cell". None or 0: off (images that are
    #: not H&E have no haematoxylin channel to read). With ``soft_targets`` only the RPN's
    #: anchors: the box head's unmatched RoIs learn the teacher's distribution instead.
    unsup_stain_ignore: float | None = None
    #: How the unlabelled classification loss averages its RoIs' weighted losses
    #: (``model.heads.weighted_mean``): "joint", one average over all of them (Soft
    #: Teacher's code), or "split", the pseudo-boxes' RoIs and the background RoIs each
    #: averaged apart and added (Soft Teacher's paper, SPEC §5). A teacher that labels a
    #: few cells of a tile leaves many background RoIs and few foreground ones; joint, the
    #: background then outweighs the cells and the student learns to be shy.
    unsup_normalise: str = "joint"
    #: How many ways the teacher looks at an unlabelled tile before it labels it: 1 (the
    #: weak view), 2 (and its horizontal flip) or 4 (and both vertical flips); each box's
    #: score is the mean over the views (``pseudo.merge_views``). Costs a teacher forward
    #: per view, no backward.
    teacher_views: int = 1
    #: A student RoI is a positive of its pseudo-box only from this IoU on (the labelled
    #: tiles' 0.5 when equal); RoIs between 0.5 and this get no class loss. A pseudo-box
    #: sits a few pixels off its nucleus, and a RoI at 0.5 of it may sit under 0.5 of the
    #: nucleus: scoring it high teaches the student to prefer loose boxes. (Not used with
    #: ``soft_targets``, like ``unsup_background``.)
    unsup_min_iou: float = 0.5
    #: The student's strong view of an unlabelled tile (``train/augment.py``): "unbiased"
    #: (Unbiased Teacher's, the paper's: colour jitter, blur, random erasing) or "stain"
    #: (H&E stain amounts, brightness, slight blur; nothing erased).
    strong_view: str = "unbiased"
    #: How a labelled tile is varied (every method, every phase): "flip", a random
    #: left-right flip (the paper's weak view); "dihedral", any of the square's eight
    #: symmetries (flips and quarter turns). A nucleus has no up, left or orientation on
    #: the slide, so each symmetry is another true example of the same cells at no cost.
    labelled_view: str = "flip"
    #: Ignore band: teacher boxes scoring in [ignore_low, pseudo threshold) are neither
    #: pseudo-boxes nor background; the proposals on them get no classification loss.
    ignore_low: float | None = None
    #: The rule for partly annotated tiles (``train/partial.py``): in the labelled loss, an
    #: unboxed region of such a tile that is at least this share haematoxylin-stained and
    #: not next to a user box may be a nucleus nobody boxed, and gets no background loss.
    #: None or 0: every unboxed region is background, as on a fully annotated tile.
    partial_stain_ignore: float | None = 0.3
    #: Also on partly annotated tiles: the bundled nucleus model's boxes scoring at least
    #: this, away from the user's boxes and from the boxes they deleted, are cells of an
    #: unknown class in the labelled loss (objectness and "not background"; no class, no box
    #: learnt from them). None or 0: off. On by default: on CoNSeP's partial tiles they
    #: lifted each pair measured (supervised on one seed, rmt+ on two; docs/tuning.md).
    partial_cells: float | None = 0.5
    #: Repeat factor sampling of the labelled tiles (LVIS): a class on a share f of them
    #: brings its tiles round max(1, sqrt(this / f)) times as often. 0: off.
    class_balance: float = 0.0
    #: Per-class weights of the labelled classification loss by the effective number of
    #: boxes, (1 - beta) / (1 - beta^n) (Cui et al. 2019), mean 1 over the classes; 0: off.
    class_weight_beta: float = 0.0
    stac_threshold: float = 0.9  # STAC's fixed pseudo-labels
    seed: int = 0
    device: str = "auto"  # "auto" | "cpu" | "cuda" | "cuda:N"
    log_every: int = 1
    validate_every: int = 0  # 0: never during training
    checkpoint_every: int = 0  # 0: only at the end
    #: Also checkpoint when this many seconds have passed since the last one (0: never),
    #: so that a killed run keeps its last minutes' work. Needs a checkpoint path.
    checkpoint_every_s: float = 300.0
    #: Stop when the run's training time reaches this many seconds (0: iterations only);
    #: the lr schedule and burn-in then follow the time, whichever ends first.
    time_budget_s: float = 0.0
    #: "constant" (after warm-up) or "cosine": down to 5 % of the rate at the end of the run.
    lr_schedule: str = "constant"
    #: With a time budget: burn-in ends at this fraction of it, if sooner than ``burn_in``;
    #: without one, the default burn-in is this fraction of the iterations (``burn_in_for``).
    burn_in_fraction: float | None = None
    #: Which network predicts once there is a teacher: "teacher" (the paper), "student",
    #: or "auto": the teacher when the run starts from the bundled nucleus model and the
    #: teacher has had 1 / (1 - ema_decay) EMA updates (the average's memory), else the
    #: student. From random init with a cosine schedule the last steps run at a small rate,
    #: so the final student is settled while the EMA teacher still carries weights from
    #: many steps before; from the nucleus model the weights move less and the teacher's
    #: average was the better model in 16 of 22 runs (measured, docs/benchmarks.md).
    predict_with: str = "teacher"
    #: Where the student starts: "none" (random init, or ``model.weights``), or "nucleus":
    #: the bundled nucleus model (``model/bundled.py``) with a fresh classifier.
    init: str = "none"
    #: The training tiles' pixel size (µm/px). None: unknown, tiles are taken as they are.
    pixel_size: float | None = None
    #: The pixel size the model learns at, and so its own (prediction resamples an image of
    #: another pixel size to it, ``data/scale.py``). Set by the trainer, not by hand: the
    #: pixel size of the model it starts from (the bundled nucleus model's 0.25, say) when
    #: that differs from ``pixel_size``, the tiles then resampled to it (20x tiles seen at
    #: 40x, as the start learnt its nuclei); else None, the tiles' own.
    model_pixel_size: float | None = None
    model: ModelConfig = field(default_factory=ModelConfig)

    @property
    def own_pixel_size(self) -> float | None:
        """The model's pixel size: ``model_pixel_size``, else the tiles' ``pixel_size``."""
        return self.model_pixel_size or self.pixel_size

    def __post_init__(self) -> None:
        if isinstance(self.model, dict):
            self.model = ModelConfig(**_tuples(self.model))
        self.validate()

    def validate(self) -> None:
        """Every field against its ``BOUNDS`` row, then the rules between fields."""

        def bad(msg: str) -> None:
            raise NapariRmtError(f"training config: {msg}")

        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, float) and not math.isfinite(v):
                bad(f"{f.name} is {v}; it must be a finite number")
            if f.name in BOUNDS and not BOUNDS[f.name].admits(v):
                bad(f"{f.name} {v!r} must be {BOUNDS[f.name].describe()}")
        if self.uses_teacher and self.burn_in >= self.iterations and not (
            self.time_budget_s and self.burn_in_fraction is not None
        ):
            bad(
                f"burn_in {self.burn_in} must be below iterations {self.iterations}: "
                f"{self.method} would never leave burn-in"
            )
        if self.spec.needs_burn_in and not 0 < self.burn_in < self.iterations:
            bad(f"{self.method} needs 0 < burn_in < iterations (burn_in steps train its fixed teacher)")
        if self.init == "nucleus" and self.model.weights is not None:
            bad("init 'nucleus' starts the backbone from the bundled model; it cannot also start "
                f"from weights {self.model.weights!r} (use init 'none' with those weights)")
        gamma = self.model.focal_gamma
        if not (isinstance(gamma, (int, float)) and math.isfinite(gamma) and 0.0 <= gamma <= 10.0):
            bad(f"model focal_gamma {gamma} must be a number in [0, 10] (0: cross-entropy)")

    @property
    def spec(self) -> Method:
        """The method's row of the table (``train/methods.py``)."""
        return TABLE[self.method]

    @property
    def uses_unlabelled(self) -> bool:
        """Whether the unlabelled tiles are read at all (every front end asks this)."""
        return self.spec.uses_unlabelled

    @property
    def uses_teacher(self) -> bool:
        """Whether an EMA teacher follows the student after burn-in."""
        return self.spec.teacher == "ema"

    @property
    def uses_mixing(self) -> bool:
        return self.spec.mixing

    @property
    def uses_reg(self) -> bool:
        return self.spec.regulariser

    @classmethod
    def for_method(cls, method: str, preset: str = "recipe", **overrides: Any) -> TrainConfig:
        """The config of ``method``: its own defaults under ``preset`` (``PRESETS``), then
        ``overrides``.

        ``model`` may be a dict of ``ModelConfig`` fields (laid over the method's) or a
        whole ``ModelConfig`` (taken as it is).
        """
        if preset not in PRESETS:
            raise NapariRmtError(f"training config: preset {preset!r} is not one of {PRESETS}")
        spec = TABLE.get(method)
        paper = preset == "paper" and spec is not None and spec.in_paper
        defaults = {} if paper else METHOD_DEFAULTS.get(method, {})
        values: dict[str, Any] = {k: v for k, v in defaults.items() if k != "model"}
        if "burn_in" not in overrides:
            iterations = overrides.get("iterations", TrainConfig.iterations)
            fraction = overrides.get("burn_in_fraction", values.get("burn_in_fraction"))
            values["burn_in"] = burn_in_for(iterations, fraction=fraction)
        given = overrides.pop("model", None)
        if isinstance(given, ModelConfig):
            model = given
        else:
            model = ModelConfig(**_tuples({**defaults.get("model", {}), **(given or {})}))
        values.update(overrides)
        if values.get("time_budget_s") and values.get("burn_in_fraction") is None:
            values["burn_in_fraction"] = 0.5  # a time-limited run leaves burn-in by time too
        if spec is not None and spec.needs_burn_in:
            # the fixed teacher trains first and the student needs steps after it
            iterations = values.get("iterations", TrainConfig.iterations)
            values["burn_in"] = min(max(1, values["burn_in"]), iterations - 1)
        return cls(method=method, model=model, **values)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise NapariRmtError(f"training config: unknown keys {sorted(unknown)}")
        model = data.get("model")
        if isinstance(model, dict):
            # Saved before the architecture was sized per backbone: it was built as LEGACY says.
            data = {**data, "model": {**LEGACY, **model}}
        return cls(**_tuples(data))


@dataclass(frozen=True)
class Bounds:
    """The values a setting admits: a number in an interval, or one of ``choices``; also
    None when ``optional``. Declared once per field (``BOUNDS``): ``validate()``, the
    command line's option types and the widget's form all read it."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    choices: tuple = ()
    optional: bool = False
    #: what a special value means, said in the error ("0: off")
    note: str = ""

    def admits(self, value: Any) -> bool:
        if value is None:
            return self.optional
        if self.choices:
            return value in self.choices
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return False
        above = self.low is None or (value > self.low if self.low_open else value >= self.low)
        below = self.high is None or (value < self.high if self.high_open else value <= self.high)
        return above and below

    def describe(self) -> str:
        if self.choices:
            text = f"one of {self.choices}"
        elif self.high is None:
            text = f"a finite number {'>' if self.low_open else '>='} {self.low:g}"
        else:
            text = f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"
        extras = [e for e in (self.note, "or None" if self.optional else "") if e]
        return text + (f" ({'; '.join(extras)})" if extras else "")


_AT_LEAST_0, _SHARE = Bounds(0), Bounds(0, 1)

#: Every setting's admitted values (``Bounds``), in one place.
BOUNDS: dict[str, Bounds] = {
    "method": Bounds(choices=METHODS),
    "iterations": Bounds(1),
    "burn_in": _AT_LEAST_0,
    "labelled_batch": Bounds(1),
    "unlabelled_batch": Bounds(1),
    "lr": Bounds(0, low_open=True),
    "semi_lr": Bounds(0, low_open=True, optional=True, note="None: the same as lr"),
    "momentum": Bounds(0, 1, high_open=True),
    **dict.fromkeys(("weight_decay", "grad_clip", "warmup", "checkpoint_every", "log_every", "validate_every",
                     "lambda_u", "lambda_r", "unsup_objectness", "unsup_background", "time_budget_s",
                     "checkpoint_every_s"), _AT_LEAST_0),
    "threshold": _SHARE,
    "stac_threshold": _SHARE,
    "ema_decay": _SHARE,
    "p_norm": Bounds(0, 1, low_open=True, note="Eq. 5"),
    "pseudo_rule": Bounds(choices=PSEUDO_RULES),
    "pseudo_score": Bounds(choices=PSEUDO_SCORES),
    "soft_temperature": Bounds(0.05, 10),
    "teacher_views": Bounds(choices=(1, 2, 4), note="the view and its flips"),
    "unsup_min_iou": Bounds(0.5, 1, note="0.5: as on labelled tiles"),
    "unsup_stain_ignore": Bounds(0, 1, optional=True, note="0: off"),
    "partial_stain_ignore": Bounds(0, 1, optional=True, note="0: off"),
    "partial_cells": Bounds(0, 1, optional=True, note="0: off"),
    "class_balance": Bounds(0, 1, note="0: off"),
    "class_weight_beta": Bounds(0, 1, high_open=True, note="0: off"),
    "unsup_normalise": Bounds(choices=UNSUP_NORMALISE),
    "strong_view": Bounds(choices=STRONG_VIEWS),
    "labelled_view": Bounds(choices=LABELLED_VIEWS),
    "lr_schedule": Bounds(choices=SCHEDULES),
    "gmm_buffer": Bounds(10),
    "gmm_min_scores": Bounds(2),
    "ignore_low": Bounds(0, 1, optional=True, note="None: no ignore band"),
    "burn_in_fraction": Bounds(0, 1, high_open=True, optional=True),
    "predict_with": Bounds(choices=("teacher", "student", "auto")),
    "init": Bounds(choices=INITS),
    "pixel_size": Bounds(*PLAUSIBLE, optional=True, note="µm per pixel; about 0.25 at 40x"),
    "model_pixel_size": Bounds(*PLAUSIBLE, optional=True, note="µm per pixel; set by the trainer"),
}


def _tuples(d: dict[str, Any]) -> dict[str, Any]:
    """JSON and checkpoints turn tuples into lists; the dataclasses want tuples back."""
    return {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
