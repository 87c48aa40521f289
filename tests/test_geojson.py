import json

import numpy as np
import pytest

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


def test_qupath_round_trip_brings_boxes_and_classes_back(coco_file, tmp_path):
    from napari_rmt.data.geojson import read_geojson

    ts = read_coco(coco_file)
    ts.by_id(2).origin = (100, 200)  # tiles of one large image: whole-image coordinates
    ts.by_id(3).origin = (300, 0)
    ts.by_id(1).predictions = Boxes(np.array([[1.0, 1, 6, 7]]), [3], [0.75], [BoxSource.PREDICTED])
    write_geojson(ts, tmp_path / "a.geojson")
    write_geojson(ts, tmp_path / "p.geojson", predictions=True)
    fresh = read_coco(coco_file)
    fresh.by_id(2).origin, fresh.by_id(3).origin = (100, 200), (300, 0)
    for t in fresh:
        t.boxes = Boxes()
    for f in (tmp_path / "a.geojson", tmp_path / "p.geojson"):
        read_geojson(f, fresh)
    for a, b in zip(ts, fresh, strict=True):
        np.testing.assert_allclose(a.boxes.xyxy, b.boxes.xyxy)
        assert a.boxes.class_ids.tolist() == b.boxes.class_ids.tolist()
    p = fresh.by_id(1).predictions
    assert p.class_ids.tolist() == [3] and p.scores.tolist() == [0.75]


def test_qupath_features_without_tile_names_go_by_position(coco_file, tmp_path):
    from napari_rmt.data.geojson import read_geojson

    ts = read_coco(coco_file)
    for t in ts:
        t.boxes = Boxes()
    ts.by_id(2).origin = (48, 0)  # tiles are 48 px wide: side by side
    ring = [[50.0, 2], [58, 2], [58, 9], [50, 9], [50, 2]]
    fc = {"type": "FeatureCollection", "features": [
        {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [ring]},
         "properties": {"objectType": "annotation", "classification": {"name": "Mitosis", "color": [1, 2, 3]}}},
        {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [[[900, 900], [905, 900], [905, 905], [900, 900]]]},
         "properties": {"classification": {"name": "tumor"}}},
    ]}
    (tmp_path / "q.geojson").write_text(json.dumps(fc))
    with pytest.warns(UserWarning, match=r"feature \[1\].*none of the tiles"):
        read_geojson(tmp_path / "q.geojson", ts)
    b = ts.by_id(2).boxes
    assert b.xyxy.tolist() == [[2.0, 2.0, 10.0, 9.0]]
    assert ts.classes.by_id(int(b.class_ids[0])).name == "Mitosis"  # a new class, by name
    assert len(ts.by_id(1).boxes) == 0


@pytest.mark.parametrize(
    "feature, message",
    [
        ({"type": "Feature", "geometry": {"type": "Point", "coordinates": [1, 2]}, "properties": {"name": "x"}},
         "not a Polygon"),
        ({"type": "Feature", "properties": {"classification": {"name": "tumor"}}}, "no geometry"),
        ({"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [[["a", 1]]]},
          "properties": {"classification": {"name": "tumor"}}}, "not lists of"),
        ({"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [[[1, 1], [1, 5], [1, 1]]]},
          "properties": {"classification": {"name": "tumor"}}}, "no area"),
        ({"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [[[1, 1], [4, 1], [4, 4]]]},
          "properties": {}}, "no class"),
        ({"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [[[1, 1], [4, 1], [4, 4]]]},
          "properties": {"classification": {"name": "tumor"}, "measurements": {"score": "high"}}}, "score"),
        ("junk", "is not a GeoJSON Feature"),
    ],
)
def test_malformed_geojson_is_refused_naming_the_feature(coco_file, tmp_path, feature, message):
    from napari_rmt.data.errors import AnnotationError
    from napari_rmt.data.geojson import read_geojson

    ts = read_coco(coco_file)
    before = [t.boxes.xyxy.copy() for t in ts]
    (tmp_path / "bad.geojson").write_text(json.dumps({"type": "FeatureCollection", "features": [feature]}))
    with pytest.raises(AnnotationError, match=rf"bad\.geojson: feature \[0\].*{message}"):
        read_geojson(tmp_path / "bad.geojson", ts)
    assert all(np.array_equal(a, t.boxes.xyxy) for a, t in zip(before, ts, strict=True))  # nothing changed
    (tmp_path / "notgeo.json").write_text("[1, 2")
    with pytest.raises(AnnotationError, match="not a JSON file"):
        read_geojson(tmp_path / "notgeo.json", ts)


def test_partial_status_round_trips_and_imported_boxes_make_a_tile_partial(coco_file, tmp_path):
    """A partly annotated tile stays partial through GeoJSON and COCO; boxes imported onto
    an unlabelled tile without a status make it partial, never fully annotated."""
    from napari_rmt.data import TileStatus, write_coco
    from napari_rmt.data.geojson import read_geojson

    ts = read_coco(coco_file)
    ts.by_id(1).status = TileStatus.PARTIAL
    write_geojson(ts, tmp_path / "a.geojson")
    fresh = read_coco(coco_file)
    for t in fresh:
        t.boxes, t.status = Boxes(), TileStatus.UNLABELLED
    read_geojson(tmp_path / "a.geojson", fresh)
    assert [t.status for t in fresh] == [TileStatus.PARTIAL, TileStatus.LABELLED, TileStatus.LABELLED]
    again = read_coco(write_coco(fresh, tmp_path / "c.json"))
    assert [t.status for t in again] == [TileStatus.PARTIAL, TileStatus.LABELLED, TileStatus.LABELLED]
    assert json.loads((tmp_path / "c.json").read_text())["images"][0]["napari_rmt_status"] == "partial"
    # QuPath's own export carries no status: the boxes are the user's, the tile is partial
    data = json.loads((tmp_path / "a.geojson").read_text())
    for f in data["features"]:
        f["properties"].pop("napari_rmt_status")
    (tmp_path / "q.geojson").write_text(json.dumps(data))
    for t in fresh:
        t.boxes, t.status = Boxes(), TileStatus.UNLABELLED
    read_geojson(tmp_path / "q.geojson", fresh)
    assert {t.status for t in fresh} == {TileStatus.PARTIAL}
    data["features"][0]["properties"]["napari_rmt_status"] = "half"
    (tmp_path / "bad.geojson").write_text(json.dumps(data))
    with pytest.raises(Exception, match=r"feature \[0\].*'half'"):
        read_geojson(tmp_path / "bad.geojson", fresh)


def test_a_refused_file_adds_no_class(coco_file, tmp_path):
    """Issue 33: a file refused for a malformed feature used to keep the class an earlier,
    valid feature had brought in."""
    from napari_rmt.data.errors import AnnotationError
    from napari_rmt.data.geojson import read_geojson

    ts = read_coco(coco_file)
    names = list(ts.classes.names)
    square = {"type": "Polygon", "coordinates": [[[1, 1], [4, 1], [4, 4], [1, 4], [1, 1]]]}
    good = {"type": "Feature", "geometry": square, "properties": {"classification": {"name": "mitosis"}}}
    bad = {"type": "Feature", "geometry": square, "properties": {}}
    (tmp_path / "bad.geojson").write_text(json.dumps({"type": "FeatureCollection", "features": [good, bad]}))
    with pytest.raises(AnnotationError, match=r"feature \[1\].*no class"):
        read_geojson(tmp_path / "bad.geojson", ts)
    assert ts.classes.names == names
    (tmp_path / "good.geojson").write_text(json.dumps({"type": "FeatureCollection", "features": [good, good]}))
    read_geojson(tmp_path / "good.geojson", ts)
    assert ts.classes.names == [*names, "mitosis"]
    mitosis = ts.classes.by_name("mitosis").id
    assert sum(int((t.boxes.class_ids == mitosis).sum()) for t in ts) == 2


def qupath_would_accept(fc: dict, width: int, height: int) -> None:
    """The rules QuPath applies on File > Import objects: a FeatureCollection of closed,
    non-degenerate polygons inside the image, each with an objectType and a
    classification holding a name and an [r, g, b] colour."""
    assert fc["type"] == "FeatureCollection"
    for f in fc["features"]:
        ring = f["geometry"]["coordinates"][0]
        assert f["geometry"]["type"] == "Polygon" and ring[0] == ring[-1] and len(ring) >= 4
        xs, ys = [p[0] for p in ring], [p[1] for p in ring]
        assert 0 <= min(xs) < max(xs) <= width and 0 <= min(ys) < max(ys) <= height
        props = f["properties"]
        assert props["objectType"] in ("annotation", "detection")
        c = props["classification"]
        assert isinstance(c["name"], str) and c["name"]
        assert len(c["color"]) == 3 and all(isinstance(v, int) and 0 <= v <= 255 for v in c["color"])


def test_one_geojson_per_image_opens_over_its_image_and_round_trips(coco_file, tmp_path):
    """Issue 34: one FeatureCollection of every tile laid every tile's boxes over whichever
    image QuPath opened. One file per image now, in its own pixel coordinates."""
    from napari_rmt.data.geojson import read_geojson, write_geojson_per_image

    ts = read_coco(coco_file)
    ts.by_id(1).predictions = Boxes(np.array([[1.0, 1, 6, 7]]), [3], [0.75], [BoxSource.PREDICTED])
    files = write_geojson_per_image(ts, tmp_path / "qupath")
    assert [f.name for f in files] == ["tile_0.geojson", "tile_1.geojson", "tile_2.geojson"]
    for f, t in zip(files, ts, strict=True):
        fc = json.loads(f.read_text())
        assert len(fc["features"]) == len(t.boxes)
        qupath_would_accept(fc, t.width, t.height)
    det = write_geojson_per_image(ts, tmp_path / "det", predictions=True)
    qupath_would_accept(json.loads(det[0].read_text()), 48, 32)
    fresh = read_coco(coco_file)
    for t in fresh:
        t.boxes = Boxes()
    for f in [*files, *det]:
        read_geojson(f, fresh)
    for a, b in zip(ts, fresh, strict=True):
        np.testing.assert_allclose(a.boxes.xyxy, b.boxes.xyxy)
        assert a.boxes.class_ids.tolist() == b.boxes.class_ids.tolist()
    assert fresh.by_id(1).predictions.scores.tolist() == [0.75]


def test_the_windows_of_a_large_image_share_one_file_in_whole_image_coordinates(tmp_path):
    from napari_rmt.data import ClassList, TileSet
    from napari_rmt.data.geojson import read_geojson, write_geojson_per_image
    from napari_rmt.data.large import write_zarr_image
    from napari_rmt.data.tiles import grid_tiles

    store = tmp_path / "slide.zarr"
    write_zarr_image(np.full((300, 500, 3), 220, np.uint8), store)
    tiles = grid_tiles(store, tile=256)
    ts = TileSet(tiles, ClassList.default())
    right = next(t for t in ts if t.origin == (256, 0))
    right.boxes = Boxes([[10, 20, 30, 40]], [2])
    files = write_geojson_per_image(ts, tmp_path / "out")
    assert [f.name for f in files] == ["slide.geojson"]
    fc = json.loads(files[0].read_text())
    qupath_would_accept(fc, 500, 300)
    assert fc["features"][0]["geometry"]["coordinates"][0][0] == [266.0, 20.0]  # whole-image pixels
    again = TileSet(grid_tiles(store, tile=256), ClassList.default())
    read_geojson(files[0], again)
    back = next(t for t in again if t.origin == (256, 0))
    assert back.boxes.xyxy.tolist() == [[10, 20, 30, 40]] and back.is_partial
