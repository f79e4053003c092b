"""Robust image decoding and the official train / eval transforms.

Decoding never crashes on bad data: it raises `BadImage(reason)` with one of the reasons
`missing_image`, `undecodable_image`, `truncated_image`, `corrupt_image`, `decompression_bomb`,
which sources count and skip. Reading a local image file (`read_image_file`) raises
`missing_file` ("image file not found: PATH") or `unreadable_file` before any decoding.
Every colour mode comes out as RGB uint8 HWC:
  - alpha (RGBA, LA, PA, P with transparency) is composited over white,
  - 16-bit and 32-bit integer images (I;16*, I) are scaled from 0..65535 to 0..255,
  - float images (F) are clipped to 0..255, everything else (L, 1, P, CMYK, YCbCr...) uses PIL's
    own conversion.
Train transform = torchvision's RandomResizedCrop(size, scale=(0.5, 1.0), ratio=(3/4, 4/3),
BICUBIC) + RandomHorizontalFlip as in the official recipe; eval = bicubic resize to a square.
Both resize with `fast_resize` (Pillow's pixels, about twice as fast) where it applies.
"""
from __future__ import annotations

import io
import math
import warnings

import numpy as np
from PIL import Image

from owl_jax.data import fast_resize

# We enforce our own pixel limit (`max_pixels`) and skip such images; PIL's warning would only
# be noise on top of that.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)

DEFAULT_MAX_PIXELS = Image.MAX_IMAGE_PIXELS or 89_478_485
REASONS = ("missing_image", "missing_file", "unreadable_file", "undecodable_image",
           "truncated_image", "corrupt_image", "decompression_bomb")


class BadImage(Exception):
    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def read_image_file(path: str) -> bytes:
    """The bytes of a local image file. Raises BadImage `missing_file` when there is no such
    file, `unreadable_file` when it cannot be read (a directory, no permission...)."""
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise BadImage("missing_file", f"image file not found: {path}") from None
    except OSError as e:
        raise BadImage("unreadable_file",
                       f"cannot read image file {path}: {e.strerror or e}") from None


def open_image(data: bytes, max_pixels: int | None = None) -> Image.Image:
    """Opens and fully decodes `data`; returns an RGB PIL image. Raises BadImage."""
    return open_image_info(data, max_pixels)[0]


def open_image_info(data: bytes, max_pixels: int | None = None) -> tuple[Image.Image, str, str]:
    """(RGB image, stored format e.g. "JPEG", stored mode e.g. "CMYK"). Raises BadImage."""
    if not data:
        raise BadImage("missing_image", "no image bytes")
    limit = max_pixels or DEFAULT_MAX_PIXELS
    try:
        img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        raise BadImage("decompression_bomb", str(e)) from None
    except Image.UnidentifiedImageError as e:
        raise BadImage("undecodable_image", str(e)) from None
    except Exception as e:  # noqa: BLE001 - a malformed header can raise anything
        raise _classify(e) from None
    w, h = img.size
    if w * h > limit:
        raise BadImage("decompression_bomb", f"{w}x{h} = {w * h} pixels > limit {limit}")
    if w <= 0 or h <= 0:
        raise BadImage("corrupt_image", f"size {w}x{h}")
    fmt, mode = img.format or "", img.mode
    try:
        img.load()
        return to_rgb(img), fmt, mode
    except Exception as e:  # noqa: BLE001
        raise _classify(e) from None


def _classify(e: Exception) -> BadImage:
    msg = f"{type(e).__name__}: {e}"
    low = msg.lower()
    truncated = "truncated" in low or "broken data" in low
    return BadImage("truncated_image" if truncated else "corrupt_image", msg)


def to_rgb(img: Image.Image) -> Image.Image:
    mode = img.mode
    if mode == "RGB":
        return img
    if mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
        mode = img.mode
        if mode == "RGB":
            return img
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if mode.startswith("I;16") or mode == "I":
        a = np.asarray(img).astype(np.float64)
        return _gray_array_to_rgb(np.clip(np.round(a / 257.0), 0, 255))
    if mode == "F":
        return _gray_array_to_rgb(np.clip(np.round(np.asarray(img)), 0, 255))
    return img.convert("RGB")


def _gray_array_to_rgb(a: np.ndarray) -> Image.Image:
    a = a.astype(np.uint8)
    return Image.fromarray(np.repeat(a[:, :, None], 3, axis=2), "RGB")


def decode_image(data: bytes, max_pixels: int | None = None) -> np.ndarray:
    """RGB uint8 [H, W, 3]; raises BadImage."""
    return np.asarray(open_image(data, max_pixels))


def encode_jpeg(img: Image.Image, quality: int = 95) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


# ------------------------------------------------------------------------------------------
# Transforms


def resize_square(img: Image.Image, size: int) -> np.ndarray:
    """Eval transform: bicubic (antialiased) straight to size x size, uint8 HWC."""
    if img.size == (size, size):
        return np.asarray(img)
    out = fast_resize.resize_rgb(img, (size, size))
    return out if out is not None else np.asarray(img.resize((size, size), Image.BICUBIC))


def crop_box(width: int, height: int, rng: np.random.Generator,
             scale=(0.5, 1.0), ratio=(3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """torchvision RandomResizedCrop.get_params: (left, top, w, h)."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1)), w, h
    in_ratio = width / height  # fallback: central crop at the clamped aspect ratio
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        w, h = int(round(height * ratio[1])), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def random_resized_crop_flip(img: Image.Image, size: int, rng: np.random.Generator,
                             scale=(0.5, 1.0)) -> np.ndarray:
    """Train transform: RandomResizedCrop(size, scale, BICUBIC) then a horizontal flip with
    probability 1/2, drawn from `rng` (seeded per sample by the pipeline)."""
    left, top, w, h = crop_box(img.width, img.height, rng, scale)
    # crop, then resize: as torchvision does (resize(box=...) would also sample pixels outside
    # the box at its edges)
    out = fast_resize.resize_rgb(img, (size, size), (left, top, w, h))
    if out is None:
        out = np.asarray(img.crop((left, top, left + w, top + h)).resize((size, size),
                                                                         Image.BICUBIC))
    return out[:, ::-1] if rng.random() < 0.5 else out


def normalize_pixels(pixels, mean, std):
    """The model's input normalization, in one place: uint8 HWC pixels (the training batch
    ships them so) -> float32 (x / 255 - mean) / std, the same float32 operations in the same
    order as the official processor (`owl1's processor: preprocess_image`). Pixels that are
    not uint8 are taken as already normalized and returned unchanged (the processor's float32
    output, synthetic batches). numpy arrays give numpy; jax arrays and tracers give jax (the
    train step calls this inside jit, on the device)."""
    if pixels.dtype != np.uint8:
        return pixels
    if isinstance(pixels, np.ndarray):
        xp = np
    else:
        import jax.numpy as xp
    x = pixels.astype(xp.float32) / xp.float32(255)
    return (x - xp.asarray(mean, xp.float32)) / xp.asarray(std, xp.float32)
