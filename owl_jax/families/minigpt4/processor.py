"""MiniGPT-4's processor: image transforms, prompt ids with image slots, batches.

Images (`minigpt4/processors/blip_processors.py`): converted to RGB (`.convert("RGB")`), then
  eval (`blip2_image_eval`): a plain bicubic resize to S x S (no aspect-preserving crop, no
      padding), x / 255, (x - mean) / std with CLIP's statistics;
  train (`blip2_image_train`): RandomResizedCrop(S, scale=(0.5, 1.0), bicubic), no flip.
Pixels stay uint8 until `image` (or the train step) normalizes them.

Text (`Chat.get_context_emb`): the prompt is split on "<ImageHere>"; the first piece is
tokenized with BOS, the others without, each by its own sentencepiece call (so each starts
with a fresh "▁"); `image_tokens` ids of -1 stand for each image's query embeddings. Batches
are right-padded with the tokenizer's pad id, attention mask 0 there.
"""
from __future__ import annotations

import numpy as np
from PIL import Image

from owl_jax.data import fast_resize, images
from owl_jax.data.images import normalize_pixels
from owl_jax.families.batching import BatchProcessor
from owl_jax.families.minigpt4.templates import IMAGE_HERE, SEP
from owl_jax.families.batching import ImageLike, open_image

TRAIN_SCALE = (0.5, 1.0)


def image_ids(tok, prompt: str, image_tokens: int) -> list[int]:
    """`get_context_emb`'s ids: BOS, each piece between "<ImageHere>"s encoded on its own,
    `image_tokens` ids of -1 between consecutive pieces."""
    out = [tok.bos_id]
    for i, piece in enumerate(prompt.split(IMAGE_HERE)):
        if i:
            out += [-1] * image_tokens
        out += tok.encode(piece)
    return out


def random_resized_crop(img: Image.Image, size: int, rng: np.random.Generator) -> np.ndarray:
    """torchvision's RandomResizedCrop(size, scale=(0.5, 1.0), ratio=(3/4, 4/3), BICUBIC): the
    box drawn from `rng`, cropped, then resized; uint8 [size, size, 3]."""
    left, top, w, h = images.crop_box(img.width, img.height, rng, TRAIN_SCALE)
    out = fast_resize.resize_rgb(img, (size, size), (left, top, w, h))
    if out is None:
        out = np.asarray(img.crop((left, top, left + w, top + h)).resize((size, size),
                                                                         Image.BICUBIC))
    return out


class MiniGPT4Processor(BatchProcessor):
    """prompts + images -> model inputs, as MiniGPT-4's chat builds them. `stop_text`: where
    MiniGPT-4's chat cuts an answer (its stopping criteria end generation at "###")."""
    image_marker = IMAGE_HERE
    stop_text = SEP

    def __init__(self, tokenizer, cfg):
        self.tokenizer = tokenizer
        self.cfg = cfg

    @property
    def image_size(self) -> int:
        return self.cfg.image_size

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_id

    @staticmethod
    def _rgb(img: ImageLike) -> Image.Image:
        img = open_image(img)
        return img if img.mode == "RGB" else img.convert("RGB")

    def pixels(self, img: ImageLike) -> np.ndarray:
        """uint8 [S, S, 3]: the eval transform before normalization."""
        return images.resize_square(self._rgb(img), self.image_size)

    def train_pixels(self, img: ImageLike, rng: np.random.Generator) -> np.ndarray:
        """uint8 [S, S, 3]: the train transform (random resized crop, no flip)."""
        return random_resized_crop(self._rgb(img), self.image_size, rng)

    def image(self, img: ImageLike) -> np.ndarray:
        """float32 [S, S, 3], normalized."""
        return normalize_pixels(self.pixels(img), self.cfg.image_mean, self.cfg.image_std)

    def encode(self, prompt: str) -> list[int]:
        return image_ids(self.tokenizer, prompt, self.cfg.image_tokens)
