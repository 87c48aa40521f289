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
from napari_rmt.data.boxstore import read_boxes_zarr, write_boxes_zarr
from napari_rmt.data.errors import NapariRmtError
from napari_rmt.data.large import open_large_image, write_zarr_image
from napari_rmt.data.project import Project


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
    from napari_rmt.data.coco import write_coco
    from napari_rmt.data.results import write_coco_results

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


# ---------------------------------------------------------------- silent wrong results
def test_predict_maps_classes_by_name_or_refuses(tmp_path, capsys):
    from conftest import make_coco

    coco = make_coco(tmp_path / "data", n_images=2, size=(64, 64))
    run = tmp_path / "run"
    assert main(["train", "--coco", str(coco), "--method", "supervised", "--iterations", "1", "--warmup", "1",
                 "--batch", "1", "--out", str(run)]) == 0
    # the same classes under other ids and in another order
    data = json.loads(coco.read_text())
    remap = {1: 7, 2: 5, 3: 9}
    data["categories"] = [{"id": remap[c["id"]], "name": c["name"]} for c in reversed(data["categories"])]
    for a in data["annotations"]:
        a["category_id"] = remap[a["category_id"]]
    other = tmp_path / "data" / "other.json"
    other.write_text(json.dumps(data))
    out = tmp_path / "p.json"
    assert main(["predict", "--model", str(run), "--coco", str(other), "--out", str(out),
                 "--score-threshold", "0"]) == 0
    rows = json.loads(out.read_text())
    assert rows and {r["category_id"] for r in rows} <= {5, 7, 9}
    # a class the dataset lacks: refused, nothing written
    data["categories"] = [c for c in data["categories"] if c["name"] != "lymphocyte"]
    data["annotations"] = [a for a in data["annotations"] if a["category_id"] != 9]
    other.write_text(json.dumps(data))
    out.unlink()
    assert main(["predict", "--model", str(run), "--coco", str(other), "--out", str(out)]) == 2
    assert "['lymphocyte']" in capsys.readouterr().err and not out.exists()


def test_image_values_outside_the_rule_are_warned_about():
    from napari_rmt.data.errors import DataWarning
    from napari_rmt.data.imageio import to_uint8_rgb

    twelve = np.array([[0, 2048, 4095]], dtype=np.uint16)
    with pytest.warns(DataWarning, match="12-bit"):
        out = to_uint8_rgb(twelve, where="slide.tif")
    assert out[0, :, 0].tolist() == [0, 128, 255]  # not near black
    with pytest.warns(DataWarning, match=r"slide\.tif.*down to -5"):
        to_uint8_rgb(np.array([[-5, 100]], dtype=np.int16), where="slide.tif")
    with pytest.warns(DataWarning, match="outside 0..255"):
        to_uint8_rgb(np.array([[0.0, 300.0]], dtype=np.float32), where="x.zarr")
    full = np.array([[0, 65535]], dtype=np.uint16)
    assert to_uint8_rgb(full)[0, :, 0].tolist() == [0, 255]  # 16-bit data: no warning


def test_large_16_bit_image_scale_is_one_for_all_windows(tmp_path):
    from napari_rmt.data.errors import DataWarning

    a = np.zeros((64, 64, 3), dtype=np.uint16)
    a[:32] = 4000  # 12-bit data; the lower half is dark
    a[32:, :, :] = 100
    import zarr

    z = zarr.open(str(tmp_path / "a.zarr"), mode="w", shape=a.shape, chunks=(32, 32, 3), dtype="u2")
    z[...] = a
    img = open_large_image(tmp_path / "a.zarr")
    with pytest.warns(DataWarning, match="12-bit"):
        dark = img.read(0, 32, 32, 32)
    assert int(dark.max()) == round(100 / 4095 * 255)  # scaled as the whole image is, not stretched


def test_nan_weights_bad_config_and_bad_options_are_refused(tmp_path, tiny_tiles):
    import torch

    from napari_rmt.train import TrainConfig, Trainer
    from napari_rmt.train.checkpoint import CheckpointError, load_model, read_checkpoint, save_checkpoint

    cfg = TrainConfig.for_method("supervised", iterations=1, warmup=1, labelled_batch=1, model={"backbone": "resnet18"})
    trainer = Trainer(tiny_tiles[:2], [], ClassList.default(), cfg)
    list(trainer.run())
    state = trainer.state_dict()
    key = next(k for k, v in state["student"].items() if v.is_floating_point())
    state["student"][key] = torch.full_like(state["student"][key], float("nan"))
    save_checkpoint(tmp_path / "nan.pt", state)
    with pytest.raises(CheckpointError, match=r"nan\.pt.*NaN or infinite"):
        load_model(tmp_path / "nan.pt")
    ok = read_checkpoint(tmp_path / "nan.pt")
    ok["config"] = {"method": "rmt", "iterations": "many"}
    save_checkpoint(tmp_path / "badcfg.pt", ok)
    with pytest.raises(CheckpointError, match=r"badcfg\.pt: bad config"):
        load_model(tmp_path / "badcfg.pt")
    for bad, message in (
        ({"lr": float("inf")}, "lr is inf"), ({"semi_lr": float("nan")}, "semi_lr is nan"),
        ({"lambda_u": -1.0}, "lambda_u -1.0 must be a finite number >= 0"), ({"checkpoint_every": -1}, "checkpoint_every"),
        ({"burn_in": 10, "iterations": 5}, "never leave burn-in"), ({"momentum": 1.5}, "momentum"),
    ):
        with pytest.raises(NapariRmtError, match=message):
            TrainConfig.for_method("rmt", **bad)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["predict", "--model", "m.pt", "a.png", "--out", "o.json", "--batch-size", "-1"], "at least 1"),
        (["predict", "--model", "m.pt", "a.png", "--out", "o.json", "--score-threshold", "2"], r"\[0, 1\]"),
        (["predict", "--model", "m.pt", "a.png", "--out", "o.json", "--nms", "5"], r"\(0, 1\]"),
        (["evaluate", "--gt", "g.json", "--pred", "p.json", "--iou", "2"], r"\(0, 1\]"),
    ],
)
def test_command_line_options_out_of_range_are_refused(capsys, argv, message):
    import re

    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2 and re.search(message, capsys.readouterr().err)


def test_training_options_out_of_range_are_refused_before_training(tmp_path, capsys, coco_file):
    # what the config admits (train.config.BOUNDS) refuses it while parsing, exit status 2
    for value in ("inf", "nan", "-0.1"):
        with pytest.raises(SystemExit) as exc:
            main(["train", "--coco", str(coco_file), "--out", str(tmp_path / "r"), "--lr", value])
        assert exc.value.code == 2
        assert f"argument --lr: {float(value)} must be a finite number > 0" in capsys.readouterr().err
    # what the parser lets through, the config still checks by name (here a finite-number rule)
    assert main(["train", "--coco", str(coco_file), "--out", str(tmp_path / "r"), "--semi-lr", "inf"]) == 2
    assert "semi_lr is inf" in capsys.readouterr().err and not (tmp_path / "r" / "model.pt").exists()


def test_evaluate_reports_an_absent_class_as_na(tmp_path, capsys, coco_file):
    out = tmp_path / "p.json"
    out.write_text(json.dumps([{"image_id": 1, "category_id": 1, "bbox": [2, 3, 8.5, 6.25], "score": 0.9}]))
    assert main(["evaluate", "--gt", str(coco_file), "--pred", str(out), "--json", str(tmp_path / "e.json")]) == 0
    text = capsys.readouterr().out
    row = next(line for line in text.splitlines() if line.startswith("lymphocyte"))
    assert "n/a" in row and "0.0    " not in row.split()[1]
    res = json.loads((tmp_path / "e.json").read_text())
    assert res["classes"]["lymphocyte"]["f1"] is None and res["classes"]["lymphocyte"]["ap50"] is None
    assert res["classes"]["tumor"]["f1"] is not None


# ---------------------------------------------------------------- raw tracebacks
def test_tiny_image_and_too_many_boxes_are_clear_errors(tiny_tiles):
    from napari_rmt.train import TrainConfig, Trainer, TrainingError

    cfg = TrainConfig.for_method("supervised", iterations=1, model={"backbone": "resnet18"})
    one = Tile(id=99, name="dot.png", width=1, height=1, loader=lambda: np.zeros((1, 1, 3), np.uint8),
               boxes=Boxes([[0, 0, 1, 1]], [1]))
    with pytest.raises(TrainingError, match=r"'dot\.png' is 1x1 px.*at least 32"):
        Trainer([one], [], ClassList.default(), cfg)
    n = 60_000
    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 200, (n, 2))
    crowded = Tile(id=98, name="crowded.png", width=256, height=256, loader=lambda: np.zeros((256, 256, 3), np.uint8),
                   boxes=Boxes(np.hstack([xy, xy + 5]), np.ones(n, int)))
    with pytest.raises(TrainingError, match=r"'crowded\.png' has 60,000 boxes; at most [\d,]+ fit"):
        Trainer([crowded], [], ClassList.default(), cfg)


def test_absurd_sizes_and_paths_outside_the_dataset_are_refused(tmp_path, coco_file):
    from napari_rmt.data import read_coco
    from napari_rmt.data.errors import AnnotationError

    data = json.loads(coco_file.read_text())
    data["images"][0]["width"] = data["images"][0]["height"] = 100_000
    bad = coco_file.parent / "huge.json"
    bad.write_text(json.dumps(data))
    with pytest.raises(AnnotationError, match=r"images\[0\]: size 100000x100000 is too large for a tile"):
        read_coco(bad)
    for name in ("../../etc/passwd", "/etc/passwd"):
        data = json.loads(coco_file.read_text())
        data["images"][0]["file_name"] = name
        bad.write_text(json.dumps(data))
        with pytest.raises(AnnotationError, match=rf"images\[0\]: file_name '{name}' lies outside"):
            read_coco(bad)


# ---------------------------------------------------------------- resume
def test_resume_refuses_changed_options_and_other_tiles(tmp_path, capsys):
    from conftest import make_coco

    coco = make_coco(tmp_path / "data", n_images=4, size=(64, 64))
    run = tmp_path / "run"
    base = ["train", "--coco", str(coco), "--method", "supervised", "--iterations", "2", "--warmup", "1",
            "--batch", "1", "--labeled-fraction", "0.5", "--out", str(run)]
    assert main(base) == 0
    # training again into the same folder would overwrite the run: refused
    assert main(base) == 2 and "holds an earlier run" in capsys.readouterr().err
    resume = [*base, "--resume", str(run / "model.pt")]
    assert main([*resume, "--lr", "0.5"]) == 2
    err = capsys.readouterr().err
    assert "--lr 0.5 (saved 0.02)" in err and "differ" in err
    assert main([*resume, "--method", "rmt"]) == 2 and "--method rmt (saved supervised)" in capsys.readouterr().err
    # more iterations are honoured (the last --iterations given counts)
    assert main([*resume, "--iterations", "3"]) == 0
    from napari_rmt.train import read_checkpoint

    assert read_checkpoint(run / "model.pt")["iteration"] == 3
    assert "(saved" not in capsys.readouterr().err
    # another set of labelled tiles: a clear error, not an IndexError
    other = [*resume]
    other[other.index("0.5")] = "0.75"
    assert main(other) == 2 and "labelled tiles" in capsys.readouterr().err


def test_a_folder_with_one_bad_image_opens_the_rest(tmp_path):
    from conftest import write_tiles

    write_tiles(tmp_path / "tiles", n=3)
    (tmp_path / "tiles" / "broken.png").write_bytes(b"not a png at all")
    with pytest.warns(UserWarning, match=r"1 file\(s\) left out.*broken\.png"):
        ts = TileSet.from_folder(tmp_path / "tiles")
    assert sorted(t.name for t in ts) == ["tile_0.png", "tile_1.png", "tile_2.png"]
    for p in (tmp_path / "tiles").glob("tile_*.png"):
        p.unlink()
    with pytest.raises(NapariRmtError, match="none of its 1 images can be read"):
        TileSet.from_folder(tmp_path / "tiles")


def test_imagenet_weights_offline_is_a_clear_error(monkeypatch):
    import urllib.error

    import torchvision.models.resnet as resnet

    from napari_rmt.model import ModelConfig, build_detector
    from napari_rmt.model.detector import WeightsError

    def offline(*a, **kw):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(resnet, "resnet18", offline)
    with pytest.raises(WeightsError, match=r"could not be downloaded.*--weights FILE"):
        build_detector(3, ModelConfig(backbone="resnet18", weights="imagenet"))


# ---------------------------------------------------------------- outputs never written over
def test_resume_into_another_runs_folder_is_refused_and_predict_and_demo_keep_what_exists(tmp_path, capsys, coco_file):
    """Issue 33: no command writes over a file or run folder it did not make in this call
    without --overwrite: `train --resume A --out B` with B another run, `predict --out` an
    existing file or its .images.json, `demo --out` a folder holding an earlier run."""
    tiny = ["--iterations", "1", "--burn-in", "0", "--warmup", "1", "--batch", "1", "--method", "supervised"]
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(["train", "--coco", str(coco_file), *tiny, "--out", str(a)]) == 0
    assert main(["train", "--coco", str(coco_file), *tiny, "--out", str(b)]) == 0
    before = {p.name: p.read_bytes() for p in b.iterdir()}
    capsys.readouterr()
    assert main(["train", "--coco", str(coco_file), "--resume", str(a), "--iterations", "2", "--out", str(b)]) == 2
    assert "holds another run than --resume" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in b.iterdir()} == before
    # into its own folder it continues; into an empty folder too
    assert main(["train", "--coco", str(coco_file), "--resume", str(a / "model.pt"), "--iterations", "2",
                 "--out", str(a)]) == 0
    # predict: an existing --out and a user's file beside it are kept
    images = sorted((coco_file.parent / "images").glob("*.png"))
    out = tmp_path / "res.json"
    out.write_text("mine")
    capsys.readouterr()
    assert main(["predict", "--model", str(a), *map(str, images), "--out", str(out)]) == 2
    assert "exists already; give --overwrite" in capsys.readouterr().err and out.read_text() == "mine"
    out.unlink()
    sibling = tmp_path / "res.images.json"
    sibling.write_text("mine too")
    assert main(["predict", "--model", str(a), *map(str, images), "--out", str(out)]) == 2
    assert sibling.read_text() == "mine too" and not out.exists()
    assert main(["predict", "--model", str(a), *map(str, images), "--out", str(out), "--overwrite"]) == 0
    assert json.loads(sibling.read_text())
    # demo: an earlier run's files in --out are kept; a file as --out is a clear error
    capsys.readouterr()
    assert main(["demo", "--out", str(b), "--iterations", "1"]) == 2
    assert "exists already" in capsys.readouterr().err and {p.name: p.read_bytes() for p in b.iterdir()} == before
    assert main(["demo", "--out", str(out), "--iterations", "1"]) == 2
    assert "is a file" in capsys.readouterr().err


def test_focal_gamma_out_of_range_is_refused_in_one_line(tmp_path, capsys, coco_file):
    for value in ("-2", "nan"):
        with pytest.raises(SystemExit) as exc:
            main(["train", "--coco", str(coco_file), "--out", str(tmp_path / "r"), "--focal-gamma", value])
        assert exc.value.code == 2 and "argument --focal-gamma" in capsys.readouterr().err
    from napari_rmt.train import TrainConfig

    with pytest.raises(NapariRmtError, match="focal_gamma -2"):
        TrainConfig.for_method("supervised", model={"focal_gamma": -2.0})


def test_resume_on_other_tiles_or_other_classes_is_refused(tmp_path, capsys, coco_file):
    """Issue 33: a resume on other labelled ids of the same count, or on a dataset whose
    classes have other names, went on without a word."""
    ids = tmp_path / "ids.json"
    ids.write_text("[1, 2]")
    run = tmp_path / "run"
    tiny = ["--iterations", "1", "--burn-in", "0", "--warmup", "1", "--batch", "1", "--method", "supervised"]
    assert main(["train", "--coco", str(coco_file), "--labeled-ids", str(ids), *tiny, "--out", str(run)]) == 0
    ids.write_text("[2, 3]")
    capsys.readouterr()
    args = ["train", "--coco", str(coco_file), "--labeled-ids", str(ids), "--iterations", "2", "--resume", str(run),
            "--out", str(run)]
    assert main(args) == 2 and "trained on other annotated tiles" in capsys.readouterr().err
    data = json.loads(coco_file.read_text())
    data["categories"][0]["name"] = "neoplastic"
    other = coco_file.parent / "renamed.json"
    other.write_text(json.dumps(data))
    ids.write_text("[1, 2]")
    args[2] = str(other)
    assert main(args) == 2 and "learns classes" in capsys.readouterr().err
    args[2] = str(coco_file)
    assert main(args) == 0  # the same tiles and classes: it continues


@pytest.mark.parametrize("damage", ["truncated", "empty", "deleted", "string version", "string previous", "outside"])
def test_a_damaged_manifest_is_rebuilt_from_the_intact_states(tmp_path, damage):
    """Issue 33: a truncated, empty or deleted project.json (or one with a string version or
    previous, or naming a file outside the folder) stopped the project from opening and
    saving although its annotations.<n>.json states were intact."""
    project, folder = _saved_project(tmp_path)
    next(iter(project.tileset)).predictions = Boxes([[1, 1, 9, 9]], [1], scores=[0.8])
    project.save()  # state 2, state 1 its backup
    counts = [len(t.boxes) for t in project.tileset]
    manifest_path = folder / "project.json"
    manifest = json.loads(manifest_path.read_text())
    if damage == "truncated":
        manifest_path.write_text(manifest_path.read_text()[:25])
    elif damage == "empty":
        manifest_path.write_text("")
    elif damage == "deleted":
        manifest_path.unlink()
    elif damage == "string version":
        manifest_path.write_text(json.dumps({**manifest, "version": "2"}))
    elif damage == "string previous":
        manifest_path.write_text(json.dumps({**manifest, "previous": "annotations.1.json"}))
    else:
        outside = tmp_path / "elsewhere.json"
        outside.write_text((folder / manifest["annotations"]).read_text())
        manifest_path.write_text(json.dumps({**manifest, "annotations": str(outside)}))
    assert Project.is_project(folder)
    with pytest.warns(UserWarning, match="rebuilt from annotations.2.json"):
        reopened = Project.open(folder)
    assert [len(t.boxes) for t in reopened.tileset] == counts
    assert len(next(iter(reopened.tileset)).predictions) == 1
    reopened.save()  # and it saves again: a fresh manifest, state 3
    assert json.loads(manifest_path.read_text())["version"] == 3
    assert [len(t.boxes) for t in Project.open(folder).tileset] == counts


def test_a_deleted_predictions_file_is_reported(tmp_path):
    _project, folder = _saved_project(tmp_path)
    manifest = json.loads((folder / "project.json").read_text())
    (folder / manifest["predictions"]).unlink()
    with pytest.warns(UserWarning, match="predictions not restored: predictions.1.json, which the project names, is missing"):
        reopened = Project.open(folder)
    assert reopened.problems


def test_a_resumed_run_sweeps_the_temporary_files_of_its_killed_checkpoint_writes(tmp_path, capsys, coco_file):
    run = tmp_path / "run"
    tiny = ["--iterations", "1", "--burn-in", "0", "--warmup", "1", "--batch", "1", "--method", "supervised"]
    assert main(["train", "--coco", str(coco_file), *tiny, "--out", str(run)]) == 0
    orphans = [run / ".training.pt.abc123.tmp", run / ".model.pt.xyz.tmp"]
    for o in orphans:
        o.write_bytes(b"half a checkpoint")  # what a kill during the write leaves, just now
    mine = run / ".notes.txt.1.tmp"
    mine.write_text("not the run's")
    assert main(["train", "--coco", str(coco_file), "--resume", str(run), "--iterations", "2", "--out", str(run)]) == 0
    assert not any(o.exists() for o in orphans) and mine.exists()


def test_json_nested_past_the_parser_is_a_clear_error(tmp_path, capsys):
    """Issue 33: JSON nested 100,000 deep raised a raw RecursionError from the COCO,
    GeoJSON and project readers."""
    from napari_rmt.data import read_coco
    from napari_rmt.data.geojson import read_geojson
    from napari_rmt.data.tiles import TileSet

    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(NapariRmtError, match=r"deep\.json: not a JSON file"):
        read_coco(deep)
    with pytest.raises(NapariRmtError, match=r"deep\.json: not a JSON file"):
        read_geojson(deep, TileSet())
    assert main(["train", "--coco", str(deep), "--out", str(tmp_path / "r")]) == 2
    assert "not a JSON file" in capsys.readouterr().err
    folder = tmp_path / "proj"
    folder.mkdir()
    (folder / "project.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(NapariRmtError, match="damaged project manifest"):
        Project.open(folder)


def test_a_full_disk_is_one_line_and_keeps_what_was_there(tmp_path, capsys, coco_file, monkeypatch):
    """Issue 33: a full disk during train, predict or a save raised OSError 28 with a
    traceback. Now one line; the earlier run's files are untouched (atomic writes)."""
    import errno

    import napari_rmt.data.atomic as atomic

    run = tmp_path / "run"
    tiny = ["--iterations", "1", "--burn-in", "0", "--warmup", "1", "--batch", "1", "--method", "supervised"]
    assert main(["train", "--coco", str(coco_file), *tiny, "--out", str(run)]) == 0
    before = {p.name: p.read_bytes() for p in run.iterdir()}

    def full(path, write):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(atomic, "atomic_write", full)
    capsys.readouterr()
    args = ["train", "--coco", str(coco_file), "--resume", str(run), "--iterations", "2", "--out", str(run)]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("napari-rmt: error") == 1 and "No space left on device writing" in err and "Traceback" not in err
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before
    images = sorted((coco_file.parent / "images").glob("*.png"))
    assert main(["predict", "--model", str(run), *map(str, images), "--out", str(tmp_path / "p.json")]) == 2
    assert "No space left on device" in capsys.readouterr().err


def test_experiment_out_is_never_an_input(tmp_path, capsys, coco_file):
    assert main(["experiment", "--coco", str(coco_file), "--out", str(coco_file)]) == 2
    assert "is a file" in capsys.readouterr().err


def test_a_project_save_sweeps_what_a_killed_save_left(tmp_path):
    """Issue 33: a save killed mid-write leaves a temporary file under a numbered name that
    no later save writes again; the next save (the project's one writer) removes it, and
    nothing else of the folder."""
    from napari_rmt.data.project import Project
    from napari_rmt.data.sample import load_sample

    project = Project(load_sample(), tmp_path / "p")
    project.save()
    left = [tmp_path / "p" / n for n in (".annotations.7.json.ab12.tmp", ".predictions.7.json.cd34.tmp",
                                         ".project.json.ef56.tmp")]
    for f in left:
        f.write_bytes(b"{half")
    mine = tmp_path / "p" / "notes.txt"
    mine.write_text("the user's")
    project.save()
    assert not any(f.exists() for f in left) and mine.read_text() == "the user's"
    assert len(Project.open(tmp_path / "p").tileset) == 16


def test_a_result_box_without_area_is_named_and_left_out(tmp_path, capsys, coco_file):
    """Issue 33: a results file's box of negative width was scored as a false positive
    without a word; it is left out with a warning naming it."""
    pred = tmp_path / "p.json"
    pred.write_text(json.dumps([{"image_id": 1, "category_id": 1, "bbox": [10, 3, -8.5, 6.25], "score": 0.9},
                                {"image_id": 1, "category_id": 1, "bbox": [2, 3, 8.5, 6.25], "score": 0.9}]))
    assert main(["evaluate", "--gt", str(coco_file), "--pred", str(pred)]) == 0
    said = capsys.readouterr()
    assert "detection [0]: bbox [10, 3, -8.5, 6.25] has no area" in said.err
    tumor = next(line for line in said.out.splitlines() if line.startswith("tumor"))
    assert tumor.split()[4] == "1"  # one prediction scored, not two
