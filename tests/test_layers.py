"""Layer conversion without a viewer: boxes <-> rectangles, tile sets <-> Shapes layer data."""

import numpy as np
import pytest

from napari_rmt.data import AnnotationError, read_coco
from napari_rmt.gui.layers import (
    boxes_to_rectangles,
    image_layer_data,
    rectangles_to_boxes,
    shapes_layer_data,
    tileset_from_shapes,
)


def test_rectangles_are_row_col_and_round_trip():
    xyxy = np.array([[1.0, 2.0, 5.0, 9.0]])
    r = boxes_to_rectangles(xyxy)
    assert r.shape == (1, 4, 2)
    assert r[0].tolist() == [[2, 1], [2, 5], [9, 5], [9, 1]]  # (row, col)
    r3 = boxes_to_rectangles(xyxy, plane=4)
    assert r3[0, :, 0].tolist() == [4, 4, 4, 4]
    back, planes = rectangles_to_boxes(list(r3))
    np.testing.assert_array_equal(back, xyxy)
    assert planes.tolist() == [4]


def test_shapes_layer_data_features_and_colours(coco_file):
    ts = read_coco(coco_file)
    data, meta, kind = shapes_layer_data(ts)
    assert kind == "shapes" and len(data) == 6 and meta["ndim"] == 3
    assert list(meta["features"]["class"]) == ["tumor", "stromal"] * 3
    tumor_rgba = ts.classes.by_name("tumor").rgba
    np.testing.assert_allclose(meta["edge_color"][0], tumor_rgba)
    assert data[2][0, 0] == 1  # third box is on the second tile (plane 1)


def test_image_layer_is_a_lazy_stack(coco_file):
    ts = read_coco(coco_file)
    data, meta, kind = image_layer_data(ts)
    assert kind == "image" and meta["rgb"] and data.shape == (3, 32, 48, 3)
    np.testing.assert_array_equal(np.asarray(data[1]), ts.by_id(2).pixels())


def test_shapes_back_to_tileset_applies_scale_and_translate_once(coco_file):
    ts = read_coco(coco_file)
    data, meta, _ = shapes_layer_data(ts)
    back = tileset_from_shapes(data, meta)
    for a, b in zip(ts, back, strict=True):
        np.testing.assert_array_equal(a.boxes.xyxy, b.boxes.xyxy)
        np.testing.assert_array_equal(a.boxes.class_ids, b.boxes.class_ids)
    # A Shapes layer drawn with scale 2 and a shift: its data maps back to pixels once.
    scaled = [(d - np.array([0, 10, 20])) / np.array([1, 2, 2]) for d in data]
    meta2 = dict(meta, scale=np.array([1, 2, 2]), translate=np.array([0, 10, 20]))
    back2 = tileset_from_shapes(scaled, meta2)
    np.testing.assert_allclose(back2.by_id(1).boxes.xyxy, ts.by_id(1).boxes.xyxy)


def test_unknown_class_in_layer_is_named(coco_file):
    ts = read_coco(coco_file)
    data, meta, _ = shapes_layer_data(ts)
    feats = dict(meta["features"])
    feats["class"] = ["tumor"] * 5 + ["mystery"]
    with pytest.raises(AnnotationError, match="shape 5: class 'mystery'"):
        tileset_from_shapes(data, dict(meta, features=feats))
