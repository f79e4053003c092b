"""LLaVA's training samples: `plain` captions (stage 1) and two-separator conversations (stage 2)
masked as its training code does (masks.py), and its eval transform for training images (LLaVA
does not augment)."""
from __future__ import annotations

from owl_jax.families.llava import masks
from owl_jax.families.llava.processor import LlavaProcessor


def caption(tok, text: str, seq_len: int, image_tokens: int, prompt: str = "",
            template: str = ""):
    if prompt:
        raise ValueError("LLaVA's stage-1 captions take no prompt (the `plain` template)")
    return masks.caption_sample(tok, text, seq_len, image_tokens)


def conversation(tok, conv, seq_len: int, image_tokens: int, template: str = ""):
    return masks.conversation_sample(tok, conv, seq_len, image_tokens, template or "vicuna_v1")


def pixels(img, cfg, augment: bool, rng=None):
    return LlavaProcessor(None, cfg).train_pixels(img)
