import numpy as np
import pytest

from napari_rmt.data import AnnotationError, Boxes, BoxSource, CellBox, DataWarning, sanitize_boxes


def test_boxes_columns_and_conversions():
    b = Boxes.from_xywh([[1, 2, 3, 4], [0, 0, 10, 5]], class_ids=[1, 2])
    np.testing.assert_array_equal(b.xyxy, [[1, 2, 4, 6], [0, 0, 10, 5]])
    np.testing.assert_array_equal(b.xywh, [[1, 2, 3, 4], [0, 0, 10, 5]])
    np.testing.assert_array_equal(b.areas, [12, 50])
    assert np.isnan(b.scores).all() and (b.sources == BoxSource.MANUAL).all()
    cells = list(b)
    assert cells[0] == CellBox(1, 2, 4, 6, 1, None, BoxSource.MANUAL)
    assert Boxes.from_cells(cells).counts_by_class() == {1: 1, 2: 1}
    assert len(b[np.array([False, True])]) == 1


def test_mismatched_columns_are_refused():
    with pytest.raises(ValueError, match="differ in length"):
        Boxes(xyxy=[[0, 0, 1, 1]], class_ids=[1, 2])


def test_sanitize_clips_and_names_the_box():
    b = Boxes(xyxy=[[-5, 2, 10, 8], [5, 5, 9, 9]], class_ids=[1, 1])
    with pytest.warns(
        DataWarning, match=r"tile\.png: box annotation id 7 .* clipped to \[0\.0, 2\.0, 10\.0, 8\.0\]"
    ):
        out = sanitize_boxes(
            b, width=20, height=20, where="tile.png", labels=["annotation id 7", "annotation id 8"]
        )
    np.testing.assert_array_equal(out.xyxy, [[0, 2, 10, 8], [5, 5, 9, 9]])


def test_sanitize_drops_zero_area_and_outside_boxes_by_name():
    b = Boxes(xyxy=[[3, 3, 3, 9], [30, 30, 40, 40], [1, 1, 2, 2]], class_ids=[1, 2, 3])
    with pytest.warns(DataWarning) as record:
        out = sanitize_boxes(b, 20, 20, "t.png", labels=["A", "B", "C"])
    messages = " | ".join(str(w.message) for w in record)
    assert "box A" in messages and "box B" in messages and "dropped" in messages
    assert "box C" not in messages
    assert out.class_ids.tolist() == [3]


def test_sanitize_swapped_corners_are_fixed_silently(recwarn):
    out = sanitize_boxes(Boxes(xyxy=[[9, 8, 1, 2]], class_ids=[1]), 20, 20, "t")
    np.testing.assert_array_equal(out.xyxy, [[1, 2, 9, 8]])
    assert not [w for w in recwarn if issubclass(w.category, DataWarning)]


def test_sanitize_refuses_non_finite():
    with pytest.raises(AnnotationError, match="box X has non-finite"):
        sanitize_boxes(Boxes(xyxy=[[0, 0, np.nan, 1]], class_ids=[1]), 5, 5, "t", labels=["X"])
