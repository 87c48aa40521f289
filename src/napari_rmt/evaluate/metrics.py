"""Per-class precision, recall and F1 with one-to-one matching (paper Sec. 3).

The paper keeps test predictions with score > 0.5, removes duplicates with NMS, and
counts a prediction as a true positive when it matches a not-yet-matched ground-truth
box of the same class with IoU >= 0.5. Matching is greedy in order of decreasing score,
each prediction taking the unmatched ground truth it overlaps most.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from ..data.boxes import Boxes, iou_matrix  # the IoU lives with the boxes; imported from here too


def nms_numpy(xyxy: np.ndarray, scores: np.ndarray, iou: float) -> np.ndarray:
    """Indices kept by greedy NMS, highest score first."""
    order = np.argsort(-scores, kind="stable")
    keep: list[int] = []
    ious = iou_matrix(xyxy, xyxy)
    suppressed = np.zeros(len(scores), dtype=bool)
    for i in order:
        if suppressed[i]:
            continue
        keep.append(int(i))
        suppressed |= ious[i] > iou
    return np.array(keep, dtype=np.int64)


def centre_closeness(a: np.ndarray, b: np.ndarray, radius: float) -> np.ndarray:
    """A similarity for centre matching: ``1 - d / radius`` (>= 0 when within ``radius``).

    Lets centre-distance matching reuse the IoU machinery with threshold 0: the
    closest unmatched centre wins, and anything farther than ``radius`` never matches.
    """
    a = np.asarray(a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(b, dtype=np.float64).reshape(-1, 4)
    ca = (a[:, :2] + a[:, 2:]) / 2
    cb = (b[:, :2] + b[:, 2:]) / 2
    d = np.sqrt(((ca[:, None, :] - cb[None, :, :]) ** 2).sum(-1))
    return 1.0 - d / radius


def matched_pairs(
    pred_xyxy: np.ndarray,
    pred_scores: np.ndarray,
    gt_xyxy: np.ndarray,
    iou: float = 0.5,
    radius: float | None = None,
) -> list[tuple[int, int]]:
    """(prediction, truth) index pairs of greedy one-to-one matching: predictions in
    descending score order (ties in given order) each take the most similar free truth box.

    By IoU >= ``iou``; or, with ``radius``, by the predicted box centre lying within
    ``radius`` pixels of the true centre (for datasets annotated with cell centres).
    The pairs, not only their count, so that a benchmark can ask *which* cells a set of
    boxes found with the very rule that scores them.
    """
    if len(pred_xyxy) == 0 or len(gt_xyxy) == 0:
        return []
    if radius is None:
        sim, need = iou_matrix(pred_xyxy, gt_xyxy), iou
    else:
        sim, need = centre_closeness(pred_xyxy, gt_xyxy, radius), 0.0
    taken = np.zeros(len(gt_xyxy), dtype=bool)
    pairs: list[tuple[int, int]] = []
    for i in np.argsort(-np.asarray(pred_scores), kind="stable"):
        cand = np.where(~taken, sim[i], -np.inf)
        j = int(np.argmax(cand))
        if cand[j] >= need:
            taken[j] = True
            pairs.append((int(i), j))
    return pairs


def match_boxes(
    pred_xyxy: np.ndarray,
    pred_scores: np.ndarray,
    gt_xyxy: np.ndarray,
    iou: float = 0.5,
    radius: float | None = None,
) -> int:
    """Number of true positives under :func:`matched_pairs`' greedy one-to-one matching."""
    return len(matched_pairs(pred_xyxy, pred_scores, gt_xyxy, iou, radius))


@dataclass
class DetectionCounts:
    tp: int = 0
    n_pred: int = 0
    n_gt: int = 0

    @property
    def precision(self) -> float:
        return self.tp / self.n_pred if self.n_pred else 0.0

    @property
    def recall(self) -> float:
        return self.tp / self.n_gt if self.n_gt else 0.0

    @property
    def f1(self) -> float:
        denom = self.n_pred + self.n_gt
        return 2 * self.tp / denom if denom else 0.0


def filter_predictions(pred: Boxes, score_threshold: float = 0.5, nms_iou: float | None = 0.5) -> Boxes:
    """The paper's test-time filter: score > threshold, then (class-agnostic) NMS."""
    keep = np.flatnonzero(pred.visible(score_threshold))
    sel = pred[keep]
    if nms_iou is not None and len(sel):
        sel = sel[nms_numpy(sel.xyxy, np.nan_to_num(sel.scores, nan=1.0), nms_iou)]
    return sel


def f1_scores(
    pairs: Iterable[tuple[Boxes, Boxes]],
    class_ids: Sequence[int],
    iou: float = 0.5,
    score_threshold: float = 0.5,
    nms_iou: float | None = 0.5,
    radius: float | None = None,
) -> dict[str, DetectionCounts]:
    """Counts per class id (as ``str``) and ``"any"`` (class-agnostic) over (truth, prediction) pairs."""
    out = {str(c): DetectionCounts() for c in class_ids}
    out["any"] = DetectionCounts()
    for truth, pred in pairs:
        p = filter_predictions(pred, score_threshold, nms_iou)
        pscore = np.nan_to_num(p.scores, nan=1.0)
        for c in class_ids:
            pm, gm = p.class_ids == c, truth.class_ids == c
            k = out[str(c)]
            k.tp += match_boxes(p.xyxy[pm], pscore[pm], truth.xyxy[gm], iou, radius)
            k.n_pred += int(pm.sum())
            k.n_gt += int(gm.sum())
        a = out["any"]
        a.tp += match_boxes(p.xyxy, pscore, truth.xyxy, iou, radius)
        a.n_pred += len(p)
        a.n_gt += len(truth)
    return out


def coco_map(
    pairs: Sequence[tuple[Boxes, Boxes]],
    class_ids: Sequence[int],
    sizes: Sequence[tuple[int, int]] | None = None,
) -> dict[str, float | None]:
    """COCO mAP (IoU .50:.95) and mAP@50 from pycocotools, over all given predictions.

    mAP ranks predictions by score, so it takes every prediction (no 0.5 cut); COCO's
    default cap of 100 detections per image is raised to 1000, since a tile holds
    hundreds of cells. Per-class AP is returned as ``AP50/<class id>``.
    """
    import contextlib
    import io

    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    images, anns, dets = [], [], []
    for i, (truth, pred) in enumerate(pairs, start=1):
        w, h = sizes[i - 1] if sizes is not None else (10**6, 10**6)
        images.append({"id": i, "width": int(w), "height": int(h), "file_name": f"{i}"})
        for xywh, c in zip(truth.xywh, truth.class_ids, strict=True):
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": i,
                    "category_id": int(c),
                    "bbox": [float(v) for v in xywh],
                    "area": float(xywh[2] * xywh[3]),
                    "iscrowd": 0,
                }
            )
        for xywh, c, s in zip(pred.xywh, pred.class_ids, pred.scores, strict=True):
            dets.append(
                {
                    "image_id": i,
                    "category_id": int(c),
                    "bbox": [float(v) for v in xywh],
                    "score": float(s) if np.isfinite(s) else 1.0,
                }
            )
    out = {"mAP": 0.0, "mAP50": 0.0}
    if not anns or not dets:
        return out
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = {
            "info": {},
            "images": images,
            "annotations": anns,
            "categories": [{"id": int(c), "name": str(c)} for c in class_ids],
        }
        gt.createIndex()
        dt = gt.loadRes(dets)
        ev = COCOeval(gt, dt, "bbox")
        ev.params.maxDets = [1, 100, 1000]
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    # stats[0] and [1] use maxDets[2] (= 1000 here): AP@[.5:.95] and AP@.5, all areas.
    out["mAP"], out["mAP50"] = float(ev.stats[0]), float(ev.stats[1])
    precision = ev.eval["precision"]  # [T, R, K, A, M]
    for k, cid in enumerate(ev.params.catIds):
        p = precision[0, :, k, 0, -1]
        p = p[p > -1]
        # No true box of the class in the set: its AP is undefined (n/a), not 0.
        out[f"AP50/{cid}"] = float(p.mean()) if p.size else None
    return out
