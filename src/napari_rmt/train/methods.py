"""The methods, one row each: what a method reads, which teacher it keeps, and its phases.

Everything that tells the methods apart asks this table (through ``TrainConfig.spec``),
never the method's name: adding a method is adding a row here and, where its step differs
from the rows already here, a step in ``Trainer.STEPS`` (docs/architecture.md). Free of
torch, so that the config, the CLI parser and the widget form can read it cheaply.
"""

from __future__ import annotations

from dataclasses import dataclass

#: Teachers: none; "ema": copied from the student at the end of burn-in and then following
#: it by EMA every step (Eq. 7); "fixed": copied once and frozen (STAC).
TEACHERS = (None, "ema", "fixed")


@dataclass(frozen=True)
class Method:
    """One training method (SPEC §3)."""

    name: str
    #: what the GUI's tooltip and the README say of it
    summary: str
    #: the teacher it keeps (``TEACHERS``)
    teacher: str | None = None
    #: copy-paste labelled cells into the pseudo-labelled views (Eq. 3)
    mixing: bool = False
    #: the sparse regulariser on the student's class logits (Eq. 5)
    regulariser: bool = False
    #: in the paper: the "paper" preset gives it the paper's settings (else its recipe)
    in_paper: bool = True

    @property
    def uses_unlabelled(self) -> bool:
        """Whether the unlabelled tiles are read at all (every front end asks this)."""
        return self.teacher is not None

    @property
    def after_burn_in(self) -> str:
        """The phase once burn-in is over: also the name of its step in ``Trainer.STEPS``."""
        return {None: "supervised", "ema": "semi-supervised", "fixed": "stac-student"}[self.teacher]

    @property
    def needs_burn_in(self) -> bool:
        """A fixed teacher must train first and leave steps for the student: its burn-in
        must lie strictly inside the run (``TrainConfig.for_method`` moves it there)."""
        return self.teacher == "fixed"


TABLE: dict[str, Method] = {
    m.name: m
    for m in (
        Method("supervised", "labelled tiles only: the baseline"),
        Method("stac", "a fixed teacher's pseudo-labels, all four detector losses (STAC)", teacher="fixed"),
        Method("ubt", "an EMA teacher's pseudo-labels, classification terms only (Unbiased Teacher)", teacher="ema"),
        Method("rmt", "Robust Mean Teacher: UbT with cell mixing and the sparse regulariser", teacher="ema",
               mixing=True, regulariser=True),
        Method("rmt-noreg", "Robust Mean Teacher without the regulariser (the paper's ablation)", teacher="ema",
               mixing=True),
        Method("rmt+", "rmt with the rules for an unsure teacher (docs/tuning.md): the recommended one",
               teacher="ema", mixing=True, regulariser=True, in_paper=False),
    )
}

METHODS = tuple(TABLE)
