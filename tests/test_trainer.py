"""The engine end to end on tiny images: every method, what must change changes."""

import numpy as np
import pytest
import torch

from napari_rmt.data import ClassList
from napari_rmt.model import ModelConfig
from napari_rmt.model.predict import predict_tiles
from napari_rmt.train import (
    CheckpointError,
    FinishedEvent,
    IterationEvent,
    PhaseEvent,
    TrainConfig,
    Trainer,
    TrainingError,
    load_model,
    read_checkpoint,
)
from napari_rmt.train.checkpoint import save_checkpoint

CLASSES = ClassList.default()


def tiny_config(method: str, **kw) -> TrainConfig:
    base = dict(
        method=method,
        iterations=4,
        burn_in=2,
        warmup=1,
        labelled_batch=2,
        unlabelled_batch=2,
        lr=0.01,
        threshold=0.0,
        stac_threshold=0.0,
        ema_decay=0.9,
        seed=0,
        model=ModelConfig(backbone="resnet18", light_heads=True),
    )
    base.update(kw)
    return TrainConfig(**base)


def _params(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items() if v.dtype.is_floating_point}


@pytest.mark.parametrize("method", ["supervised", "stac", "ubt", "rmt", "rmt-noreg", "rmt+"])
def test_each_method_trains_and_changes_what_it_should(tiny_tiles, method):
    lab, unl = tiny_tiles[:3], tiny_tiles[3:]
    trainer = Trainer(lab, unl, CLASSES, tiny_config(method))
    before = _params(trainer.student)
    events = []
    teacher_prev = None
    for ev in trainer.run():
        events.append(ev)
        if isinstance(ev, IterationEvent) and trainer.teacher is not None and method != "supervised":
            t_now = _params(trainer.teacher)
            if method == "stac":
                if teacher_prev is not None:  # STAC's teacher is fixed
                    for k in t_now:
                        torch.testing.assert_close(t_now[k], teacher_prev[k])
            elif ev.phase == "semi-supervised" and teacher_prev is not None:
                s_now = _params(trainer.student)
                for k in t_now:  # Eq. 7, exactly, on every float tensor
                    torch.testing.assert_close(t_now[k], 0.9 * teacher_prev[k] + 0.1 * s_now[k])
            teacher_prev = t_now
        if isinstance(ev, PhaseEvent) and ev.phase in ("semi-supervised", "stac-student"):
            # Burn-in ends with teacher = student, exactly.
            s, t = _params(trainer.student), _params(trainer.teacher)
            assert all(torch.equal(s[k], t[k]) for k in s)
            teacher_prev = t
    iters = [e for e in events if isinstance(e, IterationEvent)]
    assert [e.iteration for e in iters] == [1, 2, 3, 4]
    assert isinstance(events[-1], FinishedEvent) and not events[-1].cancelled
    after = _params(trainer.student)
    assert any(not torch.equal(before[k], after[k]) for k in before), "student weights did not move"
    for e in iters:
        assert all(torch.isfinite(torch.tensor(v)) for v in e.losses.values())
    if method == "supervised":
        assert trainer.teacher is None and all(e.phase == "supervised" for e in iters)
        assert all(e.losses["unsup"] == 0 for e in iters)
        return
    burn, semi = iters[:2], iters[2:]
    assert all(e.phase == "burn-in" and e.pseudo_per_image == [] for e in burn)
    assert all(sum(e.pseudo_per_image) > 0 for e in semi), "no pseudo-labels after burn-in"
    assert all(e.losses["unsup"] > 0 for e in semi)
    if method in ("rmt", "rmt-noreg", "rmt+"):
        assert all(e.mixed > 0 for e in semi)
    else:
        assert all(e.mixed == 0 for e in semi)
    if method in ("rmt", "rmt+"):
        assert all(e.losses["reg"] > 0 for e in semi)
    else:
        assert all(e.losses["reg"] == 0 for e in semi)
    assert trainer.predict_with == ("student" if method == "stac" else "teacher")


def test_total_loss_is_eq6_of_the_reported_terms(tiny_tiles):
    cfg = tiny_config("rmt", iterations=3, burn_in=1, lambda_u=3.0, lambda_r=0.5)
    events = [
        e
        for e in Trainer(tiny_tiles[:3], tiny_tiles[3:], CLASSES, cfg).run()
        if isinstance(e, IterationEvent)
    ]
    for e in events:
        L = e.losses
        assert L["total"] == pytest.approx(L["sup"] + 3.0 * L["unsup"] + 0.5 * L["reg"], rel=1e-5)
        assert L["unsup"] == pytest.approx(
            L.get("unsup/loss_objectness", 0) + L.get("unsup/loss_classifier", 0), rel=1e-5
        )


def test_checkpoint_round_trip_and_exact_resume(tiny_tiles, tmp_path):
    lab, unl = tiny_tiles[:3], tiny_tiles[3:]
    full = Trainer(lab, unl, CLASSES, tiny_config("rmt"))
    list(full.run())

    first = Trainer(lab, unl, CLASSES, tiny_config("rmt", iterations=4))
    for ev in first.run():
        if isinstance(ev, IterationEvent) and ev.iteration == 3:
            path = first.save(tmp_path / "run" / "model.pt")
            break
    resumed = Trainer.resume(path, lab, unl)
    assert resumed.iteration == 3
    list(resumed.run())
    for k, v in full.student.state_dict().items():
        torch.testing.assert_close(resumed.student.state_dict()[k], v, msg=f"student {k} differs")
    for k, v in full.teacher.state_dict().items():
        torch.testing.assert_close(resumed.teacher.state_dict()[k], v, msg=f"teacher {k} differs")

    final = full.save(tmp_path / "final.pt")
    model, classes, cfg = load_model(final)
    assert classes.names == CLASSES.names and cfg.method == "rmt"
    a = predict_tiles(full.model, unl, CLASSES, store=False)
    b = predict_tiles(model, unl, CLASSES, store=False)
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(torch.as_tensor(x.xyxy), torch.as_tensor(y.xyxy))


def test_warm_start_loads_the_previous_model(tiny_tiles, tmp_path):
    t1 = Trainer(tiny_tiles[:3], tiny_tiles[3:], CLASSES, tiny_config("supervised", iterations=2))
    list(t1.run())
    path = t1.save(tmp_path / "m.pt")
    t2 = Trainer(tiny_tiles[:3], tiny_tiles[3:], CLASSES, tiny_config("rmt"), init_from=path)
    for k, v in t1.student.state_dict().items():
        assert torch.equal(t2.student.state_dict()[k], v)
    with pytest.raises(CheckpointError, match="trained for classes"):
        Trainer(
            tiny_tiles[:3],
            tiny_tiles[3:],
            ClassList.from_names(["a", "b", "c"]),
            tiny_config("rmt"),
            init_from=path,
        )


def test_tampered_and_foreign_checkpoints_are_refused(tiny_tiles, tmp_path):
    t = Trainer(tiny_tiles[:3], tiny_tiles[3:], CLASSES, tiny_config("supervised", iterations=1))
    good = t.save(tmp_path / "good.pt")

    class Payload:  # an object: weights_only must refuse to unpickle it
        def __reduce__(self):
            return (print, ("this would run on load",))

    evil = tmp_path / "evil.pt"
    torch.save({"format": "napari-rmt-checkpoint", "version": 1, "x": Payload()}, evil)
    with pytest.raises(CheckpointError, match=r"evil\.pt: refused to load") as refused:
        read_checkpoint(evil)
    assert "weights_only=False" not in str(refused.value)  # never advise running a file's code
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match=r"truncated\.pt"):
        read_checkpoint(truncated)
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        read_checkpoint(tmp_path / "none.pt")

    ckpt = read_checkpoint(good)
    ckpt["config"]["model"]["backbone"] = "mobilenet_v3_large"
    foreign = tmp_path / "foreign.pt"
    save_checkpoint(foreign, ckpt)
    with pytest.raises(CheckpointError, match=r"foreign\.pt: weights do not fit this detector"):
        load_model(foreign)


def test_bad_input(tiny_tiles):
    with pytest.raises(TrainingError, match="no annotated tiles"):
        Trainer([], tiny_tiles, CLASSES, tiny_config("rmt"))
    with pytest.raises(TrainingError, match="needs unlabelled or partly annotated tiles"):
        Trainer(tiny_tiles, [], CLASSES, tiny_config("rmt"))
    with pytest.raises(Exception, match="method 'fixmatch' must be one of"):
        tiny_config("fixmatch")


def test_class_without_labelled_box_and_tiles_without_boxes(tiny_tiles):
    from napari_rmt.data import Boxes

    lab = tiny_tiles[:2]
    for t in lab:  # only classes 1 and 2 are labelled; class 3 ('lymphocyte') never
        keep = t.boxes.class_ids != 3
        t.boxes = t.boxes[keep]
    lab.append(tiny_tiles[2])
    lab[-1].boxes = Boxes()  # a fully annotated tile with no cells
    trainer = Trainer(lab, tiny_tiles[3:], CLASSES, tiny_config("rmt", iterations=3, burn_in=1))
    events = list(trainer.run())
    warn = [e for e in events if isinstance(e, PhaseEvent) and e.phase == "warning"]
    assert warn and "lymphocyte" in warn[0].message
    assert trainer.bank.count(3) == 0 and trainer.bank.count(1) > 0
    assert isinstance(events[-1], FinishedEvent) and events[-1].iteration == 3


def test_all_background_teacher_gives_empty_pseudo_labels(tiny_tiles):
    trainer = Trainer(tiny_tiles[:3], tiny_tiles[3:], CLASSES, tiny_config("rmt", threshold=1.0))
    iters = [e for e in trainer.run() if isinstance(e, IterationEvent)]
    semi = [e for e in iters if e.phase == "semi-supervised"]
    assert semi and all(sum(e.pseudo_per_image) == 0 and e.mixed == 0 for e in semi)
    assert all(e.losses["unsup"] > 0 for e in semi)  # still learns 'background' on them


def test_non_finite_loss_stops_with_a_clear_error(tiny_tiles, monkeypatch):
    trainer = Trainer(tiny_tiles[:3], tiny_tiles[3:], CLASSES, tiny_config("supervised"))
    before = _params(trainer.student)
    real_forward = trainer.student.forward

    def nan_forward(images, targets=None):
        out = real_forward(images, targets)
        out["loss_box_reg"] = out["loss_box_reg"] * float("nan")
        return out

    monkeypatch.setattr(trainer.student, "forward", nan_forward)
    with pytest.raises(TrainingError, match=r"non-finite at step 1 \(.*sup/loss_box_reg"):
        list(trainer.run())
    after = _params(trainer.student)
    assert all(torch.equal(before[k], after[k]) for k in before)  # the bad step was not applied


def test_cancel_stops_between_steps_and_keeps_the_last_one(tiny_tiles):
    trainer = Trainer(tiny_tiles[:3], tiny_tiles[3:], CLASSES, tiny_config("rmt", iterations=50))
    events = []
    for ev in trainer.run():
        events.append(ev)
        if isinstance(ev, IterationEvent) and ev.iteration == 2:
            trainer.cancel()
    assert isinstance(events[-1], FinishedEvent) and events[-1].cancelled
    assert trainer.iteration == 2


def test_predictions_are_thresholded_sorted_and_use_class_ids(tiny_tiles):
    trainer = Trainer(tiny_tiles[:3], tiny_tiles[3:], CLASSES, tiny_config("supervised", iterations=2))
    list(trainer.run())
    out = predict_tiles(trainer.model, tiny_tiles[3:], CLASSES, score_threshold=0.1)
    for tile, boxes in zip(tiny_tiles[3:], out, strict=True):
        assert tile.predictions is boxes
        assert (boxes.scores >= 0.1).all() and (boxes.scores[:-1] >= boxes.scores[1:]).all()
        assert set(boxes.class_ids.tolist()) <= set(CLASSES.ids)
        assert (boxes.sources == 1).all()


def test_periodic_validation_events(tiny_tiles):
    from napari_rmt.train import ValidationEvent

    calls = []

    def validate(model):
        calls.append(model.training)
        return {"score": float(len(calls))}

    cfg = tiny_config("supervised", iterations=4, validate_every=2)
    events = list(Trainer(tiny_tiles[:3], tiny_tiles[3:], CLASSES, cfg, validate=validate).run())
    vals = [e for e in events if isinstance(e, ValidationEvent)]
    assert [(v.iteration, v.metrics["score"]) for v in vals] == [(2, 1.0), (4, 2.0)]


@pytest.mark.parametrize("method", ["rmt", "supervised"])
def test_semi_lr_applies_after_burn_in_only(tiny_tiles, method):
    cfg = tiny_config(method, semi_lr=0.002)
    lrs = [
        e.lr
        for e in Trainer(tiny_tiles[:3], tiny_tiles[3:], CLASSES, cfg).run()
        if isinstance(e, IterationEvent)
    ]
    expected = [0.01 * 0.001, 0.01, 0.002, 0.002] if method == "rmt" else [0.01 * 0.001, 0.01, 0.01, 0.01]
    assert lrs == pytest.approx(expected)
    with pytest.raises(Exception, match="semi_lr"):
        tiny_config(method, semi_lr=0.0)


def test_turn_moves_boxes_with_their_pixels():
    from napari_rmt.train.augment import turn

    image = torch.zeros(3, 10, 20)  # H 10, W 20
    image[:, 1:3, 4:9] = 1.0
    box = torch.tensor([[4.0, 1.0, 9.0, 3.0]])
    # worked by hand: a vertical flip maps y to 10 - y, a transpose swaps x and y
    expected = {(True, False): [4, 7, 9, 9], (False, True): [1, 4, 3, 9], (True, True): [7, 4, 9, 9]}
    for (vertical, transpose), want in expected.items():
        out, boxes = turn(image, box, vertical, transpose)
        assert boxes.tolist() == [[float(v) for v in want]]
        x0, y0, x1, y1 = want
        assert out[:, y0:y1, x0:x1].sum() == out.sum() == image.sum()
    out, boxes = turn(image, box, False, False)
    assert torch.equal(out, image) and torch.equal(boxes, box)


@pytest.mark.parametrize(("view", "symmetries"), [("flip", 2), ("dihedral", 8)])
def test_labelled_view_draws_its_symmetries_and_boxes_stay_on_their_cells(view, symmetries):
    from napari_rmt.data import Boxes, Tile, TileStatus

    img = np.full((32, 32, 3), 230, dtype=np.uint8)
    img[3:9, 5:19] = 40  # one off-centre, oblong cell: each symmetry puts it elsewhere
    tile = Tile(id=1, name="one", width=32, height=32, loader=lambda: img, status=TileStatus.LABELLED,
                boxes=Boxes([[5, 3, 19, 9]], [1]))
    cfg = tiny_config("supervised", labelled_view=view, labelled_batch=2)
    trainer = Trainer([tile], [], CLASSES, cfg)
    seen = set()
    for _ in range(30):
        images, targets = trainer.data.labelled_batch()
        for im, t in zip(images, targets, strict=True):
            x0, y0, x1, y1 = (int(v) for v in t["boxes"][0].tolist())
            dark = im[0] < 0.5
            assert dark[y0:y1, x0:x1].all() and dark.sum() == (x1 - x0) * (y1 - y0)
            seen.add((x0, y0, x1, y1))
    assert len(seen) == symmetries
    with pytest.raises(Exception, match="labelled_view"):
        tiny_config("supervised", labelled_view="rotate-45").validate()
