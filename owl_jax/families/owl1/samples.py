"""Owl v1's training samples: the official stage-1 caption and stage-2 conversation layouts
(`owl_jax.data.tasks`) and its image augmentation."""
from __future__ import annotations

from owl_jax.data import images, tasks


def caption(tok, text: str, seq_len: int, image_tokens: int, prompt: str = "",
            template: str = ""):
    return tasks.caption_sample(tok, text, seq_len, image_tokens, prompt)


def conversation(tok, conv, seq_len: int, image_tokens: int, template: str = ""):
    """conv: an `owl_jax.data.conversation.Conversation`, in the official text form."""
    return tasks.tokenize_conversation(tok, conv.text(), seq_len, image_tokens)


def pixels(img, cfg, augment: bool, rng=None):
    """uint8 [S, S, 3]: RandomResizedCrop + flip (augment), else a bicubic square resize."""
    size = cfg.vision.image_size
    if augment:
        return images.random_resized_crop_flip(img, size, rng)
    return images.resize_square(img, size)
