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
from napari_rmt.data.large import boxes_in_window, grid_tiles, open_large_image
from napari_rmt.data.tiles import TileStatus
from napari_rmt.evaluate.metrics import iou_matrix
from napari_rmt.model import ModelConfig
from napari_rmt.model.wholeimage import predict_large_image, predict_whole_at_once
from napari_rmt.train import TrainConfig, Trainer


@pytest.fixture(scope="module")
def monuseg_model(monuseg_dir):
    ts = read_coco(monuseg_dir / "annotations.json")
    tiles = []
    for src in list(ts)[:2]:
        for t in grid_tiles(src.path, tile=256, overlap=0, start_id=len(tiles) + 1):
            t.boxes = boxes_in_window(src.boxes, *t.origin, t.width, t.height)
            t.status = TileStatus.LABELLED
            tiles.append(t)
    torch.manual_seed(0)
    cfg = TrainConfig(
        method="supervised",
        iterations=40,
        warmup=10,
        lr=0.02,
        labelled_batch=2,
        seed=0,
        model=ModelConfig(backbone="resnet18"),
    )
    trainer = Trainer(tiles, [], ts.classes, cfg)
    for _ in trainer.run():
        pass
    model = trainer.model.eval()
    return model, ts.classes, list(ts)[2]


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
    thr = 0.5
    # limits far above what either pass keeps, so that neither is cut short by a count
    limit = 20_000
    whole = predict_whole_at_once(
        model, image.read(0, 0, 1000, 1000), classes, score_threshold=thr, limit=limit
    )
    stitched = predict_large_image(
        model, image, classes, window=256, overlap=64, context=128, batch_size=4, score_threshold=thr,
        per_window_limit=limit,
    )  # fmt: skip
    print(f"whole-image pass: {len(whole)} boxes, stitched: {len(stitched)}")
    assert 100 <= len(whole) < limit, f"the briefly trained model found {len(whole)} nuclei"
    same_w = _match(whole.xyxy, stitched.xyxy)
    same_s = _match(stitched.xyxy, whole.xyxy)
    # Near a window the network's features differ slightly from the whole-image pass
    # (padding), so a box whose score sits at the threshold may fall on either side.
    assert same_w.mean() >= 0.95, f"{(~same_w).sum()} of {len(whole)} whole-image boxes have no stitched twin"
    print(f"matched within 1 px: {same_w.mean():.4f} of whole-image boxes, {same_s.mean():.4f} of stitched")
    assert same_s.mean() >= 0.95, (
        f"{(~same_s).sum()} of {len(stitched)} stitched boxes have no whole-image twin"
    )
    assert abs(len(stitched) - len(whole)) <= 0.03 * len(whole)
    # no duplicates at window borders: no two stitched boxes overlap like one nucleus
    iou = iou_matrix(stitched.xyxy, stitched.xyxy)
    np.fill_diagonal(iou, 0)
    assert iou.max() <= 0.5
