"""The napari workflow end to end, in a real viewer under Xvfb."""

import numpy as np
import pytest
from pycocotools.coco import COCO

pytest.importorskip("napari")

from napari_rmt.data import TileStatus
from napari_rmt.gui import widget as widget_mod
from napari_rmt.gui.widget import RMTWidget
from napari_rmt.model import ModelConfig
from napari_rmt.train import TrainConfig


def tiny(**kw):
    base = dict(
        method="rmt",
        iterations=2,
        burn_in=1,
        warmup=1,
        threshold=0.0,
        labelled_batch=1,
        unlabelled_batch=1,
        model=ModelConfig(backbone="mobilenet_v3_large"),
    )
    base.update(kw)
    return TrainConfig(**base)


@pytest.fixture
def widget(make_napari_viewer, tmp_path, monkeypatch):
    monkeypatch.setattr(widget_mod, "DEFAULT_PROJECTS", tmp_path / "projects")
    viewer = make_napari_viewer(show=True)
    w = RMTWidget(viewer)
    viewer.window.add_dock_widget(w)
    w.open_sample()
    return w


def test_annotate_train_review_export_reopen(widget, tmp_path):
    w, s = widget, widget.session
    ts = w.project.tileset
    assert len(ts) == 16 and len(ts.labelled) == 8
    assert w.tile_list.count() == 16
    first_unlabelled = next(i for i, t in enumerate(ts) if not t.is_labelled)
    w.show_tile(first_unlabelled)
    assert len(s.annotations.data) == 0 and s.image.data.shape == (256, 256, 3)

    # Draw a box with the current class, then re-class it with a number key's action.
    w.set_class("lymphocyte")
    s.annotations.add_rectangles(np.array([[10, 10], [10, 30], [30, 30], [30, 10]], dtype=float))
    assert list(s.annotations.features["class"]) == ["lymphocyte"]
    np.testing.assert_allclose(s.annotations.edge_color[0], ts.classes.by_name("lymphocyte").rgba)
    s.annotations.selected_data = {0}
    w._class_key(0)()  # key "1": tumor
    assert list(s.annotations.features["class"]) == ["tumor"]
    np.testing.assert_allclose(s.annotations.edge_color[0], ts.classes.by_name("tumor").rgba)
    w.labelled_box.setChecked(True)
    assert ts[first_unlabelled].status is TileStatus.LABELLED
    w.go(1)  # switching writes the layer back into the store
    assert len(ts[first_unlabelled].boxes) == 1 and ts[first_unlabelled].boxes.class_ids[0] == 1

    # Train (synchronously, same code path as the thread) -> predictions on unlabelled tiles.
    w.train(config=tiny(), synchronous=True)
    assert w.last_error is None, w.last_error
    assert w.model_state is not None and (w.project.folder / "model.pt").is_file()
    assert w.progress.value() == w.progress.maximum()  # the bar ends full
    assert w.progress.text().startswith("training: ") and w.progress.text().endswith(" steps")
    # the loss plot marks where the unlabelled terms arrive (burn-in 1 of 2 iterations)
    assert [it for it, _ in w.training.plot.marks] == [1]
    # something new on screen: a tile with predictions (the current one was labelled)
    assert len(s.tile.predictions) > 0 and not s.tile.is_labelled
    unl = [i for i, t in enumerate(ts) if not t.is_labelled]
    assert unl and all(len(ts[i].predictions) > 0 for i in unl)
    # the slider starts where the model's boxes show, and says what it hides
    shown = 0
    for i in unl:
        w.show_tile(i)
        shown += len(s.predictions.data)
        assert ("hidden" in w.score_label.text()) == (len(s.predictions.data) < len(ts[i].predictions))
    assert shown > 0, w.score_label.text()
    w.score_slider.setValue(0)
    w.show_tile(unl[0])
    pred_layer = s.predictions
    n_pred = len(pred_layer.data)
    assert n_pred == len(ts[unl[0]].predictions)
    assert set(pred_layer.features.columns) >= {"class", "score", "source"}
    assert (pred_layer.features["source"] == "predicted").all()
    w.score_slider.setValue(100)  # hides all (scores < 1)
    assert len(pred_layer.data) == 0 and len(ts[unl[0]].predictions) == n_pred  # hidden, not lost
    # Accept tile with every prediction hidden: nothing accepted, nothing dropped, status kept.
    assert w.accept_tile() == 0 and ts[unl[0]].status is TileStatus.UNLABELLED
    assert len(ts[unl[0]].predictions) == n_pred and "hidden by the score cut" in w.last_error
    w.score_slider.setValue(0)

    # Accept one box, then the whole tile.
    pred_layer.selected_data = {0}
    assert w.accept_selected() == 1
    assert len(ts[unl[0]].boxes) == 1 and len(ts[unl[0]].predictions) == n_pred - 1
    assert ts[unl[0]].status is TileStatus.PARTIAL  # one box: partly annotated
    assert w.accept_tile() == n_pred - 1
    # accepting never says "every cell has a box": the tile is partial until the user ticks it
    assert ts[unl[0]].status is TileStatus.PARTIAL and len(ts[unl[0]].boxes) == n_pred
    assert "partly annotated" in w.status.text() and not w.labelled_box.isChecked()
    # Deleting a box (napari's Delete key: remove the selected shapes) remembers where it
    # was, so that the nucleus model's cells are never taught there; an edit does not.
    gone = s.annotations.data[0].copy()
    s.annotations.selected_data = {0}
    s.annotations.remove_selected()
    assert len(s.annotations.data) == n_pred - 1 and len(ts[unl[0]].rejected) == 1
    np.testing.assert_allclose(ts[unl[0]].rejected[0], [gone[:, 1].min(), gone[:, 0].min(),
                                                        gone[:, 1].max(), gone[:, 0].max()])
    s.annotations.data = [d + 1.0 for d in s.annotations.data]  # every box moved: not deleted
    assert len(ts[unl[0]].rejected) == 1
    # Part of a tile's predictions hidden: the shown ones are accepted, the rest kept, and
    # the tile is partial: its hidden and missed nuclei are no background targets.
    w.show_tile(unl[1])
    scores = np.sort(ts[unl[1]].predictions.scores)
    w.session.set_score_threshold(float(scores[len(scores) // 2]))  # that score itself is hidden
    shown = len(s.predictions.data)
    hidden = len(ts[unl[1]].predictions) - shown
    assert w.accept_tile() == shown and len(ts[unl[1]].predictions) == hidden > 0
    assert f"{hidden} predictions below the score cut are kept" in w.status.text()
    assert ts[unl[1]].status is TileStatus.PARTIAL and ts[unl[1]] in ts.partial
    from napari_rmt.train import Trainer
    from napari_rmt.train.partial import PARTIAL_KEY

    probe = Trainer(ts.labelled, ts.unlabelled, ts.classes, tiny(method="supervised"), partial=ts.partial)
    k = len(ts.labelled) + ts.partial.index(ts[unl[1]])
    probe.data.lab_cycle.order, probe.data.lab_cycle.pos = [k], 0
    assert PARTIAL_KEY in probe.data.labelled_batch()[1][0]  # its target carries the partial rule
    w.labelled_box.setChecked(True)  # the user's word makes it fully annotated
    assert ts[unl[1]].status is TileStatus.LABELLED
    w.labelled_box.setChecked(False)
    assert ts[unl[1]].status is TileStatus.PARTIAL  # boxes, not complete
    w.score_slider.setValue(0)

    files = w.export_geojson(tmp_path / "qupath")  # one per image, as QuPath imports them
    assert len(files) == len(ts) and {f.stem for f in files} == {t.path.stem for t in ts}
    import json

    assert sum(len(json.loads(f.read_text())["features"]) for f in files) == sum(len(t.boxes) for t in ts)
    out = w.export_annotations(tmp_path / "export.json")
    coco = COCO(str(out))
    assert len(coco.getAnnIds()) == sum(len(t.boxes) for t in ts)
    res = coco.loadRes(str(w.export_predictions(tmp_path / "pred.json")))
    assert len(res.getAnnIds()) == sum(len(t.predictions) for t in ts)

    # The autosaved project reopens with tiles, boxes, statuses, the model and the score cut.
    w.score_slider.setValue(37)
    w.save_project()
    folder = w.project.folder
    statuses = [t.status for t in ts]
    counts = [len(t.boxes) for t in ts]
    w2 = RMTWidget(w.viewer)
    w2.open_project(folder)
    ts2 = w2.project.tileset
    assert [t.status for t in ts2] == statuses and [len(t.boxes) for t in ts2] == counts
    np.testing.assert_allclose(ts2[unl[0]].rejected, ts[unl[0]].rejected, atol=0.01)  # deletions too
    assert w2.model_state is not None
    assert w2.score_slider.value() == 37 and w2.session.score_threshold == 0.37

    # Save and load the model by hand; a model for other classes is refused by name.
    saved = w2.save_model(tmp_path / "exported.pt")
    import torch

    exported = torch.load(saved, weights_only=True)
    assert exported["kind"] == "model" and "optimizer" not in exported  # the model, not the training state
    w2.load_model(saved)
    assert w2.model_state["_path"] == str(saved)

    # Warm start from the trained model.
    from napari_rmt.gui import jobs as training

    previous, seen = w2.model_state, []
    real_init = training.TrainingJob.__init__

    def spy(self, *a, **kw):
        seen.append(kw.get("init_from"))
        real_init(self, *a, **kw)

    training.TrainingJob.__init__ = spy
    try:
        w2.train(config=tiny(method="supervised"), synchronous=True)
    finally:
        training.TrainingJob.__init__ = real_init
    assert w2.last_error is None
    assert seen == [previous]  # the run started from the loaded model's weights


def test_cancel_keeps_previous_model_and_work(widget, qtbot):
    w = widget
    ts = w.project.tileset
    before = [len(t.boxes) for t in ts]
    w.train(config=tiny(iterations=10_000, burn_in=1))
    qtbot.waitUntil(lambda: w.progress.value() >= 1, timeout=120_000)
    w.cancel()
    qtbot.waitUntil(lambda: w.worker is None, timeout=30_000)
    assert "cancelled" in w.status.text()
    assert w.model_state is None and not (w.project.folder / "model.pt").exists()
    assert [len(t.boxes) for t in ts] == before
    assert w.train_btn.isEnabled() and not w.cancel_btn.isEnabled()


def test_error_in_the_training_thread_is_shown_and_nothing_is_lost(widget, qtbot):
    w = widget
    ts = w.project.tileset
    before = [t.boxes.xyxy.copy() for t in ts]
    w.train(config=tiny(device="cuda:7"))  # no GPU here: the trainer refuses inside the thread
    qtbot.waitUntil(lambda: w.worker is None, timeout=60_000)
    assert w.last_error is not None and "CUDA is not available" in w.last_error
    assert all(np.array_equal(a, t.boxes.xyxy) for a, t in zip(before, ts, strict=True))


def test_no_labelled_tiles_is_a_clear_error(make_napari_viewer, tmp_path, monkeypatch):
    from conftest import write_tiles

    monkeypatch.setattr(widget_mod, "DEFAULT_PROJECTS", tmp_path / "projects")
    w = RMTWidget(make_napari_viewer())
    w.open_folder(write_tiles(tmp_path / "tiles", n=3)[0].parent)
    w.train(config=tiny(), synchronous=True)
    assert "no annotated tiles" in w.last_error


def test_suggest_next_goes_to_the_most_uncertain_tile(widget):
    from napari_rmt.data import Boxes

    w = widget
    ts = w.project.tileset
    unl = [i for i, t in enumerate(ts) if not t.is_labelled]
    ts[unl[0]].predictions = Boxes([[0, 0, 5, 5]], [1], [0.97])
    ts[unl[3]].predictions = Boxes([[0, 0, 5, 5], [9, 9, 20, 20]], [1, 2], [0.5, 0.45])
    w.suggest_next()
    assert w.session.index == unl[3] and w.tile_list.currentRow() == unl[3]
    assert f"{ts[unl[3]].name}: the model hesitates on its boxes" in w.status.text()
    # cells found for sure but torn between two classes go first (class doubt, issue 31):
    # 3 x (H(0.97) + H(0.96)) = 1.31 bits, under the 1.99 of the tile shown, 4.3 with classes
    cells = [[0, 0, 9, 9], [20, 20, 29, 29], [40, 0, 49, 9]]
    ts[unl[1]].predictions = Boxes([b for b in cells for _ in (1, 2)], [1, 2] * 3, [0.97, 0.96] * 3)
    w.suggest_next()
    assert w.session.index == unl[1] and "on the class of 3 cells" in w.status.text()


def test_large_image_grid_whole_image_prediction_and_reopen(make_napari_viewer, tmp_path, monkeypatch):
    import json

    import tifffile

    from napari_rmt.data.boxstore import read_boxes_zarr

    monkeypatch.setattr(widget_mod, "DEFAULT_PROJECTS", tmp_path / "projects")
    rng = np.random.default_rng(0)
    big = rng.integers(0, 256, (520, 640, 3), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "big.tif", big, tile=(128, 128))
    viewer = make_napari_viewer(show=True)
    w = RMTWidget(viewer)
    viewer.window.add_dock_widget(w)
    w.open_large_image(tmp_path / "big.tif", tile=256, overlap=0)
    ts = w.project.tileset
    assert len(ts) == 9 and all(t.window for t in ts)
    assert "whole image" in viewer.layers and len(viewer.layers["tile grid"].data) == 9
    # the tile on screen sits at its place over the whole image
    w.show_tile(4)
    t = ts[4]
    assert t.origin == (256, 256)
    np.testing.assert_array_equal(w.session.image.data, big[256:512, 256:512])
    np.testing.assert_allclose(w.session.annotations.translate, (256, 256))
    w.session.annotations.add_rectangles(np.array([[10, 10], [10, 30], [30, 30], [30, 10]], dtype=float))
    w.labelled_box.setChecked(True)
    np.testing.assert_allclose(viewer.layers["tile grid"].edge_color[4][:3], (1, 1, 1))  # labelled: white
    w.train(config=tiny(method="supervised", iterations=1), synchronous=True)
    assert w.model_state is not None and w.last_error is None

    w.predict_whole_image(synchronous=True, window=256, context=64)
    assert w.last_error is None
    boxes = w.whole.boxes
    assert len(boxes) > 0
    assert boxes.xyxy[:, 2].max() <= 640 + 1e-3 and boxes.xyxy[:, 3].max() <= 520 + 1e-3
    w.score_slider.setValue(0)
    assert len(viewer.layers["whole-image cells"].data) == len(boxes)
    from napari_rmt.gui.session import camera_of

    camera_of(viewer).center = (100, 100)
    camera_of(viewer).zoom = 4.0
    drawn = w.whole.update_in_view()
    x0, y0, x1, y1 = w.whole.visible_region()
    inside = (
        (boxes.xyxy[:, 2] >= x0)
        & (boxes.xyxy[:, 0] <= x1)
        & (boxes.xyxy[:, 3] >= y0)
        & (boxes.xyxy[:, 1] <= y1)
    )
    assert drawn == inside.sum() and drawn < len(boxes)

    out = w.export_whole_predictions(tmp_path / "whole.json")
    rows = json.loads(out.read_text())
    assert len(rows) == len(boxes) and {r["image_id"] for r in rows} == {1}
    back, _, size = read_boxes_zarr(w.export_whole_predictions(tmp_path / "whole.zarr"))
    assert size == (640, 520) and len(back) == len(boxes)

    w.save_project()
    folder = w.project.folder
    w2 = RMTWidget(viewer)
    w2.open_project(folder)
    ts2 = w2.project.tileset
    assert len(ts2) == 9 and ts2[4].window and ts2[4].status is TileStatus.LABELLED and len(ts2[4].boxes) == 1
    assert w2.whole is not None and "whole image" in viewer.layers


def test_widget_import_geojson_and_layer_project_reopen(widget, tmp_path):
    """QuPath objects come in on their tiles (a new class too); a project made from an
    image layer reopens with its pixels and boxes."""
    import json

    w = widget
    ts = w.project.tileset
    tile = next(iter(ts))
    ring = [[5.0, 5], [25, 5], [25, 20], [5, 20], [5, 5]]
    (tmp_path / "q.geojson").write_text(json.dumps({"type": "FeatureCollection", "features": [
        {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [ring]},
         "properties": {"tile": tile.name, "objectType": "annotation", "classification": {"name": "mitosis"}}},
    ]}))
    before = len(tile.boxes)
    w.show_tile(0)
    assert w.import_geojson(tmp_path / "q.geojson") == 1
    assert len(tile.boxes) == before + 1 and "mitosis" in ts.classes.names
    assert len(w.session.annotations.data) == before + 1  # shown at once, and kept by the next pull
    w.session.pull()
    assert len(tile.boxes) == before + 1

    rng = np.random.default_rng(0)
    w.viewer.add_image(rng.integers(0, 255, (2, 64, 80, 3), dtype=np.uint8), name="stack", rgb=True)
    w.viewer.layers.selection.active = w.viewer.layers["stack"]
    w.open_image_layer()
    folder = w.project.folder
    w.session.annotations.add_rectangles(np.array([[10, 10], [10, 30], [30, 30], [30, 10]], dtype=float))
    w.save_project()
    w.open_project(folder)
    first = next(iter(w.project.tileset))
    assert first.name == "stack [0]" and len(first.boxes) == 1 and first.pixels().shape == (64, 80, 3)


def test_widget_restores_an_interrupted_runs_checkpoint(widget, tmp_path):
    """napari killed while training: the run's periodic checkpoint becomes the model."""
    from napari_rmt.data.project import TRAINING
    from napari_rmt.train import Trainer

    w = widget
    ts = w.project.tileset
    cfg = tiny(method="supervised", iterations=1)
    trainer = Trainer(ts.labelled[:1], [], ts.classes, cfg)
    list(trainer.run())
    folder = w.project.folder
    trainer.save(folder / TRAINING)  # what a checkpoint mid-run leaves
    w.open_project(folder)
    assert w.model_state is not None and w.model_state["iteration"] == 1
    assert "interrupted" in w.status.text()


def test_detect_nuclei_then_classify_and_accept(widget):
    """Annotation by correction: the bundled model's boxes, reclassified with a key, accepted."""
    w, s = widget, widget.session
    ts = w.project.tileset
    empty = [i for i, t in enumerate(ts) if not len(t.boxes)]
    w.show_tile(empty[0])
    w.set_class("stromal")
    w.detect_nuclei(synchronous=True)
    assert w.last_error is None
    shown = len(s.predictions.data)
    assert shown >= 5, f"{shown} nuclei shown on a 256 px CoNSeP tile"
    assert set(s.predictions.features["class"]) == {"stromal"}
    s.predictions.selected_data = {0}
    w._class_key(2)()  # key "3": lymphocyte
    assert s.predictions.features["class"][0] == "lymphocyte"
    assert w.accept_tile() == shown
    tile = ts[empty[0]]
    assert len(tile.boxes) == shown and sorted(set(ts.classes.by_id(c).name for c in tile.boxes.class_ids)) == [
        "lymphocyte", "stromal"]

    # On a tile with annotations it refuses and changes nothing.
    labelled = next(i for i, t in enumerate(ts) if len(t.boxes))
    w.show_tile(labelled)
    before = len(ts[labelled].boxes), len(ts[labelled].predictions)
    w.detect_nuclei(synchronous=True)
    assert "annotations already" in w.last_error
    assert (len(ts[labelled].boxes), len(ts[labelled].predictions)) == before

    # All empty tiles: only those with nothing on them get boxes.
    w.detect_nuclei(all_empty=True, synchronous=True)
    assert all(len(t.predictions) for i, t in enumerate(ts) if i in empty[1:])
    assert (len(ts[labelled].boxes), len(ts[labelled].predictions)) == before


def test_detect_nuclei_with_a_calibrated_model_starts_at_its_cut(widget, tmp_path, monkeypatch):
    """Issue 32: a nucleus model whose scores were calibrated (a logit shift folded into its
    classifier, ``train_nucleus_model.py --export --calibrate``) gives the shifted scores,
    and the review starts at 0.5, the cut they were fitted to, saying so."""
    import napari_rmt.model.bundled as bundled
    from napari_rmt.evaluate.calibration import fold_shift, shifted
    from napari_rmt.model.predict import predict_tiles
    from napari_rmt.train.checkpoint import load_model, read_checkpoint, save_checkpoint

    w = widget
    ts = w.project.tileset
    empty = next(i for i, t in enumerate(ts) if not len(t.boxes))
    model, classes, _ = load_model(bundled.NUCLEUS)
    raw = predict_tiles(model, [ts[empty]], classes, store=False)[0]
    ckpt = read_checkpoint(bundled.NUCLEUS)
    shift = float(np.log(4.0))  # a best cut of 0.2 made 0.5
    ckpt["student"] = fold_shift(ckpt["student"], shift)
    ckpt["calibration"] = {"logit_shift": shift, "best_cut_before": 0.2}
    save_checkpoint(tmp_path / "calibrated.pt", ckpt)
    monkeypatch.setattr(bundled, "nucleus_path", lambda: tmp_path / "calibrated.pt")
    w.show_tile(empty)
    w.detect_nuclei(synchronous=True)
    assert w.last_error is None
    got = ts[empty].predictions
    strong = raw.scores > 0.1  # above the floor either way
    # (the shift is stored in fp16 with the weights: a box within 1e-3 of the cut may flip)
    assert abs(int((got.scores > 0.5).sum()) - int((raw.scores > 0.2).sum())) <= 1
    assert int((got.scores > 0.5).sum()) > int((raw.scores > 0.5).sum())
    np.testing.assert_allclose(np.sort(got.scores)[::-1][: strong.sum()],
                               np.sort(shifted(raw.scores[strong], shift))[::-1], atol=2e-3)
    assert w.review.score_slider.value() == 50 and "calibrated cut" in w.status.text()


def test_a_run_reports_each_class_on_held_out_tiles(widget):
    from napari_rmt.data import Boxes

    w = widget
    ts = w.project.tileset
    for t in [t for t in ts if not t.is_labelled][:3]:  # three more tiles partly annotated: 11 in all
        t.boxes, t.status = Boxes([[10, 10, 30, 30]], [2]), TileStatus.PARTIAL
    assert len(ts.labelled) + len(ts.partial) == 11
    w.training.holdout_box.setChecked(True)
    w.train(config=tiny(method="supervised"), synchronous=True)
    assert w.last_error is None, w.last_error
    report = w.training.report
    assert [r.name for r in report] == ts.classes.names
    assert sum(r.held_boxes for r in report) > 0 and sum(r.train_boxes for r in report) > 0
    assert "per class on held-out tiles" in w.status.text()


def test_pixel_size_resamples_detect_nuclei_and_is_saved_with_the_project(widget):
    """Issue 32: the project's pixel size (µm/px) makes Detect nuclei see tiles at the
    nucleus model's 40x (0.5 µm/px: enlarged x2), boxes back in the tile's pixels; it is
    saved with the project, restored on reopening, and a training run records it."""
    from napari_rmt.model.bundled import NUCLEUS
    from napari_rmt.model.predict import predict_tiles
    from napari_rmt.train.checkpoint import load_model

    w = widget
    ts = w.project.tileset
    empty = next(i for i, t in enumerate(ts) if not len(t.boxes))
    w.show_tile(empty)
    w.review.pixel_spin.setValue(0.5)
    assert w.project.settings["pixel_size"] == 0.5
    w.detect_nuclei(synchronous=True)
    assert w.last_error is None
    model, classes, _ = load_model(NUCLEUS)
    want = predict_tiles(model, [ts[empty]], classes, store=False, scale=2.0)[0]
    got = ts[empty].predictions
    assert len(got) == len(want) > 0
    np.testing.assert_allclose(got.xyxy, want.xyxy, atol=1e-4)
    assert w.training.training_config().pixel_size == 0.5
    w.save_project()
    w.open_project(w.project.folder)
    assert w.review.pixel_spin.value() == 0.5 and w.project.settings["pixel_size"] == 0.5
    w.review.pixel_spin.setValue(0.0)  # "not set": tiles as they are
    assert "pixel_size" not in w.project.settings


def _slide_widget(make_napari_viewer, tmp_path, monkeypatch, size, seed):
    """A synthetic SVS (the sample's H&E on glass, 0.25 µm/px) opened in a widget, 256 px tiles."""
    from napari_rmt.data.sample import load_sample
    from napari_rmt.data.synthetic import SyntheticSlide

    monkeypatch.setattr(widget_mod, "DEFAULT_PROJECTS", tmp_path / "projects")
    slide = SyntheticSlide.make(*size, [t.pixels() for t in load_sample()], tissue=0.35, seed=seed)
    path = slide.write(tmp_path / "slide.svs", pixel_size=0.25)
    viewer = make_napari_viewer(show=True)
    w = RMTWidget(viewer)
    viewer.window.add_dock_widget(w)
    w.open_large_image(path, tile=256, overlap=0)
    return w, viewer, slide, path


def test_a_slide_opens_on_its_tissue_with_its_pixel_size_and_is_predicted_without_glass(
    make_napari_viewer, tmp_path, monkeypatch
):
    """Issue 36: a synthetic SVS (real H&E islands on glass, 0.25 µm/px): its tiles lie on
    tissue only, the tissue mask is shown over it, the file's pixel size becomes the
    project's, and whole-slide prediction skips the glass windows yet keeps every box that
    prediction over the whole field finds."""
    from napari_rmt.data.large import open_large_image
    from napari_rmt.data.tiles import tile_grid
    from napari_rmt.model.bundled import NUCLEUS
    from napari_rmt.model.wholeimage import predict_large_image
    from napari_rmt.train.checkpoint import load_model

    w, viewer, slide, path = _slide_widget(make_napari_viewer, tmp_path, monkeypatch, (1600, 1300), seed=5)
    ts = w.project.tileset
    grid = tile_grid(1600, 1300, 256, 0)
    assert 0 < len(ts) < len(grid)  # tiles on tissue only
    kept = {t.origin for t in ts}
    assert all((w.x, w.y) in kept for w in grid if slide.mask(w.x, w.y, w.width, w.height, 4).mean() > 0.01)
    # and every kept tile has tissue within the mask's margin of it
    assert all(slide.mask(max(0, x - 32), max(0, y - 32), 320, 320, 4).any() for x, y in kept)
    assert "tissue" in viewer.layers and w.project.settings["pixel_size"] == 0.25
    assert w.review.pixel_spin.value() == 0.25
    from napari_rmt.train.checkpoint import read_checkpoint

    w.state.model_state = read_checkpoint(NUCLEUS)  # the project's classes are others: the model as it is
    w.predict_whole_image(synchronous=True, window=256, context=64)
    assert w.last_error is None
    model, classes, _ = load_model(NUCLEUS)
    whole = predict_large_image(model, open_large_image(path), classes, window=256, context=64)
    got = {tuple(np.round(b, 2)) for b in w.whole.boxes.xyxy}
    ref = {tuple(np.round(b, 2)) for b in whole.xyxy}
    assert len(ref) > 50 and got <= ref  # nothing the whole field does not find
    # and what only the whole field finds lies on glass (its specks and the image's edge)
    assert all(not slide.mask(int((b[0] + b[2]) / 2), int((b[1] + b[3]) / 2), 1, 1)[0, 0] for b in ref - got)


def test_a_full_disk_during_autosave_loses_nothing(widget, monkeypatch):
    """Issue 33: the disk fills while the project autosaves. The status says so and that
    nothing is lost; the work stays in memory, the folder keeps its last whole save, and
    the next save, once there is space, writes everything."""
    import errno

    from napari_rmt.data import atomic
    from napari_rmt.data.project import Project

    w = widget
    ts = w.project.tileset
    before = sum(len(t.boxes) for t in Project.open(w.project.folder).tileset)
    w.show_tile(next(i for i, t in enumerate(ts) if not t.is_labelled))
    w.session.annotations.add_rectangles(np.array([[10, 10], [10, 30], [30, 30], [30, 10]], dtype=float))

    def full(_fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(atomic.os, "fsync", full)
        w.save_project()
    assert "No space left on device" in w.last_error and "nothing is lost" in w.last_error
    assert sum(len(t.boxes) for t in ts) == before + 1  # the new box, in memory
    assert sum(len(t.boxes) for t in Project.open(w.project.folder).tileset) == before  # the last whole save
    assert not [p for p in w.project.folder.iterdir() if p.name.endswith(".tmp")]  # no partial file left
    w.save_project()
    assert sum(len(t.boxes) for t in Project.open(w.project.folder).tileset) == before + 1


def test_an_edited_tissue_mask_is_saved_in_the_project_and_used(make_napari_viewer, tmp_path, monkeypatch):
    """Issue 36: the user erases an island from the tissue layer; the mask is saved in the
    project at once, comes back on reopening, and whole-slide prediction skips that island."""
    from napari_rmt.model.bundled import NUCLEUS
    from napari_rmt.train.checkpoint import read_checkpoint

    w, viewer, _slide, _path = _slide_widget(make_napari_viewer, tmp_path, monkeypatch, (1400, 1100), seed=2)
    layer = viewer.layers["tissue"]
    computed = w.whole.tissue.mask.copy()
    edited = layer.data.copy()
    edited[:, : edited.shape[1] // 2] = 0  # the left half is not to be predicted
    layer.data = edited
    layer.events.paint()
    assert (w.project.folder / "tissue.png").is_file() and w.project.settings["tissue"]["image"] == "slide.svs"
    assert w.whole.tissue.mask.sum() < computed.sum()
    w.save_project()
    w.open_project(w.project.folder)
    np.testing.assert_array_equal(w.whole.tissue.mask, edited > 0)
    w.state.model_state = read_checkpoint(NUCLEUS)
    w.predict_whole_image(synchronous=True, window=256, context=64)
    assert w.last_error is None and len(w.whole.boxes) > 0
    assert w.whole.boxes.xyxy[:, 0].min() >= 1400 / 2 - 256  # nothing in the erased half's windows
