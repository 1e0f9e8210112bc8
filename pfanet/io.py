"""Image and mask decoding, the one place where files become arrays; and `atomic_write`, the one way the package
writes a file (outputs, weights, graphs, run state) whole or not at all."""

from __future__ import annotations

import io
import os
import pathlib
import secrets
from collections.abc import Callable

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".gif"}
# Images above this many pixels are refused before decoding (a decompression bomb would otherwise exhaust memory).
# This is the limit for files a user hands to a command (predict, evaluate, training data: 100 MP decode to 300 MB
# of RGB, one or a few at a time). The server has its own, lower default (`pfanet.serve.MAX_PIXELS`, 50 MP; `pfanet
# serve --max-pixels`), since uploads come from anyone and up to --max-queue of them are decoded at once.
MAX_PIXELS = 100_000_000
Image.MAX_IMAGE_PIXELS = None  # we check ourselves, with a clearer message than PIL's warning/error


class ImageError(ValueError):
    """An input that cannot be decoded; the message names the file and the problem."""


class ImageTooLarge(ImageError):
    """An image over the pixel limit (refused before decoding); the server answers it with 413, not 415."""


def _is_empty(source: str | os.PathLike | bytes) -> bool:
    if isinstance(source, (bytes, bytearray)):
        return not source
    try:
        return os.path.getsize(source) == 0
    except OSError:
        return False


def _open(source: str | os.PathLike | bytes, name: str, max_pixels: int) -> Image.Image:
    try:
        img = Image.open(io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source)
    except FileNotFoundError as e:
        raise ImageError(f"{name}: no such file") from e
    except IsADirectoryError as e:
        raise ImageError(f"{name}: is a directory") from e
    except UnidentifiedImageError as e:
        if _is_empty(source):  # the commonest "not an image": an interrupted copy or download
            raise ImageError(f"{name}: empty file (0 bytes)") from e
        raise ImageError(f"{name}: not an image (or an unsupported format)") from e
    except OSError as e:
        raise ImageError(f"{name}: cannot read ({e})") from e
    except Exception as e:  # a plugin's parser failing on a malformed header (PPM raises ValueError)
        raise ImageError(f"{name}: corrupt image header ({type(e).__name__}: {e})") from e
    w, h = img.size
    if w * h > max_pixels or w < 1 or h < 1:
        img.close()  # refused from the header: nothing decoded, and the file is not left open
        if w * h > max_pixels:
            raise ImageTooLarge(f"{name}: {w}x{h} = {w * h:,} pixels is over the limit of {max_pixels:,}")
        raise ImageError(f"{name}: empty image ({w}x{h})")
    return img


def _decode(img: Image.Image, name: str) -> Image.Image:
    try:
        img.load()
    except Exception as e:  # truncated or corrupt data: decoders raise OSError, ValueError, EOFError, ...
        img.close()
        raise ImageError(f"{name}: corrupt or truncated image ({e})") from e
    return img


def to_rgb(img: Image.Image) -> np.ndarray:
    """Any PIL mode -> (H, W, 3) uint8 RGB. Alpha is dropped (composited on black, as OpenCV reads it), 16-bit
    data is scaled to 8 bits, CMYK and palettes are converted."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        a = np.asarray(img, dtype=np.float64)
        top = 65535.0 if a.max() > 255 else 255.0
        a = np.clip(a / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return np.repeat(a[:, :, None], 3, axis=2)
    if img.mode == "F":
        a = np.asarray(img, dtype=np.float64)
        a = np.clip(a * (255.0 if a.max() <= 1.0 else 1.0) + 0.5, 0, 255).astype(np.uint8)
        return np.repeat(a[:, :, None], 3, axis=2)
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        img = img.convert("RGBA")
        a = np.asarray(img, dtype=np.uint16)
        return (a[:, :, :3] * a[:, :, 3:] // 255).astype(np.uint8)
    return np.asarray(img.convert("RGB"))


def load_image(source: str | os.PathLike | bytes, name: str | None = None, max_pixels: int = MAX_PIXELS
               ) -> np.ndarray:
    """Decode an image file or encoded bytes into (H, W, 3) uint8 RGB, EXIF orientation applied."""
    name = name or (str(source) if not isinstance(source, (bytes, bytearray)) else "<bytes>")
    return to_rgb(_upright(_decode(_open(source, name, max_pixels), name)))


def _upright(img: Image.Image) -> Image.Image:
    """EXIF orientation applied: photos and their masks alike, so a mask saved with its photo's tag stays on it."""
    try:
        return ImageOps.exif_transpose(img)
    except Exception:  # noqa: BLE001 -- a broken EXIF block (any error of PIL's parsers) should not lose a good image
        return img


def load_mask(path: str | os.PathLike, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Decode a ground-truth mask into (H, W) uint8 (channel 0 of a colour mask, as the official code), EXIF
    orientation applied as to images."""
    name = str(path)
    img = _upright(_decode(_open(path, name, max_pixels), name))
    if img.mode in ("L", "1", "P"):
        return np.asarray(img.convert("L"))
    return to_rgb(img)[:, :, 0]


def list_images(folder: str | os.PathLike, recursive: bool = False) -> list[pathlib.Path]:
    folder = pathlib.Path(folder)
    it = folder.rglob("*") if recursive else folder.iterdir()
    return sorted(p for p in it if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith("."))


def atomic_write(path: str | os.PathLike, content: bytes | Callable[[str], object]) -> None:
    """Write `path` whole or not at all: `content` (bytes, or a function that writes a file at the path it is given)
    goes to a temporary name beside it, renamed into place once complete.

    An interrupted run never leaves a half-written file that would count as done (`pfanet predict` skips inputs whose
    outputs exist; a resumed training reads state.pt), and a writer that raises leaves the old file, if any, as it
    was. The file gets the usual permissions (the umask's), as one written directly would.
    """
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")  # unique across threads too
    try:
        if isinstance(content, (bytes, bytearray, memoryview)):
            tmp.write_bytes(content)
        else:
            content(str(tmp))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
