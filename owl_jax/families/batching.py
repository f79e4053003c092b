"""What every family's processor does with a batch of prompts: open its images (`open_image`),
check that each prompt has one `<image>` per image, encode it (the family's `encode`), transform
its images (the family's `image`), and right-pad the rows."""
from __future__ import annotations

import io
import os
from typing import Callable, Sequence, Union

import numpy as np
from PIL import Image

IMAGE_TOKEN = "<image>"

ImageLike = Union[Image.Image, np.ndarray, str, os.PathLike, bytes]


def open_image(src: ImageLike) -> Image.Image:
    """A PIL image in its stored mode (what upstream's `Image.open(path)` gives). Raises
    ValueError: "image file not found: PATH", or "cannot decode image ..."."""
    if isinstance(src, Image.Image):
        return src
    if isinstance(src, np.ndarray):
        if src.dtype != np.uint8 or src.ndim not in (2, 3):
            raise ValueError(f"array images must be uint8 HW or HWC, got {src.dtype} {src.shape}")
        return Image.fromarray(src)
    try:
        if isinstance(src, (bytes, bytearray, memoryview)):
            img = Image.open(io.BytesIO(bytes(src)))
        else:
            img = Image.open(os.fspath(src))
        img.load()
    except FileNotFoundError:
        raise ValueError(f"image file not found: {os.fspath(src)}") from None
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        name = f"{len(src)} bytes" if isinstance(src, (bytes, bytearray, memoryview)) else src
        raise ValueError(f"cannot decode image {name}: {e}") from e
    return img


def encode_rows(prompts: Sequence[str], images, encode: Callable, image: Callable,
                as_list: Callable = lambda imgs: imgs, marker: str = IMAGE_TOKEN):
    """(ids per prompt, transformed images in order of appearance). images: one entry per
    prompt (None: no images anywhere), made a list of images by `as_list`. `marker`: the text
    that stands for one image in a prompt."""
    if images is None:
        images = [[] for _ in prompts]
    if len(images) != len(prompts):
        raise ValueError(f"got {len(prompts)} prompts but {len(images)} image lists")
    rows, pixels = [], []
    for i, (prompt, imgs) in enumerate(zip(prompts, images)):
        imgs = as_list(imgs)
        n = prompt.count(marker)
        if n != len(imgs):
            raise ValueError(f"prompt {i} has {n} {marker} but {len(imgs)} images "
                             f"were given: {prompt!r}")
        rows.append(encode(prompt))
        pixels.extend(image(img) for img in imgs)
    return rows, pixels


def _one_image_or_list(imgs):
    """A single image (PIL, array, path or bytes) stands for a list of one."""
    if isinstance(imgs, (Image.Image, np.ndarray, str, bytes, os.PathLike)):
        return [imgs]
    return imgs


def pad_batch(rows: Sequence[Sequence[int]], pixels: list, pad_id: int, image_size: int) -> dict:
    """Encoded rows right-padded with `pad_id` and the images stacked: {'input_ids' [B, L] int32,
    'attention_mask' [B, L] int32, 'pixel_values' [N, S, S, 3] float32 (N may be 0)}."""
    length = max(len(r) for r in rows)
    ids = np.full((len(rows), length), pad_id, np.int32)
    mask = np.zeros((len(rows), length), np.int32)
    for b, r in enumerate(rows):
        ids[b, :len(r)] = r
        mask[b, :len(r)] = 1
    s = image_size
    pv = np.stack(pixels) if pixels else np.zeros((0, s, s, 3), np.float32)
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": pv}


class BatchProcessor:
    """`__call__(prompts, images)` for a processor with `encode(prompt)`, `image(img)`,
    `image_size` and `pad_id` (what right-pads the rows); `image_marker` is what stands for an
    image in its prompts."""
    image_marker = IMAGE_TOKEN

    def __call__(self, prompts: Sequence[str] | str, images=None) -> dict:
        """Returns {'input_ids' [B, L] int32 (image slots -1, right-padded with `pad_id`),
        'attention_mask' [B, L] int32, 'pixel_values' [N, S, S, 3] float32 (all images of the
        batch in order of appearance; N may be 0)}."""
        if isinstance(prompts, str):
            prompts = [prompts]
        rows, pixels = encode_rows(prompts, images, self.encode, self.image, _one_image_or_list,
                                   self.image_marker)
        return pad_batch(rows, pixels, self.pad_id, self.image_size)
