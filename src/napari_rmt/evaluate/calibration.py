"""Scores that mean what the cut says: a model's best cut moved to 0.5 (issue 32).

A detector's score cut of 0.5 is what the protocol scores at, what ``predict`` and the
widget start from and what the partial-tile rule reads the nucleus model by
(``partial_cells``). A model trained with focal or plain cross-entropy losses on nuclei
that are a minority of its proposals is shy: the bundled nucleus model's best F1 on
CoNSeP lies at the 0.1 cut (58.3 against 48.3 at 0.5). Calibration here is one number, a
shift ``b`` of the foreground logit, fitted on nuclei the model never trained on so that
the cut that gave the best F1 there becomes 0.5:

    score' = sigmoid(logit(score) + b),    b = -logit(best cut)

It is monotone (the boxes' order, and so every matching and NMS, is unchanged) and it is
folded into the classifier's bias: with the foreground score ``1 - p(background)``, adding
``b`` to every class's logit gives exactly that map, so every path that runs the model
(prediction, whole slides, the ONNX graph, the teacher, the partial-tile prior) reads
calibrated scores with no code of its own. A model trained from this one gets a fresh
classifier (``train.checkpoint.transfer_weights``), so the shift does not carry over.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from ..data import Boxes
from .metrics import filter_predictions, matched_pairs

#: The cuts the curve is read at: every hundredth from the prediction floor's next one.
CUTS = tuple(round(0.06 + 0.01 * i, 2) for i in range(89))
#: Cuts whose F1 is within this many points of the best are as good as it; the fitted cut
#: is their median, so that a flat top (F1 changes by tenths over 0.2-0.4 on held-out
#: nuclei) does not put the cut at whichever end noise favours.
PLATEAU = 0.5
#: The logit shift is kept within this: a best cut under 0.05 or over 0.95 is no curve to
#: calibrate by (a model that has not learnt, or a held-out set with no nuclei).
MAX_SHIFT = math.log(19.0)


@dataclass(frozen=True)
class Curve:
    """F1 (precision, recall) of class-agnostic one-to-one matching at each cut."""

    cuts: tuple[float, ...]
    f1: tuple[float, ...]
    precision: tuple[float, ...]
    recall: tuple[float, ...]
    n_gt: int

    def at(self, cut: float) -> tuple[float, float, float]:
        i = int(np.argmin(np.abs(np.asarray(self.cuts) - cut)))
        return self.f1[i], self.precision[i], self.recall[i]

    def best_cut(self, plateau: float = PLATEAU) -> float:
        """The median of the cuts whose F1 (in points) is within ``plateau`` of the best."""
        f1 = 100 * np.asarray(self.f1)
        near = np.asarray(self.cuts)[f1 >= f1.max() - plateau]
        return float(np.median(near))


def f1_curve(
    pairs: Iterable[tuple[Boxes, Boxes]], cuts: Sequence[float] = CUTS, iou: float = 0.5, nms_iou: float | None = 0.5
) -> Curve:
    """The F1 curve of (truth, prediction) pairs, class-agnostic, from one matching per image.

    ``evaluate.metrics.f1_scores`` at each cut would match again per cut; it need not:
    greedy NMS and greedy one-to-one matching both go in descending score order, so the
    boxes above a cut and their matches are the same as in the run over every box above
    the floor. Each box's score and whether it matched are kept, and each cut counts.
    """
    scores, hits, n_gt = [], [], 0
    floor = min(cuts)
    for truth, pred in pairs:
        p = filter_predictions(pred, floor, nms_iou)
        s = np.nan_to_num(p.scores, nan=1.0)
        hit = np.zeros(len(p), dtype=bool)
        for i, _j in matched_pairs(p.xyxy, s, truth.xyxy, iou):
            hit[i] = True
        scores.append(s)
        hits.append(hit)
        n_gt += len(truth)
    s = np.concatenate(scores) if scores else np.zeros(0)
    h = np.concatenate(hits) if hits else np.zeros(0, dtype=bool)
    f1, prec, rec = [], [], []
    for cut in cuts:
        above = s > cut
        tp, n_pred = int(h[above].sum()), int(above.sum())
        f1.append(2 * tp / (n_pred + n_gt) if n_pred + n_gt else 0.0)
        prec.append(tp / n_pred if n_pred else 0.0)
        rec.append(tp / n_gt if n_gt else 0.0)
    return Curve(tuple(cuts), tuple(f1), tuple(prec), tuple(rec), n_gt)


def shift_for(cut: float) -> float:
    """The logit shift that maps a score of ``cut`` to 0.5."""
    if not 0.0 < cut < 1.0:
        raise ValueError(f"a best cut of {cut} is not a score between 0 and 1")
    shift = -math.log(cut / (1.0 - cut))
    if abs(shift) > MAX_SHIFT:
        raise ValueError(
            f"the best cut {cut:.3f} needs a logit shift of {shift:+.2f}, beyond +-{MAX_SHIFT:.2f}: the curve it "
            "came from is no ground to calibrate on (an untrained model, or held-out images without nuclei)"
        )
    return shift


def shifted(scores: np.ndarray, shift: float) -> np.ndarray:
    """What calibrated scores become: ``sigmoid(logit(s) + shift)``."""
    s = np.clip(np.asarray(scores, dtype=np.float64), 1e-12, 1 - 1e-12)
    return 1.0 / (1.0 + np.exp(-(np.log(s / (1 - s)) + shift)))


CLS_BIAS = "roi_heads.box_predictor.cls_score.bias"


def fold_shift(state: dict, shift: float) -> dict:
    """``state`` (a detector's weights) with ``shift`` added to every class's logit bias
    (index 0 is background): its foreground scores become ``shifted(scores, shift)``, and
    so do its class scores when it has one class (the nucleus model)."""
    if CLS_BIAS not in state:
        raise KeyError(f"the weights have no {CLS_BIAS}: not a napari-rmt detector")
    bias = state[CLS_BIAS]
    new = bias.float().clone()
    new[1:] += shift
    return {**state, CLS_BIAS: new.to(bias.dtype)}
