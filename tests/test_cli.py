import json

import numpy as np
import pytest
from pycocotools.coco import COCO

from napari_rmt.cli import main

# A few steps that exercise every phase: burn-in, then pseudo-labels from any score.
TINY_TRAINING = ["--burn-in", "1", "--warmup", "1", "--threshold", "0.0", "--batch", "1"]


def test_demo_trains_and_writes_predictions(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path), "--iterations", "2"]) == 0
    gt = COCO(str(tmp_path / "annotations.json"))
    assert len(gt.getImgIds()) == 4  # the four 'annotated' tiles
    preds = json.loads((tmp_path / "predictions.json").read_text())
    assert preds and {p["image_id"] for p in preds} <= set(range(1, 17)) - set(gt.getImgIds())
    assert all(0.05 <= p["score"] <= 1 for p in preds)
    geo = json.loads((tmp_path / "predictions.geojson").read_text())
    assert len(geo["features"]) == len(preds)
    assert (tmp_path / "model.pt").is_file()
    from PIL import Image

    assert Image.open(tmp_path / "prediction.png").size == (2 * 512 + 8, 512 + 22)  # truth | predictions, legend
    said = capsys.readouterr().out
    assert "predicted boxes" in said and "F1 against them" in said


def test_train_then_predict_on_a_tiny_coco(tmp_path, capsys):
    from conftest import make_coco

    coco = make_coco(tmp_path / "data", n_images=4, size=(64, 64))
    run = tmp_path / "run"
    rc = main(
        [
            "train",
            "--coco",
            str(coco),
            "--method",
            "rmt",
            "--labeled-fraction",
            "0.5",
            "--iterations",
            "3",
            *TINY_TRAINING,
            "--out",
            str(run),
        ]
    )
    assert rc == 0
    assert (run / "model.pt").is_file() and json.loads((run / "config.json").read_text())["method"] == "rmt"
    events = [json.loads(x) for x in (run / "events.jsonl").read_text().splitlines()]
    assert [e["iteration"] for e in events if e["event"] == "IterationEvent"] == [1, 2, 3]
    assert len(json.loads((run / "labelled_ids.json").read_text())) == 2

    pred = tmp_path / "pred.json"
    assert main(["predict", "--model", str(run / "model.pt"), "--coco", str(coco), "--out", str(pred)]) == 0
    gt = COCO(str(coco))
    dt = gt.loadRes(str(pred))  # image ids are the COCO file's
    # the model's own scoring is 1 - p(background); by class, each box's score is at most that
    by_class = tmp_path / "pred_class.json"
    args = ["predict", "--model", str(run / "model.pt"), "--coco", str(coco), "--box-score", "class"]
    assert main([*args, "--out", str(by_class)]) == 0
    fg, cl = json.loads(pred.read_text()), json.loads(by_class.read_text())
    assert fg and cl and fg != cl
    assert max(d["score"] for d in fg) >= max(d["score"] for d in cl)
    assert set(dt.getImgIds()) <= set(gt.getImgIds())
    images = sorted((tmp_path / "data" / "images").glob("*.png"))
    pred2 = tmp_path / "pred2.json"
    assert main(["predict", "--model", str(run), *map(str, images), "--out", str(pred2)]) == 0
    index = json.loads(pred2.with_suffix(".images.json").read_text())
    assert [i["id"] for i in index] == [1, 2, 3, 4]


def test_a_run_folder_holds_the_model_and_the_training_state_apart(tmp_path, capsys):
    """model.pt: the predicting network in fp16, config and classes (what predict needs);
    training.pt: the whole state, which --resume reads from the folder or either file."""
    import torch

    from conftest import make_coco
    from napari_rmt.data.errors import NapariRmtError
    from napari_rmt.model.predict import predict_tiles
    from napari_rmt.train import Trainer, read_checkpoint
    from napari_rmt.train.checkpoint import model_from_checkpoint, read_training_state

    coco = make_coco(tmp_path / "data", n_images=4, size=(64, 64))
    run = tmp_path / "run"
    base = ["train", "--coco", str(coco), "--method", "rmt+", "--labeled-fraction", "0.5", *TINY_TRAINING,
            "--out", str(run)]
    assert main([*base, "--iterations", "2"]) == 0
    model, state = read_checkpoint(run / "model.pt"), read_checkpoint(run / "training.pt")
    assert model["kind"] == "model" and model["teacher"] is None and "optimizer" not in model
    assert {v.dtype for v in model["student"].values() if v.is_floating_point()} == {torch.float16}
    assert state["optimizer"] and state["teacher"] is not None and model["iteration"] == state["iteration"] == 2
    assert (run / "model.pt").stat().st_size < 0.3 * (run / "training.pt").stat().st_size
    # the state's predicting network (rmt+: the student), rounded to fp16
    for k, v in state["student"].items():
        assert torch.equal(model["student"][k], v.half() if v.is_floating_point() else v), k
    from napari_rmt.data import read_coco

    tiles = list(read_coco(coco))
    a = predict_tiles(model_from_checkpoint(model)[0], tiles, model_from_checkpoint(state)[1], store=False)
    b = predict_tiles(model_from_checkpoint(state)[0], tiles, model_from_checkpoint(state)[1], store=False)
    for x, y in zip(a, b, strict=True):  # the best boxes score the same but for rounding
        assert abs(x.scores[:20] - y.scores[:20]).max() < 0.01
    # --resume from the folder, from model.pt or from training.pt: the same state
    for where in (run, run / "model.pt", run / "training.pt"):
        assert read_training_state(where)["iteration"] == 2
    assert main([*base, "--iterations", "3", "--resume", str(run)]) == 0
    assert read_checkpoint(run / "model.pt")["iteration"] == 3
    # a model alone cannot be resumed: said, with what to do instead
    alone = tmp_path / "alone"
    alone.mkdir()
    (alone / "model.pt").write_bytes((run / "model.pt").read_bytes())
    assert main([*base[:-1], str(tmp_path / "r2"), "--resume", str(alone / "model.pt")]) == 2
    err = capsys.readouterr().err
    assert "holds only the trained model" in err and "training.pt" in err and "--init-from" in err
    try:
        Trainer.resume(alone / "model.pt", tiles[:2], tiles[2:])
    except NapariRmtError as exc:
        assert "training.pt" in str(exc)
    else:
        raise AssertionError("a model-only file was resumed")
    # ... but it warm-starts a new run
    assert main([*base[:-1], str(tmp_path / "r3"), "--iterations", "2", "--init-from", str(alone / "model.pt")]) == 0


def test_cli_errors_are_one_line_with_exit_2(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text("[]")
    assert main(["train", "--coco", str(bad), "--iterations", "1", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "napari-rmt: error:" in err and "bad.json" in err and "Traceback" not in err
    assert main(["predict", "--model", str(tmp_path / "missing.pt"), "--out", str(tmp_path / "p.json")]) == 2
    assert "checkpoint not found" in capsys.readouterr().err


def test_evaluate_perfect_and_centre(tmp_path, capsys):
    from conftest import make_coco
    from napari_rmt.data import read_coco, write_coco_results

    coco = make_coco(tmp_path, n_images=2)
    ts = read_coco(coco)
    for t in ts:
        t.predictions = t.boxes.copy()
        t.predictions.scores[:] = 0.9
    pred = write_coco_results(ts, tmp_path / "pred.json")
    out = tmp_path / "eval.json"
    assert main(["evaluate", "--gt", str(coco), "--pred", str(pred), "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["classes"]["any"]["f1"] == 1.0 and res["mAP"] > 0.99
    assert res["classes"]["tumor"]["tp"] == 2
    assert "mAP 100.0 %" in capsys.readouterr().out
    assert (
        main(["evaluate", "--gt", str(coco), "--pred", str(pred), "--match", "centre", "--radius", "2"]) == 0
    )


def test_experiment_grid_resumes_and_writes_reports(tmp_path, capsys):
    from conftest import make_coco

    coco = make_coco(tmp_path / "d", n_images=10, size=(48, 48))
    out = tmp_path / "exp"
    args = [
        "experiment",
        "--coco",
        str(coco),
        "--fractions",
        "0.3",
        "--methods",
        "supervised",
        "rmt",
        "--iterations",
        "2",
        *TINY_TRAINING,
        "--out",
        str(out),
    ]
    assert main(args) == 0
    results = json.loads((out / "results.json").read_text())
    assert [r["run"] for r in results] == ["supervised_f0.3_s0", "rmt_f0.3_s0"]
    assert "student" in results[1] and results[1]["predicts_with"] == "teacher"
    table = (out / "table.md").read_text()
    assert "| supervised |" in table and "| rmt |" in table and "**" in table
    assert (out / "map.png").read_bytes()[:4] == b"\x89PNG"
    split = json.loads((out / "split.json").read_text())
    assert not set(split["train"]) & set(split["test"])
    capsys.readouterr()
    assert main(args) == 0  # second call: everything done, skipped
    assert "skipped" in capsys.readouterr().err
    # other settings are not "done before": refused, naming what changed (issue 33)
    longer = [a if a != "2" or args[i - 1] != "--iterations" else "3" for i, a in enumerate(args)]
    assert main(longer) == 2
    assert "trained with other settings (iterations 2 -> 3)" in capsys.readouterr().err
    (out / "runs" / "supervised_f0.3_s0" / "result.json").write_text("{")
    assert main(args) == 2 and "unreadable" in capsys.readouterr().err


def test_predict_a_large_zarr_image_writes_whole_image_boxes(tmp_path, capsys):
    import numpy as np

    from conftest import make_coco
    from napari_rmt.data.boxstore import read_boxes_zarr
    from napari_rmt.data.large import open_large_image, write_zarr_image
    from napari_rmt.model.wholeimage import predict_large_image
    from napari_rmt.train.checkpoint import load_model

    coco = make_coco(tmp_path / "data", n_images=2, size=(64, 64))
    run = tmp_path / "run"
    args = ["train", "--coco", str(coco), "--method", "supervised", "--iterations", "1", "--out", str(run)]
    assert main([*args, "--warmup", "1", "--batch", "1"]) == 0
    rng = np.random.default_rng(0)
    write_zarr_image(rng.integers(0, 256, (200, 300, 3), dtype=np.uint8), tmp_path / "big.zarr", chunks=64)
    pred = tmp_path / "pred.json"
    rc = main(
        [
            "predict", "--model", str(run), str(tmp_path / "big.zarr"), "--out", str(pred),
            "--window", "64", "--context", "32", "--score-threshold", "0.0", "--zarr", str(tmp_path / "boxes"),
        ]
    )  # fmt: skip
    assert rc == 0
    rows = json.loads(pred.read_text())
    assert rows and {r["image_id"] for r in rows} == {1}
    xywh = np.array([r["bbox"] for r in rows])
    assert (xywh[:, 0] >= 0).all() and (xywh[:, 0] + xywh[:, 2] <= 300 + 1e-3).all()
    assert (xywh[:, 1] + xywh[:, 3] <= 200 + 1e-3).all() and xywh[:, 0].max() > 64  # beyond the first window
    boxes, classes, size = read_boxes_zarr(tmp_path / "boxes" / "big.zarr")
    assert size == (300, 200) and len(boxes) == len(rows)
    model, classes, _ = load_model(run / "model.pt")
    direct = predict_large_image(
        model, open_large_image(tmp_path / "big.zarr"), classes, window=64, context=32, score_threshold=0.0
    )
    np.testing.assert_allclose(np.sort(direct.scores), np.sort(boxes.scores), atol=1e-5)
    assert "windows" in capsys.readouterr().err


def test_predict_with_the_bundled_nucleus_model(tmp_path):
    from napari_rmt.data.sample import sample_dir

    images = sorted((sample_dir() / "images").glob("*.png"))[:2]
    out = tmp_path / "nuclei.json"
    assert main(["predict", "--model", "nucleus", *map(str, images), "--out", str(out)]) == 0
    preds = json.loads(out.read_text())
    confident = [p for p in preds if p["score"] > 0.5]
    assert {p["image_id"] for p in confident} == {1, 2} and len(confident) >= 10  # 40-90 nuclei per tile
    # the onnx backend (ONNX Runtime for the backbone) boxes the same nuclei
    onnx = tmp_path / "nuclei_onnx.json"
    assert main(["predict", "--model", "nucleus", *map(str, images), "--out", str(onnx), "--backend", "onnx"]) == 0
    other = json.loads(onnx.read_text())
    assert len(other) == len(preds)
    for a in preds:  # each box has its twin (the order of near-equal scores may differ)
        assert any(b["image_id"] == a["image_id"] and np.allclose(a["bbox"], b["bbox"], atol=0.05) for b in other)
    assert main(["predict", "--model", "nucleus", *map(str, images), "--out", str(tmp_path / "x.json"),
                 "--backend", "onnx", "--workers", "2"]) == 2


def test_train_starts_from_the_nucleus_model_where_it_fits():
    from napari_rmt.cli import build_parser
    from napari_rmt.cli.common import config_from_args

    def init(*options):
        args = build_parser().parse_args(["train", "--coco", "a.json", "--out", "r", *options])
        return config_from_args(args).init

    assert init() == "nucleus"
    assert init("--init", "none") == "none"
    # Another architecture than the bundled model's: random init, unless asked (then refused by name).
    assert init("--backbone", "mobilenet_v3_large") == "none"
    assert init("--fpn-channels", "256", "--resnet-stages", "4") == "none"
    assert init("--norm", "group") == "none"
    assert init("--fpn-channels", "128") == "nucleus"  # the default, said out loud


def test_supervised_training_reads_no_unlabelled_tile(tmp_path, capsys):
    from conftest import make_coco

    coco = make_coco(tmp_path / "data", n_images=4, size=(64, 64))
    (tmp_path / "data" / "images" / "tile_3.png").write_bytes(b"not a png")  # never read
    rc = main(["train", "--coco", str(coco), "--method", "supervised", "--labeled-fraction", "0.5",
               "--iterations", "1", "--init", "none", "--out", str(tmp_path / "run"), *TINY_TRAINING])
    assert rc == 0
    assert "supervised on 2 labelled + 0 unlabelled tiles" in capsys.readouterr().err


def test_every_tunable_from_the_command_line_trains_and_keeps_its_kind(tmp_path, capsys):
    """Every option of the advanced table at a value other than rmt+'s default, in one
    run: integers reach the trainer as integers (``--teacher-views 2`` once stopped
    training with a TypeError), and the run trains."""
    from conftest import make_coco
    from napari_rmt.train.config import TrainConfig
    from napari_rmt.train.tunables import CLI_TUNABLES

    coco = make_coco(tmp_path / "data", n_images=4, size=(64, 64))
    default = TrainConfig.for_method("rmt+")
    picks = {"pseudo_rule": "gmm", "pseudo_score": "foreground", "strong_view": "stain",
             "labelled_view": "dihedral", "unsup_normalise": "split", "teacher_views": "2"}
    args = []
    for t in CLI_TUNABLES:
        if t.kind == "bool":
            args.append(("--no-" if getattr(default, t.name) else "--") + t.option[2:])
        elif t.name in picks:
            args += [t.option, picks[t.name]]
        else:
            value = getattr(default, t.name)
            other = t.low + t.step if value is None or value != t.low + t.step else t.low + 2 * t.step
            args += [t.option, f"{other:.6g}"]
    run = tmp_path / "run"
    rc = main(["train", "--coco", str(coco), "--labeled-fraction", "0.5", "--iterations", "3", "--burn-in", "1",
               "--warmup", "1", "--batch", "1", *args, "--out", str(run)])
    assert rc == 0, capsys.readouterr().err
    saved = json.loads((run / "config.json").read_text())
    assert saved["teacher_views"] == 2 and isinstance(saved["teacher_views"], int)
    for t in CLI_TUNABLES:
        assert saved[t.name] != getattr(default, t.name), t.name
    events = [json.loads(x) for x in (run / "events.jsonl").read_text().splitlines()]
    assert [e["phase"] for e in events if e["event"] == "IterationEvent"][-1] == "semi-supervised"


def test_train_learns_partly_annotated_images_from_coco(tmp_path, capsys):
    from conftest import make_coco

    coco = make_coco(tmp_path / "data", n_images=4, size=(64, 64))
    data = json.loads(coco.read_text())
    data["images"][0]["napari_rmt_status"] = "partial"
    data["images"][1]["napari_rmt_status"] = "partial"
    data["images"][2]["napari_rmt_status"] = "unlabelled"
    data["images"][3]["napari_rmt_status"] = "unlabelled"
    coco.write_text(json.dumps(data))
    run = tmp_path / "run"
    assert main(["train", "--coco", str(coco), "--iterations", "2", *TINY_TRAINING, "--out", str(run)]) == 0
    assert "0 labelled + 2 partly annotated + 2 unlabelled tiles" in capsys.readouterr().err


def test_holdout_reports_each_class_on_annotated_images_the_run_never_saw(tmp_path, capsys):
    from conftest import make_coco

    coco = make_coco(tmp_path / "data", n_images=12, size=(64, 64))
    data = json.loads(coco.read_text())
    for img in data["images"][6:]:
        img["napari_rmt_status"] = "partial"
    coco.write_text(json.dumps(data))
    run = tmp_path / "run"
    args = ["train", "--coco", str(coco), "--method", "supervised", "--iterations", "2", *TINY_TRAINING]
    assert main([*args, "--holdout", "0.25", "--out", str(run)]) == 0
    out = capsys.readouterr().out
    report = json.loads((run / "class_report.json").read_text())
    held = set(report["held_out_ids"])
    assert len(held) == 3 and not held & set(json.loads((run / "labelled_ids.json").read_text()))
    rows = {r["name"]: r for r in report["classes"]}
    # 2 boxes per image (tumor, stromal): 9 images trained on, 3 held out
    assert rows["tumor"]["train_boxes"] == 9 and rows["tumor"]["held_boxes"] == 3
    assert rows["lymphocyte"]["held_boxes"] == 0 and "lymphocyte: 0 boxes to learn from; no box of it" in out
    assert "tumor: 9 boxes to learn from" in out
    capsys.readouterr()
    assert main([*args, "--holdout", "0.25", "--resume", str(run), "--out", str(run)]) == 2
    assert "a resumed run keeps its own" in capsys.readouterr().err


def test_evaluate_names_images_the_predictions_do_not_cover(tmp_path, capsys):
    """Issue 34: one image's predictions against a set of three scored 'F1 4.2 %' without a
    word. The images with no prediction are named and left out unless --all-images."""
    from conftest import make_coco

    coco = make_coco(tmp_path / "d", n_images=3, size=(32, 48))
    pred = tmp_path / "pred.json"
    pred.write_text(json.dumps([
        {"image_id": 1, "category_id": 1, "bbox": [2.0, 3.0, 8.5, 6.25], "score": 0.9},
        {"image_id": 1, "category_id": 2, "bbox": [12.0, 3.0, 8.5, 6.25], "score": 0.9},
    ]))
    out = tmp_path / "e.json"
    assert main(["evaluate", "--gt", str(coco), "--pred", str(pred), "--json", str(out)]) == 0
    captured = capsys.readouterr()
    assert "2 of 3 images have no prediction at all (tile_1.png, tile_2.png); scored on the other 1" in captured.err
    assert json.loads(out.read_text())["classes"]["any"]["f1"] == 1.0
    out.unlink()
    assert main(["evaluate", "--gt", str(coco), "--pred", str(pred), "--all-images", "--json", str(out)]) == 0
    assert json.loads(out.read_text())["classes"]["any"]["recall"] == pytest.approx(2 / 6)
    # a path-mode index says an image was predicted even when it got no box
    images = sorted((tmp_path / "d" / "images").glob("*.png"))
    (tmp_path / "pred.images.json").write_text(json.dumps([{"id": 9, "file_name": str(images[1])}]))
    out.unlink()
    capsys.readouterr()
    assert main(["evaluate", "--gt", str(coco), "--pred", str(pred), "--json", str(out)]) == 0
    assert "1 of 3 images have no prediction at all (tile_2.png)" in capsys.readouterr().err
