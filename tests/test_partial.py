"""Partly annotated tiles: the rule that spares unboxed nuclei, in the labelled loss and
for the teacher, with numbers worked by hand; class balance by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from napari_rmt.data import Boxes, ClassList, Tile, TileSet, TileStatus
from napari_rmt.model.heads import box_regression_loss, weighted_focal_loss
from napari_rmt.model.options import with_spec
from napari_rmt.train import IterationEvent, PhaseEvent, TrainConfig, Trainer
from napari_rmt.train.augment import STAIN_VECTORS
from napari_rmt.train.partial import (
    PARTIAL_KEY,
    effective_number_weights,
    mark_partial,
    partial_spec,
    repeat_factors,
    unboxed_cells,
    with_known_boxes,
)

CLASSES = ClassList.default()


def two_nuclei() -> torch.Tensor:
    """A 64 x 64 pale pink tile with two dark purple nuclei of 10 x 10 px, at (20, 30) and
    (44, 8); the first is boxed by the user, the second by nobody."""
    tile = torch.exp(-0.2 * STAIN_VECTORS[1])[:, None, None].expand(3, 64, 64).clone()
    dark = torch.exp(-(1.0 * STAIN_VECTORS[0] + 0.2 * STAIN_VECTORS[1]))[:, None, None]
    tile[:, 30:40, 20:30] = dark
    tile[:, 8:18, 44:54] = dark
    return tile


def tiny(method: str, **kw) -> TrainConfig:
    base = dict(iterations=4, burn_in=2, warmup=1, labelled_batch=2, unlabelled_batch=2, lr=0.01,
                threshold=0.0, stac_threshold=0.0, ema_decay=0.9, model={"backbone": "resnet18"})
    base.update(kw)
    return TrainConfig.for_method(method, **base)


def test_an_unboxed_nucleus_is_no_background_on_a_partial_tile_and_is_on_a_full_one(tiny_tiles):
    """Three sampled RoIs of one image: the user's cell (class 1), a RoI over the unboxed
    nucleus, one over bare tissue (both background, label 0). Cross-entropy (gamma 0) of
    logits chosen so that each term is known: ln 2, ln 2 and ln 4.
    Full tile: (ln 2 + ln 2 + ln 4) / 3. Partial tile: the unboxed nucleus weighs 0, so
    (ln 2 + ln 4) / 2."""
    trainer = Trainer(tiny_tiles[:2], [], CLASSES, tiny("supervised"))
    image = two_nuclei()
    user = torch.tensor([[20.0, 30.0, 30.0, 40.0]])
    full = {"boxes": user, "labels": torch.tensor([1])}
    partial = mark_partial({"boxes": user, "labels": torch.tensor([1])}, image)
    rois = torch.tensor([[20.0, 30.0, 30.0, 40.0], [44.0, 8.0, 54.0, 18.0], [2.0, 50.0, 12.0, 60.0]])
    labels = torch.tensor([1, 0, 0])
    # p(class 1) = 1/2 for the cell; p(background) = 1/2 over the nucleus; 1/4 over tissue
    logits = torch.tensor([[0.0, math.log(3), 0.0, 0.0], [math.log(3), 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    rpn = trainer.student.rpn
    spec = partial_spec(0.3)
    w_full = spec.roi_weighting([rois], [labels], [full])
    w_partial = spec.roi_weighting([rois], [labels], [partial])
    # the RPN reads the spec from the forward's targets
    anchors_full = rpn.assign_targets_to_anchors([rois], with_spec([full], spec))[0][0]
    anchors_partial = rpn.assign_targets_to_anchors([rois], with_spec([partial], spec))[0][0]
    assert rpn.assign_targets_to_anchors([rois], [partial])[0][0].tolist() == [1.0, 0.0, 0.0]  # no spec: as full
    assert w_full.tolist() == [1.0, 1.0, 1.0]
    assert w_partial.tolist() == [1.0, 0.0, 1.0]
    ln2, ln4 = math.log(2), math.log(4)
    assert float(weighted_focal_loss(logits, labels, w_full, gamma=0.0)) == pytest.approx((2 * ln2 + ln4) / 3)
    assert float(weighted_focal_loss(logits, labels, w_partial, gamma=0.0)) == pytest.approx((ln2 + ln4) / 2)
    # the RPN: the anchor over the unboxed nucleus is left out (-1) on the partial tile only
    assert anchors_full.tolist() == [1.0, 0.0, 0.0]
    assert anchors_partial.tolist() == [1.0, -1.0, 0.0]
    # off (0): the partial tile is taught as a full one
    assert partial_spec(0.0).roi_weighting([rois], [labels], [partial]).tolist() == [1.0, 1.0, 1.0]


def test_the_teachers_pseudo_labels_of_a_partial_tile_keep_the_users_boxes():
    """The user's boxes join at score 1 with their class; a teacher box of the same cell
    (IoU >= 0.5) gives way, whatever its class; the teacher's other boxes stay; an ignored
    box on a user's cell is dropped from the ignore band."""
    teacher = torch.tensor([[0.0, 0.0, 10.0, 10.0], [31.0, 30.0, 41.0, 40.0], [60.0, 60.0, 70.0, 70.0]])
    ignored = torch.tensor([[1.0, 0.0, 11.0, 10.0], [80.0, 80.0, 90.0, 90.0]])
    user = torch.tensor([[30.0, 30.0, 40.0, 40.0], [0.0, 0.0, 10.0, 10.0]])
    boxes, labels, scores, ign = with_known_boxes(
        teacher, torch.tensor([1, 2, 3]), torch.tensor([0.9, 0.8, 0.7]), ignored, user, torch.tensor([3, 2])
    )
    assert boxes.tolist() == [[30.0, 30.0, 40.0, 40.0], [0.0, 0.0, 10.0, 10.0], [60.0, 60.0, 70.0, 70.0]]
    assert labels.tolist() == [3, 2, 3]
    assert scores.tolist() == pytest.approx([1.0, 1.0, 0.7])
    assert ign.tolist() == [[80.0, 80.0, 90.0, 90.0]]


@pytest.mark.parametrize("method", ["supervised", "stac", "ubt", "rmt", "rmt-noreg", "rmt+"])
def test_every_method_trains_on_partial_tiles(tiny_tiles, method):
    """Two fully annotated tiles, two partial ones (one box left each), two unlabelled: a
    run of every method; the partial tiles' labelled targets carry the rule's mark, the
    full ones' do not; after burn-in the teacher's pseudo-labels of a partial tile hold
    the user's box."""
    full, part, unl = tiny_tiles[:2], tiny_tiles[2:4], tiny_tiles[4:]
    for t in part:
        t.boxes, t.status = t.boxes[[0]], TileStatus.PARTIAL
    trainer = Trainer(full, unl, CLASSES, tiny(method), partial=part)
    assert len(trainer.data.labelled) == 4 and trainer.data.n_full == 2
    assert set(trainer.data.known) == (set() if method == "supervised" else {2, 3})
    trainer.data.lab_cycle.order, trainer.data.lab_cycle.pos = [0, 2, 1, 3], 0
    _, targets = trainer.data.labelled_batch()
    assert [PARTIAL_KEY in t for t in targets] == [False, True]
    events = [e for e in trainer.run() if isinstance(e, IterationEvent)]
    assert len(events) == 4 and all(math.isfinite(e.losses["total"]) for e in events)
    if method in ("ubt", "rmt", "rmt-noreg", "rmt+"):
        user = {i: trainer.data.known[i][0] for i in trainer.data.known}
        for i, flip, boxes, _labels in trainer.last_pseudo:
            if i in user:
                mine = user[i] if not flip else torch.stack(
                    [64 - user[i][:, 2], user[i][:, 1], 64 - user[i][:, 0], user[i][:, 3]], dim=1)
                assert any(torch.allclose(b, mine[0]) for b in boxes)


def test_partial_tiles_alone_train_and_no_annotation_is_refused(tiny_tiles):
    for t in tiny_tiles[:3]:
        t.status = TileStatus.PARTIAL
    trainer = Trainer([], [], CLASSES, tiny("rmt+"), partial=tiny_tiles[:3])
    assert len([e for e in trainer.run() if isinstance(e, IterationEvent)]) == 4
    from napari_rmt.train import TrainingError

    with pytest.raises(TrainingError, match="no annotated tiles"):
        Trainer([], tiny_tiles, CLASSES, tiny("rmt+"))


def test_status_follows_the_boxes_until_the_user_says_the_tile_is_complete():
    assert TileStatus.of_boxes(TileStatus.UNLABELLED, 3) is TileStatus.PARTIAL
    assert TileStatus.of_boxes(TileStatus.PARTIAL, 0) is TileStatus.UNLABELLED
    assert TileStatus.of_boxes(TileStatus.LABELLED, 0) is TileStatus.LABELLED
    assert TileStatus.of_boxes(TileStatus.REVIEWED, 5) is TileStatus.REVIEWED
    assert not TileStatus.PARTIAL.is_labelled and TileStatus.PARTIAL.has_labels
    img = np.zeros((8, 8, 3), np.uint8)
    tiles = [Tile(id=i, name=f"t{i}", width=8, height=8, loader=lambda: img, status=s)
             for i, s in enumerate([TileStatus.LABELLED, TileStatus.PARTIAL, TileStatus.UNLABELLED], 1)]
    ts = TileSet(tiles, CLASSES)
    assert [t.id for t in ts.labelled] == [1] and [t.id for t in ts.partial] == [2]
    assert [t.id for t in ts.unlabelled] == [3]


def test_class_balance_by_hand():
    """Repeat factors: four tiles; class 1 on all, class 2 on one (f = 1/4), class 3 on
    none. Threshold 1: r_1 = 1, r_2 = sqrt(4) = 2; a tile repeats its rarest class's r."""
    labels = [torch.tensor([1, 1]), torch.tensor([1, 2]), torch.tensor([1]), torch.tensor([1])]
    assert repeat_factors(labels, 3, 1.0) == [1, 2, 1, 1]
    assert repeat_factors(labels, 3, 0.0) == [1, 1, 1, 1]
    # effective number: beta 0.9, counts 1 and 10: (0.1 / 0.1) = 1 and 0.1 / (1 - 0.9^10);
    # scaled so that the average box weighs 1 ((1 * w1 + 10 * w2) / 11); a class with no
    # box gets the largest; background 1
    w1, w2 = 1.0, 0.1 / (1 - 0.9**10)
    mean = (1 * w1 + 10 * w2) / 11
    w = effective_number_weights([1, 10, 0], 0.9)
    assert w.tolist() == pytest.approx([1.0, w1 / mean, w2 / mean, w1 / mean], rel=1e-5)
    assert w[1] > w[2]  # the rarer class weighs more
    # a class of 2 boxes beside 1000: at most 10 times the average box, and the common
    # class keeps most of its weight (not 0.07 against the background's 1: every cell
    # became background in the demo with a mean over the classes)
    rare, common = 0.001 / (1 - 0.999**2), 0.001 / (1 - 0.999**1000)
    w = effective_number_weights([2, 1000], 0.999)
    assert w[1] == pytest.approx(10.0) and w[2] == pytest.approx(common / ((2 * rare + 1000 * common) / 1002), rel=1e-5)
    assert 0.5 < w[2] < 1.0


def test_class_balance_in_a_run(tiny_tiles):
    """With both on, the labelled passes hold the rare-class tiles more often and the run
    trains; a resumed run keeps the balanced order."""
    for t in tiny_tiles[1:]:  # class 3 on one tile of six: f = 1/6, r = sqrt(6), 2 repeats
        t.boxes = t.boxes[t.boxes.class_ids != 3]
    cfg = tiny("supervised", class_balance=1.0, class_weight_beta=0.99)
    trainer = Trainer(tiny_tiles, [], CLASSES, cfg)
    assert sorted(trainer.data.lab_cycle.pool) == [0, 0, 1, 2, 3, 4, 5] and trainer.data.lab_cycle.n == 7
    assert trainer.data.class_weights[3] > trainer.data.class_weights[1]  # the rare class weighs more
    assert len([e for e in trainer.run() if isinstance(e, IterationEvent)]) == 4
    with pytest.raises(Exception, match="class_balance"):
        TrainConfig.for_method("supervised", class_balance=2.0)


def test_predictions_of_a_partial_tile_leave_out_the_boxed_cells():
    boxes = Boxes([[0, 0, 10, 10], [30, 30, 40, 40]], [1, 1], scores=[0.9, 0.8])
    user = Boxes([[1, 0, 11, 10]], [2])
    assert boxes.not_covered_by(user).xyxy.tolist() == [[30, 30, 40, 40]]
    assert len(boxes.not_covered_by(Boxes())) == 2


def test_supervised_is_the_recipe_without_the_unlabelled_terms_and_the_paper_stays_reachable():
    sup, plus = TrainConfig.for_method("supervised"), TrainConfig.for_method("rmt+")
    for name in ("lr_schedule", "labelled_batch"):
        assert getattr(sup, name) == getattr(plus, name)
    assert sup.model.focal_gamma == plus.model.focal_gamma == 0.0
    paper = TrainConfig.for_method("supervised", preset="paper")
    assert paper.lr_schedule == "constant" and paper.model.focal_gamma == 1.5 and paper.labelled_batch == 2
    assert TrainConfig.for_method("rmt", preset="paper") == TrainConfig(method="rmt", burn_in=1000)
    assert TrainConfig.for_method("rmt+", preset="paper") == plus  # not the paper's: its recipe
    with pytest.raises(Exception, match="preset"):
        TrainConfig.for_method("supervised", preset="fast")


def test_an_unboxed_nucleus_the_nucleus_model_found_is_a_cell_of_unknown_class():
    """Three classes (logits of background + 3); the RoI over the unboxed nucleus carries
    the label one past them (4). Logits (ln 2, 0, 0, 0): p(background) = 2/5, so its term
    is -ln(1 - 2/5) = ln(5/3), where a background label would give ln(5/2); the user's
    cell (class 1, p = 1/5) gives ln 5, the bare tissue (background) ln(5/2). The
    partial rule's weights leave it in (it is a positive), class weights give it 1, and
    it has no box to regress."""
    image = two_nuclei()
    user = torch.tensor([[20.0, 30.0, 30.0, 40.0]])
    cell = torch.tensor([[44.0, 8.0, 54.0, 18.0]])
    target = mark_partial({"boxes": torch.cat([user, cell]), "labels": torch.tensor([1, 4])}, image)
    rois = torch.tensor([[20.0, 30.0, 30.0, 40.0], [44.0, 8.0, 54.0, 18.0], [2.0, 50.0, 12.0, 60.0]])
    labels = torch.tensor([1, 4, 0])
    logits = torch.tensor([[math.log(2), 0.0, 0.0, 0.0]]).expand(3, 4)
    w = partial_spec(0.3, torch.tensor([1.0, 2.0, 0.5, 0.5])).roi_weighting([rois], [labels], [target])
    assert w.tolist() == [2.0, 1.0, 1.0]
    ln = math.log
    loss = weighted_focal_loss(logits, labels, w, gamma=0.0)
    assert float(loss) == pytest.approx((2 * ln(5) + ln(5 / 3) + ln(5 / 2)) / 4)
    # as background (no nucleus model) the same RoI would have said ln(5/2)
    as_bg = weighted_focal_loss(logits, torch.tensor([1, 0, 0]), torch.tensor([2.0, 1.0, 1.0]), gamma=0.0)
    assert float(as_bg) == pytest.approx((2 * ln(5) + 2 * ln(5 / 2)) / 4)
    # box regression: only the user's cell (class 1's deltas), normalised by the 3 RoIs
    deltas = torch.zeros(3, 16)
    deltas[:, 4:8] = 1.0  # class 1's deltas off by 1 each; smooth L1 (beta 1/9): 1 - 1/18 each
    reg = box_regression_loss(deltas, labels, torch.zeros(3, 4))
    assert float(reg) == pytest.approx(4 * (1 - 1 / 18) / 3)


def test_the_nucleus_models_cells_on_partial_tiles_are_those_nobody_boxed():
    """On four sample tiles (real H&E) with one user box left each: the bundled model's
    boxes above 0.5, none at IoU >= 0.3 of the user's box; the same at half the pixel
    size's scale mapped back (boxes in the trained image's pixels); they reach the
    labelled targets with the label one past the classes, through the flips."""
    from torchvision.ops import box_iou

    from napari_rmt.data.sample import load_sample
    from napari_rmt.model.bundled import NUCLEUS
    from napari_rmt.train.checkpoint import load_model
    from napari_rmt.train.partial import CELL_IOU

    sample = load_sample()
    tiles = list(sample)[:4]
    for t in tiles:
        t.boxes, t.status = t.boxes[[0]], TileStatus.PARTIAL
    model, _, _ = load_model(NUCLEUS)
    from napari_rmt.train.batches import load_labelled

    loaded = [load_labelled(t, sample.classes, (0.5, 1.0, 2.0)) for t in tiles]
    cells = unboxed_cells(model, [im for im, _, _ in loaded], [b for _, b, _ in loaded], 0.5)
    assert sum(len(c) for c in cells) >= 20  # the sample's tiles hold dozens of nuclei each
    for c, (im, user, _) in zip(cells, loaded, strict=True):
        assert len(c) == 0 or float(box_iou(c, user).max()) < CELL_IOU
        assert c.min() >= 0 and float(c[:, 2].max()) <= im.shape[-1]
    # an image at half the scale, enlarged x2 for the model: boxes come back in its pixels
    small = torch.nn.functional.interpolate(loaded[0][0][None].float(), scale_factor=0.5, mode="bilinear",
                                            antialias=True)[0].round().to(torch.uint8)
    half = unboxed_cells(model, [small], [loaded[0][1] / 2], 0.5, factor=2.0)[0]
    assert len(half) > 0 and float(half[:, 2].max()) <= small.shape[-1] + 1e-3
    assert float(box_iou(half * 2, cells[0]).max(dim=1).values.median()) > 0.5  # the same nuclei
    k = len(sample.classes) + 1
    for method in ("supervised", "rmt+"):
        trainer = Trainer([], [], sample.classes, tiny(method, partial_cells=0.5), partial=tiles)
        assert sorted(trainer.data.cells) == [0, 1, 2, 3]
        assert all(torch.equal(trainer.data.cells[i], cells[i]) for i in range(4))
        _, targets = trainer.data.labelled_batch()
        for t in targets:
            assert (t["labels"] == k).sum() > 0 and (t["labels"] < k).sum() == 1
        everything = list(trainer.run())
        events = [e for e in everything if isinstance(e, IterationEvent)]
        assert len(events) == 4 and all(math.isfinite(e.losses["total"]) for e in events)
        # the run says what it found, first
        said = [e.message for e in everything if isinstance(e, PhaseEvent) and e.phase == "cells"]
        assert said == [f"the nucleus model found {sum(len(c) for c in cells)} cells nobody boxed on 4 partly "
                        "annotated tile(s): taught as cells of unknown class (partial_cells 0.5; 0 turns it off)"]
        # the teacher's view of a partial tile keeps the user's box only, not the model's cells
        assert all(len(b) == 1 for b, _ in trainer.data.known.values())
    # on by default at 0.5; None or 0 turns it off
    assert TrainConfig().partial_cells == 0.5
    assert all(torch.equal(a, b) for a, b in zip(
        Trainer([], [], sample.classes, tiny("supervised"), partial=tiles).data.cells.values(), cells, strict=True))
    for off in (None, 0.0):
        assert Trainer([], [], sample.classes, tiny("supervised", partial_cells=off), partial=tiles).data.cells == {}
    # boxes the user deleted: the cells over them (IoU >= 0.3) are left out, the others kept
    gone = cells[0][:3].numpy() + 1.0  # near-copies of three of the model's cells, as a user deletes them
    tiles[0].reject(gone)
    after = Trainer([], [], sample.classes, tiny("supervised", partial_cells=0.5), partial=tiles).data.cells
    assert len(after[0]) == len(cells[0]) - 3
    assert float(box_iou(after[0], torch.as_tensor(gone, dtype=torch.float32)).max()) < CELL_IOU
    assert all(torch.equal(after[i], cells[i]) for i in (1, 2, 3))
