"""Evaluation: detection metrics (paper Sec. 3) and, later, the experiment harness."""

from .metrics import DetectionCounts, f1_scores, match_boxes, matched_pairs

__all__ = ["DetectionCounts", "f1_scores", "match_boxes", "matched_pairs"]
