"""The training settings both front ends offer, one row each: label, help, the form's range.

The command line makes an option of each row (``CLI_TUNABLES``) and the widget's advanced
form a field (``gui/panels/tunables.py``); what a setting admits is its ``BOUNDS`` row in
``train/config.py``, and its default the method's (``TrainConfig.for_method``). Plain data:
no torch, so ``--help`` costs nothing.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .config import BOUNDS, Bounds, TrainConfig


@dataclass(frozen=True)
class Tunable:
    """A training setting that the command line and the widget's advanced form both offer.

    One place for its label, help and the form's range, so the two front ends cannot
    drift apart; what it admits is its field's ``BOUNDS`` row (the command line accepts
    that, the form shows ``low``-``high`` within it); its default is never written here
    (it is the method's, ``TrainConfig.for_method``). The kind (bool, int, float, choice)
    follows the ``TrainConfig`` field's type.
    """

    name: str  #: the TrainConfig field
    label: str  #: the form's row (a check box's own text for a bool)
    help: str
    low: float = 0.0  #: the form's range (inside ``bounds``)
    high: float = 1.0
    step: float = 0.05
    decimals: int = 2
    #: the command-line flag, when not ``--`` + the name with dashes
    flag: str | None = None
    #: also set to the same value (the widget's one batch sets both batches)
    also: tuple[str, ...] = ()

    @property
    def bounds(self) -> Bounds:
        return BOUNDS.get(self.name, Bounds())

    @property
    def choices(self) -> tuple[str, ...]:
        """The named choices of a choice setting (from ``bounds``)."""
        return tuple(c for c in self.bounds.choices if isinstance(c, str))

    @property
    def optional(self) -> bool:
        """``None`` is admitted, shown as "off" at ``low`` in the form (the ignore band)."""
        return self.bounds.optional

    @property
    def option(self) -> str:
        return self.flag or "--" + self.name.replace("_", "-")

    @property
    def kind(self) -> str:
        if self.choices:
            return "choice"
        kind = _FIELD_TYPES[self.name]
        return {"bool": "bool", "int": "int"}.get(kind, "float")


_FIELD_TYPES = {f.name: str(f.type) for f in dataclasses.fields(TrainConfig)}

#: The advanced settings, in the form's order. The command line offers each as an option
#: (``burn_in`` and ``batch`` keep their own, with method-dependent defaults).
TUNABLES: tuple[Tunable, ...] = (
    Tunable("burn_in", "burn-in", "steps on labelled tiles only before the teacher starts labelling",
            high=1_000_000, step=10),
    Tunable("threshold", "threshold", "teacher score from which a box becomes a pseudo-label (fixed rule; "
            "the fallback of the adaptive ones)"),
    Tunable("pseudo_rule", "pseudo rule", "fixed: one threshold; gmm: a threshold per class fitted to the "
            "teacher's recent scores; topk: per tile the round(sum of scores) best boxes"),
    Tunable("pseudo_score", "scored by", "class: a box's score is its class probability; foreground: "
            "1 - its background probability, so a cell whose class the teacher hesitates over still "
            "becomes a pseudo-label (with its most probable class)"),
    Tunable("ignore_low", "ignore from", "teacher boxes scoring between this and the threshold are "
            "neither cells nor background for the student (off: no ignore band)"),
    Tunable("soft_negatives", "soft negatives", "a region the teacher half-believes is a cell counts as "
            "background only in proportion to the teacher's background score"),
    Tunable("soft_targets", "soft class targets", "a region the teacher is unsure of teaches the student "
            "the teacher's class probabilities for it, instead of 'background' or nothing"),
    Tunable("soft_temperature", "soft temperature", "of the soft class targets: below 1 sharpens the "
            "teacher's probabilities, 1 takes them as they are", low=0.05, high=10.0, step=0.1),
    Tunable("unsup_objectness", "RPN on pseudo", "weight of the proposal network's loss on pseudo-labels "
            "(Eq. 4: 1); 0 leaves the proposals to the labelled tiles, so cells the teacher missed are not "
            "taught as background", high=10.0, step=0.25),
    Tunable("unsup_background", "background on pseudo", "weight of the box head's 'not a cell' loss on "
            "pseudo-labelled tiles (Eq. 4: 1); 0 learns only the pseudo-boxes' classes there, so cells the "
            "teacher missed are not taught as background", high=10.0, step=0.25),
    Tunable("unsup_stain_ignore", "stain prior", "on pseudo-labelled tiles, a region that is at least this "
            "share haematoxylin-stained and not next to a pseudo-box is not taught as background: it may be a "
            "cell the teacher missed (off / 0: every unmatched region is background; for H&E only)"),
    Tunable("partial_stain_ignore", "partial tiles", "on a partly annotated tile, an unboxed region that is at "
            "least this share haematoxylin-stained and not next to a user box may be a nucleus nobody boxed: it is "
            "not taught as background (off / 0: unboxed = background, as on a fully annotated tile)"),
    Tunable("partial_cells", "nucleus model on partial tiles", "on a partly annotated tile, a nucleus the "
            "bundled nucleus model finds with at least this score, away from the user's boxes and the boxes they "
            "deleted, is taught as a cell of unknown class: not background, its class not learnt (off / 0: only "
            "the stain rule)"),
    Tunable("class_balance", "class balance", "labelled tiles holding a rare class come round more often: a "
            "class on a share f of them repeats its tiles sqrt(this / f) times (0: off)"),
    Tunable("class_weight_beta", "class weights β", "weight each class's loss by the effective number of its "
            "labelled boxes, (1 - β) / (1 - β^n): rare classes weigh more (0: off; 0.99-0.999 typical)",
            high=0.9999, step=0.001, decimals=4),
    Tunable("unsup_normalise", "averaged", "how the box head's loss on pseudo-labelled tiles is averaged: "
            "joint: over all regions at once; split: the pseudo-boxes' regions and the background regions each "
            "apart, so a few pseudo-boxes weigh as much as the many background regions"),
    Tunable("teacher_views", "teacher's looks", "how many ways the teacher looks at a tile before it "
            "labels it: 1, 2 (and flipped left-right) or 4 (and upside down); a box's score is the mean "
            "over the looks", low=1, high=4, step=1),
    Tunable("unsup_min_iou", "pseudo-box IoU", "a student's box counts as a pseudo-box's cell only from "
            "this overlap with it on (0.5: as on labelled tiles); looser boxes get no class loss, so the "
            "student does not learn to score loose boxes high", low=0.5, step=0.05),
    Tunable("strong_view", "student's view", "how the student's copy of an unlabelled tile is altered: "
            "unbiased: colour jitter, blur and erased patches (Unbiased Teacher, the paper's); stain: the "
            "amount of each H&E stain, brightness, slight blur, nothing erased"),
    Tunable("labelled_view", "labelled view", "how an annotated tile is varied: flip: left-right (the "
            "paper's); dihedral: any flip or quarter turn (nuclei have no up or left)"),
    Tunable("lambda_u", "λu", "weight of the loss on pseudo-labelled tiles (Eq. 6)", high=100.0, step=0.5),
    Tunable("lambda_r", "λr", "weight of the sparse regulariser that pushes class scores to be decisive "
            "(Eq. 6)", high=100.0, step=0.5),
    Tunable("p_norm", "p (L_reg)", "the p of the regulariser's p-norm (Eq. 5); smaller is sparser", low=0.05),
    Tunable("ema_decay", "σ (EMA)", "how slowly the teacher follows the student (Eq. 7); closer to 1 is "
            "slower", step=0.001, decimals=4, flag="--ema"),
    Tunable("lr", "learning rate", "SGD learning rate after warm-up", low=0.0001, step=0.005, decimals=4),
    Tunable("labelled_batch", "batch", "labelled (and unlabelled) tiles per step", low=1, high=64, step=1,
            flag="--batch", also=("unlabelled_batch",)),
)
#: The tunables whose command-line option is generated (the others have their own).
CLI_TUNABLES = tuple(t for t in TUNABLES if t.name not in ("burn_in", "labelled_batch"))
