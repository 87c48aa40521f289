"""Freezing the backbone's first stages: they keep the init, the rest trains, files stay ordinary."""

import pytest
import torch

from napari_rmt.data import ClassList, NapariRmtError
from napari_rmt.model import ModelConfig
from napari_rmt.model.detector import build_detector
from napari_rmt.train import IterationEvent, TrainConfig, Trainer, TrainingError, load_model
from napari_rmt.train.freeze import RecordedStatsBatchNorm2d, freeze_backbone
from test_trainer import tiny_config

CLASSES = ClassList.default()


def _state(model, prefix=""):
    return {k: v.detach().clone() for k, v in model.state_dict().items() if k.startswith(prefix)}


def test_frozen_stages_stop_training_and_their_batchnorm_keeps_its_statistics():
    torch.manual_seed(0)
    model = build_detector(len(CLASSES), ModelConfig(backbone="resnet18")).train()
    assert freeze_backbone(model, "layer1") == ["conv1", "bn1", "layer1"]
    body = model.backbone.body
    assert not any(p.requires_grad for n in ("conv1", "bn1", "layer1") for p in getattr(body, n).parameters())
    assert all(p.requires_grad for p in body.layer2.parameters())
    bns = [m for m in body.layer1.modules() if isinstance(m, torch.nn.BatchNorm2d)] + [body.bn1]
    assert bns and all(type(m) is RecordedStatsBatchNorm2d for m in bns)
    assert not any(type(m) is RecordedStatsBatchNorm2d for m in body.layer2.modules())
    # Train mode normalises a frozen stage with its recorded statistics, as eval mode does.
    x = torch.rand(2, 64, 32, 32)
    train_out = body.layer1(x)
    body.layer1.eval()
    torch.testing.assert_close(train_out, body.layer1(x))
    body.layer1.train()

    frozen_before, layer2_before = _state(body, "layer1."), _state(body, "layer2.")
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    images = [torch.rand(3, 64, 64), torch.rand(3, 64, 64)]
    targets = [{"boxes": torch.tensor([[10.0, 10, 30, 30]]), "labels": torch.tensor([1])}] * 2
    loss = sum(model(images, targets).values())
    opt.zero_grad()
    loss.backward()
    opt.step()
    for k, v in frozen_before.items():
        assert torch.equal(body.state_dict()[k], v), f"frozen {k} changed"
    assert any(not torch.equal(body.state_dict()[k], v) for k, v in layer2_before.items()), "layer2 did not train"


def test_a_frozen_model_has_an_ordinary_state_dict():
    plain = build_detector(len(CLASSES), ModelConfig(backbone="resnet18"))
    frozen = build_detector(len(CLASSES), ModelConfig(backbone="resnet18"))
    freeze_backbone(frozen, "layer3")
    assert list(frozen.state_dict()) == list(plain.state_dict())
    plain.load_state_dict(frozen.state_dict())
    plain.eval(), frozen.eval()
    image = [torch.rand(3, 64, 64)]
    with torch.no_grad():
        torch.testing.assert_close(plain(image)[0]["scores"], frozen(image)[0]["scores"])


def test_freeze_settings_are_checked_by_name():
    with pytest.raises(NapariRmtError, match="freeze_backbone 'layer4' is not one of"):
        TrainConfig(freeze_backbone="layer4")
    with pytest.raises(NapariRmtError, match="needs a ResNet backbone, not 'mobilenet_v3_large'"):
        TrainConfig(freeze_backbone="stem", model=ModelConfig(backbone="mobilenet_v3_large"))
    assert freeze_backbone(build_detector(2, ModelConfig(backbone="resnet18")), "none") == []


def test_freezing_random_weights_is_refused(tiny_tiles):
    with pytest.raises(TrainingError, match="freeze_backbone 'stem' keeps the stages as the run starts"):
        Trainer(tiny_tiles[:3], tiny_tiles[3:], CLASSES, tiny_config("supervised", freeze_backbone="stem"))


def test_a_run_keeps_its_frozen_init_through_teacher_checkpoint_and_resume(tiny_tiles, tmp_path):
    lab, unl = tiny_tiles[:3], tiny_tiles[3:]
    cfg = tiny_config("rmt+", iterations=4, burn_in=2, init="nucleus", freeze_backbone="layer2")
    trainer = Trainer(lab, unl, CLASSES, cfg)
    assert trainer.frozen == ["conv1", "bn1", "layer1", "layer2"]
    start = _state(trainer.student, "backbone.body.layer2.")
    trained_before = _state(trainer.student, "backbone.body.layer3.")
    for ev in trainer.run():
        if isinstance(ev, IterationEvent) and ev.iteration == 3:
            path = trainer.save(tmp_path / "run" / "model.pt")
    assert trainer.teacher is not None
    for net in (trainer.student, trainer.teacher):
        for k, v in start.items():
            assert torch.equal(net.state_dict()[k], v), f"{k} moved"
    assert any(not torch.equal(trainer.student.state_dict()[k], v) for k, v in trained_before.items())

    resumed = Trainer.resume(path, lab, unl)
    assert resumed.cfg.freeze_backbone == "layer2" and resumed.frozen == trainer.frozen
    list(resumed.run())
    model, _classes, saved_cfg = load_model(resumed.save(tmp_path / "final.pt"))
    assert saved_cfg.freeze_backbone == "layer2"
    for k, v in start.items():
        assert torch.equal(model.state_dict()[k], v)
