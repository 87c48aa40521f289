import json

import numpy as np
import pytest
from pycocotools.coco import COCO

from napari_rmt.data import (
    AnnotationError,
    Boxes,
    BoxSource,
    DataWarning,
    ImageReadError,
    TileStatus,
    read_coco,
    read_coco_results,
    write_coco,
    write_coco_results,
)


def _load(path):
    return json.loads(path.read_text())


def _save(path, data):
    path.write_text(json.dumps(data))
    return path


def test_read_synthetic(coco_file):
    ts = read_coco(coco_file)
    assert len(ts) == 3 and ts.classes.names == ["tumor", "stromal", "lymphocyte"]
    t = ts.by_id(1)
    assert (t.width, t.height) == (48, 32) and t.status is TileStatus.LABELLED
    np.testing.assert_allclose(t.boxes.xyxy, [[2, 3, 10.5, 9.25], [12, 3, 20.5, 9.25]])
    assert t.pixels().shape == (32, 48, 3)


def test_round_trip_is_exact_and_loads_in_pycocotools(coco_file, tmp_path):
    ts = read_coco(coco_file)
    ts.by_id(2).status = TileStatus.UNLABELLED
    ts.by_id(1).reject(np.array([[1.0, 2.0, 11.5, 9.25], [40.0, 20.0, 60.0, 40.0]]))  # the second clipped to 48x32
    out = write_coco(ts, tmp_path / "export" / "out.json")
    coco = COCO(str(out))
    assert len(coco.getAnnIds()) == 6 and sorted(coco.getCatIds()) == [1, 2, 3]
    # the export lies beside, not above, the images: it names them by absolute path, which
    # is read only when allowed
    with pytest.raises(AnnotationError, match="lies outside the dataset folder"):
        read_coco(out)
    back = read_coco(out, allow_outside=True)
    assert back.by_id(2).status is TileStatus.UNLABELLED  # status survives
    # the boxes the user deleted survive too; pycocotools ignores the key
    np.testing.assert_array_equal(back.by_id(1).rejected, [[1.0, 2.0, 11.5, 9.25], [40.0, 20.0, 48.0, 32.0]])
    assert back.by_id(2).rejected.shape == (0, 4) and "napari_rmt_rejected" not in _load(out)["images"][1]
    for a, b in zip(ts, back, strict=True):
        np.testing.assert_array_equal(a.boxes.xyxy, b.boxes.xyxy)
        np.testing.assert_array_equal(a.boxes.class_ids, b.boxes.class_ids)
        assert b.path.resolve() == a.path.resolve()
    data = _load(out)
    assert "info" in data and [a["id"] for a in data["annotations"]] == list(range(1, 7))
    assert all(a["iscrowd"] == 0 and a["area"] == pytest.approx(8.5 * 6.25) for a in data["annotations"])


def test_predictions_round_trip_through_loadres(coco_file, tmp_path):
    ts = read_coco(coco_file)
    ts.by_id(1).predictions = Boxes(
        xyxy=[[1, 1, 5, 6]], class_ids=[3], scores=[0.75], sources=[BoxSource.PREDICTED]
    )
    gt = COCO(str(write_coco(ts, tmp_path / "gt.json")))
    res_path = write_coco_results(ts, tmp_path / "pred.json")
    dt = gt.loadRes(str(res_path))
    ann = dt.loadAnns(dt.getAnnIds())[0]
    assert ann["score"] == 0.75 and ann["bbox"] == [1, 1, 4, 5] and ann["category_id"] == 3
    fresh = read_coco(tmp_path / "gt.json")
    read_coco_results(res_path, fresh)
    np.testing.assert_array_equal(fresh.by_id(1).predictions.xyxy, [[1, 1, 5, 6]])
    assert fresh.by_id(1).predictions.scores.tolist() == [0.75]
    assert np.isnan(fresh.by_id(1).predictions.class_doubt).all()  # none given, none made up


def test_a_predictions_class_doubt_survives_a_results_file_and_a_bad_one_is_named(coco_file, tmp_path):
    import json

    ts = read_coco(coco_file)
    ts.by_id(1).predictions = Boxes([[1, 1, 5, 6], [6, 6, 9, 9]], [3, 1], [0.75, 0.6], class_doubt=[0.25, np.nan])
    res_path = write_coco_results(ts, tmp_path / "pred.json")
    fresh = read_coco_results(res_path, read_coco(coco_file))
    got = fresh.by_id(1).predictions.class_doubt
    assert got[0] == 0.25 and np.isnan(got[1])
    records = json.loads(res_path.read_text())
    records[0]["napari_rmt_class_doubt"] = 1.5
    res_path.write_text(json.dumps(records))
    with pytest.raises(AnnotationError, match=r"detection \[0\]: napari_rmt_class_doubt 1.5 is not a number in \[0, 1\]"):
        read_coco_results(res_path, read_coco(coco_file))


def test_status_rules(coco_file):
    data = _load(coco_file)
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] != 3]
    data["images"][0]["napari_rmt_status"] = "reviewed"
    _save(coco_file, data)
    ts = read_coco(coco_file)
    assert [t.status for t in ts] == [TileStatus.REVIEWED, TileStatus.LABELLED, TileStatus.UNLABELLED]
    ts = read_coco(coco_file, default_status=TileStatus.UNLABELLED)
    assert ts.by_id(2).status is TileStatus.UNLABELLED and ts.by_id(1).status is TileStatus.REVIEWED


def test_box_outside_is_clipped_with_its_annotation_id(coco_file):
    data = _load(coco_file)
    data["annotations"][1]["bbox"] = [40, 30, 20, 10]  # image is 48 x 32
    _save(coco_file, data)
    with pytest.warns(
        DataWarning, match=r"annotations\.json: image 'tile_0\.png'.*annotation id 2 .* clipped"
    ):
        ts = read_coco(coco_file)
    np.testing.assert_array_equal(ts.by_id(1).boxes.xyxy[1], [40, 30, 48, 32])


def test_zero_area_box_is_dropped_and_named(coco_file):
    data = _load(coco_file)
    data["annotations"][4]["bbox"] = [5, 5, 0, 4]
    _save(coco_file, data)
    with pytest.warns(DataWarning, match="annotation id 5 .* zero area .* dropped"):
        ts = read_coco(coco_file)
    assert len(ts.by_id(3).boxes) == 1 and len(ts.by_id(1).boxes) == 2


def test_duplicate_annotation_ids_warn_and_keep(coco_file):
    data = _load(coco_file)
    data["annotations"][1]["id"] = 1
    _save(coco_file, data)
    with pytest.warns(DataWarning, match="annotation id 1: id is used twice"):
        ts = read_coco(coco_file)
    assert sum(len(t.boxes) for t in ts) == 6


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda d: d["annotations"][0].update(category_id=9), r"annotation id 1: category_id 9 is not in"),
        (lambda d: d["annotations"][2].update(image_id=77), r"annotation id 3: image_id 77 is not in"),
        (lambda d: d["images"].append(dict(d["images"][0])), "image id 1 is used twice"),
        (
            lambda d: d["categories"].append({"id": 1, "name": "x"}),
            r"categories\[3\]: class id 1 is used twice",
        ),
        (lambda d: d["images"][1].update(width="48"), r"images\[1\]: width '48' is not an integer"),
        (lambda d: d["images"][0].pop("file_name"), r"images\[0\]: missing 'file_name'"),
        (
            lambda d: d["annotations"][0].update(bbox=[1, 2, 3]),
            r"annotation id 1: bbox \[1, 2, 3\] is not four",
        ),
        (lambda d: d.pop("categories"), "not a COCO file"),
        (lambda d: d["images"][0].update(napari_rmt_status="done"), "is not one of"),
        (
            lambda d: d["images"][0].update(napari_rmt_rejected=[[1, 2, 3, 4], [1, 2, "x", 4]]),
            r"images\[0\]: napari_rmt_rejected\[1\] \[1, 2, 'x', 4\] is not four finite numbers",
        ),
        (lambda d: d["images"][0].update(napari_rmt_rejected={"x": 1}), "napari_rmt_rejected .* is not a list"),
    ],
)
def test_malformed_coco_names_file_and_item(coco_file, mutate, message):
    data = _load(coco_file)
    mutate(data)
    _save(coco_file, data)
    with pytest.raises(AnnotationError, match=message) as info:
        read_coco(coco_file)
    assert str(coco_file) in str(info.value)


def test_not_json_and_missing_image(coco_file, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{ not json")
    with pytest.raises(AnnotationError, match=r"bad\.json: not a JSON file"):
        read_coco(bad)
    (tmp_path / "images" / "tile_1.png").unlink()
    with pytest.raises(ImageReadError, match=r"1 image file\(s\) not found: .*tile_1\.png"):
        read_coco(coco_file)
    # Reading without the file check still works, and the pixels then fail by name.
    ts = read_coco(coco_file, check_files=False)
    with pytest.raises(ImageReadError, match=r"tile_1\.png: image file not found"):
        ts.by_id(2).pixels()


def test_size_mismatch_names_the_file(coco_file):
    data = _load(coco_file)
    data["images"][0]["width"] = 50
    _save(coco_file, data)
    ts = read_coco(coco_file)
    with pytest.raises(ImageReadError, match=r"tile_0\.png: image is 48x32 but the annotations say 50x32"):
        ts.by_id(1).pixels()


def test_export_is_atomic_on_failure(coco_file, tmp_path):
    ts = read_coco(coco_file)
    out = tmp_path / "keep.json"
    out.write_text("previous export")
    ts.by_id(1).meta["unserialisable"] = object()
    with pytest.raises(TypeError):
        write_coco(ts, out)
    assert out.read_text() == "previous export"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".keep")] == []


def test_results_that_name_their_file_land_on_that_image(coco_file, tmp_path):
    """Issue 33: results of image files (``predict`` on paths) number images their own way;
    scored against a COCO file with other ids, every image got another's boxes. The file
    a result names now decides; a file the dataset lacks is refused by name."""
    from napari_rmt.data.errors import AnnotationError

    images = sorted((coco_file.parent / "images").glob("*.png"))  # tile_0, tile_1, tile_2: ids 1, 2, 3
    res = [
        {"image_id": 1, "file_name": str(images[2]), "category_id": 1, "bbox": [1, 1, 4, 5], "score": 0.9},
        {"image_id": 3, "file_name": "elsewhere/" + images[0].name, "category_id": 2, "bbox": [2, 2, 4, 4],
         "score": 0.8},
    ]
    (tmp_path / "res.json").write_text(json.dumps(res))
    ts = read_coco(coco_file)
    read_coco_results(tmp_path / "res.json", ts)
    assert ts.by_id(3).predictions.scores.tolist() == [0.9]  # by its file, not by id 1
    assert ts.by_id(1).predictions.scores.tolist() == [0.8]  # by the bare file name
    assert len(ts.by_id(2).predictions) == 0
    res[0]["file_name"] = "nowhere.png"
    (tmp_path / "res.json").write_text(json.dumps(res))
    with pytest.raises(AnnotationError, match=r"detection \[0\]: file_name 'nowhere.png' is none of"):
        read_coco_results(tmp_path / "res.json", ts)


def test_an_exported_dataset_folder_moves_and_an_outside_json_keeps_its_images(tmp_path):
    """Issue 34: a COCO file written beside its images names them relatively, so the
    folder can move (to another disk, another machine) and still open, in napari-rmt and
    in pycocotools; one written elsewhere names them absolutely and opens from anywhere."""
    import shutil

    from pycocotools.coco import COCO

    from conftest import make_coco
    from napari_rmt.data import read_coco, write_coco

    src = make_coco(tmp_path / "a")
    ts = read_coco(src)
    shapes = [t.pixels().shape for t in ts]
    write_coco(ts, tmp_path / "a" / "export.json")
    names = [im["file_name"] for im in json.loads((tmp_path / "a" / "export.json").read_text())["images"]]
    assert all(not n.startswith("/") and ".." not in n for n in names)
    shutil.move(str(tmp_path / "a"), str(tmp_path / "moved"))
    again = read_coco(tmp_path / "moved" / "export.json")
    assert [t.pixels().shape for t in again] == shapes
    assert len(COCO(str(tmp_path / "moved" / "export.json")).getAnnIds()) == sum(len(t.boxes) for t in ts)

    write_coco(again, tmp_path / "elsewhere" / "out.json")
    names = [im["file_name"] for im in json.loads((tmp_path / "elsewhere" / "out.json").read_text())["images"]]
    assert all(n.startswith("/") for n in names)
    shutil.move(str(tmp_path / "elsewhere"), str(tmp_path / "there"))
    assert len(read_coco(tmp_path / "there" / "out.json", allow_outside=True)) == len(ts)
