import numpy as np
import pytest
import tifffile
from PIL import Image

from napari_rmt.data import ImageReadError, read_image, to_uint8_rgb
from napari_rmt.data.imageio import image_size


def test_grayscale_is_repeated_into_rgb():
    g = np.array([[0, 128], [255, 7]], dtype=np.uint8)
    out = to_uint8_rgb(g)
    assert out.shape == (2, 2, 3) and out.dtype == np.uint8
    assert (out[..., 0] == g).all() and (out[..., 2] == g).all()


def test_rgba_is_composited_over_white():
    a = np.zeros((1, 2, 4), dtype=np.uint8)
    a[0, 0] = [255, 0, 0, 255]  # opaque red stays red
    a[0, 1] = [0, 0, 0, 0]  # fully transparent becomes white
    out = to_uint8_rgb(a)
    assert out[0, 0].tolist() == [255, 0, 0]
    assert out[0, 1].tolist() == [255, 255, 255]
    half = to_uint8_rgb(np.array([[[0, 0, 0, 128]]], dtype=np.uint8))
    assert half[0, 0].tolist() == [127, 127, 127]  # 255 * (1 - 128/255), rounded


def test_16bit_is_scaled_by_dtype_range_not_stretched():
    a = np.array([[0, 257, 65535, 32896]], dtype=np.uint16)
    assert to_uint8_rgb(a)[0, :, 0].tolist() == [0, 1, 255, 128]


def test_float_rules():
    assert to_uint8_rgb(np.array([[0.0, 0.5, 1.0]]))[0, :, 0].tolist() == [0, 128, 255]
    assert to_uint8_rgb(np.array([[0.0, 100.0, 300.0]]))[0, :, 0].tolist() == [0, 100, 255]
    with pytest.raises(ImageReadError, match="NaN"):
        to_uint8_rgb(np.array([[np.nan, 1.0]]))


def test_channel_first_is_moved():
    a = np.zeros((3, 10, 12), dtype=np.uint8)
    a[1] = 200
    out = to_uint8_rgb(a)
    assert out.shape == (10, 12, 3) and (out[..., 1] == 200).all()


def test_bad_layout_names_the_file():
    with pytest.raises(ImageReadError, match=r"tile\.tif: cannot use an image of shape \(2, 3, 4, 5\)"):
        to_uint8_rgb(np.zeros((2, 3, 4, 5)), where="tile.tif")


@pytest.mark.parametrize("mode", ["L", "LA", "RGBA", "P", "I;16", "1"])
def test_png_modes_read_as_rgb(tmp_path, mode):
    rng = np.random.default_rng(1)
    rgb = Image.fromarray(rng.integers(0, 256, (9, 7, 3), dtype=np.uint8))
    if mode == "I;16":
        im = Image.fromarray(rng.integers(0, 65536, (9, 7), dtype=np.uint16))
    else:
        im = rgb.convert(mode)
    p = tmp_path / f"x_{mode.replace(';', '')}.png"
    im.save(p)
    out = read_image(p)
    assert out.shape == (9, 7, 3) and out.dtype == np.uint8
    assert image_size(p) == (7, 9)


def test_tiff_16bit_rgb_and_size(tmp_path):
    a = np.full((6, 5, 3), 65535, dtype=np.uint16)
    a[0, 0] = [0, 257, 514]
    p = tmp_path / "x.tif"
    tifffile.imwrite(p, a)
    out = read_image(p)
    assert out[0, 0].tolist() == [0, 1, 2] and out[1, 1].tolist() == [255, 255, 255]
    assert image_size(p) == (5, 6)


def test_missing_and_corrupt_files_name_the_file(tmp_path):
    with pytest.raises(ImageReadError, match=r"nope\.png: image file not found"):
        read_image(tmp_path / "nope.png")
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\nthis is not a png")
    with pytest.raises(ImageReadError, match=r"broken\.png: cannot read image"):
        read_image(bad)
    with pytest.raises(ImageReadError, match="is a folder"):
        read_image(tmp_path)


def test_wide_integers_holding_8_or_16_bit_pixels_are_not_read_as_black():
    """Issue 33: a signed int64 zarr of 0..255 pixels was read as all black (scaled by 2**63)."""
    import warnings

    from napari_rmt.data.errors import DataWarning

    for dtype in (np.int64, np.int32, np.uint32, np.uint64):
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            out = to_uint8_rgb(np.array([[0, 128, 255]], dtype=dtype))
        assert out[0, :, 0].tolist() == [0, 128, 255]
        assert any(issubclass(w.category, DataWarning) and "8-bit" in str(w.message) for w in seen)
    with pytest.warns(DataWarning, match="12-bit"):
        assert to_uint8_rgb(np.array([[0, 4095]], dtype=np.int64))[0, :, 0].tolist() == [0, 255]
