"""Videos for mPLUG-Owl3: sampled frames, each one image (never cut).

Frame sampling as the official examples (README, gradio demo): one frame per second (every
`round(average fps)`-th frame from frame 0), then, when that gives more than `max_frames`,
`max_frames` of them uniformly: with gap = n / max_frames, items int(i * gap + gap / 2).

Files are decoded with PyAV (FFmpeg's libraries; the `video` extra): its PyPI wheels bundle
FFmpeg for Linux / macOS / Windows and current Pythons, and it is maintained (decord, which the
official examples use, has had no release since 2021 and no wheels for recent Pythons).
"""
from __future__ import annotations

import dataclasses
import os
from typing import Sequence

import numpy as np
from PIL import Image

MAX_FRAMES = 16   # the README's MAX_NUM_FRAMES (the gradio demo uses 128)


@dataclasses.dataclass
class Video:
    """A video as its frames (PIL images or uint8 [H, W, 3] arrays), in time order: one
    `<|video|>` of a prompt."""
    frames: Sequence

    def __post_init__(self):
        if len(self.frames) == 0:
            raise ValueError("a video needs at least one frame")

    def __len__(self):
        return len(self.frames)


def uniform(items: Sequence, n: int) -> list:
    """n of items, evenly spread: gap = len / n, item int(i * gap + gap / 2)."""
    gap = len(items) / n
    return [items[int(i * gap + gap / 2)] for i in range(n)]


def sample_indices(n_frames: int, fps: float, max_frames: int = MAX_FRAMES) -> list[int]:
    """The frame indices the official examples keep: one a second, at most max_frames."""
    step = max(1, round(fps))
    idx = list(range(0, n_frames, step))
    if len(idx) > max_frames:
        idx = uniform(idx, max_frames)
    return idx


def _av():
    try:
        import av
    except ImportError:
        raise ImportError("reading video files needs PyAV: pip install 'owl-jax[video]' "
                          "(or pass the frames as a Video of images)") from None
    return av


def load_video(path: str, max_frames: int = MAX_FRAMES) -> Video:
    """The sampled frames of a video file (RGB PIL images), see `sample_indices`."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"video file not found: {path}")
    av = _av()
    try:
        with av.open(path) as container:
            if not container.streams.video:
                raise ValueError(f"{path} has no video stream")
            stream = container.streams.video[0]
            fps = float(stream.average_rate or stream.guessed_rate or 1)
            n = stream.frames or sum(1 for p in container.demux(stream) if p.size)
        keep = sample_indices(n, fps, max_frames)
        wanted = set(keep)
        frames = {}
        with av.open(path) as container:
            for i, frame in enumerate(container.decode(video=0)):
                if i in wanted:
                    frames[i] = frame.to_image().convert("RGB")
                if i >= keep[-1]:
                    break
    except av.error.FFmpegError as e:
        raise ValueError(f"cannot decode video {path}: {e}") from None
    if not frames:
        raise ValueError(f"{path}: no frame could be decoded")
    return Video([frames[i] for i in keep if i in frames])


def as_video(item, max_frames: int = MAX_FRAMES) -> Video:
    """A Video, a path to a video file (its sampled frames), or a list of frames."""
    if isinstance(item, Video):
        return item
    if isinstance(item, (str, os.PathLike)):
        return load_video(os.fspath(item), max_frames)
    if isinstance(item, (list, tuple)) or (isinstance(item, np.ndarray) and item.ndim == 4):
        return Video(list(item))
    raise TypeError(f"not a video: {type(item).__name__} (a Video, a file path or a list of "
                    f"frames)")


def frame_image(frame) -> Image.Image:
    return frame if isinstance(frame, Image.Image) else Image.fromarray(np.asarray(frame))
