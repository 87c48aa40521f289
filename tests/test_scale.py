"""Pixel size (issue 32): read from files, checked, and images resampled to the model's own
with their boxes mapped back exactly."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tifffile
import torch

from napari_rmt.data import Tile
from napari_rmt.data.errors import NapariRmtError
from napari_rmt.data.scale import check_pixel_size, pixel_size_of, resample, scale_factor, scaled_size


def test_pixel_size_from_ome_aperio_and_resolution_tags(tmp_path):
    px = np.zeros((40, 50, 3), np.uint8)
    ome = tmp_path / "a.ome.tif"
    tifffile.imwrite(ome, px, ome=True, metadata={"PhysicalSizeX": 0.5, "PhysicalSizeXUnit": "µm"})
    assert pixel_size_of(ome) == pytest.approx(0.5)
    nm = tmp_path / "nm.ome.tif"
    tifffile.imwrite(nm, px, ome=True, metadata={"PhysicalSizeX": 250.0, "PhysicalSizeXUnit": "nm"})
    assert pixel_size_of(nm) == pytest.approx(0.25)
    svs = tmp_path / "b.tif"
    tifffile.imwrite(svs, px, description="Aperio Image Library v12 |AppMag = 40|MPP = 0.2520|")
    assert pixel_size_of(svs) == pytest.approx(0.252)
    cm = tmp_path / "c.tif"  # 40,000 pixels per cm: 0.25 µm
    tifffile.imwrite(cm, px, resolution=(40000, 40000), resolutionunit="CENTIMETER")
    assert pixel_size_of(cm) == pytest.approx(0.25)
    dpi = tmp_path / "d.tif"  # a desktop tool's 72 dpi is no microscope's scale
    tifffile.imwrite(dpi, px, resolution=(72, 72), resolutionunit="INCH")
    assert pixel_size_of(dpi) is None
    png = tmp_path / "e.png"
    png.write_bytes(b"")
    assert pixel_size_of(png) is None


def test_pixel_size_checks_and_factors():
    assert check_pixel_size(0.5, "x") == 0.5
    for bad in (0.0, -1.0, 353.0, float("nan")):
        with pytest.raises(NapariRmtError, match="x: pixel size"):
            check_pixel_size(bad, "x")
    assert scale_factor(0.5, 0.25) == 2.0 and scale_factor(0.25, 0.5) == 0.5
    assert scale_factor(0.252, 0.25) == 1.0  # within 2 %: the same scale
    assert scale_factor(None, 0.25) == 1.0 and scale_factor(0.5, None) == 1.0
    px = np.arange(30 * 41 * 3, dtype=np.uint8).reshape(30, 41, 3)
    assert resample(px, 2.0).shape == (60, 82, 3) and scaled_size(41, 30, 2.0) == (82, 60)
    assert resample(px, 0.5).shape == (15, 20, 3) and resample(px, 1.0) is px


def test_predicting_at_a_scale_maps_boxes_back_exactly():
    """A tile predicted with scale 2 gives the boxes of its x2 image, halved: the detector
    saw the resampled pixels and the boxes came back to the tile's own."""
    from napari_rmt.data import ClassList
    from napari_rmt.model import ModelConfig, build_detector
    from napari_rmt.model.predict import predict_tiles

    torch.manual_seed(0)
    model = build_detector(1, ModelConfig(backbone="resnet18")).eval()
    classes = ClassList.from_names(["nucleus"])
    rng = np.random.default_rng(0)
    px = rng.integers(0, 255, (64, 80, 3), dtype=np.uint8)
    tile = Tile(id=1, name="t", width=80, height=64, loader=lambda: px)
    big = resample(px, 2.0)
    big_tile = Tile(id=2, name="b", width=160, height=128, loader=lambda: big)
    got = predict_tiles(model, [tile], classes, store=False, scale=2.0)[0]
    want = predict_tiles(model, [big_tile], classes, store=False)[0]
    assert len(got) == len(want) > 0
    np.testing.assert_allclose(got.xyxy, want.xyxy / 2.0, atol=1e-4)
    np.testing.assert_allclose(got.scores, want.scores)


def test_predict_cli_resamples_to_the_models_pixel_size(tmp_path, capsys):
    """``predict --pixel-size 0.5`` with the bundled (0.25 µm/px) model: the image is seen
    at x2 and its boxes come back in its own pixels, as the x2 image's boxes halved; a
    model that states no pixel size refuses the option by name."""
    from PIL import Image

    from napari_rmt.cli import main
    from napari_rmt.data.sample import load_sample

    px = load_sample()[0].pixels()
    half = resample(px, 0.5)
    Image.fromarray(half).save(tmp_path / "half.png")
    Image.fromarray(resample(half, 2.0)).save(tmp_path / "twice.png")
    assert main(["predict", "--model", "nucleus", str(tmp_path / "half.png"), "--pixel-size", "0.5",
                 "--out", str(tmp_path / "a.json")]) == 0
    assert "0.5 µm/px (--pixel-size) resampled x2.00 to the model's 0.25" in capsys.readouterr().out
    assert main(["predict", "--model", "nucleus", str(tmp_path / "twice.png"), "--out", str(tmp_path / "b.json")]) == 0
    got, want = json.loads((tmp_path / "a.json").read_text()), json.loads((tmp_path / "b.json").read_text())
    assert len(got) == len(want) > 10
    np.testing.assert_allclose([r["bbox"] for r in got], [[v / 2 for v in r["bbox"]] for r in want], atol=0.01)

    from napari_rmt.data import ClassList
    from napari_rmt.model import ModelConfig, build_detector
    from napari_rmt.train import TrainConfig
    from napari_rmt.train.checkpoint import save_checkpoint

    model = build_detector(1, ModelConfig(backbone="resnet18"))
    save_checkpoint(tmp_path / "m.pt", {"config": TrainConfig(model=ModelConfig(backbone="resnet18")).to_dict(),
                                        "classes": ClassList.from_names(["a"]).to_json(),
                                        "student": model.state_dict(), "kind": "model", "predict_with": "student"})
    assert main(["predict", "--model", str(tmp_path / "m.pt"), str(tmp_path / "half.png"), "--pixel-size", "0.5",
                 "--out", str(tmp_path / "c.json")]) == 2
    assert "does not state the pixel size it was trained at" in capsys.readouterr().err
    with pytest.raises(SystemExit) as stop:  # refused while parsing, as every option's range
        main(["predict", "--model", "nucleus", str(tmp_path / "half.png"), "--pixel-size", "300",
              "--out", str(tmp_path / "d.json")])
    assert stop.value.code == 2 and "not a microscope's pixel size" in capsys.readouterr().err


def test_a_models_pixel_size_is_saved_and_read(tiny_tiles, tmp_path):
    from napari_rmt.data import ClassList
    from napari_rmt.train import TrainConfig, Trainer
    from napari_rmt.train.checkpoint import native_pixel_size, read_checkpoint

    cfg = TrainConfig.for_method("supervised", iterations=1, warmup=0, pixel_size=0.5, init="none",
                                 model={"backbone": "resnet18"})
    trainer = Trainer(tiny_tiles[:2], [], ClassList.default(), cfg)
    list(trainer.run())
    trainer.save_model(tmp_path / "m.pt")
    assert native_pixel_size(read_checkpoint(tmp_path / "m.pt")) == 0.5
    from napari_rmt.model.bundled import NUCLEUS

    assert native_pixel_size(read_checkpoint(NUCLEUS)) == 0.25  # stated for the bundled file
    with pytest.raises(NapariRmtError, match=r"pixel_size 1000.0 must be in \[0.02, 20\]"):
        TrainConfig.for_method("supervised", pixel_size=1000.0)


def test_tiles_of_another_pixel_size_are_trained_at_the_starts_scale(tiny_tiles, tmp_path):
    """20x tiles (0.5 µm/px) from the bundled 40x model: seen at x2, boxes x2, and the model
    keeps the 0.25 it learnt at, so prediction resamples 20x tiles as its start would."""
    from napari_rmt.data import ClassList
    from napari_rmt.train import TrainConfig, Trainer
    from napari_rmt.train.checkpoint import native_pixel_size, read_checkpoint

    tile = tiny_tiles[0]
    cfg = TrainConfig.for_method("supervised", iterations=1, warmup=0, pixel_size=0.5, init="nucleus",
                                 model={"backbone": "resnet18"})
    trainer = Trainer([tile], [], ClassList.default(), cfg)
    assert trainer.cfg.model_pixel_size == 0.25 and trainer.tile_scale == 2.0
    im, boxes, _ = trainer.data.labelled[0]
    assert tuple(im.shape[1:]) == (2 * tile.height, 2 * tile.width)
    np.testing.assert_allclose(boxes.numpy(), 2 * tile.boxes.xyxy[(tile.boxes.areas > 0)], rtol=1e-6)
    list(trainer.run())
    trainer.save_model(tmp_path / "m.pt")
    ckpt = read_checkpoint(tmp_path / "m.pt")
    assert native_pixel_size(ckpt) == 0.25 and ckpt["config"]["pixel_size"] == 0.5
    # a run started from that model learns at its scale too; tiles already at it are not resampled
    again = Trainer([tile], [], ClassList.default(), TrainConfig.for_method(
        "supervised", iterations=1, pixel_size=0.5, model={"backbone": "resnet18"}), init_from=tmp_path / "m.pt")
    assert again.tile_scale == 2.0
    same = Trainer([tile], [], ClassList.default(), TrainConfig.for_method(
        "supervised", iterations=1, pixel_size=0.25, init="nucleus", model={"backbone": "resnet18"}))
    assert same.tile_scale == 1.0 and same.cfg.model_pixel_size is None
    # from random init there is no start's scale: the tiles' own is the model's
    fresh = Trainer([tile], [], ClassList.default(), TrainConfig.for_method(
        "supervised", iterations=1, pixel_size=0.5, init="none", model={"backbone": "resnet18"}))
    assert fresh.tile_scale == 1.0 and fresh.cfg.own_pixel_size == 0.5
