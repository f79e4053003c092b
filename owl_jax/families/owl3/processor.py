"""mPLUG-Owl3's processor: its chat template, `<|image|>` placeholders as media slots, images.

Template (the official `build_text_qwen`): "<|im_start|>system\\n<|im_end|>" (no newline after
it), then "\\n<|im_start|>user\\n{content}<|im_end|>" per user turn, and a generation prompt
ends in "\\n<|im_start|>assistant\\n". The content is split at every `<|image|>` and each piece
is tokenized on its own (the placeholder too: ordinary BPE text, several tokens); the first
token of each placeholder becomes a media slot (`model.media_id`), in the order the images
are given.

Images: RGB, PIL bicubic resize, x / 255, (x - 0.5) / 0.5. A cut image (the official
processor's default, see owl_jax.families.owl3.cut) gives its tiles then a global view (S x S,
aspect ratio not kept), and its `<|image|>` becomes the version's cut text (one placeholder per
tile and one for the global view); an uncut image is the global view alone. Which images are
cut (`cut=None`): in 241101 every image; in 240728 the image of a prompt with exactly one image
and no video (the official 240728 processor mis-sizes the cut prompt of a second image, so its
multi-image prompts run with `cut_enable=False`). A `<|video|>` takes a Video (or a file path,
or a list of frames): each frame is one uncut image, the placeholder becomes one `<|image|>`
per frame (240728) or "<|start_video_frame|>" + those + "<|end_video_frame|>" (241101). Media
are matched to the prompt's placeholders in the order they appear.
"""
from __future__ import annotations

from typing import Sequence

import os
import re

import numpy as np
from PIL import Image

from owl_jax.families.batching import open_image, pad_batch
from owl_jax.families.owl3 import cut as cut_lib
from owl_jax.families.owl3.model import media_id
from owl_jax.families.owl3.video import MAX_FRAMES, Video, as_video, frame_image

IMAGE = "<|image|>"
VIDEO = "<|video|>"
_MEDIA = re.compile(f"({re.escape(IMAGE)}|{re.escape(VIDEO)})")
SYSTEM = "<|im_start|>system\n<|im_end|>"


def build_prompt(question_or_turns, n_images: int = 0, n_videos: int = 0) -> str:
    """A generation prompt. A question: the images' then the videos' placeholders (then a
    newline) before it, as the official examples write them. A list of strings: alternating
    user / assistant turns ending in a user turn, the placeholders before the first. Or turns
    [(role, text), ...] as they are. An assistant turn ends in "<|im_end|><|endoftext|>" (the
    official template's end of a labelled answer)."""
    media = IMAGE * n_images + VIDEO * n_videos
    lead = media + ("\n" if media else "")
    if isinstance(question_or_turns, str):
        turns = [("user", lead + question_or_turns)]
    else:
        turns = list(question_or_turns)
        if turns and all(isinstance(t, str) for t in turns):
            turns = [("user" if i % 2 == 0 else "assistant", (lead if i == 0 else "") + t)
                     for i, t in enumerate(turns)]
    out = SYSTEM if not turns or turns[0][0] != "system" else ""
    for role, text in turns:
        if role == "system":
            out += f"<|im_start|>system\n{text}<|im_end|>"
        elif role == "user":
            out += f"\n<|im_start|>user\n{text}<|im_end|>"
        elif role == "assistant":
            out += f"\n<|im_start|>assistant\n{text}<|im_end|><|endoftext|>"
        else:
            raise ValueError(f"unknown role {role!r} (system, user or assistant)")
    return out + "\n<|im_start|>assistant\n"


class Owl3Processor:
    """prompts + media -> {input_ids (media slots negative: `model.media_id`), attention_mask,
    pixel_values [N, S, S, 3] (every tile / view / frame of the batch, in slot order)}.
    `tokenizer` needs `encode(text) -> ids` (no special tokens added) and `pad_id`.
    cut: None = the official default (see the module doc), True / False for every image.
    max_frames: how many frames a video file gives at most (`video.sample_indices`)."""
    image_marker = IMAGE
    video_marker = VIDEO

    def __init__(self, tokenizer, cfg, cut: bool | None = None,
                 max_frames: int = MAX_FRAMES):
        self.tokenizer = tokenizer
        self.cfg = cfg
        self.cut = cut
        self.max_frames = max_frames   # frames sampled from a video file

    @property
    def image_size(self) -> int:
        return self.cfg.image_size

    @property
    def pad_id(self) -> int:
        return getattr(self.tokenizer, "pad_id", 0)

    def encode(self, prompt: str) -> list[int]:
        """Ids of a prompt whose media are expanded (one `<|image|>` per view): each piece
        between placeholders tokenized on its own, each placeholder's first token a slot."""
        ids: list[int] = []
        for i, piece in enumerate(prompt.split(IMAGE)):
            if i:
                slot = self.tokenizer.encode(IMAGE)
                ids += [media_id(slot[0])] + list(slot[1:])
            if piece:
                ids += self.tokenizer.encode(piece)
        return ids

    def _normalize(self, img: Image.Image) -> np.ndarray:
        x = np.asarray(img, np.float32) / 255.0
        mean = np.asarray(self.cfg.image_mean, np.float32)
        std = np.asarray(self.cfg.image_std, np.float32)
        return (x - mean) / std

    def image(self, img) -> np.ndarray:
        """The global view: [S, S, 3] float32."""
        s = self.image_size
        return self._normalize(open_image(img).convert("RGB").resize((s, s), Image.BICUBIC))

    def cut_image(self, img) -> tuple[np.ndarray, tuple[int, int]]:
        """The tiles then the global view [rows * cols + 1, S, S, 3], and (rows, cols)."""
        img = open_image(img).convert("RGB")
        s = self.image_size
        rows, cols = cut_lib.choose_grid(img.height, img.width, s)
        big = self._normalize(img.resize((cols * s, rows * s), Image.BICUBIC))
        views = np.concatenate([cut_lib.tiles(big, rows, cols), self.image(img)[None]])
        return views, (rows, cols)

    def cut_text(self, rows: int, cols: int) -> str:
        if self.cfg.version == "240728":
            return cut_lib.cut_text_240728(rows, cols, IMAGE)
        return cut_lib.cut_text_241101(rows, cols, IMAGE)

    def video_text(self, n_frames: int) -> str:
        if self.cfg.version == "240728":
            return IMAGE * n_frames
        return "<|start_video_frame|>" + IMAGE * n_frames + "<|end_video_frame|>"

    def _cuts(self, n_images: int, n_videos: int) -> bool:
        if self.cut is not None:
            return self.cut
        if self.cfg.version == "240728":
            return n_images == 1 and n_videos == 0
        return True

    def expand(self, prompt: str, media) -> tuple[str, list[np.ndarray]]:
        """The prompt with every `<|image|>` / `<|video|>` expanded, and its views in order.
        media: the prompt's images (PIL, arrays, paths, bytes) and videos (`Video`), in the
        order of their placeholders."""
        media = list(media)
        parts = _MEDIA.split(prompt)
        marks = parts[1::2]
        if len(marks) != len(media):
            raise ValueError(f"the prompt has {len(marks)} media placeholders ({IMAGE} / "
                             f"{VIDEO}) but {len(media)} images / videos were given: {prompt!r}")
        n_videos = sum(m == VIDEO for m in marks)
        cut = self._cuts(len(marks) - n_videos, n_videos)
        text, views = parts[0], []
        for k, (mark, item, after) in enumerate(zip(marks, media, parts[2::2])):
            if mark == VIDEO:
                if not isinstance(item, (Video, str, os.PathLike, list, tuple)):
                    raise ValueError(f"placeholder {k} is {VIDEO} but media {k} is a "
                                     f"{type(item).__name__}, not a video")
                video = as_video(item, self.max_frames)
                views += [self.image(frame_image(f)) for f in video.frames]
                text += self.video_text(len(video))
            else:
                if isinstance(item, Video):
                    raise ValueError(f"placeholder {k} is {IMAGE} but media {k} is a video")
                if cut:
                    tiles, (rows, cols) = self.cut_image(item)
                    views += list(tiles)
                    text += self.cut_text(rows, cols)
                else:
                    views.append(self.image(item))
                    text += IMAGE
            text += after
        return text, views

    def encode_batch(self, prompts: Sequence[str], media) -> tuple[list[list[int]], list]:
        """(ids per prompt, views of the whole batch in slot order). media: one list per prompt
        (None: no media anywhere); a single image or Video stands for a list of one."""
        if media is None:
            media = [[] for _ in prompts]
        if len(media) != len(prompts):
            raise ValueError(f"got {len(prompts)} prompts but {len(media)} media lists")
        rows, views = [], []
        for i, (prompt, items) in enumerate(zip(prompts, media)):
            if items is None:
                items = []
            elif not isinstance(items, (list, tuple)):
                items = [items]
            try:
                text, v = self.expand(prompt, items)
            except ValueError as e:
                raise ValueError(f"prompt {i}: {e}") from None
            rows.append(self.encode(text))
            views += v
        return rows, views

    def __call__(self, prompts: Sequence[str] | str, images=None) -> dict:
        if isinstance(prompts, str):
            prompts = [prompts]
            images = None if images is None else [images]
        rows, pixels = self.encode_batch(list(prompts), images)
        return pad_batch(rows, pixels, self.pad_id, self.image_size)
