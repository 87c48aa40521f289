"""The npe2 contributions in a real viewer (Xvfb): sample, reader, writer."""

import json

import numpy as np
import pytest
from pycocotools.coco import COCO

from napari_rmt.data import read_coco
from napari_rmt.gui.reader import get_reader

napari = pytest.importorskip("napari")


def test_manifest_is_valid():
    from npe2 import PluginManifest

    pm = PluginManifest.from_distribution("napari-rmt")
    assert {c.id for c in pm.contributions.commands} >= {
        "napari-rmt.get_reader",
        "napari-rmt.write_coco",
        "napari-rmt.make_sample_data",
    }
    pm.validate_imports()


def test_reader_declines_what_it_cannot_read(tmp_path):
    (tmp_path / "other.json").write_text(json.dumps({"type": "FeatureCollection"}))
    (tmp_path / "broken.json").write_text("{")
    (tmp_path / "empty").mkdir()
    assert get_reader(str(tmp_path / "other.json")) is None
    assert get_reader(str(tmp_path / "broken.json")) is None
    assert get_reader(str(tmp_path / "empty")) is None
    assert get_reader(str(tmp_path / "nothing.png")) is None
    assert get_reader([str(tmp_path / "a.json"), str(tmp_path / "b.json")]) is None


def test_sample_opens_with_boxes_coloured_by_class(make_napari_viewer, tmp_path):
    viewer = make_napari_viewer(show=True)
    viewer.open_sample("napari-rmt", "consep")
    image, boxes = viewer.layers[0], viewer.layers[1]
    assert image.rgb and image.data.shape == (16, 256, 256, 3)
    assert len(boxes.data) == 1100
    assert set(boxes.features["class"]) == {"tumor", "stromal", "lymphocyte", "other"}
    # Colour comes from the class, never from its sorted position.
    for cls, rgb in [("tumor", (230, 25, 25)), ("stromal", (30, 180, 40)), ("lymphocyte", (40, 80, 235))]:
        rows = np.flatnonzero(np.asarray(boxes.features["class"]) == cls)
        np.testing.assert_allclose(boxes.edge_color[rows], np.tile([*np.array(rgb) / 255, 1], (len(rows), 1)))
    # The canvas really shows the three colours on the first tile.
    viewer.reset_view()
    shot = viewer.screenshot(canvas_only=True, flash=False)[..., :3].astype(int)
    for rgb in [(230, 25, 25), (30, 180, 40), (40, 80, 235)]:
        close = (np.abs(shot - np.array(rgb)).sum(axis=-1) < 40).sum()
        assert close > 50, f"colour {rgb} barely on screen ({close} px)"


def test_read_folder_and_coco_then_save_with_the_writer(make_napari_viewer, coco_file, tmp_path):
    viewer = make_napari_viewer()
    layers = viewer.open(str(coco_file), plugin="napari-rmt")
    assert [lay.__class__.__name__ for lay in layers] == ["Image", "Shapes"]
    shapes = layers[1]
    # The user draws one more box on tile 3 with the current class, and re-classes one.
    shapes.feature_defaults["class"] = "lymphocyte"
    shapes.add_rectangles(np.array([[2, 1, 1], [2, 1, 4], [2, 6, 4], [2, 6, 1]], dtype=float))
    shapes.features.loc[0, "class"] = "stromal"
    out = tmp_path / "saved.json"
    written = shapes.save(str(out), plugin="napari-rmt")
    assert written == [str(out)]
    coco = COCO(str(out))
    assert len(coco.getAnnIds()) == 7
    back = read_coco(out)
    t3 = back.by_id(3)
    assert len(t3.boxes) == 3
    np.testing.assert_allclose(t3.boxes.xyxy[-1], [1, 1, 4, 6])
    assert back.classes.by_id(int(t3.boxes.class_ids[-1])).name == "lymphocyte"
    assert back.classes.by_id(int(back.by_id(1).boxes.class_ids[0])).name == "stromal"

    folder_layers = viewer.open(str(coco_file.parent / "images"), plugin="napari-rmt")
    assert folder_layers[0].data.shape == (3, 32, 48, 3) and len(folder_layers[1].data) == 0


def test_reader_opens_an_ome_zarr_pyramid_lazily(tmp_path):
    import numpy as np
    import zarr

    from napari_rmt.gui.reader import get_reader

    g = zarr.open_group(str(tmp_path / "img.zarr"), mode="w")
    create = getattr(g, "create_array", None) or g.create_dataset
    full = np.random.default_rng(0).integers(0, 256, (64, 80, 3), dtype=np.uint8)
    create("0", shape=full.shape, chunks=(32, 32, 3), dtype="u1")[...] = full
    create("1", shape=(32, 40, 3), chunks=(32, 32, 3), dtype="u1")[...] = full[::2, ::2]
    g.attrs["multiscales"] = [{"axes": ["y", "x", "c"], "datasets": [{"path": "0"}, {"path": "1"}]}]
    reader = get_reader(str(tmp_path / "img.zarr"))
    assert reader is not None
    [(data, meta, kind)] = reader(str(tmp_path / "img.zarr"))
    assert kind == "image" and meta["multiscale"] and meta["rgb"]
    assert [tuple(d.shape) for d in data] == [(64, 80, 3), (32, 40, 3)]
    np.testing.assert_array_equal(np.asarray(data[0]), full)


def test_a_geojson_dropped_on_the_viewer_opens_as_boxes(make_napari_viewer, coco_file, tmp_path):
    """Issue 33: the reader declined a .geojson. It opens QuPath's (and our) GeoJSON as
    Shapes in the file's own pixel coordinates: annotations, and detections with scores."""
    from napari_rmt.data import Boxes, BoxSource, write_geojson

    ts = read_coco(coco_file)
    ts.by_id(2).origin = (100, 200)
    ts.by_id(1).predictions = Boxes([[1.0, 1, 6, 7]], [3], [0.75], [BoxSource.PREDICTED])
    write_geojson(ts, tmp_path / "a.geojson")
    write_geojson(ts, tmp_path / "p.geojson", predictions=True)
    reader = get_reader(str(tmp_path / "a.geojson"))
    assert reader is not None
    (data, meta, kind), = reader(str(tmp_path / "a.geojson"))
    assert kind == "shapes" and len(data) == sum(len(t.boxes) for t in ts)
    assert np.asarray(data).reshape(-1, 4, 2)[:, :, 0].max() > 200  # (y, x): tile 2's boxes at y + 200
    assert list(meta["features"]["class"][:2]) == ["tumor", "stromal"]
    layers = get_reader(str(tmp_path / "p.geojson"))(str(tmp_path / "p.geojson"))
    assert [m["name"] for _, m, _ in layers] == ["p annotations", "p detections"]
    assert list(layers[1][1]["features"]["score"]) == [0.75]
    viewer = make_napari_viewer()
    viewer.open(str(tmp_path / "a.geojson"), plugin="napari-rmt")
    assert len(viewer.layers) == 1 and len(viewer.layers[0].data) == len(data)
