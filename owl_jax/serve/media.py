"""Images from `image_url` content parts: `data:image/...;base64,...` URLs, and local files
only under a directory the operator allows (`owl-serve --allowed-local-media-path DIR`).
Nothing is fetched from the network."""
from __future__ import annotations

import base64
import binascii
import io
import os
import urllib.parse

from PIL import Image

from owl_jax.serve.errors import bad_request

MAX_IMAGE_BYTES = 20 * 2**20


def load(url: str, param: str, allowed_dir: str | None) -> Image.Image:
    """The image a part's URL names, decoded and loaded (APIError 400 naming `param` when it
    cannot be had)."""
    if url.startswith("data:"):
        data = _data_url(url, param)
    elif url.startswith(("http://", "https://")):
        raise bad_request("this server does not fetch images from the network: send the image "
                          "inline as a data: URL (data:image/png;base64,...)", param)
    else:
        data = _local_file(url, param, allowed_dir)
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except Exception as e:  # noqa: BLE001 - PIL raises many kinds
        raise bad_request(f"the image is not a readable image file ({type(e).__name__}: {e})",
                          param, "invalid_image") from None
    return img


def _data_url(url: str, param: str) -> bytes:
    head, sep, payload = url[5:].partition(",")
    if not sep:
        raise bad_request("malformed data URL: expected data:image/<type>;base64,<data>", param,
                          "invalid_image_url")
    mime, *opts = head.split(";")
    if mime and not mime.startswith("image/"):
        raise bad_request(f"the data URL's media type is {mime!r}, not an image", param,
                          "invalid_image_url")
    if "base64" not in opts:
        raise bad_request("the data URL must be base64-encoded (data:image/png;base64,...)",
                          param, "invalid_image_url")
    if len(payload) > MAX_IMAGE_BYTES * 4 // 3 + 4:
        raise bad_request(f"the image is larger than {MAX_IMAGE_BYTES} bytes", param,
                          "image_too_large")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as e:
        raise bad_request(f"the data URL's base64 payload is malformed ({e})", param,
                          "invalid_image_url") from None


def _local_file(url: str, param: str, allowed_dir: str | None) -> bytes:
    if allowed_dir is None:
        raise bad_request("image_url must be a data: URL (this server reads no local files; "
                          "the operator may allow a directory with --allowed-local-media-path)",
                          param, "invalid_image_url")
    path = urllib.parse.unquote(url[7:]) if url.startswith("file://") else url
    real = os.path.realpath(path)
    root = os.path.realpath(allowed_dir)
    if os.path.commonpath([real, root]) != root:
        raise bad_request(f"{path} is outside the directory this server may read images from",
                          param, "invalid_image_url")
    if not os.path.isfile(real):
        raise bad_request(f"image file not found: {path}", param, "invalid_image_url")
    if os.path.getsize(real) > MAX_IMAGE_BYTES:
        raise bad_request(f"the image is larger than {MAX_IMAGE_BYTES} bytes", param,
                          "image_too_large")
    with open(real, "rb") as f:
        return f.read()
