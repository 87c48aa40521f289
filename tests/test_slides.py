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


def test_a_synthetic_slides_objective_is_read(slide, tmp_path):
    image = open_large_image(slide.write(tmp_path / "s.svs", pixel_size=0.5))
    assert image.objective == 20.0 and image.reader == "tifffile"  # AppMag of a 0.5 µm/px slide


def test_an_mrxs_goes_to_openslide_and_says_what_is_wrong(tmp_path, monkeypatch):
    (tmp_path / "s.mrxs").write_bytes(b"")
    with pytest.raises(ImageReadError, match=r"s\.mrxs: OpenSlide cannot open it.*MRXS"):
        open_large_image(tmp_path / "s.mrxs")
    # without the slides extra: what to install, and the OME-TIFF way round
    import napari_rmt.data.openslide_reader as reader

    monkeypatch.setattr(reader, "openslide_available", lambda: False)
    with pytest.raises(ImageReadError, match=r"s\.mrxs: .*OpenSlide, which is not installed: pip install.*slides.*OME TIFF"):
        open_large_image(tmp_path / "s.mrxs")


def test_a_slide_tifffile_cannot_parse_goes_to_openslide(slide, tmp_path, monkeypatch):
    """A scanner's TIFF variant that tifffile rejects is opened, sized and scaled by OpenSlide."""
    import tifffile

    from napari_rmt.data.imageio import image_size
    from napari_rmt.data.scale import pixel_size_of

    path = slide.write(tmp_path / "s.svs", pixel_size=0.5)

    def refuse(*_a, **_k):
        raise tifffile.TiffFileError("not a TIFF variant tifffile knows")

    monkeypatch.setattr(tifffile, "imread", refuse)
    monkeypatch.setattr(tifffile, "TiffFile", refuse)
    image = open_large_image(path)
    assert image.reader == "openslide" and image.size == (1800, 1400) and image.objective == 20.0
    assert image_size(path) == (1800, 1400) and pixel_size_of(path) == pytest.approx(0.5)
    np.testing.assert_array_equal(image.read(700, 600, 64, 48), slide.region(700, 600, 64, 48))


def test_a_slide_neither_reader_opens_says_both_at_every_read_site(slide, tmp_path, monkeypatch):
    """Header, scale and pixels go through one rule: when tifffile and OpenSlide both refuse,
    each says what failed in both readers' words; without OpenSlide, tifffile's alone."""
    import openslide
    import tifffile

    import napari_rmt.data.openslide_reader as reader
    from napari_rmt.data.imageio import image_size
    from napari_rmt.data.scale import stated_scale

    path = slide.write(tmp_path / "s.svs", pixel_size=0.5)

    def refuse(*_a, **_k):
        raise tifffile.TiffFileError("not a TIFF variant tifffile knows")

    def refuse_too(*_a, **_k):
        raise openslide.OpenSlideUnsupportedFormatError("unsupported or missing image file")

    monkeypatch.setattr(tifffile, "imread", refuse)
    monkeypatch.setattr(tifffile, "TiffFile", refuse)
    monkeypatch.setattr(openslide, "OpenSlide", refuse_too)
    sites = [(image_size, "cannot read image header"), (stated_scale, "cannot read its header"),
             (open_large_image, "cannot open TIFF")]
    for read, what in sites:
        with pytest.raises(ImageReadError, match=rf"s\.svs: {what}: tifffile says TiffFileError.*OpenSlide cannot open it"):
            read(path)
    monkeypatch.setattr(reader, "openslide_available", lambda: False)
    for read, what in sites:
        with pytest.raises(ImageReadError, match=rf"s\.svs: {what} \(TiffFileError: not a TIFF variant") as err:
            read(path)
        assert "OpenSlide" not in str(err.value)


def test_openslide_reads_a_slide_as_tifffile_does(slide, tmp_path):
    """The OpenSlide path (MRXS and the slides tifffile cannot parse) on a slide both read:
    the same pixels at every level, pixel size, objective, tissue mask and boxes."""
    from napari_rmt.data.openslide_reader import open_openslide
    from napari_rmt.model.wholeimage import predict_large_image
    from napari_rmt.train import load_model

    path = slide.write(tmp_path / "s.svs", pixel_size=0.25)
    ours, theirs = open_large_image(path), open_openslide(path)
    assert theirs.reader == "openslide" and theirs.size == ours.size and len(theirs.levels) == len(ours.levels)
    assert theirs.pixel_size == pytest.approx(0.25) and theirs.objective == 40.0
    for k, (a, b) in enumerate(zip(ours.levels, theirs.levels, strict=True)):
        assert tuple(b.shape) == tuple(a.shape), k
        np.testing.assert_array_equal(np.asarray(b[5:37, 9:70]), np.asarray(a[5:37, 9:70]))
    np.testing.assert_array_equal(theirs.read(700, 600, 64, 48), slide.region(700, 600, 64, 48))
    level = theirs.levels[1]  # numpy-style indexing, as napari's multiscale layer slices
    np.testing.assert_array_equal(level[3, 4:6, 0], np.asarray(level[3:4, 4:6, :])[0, :, 0])
    with pytest.raises(IndexError):
        level[::-1]
    from napari_rmt.gui.wholeimage import overview_data  # what napari's multiscale layer gets

    pyramid, rgb = overview_data(theirs)
    assert rgb and pyramid[0].chunksize == (1024, 1024, 3)
    np.testing.assert_array_equal(pyramid[1][100:164, 200:230].compute(), np.asarray(ours.levels[1][100:164, 200:230]))
    mask_a, mask_b = tissue_mask(ours), tissue_mask(theirs)
    np.testing.assert_array_equal(mask_a.mask, mask_b.mask)
    model, classes, _ = load_model("nucleus")
    kw = dict(window=256, context=64, tissue=mask_a)
    a, b = predict_large_image(model, ours, classes, **kw), predict_large_image(model, theirs, classes, **kw)
    assert len(a) > 50
    np.testing.assert_array_equal(a.xyxy, b.xyxy)
    np.testing.assert_array_equal(a.scores, b.scores)


def test_the_tissue_mask_finds_the_tissue_and_leaves_the_glass(slide, tmp_path):
    image = open_large_image(slide.write(tmp_path / "s.svs"))
    found = tissue_mask(image)
    truth = slide.mask(0, 0, slide.width, slide.height, int(found.downsample))[: found.mask.shape[0], : found.mask.shape[1]]
    mask = found.mask[: truth.shape[0], : truth.shape[1]]
    assert (mask & truth).sum() / truth.sum() >= 0.95  # of the tissue's pixels
    assert (mask & ~truth).sum() / (~truth).sum() <= 0.05  # of the glass's
    glass = SyntheticSlide(600, 600, slide.patches, np.zeros((0, 4)))
    assert tissue_mask(open_large_image(glass.write(tmp_path / "g.svs"))).fraction == 0.0  # glass only: none


def test_a_slide_without_a_small_level_is_masked_from_its_coarsest(slide, tmp_path):
    """No level as small as the mask's side: the coarsest level is read in strips, never the
    full resolution (a 40,000 px slide took 112 s that way, 0.45 s from its 2,500 px level)."""
    from napari_rmt.data.tissue import coarse_level

    image = open_large_image(slide.write(tmp_path / "s.svs"))  # levels of 1800 and 450 px
    full = image.levels[0]

    class Unread:  # the full resolution, refusing to be read
        shape, dtype, ndim = full.shape, full.dtype, full.ndim

        def __getitem__(self, _index):
            raise AssertionError("the full resolution was read")

    image.levels[0] = image.array = Unread()
    rgb, downsample = coarse_level(image, side=300)
    assert downsample == pytest.approx(8.0) and rgb.shape == (175, 225, 3)
    np.testing.assert_array_equal(rgb, np.asarray(image.levels[1])[::2, ::2])
    image.levels[0] = image.array = full
    found = tissue_mask(image)  # and the mask from it still finds the tissue
    truth = slide.mask(0, 0, slide.width, slide.height, int(found.downsample))[: found.mask.shape[0], : found.mask.shape[1]]
    assert (found.mask[: truth.shape[0], : truth.shape[1]] & truth).sum() / truth.sum() >= 0.95


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


@pytest.mark.parametrize("scale", [1.0, 2.0])
def test_a_window_pools_only_the_proposals_that_reach_what_it_owns(slide, monkeypatch, scale):
    """Proposals clear of a window's owned region (``wholeimage.OWNED_MARGIN``) are not
    pooled, and the slide's boxes are the same to the bit: on real H&E, as the detector
    sees it and resampled (a 20x slide brought to the model's scale)."""
    from napari_rmt.data.large import LargeImage
    from napari_rmt.model import wholeimage
    from napari_rmt.model.wholeimage import predict_large_image
    from napari_rmt.train import load_model

    model, classes, _ = load_model("nucleus")
    side = 1000 if scale == 1.0 else 500
    image = LargeImage(slide.region(300, 200, side, side), name="s", axes="yxc")
    pooled: list[int] = []
    hook = model.roi_heads.box_roi_pool.register_forward_hook(lambda _m, args, _o: pooled.append(sum(len(b) for b in args[1])))
    runs = {}
    try:
        for margin in (None, wholeimage.OWNED_MARGIN):
            monkeypatch.setattr(wholeimage, "OWNED_MARGIN", margin)
            pooled.clear()
            runs[margin] = predict_large_image(model, image, classes, window=256, context=64, scale=scale), sum(pooled)
    finally:
        hook.remove()
    (every, n_every), (owned, n_owned) = runs[None], runs[wholeimage.OWNED_MARGIN]
    assert len(every) > 30 and n_owned < 0.85 * n_every
    np.testing.assert_array_equal(owned.xyxy, every.xyxy)
    np.testing.assert_array_equal(owned.scores, every.scores)
    np.testing.assert_array_equal(owned.class_ids, every.class_ids)


def test_a_slides_stated_pixel_size_brings_it_to_the_models(slide, tmp_path, capsys):
    from napari_rmt.cli import main

    path = slide.write(tmp_path / "s20.ome.tif", pixel_size=0.5, kind="ome")
    assert main(["predict", "--model", "nucleus", str(path), "--out", str(tmp_path / "p.json")]) == 0
    assert "0.5 µm/px (its file) resampled x2.00 to the model's 0.25" in capsys.readouterr().out
