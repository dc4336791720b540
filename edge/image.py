"""Image loading and the one preprocessing function used for training and recognition alike.

Frames are centre-cropped to a square, never squashed: a 4:3 or 16:9 frame squashed to a square
distorts shapes, and the head would learn the distortion of one camera.
"""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path
from typing import Optional, Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

ImageLike = Union[Image.Image, np.ndarray]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".ppm", ".pgm")

# A frame larger than this is refused before decoding (a decompression bomb). 40 Mpx is far above
# any Pi camera mode we ask for and far below what would exhaust a Pi Zero's memory.
MAX_PIXELS = 40_000_000
# What a frame may take once decoded, after the reduction its format allows (a JPEG's DCT scaling,
# an 8-bit PNG's strips): a WebP, GIF, BMP, 16-bit or interlaced PNG, or a long thin picture is
# decoded (nearly) whole, at 4 to 15 bytes a pixel. 4 Mpx keeps that under ~60 MiB.
MAX_DECODED_PIXELS = 4_000_000
# A progressive JPEG keeps every DCT coefficient of the whole picture while it decodes, whatever
# the scale (about 3 bytes a pixel): 16 Mpx is a 12 Mpx phone photo with room to spare.
MAX_PROGRESSIVE_PIXELS = 16_000_000


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class ImageError(ValueError):
    """An image that cannot be read or used; the message is one line for the user."""


def load_image(source: Union[str, Path, "object"], min_side: Optional[int] = None) -> Image.Image:
    """Decode a file path or binary file object into an RGB image, honouring EXIF rotation.

    Phone photos are often stored sideways with an EXIF orientation tag; applying it here means
    training photos and camera frames are seen the same way up. With `min_side` (the model's
    input size) a large image comes back reduced by a whole factor, its short side still at least
    `min_side`: a JPEG is decoded at 1/2, 1/4 or 1/8 scale by its own DCT, anything else is
    converted to RGB and box-averaged a strip at a time, so no full-size RGB frame is ever built.
    The aspect ratio is kept, so the centre square `prepare` cuts is the same part of the picture.
    """
    name = str(source) if isinstance(source, (str, Path)) else getattr(source, "name", "<bytes>")
    try:
        with Image.open(source) as img:
            if img.width * img.height > MAX_PIXELS:
                raise ImageError(f"{name}: image too large ({img.width}x{img.height})")
            if min_side:
                img = _decode_reduced(img, int(min_side))
            else:
                img.load()
            img = ImageOps.exif_transpose(img)
            return to_rgb(img)
    except FileNotFoundError:
        raise ImageError(f"{name}: no such file") from None
    except (UnidentifiedImageError, Image.DecompressionBombError) as exc:
        raise ImageError(f"{name}: not a readable image ({exc.__class__.__name__})") from None
    except (OSError, SyntaxError, ValueError, zlib.error) as exc:
        if isinstance(exc, ImageError):
            if str(exc).startswith(name):
                raise
            raise ImageError(f"{name}: {exc}") from None
        raise ImageError(f"{name}: damaged image ({exc})") from None


# Bytes of decoded rows per strip (a whole number of reduced rows): small enough that the few
# copies of one strip stay a few MB, large enough that the per-strip overhead does not show.
STRIP_BYTES = 1 << 20


def strip_rows(row_bytes: int, factor: int) -> int:
    return factor * max(1, STRIP_BYTES // max(1, row_bytes * factor))


def reduction(width: int, height: int, min_side: int) -> int:
    """The largest whole factor that keeps the short side at least min_side (1: none)."""
    return max(1, min(width, height) // max(1, min_side))


def _decode_reduced(img: Image.Image, min_side: int) -> Image.Image:
    """The opened image decoded and reduced (see load_image); RGB unless it needs no reduction."""
    factor = reduction(img.width, img.height, min_side)
    size = f"{img.width}x{img.height}"
    if -(-img.width // factor) * -(-img.height // factor) > MAX_DECODED_PIXELS:
        raise ImageError(f"image too long and thin to use ({size})")
    if factor > 1 and img.format == "PNG":
        reduced = _png_reduced(img, factor)
        if reduced is not None:
            return reduced
    if img.format == "JPEG":
        if img.info.get("progressive") and img.width * img.height > MAX_PROGRESSIVE_PIXELS:
            raise ImageError(f"progressive JPEG too large ({size}, at most {MAX_PROGRESSIVE_PIXELS // 10**6} Mpx)")
        if factor > 1:
            # draft picks the smallest DCT scale whose result is still at least the requested size.
            img.draft("RGB", (-(-img.width // factor), -(-img.height // factor)))
            factor = reduction(img.width, img.height, min_side)
    if img.width * img.height > MAX_DECODED_PIXELS:
        kind = "16-bit or interlaced PNG" if img.format == "PNG" else str(img.format)
        raise ImageError(f"{kind} too large to decode ({size}, at most {MAX_DECODED_PIXELS // 10**6} Mpx; "
                         f"JPEG and 8-bit PNG up to {MAX_PIXELS // 10**6} Mpx)")
    img.load()
    if factor == 1:
        return img
    out = Image.new("RGB", (-(-img.width // factor), -(-img.height // factor)))
    step = strip_rows(img.width * len(img.getbands()), factor)
    for top in range(0, img.height, step):
        strip = img.crop((0, top, img.width, min(img.height, top + step)))
        out.paste(to_rgb(strip).reduce(factor), (0, top // factor))
    exif = img.getexif()
    if exif:
        out.info["exif"] = exif.tobytes()   # exif_transpose reads the orientation from here
    return out


def _png_chunks(data: bytes):
    """(type, body) of each chunk of a PNG file; stops at IEND or at a truncated chunk."""
    pos = 8
    while pos + 8 <= len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        kind = data[pos + 4:pos + 8]
        body = data[pos + 8:pos + 8 + length]
        if len(body) < length:
            raise ImageError("damaged image (truncated PNG chunk)")
        yield kind, body
        if kind == b"IEND":
            return
        pos += 12 + length


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _png_reduced(img: Image.Image, factor: int) -> Optional[Image.Image]:
    """A non-interlaced 8-bit PNG decoded a strip of rows at a time and reduced by `factor`,
    never holding more than one strip decoded; None for PNGs this cannot do (the caller then
    decodes them whole, which MAX_PIXELS bounds).

    Each strip becomes a small PNG of its own: the row above it (already unfiltered, filter 0)
    then the strip's filtered rows as the file has them, so PIL's own decoder undoes the filters.
    """
    fp = getattr(img, "fp", None)
    if fp is None:
        return None
    fp.seek(0)
    data = fp.read()
    header, palette, idat, exif = None, [], [], None
    for kind, body in _png_chunks(data):
        if kind == b"IHDR":
            header = body
        elif kind in (b"PLTE", b"tRNS"):
            palette.append(_chunk(kind, body))
        elif kind == b"IDAT":
            idat.append(body)
        elif kind == b"eXIf":
            exif = body
    if header is None or len(header) != 13:
        return None
    width, height, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", header)
    channels = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}.get(colour)
    if depth != 8 or interlace or channels is None:
        return None
    stride = width * channels
    rows = strip_rows(stride, factor)
    out = Image.new("RGB", (-(-width // factor), -(-height // factor)))
    inflate = zlib.decompressobj()
    pending, parts = b"", iter(idat)
    previous = bytes(stride)
    for top in range(0, height, rows):
        n = min(rows, height - top)
        need = n * (stride + 1)
        while len(pending) < need:
            feed = inflate.unconsumed_tail or next(parts, None)
            if feed is None:
                raise ImageError("damaged image (PNG data ends early)")
            pending += inflate.decompress(feed, need - len(pending))
        raw, pending = b"\0" + previous + pending[:need], pending[need:]
        mini = (PNG_SIGNATURE + _chunk(b"IHDR", struct.pack(">IIBBBBB", width, n + 1, 8, colour, 0, 0, 0))
                + b"".join(palette) + _chunk(b"IDAT", zlib.compress(raw, 0)) + _chunk(b"IEND", b""))
        with Image.open(io.BytesIO(mini)) as part:
            part.load()
            previous = part.crop((0, n, width, n + 1)).tobytes()
            strip = part.crop((0, 1, width, n + 1))
            strip.info.update(part.info)
        out.paste(to_rgb(strip).reduce(factor), (0, top // factor))
    if exif:
        out.info["exif"] = b"Exif\x00\x00" + exif
    return out


def shrink_frame(frame: np.ndarray, min_side: int) -> np.ndarray:
    """A camera frame (RGB uint8 array) box-averaged by a whole factor, short side >= min_side:
    for sources that cannot deliver frames near the model's size themselves."""
    factor = reduction(frame.shape[1], frame.shape[0], min_side)
    if factor == 1:
        return frame
    return np.asarray(Image.fromarray(np.ascontiguousarray(frame)).reduce(factor))


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

    A frame whose centre square already is size x size (what the Pi camera's ISP delivers, see
    edge.camera.isp_size) is only cut out and copied: PIL's resize to the same size is a copy
    too, so the result is the same array, without two PIL copies per frame (0.24 ms vs 0.03 ms
    on a cache the invoke just emptied, benchmarks/README.md).
    """
    if isinstance(img, np.ndarray) and img.ndim == 3 and img.shape[2] == 3 and img.dtype == np.uint8:
        h, w = img.shape[:2]
        left, top, right, bottom = centre_square(w, h)
        crop = img[top:bottom, left:right]
        if right - left == size:
            return np.array(crop[:, ::-1] if mirror else crop, order="C")   # a copy, never a view
        square = Image.fromarray(np.ascontiguousarray(crop))
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
