"""Image loading and the one preprocessing function used for training and recognition alike.

Frames are centre-cropped to a square, never squashed: a 4:3 or 16:9 frame squashed to a square
distorts shapes, and the head would learn the distortion of one camera.
"""

from __future__ import annotations

from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

ImageLike = Union[Image.Image, np.ndarray]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".ppm", ".pgm")

# A frame larger than this is refused before decoding (a decompression bomb). 40 Mpx is far above
# any Pi camera mode we ask for and far below what would exhaust a Pi Zero's memory.
MAX_PIXELS = 40_000_000


class ImageError(ValueError):
    """An image that cannot be read or used; the message is one line for the user."""


def load_image(source: Union[str, Path, "object"]) -> Image.Image:
    """Decode a file path or binary file object into an RGB image, honouring EXIF rotation.

    Phone photos are often stored sideways with an EXIF orientation tag; applying it here means
    training photos and camera frames are seen the same way up.
    """
    name = str(source) if isinstance(source, (str, Path)) else getattr(source, "name", "<bytes>")
    try:
        with Image.open(source) as img:
            if img.width * img.height > MAX_PIXELS:
                raise ImageError(f"{name}: image too large ({img.width}x{img.height})")
            img.load()
            img = ImageOps.exif_transpose(img)
            return to_rgb(img)
    except FileNotFoundError:
        raise ImageError(f"{name}: no such file") from None
    except (UnidentifiedImageError, Image.DecompressionBombError) as exc:
        raise ImageError(f"{name}: not a readable image ({exc.__class__.__name__})") from None
    except (OSError, SyntaxError, ValueError) as exc:
        if isinstance(exc, ImageError):
            raise
        raise ImageError(f"{name}: damaged image ({exc})") from None


def to_rgb(img: ImageLike) -> Image.Image:
    """Any PIL image or array (gray HxW, HxWx1, RGB HxWx3, RGBA HxWx4) as an RGB PIL image."""
    if isinstance(img, np.ndarray):
        arr = img
        if arr.ndim == 3 and arr.shape[2] == 1:
            arr = arr[:, :, 0]
        if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (3, 4)):
            raise ImageError(f"frame has unsupported shape {arr.shape}")
        if arr.dtype != np.uint8:
            raise ImageError(f"frame has unsupported dtype {arr.dtype} (expected uint8)")
        img = Image.fromarray(np.ascontiguousarray(arr))
    if img.mode == "RGB":
        return img
    if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
        # Transparent pixels become white, as an image viewer shows them, not black.
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def centre_square(width: int, height: int) -> tuple[int, int, int, int]:
    """The largest centred square inside a width x height frame, as a PIL box."""
    side = min(width, height)
    left = (width - side) // 2
    top = (height - side) // 2
    return left, top, left + side, top + side


def prepare(img: ImageLike, size: int, mirror: bool = False) -> np.ndarray:
    """Centre square crop, resize to size x size, RGB uint8 array: the model's input.

    Crop before resizing: PIL's `resize(box=...)` lets the filter reach pixels outside the box,
    which would leak the cut-off sides into the border. The square is first box-averaged by an
    integer factor (`reducing_gap=1`), then resampled bilinearly: area-filter quality at a
    fraction of the cost of one large antialiased resize.
    """
    if isinstance(img, np.ndarray) and img.ndim == 3 and img.shape[2] == 3 and img.dtype == np.uint8:
        h, w = img.shape[:2]
        left, top, right, bottom = centre_square(w, h)
        square = Image.fromarray(np.ascontiguousarray(img[top:bottom, left:right]))
    else:
        rgb = to_rgb(img)
        if rgb.width < 1 or rgb.height < 1:
            raise ImageError("frame is empty")
        square = rgb.crop(centre_square(rgb.width, rgb.height))
    if square.width < 1:
        raise ImageError("frame is empty")
    small = square.resize((size, size), Image.BILINEAR, reducing_gap=1.0)
    if mirror:
        small = small.transpose(Image.FLIP_LEFT_RIGHT)
    return np.asarray(small, dtype=np.uint8)


def list_images(folder: Union[str, Path]) -> list[Path]:
    """Image files directly inside folder, sorted by name (hidden files skipped)."""
    folder = Path(folder)
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES)
