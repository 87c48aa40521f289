"""The rules for an unsure teacher (SPEC §5), with numbers worked out by hand, and rmt+ end to end."""

import math

import numpy as np
import pytest
import torch

from napari_rmt.data import ClassList
from napari_rmt.data.errors import NapariRmtError
from napari_rmt.model import ModelConfig
from napari_rmt.model.detector import build_detector
from napari_rmt.model.heads import focal_loss, weighted_focal_loss
from napari_rmt.model.options import with_spec
from napari_rmt.train import IterationEvent, TrainConfig, Trainer
from napari_rmt.train.checkpoint import CheckpointError
from napari_rmt.train.losses import ema_update, roi_class_weights
from napari_rmt.train.pseudo import ScoreBuffer, gmm_threshold, select_pseudo, top_count
from napari_rmt.train.teacher import frozen_copy, teacher_detect
from napari_rmt.train.weighting import unlabelled_spec

CLASSES = ClassList.default()


def test_soft_negative_weights_and_ignore_band_by_hand():
    labels = torch.tensor([1, 0, 0, 0])
    bg_prob = torch.tensor([0.05, 0.3, 0.7, 0.9])  # the teacher's background probability per RoI
    ignored = torch.tensor([False, False, False, True])
    w = roi_class_weights(labels, bg_prob, ignored)
    # foreground 1; background = the teacher's background score; on an ignored box 0
    assert w.tolist() == pytest.approx([1.0, 0.3, 0.7, 0.0])
    # unsup_background scales the background RoIs only: 0.5 * (0.3, 0.7); 0 leaves the
    # pseudo-boxes alone in the loss
    w_half = roi_class_weights(labels, bg_prob, ignored, background=0.5)
    assert w_half.tolist() == pytest.approx([1.0, 0.15, 0.35, 0.0])
    assert roi_class_weights(labels, None, None, background=0.0).tolist() == [1, 0, 0, 0]
    # (1 * ln 2 + 0.15 * ln(4/3) + 0.35 * ln 4) / (1 + 0.15 + 0.35) = 0.814335
    assert float(weighted_focal_loss(
        torch.tensor([[0.0, 0.0], [math.log(3), 0.0], [0.0, math.log(3)], [5.0, -5.0]]), labels, w_half, gamma=0.0
    )) == pytest.approx(0.814335, abs=1e-5)
    # a foreground RoI that fits its pseudo-box too loosely (unsup_min_iou) weighs 0; the
    # background ones are not touched by it
    loose = torch.tensor([True, True, False, False])
    assert roi_class_weights(labels, bg_prob, ignored, loose=loose).tolist() == pytest.approx([0.0, 0.3, 0.7, 0.0])
    # the foreground RoI keeps 1 even on an ignored box; without soft negatives bg weighs 1
    assert roi_class_weights(labels, None, torch.tensor([True, False, False, True])).tolist() == [1, 1, 1, 0]

    # Cross-entropy (gamma 0) per RoI, two classes (background, cell):
    # RoI 0: logits (0, 0), label 1 -> ln 2;  RoI 1: (ln 3, 0), label 0 -> ln(4/3);
    # RoI 2: (0, ln 3), label 0 -> ln 4;      RoI 3: anything, weight 0.
    logits = torch.tensor([[0.0, 0.0], [math.log(3), 0.0], [0.0, math.log(3)], [5.0, -5.0]])
    loss = weighted_focal_loss(logits, labels, w, gamma=0.0)
    # (1 * ln 2 + 0.3 * ln(4/3) + 0.7 * ln 4 + 0) / (1 + 0.3 + 0.7 + 0) = 0.874929
    assert float(loss) == pytest.approx(0.874929, abs=1e-5)
    # a score inside the ignore band contributes nothing: changing its logits changes nothing
    logits2 = logits.clone()
    logits2[3] = torch.tensor([-9.0, 9.0])
    assert float(weighted_focal_loss(logits2, labels, w, gamma=0.0)) == pytest.approx(float(loss))
    # equal weights: the plain mean (the supervised loss)
    ones = torch.ones(4)
    assert float(weighted_focal_loss(logits, labels, ones, 1.5)) == pytest.approx(float(focal_loss(logits, labels, 1.5)))
    # split normalisation (SPEC §5, Soft Teacher's paper): the foreground RoIs' mean plus
    # the background RoIs' weighted mean: ln 2 / 1 + (0.3 ln(4/3) + 0.7 ln 4 + 0) / 1.0 = 1.749858
    assert float(weighted_focal_loss(logits, labels, w, gamma=0.0, split=True)) == pytest.approx(1.749858, abs=1e-5)
    # with no foreground RoI it is the background's weighted mean alone, as joint
    assert float(weighted_focal_loss(logits[1:], labels[1:], w[1:], gamma=0.0, split=True)) == pytest.approx(
        float(weighted_focal_loss(logits[1:], labels[1:], w[1:], gamma=0.0)))


def test_gmm_threshold_lands_between_the_modes():
    rng = np.random.default_rng(0)
    low = np.clip(rng.normal(0.12, 0.04, 600), 0.05, 1)  # the teacher's junk
    high = np.clip(rng.normal(0.75, 0.06, 200), 0, 1)  # its cells
    buf = np.concatenate([low, high])
    t = gmm_threshold(buf, fallback=0.7)
    assert low.max() < 0.3 and 0.3 < t < high.min() + 1e-9, t
    assert t == pytest.approx(high.min(), abs=0.05)  # the lowest score the high mode claims
    # too few scores, or one value only: the fixed threshold
    assert gmm_threshold(buf[:50], fallback=0.7, min_scores=100) == 0.7
    assert gmm_threshold(np.full(500, 0.4), fallback=0.7) == 0.7


def test_score_buffer_rolls_and_fits_per_class():
    buf = ScoreBuffer(n_classes=2, size=300, fallback=0.7, min_scores=100)
    rng = np.random.default_rng(1)
    scores = np.concatenate([rng.normal(0.1, 0.03, 200), rng.normal(0.6, 0.05, 100)]).clip(0, 1)
    buf.add(torch.ones(300, dtype=torch.int64), torch.tensor(scores))
    buf.add(torch.tensor([2, 2, 0, 3]), torch.tensor([0.9, 0.8, 0.99, 0.99]))  # 0 and 3 are not classes
    t1, t2 = buf.thresholds()
    assert 0.3 < t1 < 0.6 and t2 == 0.7  # class 2 has two scores: the fallback
    assert len(buf.buffers[1]) == 2
    buf.add(torch.ones(10, dtype=torch.int64), torch.full((10,), 0.5))
    assert len(buf.buffers[0]) == 300  # the oldest left


def test_select_pseudo_fixed_per_class_and_topk():
    boxes = torch.arange(20, dtype=torch.float32).reshape(5, 4)
    labels = torch.tensor([1, 2, 1, 2, 1])
    scores = torch.tensor([0.9, 0.8, 0.6, 0.2, 0.1])
    # fixed 0.7 with an ignore band from 0.2: 0.9, 0.8 kept; 0.6 and 0.2 ignored; 0.1 background
    _, lab, s, ign = select_pseudo(boxes, labels, scores, "fixed", 0.7, 0.2)
    assert s.tolist() == pytest.approx([0.9, 0.8]) and lab.tolist() == [1, 2]
    assert ign.tolist() == boxes[[2, 3]].tolist()
    # a threshold per class: class 1 at 0.5, class 2 at 0.85
    _, lab, s, ign = select_pseudo(boxes, labels, scores, "gmm", [0.5, 0.85], None)
    assert s.tolist() == pytest.approx([0.9, 0.6]) and len(ign) == 0
    # top-k: round(0.9 + 0.8 + 0.6 + 0.2 + 0.1) = round(2.6) = 3 boxes, the best three
    assert top_count(scores) == 3
    _, _, s, ign = select_pseudo(boxes, labels, scores, "topk", 0.7, 0.15)
    assert s.tolist() == pytest.approx([0.9, 0.8, 0.6])
    assert ign.tolist() == boxes[[3]].tolist()  # 0.2 is in the band, 0.1 below it


def test_rpn_leaves_anchors_on_ignored_boxes_out():
    model = build_detector(1, ModelConfig(backbone="resnet18"))
    anchors = [torch.tensor([[0, 0, 10, 10], [20, 20, 30, 30], [40, 40, 50, 50], [41, 41, 51, 51]], dtype=torch.float32)]
    target = {"boxes": torch.tensor([[0.0, 0, 10, 10]]), "labels": torch.tensor([1])}
    labels, _ = model.rpn.assign_targets_to_anchors(anchors, [target])
    assert labels[0].tolist() == [1, 0, 0, 0]
    target["ignore_boxes"] = torch.tensor([[40.0, 40, 50, 50]])
    labels, _ = model.rpn.assign_targets_to_anchors(anchors, [target])
    assert labels[0].tolist() == [1, 0, -1, -1]  # IoU 1 and 0.68 with the ignored box


def test_rmt_plus_end_to_end(tiny_tiles, monkeypatch):
    cfg = TrainConfig.for_method(
        "rmt+", iterations=5, burn_in=2, warmup=1, labelled_batch=2, unlabelled_batch=2, lr=0.01,
        pseudo_rule="gmm", gmm_min_scores=5, model={"backbone": "resnet18"},
    )
    d = TrainConfig.for_method("rmt+")  # the recipe's defaults (docs/tuning.md)
    assert d.soft_negatives and d.ignore_low == 0.2 and d.pseudo_rule == "fixed" and d.threshold == 0.5
    assert d.lambda_u == 0.5 and d.lr_schedule == "cosine" and d.model.focal_gamma == 0.0
    assert d.unsup_stain_ignore == 0.3 and d.predict_with == "auto" and d.unsup_normalise == "joint"
    assert cfg.uses_mixing and cfg.uses_reg and cfg.pseudo_rule == "gmm" and cfg.soft_negatives
    trainer = Trainer(tiny_tiles[:3], tiny_tiles[3:], CLASSES, cfg)
    calls = []
    from napari_rmt.train import trainer as engine

    real = engine.class_probabilities

    def spy(teacher, view, proposals):
        out = real(teacher, view, proposals)
        calls.append((sum(len(p) for p in proposals), out[:, 0]))
        return out

    monkeypatch.setattr(engine, "class_probabilities", spy)
    events = [e for e in trainer.run() if isinstance(e, IterationEvent)]
    semi = [e for e in events if e.phase == "semi-supervised"]
    assert len(semi) == 3
    assert all(len(e.thresholds) == len(CLASSES) and len(e.pseudo_per_image) == 2 for e in semi)
    assert all(len(e.ignored_per_image) == 2 for e in semi)
    # the teacher's background probability was asked for every sampled RoI of each step
    assert len(calls) == 3 and all(n > 0 and ((p >= 0) & (p <= 1)).all() for n, p in calls)
    assert all(math.isfinite(v) for e in semi for v in e.losses.values())
    assert sum(len(b) for b in trainer.scores.buffers) > 0
    assert trainer.teacher is not None and trainer.predict_with == "student"  # the recipe's, from random init


def test_time_budget_ends_the_run_and_cosine_schedule(tiny_tiles):
    cfg = TrainConfig.for_method(
        "supervised", iterations=1000, warmup=0, time_budget_s=1e-9, lr_schedule="cosine",
        labelled_batch=1, model={"backbone": "resnet18"},
    )
    trainer = Trainer(tiny_tiles[:2], [], CLASSES, cfg)
    events = [e for e in trainer.run() if isinstance(e, IterationEvent)]
    assert len(events) == 1 and events[0].elapsed > 0  # one step, then the budget is spent
    # cosine: 0.05 + 0.95 * (1 + cos(pi * progress)) / 2 of the rate
    trainer.elapsed_s, trainer.cfg.time_budget_s, trainer.iteration = 0.0, 100.0, 0
    assert trainer.lr() == pytest.approx(cfg.lr)
    trainer.elapsed_s = 50.0
    assert trainer.lr() == pytest.approx(cfg.lr * 0.525)
    trainer.iteration = 900  # iterations may be further along than time
    assert trainer.lr() == pytest.approx(cfg.lr * (0.05 + 0.95 * (1 + math.cos(0.9 * math.pi)) / 2))


def test_burn_in_by_share_of_the_budget(tiny_tiles):
    cfg = TrainConfig.for_method(
        "rmt+", iterations=1000, burn_in=1000, burn_in_fraction=0.5, time_budget_s=100.0,
        model={"backbone": "resnet18"},
    )
    trainer = Trainer(tiny_tiles[:3], tiny_tiles[3:], CLASSES, cfg)
    trainer.elapsed_s = 49.0
    assert trainer.make_teacher() is None
    trainer.elapsed_s = 50.0
    assert trainer.make_teacher().phase == "semi-supervised" and trainer.teacher is not None


def test_resume_under_another_method_continues_the_same_state(tiny_tiles, tmp_path):
    cfg = TrainConfig.for_method("supervised", iterations=2, warmup=1, labelled_batch=2, model={"backbone": "resnet18"})
    sup = Trainer(tiny_tiles[:3], tiny_tiles[3:], CLASSES, cfg)
    list(sup.run())
    sup.save(tmp_path / "sup.pt")
    branch = TrainConfig.for_method(
        "rmt+", iterations=4, burn_in=2, warmup=1, labelled_batch=2, model=cfg.model
    )
    trainer = Trainer.resume(tmp_path / "sup.pt", tiny_tiles[:3], tiny_tiles[3:], config=branch)
    assert trainer.iteration == 2 and trainer.cfg.method == "rmt+" and trainer.elapsed_s == sup.elapsed_s
    s = sup.student.state_dict()
    assert all(torch.equal(v, trainer.student.state_dict()[k]) for k, v in s.items())
    phases = [e.phase for e in trainer.run() if isinstance(e, IterationEvent)]
    assert phases == ["semi-supervised", "semi-supervised"]
    other = TrainConfig.for_method("rmt+", model={"backbone": "mobilenet_v3_large"})
    with pytest.raises(CheckpointError, match="another model"):
        Trainer.resume(tmp_path / "sup.pt", tiny_tiles[:3], tiny_tiles[3:], config=other)
    # the same network scored another way is the same model
    by_class = TrainConfig.for_method("rmt+", iterations=4, burn_in=2, warmup=1, labelled_batch=2,
                                      model={**vars(cfg.model), "box_score": "class"})
    resumed = Trainer.resume(tmp_path / "sup.pt", tiny_tiles[:3], tiny_tiles[3:], config=by_class)
    assert resumed.student.roi_heads.score_by == "class" and resumed.iteration == 2


def test_group_norm_everywhere_and_its_teacher(tiny_tiles):
    model = build_detector(3, ModelConfig(backbone="resnet18", norm="group"))
    kinds = {type(m).__name__ for m in model.modules()}
    assert "GroupNorm" in kinds and not any("BatchNorm" in k for k in kinds)
    assert type(model.backbone.fpn.inner_blocks[0][1]).__name__ == "GroupNorm"
    assert type(model.rpn.head.conv[0][1]).__name__ == "GroupNorm"
    assert not list(model.buffers())  # nothing for the EMA to average but weights
    cfg = TrainConfig.for_method(
        "rmt+", iterations=3, burn_in=1, warmup=1, labelled_batch=2, gmm_min_scores=5,
        model={"backbone": "resnet18", "norm": "group"},
    )
    trainer = Trainer(tiny_tiles[:3], tiny_tiles[3:], CLASSES, cfg)
    list(trainer.run())
    ema_update(trainer.teacher, trainer.student, 0.5)  # float tensors only: no error


def test_new_options_are_validated_and_saved(tiny_tiles, tmp_path):
    for bad in ({"pseudo_rule": "median"}, {"ignore_low": 1.5}, {"lr_schedule": "step"},
                {"time_budget_s": -1.0}, {"burn_in_fraction": 1.0}, {"gmm_buffer": 3}):
        with pytest.raises(NapariRmtError, match=next(iter(bad))):
            TrainConfig.for_method("rmt+", **bad)
    cfg = TrainConfig.for_method("rmt+", iterations=1, model={"backbone": "resnet18"})
    trainer = Trainer(tiny_tiles[:3], tiny_tiles[3:], CLASSES, cfg)
    list(trainer.run())
    trainer.save(tmp_path / "m.pt")
    from napari_rmt.train import read_checkpoint
    from napari_rmt.train.checkpoint import config_from_checkpoint

    back = config_from_checkpoint(read_checkpoint(tmp_path / "m.pt"))
    assert back == cfg and back.soft_negatives and back.model.focal_gamma == 0.0


def test_eta_counts_the_dearer_semi_supervised_steps_during_burn_in(tiny_tiles):
    from collections import deque

    cfg = TrainConfig.for_method("rmt+", iterations=10, burn_in=4, model={"backbone": "resnet18"})
    trainer = Trainer(tiny_tiles[:3], tiny_tiles[3:], CLASSES, cfg)
    trainer.iteration = 1
    # 3 burn-in steps left at 2 s, then 6 semi-supervised steps at 1.85 x 2 s
    assert trainer.eta(deque([2.0, 2.0])) == pytest.approx(3 * 2.0 + 6 * 2.0 * Trainer.SEMI_STEP_COST)
    trainer.cfg.time_budget_s, trainer.elapsed_s = 20.0, 5.0
    assert trainer.eta(deque([2.0])) == pytest.approx(15.0)  # the budget ends it sooner
    sup = Trainer(tiny_tiles[:3], [], CLASSES, TrainConfig.for_method("supervised", iterations=10))
    sup.iteration = 1
    assert sup.eta(deque([2.0])) == pytest.approx(18.0)
    # after burn-in: the semi-supervised steps' own mean once five are measured
    trainer.cfg.time_budget_s, trainer.iteration, trainer.teacher = 0.0, 6, trainer.student
    assert trainer.eta(deque([2.0]), deque([3.0] * 4)) == pytest.approx(4 * 2.0 * Trainer.SEMI_STEP_COST)
    assert trainer.eta(deque([2.0]), deque([3.0] * 5)) == pytest.approx(4 * 3.0)


def test_method_defaults_set_burn_in_and_the_predicting_network(tiny_tiles, tmp_path):
    cfg = TrainConfig.for_method("rmt+", iterations=100)
    assert cfg.burn_in == 75 and cfg.predict_with == "auto"  # the recipe: 3/4, then by the init
    assert TrainConfig.for_method("rmt", iterations=100).burn_in == 50  # the others: half
    assert TrainConfig.for_method("rmt", iterations=100, burn_in=7).burn_in == 7  # given: kept
    assert TrainConfig.for_method("ubt", time_budget_s=60.0).burn_in_fraction == 0.5
    with pytest.raises(NapariRmtError, match="predict_with"):
        TrainConfig.for_method("rmt+", predict_with="both")
    cfg = TrainConfig.for_method("rmt+", iterations=3, burn_in=1, warmup=1, labelled_batch=2, model={"backbone": "resnet18"})
    trainer = Trainer(tiny_tiles[:3], tiny_tiles[3:], CLASSES, cfg)
    list(trainer.run())
    # auto: from random init the student predicts, from the nucleus model the teacher once
    # it has had the EMA's memory of updates (1 / (1 - 0.99) = 100), the student before
    assert trainer.teacher is not None and trainer.predict_with == "student" and trainer.model is trainer.student
    cfg.init = "nucleus"
    assert trainer.ema_steps == 2 and trainer.predict_with == "student"
    trainer.ema_steps = 100
    assert trainer.predict_with == "teacher" and trainer.model is trainer.teacher
    assert Trainer.resume(trainer.save(tmp_path / "t.pt"), tiny_tiles[:3], tiny_tiles[3:]).ema_steps == 100
    cfg.init, cfg.predict_with = "none", "teacher"
    assert trainer.model is trainer.teacher


def test_foreground_score_by_hand():
    """Two proposals: one the head splits between two classes (bg 0.1, 0.45 / 0.45), one it
    calls background (0.8). By class neither passes 0.5; by foreground the first scores
    0.9 with its most probable class and that class's box, the second 0.2."""
    model = build_detector(3, ModelConfig(backbone="resnet18"))
    heads = model.roi_heads
    probs = torch.tensor([[0.1, 0.45, 0.44, 0.01], [0.8, 0.1, 0.05, 0.05]])

    class Fixed(torch.nn.Module):
        def forward(self, x):
            deltas = torch.zeros(2, 16)
            deltas[0, 8:12] = torch.tensor([0.0, 0.0, 0.5, 0.5])  # class 2's box is wider
            return probs.log(), deltas

    heads.box_predictor = Fixed()
    heads.box_head = torch.nn.Identity()

    class NoPool(torch.nn.Module):
        def forward(self, feats, props, shapes):
            return torch.zeros(sum(len(p) for p in props), 1)

    heads.box_roi_pool = NoPool()
    props = [torch.tensor([[10.0, 10, 30, 30], [60.0, 60, 80, 80]])]
    (det,) = heads.foreground_detections({}, props, [(100, 100)], score_thresh=0.15)
    assert det["scores"].tolist() == pytest.approx([0.9, 0.2])
    assert det["labels"].tolist() == [1, 1]  # class 1 (0.45) over class 2 (0.44)
    assert det["boxes"][0].tolist() == pytest.approx([10, 10, 30, 30])  # class 1's (zero) deltas
    (det,) = heads.foreground_detections({}, props, [(100, 100)], score_thresh=0.5)
    assert det["scores"].tolist() == pytest.approx([0.9])
    # by class (torchvision's post-processing), nothing of the first proposal reaches 0.5
    _boxes, scores, _labels = heads.postprocess_detections(probs.log(), torch.zeros(2, 16), props, [(100, 100)])
    assert (scores[0] < 0.5).all()


def test_rmt_plus_with_foreground_scores_end_to_end(tiny_tiles):
    cfg = TrainConfig.for_method(
        "rmt+", iterations=4, burn_in=2, warmup=1, labelled_batch=2, unlabelled_batch=2,
        threshold=0.0, ignore_low=None, pseudo_score="foreground", model={"backbone": "resnet18"},
    )
    trainer = Trainer(tiny_tiles[:3], tiny_tiles[3:], CLASSES, cfg)
    semi = [e for e in trainer.run() if isinstance(e, IterationEvent) and e.phase == "semi-supervised"]
    assert len(semi) == 2 and all(math.isfinite(v) for e in semi for v in e.losses.values())
    # at threshold 0 every proposal the teacher's NMS keeps is a pseudo-box
    assert all(n > 0 for e in semi for n in e.pseudo_per_image)
    with pytest.raises(NapariRmtError, match="pseudo_score"):
        TrainConfig.for_method("rmt+", pseudo_score="objectness")


def test_soft_class_targets_by_hand():
    """Two RoIs: one matched to a pseudo-box (hard label 1), one matched to none, whose
    target is the teacher's distribution (bg 0.5, class 1 0.2, class 2 0.3)."""
    from napari_rmt.model.heads import soft_target_loss

    logits = torch.log(torch.tensor([[0.2, 0.7, 0.1], [0.4, 0.4, 0.2]]))
    labels = torch.tensor([1, 0])
    soft = torch.tensor([[0.0, 0.0, 0.0], [0.5, 0.2, 0.3]])
    use_soft = torch.tensor([False, True])
    loss = soft_target_loss(logits, labels, soft, use_soft, torch.ones(2))
    hard = -math.log(0.7)
    soft_ce = -(0.5 * math.log(0.4) + 0.2 * math.log(0.4) + 0.3 * math.log(0.2))
    assert float(loss) == pytest.approx((hard + soft_ce) / 2, rel=1e-5)
    # all hard: plain cross-entropy
    assert float(soft_target_loss(logits, labels, soft, torch.tensor([False, False]), torch.ones(2))) == (
        pytest.approx(float(focal_loss(logits, labels, gamma=0.0)), rel=1e-5)
    )


def test_rmt_plus_with_soft_class_targets_end_to_end(tiny_tiles, monkeypatch):
    cfg = TrainConfig.for_method(
        "rmt+", iterations=4, burn_in=2, warmup=1, labelled_batch=2, unlabelled_batch=2,
        soft_targets=True, soft_temperature=0.5, model={"backbone": "resnet18"},
    )
    trainer = Trainer(tiny_tiles[:3], tiny_tiles[3:], CLASSES, cfg)
    seen = []
    from napari_rmt.train import trainer as engine

    real = engine.class_probabilities

    def spy(teacher, view, proposals):
        out = real(teacher, view, proposals)
        seen.append(out)
        return out

    monkeypatch.setattr(engine, "class_probabilities", spy)
    semi = [e for e in trainer.run() if isinstance(e, IterationEvent) and e.phase == "semi-supervised"]
    assert len(semi) == 2 and all(math.isfinite(v) for e in semi for v in e.losses.values())
    # one teacher pass per step over every sampled RoI, a distribution over bg + classes
    assert len(seen) == 2 and all(p.shape[1] == len(CLASSES) + 1 for p in seen)
    assert all(torch.allclose(p.sum(1), torch.ones(len(p))) for p in seen)
    assert not hasattr(trainer.student.roi_heads, "roi_soft_targets")  # a forward's spec, never the model's
    with pytest.raises(NapariRmtError, match="soft_temperature"):
        TrainConfig.for_method("rmt+", soft_temperature=0.0)


def test_teacher_predict_is_the_eval_forward_and_catches_its_features(tiny_tiles):
    """The pseudo-labels come from the teacher's own eval forward (predict_images), scored
    by class or by foreground; the features handed to soft negatives are that forward's."""
    from napari_rmt.model.predict import image_tensor, predict_images

    cfg = TrainConfig.for_method("rmt+", iterations=3, burn_in=1, warmup=1, model={"backbone": "resnet18"})
    trainer = Trainer(tiny_tiles[:3], tiny_tiles[3:], CLASSES, cfg)
    trainer.teacher = frozen_copy(trainer.student.state_dict(), len(CLASSES), cfg.model, trainer.device)
    views = [image_tensor(t.pixels()) for t in tiny_tiles[3:5]]
    teacher = trainer.teacher
    dets, view = teacher_detect(teacher, views, 0.0, trainer.cfg, trainer.device, keep_features=True)
    teacher.roi_heads.score_thresh = 0.0
    own = teacher.roi_heads.score_by  # the model's own scoring, for prediction
    teacher.roi_heads.score_by = "class"  # what pseudo_score "class" asks of the forward
    want = predict_images(teacher, views)
    teacher.roi_heads.score_by = own
    for got, ref in zip(dets, want, strict=True):
        assert torch.equal(got["boxes"], ref["boxes"]) and torch.equal(got["scores"], ref["scores"])
    with torch.no_grad():
        images, _ = teacher.transform([v.clone() for v in views])
        feats = teacher.backbone(images.tensors)
    assert list(view["features"]) == list(feats) and view["image_sizes"] == images.image_sizes
    assert all(torch.allclose(view["features"][k], feats[k]) for k in feats)
    assert teacher.roi_heads.score_by == own == "foreground" and not teacher.rpn._forward_pre_hooks  # put back
    trainer.cfg.pseudo_score = "foreground"
    fg, none = teacher_detect(teacher, views, 0.3, trainer.cfg, trainer.device)
    with torch.no_grad():
        ref = teacher.roi_heads.foreground_detections(feats, teacher.rpn(images, feats)[0], images.image_sizes, 0.3)
    assert none == {} and all(torch.equal(a["scores"], b["scores"]) for a, b in zip(fg, ref, strict=True))
    assert all(float(d["scores"].min()) > 0.3 for d in fg if len(d["scores"]))


def test_rmt_plus_with_the_stain_view_end_to_end(tiny_tiles):
    cfg = TrainConfig.for_method(
        "rmt+", iterations=3, burn_in=1, warmup=1, labelled_batch=2, unlabelled_batch=2,
        strong_view="stain", model={"backbone": "resnet18"},
    )
    trainer = Trainer(tiny_tiles[:3], tiny_tiles[3:], CLASSES, cfg)
    from napari_rmt.train.augment import StainAugment

    assert isinstance(trainer.strong, StainAugment)
    semi = [e for e in trainer.run() if isinstance(e, IterationEvent) and e.phase == "semi-supervised"]
    assert len(semi) == 2 and all(math.isfinite(v) for e in semi for v in e.losses.values())
    with pytest.raises(NapariRmtError, match="strong_view"):
        TrainConfig.for_method("rmt+", strong_view="erase-everything")


def test_loose_rois_of_a_pseudo_box_get_no_class_loss(tiny_tiles):
    """unsup_min_iou 0.7: the weighting the student's unlabelled forward gets gives 0 to
    the positives under IoU 0.7 with their pseudo-box and 1 to those over it."""
    cfg = TrainConfig.for_method("rmt+", iterations=3, burn_in=1, warmup=1, unsup_min_iou=0.7,
                                 soft_negatives=False, ignore_low=None, model={"backbone": "resnet18"})
    trainer = Trainer(tiny_tiles[:3], tiny_tiles[3:], CLASSES, cfg)
    pseudo = torch.tensor([[10.0, 10.0, 30.0, 30.0]])
    # IoU with the pseudo-box: 1, 361/439 = 0.82 (1 px off), 320/480 = 0.67 (4 px off), 0
    props = torch.tensor([[10.0, 10.0, 30.0, 30.0], [11.0, 11.0, 31.0, 31.0], [14.0, 10.0, 34.0, 30.0],
                          [60.0, 60.0, 80.0, 80.0]])
    from torchvision.ops import box_iou

    iou = box_iou(props, pseudo)[:, 0]
    assert iou[1] > 0.7 and 0.5 < iou[2] < 0.7
    labels = torch.tensor([1, 1, 1, 0])
    spec = unlabelled_spec(trainer.cfg, 0.5, None)
    w = spec.roi_weighting([props], [labels], [{"boxes": pseudo, "labels": torch.tensor([1])}])
    assert w.tolist() == [1.0, 1.0, 0.0, 1.0]
    with pytest.raises(NapariRmtError, match="unsup_min_iou"):
        TrainConfig.for_method("rmt+", unsup_min_iou=0.3)


def test_teacher_views_merge_by_hand():
    """Two looks at a tile: a cell both see keeps the mean of its scores, one only the
    first sees at 0.6 drops to 0.3; the duplicate of the shared cell goes in the NMS."""
    from napari_rmt.train.augment import flip_boxes
    from napari_rmt.train.pseudo import merge_views

    a = {"boxes": torch.tensor([[10.0, 10.0, 30.0, 30.0], [50.0, 50.0, 70.0, 70.0]]),
         "labels": torch.tensor([1, 2]), "scores": torch.tensor([0.9, 0.6])}
    b = {"boxes": torch.tensor([[11.0, 10.0, 31.0, 30.0]]), "labels": torch.tensor([1]),
         "scores": torch.tensor([0.7])}
    m = merge_views([a, b])
    order = torch.argsort(m["boxes"][:, 0])
    assert m["boxes"][order].tolist() == [[10.0, 10.0, 30.0, 30.0], [50.0, 50.0, 70.0, 70.0]]
    assert m["scores"][order].tolist() == pytest.approx([0.8, 0.3])
    assert m["labels"][order].tolist() == [1, 2]
    assert merge_views([a])["scores"].tolist() == pytest.approx([0.9, 0.6])
    # a box found in a flipped view, mapped back: flip twice is the identity
    box = torch.tensor([[10.0, 20.0, 30.0, 60.0]])
    assert flip_boxes(box, 100, 80, True, False).tolist() == [[70.0, 20.0, 90.0, 60.0]]
    box = torch.tensor([[10.0, 10.0, 30.0, 30.0]])
    assert flip_boxes(box, 100, 80, False, True).tolist() == [[10.0, 50.0, 30.0, 70.0]]
    both = flip_boxes(box, 100, 80, True, True)
    assert both.tolist() == [[70.0, 50.0, 90.0, 70.0]]
    assert flip_boxes(both, 100, 80, True, True).tolist() == box.tolist()


def test_teacher_with_four_views_end_to_end(tiny_tiles):
    """teacher_views 4: four teacher forwards per unlabelled batch, their boxes merged."""
    cfg = TrainConfig.for_method("rmt+", iterations=3, burn_in=1, warmup=1, teacher_views=4,
                                 threshold=0.0, model={"backbone": "resnet18"})
    trainer = Trainer(tiny_tiles[:3], tiny_tiles[3:], CLASSES, cfg)
    calls = []
    import napari_rmt.train.teacher as tm

    original = tm.predict_images

    def counting(model, images, *args, **kwargs):
        calls.append(len(images))
        return original(model, images, *args, **kwargs)

    tm.predict_images = counting
    try:
        semi = [e for e in trainer.run() if isinstance(e, IterationEvent) and e.phase == "semi-supervised"]
    finally:
        tm.predict_images = original
    assert len(semi) == 2 and all(math.isfinite(v) for e in semi for v in e.losses.values())
    assert calls == [2] * 8  # two steps x four looks at the batch of two
    with pytest.raises(NapariRmtError, match="teacher_views"):
        TrainConfig.for_method("rmt+", teacher_views=3)


def test_split_normalisation_is_set_for_the_unlabelled_forward_only(tiny_tiles):
    """unsup_normalise "split": the student's box head averages foreground and background
    apart during the unlabelled forward (even with nothing else to weight), and joint
    again after; an unknown choice is refused by name; a tiny run trains with it."""
    cfg = TrainConfig.for_method("rmt+", iterations=3, burn_in=1, warmup=1, unsup_normalise="split",
                                 soft_negatives=False, ignore_low=None, model={"backbone": "resnet18"})
    trainer = Trainer(tiny_tiles[:3], tiny_tiles[3:], CLASSES, cfg)
    spec = unlabelled_spec(trainer.cfg, 0.5, None)
    assert spec.split_normalise
    w = spec.roi_weighting([torch.tensor([[0.0, 0.0, 9.0, 9.0]])], [torch.tensor([0])],
                           [{"boxes": torch.zeros((0, 4)), "labels": torch.zeros(0, dtype=torch.int64)}])
    assert w.tolist() == [1.0]
    assert not unlabelled_spec(TrainConfig.for_method("rmt+"), 0.5, None).split_normalise  # joint by default
    events = [e for e in trainer.run() if isinstance(e, IterationEvent)]
    assert [e.phase for e in events][-1] == "semi-supervised"
    assert all(math.isfinite(e.losses["total"]) for e in events)
    with pytest.raises(NapariRmtError, match="unsup_normalise"):
        TrainConfig.for_method("rmt+", unsup_normalise="halves")


def test_stain_prior_by_hand():
    """Haematoxylin by colour deconvolution, Otsu's cut, the share of a box that is
    stained, and which background regions count as "may be a missed cell"."""
    from napari_rmt.train.augment import STAIN_VECTORS
    from napari_rmt.train.stain_prior import (
        box_cover,
        haematoxylin,
        otsu_threshold,
        stain_integral,
        stain_unknown,
    )

    # a pixel of 0.8 units of haematoxylin alone, one of 0.8 eosin alone, one of both
    od = torch.stack([0.8 * STAIN_VECTORS[0], 0.8 * STAIN_VECTORS[1], 0.4 * (STAIN_VECTORS[0] + STAIN_VECTORS[1])])
    pixels = torch.exp(-od).T.reshape(3, 1, 3)
    assert haematoxylin(pixels)[0].tolist() == pytest.approx([0.8, 0.0, 0.4], abs=1e-4)
    # two modes, about 0.1 and 0.9: the cut separates them (the 100 high values above it)
    values = torch.cat([torch.full((300,), 0.1), torch.full((100,), 0.9)]) + torch.linspace(0, 0.05, 400)
    cut = otsu_threshold(values)
    assert int((values > cut).sum()) == 100
    # a 64 x 64 pale pink tile with one dark purple nucleus of 10 x 10 px at (20, 30)
    tile = torch.exp(-0.2 * STAIN_VECTORS[1])[:, None, None].expand(3, 64, 64).clone()
    tile[:, 30:40, 20:30] = torch.exp(-(1.0 * STAIN_VECTORS[0] + 0.2 * STAIN_VECTORS[1]))[:, None, None]
    integral = stain_integral(tile)
    boxes = torch.tensor([[20.0, 30.0, 30.0, 40.0], [15.0, 30.0, 35.0, 40.0], [40.0, 0.0, 60.0, 20.0],
                          [19.5, 29.5, 30.2, 40.2]])
    # on the nucleus 1; half on it 0.5; away 0; a fractional box is rounded outwards to
    # pixels 19-30 x 29-40: 100 of 144
    assert box_cover(integral, boxes).tolist() == pytest.approx([1.0, 0.5, 0.0, 100 / 144])
    # stained enough and away from every pseudo-box: may be a missed cell; next to a
    # pseudo-box (IoU 50 / 250 = 0.2 >= 0.1) it stays a negative (a near miss of that cell)
    assert stain_unknown(integral, boxes, torch.zeros((0, 4)), 0.5).tolist() == [True, True, False, True]
    pseudo = torch.tensor([[10.0, 30.0, 20.0, 40.0]])
    assert stain_unknown(integral, boxes, pseudo, 0.5).tolist() == [True, False, False, True]


def test_stain_prior_in_the_unlabelled_forward(tiny_tiles):
    """unsup_stain_ignore: during the student's unlabelled forward a stained background RoI
    weighs 0 and a stained background anchor is left out (label -1); the hooks are gone
    after it; a tiny run trains with it."""
    from napari_rmt.train.augment import STAIN_VECTORS
    from napari_rmt.train.stain_prior import stain_integral

    cfg = TrainConfig.for_method("rmt+", iterations=3, burn_in=1, warmup=1, unsup_stain_ignore=0.5,
                                 soft_negatives=False, ignore_low=None, model={"backbone": "resnet18"})
    trainer = Trainer(tiny_tiles[:3], tiny_tiles[3:], CLASSES, cfg)
    tile = torch.exp(-0.2 * STAIN_VECTORS[1])[:, None, None].expand(3, 64, 64).clone()
    tile[:, 30:40, 20:30] = torch.exp(-(1.0 * STAIN_VECTORS[0] + 0.2 * STAIN_VECTORS[1]))[:, None, None]
    target = {"boxes": torch.zeros((0, 4)), "labels": torch.zeros(0, dtype=torch.int64),
              "stain_integral": stain_integral(tile)}
    props = torch.tensor([[20.0, 30.0, 30.0, 40.0], [40.0, 0.0, 60.0, 20.0]])
    rpn = trainer.student.rpn
    spec = unlabelled_spec(trainer.cfg, 0.5, None)
    assert spec.roi_weighting([props], [torch.tensor([0, 0])], [target]).tolist() == [0.0, 1.0]
    labels, _ = rpn.assign_targets_to_anchors([props], with_spec([target], spec))
    assert labels[0].tolist() == [-1.0, 0.0]
    assert rpn.assign_targets_to_anchors([props], [target])[0][0].tolist() == [0.0, 0.0]  # another forward
    events = [e for e in trainer.run() if isinstance(e, IterationEvent)]
    assert events[-1].phase == "semi-supervised" and all(math.isfinite(e.losses["total"]) for e in events)
    with pytest.raises(NapariRmtError, match="unsup_stain_ignore"):
        TrainConfig.for_method("rmt+", unsup_stain_ignore=1.5)
    # 0 is off, as None (the command line's way to turn off a recipe's default)
    off = Trainer(tiny_tiles[:3], tiny_tiles[3:], CLASSES, TrainConfig.for_method(
        "rmt+", iterations=3, burn_in=1, unsup_stain_ignore=0.0, model={"backbone": "resnet18"}))
    assert unlabelled_spec(off.cfg, 0.5, None).anchor_unknown is None
