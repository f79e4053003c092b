"""Pillow's bicubic resize of RGB images, bit for bit, at about twice its speed.

Resizing is the largest cost of the input pipeline (more than decoding a JPEG). Pillow's
`Image.resize(size, BICUBIC)` computes each output byte one at a time; `csrc/resize.cc` computes
the same integer sums with AVX2, 8 at a time, and reads Pillow's pixel buffer in place (exported
through the Arrow C data interface, Pillow >= 11.2), so a crop costs no copy either.

`resize_rgb` returns None where the fast path does not apply (not RGB, a buffer Pillow cannot
export in one piece, no AVX2 or no C++ compiler, `OWL_JAX_FAST_RESIZE=0`); the caller then uses
Pillow. Either way the pixels are the same: tests/test_fast_resize.py checks that against the
installed Pillow, whose pass order (Pillow 13 runs the vertical pass first for images that
shrink mostly in height) the kernel follows.
"""
from __future__ import annotations

import ctypes
import logging
import os
import platform
import threading

import numpy as np
from PIL import Image

from owl_jax import native

log = logging.getLogger(__name__)

FLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-std=c++17"]
_lock = threading.Lock()
_state: dict = {}  # "fn": the C function or None, "why": str (set once per process)


def _load():
    with _lock:
        if "fn" not in _state:
            fn, why = None, ""
            if os.environ.get("OWL_JAX_FAST_RESIZE", "1") == "0":
                why = "OWL_JAX_FAST_RESIZE=0"
            elif platform.machine() not in ("x86_64", "AMD64") or "avx2" not in native.cpu_flags():
                why = "the CPU has no AVX2"
            else:
                try:
                    fn = ctypes.CDLL(native.build("resize", FLAGS)).owl_resize_bicubic_rgbx
                    fn.argtypes = [ctypes.c_void_p, ctypes.c_int64] + [ctypes.c_int] * 4 + [
                        ctypes.c_void_p]
                    fn.restype = ctypes.c_int
                except (OSError, RuntimeError) as e:
                    fn, why = None, str(e)
            _state.update(fn=fn, why=why)
            if why:
                log.warning("fast resize off, Pillow's resize is used instead: %s", why)
        return _state["fn"]


def available() -> bool:
    return _load() is not None


def _rgbx(img: Image.Image) -> np.ndarray | None:
    """Pillow's own buffer of an RGB image as uint8 [H, W, 4] (RGBX), without a copy; None
    where Pillow cannot export it as one block (images of more than ~16 MB)."""
    import pyarrow as pa
    try:
        arr = pa.array(img)
    except (ValueError, TypeError, pa.ArrowException):
        return None
    values = arr.values
    buf = np.frombuffer(values.buffers()[1], np.uint8, count=4 * len(arr),
                        offset=values.offset)
    return buf.reshape(img.height, img.width, 4)


def resize_rgb(img: Image.Image, size: tuple[int, int],
               box: tuple[int, int, int, int] | None = None) -> np.ndarray | None:
    """`img.crop(box).resize(size, BICUBIC)` as uint8 [h, w, 3] (size is (w, h); box is
    (left, top, width, height), inside the image), or None where the fast path does not apply."""
    fn = _load()
    if fn is None or img.mode != "RGB" or min(*img.size, *size) <= 0:
        return None
    src = _rgbx(img)
    if src is None:
        return None
    if box is not None:
        left, top, w, h = box
        src = src[top:top + h, left:left + w]
    out = np.empty((size[1], size[0], 3), np.uint8)
    fn(src.ctypes.data, src.strides[0], src.shape[1], src.shape[0], size[0], size[1],
       out.ctypes.data)
    return out
