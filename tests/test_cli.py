import json

from pycocotools.coco import COCO

from napari_rmt.cli import main


def test_demo_writes_a_coco_export_of_the_sample(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path)]) == 0
    coco = COCO(str(tmp_path / "annotations.json"))
    assert len(coco.getImgIds()) == 16 and len(coco.getAnnIds()) == 1100
    geo = json.loads((tmp_path / "annotations.geojson").read_text())
    assert len(geo["features"]) == 1100
    assert "tumor 441" in capsys.readouterr().out
