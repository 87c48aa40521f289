"""Whole-image prediction on MoNuSeg (1000 x 1000): stitched windows against one pass.

Reads ../shared/data/monuseg (skipped where absent); slow (run with --slow): the model
is trained here first (supervised, ResNet-18, 150 steps on two MoNuSeg images cut into
256 px tiles). A model that has barely started (40 steps) floods the image with
overlapping boxes of similar scores, where the last NMS turns the slightest difference
into another survivor; a model that has learnt a little finds nuclei, and that is what
stitching must reproduce.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_rmt.data import read_coco
from napari_rmt.data.boxes import boxes_in_window
from napari_rmt.data.large import open_large_image
from napari_rmt.data.tiles import TileStatus, grid_tiles
from napari_rmt.evaluate.metrics import iou_matrix
from napari_rmt.model import ModelConfig
from napari_rmt.model.wholeimage import predict_large_image, predict_whole_at_once
from napari_rmt.train import TrainConfig, Trainer


@pytest.fixture(scope="module")
def monuseg_model(monuseg_dir, pytestconfig):
    """Trained once, then kept in pytest's cache folder (.pytest_cache) for later runs."""
    from napari_rmt.train.checkpoint import load_model

    ts = read_coco(monuseg_dir / "annotations.json")
    cached = pytestconfig.cache.mkdir("napari-rmt-monuseg-r18-150") / "model.pt"
    if not cached.is_file():
        tiles = []
        for src in list(ts)[:2]:
            for t in grid_tiles(src.path, tile=256, overlap=0, start_id=len(tiles) + 1):
                t.boxes = boxes_in_window(src.boxes, *t.origin, t.width, t.height)
                t.status = TileStatus.LABELLED
                tiles.append(t)
        torch.manual_seed(0)
        cfg = TrainConfig(
            method="supervised",
            iterations=150,
            warmup=20,
            lr=0.02,
            labelled_batch=2,
            seed=0,
            model=ModelConfig(backbone="resnet18"),
        )
        trainer = Trainer(tiles, [], ts.classes, cfg)
        for _ in trainer.run():
            pass
        trainer.save(cached)
    model, classes, _ = load_model(cached)
    return model, classes, list(ts)[2]


def _match(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """For each box of ``a``: is there a box of ``b`` with every side within 1 px?"""
    if len(a) == 0 or len(b) == 0:
        return np.zeros(len(a), dtype=bool)
    d = np.abs(a[:, None, :] - b[None, :, :]).max(axis=2)
    return d.min(axis=1) <= 1.0


@pytest.mark.slow
def test_stitched_monuseg_prediction_matches_the_whole_image_pass(monuseg_model):
    model, classes, tile = monuseg_model
    image = open_large_image(tile.path)
    assert image.size == (1000, 1000)
    thr, margin = 0.5, 0.1
    whole = predict_whole_at_once(model, image.read(0, 0, 1000, 1000), classes, score_threshold=thr - margin)
    stitched = predict_large_image(
        model, image, classes, window=256, overlap=64, context=128, batch_size=4, score_threshold=thr - margin
    )
    w_hi, s_hi = whole[whole.scores >= thr], stitched[stitched.scores >= thr]
    print(f"whole-image pass: {len(w_hi)} boxes, stitched: {len(s_hi)} (score >= {thr})")
    assert len(w_hi) >= 100, f"the briefly trained model found {len(w_hi)} nuclei"
    # A box of one pass at score >= 0.5 must have a twin (every side within 1 px) in the
    # other at >= 0.4: features near a window edge differ in the last bits, so a score at
    # the threshold may land on either side of it.
    same_w = _match(w_hi.xyxy, stitched.xyxy)
    same_s = _match(s_hi.xyxy, whole.xyxy)
    print(
        f"twins within 1 px: {same_w.mean():.4f} of whole-image boxes, {same_s.mean():.4f} of stitched; "
        f"scores of boxes without a twin: {np.round(w_hi.scores[~same_w], 3)}, {np.round(s_hi.scores[~same_s], 3)}"
    )
    # Measured 2026-11-29 (docs/benchmarks.md): 98.7 % both ways; the boxes
    # without a twin are near-ties of two overlapping candidates at scores 0.50-0.58, where
    # those last bits decide which one the final NMS keeps. While the RPN kept a count of
    # proposals per input (now a count per 64 px cell) the figures were 95 % / 89 %.
    assert same_w.mean() >= 0.98, f"{(~same_w).sum()} of {len(w_hi)} whole-image boxes have no stitched twin"
    assert same_s.mean() >= 0.98, f"{(~same_s).sum()} of {len(s_hi)} stitched boxes have no whole-image twin"
    assert (w_hi.scores[~same_w] < thr + 0.2).all() and (s_hi.scores[~same_s] < thr + 0.2).all()
    # no duplicates at window borders: no two stitched boxes overlap like one nucleus
    iou = iou_matrix(stitched.xyxy, stitched.xyxy)
    np.fill_diagonal(iou, 0)
    assert iou.max() <= 0.5
