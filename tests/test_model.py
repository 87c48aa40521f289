"""Detector factory, weights loading and augmentation."""

import numpy as np
import pytest
import torch
from torch import nn
from torchvision.models import mobilenet_v3_large, resnet18
from torchvision.ops.misc import FrozenBatchNorm2d

from napari_rmt.model import ModelConfig, build_detector
from napari_rmt.model.detector import WeightsError
from napari_rmt.train.augment import StrongAugment, hflip


def _norm_types(model):
    return {
        type(m) for m in model.backbone.body.modules() if isinstance(m, (nn.BatchNorm2d, FrozenBatchNorm2d))
    }


def test_random_init_uses_trainable_batchnorm_and_native_size():
    model = build_detector(3, ModelConfig(backbone="resnet18"))
    assert _norm_types(model) == {nn.BatchNorm2d}
    assert model.roi_heads.box_predictor.cls_score.out_features == 4  # 3 classes + background
    model.eval()
    with torch.no_grad():
        out = model([torch.rand(3, 96, 80)])
    assert out[0]["boxes"].shape[1] == 4
    # Native size: a 96 x 80 image is not rescaled to 800 px.
    images, _ = model.transform([torch.rand(3, 96, 80)])
    assert images.image_sizes == [(96, 80)]
    # Sized for nuclei: strides 4-16 plus the pooled level, 8-64 px anchors, 128-channel FPN.
    assert model.rpn.anchor_generator.sizes == ((8,), (16,), (32,), (64,))
    assert model.backbone.out_channels == 128 and not hasattr(model.backbone.body, "layer4")
    assert model.roi_heads.box_head.fc7.out_features == 512


def test_the_papers_full_fpn_is_one_option_away():
    full = build_detector(2, ModelConfig(backbone="resnet18", fpn_channels=256, resnet_stages=4, box_head_dim=1024))
    assert full.rpn.anchor_generator.sizes == ((8,), (16,), (32,), (64,), (128,))
    assert full.backbone.out_channels == 256 and hasattr(full.backbone.body, "layer4")
    sized = build_detector(2, ModelConfig(backbone="resnet18"))
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert n(sized) < n(full) / 3  # 6.9 M against 28 M weights
    assert ModelConfig(backbone="resnet50").resolved("fpn_channels") == 256


def test_checkpoints_from_before_the_sized_default_still_load():
    from napari_rmt.train.config import TrainConfig

    saved = TrainConfig(method="supervised").to_dict()
    for key in ("fpn_channels", "resnet_stages", "box_head_dim"):
        del saved["model"][key]  # as written before these options existed
    cfg = TrainConfig.from_dict(saved)
    assert (cfg.model.resolved("fpn_channels"), cfg.model.resolved("resnet_stages")) == (256, 4)
    with pytest.raises(Exception, match="resnet_stages 5"):
        build_detector(2, ModelConfig(resnet_stages=5))


def test_local_weights_file_loads_into_the_backbone(tmp_path):
    ref = resnet18(weights=None)
    with torch.no_grad():
        ref.conv1.weight.fill_(0.125)
    path = tmp_path / "resnet18.pth"
    torch.save(ref.state_dict(), path)
    model = build_detector(2, ModelConfig(backbone="resnet18", weights=str(path)))
    assert torch.all(model.backbone.body.conv1.weight == 0.125)
    assert _norm_types(model) == {FrozenBatchNorm2d}  # pretrained weights: frozen statistics


def test_foreign_or_missing_weights_are_refused(tmp_path):
    other = tmp_path / "mobilenet.pth"
    torch.save(mobilenet_v3_large(weights=None).state_dict(), other)
    with pytest.raises(WeightsError, match=r"mobilenet\.pth: only 0 of .* fit a resnet18"):
        build_detector(2, ModelConfig(backbone="resnet18", weights=str(other)))
    with pytest.raises(WeightsError, match="weights file not found"):
        build_detector(2, ModelConfig(backbone="resnet18", weights=str(tmp_path / "nope.pth")))


def test_mobilenet_backbone_builds_and_runs():
    model = build_detector(2, ModelConfig(backbone="mobilenet_v3_large"))
    model.train()
    losses = model(
        [torch.rand(3, 64, 64)], [{"boxes": torch.tensor([[4.0, 4, 20, 20]]), "labels": torch.tensor([1])}]
    )
    assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"}


def test_weak_flip_moves_boxes_with_the_image(tiny_tiles):
    img = torch.zeros(3, 4, 10)
    img[:, :, 1] = 1.0  # a bright column at x = 1
    out, boxes = hflip(img, torch.tensor([[1.0, 0.0, 3.0, 4.0]]))
    assert out[0, 0].argmax().item() == 8  # column 1 -> 10 - 1 - 1
    assert boxes.tolist() == [[7.0, 0.0, 9.0, 4.0]]
    # the trainer draws the weak view's flips (alike on every rank): about half of them
    from napari_rmt.data import ClassList
    from napari_rmt.train import TrainConfig, Trainer

    cfg = TrainConfig.for_method("supervised", iterations=1, model={"backbone": "resnet18"})
    trainer = Trainer(tiny_tiles[:3], [], ClassList.default(), cfg)
    flips = sum(flip for _ in range(100) for _, flip in trainer.data.own_share(trainer.data.lab_cycle, 2))
    assert 60 < flips < 140  # about half of 200


def test_strong_augmentation_is_photometric():
    torch.manual_seed(0)
    img = torch.rand(3, 32, 48)
    out = StrongAugment()(img)
    assert out.shape == img.shape and out.min() >= 0 and out.max() <= 1
    assert not torch.equal(out, img)


def test_stain_view_by_hand():
    """Colour deconvolution and back: unit scales give the image back; doubling only the
    haematoxylin doubles its optical density, a pure-haematoxylin pixel stays on its line."""
    from napari_rmt.train.augment import STAIN_VECTORS, StainAugment, stain_jitter, strong_view

    img = torch.rand(3, 8, 8) * 0.9 + 0.05
    assert torch.allclose(stain_jitter(img, torch.ones(3), torch.zeros(3)), img, atol=1e-5)
    # a pixel with H concentration 0.5 and nothing else: OD = 0.5 * h, rgb = exp(-OD)
    h = STAIN_VECTORS[0]
    pixel = torch.exp(-0.5 * h)[:, None, None]
    doubled = stain_jitter(pixel, torch.tensor([2.0, 1.0, 1.0]), torch.zeros(3))
    assert torch.allclose(doubled[:, 0, 0], torch.exp(-1.0 * h), atol=1e-5)
    # shifting eosin adds its vector's OD to every pixel
    shifted = stain_jitter(pixel, torch.ones(3), torch.tensor([0.0, 0.1, 0.0]))
    assert torch.allclose(-torch.log(shifted[:, 0, 0]), 0.5 * h + 0.1 * STAIN_VECTORS[1], atol=1e-5)
    g = torch.Generator().manual_seed(0)
    out = StainAugment(g)(img)
    assert out.shape == img.shape and out.min() >= 0 and out.max() <= 1 and not torch.equal(out, img)
    # no erasing: every pixel stays near its original colour (a random-noise patch would not)
    assert float((out - img).abs().amax()) < 0.5
    assert isinstance(strong_view("stain", g), StainAugment) and isinstance(strong_view("unbiased"), StrongAugment)


def test_box_head_in_chunks_gives_the_same_outputs():
    """Large windows run the box head over proposals in chunks; its outputs must not change.

    Compared before NMS: the chunks' matrix products may round in the last bits unlike
    one pass (batch shapes differ), which can flip a near-tie in NMS, and that is no
    error of the chunking (a whole-detections comparison failed on one CPU this way).
    """
    torch.manual_seed(0)
    model = build_detector(2, ModelConfig(backbone="resnet18")).eval()
    heads = model.roi_heads
    images = [torch.rand(3, 160, 128), torch.rand(3, 96, 160)]
    with torch.no_grad():
        batch, _ = model.transform(images)
        features = model.backbone(batch.tensors)
        proposals = [torch.rand(n, 4) * 60 for n in (300, 211)]
        for p in proposals:
            p[:, 2:] += p[:, :2] + 4  # x1 > x0, y1 > y0
        one_logits, one_deltas = heads.box_predictor(
            heads.box_head(heads.box_roi_pool(features, proposals, batch.image_sizes))
        )
        heads.eval_chunk = 97  # slices that straddle the two images
        logits, deltas = heads._chunked_outputs(features, proposals, batch.image_sizes)
    assert logits.shape == one_logits.shape == (511, 3)
    torch.testing.assert_close(logits, one_logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(deltas, one_deltas, atol=1e-4, rtol=1e-4)
    # and a chunk misordered would show: the first image's outputs are not the second's
    assert not torch.allclose(logits[:211], one_logits[300:])


def test_roialign_in_chunks_on_every_thread_is_the_single_call_row_for_row():
    """At inference the detector pools its RoIs in one chunk per CPU thread
    (``model.roialign``, in slices): the very same numbers in the same order as torchvision's single
    call, for two images of different box counts, channels-last features included; with
    gradients on it is the single call, and gradients reach the features."""
    from torchvision.ops import MultiScaleRoIAlign

    from napari_rmt.model.roialign import MIN_SLICE, ChunkedRoIAlign

    torch.manual_seed(0)
    names = ["0", "1", "2"]
    feats = {"0": torch.randn(2, 8, 64, 64).contiguous(memory_format=torch.channels_last),
             "1": torch.randn(2, 8, 32, 32), "2": torch.randn(2, 8, 16, 16)}

    def boxes(n):
        xy = torch.rand(n, 2) * 200
        return torch.cat([xy, xy + torch.rand(n, 2) * 120 + 2], 1)

    rois = [boxes(3 * MIN_SLICE + 5), boxes(MIN_SLICE + 17)]
    shapes = [(256, 256)] * 2
    single, chunked = MultiScaleRoIAlign(names, 7, 2), ChunkedRoIAlign(names, 7, 2)
    threads = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        for mode in (torch.no_grad, torch.inference_mode):
            with mode():
                want = single(feats, rois, shapes)
                got = chunked(feats, rois, shapes)
            assert got.shape == (4 * MIN_SLICE + 22, 8, 7, 7) and torch.equal(got, want)
        # the split is real: each image's rows straddle the chunks, and a misorder would show
        assert not torch.equal(got[: len(rois[0])], want[len(rois[1]):])
        leaf = {k: v.clone().requires_grad_(True) for k, v in feats.items()}
        out = chunked(leaf, rois, shapes)
        assert torch.equal(out.detach(), want)
        out.sum().backward()
        assert leaf["0"].grad is not None and leaf["0"].grad.abs().sum() > 0
    finally:
        torch.set_num_threads(threads)
    # the detector pools with it
    assert isinstance(build_detector(2, ModelConfig(backbone="resnet18")).roi_heads.box_roi_pool, ChunkedRoIAlign)


def test_a_larger_roialign_pool_replaces_and_shuts_down_the_smaller():
    """More threads asked for than the pool has: a larger pool takes over and the old one
    is shut down (no idle threads left for the process's lifetime); its work finished."""
    from napari_rmt.model import roialign

    first = roialign._submit(1, lambda: 1, 1)
    small = roialign._POOL
    grown = roialign._submit(small._max_workers + 2, lambda: 2, 3)
    assert roialign._POOL is not small and small._shutdown
    assert [f.result() for f in first + grown] == [1, 2, 2, 2]
    assert roialign._submit(1, lambda: 3, 1)[0].result() == 3 and roialign._POOL._max_workers > 1


def test_proposals_are_capped_per_cell_by_score():
    from napari_rmt.model.proposals import top_per_cell

    # centres: cell (0,0) x3, cell (1,0) x2, cell (0,1) x1 with 64 px cells
    centres = [(10, 10), (20, 30), (60, 5), (70, 10), (100, 60), (5, 70)]
    boxes = torch.tensor([[x - 2, y - 2, x + 2, y + 2] for x, y in centres], dtype=torch.float32)
    scores = torch.tensor([0.2, 0.9, 0.5, 0.3, 0.8, 0.1])
    keep = top_per_cell(boxes, scores, None, cell=64, k=2)
    assert keep.tolist() == [1, 4, 2, 3, 5]  # index 0 is the third best of its cell
    # groups (pyramid levels) are capped separately
    levels = torch.tensor([0, 1, 0, 0, 0, 0])
    assert sorted(top_per_cell(boxes, scores, levels, cell=64, k=1).tolist()) == [1, 2, 4, 5]
    assert top_per_cell(boxes[:0], scores[:0], None, 64, 1).numel() == 0


def test_local_rpn_keeps_the_tile_density_of_proposals_on_a_large_input():
    from napari_rmt.model.options import DetectOptions, detecting
    from napari_rmt.model.proposals import LocalRPN

    torch.manual_seed(0)
    model = build_detector(1, ModelConfig(backbone="resnet18")).eval()
    assert isinstance(model.rpn, LocalRPN)
    with torch.no_grad():
        batch, _ = model.transform([torch.rand(3, 512, 512)])
        feats = model.backbone(batch.tensors)
        counted, _ = model.rpn(batch, feats)
        with detecting(DetectOptions(objectness=0.0)):
            local, _ = model.rpn(batch, feats)
    assert len(counted[0]) == 300  # torchvision's count: 300 for the whole 512 px input
    p = local[0]
    cells = ((p[:, :2] + p[:, 2:]) / 2 // 64).long()
    per_cell = torch.unique(cells[:, 1] * 8 + cells[:, 0], return_counts=True)[1]
    assert per_cell.max() == 19 and len(p) > 4 * 300  # 300 per 256 px tile = 19 per 64 px cell


def test_channels_last_is_only_a_memory_order():
    """The default keeps 4-D weights channels-last; the same weights in the other layout
    give the same losses, gradients and detections (to float rounding), and a state saved
    from one loads into the other."""
    cl = build_detector(3, ModelConfig(backbone="resnet18", focal_gamma=0.0))
    assert cl.backbone.body.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    assert not cl.backbone.body.conv1.weight.is_contiguous()
    plain = build_detector(3, ModelConfig(backbone="resnet18", focal_gamma=0.0, channels_last=False))
    assert plain.backbone.body.conv1.weight.is_contiguous()
    plain.load_state_dict(cl.state_dict())
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, 96, 96, generator=g) for _ in range(2)]
    targets = [{"boxes": torch.tensor([[10.0, 10.0, 30.0, 34.0], [50.0, 40.0, 70.0, 60.0]]),
                "labels": torch.tensor([1, 2])} for _ in range(2)]
    losses = []
    for model in (cl, plain):
        model.train()
        torch.manual_seed(0)  # the same RoI / anchor samples
        out = model(images, targets)
        sum(out.values()).backward()
        losses.append(out)
    for k in losses[0]:
        assert float(losses[0][k].detach()) == pytest.approx(float(losses[1][k].detach()), rel=1e-4, abs=1e-6), k
    g1, g2 = cl.backbone.body.conv1.weight.grad, plain.backbone.body.conv1.weight.grad
    assert torch.allclose(g1, g2, rtol=1e-3, atol=1e-6)
    cl.eval()
    plain.eval()
    plain.roi_heads.score_thresh = cl.roi_heads.score_thresh = 0.0
    with torch.no_grad():
        a, b = cl(images), plain(images)
    for x, y in zip(a, b, strict=True):
        assert len(x["boxes"]) == len(y["boxes"]) > 0
        assert torch.allclose(x["scores"], y["scores"], atol=1e-4)


def test_rpn_positive_iou_is_a_setting_and_is_checked():
    from napari_rmt.data.errors import NapariRmtError

    model = build_detector(2, ModelConfig(backbone="resnet18", rpn_fg_iou=0.5))
    assert model.rpn.proposal_matcher.high_threshold == 0.5
    assert model.rpn.proposal_matcher.low_threshold == 0.3  # background stays torchvision's
    assert model.rpn.proposal_matcher.allow_low_quality_matches
    # on a 12 px box an octave grid has no anchor at 0.7, some at 0.5: more positives
    anchors = torch.tensor([[0.0, 0.0, 16.0, 16.0], [2.0, 2.0, 14.0, 14.0], [40.0, 40.0, 56.0, 56.0]])
    truth = torch.tensor([[2.0, 2.0, 14.0, 14.0]])
    from torchvision.ops import box_iou

    quality = box_iou(truth, anchors)
    assert (model.rpn.proposal_matcher(quality) >= 0).sum() == 2
    default = build_detector(2, ModelConfig(backbone="resnet18")).rpn.proposal_matcher
    assert default.high_threshold == 0.7 and (default(quality) >= 0).sum() == 1
    with pytest.raises(NapariRmtError, match="rpn_fg_iou"):
        build_detector(2, ModelConfig(backbone="resnet18", rpn_fg_iou=0.2))


def test_box_score_foreground_is_what_an_eval_forward_and_a_checkpoint_give(tmp_path, tiny_tiles):
    """The same network scored two ways: by class (torchvision's) or by 1 - p(background)
    with the most probable class; the setting travels in the checkpoint's model config."""
    from napari_rmt.data import ClassList
    from napari_rmt.data.errors import NapariRmtError
    from napari_rmt.train import TrainConfig, Trainer
    from napari_rmt.train.checkpoint import load_model

    torch.manual_seed(0)
    by_fg = build_detector(3, ModelConfig(backbone="resnet18", box_score="foreground", box_score_thresh=0.0)).eval()
    by_class = build_detector(3, ModelConfig(backbone="resnet18", box_score="class", box_score_thresh=0.0)).eval()
    by_class.load_state_dict(by_fg.state_dict())
    image = torch.rand(3, 64, 64)
    with torch.no_grad():
        (fg,) = by_fg([image])
        (cls,) = by_class([image])
        images, _ = by_fg.transform([image])
        feats = by_fg.backbone(images.tensors)
        props = by_fg.rpn(images, feats)[0]
        probs = by_fg.roi_heads.class_probabilities(feats, props, images.image_sizes)
    # at most one detection per proposal, scored by 1 - p(background): the best is the
    # proposals' best foreground probability, never below the best class probability
    assert len(fg["scores"]) <= len(props[0])
    assert float(fg["scores"].max()) == pytest.approx(float((1 - probs[:, 0]).max()), abs=1e-5)
    assert float(fg["scores"].max()) >= float(cls["scores"].max())
    # by class: one box per (proposal, class), each scored by that class's probability
    assert by_class.roi_heads.score_by == "class"
    assert float(cls["scores"].max()) == pytest.approx(float(probs[:, 1:].max()), abs=1e-5)
    cfg = TrainConfig.for_method("supervised", iterations=1, warmup=1, labelled_batch=2,
                                 model={"backbone": "resnet18", "box_score": "foreground"})
    trainer = Trainer(tiny_tiles[:2], [], ClassList.default(), cfg)
    list(trainer.run())
    trainer.save(tmp_path / "m.pt")
    assert load_model(tmp_path / "m.pt")[0].roi_heads.score_by == "foreground"
    with pytest.raises(NapariRmtError, match="box_score"):
        build_detector(2, ModelConfig(backbone="resnet18", box_score="objectness"))


def test_a_tile_that_reaches_the_box_cap_warns_by_name(tiny_tiles):
    from napari_rmt.data import ClassList
    from napari_rmt.model.detector import build_detector
    from napari_rmt.model.predict import CapWarning, predict_tiles

    model = build_detector(3, ModelConfig(backbone="resnet18"))
    model.roi_heads.score_thresh, model.roi_heads.detections_per_img = 0.0, 2
    with pytest.warns(CapWarning, match="tile 'syn_0': 2 boxes, the detector's cap"):
        predict_tiles(model, tiny_tiles[:1], ClassList.default(), store=False, score_threshold=0.0)


def test_a_tile_too_small_to_see_gets_no_boxes_and_a_warning():
    import numpy as np

    from napari_rmt.data import ClassList, Tile
    from napari_rmt.model.detector import build_detector
    from napari_rmt.model.predict import PredictionWarning, predict_tiles

    model = build_detector(3, ModelConfig(backbone="resnet18"))
    model.roi_heads.score_thresh = 0.0
    dot = Tile(id=1, name="dot.png", width=2, height=2, loader=lambda: np.zeros((2, 2, 3), np.uint8))
    with pytest.warns(PredictionWarning, match="'dot.png' is 2x2 px"):
        out = predict_tiles(model, [dot], ClassList.default(), store=False, score_threshold=0.0)
    assert len(out) == 1 and len(out[0]) == 0


def test_prediction_chooses_its_device_without_the_trainer():
    from napari_rmt.model.predict import DeviceError, resolve_device

    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(DeviceError, match="not a valid torch device"):
        resolve_device("gpu-please")
    if not torch.cuda.is_available():
        with pytest.raises(DeviceError, match="CUDA is not available"):
            resolve_device("cuda:7")


def test_class_doubt_by_hand_and_on_every_predicted_box(tiny_tiles):
    import numpy as np

    from napari_rmt.data import ClassList
    from napari_rmt.model.detector import build_detector
    from napari_rmt.model.heads import class_doubt
    from napari_rmt.model.predict import predict_tiles

    # tumour 0.45, stromal 0.40, lymphocyte 0.05: each against the best other class
    got = class_doubt(torch.tensor([[0.45, 0.40, 0.05], [0.9, 0.0, 0.0]]))
    torch.testing.assert_close(got, torch.tensor([[0.8 / 0.85, 0.8 / 0.85, 0.1 / 0.5], [0.0, 0.0, 0.0]]))
    assert class_doubt(torch.tensor([[0.7]])).tolist() == [[0.0]]  # one class: nothing to doubt
    for score_by in ("class", "foreground"):
        model = build_detector(3, ModelConfig(backbone="resnet18"))  # background and the 2 default classes
        model.roi_heads.score_by = score_by
        out = predict_tiles(model, tiny_tiles[:2], ClassList.default(), store=False, score_threshold=0.0)
        doubts = np.concatenate([b.class_doubt for b in out])
        assert len(doubts) and np.isfinite(doubts).all() and ((doubts >= 0) & (doubts <= 1)).all(), score_by


@pytest.mark.parametrize("backend", ["channels-last", "onnx"])
def test_every_backend_gives_the_torch_boxes(tiny_tiles, backend):
    import copy

    from napari_rmt.data import ClassList
    from napari_rmt.model.backends import for_inference
    from napari_rmt.model.detector import build_detector
    from napari_rmt.model.predict import predict_tiles

    torch.manual_seed(0)
    ref = build_detector(3, ModelConfig(backbone="resnet18")).eval()
    other = for_inference(copy.deepcopy(ref), backend)
    want = predict_tiles(ref, tiny_tiles[:2], ClassList.default(), store=False)
    got = predict_tiles(other, tiny_tiles[:2], ClassList.default(), store=False)
    assert sum(len(b) for b in want) > 0
    for w, g in zip(want, got, strict=True):
        assert len(w) == len(g)
        np.testing.assert_allclose(g.xyxy, w.xyxy, atol=0.05)
        np.testing.assert_allclose(g.scores, w.scores, atol=1e-3)


def test_an_unknown_backend_is_named():
    from napari_rmt.model.backends import BackendError, for_inference
    from napari_rmt.model.detector import build_detector

    with pytest.raises(BackendError, match="backend 'tensorrt' is not one of torch, channels-last, onnx"):
        for_inference(build_detector(3, ModelConfig(backbone="resnet18")), "tensorrt")
