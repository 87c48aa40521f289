import json

import numpy as np

from napari_rmt.data import Boxes, BoxSource, read_coco, write_geojson


def test_geojson_for_qupath(coco_file, tmp_path):
    ts = read_coco(coco_file)
    ts.by_id(2).origin = (100, 200)
    out = write_geojson(ts, tmp_path / "a.geojson", tiles=[ts.by_id(1), ts.by_id(2)])
    fc = json.loads(out.read_text())
    assert fc["type"] == "FeatureCollection" and len(fc["features"]) == 4
    f0 = fc["features"][0]
    assert f0["geometry"]["type"] == "Polygon"
    ring = f0["geometry"]["coordinates"][0]
    assert ring[0] == ring[-1] and ring[:4] == [[2.0, 3.0], [10.5, 3.0], [10.5, 9.25], [2.0, 9.25]]
    assert f0["properties"]["objectType"] == "annotation"
    assert f0["properties"]["classification"] == {"name": "tumor", "color": [230, 25, 25]}
    # The second tile's boxes are shifted by its origin into whole-image coordinates.
    assert fc["features"][2]["geometry"]["coordinates"][0][0] == [102.0, 203.0]


def test_geojson_predictions_carry_scores(coco_file, tmp_path):
    ts = read_coco(coco_file)
    ts.by_id(1).predictions = Boxes(np.array([[0, 0, 4, 4]]), [2], [0.5], [BoxSource.PREDICTED])
    fc = json.loads(write_geojson(ts, tmp_path / "p.geojson", predictions=True).read_text())
    assert len(fc["features"]) == 1
    props = fc["features"][0]["properties"]
    assert props["objectType"] == "detection" and props["measurements"] == {"score": 0.5}
