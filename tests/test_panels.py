"""The widget's state object and each panel on its own (no RMTWidget around them)."""

import json

import pytest

pytest.importorskip("napari")

from napari_rmt.data import Boxes, TileSet, TileStatus
from napari_rmt.data.boxes import BoxSource
from napari_rmt.data.errors import NapariRmtError
from napari_rmt.data.sample import load_sample
from napari_rmt.gui.panels.export import ExportPanel
from napari_rmt.gui.panels.large import LargePanel
from napari_rmt.gui.panels.review import ReviewPanel
from napari_rmt.gui.panels.status import StatusPanel
from napari_rmt.gui.panels.tiles import ClassesPanel, TilesPanel
from napari_rmt.gui.panels.train import TrainPanel
from napari_rmt.gui.state import AppState


@pytest.fixture
def state(make_napari_viewer, tmp_path):
    return AppState(make_napari_viewer(), tmp_path / "projects")


class _Job:
    """A job as jobs.py makes them: a generator of progress, then a result."""

    def __init__(self, n: int) -> None:
        self.n = n

    def cancel(self) -> None:
        pass

    def run(self):
        yield from range(self.n)
        return "done"


def test_state_opens_tells_and_runs_one_job_at_a_time(state):
    seen = []
    state.opened.connect(lambda: seen.append("opened"))
    state.message.connect(lambda text, error: seen.append((text, error)))
    state.busy_changed.connect(lambda: seen.append("busy"))
    with pytest.raises(NapariRmtError, match="no tiles"):
        state.open(TileSet(), "empty")
    state.open(load_sample(), "sample")
    assert state.session is not None and (state.project.folder / "project.json").is_file()
    assert seen[:2] == ["opened", "busy"]

    state.guarded(lambda: (_ for _ in ()).throw(NapariRmtError("bad file x.png")))
    assert state.last_error == "error: bad file x.png" and seen[-1] == ("error: bad file x.png", True)
    state.guarded(lambda: None)  # a success clears the error shown
    assert state.last_error is None and seen[-1] == ("", False)

    progress, results = [], []
    assert state.start_job(_Job(3), progress.append, results.append, "job failed", synchronous=True)
    assert progress == [0, 1, 2] and results == ["done"] and not state.busy
    state.worker = object()  # a job is running
    assert not state.start_job(_Job(1), progress.append, results.append, "job failed", synchronous=True)
    assert results == ["done"]


def test_tiles_panel_lists_moves_and_marks(state):
    panel = TilesPanel(state)
    assert not panel.next_btn.isEnabled()
    state.open(load_sample(), "sample")
    assert panel.tile_list.count() == 16 and panel.next_btn.isEnabled()
    panel.go(1)
    assert state.session.index == 1 and panel.tile_list.currentRow() == 1
    panel.show_tile(5)
    was = state.session.tile.is_labelled
    panel.labelled_box.setChecked(not was)
    assert state.project.tileset[5].is_labelled is (not was)
    # unticked, a tile with boxes is partly annotated (its boxes stay cells to learn from)
    expected = "labelled" if not was else ("partial" if len(state.project.tileset[5].boxes) else "unlabelled")
    assert f"— {expected} —" in panel.tile_list.item(5).text()


def test_classes_panel_keys_and_new_class(state):
    panel = ClassesPanel(state)
    state.open(load_sample(), "sample")
    names = state.project.tileset.classes.names
    panel.class_key(1)()
    assert panel.current == names[1] and state.session.current_class == names[1]
    panel.add_class("mitosis")
    assert panel.class_combo.findText("mitosis") >= 0 and "mitosis" in panel.legend.text()
    assert state.session.current_class == names[1]  # the new session keeps the choice


def test_review_panel_cut_and_accept(state):
    panel = ReviewPanel(state, lambda: "tumor")
    tiles = load_sample()
    empty = 3
    tiles[empty].boxes, tiles[empty].status = Boxes(), TileStatus.UNLABELLED
    state.open(tiles, "sample")
    state.session.show_tile(empty)
    tile = state.session.tile
    tile.predictions = Boxes(
        xyxy=[[10, 10, 30, 30], [40, 40, 60, 60], [70, 70, 90, 90]],
        class_ids=[1, 1, 1], scores=[0.9, 0.4, 0.2], sources=[BoxSource.PREDICTED] * 3,
    )
    state.session.refresh()
    state.predictions_arrived.emit([tile.predictions])
    # 1.5 cells expected (sum of scores): the cut shows the two best boxes.
    assert panel.score_slider.value() == 39 and "1 hidden" in panel.score_label.text()
    assert panel.accept_tile() == 2 and len(state.project.tileset[empty].boxes) == 2
    assert len(state.project.tileset[empty].predictions) == 1  # the hidden one stays a prediction
    # a prediction is shaded in its class colour, an annotation is an outline only
    from napari_rmt.gui.layers import PREDICTION_ALPHA

    session = state.session
    panel.score_slider.setValue(10)  # show the 0.2 one again
    assert len(session.predictions.data) == 1 and len(session.annotations.data) == 2
    pred_face, pred_edge = session.predictions.face_color[0], session.predictions.edge_color[0]
    assert pred_face[3] == pytest.approx(PREDICTION_ALPHA) and pred_face[:3] == pytest.approx(pred_edge[:3])
    assert (session.annotations.face_color[:, 3] == 0).all()
    session.set_class(session.classes.names[1])  # a re-classed prediction keeps its shade
    session.predictions.selected_data = {0}
    session.set_class(session.classes.names[2])
    assert session.predictions.face_color[0][3] == pytest.approx(PREDICTION_ALPHA)
    assert session.predictions.face_color[0][:3] == pytest.approx(session.predictions.edge_color[0][:3])
    # the box under the pointer, with its score, in the review panel
    from napari_rmt.gui.layers import describe_shape

    said = describe_shape(session.predictions, (0, None))
    assert said == f"prediction: {session.classes.names[2]}, score 0.20"
    assert describe_shape(session.predictions, (None, None)) == ""
    assert describe_shape(session.annotations, 1).startswith("annotation: ")
    from types import SimpleNamespace

    for callback in session.predictions.mouse_move_callbacks:  # as napari calls it on a move
        callback(session.predictions, SimpleNamespace(position=(80.0, 80.0)))
    assert panel.hover_label.text() == said
    # edges keep their screen width when zooming: image-pixel widths shrink as zoom grows
    from napari_rmt.gui.layers import EDGE_PX, camera_of

    camera_of(state.viewer).zoom = 8.0
    assert session.annotations.edge_width[0] == pytest.approx(EDGE_PX["annotations"] / 8.0)
    assert session.predictions.current_edge_width == pytest.approx(EDGE_PX["predictions"] / 8.0)
    session.show_tile(0)  # a tile's new shapes get the same width, not napari's 1
    assert all(w == pytest.approx(EDGE_PX["annotations"] / 8.0) for w in session.annotations.edge_width)
    session.show_tile(empty)
    for callback in session.predictions.mouse_move_callbacks:  # off every box: the hint again
        callback(session.predictions, SimpleNamespace(position=(200.0, 5.0)))
    from napari_rmt.gui.panels.review import HOVER_HINT

    assert panel.hover_label.text() == HOVER_HINT


def test_status_panel_shows_messages_and_progress(state):
    panel = StatusPanel(state)
    state.report_error(NapariRmtError("no labelled tiles"))
    assert "no labelled tiles" in panel.status.text() and "ff6b6b" in panel.status.styleSheet()
    state.say("fine")
    assert panel.status.text() == "fine" and panel.status.styleSheet() == ""
    state.progress.emit(3, 7, "Detect nuclei: tiles")
    assert (panel.progress.value(), panel.progress.maximum()) == (3, 7)
    assert panel.progress.text() == "Detect nuclei: 3 / 7 tiles"  # never a bare "1 / 1"


def test_train_panel_fills_the_methods_defaults(state):
    panel = TrainPanel(state)
    assert not panel.train_btn.isEnabled()
    panel.method_combo.setCurrentText("rmt")
    assert panel.form["threshold"].value() == pytest.approx(0.7)  # the paper's threshold
    panel.method_combo.setCurrentText("rmt+")
    cfg = panel.training_config()
    assert cfg.method == "rmt+" and cfg.init == "nucleus" and cfg.threshold == pytest.approx(0.5)
    panel.init_combo.setCurrentText("random weights")
    assert panel.training_config().init == "none"
    # the advanced form reaches the unsure-teacher options (issue 11)
    panel.advanced.setChecked(True)
    panel.form["pseudo_score"].setCurrentText("foreground")
    panel.form["soft_targets"].setChecked(True)
    panel.form["soft_temperature"].setValue(0.5)
    panel.form["unsup_objectness"].setValue(0.0)
    panel.form["unsup_background"].setValue(0.25)
    panel.form["labelled_batch"].setValue(3)
    cfg = panel.training_config()
    assert cfg.pseudo_score == "foreground" and cfg.soft_targets and cfg.soft_temperature == pytest.approx(0.5)
    assert cfg.unsup_objectness == 0.0 and cfg.soft_negatives and cfg.ignore_low == pytest.approx(0.2)
    assert cfg.unsup_background == pytest.approx(0.25) and cfg.labelled_batch == cfg.unlabelled_batch == 3
    panel.form["ignore_low"].setValue(0.0)  # shown as "off": no ignore band
    assert panel.training_config().ignore_low is None


def test_burn_in_follows_the_iterations_or_the_run_refuses(state):
    """Issue 34: the advanced form's burn-in, derived from 500 iterations, must not make a
    20-iteration run all burn-in."""
    panel = TrainPanel(state)
    panel.method_combo.setCurrentText("rmt+")
    panel.advanced.setChecked(True)
    assert panel.form["burn_in"].value() == 375  # 3/4 of 500
    panel.iter_spin.setValue(20)
    assert panel.form["burn_in"].value() == 15  # still 3/4 of the run
    cfg = panel.training_config()
    assert cfg.iterations == 20 and cfg.burn_in == 15
    panel.form["burn_in"].setValue(30)  # the user's own value, past the run's end: refused
    with pytest.raises(NapariRmtError, match="burn-in 30 must be below the 20 iterations"):
        panel.training_config()
    state.open(load_sample(), "sample")
    for t in state.project.tileset:
        t.status = TileStatus.LABELLED if t.id < 9 else TileStatus.UNLABELLED
    panel.train()
    assert "burn-in 30 must be below" in state.last_error and not state.busy


def test_advanced_form_and_cli_offer_the_same_settings(state):
    """Both front ends are generated from train.config.TUNABLES: every setting is in the
    form, shows each method's own default, and reads back unchanged; the command line has
    an option for each with the same range."""
    from napari_rmt.cli import build_parser
    from napari_rmt.train.config import METHODS, TrainConfig
    from napari_rmt.train.tunables import CLI_TUNABLES, TUNABLES

    panel = TrainPanel(state)
    panel.advanced.setChecked(True)
    assert set(panel.form.widgets) == {t.name for t in TUNABLES}
    for method in METHODS:
        panel.method_combo.setCurrentText(method)
        want = TrainConfig.for_method(method, iterations=panel.iter_spin.value())
        got = panel.form.values()
        for t in TUNABLES:
            assert got[t.name] == pytest.approx(getattr(want, t.name)) if t.kind in ("int", "float") else (
                got[t.name] == getattr(want, t.name)
            ), (method, t.name)
    train = build_parser()._subparsers._group_actions[0].choices["train"]
    options = {o: a for a in train._actions for o in a.option_strings}
    from napari_rmt.train.config import BOUNDS

    for t in TUNABLES:  # the form's range lies inside what the config admits (BOUNDS, declared once)
        if t.kind in ("int", "float"):
            b = BOUNDS[t.name]
            assert b.admits(t.high) and (b.admits(t.low) or (t.optional and t.low == b.low)), t.name
    for t in CLI_TUNABLES:
        assert t.option in options, t.option
        b = t.bounds
        if t.kind == "float" and b.high is not None:  # the option refuses what validate() would
            with pytest.raises(SystemExit):
                train.parse_args(["--coco", "x.json", "--out", "o", t.option, str(b.high + 1)])
        if t.kind == "float" and b.high is None:  # and takes what it admits beyond the form's range
            args = train.parse_args(["--coco", "x.json", "--out", "o", t.option, str(t.high + 1)])
            assert getattr(args, t.option[2:].replace("-", "_")) == t.high + 1


def test_train_panel_keeps_a_missing_class_warning_in_sight(state):
    """A class with no labelled box scores 0 however long the run: the warning stays in
    sight under the status line (which every iteration overwrites) until the next run,
    which clears it when every class has a labelled box."""
    from napari_rmt.model import ModelConfig
    from napari_rmt.train import TrainConfig

    ts = load_sample()
    lymphocyte = ts.classes.by_name("lymphocyte")
    for i, tile in enumerate(ts):  # two labelled tiles, their lymphocytes removed; no "other" on them
        tile.status = TileStatus.LABELLED if i < 2 else TileStatus.UNLABELLED
        if i < 2:
            tile.boxes = tile.boxes[tile.boxes.class_ids != lymphocyte.id]
    state.open(ts, "sample")
    panel, status = TrainPanel(state), StatusPanel(state)
    cfg = TrainConfig(method="supervised", iterations=2, warmup=1, labelled_batch=1,
                      model=ModelConfig(backbone="mobilenet_v3_large"))
    panel.train(config=cfg, synchronous=True)
    assert status.warning.isVisibleTo(status)
    assert status.warning.text().startswith("warning: no labelled box of class(es) lymphocyte, other: ")
    assert "lymphocyte, other" in state.last_warning and not status.status.text().startswith("warning")
    assert state.last_error is None  # a warning, not an error: the model was trained
    assert state.model_state is not None

    for tile in state.project.tileset:
        tile.status = TileStatus.LABELLED  # every class has a box on the sample's other tiles
    panel.train(config=cfg, synchronous=True)
    assert not status.warning.isVisibleTo(status) and status.warning.text() == "" and state.last_warning == ""
    state.warn("about this project")
    state.open(load_sample(), "another")  # another project: the last one's warning goes
    assert not status.warning.isVisibleTo(status) and state.last_warning == ""


def test_large_panel_needs_a_large_image(state):
    panel = LargePanel(state)
    assert not panel.predict_whole_btn.isEnabled()
    panel.predict_whole_image(synchronous=True)
    assert "open a large image first" in state.last_error


def test_export_panel_writes_and_refuses(state, tmp_path):
    panel = ExportPanel(state)
    state.open(load_sample(), "sample")
    out = panel.export_annotations(tmp_path / "a.json")
    assert len(json.loads(out.read_text())["annotations"]) == sum(len(t.boxes) for t in state.project.tileset)
    with pytest.raises(NapariRmtError, match="no trained model"):
        panel.save_model(tmp_path / "m.pt")


def test_review_moves_between_tiles_and_suggests(state):
    panel = ReviewPanel(state, lambda: "tumor")
    state.open(load_sample(), "sample")
    assert panel.next_btn.isEnabled() and panel.suggest_btn.isEnabled()
    panel.next_btn.click()
    assert state.session.index == 1
    panel.prev_btn.click()
    assert state.session.index == 0
    ts = state.project.tileset
    target = 5
    for t in list(ts)[3:]:
        t.status, t.boxes = TileStatus.UNLABELLED, Boxes()
    ts[target].predictions = Boxes([[1, 1, 9, 9], [20, 20, 30, 30]], [1, 1], scores=[0.5, 0.45])
    panel.suggest_btn.click()
    assert state.session.index == target  # the only tile with predictions in doubt


def test_image_layer_of_the_sample_keeps_its_boxes(state):
    """Issue 34: File > Open Sample, then 'Image layer', gave 16 empty unlabelled tiles
    while the sample's boxes peeked out under the tile."""
    viewer = state.viewer
    viewer.open_sample("napari-rmt", "consep")
    image, boxes = viewer.layers[0], viewer.layers[1]
    panel = TilesPanel(state)
    viewer.layers.selection.active = image
    panel.open_image_layer()
    ts = state.project.tileset
    assert len(ts) == 16 and sum(len(t.boxes) for t in ts) == len(boxes.data) == 1100
    assert ts.classes.names == ["tumor", "stromal", "lymphocyte", "other"]
    assert all(t.is_labelled for t in ts) and "labelled — " in panel.tile_list.item(0).text()
    assert not image.visible and not boxes.visible  # the widget's own layers show them now
    assert state.session.image.data.shape == (256, 256, 3)


def test_review_keys_move_and_accept(state):
    from napari.utils.key_bindings import KeyBinding

    from napari_rmt.gui.panels.review import SHORTCUTS

    panel = ReviewPanel(state, lambda: "tumor")
    state.open(load_sample(), "sample")
    keymap = state.viewer.keymap

    def press(key):
        keymap[KeyBinding.from_str(key)](state.viewer)

    assert set(SHORTCUTS) == {"Shift-A", "Shift-Right", "Shift-Left", "Shift-N"}
    press("Shift-Right")
    assert state.session.index == 1
    press("Shift-Left")
    assert state.session.index == 0
    t = state.project.tileset[0]
    t.status, t.boxes = TileStatus.UNLABELLED, Boxes()
    t.predictions = Boxes([[1, 1, 9, 9]], [1], scores=[0.9])
    state.session.refresh()
    press("Shift-A")
    assert len(t.boxes) == 1 and t.is_partial
    assert "Shift+A" in panel.accept_tile_btn.toolTip()
