"""Whole slides (issue 36): synthetic SVS and OME-TIFF slides read with their pyramid and
pixel size, a tissue mask that finds the tissue and leaves the glass, and prediction that
skips glass windows and still finds every box prediction over the whole field finds."""

from __future__ import annotations

import json

import numpy as np
import pytest

from napari_rmt.data.errors import ImageReadError
from napari_rmt.data.large import open_large_image
from napari_rmt.data.synthetic import SyntheticSlide
from napari_rmt.data.tissue import tissue_mask


@pytest.fixture(scope="module")
def slide():
    from napari_rmt.data.sample import load_sample

    patches = [t.pixels() for t in load_sample()]  # real H&E (the bundled CoNSeP sample)
    return SyntheticSlide.make(1800, 1400, patches, tissue=0.35, seed=3)


@pytest.mark.parametrize("kind, suffix", [("svs", ".svs"), ("ome", ".ome.tif")])
def test_a_synthetic_slide_opens_with_its_pyramid_and_pixel_size(slide, tmp_path, kind, suffix):
    path = slide.write(tmp_path / f"s{suffix}", pixel_size=0.5, kind=kind)
    image = open_large_image(path)
    assert image.size == (1800, 1400) and len(image.levels) == 2 and image.pixel_size == pytest.approx(0.5)
    np.testing.assert_array_equal(image.read(700, 600, 64, 48), slide.region(700, 600, 64, 48))


def test_a_slide_format_without_a_tiff_reader_is_a_clear_error(tmp_path):
    (tmp_path / "s.mrxs").write_bytes(b"")
    with pytest.raises(ImageReadError, match=r"need OpenSlide.*OME-TIFF"):
        open_large_image(tmp_path / "s.mrxs")


def test_the_tissue_mask_finds_the_tissue_and_leaves_the_glass(slide, tmp_path):
    image = open_large_image(slide.write(tmp_path / "s.svs"))
    found = tissue_mask(image)
    truth = slide.mask(0, 0, slide.width, slide.height, int(found.downsample))[: found.mask.shape[0], : found.mask.shape[1]]
    mask = found.mask[: truth.shape[0], : truth.shape[1]]
    assert (mask & truth).sum() / truth.sum() >= 0.95  # of the tissue's pixels
    assert (mask & ~truth).sum() / (~truth).sum() <= 0.05  # of the glass's
    glass = SyntheticSlide(600, 600, slide.patches, np.zeros((0, 4)))
    assert tissue_mask(open_large_image(glass.write(tmp_path / "g.svs"))).fraction == 0.0  # glass only: none


def test_predicting_a_slide_skips_glass_and_finds_the_same_boxes(slide, tmp_path, capsys):
    from napari_rmt.cli import main

    path = slide.write(tmp_path / "s.svs", pixel_size=0.25)
    assert main(["predict", "--model", "nucleus", str(path), "--window", "256", "--context", "64",
                 "--out", str(tmp_path / "t.json"), "--geojson", str(tmp_path / "qupath")]) == 0
    said = capsys.readouterr().out
    skipped = int(said.split("windows are glass")[0].split(" of ")[-2].split()[-1])
    assert "tissue on" in said and skipped > 0
    assert main(["predict", "--model", "nucleus", str(path), "--window", "256", "--context", "64", "--tissue", "off",
                 "--out", str(tmp_path / "f.json")]) == 0

    def boxes(name):
        return {(tuple(round(v, 2) for v in r["bbox"]), round(r["score"], 4))
                for r in json.loads((tmp_path / name).read_text())}

    with_mask, whole = boxes("t.json"), boxes("f.json")
    assert len(whole) > 100 and with_mask <= whole  # nothing the whole field does not find
    # the whole-slide GeoJSON QuPath opens over the slide: every box, in slide pixels, as detections
    features = json.loads((tmp_path / "qupath" / "s.geojson").read_text())["features"]
    assert len(features) == len(with_mask)
    assert {f["properties"]["objectType"] for f in features} == {"detection"}
    assert {f["properties"]["classification"]["name"] for f in features} == {"nucleus"}
    xs = [x for f in features for x, _ in f["geometry"]["coordinates"][0]]
    assert min(xs) >= 0 and max(xs) <= slide.width
    # and what only the whole field finds lies on glass: nothing of the tissue is lost
    assert all(not slide.mask(int(x + w / 2), int(y + h / 2), 1, 1)[0, 0] for (x, y, w, h), _ in whole - with_mask)


def test_a_slides_stated_pixel_size_brings_it_to_the_models(slide, tmp_path, capsys):
    from napari_rmt.cli import main

    path = slide.write(tmp_path / "s20.ome.tif", pixel_size=0.5, kind="ome")
    assert main(["predict", "--model", "nucleus", str(path), "--out", str(tmp_path / "p.json")]) == 0
    assert "0.5 µm/px (its file) resampled x2.00 to the model's 0.25" in capsys.readouterr().out
