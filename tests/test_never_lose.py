"""Nothing the user made is lost or overwritten: outputs, stores, projects, killed runs."""

from __future__ import annotations

import json
import os
import stat
import time

import numpy as np
import pytest

from napari_rmt.cli import main
from napari_rmt.data import Boxes, ClassList, Tile, TileSet
from napari_rmt.data.atomic import ORPHAN_AGE_S, atomic_write, atomic_write_json, check_output
from napari_rmt.data.errors import NapariRmtError
from napari_rmt.data.large import open_large_image, write_zarr_image
from napari_rmt.data.project import Project
from napari_rmt.model.wholeimage import read_boxes_zarr, write_boxes_zarr


def _tree(folder):
    """Every file under ``folder`` with its bytes: 'unchanged' means all of them equal."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_box_store_never_overwrites_an_image_store(tmp_path):
    rng = np.random.default_rng(0)
    image = tmp_path / "slide.zarr"
    write_zarr_image(rng.integers(0, 256, (64, 80, 3), dtype=np.uint8), image, chunks=32)
    before = _tree(image)
    boxes = Boxes([[1, 2, 10, 12]], [1], scores=[0.9])
    with pytest.raises(NapariRmtError, match=r"slide\.zarr.*not an earlier napari-rmt output"):
        write_boxes_zarr(boxes, image, ClassList.default(), (80, 64))
    assert _tree(image) == before and open_large_image(image).size == (80, 64)
    # an earlier box store is replaced whole, and no temporary folder is left beside it
    out = tmp_path / "boxes.zarr"
    write_boxes_zarr(boxes, out, ClassList.default(), (80, 64))
    write_boxes_zarr(Boxes([[0, 0, 5, 5], [3, 3, 9, 9]], [2, 3], scores=[0.5, 0.6]), out, ClassList.default(), (80, 64))
    back, _, _ = read_boxes_zarr(out)
    assert back.class_ids.tolist() == [2, 3]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["boxes.zarr", "slide.zarr"]


def test_predict_refuses_to_write_into_its_input_before_any_work(tmp_path, capsys):
    rng = np.random.default_rng(0)
    image = tmp_path / "slide.zarr"
    write_zarr_image(rng.integers(0, 256, (64, 80, 3), dtype=np.uint8), image, chunks=32)
    before = _tree(image)
    # the store would be tmp_path/slide.zarr: the input itself. The model path does not even
    # exist: the check comes before the model is loaded.
    rc = main(["predict", "--model", str(tmp_path / "none.pt"), str(image), "--out", str(tmp_path / "p.json"),
               "--zarr", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 2 and "--zarr" in err and "slide.zarr" in err and "input" in err
    assert _tree(image) == before
    rc = main(["predict", "--model", str(tmp_path / "none.pt"), str(image), "--out", str(image / "p.json")])
    assert rc == 2 and "is (or lies inside) the input" in capsys.readouterr().err
    assert _tree(image) == before


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda d: (d / "folder").mkdir() or d / "folder", "is a folder"),
        (lambda d: (d / "afile").write_text("x") and d / "afile" / "out.json", "is a file, not a folder"),
    ],
)
def test_output_paths_are_checked_before_the_work(tmp_path, make, message):
    with pytest.raises(NapariRmtError, match=message):
        check_output(make(tmp_path))
    assert check_output(tmp_path / "new" / "deeper" / "out.json") == tmp_path / "new" / "deeper" / "out.json"


def test_evaluate_and_train_check_their_outputs_first(tmp_path, capsys, coco_file):
    (tmp_path / "afile").write_text("keep me")
    rc = main(["evaluate", "--gt", str(coco_file), "--pred", str(tmp_path / "missing.json"),
               "--json", str(tmp_path / "afile" / "x.json")])
    assert rc == 2 and "afile is a file" in capsys.readouterr().err
    rc = main(["train", "--coco", str(coco_file), "--iterations", "1", "--out", str(tmp_path / "afile")])
    assert rc == 2 and "is a file" in capsys.readouterr().err
    assert (tmp_path / "afile").read_text() == "keep me"


def test_atomic_write_keeps_permissions_removes_orphans_and_refuses_folders(tmp_path):
    target = tmp_path / "out.json"
    atomic_write_json(target, {"a": 1})
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~umask  # not mkstemp's 0600
    os.chmod(target, 0o640)
    atomic_write_json(target, {"a": 2})
    assert stat.S_IMODE(target.stat().st_mode) == 0o640 and json.loads(target.read_text()) == {"a": 2}
    old = tmp_path / ".out.json.abc123.tmp"
    old.write_bytes(b"x" * 1000)
    fresh = tmp_path / ".out.json.def456.tmp"  # maybe another process's write in progress
    fresh.write_bytes(b"y")
    past = time.time() - ORPHAN_AGE_S - 10
    os.utime(old, (past, past))
    atomic_write_json(target, {"a": 3})
    assert not old.exists() and fresh.exists()
    (tmp_path / "dir.json").mkdir()
    with pytest.raises(NapariRmtError, match="is a folder"):
        atomic_write(tmp_path / "dir.json", lambda fh: fh.write(b"{}"))


def test_a_project_from_an_image_layer_reopens_with_its_boxes(tmp_path):
    rng = np.random.default_rng(0)
    planes = [rng.integers(0, 256, (40, 50, 3), dtype=np.uint8) for _ in range(2)]
    tiles = [
        Tile(id=i + 1, name=f"layer [{i}]", width=50, height=40, loader=lambda a=p: a)
        for i, p in enumerate(planes)
    ]
    ts = TileSet(tiles)
    next(iter(ts)).boxes = Boxes([[1, 2, 11, 12], [20, 5, 30, 15]], [1, 2])
    Project(ts, tmp_path / "proj").save()
    back = Project.open(tmp_path / "proj").tileset
    assert [t.name for t in back] == ["layer [0]", "layer [1]"]
    assert next(iter(back)).boxes.xyxy.tolist() == [[1, 2, 11, 12], [20, 5, 30, 15]]
    for t, p in zip(back, planes, strict=True):
        np.testing.assert_array_equal(t.pixels(), p)
    # saved once: a second save does not rewrite the pixels
    png = tmp_path / "proj" / "images" / "tile_000001.png"
    mtime = png.stat().st_mtime_ns
    Project(ts, tmp_path / "proj").save()
    assert png.stat().st_mtime_ns == mtime


def _saved_project(tmp_path, n_tiles=3):
    from conftest import synthetic_tiles

    tiles = synthetic_tiles(n=n_tiles)
    for t in tiles:
        t.loader = None
    folder = tmp_path / "proj"
    images = folder / "images"
    images.mkdir(parents=True)
    from PIL import Image

    for t in tiles:
        arr = np.zeros((t.height, t.width, 3), np.uint8)
        Image.fromarray(arr).save(images / f"{t.name}.png")
        t.path = images / f"{t.name}.png"
    project = Project(TileSet(tiles), folder)
    project.save()
    return project, folder


def test_project_state_is_one_unit_with_a_backup(tmp_path):
    project, folder = _saved_project(tmp_path)
    manifest = json.loads((folder / "project.json").read_text())
    assert manifest["version"] == 1 and (folder / manifest["annotations"]).is_file()
    # accept a prediction: a crash after the new files are written but before the manifest
    # switches reopens the previous state whole (no box counted twice)
    first = next(iter(project.tileset))
    first.predictions = Boxes([[1, 1, 9, 9]], [1], scores=[0.8])
    project.save()
    n_before = len(first.boxes)
    first.boxes = Boxes(np.vstack([first.boxes.xyxy, [[1, 1, 9, 9]]]), [*first.boxes.class_ids, 1])
    first.predictions = Boxes()
    from napari_rmt.data.coco import write_coco, write_coco_results

    write_coco(project.tileset, folder / "annotations.3.json")  # the crash: manifest not switched
    write_coco_results(project.tileset, folder / "predictions.3.json")
    back = next(iter(Project.open(folder).tileset))
    assert len(back.boxes) == n_before and len(back.predictions) == 1
    # a damaged current annotations file: the backup opens, and it is said
    project.save()
    manifest = json.loads((folder / "project.json").read_text())
    (folder / manifest["annotations"]).write_text("{ not json")
    with pytest.warns(UserWarning, match="opened the backup"):
        reopened = Project.open(folder)
    assert reopened.problems and len(reopened.tileset) == 3
    # only the current state and its backup are kept
    names = sorted(p.name for p in folder.glob("*.json"))
    assert names == sorted(["project.json", manifest["annotations"], manifest["predictions"],
                            manifest["previous"]["annotations"], manifest["previous"]["predictions"]])


def test_project_opens_despite_damaged_predictions_and_a_missing_image(tmp_path):
    project, folder = _saved_project(tmp_path)
    manifest = json.loads((folder / "project.json").read_text())
    (folder / manifest["predictions"]).write_text("[{")
    victim = next(iter(project.tileset)).path
    victim.unlink()
    with pytest.warns(UserWarning) as record:
        reopened = Project.open(folder)
    text = " ".join(str(w.message) for w in record)
    assert "predictions not restored" in text and "1 image(s) missing" in text and victim.name in text
    assert len(reopened.tileset) == 3
    assert [len(t.boxes) for t in reopened.tileset] == [len(t.boxes) for t in project.tileset]


def test_a_folder_from_before_the_manifest_opens_and_converts(tmp_path):
    from napari_rmt.data.coco import write_coco

    project, folder = _saved_project(tmp_path)
    for p in folder.glob("*.json"):
        p.unlink()
    write_coco(project.tileset, folder / "annotations.json")
    old = Project.open(folder)
    assert len(old.tileset) == 3
    old.save()
    assert (folder / "project.json").is_file() and not (folder / "annotations.json").exists()
