"""The one image loader: first frame, EXIF orientation, 16-bit scaled, transparency on white, RGB; bad files are
InputErrors (one error record each), never crashes."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from llavanext_cli.errors import InputError
from llavanext_cli.io.images import load_image

from conftest import EXAMPLES, TEST_IMAGES


def test_photo_is_rgb():
    image = load_image(EXAMPLES / "rocket.jpg")
    assert image.mode == "RGB" and image.size == Image.open(EXAMPLES / "rocket.jpg").size


def test_grey_becomes_rgb():
    image = load_image(TEST_IMAGES / "camera.png")
    grey = np.asarray(Image.open(TEST_IMAGES / "camera.png"))
    assert image.mode == "RGB" and (np.asarray(image)[..., 0] == grey).all()


def test_animated_gif_and_multipage_tiff_give_their_first_frame():
    for name in ("no_time_for_that_tiny.gif", "multipage.tif"):
        with Image.open(TEST_IMAGES / name) as source:
            assert source.n_frames > 1
            source.seek(0)
            first = np.asarray(source.convert("RGB"))
        assert (np.asarray(load_image(TEST_IMAGES / name)) == first).all()


def test_transparency_is_composited_on_white():
    with Image.open(TEST_IMAGES / "horse.png") as source:
        assert "A" in source.mode or "transparency" in source.info
        alpha = np.asarray(source.convert("RGBA"))[..., 3]
    pixels = np.asarray(load_image(TEST_IMAGES / "horse.png"))
    assert (pixels[alpha == 0] == 255).all()


def test_exif_orientation_is_applied(tmp_path):
    source = Image.new("RGB", (40, 20), "red")
    source.paste(Image.new("RGB", (20, 20), "blue"), (0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    source.save(tmp_path / "rotated.jpg", exif=exif, quality=95)
    image = load_image(tmp_path / "rotated.jpg")
    assert image.size == (20, 40)


def test_sixteen_bit_is_scaled_not_clipped(tmp_path):
    eight = np.asarray(Image.open(TEST_IMAGES / "camera.png"), dtype=np.uint16)
    Image.fromarray(eight * 257).save(tmp_path / "wide.png")  # full-range 16-bit
    assert Image.open(tmp_path / "wide.png").mode.startswith("I")
    assert (np.asarray(load_image(tmp_path / "wide.png"))[..., 0] == eight).all()


def test_cmyk_jpeg(tmp_path):
    Image.open(EXAMPLES / "rocket.jpg").convert("CMYK").save(tmp_path / "cmyk.jpg")
    assert load_image(tmp_path / "cmyk.jpg").mode == "RGB"


@pytest.mark.parametrize("content,message", [
    (b"", "empty file"),
    (b"this is not an image at all", "not an image"),
    ((EXAMPLES / "rocket.jpg").read_bytes()[:2000], "cannot decode"),
])
def test_bad_files_are_input_errors(tmp_path, content, message):
    path = tmp_path / "bad.jpg"
    path.write_bytes(content)
    with pytest.raises(InputError, match=message):
        load_image(path)


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        load_image(tmp_path / "missing.png")
    with pytest.raises(InputError, match="directory"):
        load_image(tmp_path)


def test_over_the_pixel_limit(tmp_path, monkeypatch):
    Image.new("RGB", (200, 200)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)
    with pytest.raises(InputError, match="too large"):
        load_image(tmp_path / "big.png")


def test_a_bug_in_the_tools_own_conversion_is_not_an_input_error(monkeypatch):
    """Whatever Pillow raises on hostile bytes is an input error; an exception from the tool's own code is a bug,
    and stays one."""
    from llavanext_cli.io import images

    def broken(image):
        raise TypeError("the tool's own bug")

    monkeypatch.setattr(images, "_to_rgb", broken)
    with pytest.raises(TypeError, match="own bug"):
        load_image(EXAMPLES / "rocket.jpg")

