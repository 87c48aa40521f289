"""Large images: the grid, lazy readers, window tiles, stitched whole-image prediction."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image
from scipy import ndimage

from napari_rmt.data import ClassList, TileSet, read_coco, write_coco
from napari_rmt.data.boxstore import read_boxes_zarr, write_boxes_zarr
from napari_rmt.data.errors import ImageReadError, NapariRmtError
from napari_rmt.data.large import (
    LargeImage,
    cached_large_image,
    open_large_image,
    tile_grid,
    write_zarr_image,
)
from napari_rmt.data.tiles import TileStatus, grid_tiles
from napari_rmt.model.wholeimage import predict_large_image, predict_whole_at_once


# ------------------------------------------------------------------ grid
def _owned_cover(windows, width, height) -> np.ndarray:
    cover = np.zeros((height, width), dtype=np.int32)
    for w in windows:
        x0, y0, x1, y1 = w.owned
        cover[y0:y1, x0:x1] += 1
    return cover


@pytest.mark.parametrize(
    ("width", "height", "tile", "overlap"),
    [(1000, 1000, 256, 64), (100, 70, 256, 64), (257, 256, 256, 0), (513, 300, 128, 32), (1, 1, 16, 5)],
)
def test_grid_covers_image_and_owned_regions_partition_it(width, height, tile, overlap):
    windows = tile_grid(width, height, tile, overlap)
    seen = np.zeros((height, width), dtype=bool)
    for w in windows:
        assert w.x % (tile - overlap) == 0 and w.y % (tile - overlap) == 0
        assert 0 < w.width <= tile and 0 < w.height <= tile
        assert w.x + w.width <= width and w.y + w.height <= height
        seen[w.y : w.y + w.height, w.x : w.x + w.width] = True
        x0, y0, x1, y1 = w.owned
        # a window owns only pixels it reads
        assert w.x <= x0 < x1 <= w.x + w.width and w.y <= y0 < y1 <= w.y + w.height
    assert seen.all()
    assert (_owned_cover(windows, width, height) == 1).all()


def test_grid_odd_sizes():
    # smaller than a tile: one window of the image's size
    (w,) = tile_grid(100, 70, 256, 64)
    assert (w.x, w.y, w.width, w.height, w.owned) == (0, 0, 100, 70, (0, 0, 100, 70))
    # not a multiple of the stride: the last column is narrower, not shifted
    ws = tile_grid(1000, 256, 256, 64)
    assert [w.x for w in ws] == [0, 192, 384, 576, 768]
    assert ws[-1].width == 1000 - 768
    # exactly one tile
    assert len(tile_grid(256, 256, 256, 64)) == 1


@pytest.mark.parametrize(("tile", "overlap"), [(0, 0), (256, 256), (256, -1), (256, 300)])
def test_grid_rejects_bad_settings(tile, overlap):
    with pytest.raises(NapariRmtError, match="tile grid"):
        tile_grid(100, 100, tile, overlap)


# ------------------------------------------------------------------ readers
@pytest.fixture
def rgb() -> np.ndarray:
    rng = np.random.default_rng(1)
    return rng.integers(0, 256, size=(300, 410, 3), dtype=np.uint8)


def test_tiff_zarr_png_and_ome_zarr_read_the_same_windows(tmp_path, rgb):
    import zarr

    tifffile.imwrite(tmp_path / "a.tif", rgb, tile=(128, 128))
    Image.fromarray(rgb).save(tmp_path / "a.png")
    write_zarr_image(rgb, tmp_path / "a.zarr", chunks=64)
    # OME-Zarr: channel-first (c, y, x) with a second, coarser level
    g = zarr.open_group(str(tmp_path / "ome.zarr"), mode="w")
    create = getattr(g, "create_array", None) or g.create_dataset
    full = np.moveaxis(rgb, -1, 0)
    a0 = create("0", shape=full.shape, chunks=(3, 128, 128), dtype="u1")
    a0[...] = full
    a1 = create("1", shape=(3, 150, 205), chunks=(3, 128, 128), dtype="u1")
    a1[...] = full[:, ::2, ::2]
    g.attrs["multiscales"] = [
        {
            "version": "0.4",
            "axes": [{"name": "c", "type": "channel"}, {"name": "y"}, {"name": "x"}],
            "datasets": [{"path": "0"}, {"path": "1"}],
        }
    ]
    for name in ("a.tif", "a.png", "a.zarr", "ome.zarr"):
        img = open_large_image(tmp_path / name)
        assert img.size == (410, 300), name
        np.testing.assert_array_equal(img.read(17, 33, 100, 50), rgb[33:83, 17:117], err_msg=name)
        np.testing.assert_array_equal(img.read(0, 0, 410, 300), rgb, err_msg=name)
    assert len(open_large_image(tmp_path / "ome.zarr").levels) == 2


def test_float_and_16_bit_large_images_follow_the_tile_rule(tmp_path):
    a = np.zeros((40, 50), dtype=np.float32)
    a[30:, 40:] = 255.0  # the maximum is far from the first window: the scale is the image's
    img = LargeImage(a, name="f")
    assert img.read(0, 0, 10, 10).max() == 0
    assert img.read(40, 30, 10, 10).min() == 255
    b = np.full((3, 20, 20), 65535, dtype=np.uint16)
    assert LargeImage(b).read(0, 0, 5, 5).min() == 255


def test_large_image_errors_name_the_problem(tmp_path):
    with pytest.raises(ImageReadError, match="not found"):
        open_large_image(tmp_path / "nope.tif")
    (tmp_path / "x.txt").write_text("hello")
    with pytest.raises(ImageReadError, match="not a known image type"):
        open_large_image(tmp_path / "x.txt")
    (tmp_path / "bad.tif").write_bytes(b"not a tiff")
    with pytest.raises(ImageReadError, match=r"bad\.tif: cannot open TIFF"):
        open_large_image(tmp_path / "bad.tif")
    with pytest.raises(ImageReadError, match="only 2D"):
        LargeImage(np.zeros((2, 1, 10, 10, 3)), axes="tzyxc")
    with pytest.raises(ImageReadError, match="channels"):
        LargeImage(np.zeros((10, 10, 7)), axes="yxc")
    with pytest.raises(NapariRmtError, match="outside"):
        LargeImage(np.zeros((10, 10, 3), np.uint8)).read(5, 5, 10, 10)
    import zarr

    zarr.open_group(str(tmp_path / "g.zarr"), mode="w")
    with pytest.raises(ImageReadError, match="multiscales"):
        open_large_image(tmp_path / "g.zarr")


def test_grid_tiles_join_a_tileset_and_round_trip_through_coco(tmp_path, rgb):
    tifffile.imwrite(tmp_path / "big.tif", rgb)
    tiles = grid_tiles(tmp_path / "big.tif", tile=128, overlap=16)
    assert len(tiles) == 3 * 4
    for t in tiles:
        x, y = t.origin
        np.testing.assert_array_equal(t.pixels(), rgb[y : y + t.height, x : x + t.width])
    tiles[5].status = TileStatus.LABELLED
    ts = TileSet(tiles, ClassList.default())
    out = write_coco(ts, tmp_path / "ann.json")
    rec = json.loads(out.read_text())["images"][5]
    assert rec["napari_rmt_window"] is True and rec["napari_rmt_origin"] == list(tiles[5].origin)
    cached_large_image.cache_clear()
    back = read_coco(out)
    assert [t.origin for t in back] == [t.origin for t in tiles]
    assert back[5].status is TileStatus.LABELLED and back[5].window
    np.testing.assert_array_equal(back[5].pixels(), tiles[5].pixels())
    # an in-memory image (a napari layer) gives loader tiles
    mem = grid_tiles(LargeImage(rgb, name="layer"), tile=128, overlap=16)
    np.testing.assert_array_equal(mem[7].pixels(), tiles[7].pixels())


# ------------------------------------------------------------------ stitching
class BlobDetector(torch.nn.Module):
    """A detector whose answer for a cell depends only on the cell's own pixels: bright
    blobs become boxes, score from their brightness. With it, windowed prediction must
    equal the whole-image pass exactly, which isolates the stitching rule."""

    def forward(self, images):
        out = []
        for im in images:
            mask = im.mean(0).numpy() > 0.5
            lab, n = ndimage.label(mask)
            boxes, scores = [], []
            for k, sl in enumerate(ndimage.find_objects(lab), start=1):
                ys, xs = sl
                boxes.append([xs.start, ys.start, xs.stop, ys.stop])
                scores.append(float(im[0][lab == k].mean()))
            out.append(
                {
                    "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
                    "scores": torch.tensor(scores, dtype=torch.float32),
                    "labels": torch.ones(n, dtype=torch.int64),
                }
            )
        return out


def _blob_image(width: int, height: int, seed: int = 0) -> tuple[np.ndarray, int]:
    rng = np.random.default_rng(seed)
    im = np.zeros((height, width, 3), dtype=np.uint8)
    n = 0
    for _ in range(width * height // 900):
        s = int(rng.integers(6, 20))
        x, y = int(rng.integers(0, width - s)), int(rng.integers(0, height - s))
        if im[max(0, y - 2) : y + s + 2, max(0, x - 2) : x + s + 2].any():
            continue  # keep blobs apart so each is one cell
        im[y : y + s, x : x + s] = int(rng.integers(160, 256))
        n += 1
    return im, n


def _same(a, b) -> bool:
    ia, ib = np.lexsort(a.xyxy.T[::-1]), np.lexsort(b.xyxy.T[::-1])
    return len(a) == len(b) and np.allclose(a.xyxy[ia], b.xyxy[ib])


@pytest.mark.parametrize(
    ("width", "height", "window", "overlap"),
    [(1000, 1000, 256, 64), (517, 389, 128, 32), (100, 60, 256, 64), (300, 300, 96, 40), (700, 500, 128, 0)],
)
@pytest.mark.parametrize("context", [0, 64])
def test_stitched_blobs_equal_the_whole_image_pass(width, height, window, overlap, context):
    if overlap // 2 + context < 16:
        pytest.skip("no margin for cut cells")
    pixels, n = _blob_image(width, height, seed=width)
    classes = ClassList.from_names(["cell"])
    model = BlobDetector()
    whole = predict_whole_at_once(model, pixels, classes, score_threshold=0.0)
    assert len(whole) == n
    stitched = predict_large_image(
        model,
        LargeImage(pixels),
        classes,
        window=window,
        overlap=overlap,
        context=context,
        batch_size=3,
        score_threshold=0.0,
    )
    assert _same(stitched, whole)


def test_cut_cells_and_duplicates_at_borders():
    """A cell straddling a window border: one whole box, never the two halves."""
    pixels = np.zeros((256, 512, 3), dtype=np.uint8)
    pixels[100:116, 184:200] = 220  # across x = 192 (a window edge for window 256, overlap 64)
    pixels[40:52, 250:262] = 200  # inside the overlap, near the owned border at x = 224
    classes = ClassList.from_names(["cell"])
    got = predict_large_image(
        BlobDetector(), LargeImage(pixels), classes, window=256, overlap=64, context=0, score_threshold=0.0
    )
    assert sorted(map(tuple, got.xyxy.tolist())) == [(184, 100, 200, 116), (250, 40, 262, 52)]


class JitterDetector(BlobDetector):
    """Like BlobDetector, but windows see a cell a pixel apart depending on where they
    start (as a CNN near a window edge might), so both windows keep it by the centre
    rule and only the border NMS can remove the duplicate."""

    def forward(self, images):
        out = super().forward(images)
        for im, det in zip(images, out, strict=True):
            if im.shape[-1] >= 200:  # full-width windows see their cells 4 px to the left
                det["boxes"][:, [0, 2]] -= 4
        return out


def test_border_nms_removes_cells_seen_twice():
    pixels = np.zeros((128, 300, 3), dtype=np.uint8)
    # centre x = 227: the first window sees it at 223 (its own side of the owned border at
    # x = 224), the second at 227 (its side): both keep it
    pixels[50:66, 219:235] = 220
    got = predict_large_image(
        JitterDetector(),
        LargeImage(pixels),
        ClassList.from_names(["cell"]),
        window=256,
        overlap=64,
        context=0,
        score_threshold=0.0,
    )
    assert len(got) == 1


def test_whole_image_boxes_in_zarr_round_trip(tmp_path):
    pixels, _ = _blob_image(300, 200)
    classes = ClassList.from_names(["cell"])
    boxes = predict_large_image(BlobDetector(), LargeImage(pixels), classes, window=128, overlap=32)
    p = write_boxes_zarr(boxes, tmp_path / "pred.zarr", classes, (300, 200), source="x")
    back, cls, size = read_boxes_zarr(p)
    assert size == (300, 200) and cls.names == ["cell"]
    np.testing.assert_allclose(back.xyxy, boxes.xyxy, atol=1e-4)
    np.testing.assert_allclose(back.scores, boxes.scores, atol=1e-6)


def test_prediction_rejects_windows_without_context():
    with pytest.raises(NapariRmtError, match="context"):
        predict_large_image(
            BlobDetector(),
            LargeImage(np.zeros((10, 10, 3), np.uint8)),
            ClassList.default(),
            overlap=0,
            context=0,
        )


def test_boxes_between_image_and_window():
    from napari_rmt.data import Boxes
    from napari_rmt.data.boxes import boxes_in_window, boxes_to_image

    b = Boxes(
        xyxy=[[10, 10, 20, 20], [95, 5, 105, 15], [98, 5, 108, 15], [300, 300, 310, 310]],
        class_ids=[1, 2, 1, 1],
    )
    got = boxes_in_window(b, 0, 0, 100, 100)
    # whole box kept; half-visible box clipped and kept; 20 % sliver and outside box left out
    np.testing.assert_array_equal(got.xyxy, [[10, 10, 20, 20], [95, 5, 100, 15]])
    np.testing.assert_array_equal(got.class_ids, [1, 2])
    shifted = boxes_in_window(b, 90, 0, 100, 100)
    np.testing.assert_array_equal(boxes_to_image(shifted, (90, 0)).xyxy[0], [95, 5, 105, 15])


def test_an_objectness_floor_lifts_every_count_limit():
    """Counts are global to an input (a whole image would lose cells a window keeps);
    with a floor, no count per input binds (a count per cell of the input may)."""
    from napari_rmt.model import ModelConfig, build_detector
    from napari_rmt.model.options import detecting
    from napari_rmt.model.wholeimage import detect_options

    torch.manual_seed(0)
    model = build_detector(1, ModelConfig(backbone="resnet18")).eval()
    image = [torch.rand(3, 256, 256)]
    with torch.no_grad():
        batch, _ = model.transform(image)
        feats = model.backbone(batch.tensors)
        counted, _ = model.rpn(batch, feats)
        with detecting(detect_options(per_image=10, objectness=0.0, per_cell=1 << 20)):
            floored, _ = model.rpn(batch, feats)
        with detecting(detect_options(per_image=1000, objectness=None)):
            raised, _ = model.rpn(batch, feats)
    assert len(counted[0]) == model.rpn.post_nms_top_n() == 300
    assert len(floored[0]) > 1000
    assert len(raised[0]) == 1000
    assert model.rpn.post_nms_top_n() == 300  # the call's options end with it; the model never changed


def test_a_damaged_zarr_chunk_is_a_clear_error(tmp_path, capsys):
    """Issue 33: a zarr whose chunk holds garbage raised the codec's error with a traceback."""
    from napari_rmt.cli import main
    from napari_rmt.data.errors import ImageReadError
    from napari_rmt.data.large import open_large_image, write_zarr_image

    store = tmp_path / "img.zarr"
    write_zarr_image(np.full((300, 300, 3), 200, np.uint8), store)
    chunks = [p for p in store.rglob("*") if p.is_file() and not p.name.startswith((".", "zarr"))]
    assert chunks
    for c in chunks:
        c.write_bytes(b"\x00garbage" * 7)
    with pytest.raises(ImageReadError, match=r"cannot be read.*damaged"):
        open_large_image(store).read(0, 0, 64, 64)
    rc = main(["predict", "--model", "nucleus", str(store), "--out", str(tmp_path / "p.json")])
    err = capsys.readouterr().err
    assert rc == 2 and "cannot be read" in err and "Traceback" not in err
