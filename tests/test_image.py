"""Preprocessing: centre crop never squashes, odd image kinds are handled, bad files are refused."""

import io

import numpy as np
import pytest
from PIL import Image

from edge.image import ImageError, centre_square, load_image, prepare, to_rgb


def bars(width, height):
    """A frame with red outer bands and a green centre square (the part a crop must keep)."""
    arr = np.zeros((height, width, 3), np.uint8)
    arr[:, :, 0] = 255
    left, top, right, bottom = centre_square(width, height)
    arr[top:bottom, left:right] = (0, 255, 0)
    return arr


@pytest.mark.parametrize("w,h", [(640, 480), (1920, 1080), (480, 640), (300, 300)])
def test_centre_crop_keeps_only_the_centre_square(w, h):
    out = prepare(bars(w, h), 224)
    assert out.shape == (224, 224, 3) and out.dtype == np.uint8
    # No red from the side bands may leak in: a squash would pull them into the border columns.
    assert out[:, :, 0].max() <= 2
    assert out[:, :, 1].min() >= 250


def test_squashing_would_have_been_visible():
    """Guard that the check above can fail: a plain resize of the same frame shows the red bands."""
    squashed = np.asarray(Image.fromarray(bars(640, 480)).resize((224, 224)))
    assert squashed[:, :5, 0].mean() > 200


def test_grayscale_rgba_and_single_channel_frames():
    gray = np.full((60, 80), 77, np.uint8)
    assert (prepare(gray, 32) == 77).all()
    assert (prepare(gray[:, :, None], 32) == 77).all()
    rgba = np.zeros((40, 40, 4), np.uint8)
    rgba[..., 3] = 0  # fully transparent: shown as white, not black
    assert (prepare(rgba, 16) == 255).all()
    pil_gray = Image.new("L", (50, 40), 10)
    assert to_rgb(pil_gray).mode == "RGB"


def test_mirror_flips_left_and_right():
    arr = np.zeros((100, 100, 3), np.uint8)
    arr[:, :50] = 200
    plain, mirrored = prepare(arr, 10), prepare(arr, 10, mirror=True)
    assert plain[:, 0].mean() > 150 and plain[:, -1].mean() < 50
    assert (mirrored == plain[:, ::-1]).all()


def test_unsupported_arrays_are_refused():
    with pytest.raises(ImageError):
        prepare(np.zeros((10, 10, 2), np.uint8), 8)
    with pytest.raises(ImageError):
        prepare(np.zeros((10, 10, 3), np.float32), 8)


def test_exif_rotation_is_applied(tmp_path):
    arr = np.zeros((20, 40, 3), np.uint8)  # stored landscape
    img = Image.fromarray(arr)
    exif = img.getexif()
    exif[0x0112] = 6  # "rotate 90 CW to display": shown portrait
    path = tmp_path / "sideways.jpg"
    img.save(path, exif=exif)
    assert load_image(path).size == (20, 40)


def test_bad_image_files_give_one_line_errors(tmp_path):
    missing = tmp_path / "nope.jpg"
    text = tmp_path / "notes.jpg"
    text.write_text("not an image\n")
    good = io.BytesIO()
    Image.new("RGB", (64, 64), (1, 2, 3)).save(good, "PNG")
    truncated = tmp_path / "cut.png"
    truncated.write_bytes(good.getvalue()[:60])
    for path in (missing, text, truncated):
        with pytest.raises(ImageError) as info:
            load_image(path)
        assert "\n" not in str(info.value) and str(path.name) in str(info.value)


def test_decompression_bomb_is_refused_before_decoding(tmp_path):
    path = tmp_path / "bomb.png"
    Image.new("1", (8000, 6000)).save(path)  # 48 Mpx, a few KB on disk
    with pytest.raises(ImageError, match="too large"):
        load_image(path)


def test_real_photo_loads(clothing):
    photo = next((clothing / "test" / "hat").iterdir())
    img = load_image(photo)
    assert img.mode == "RGB" and min(img.size) > 100
    assert prepare(img, 224).shape == (224, 224, 3)
