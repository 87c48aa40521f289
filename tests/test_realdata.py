"""Round trip of the real CoNSeP annotations (reads ../shared/data; skipped where absent)."""

import collections
import json

import numpy as np
from pycocotools.coco import COCO

from napari_rmt.data import Boxes, BoxSource, read_coco, write_coco, write_coco_results


def test_consep_round_trip_through_pycocotools(consep_dir, tmp_path, recwarn):
    src = json.loads((consep_dir / "annotations.json").read_text())
    ts = read_coco(consep_dir / "annotations.json")
    assert len(ts) == len(src["images"]) == 656
    assert not [w for w in recwarn if "box" in str(w.message)]  # nothing clipped or dropped

    out = write_coco(ts, tmp_path / "export.json")
    gt = COCO(str(out))
    exported = json.loads(out.read_text())

    # Every box equal to the input within 1e-6, in the same order per image.
    boxes_in = collections.defaultdict(list)
    for a in src["annotations"]:
        boxes_in[a["image_id"]].append((a["category_id"], a["bbox"]))
    boxes_out = collections.defaultdict(list)
    for a in exported["annotations"]:
        boxes_out[a["image_id"]].append((a["category_id"], a["bbox"]))
    assert boxes_in.keys() == boxes_out.keys()
    for image_id, rows in boxes_in.items():
        other = boxes_out[image_id]
        assert [c for c, _ in rows] == [c for c, _ in other]
        np.testing.assert_allclose([b for _, b in rows], [b for _, b in other], atol=1e-6, rtol=0)

    count_in = collections.Counter(a["category_id"] for a in src["annotations"])
    count_out = collections.Counter(a["category_id"] for a in gt.dataset["annotations"])
    assert count_in == count_out and sum(count_out.values()) == 28546
    assert {c["id"]: c["name"] for c in src["categories"]} == {
        c["id"]: c["name"] for c in gt.dataset["categories"]
    }
    # Extra image fields survive (the split key of the experiments).
    assert {i["source_tile"] for i in exported["images"]} == {i["source_tile"] for i in src["images"]}
    # The exported file names still point at the real images.
    assert read_coco(out, allow_outside=True).by_id(1).pixels().shape == (256, 256, 3)  # images stay in shared/

    # A predictions file: the ground truth with scores, loadable by loadRes.
    for t in ts:
        t.predictions = Boxes(
            t.boxes.xyxy,
            t.boxes.class_ids,
            np.full(len(t.boxes), 0.9),
            np.full(len(t.boxes), BoxSource.PREDICTED),
        )
    res = gt.loadRes(str(write_coco_results(ts, tmp_path / "pred.json")))
    assert len(res.getAnnIds()) == 28546


def test_a_dense_1000px_tile_is_not_capped_and_agrees_with_its_windows(monuseg_dir):
    """Issue 33: a MoNuSeg field predicted as one tile (``--coco``) was capped at 300 boxes
    (298 for 818 nuclei) while the same image as a path, cut into windows, got them all.
    Now a large tile is judged by the whole-image rule: far past 300, and within a few
    percent of the windows' count."""
    import warnings

    from napari_rmt.model.bundled import NUCLEUS
    from napari_rmt.model.predict import CapWarning, predict_tiles
    from napari_rmt.model.wholeimage import predict_large_image
    from napari_rmt.train import load_model

    ts = read_coco(monuseg_dir / "annotations.json")
    tile = max(ts, key=lambda t: len(t.boxes))  # the densest field
    model, classes, _ = load_model(NUCLEUS)
    with warnings.catch_warnings():
        warnings.simplefilter("error", CapWarning)
        whole = predict_tiles(model, [tile], classes, store=False)[0]
    from napari_rmt.data.large import LargeImage

    windows = predict_large_image(model, LargeImage(tile.pixels(), "field"), classes, window=512)
    n_whole = int((whole.scores > 0.5).sum())
    n_windows = int((windows.scores > 0.5).sum())
    assert len(tile.boxes) > 600 and n_whole > 300
    assert abs(n_whole - n_windows) <= 0.05 * n_windows, (n_whole, n_windows)
