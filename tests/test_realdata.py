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
