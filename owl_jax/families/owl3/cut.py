"""mPLUG-Owl3's image cutting: an anchor grid chosen by IoU, its tiles, then a global view.

The official image processor (`CutMixin`, anchors "grid_squ_6", strategy "docowl",
`add_global=True`):
- anchors (rows h, cols w): (2,2) (1,3) (1,4) (3,1) (4,1) (2,3) (3,2); no (1,1), so every image
  gives at least 3 tiles plus the global view;
- anchor i's box is [0, 0, w*S, h*S] (integers); for an image of H rows and W columns,
  iou_i = IoU(box_i, [0, 0, W, H]) and shape_iou_i = IoU(box_i, [0, 0, w*S, int(H/W * w*S)])
  (the anchor rescaled to the image's aspect ratio; its height is written into an integer
  tensor, so it is truncated), each IoU = inter / (union + 1e-5); the anchor is the first
  argmax of 100 * shape_iou + iou (shape first, then resolution);
- the image is resized (PIL bicubic) to (h*S rows, w*S cols), normalized and split row-major
  into h*w tiles of S x S; the global view is the whole image resized to S x S.

The prompt: every `<|image|>` of a cut image becomes the version's cut text, which holds one
`<|image|>` per tile (row-major) and one for the global view, in the pixel order.
"""
from __future__ import annotations

import numpy as np

ANCHORS = ((2, 2), (1, 3), (1, 4), (3, 1), (4, 1), (2, 3), (3, 2))   # (rows, cols)
EPS = 1e-5


def _iou(a, b):
    """IoU of integer boxes a and b (x1, y1, x2, y2), in float32 as the official code: the
    integer union plus eps, the integer intersection divided by it."""
    area = lambda r: (r[2] - r[0]) * (r[3] - r[1])  # noqa: E731
    w = max(min(a[2], b[2]) - max(a[0], b[0]), 0)
    h = max(min(a[3], b[3]) - max(a[1], b[1]), 0)
    inter = w * h
    union = np.float32(area(a) + area(b) - inter) + np.float32(EPS)
    return np.float32(inter) / union


def choose_grid(height: int, width: int, size: int, anchors=ANCHORS) -> tuple[int, int]:
    """(rows, cols) of the anchor the official "docowl" strategy picks for an image of
    height x width pixels with tiles of size x size."""
    image = (0, 0, width, height)
    best, best_score = None, None
    for h, w in anchors:
        box = (0, 0, w * size, h * size)
        # the aspect ratio (a float) times an integer tensor is float32, stored as an integer
        same_height = int(np.float32(height / width) * np.float32(w * size))
        score = (_iou(box, (0, 0, w * size, same_height)) * np.float32(100)
                 + _iou(box, image))
        if best_score is None or score > best_score:
            best, best_score = (h, w), score
    return best


def cut_text_240728(rows: int, cols: int, image: str = "<|image|>") -> str:
    """The v2_global prompt of 240728: "Cut to {h} rows {w} columns with a global view", a line
    per row of "subimg(r,c)<|image|>" items, then "global_view<|image|>"."""
    lines = [" ".join(f"subimg({r},{c}){image}" for c in range(cols)) for r in range(rows)]
    return (f"Cut to {rows} rows {cols} columns with a global view\n" + "\n".join(lines)
            + f"\nglobal_view{image}")


def cut_text_241101(rows: int, cols: int, image: str = "<|image|>") -> str:
    """The v3_global prompt of 241101: "<|start_cut|>{h}*{w}", a line per row of placeholders,
    then the global view's placeholder and "<|end_cut|>"."""
    lines = [" ".join(image for _ in range(cols)) for _ in range(rows)]
    return f"<|start_cut|>{rows}*{cols}\n" + "\n".join(lines) + f"\n{image}<|end_cut|>"


def tiles(resized: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """[rows*S, cols*S, C] -> [rows*cols, S, S, C], row-major."""
    hs, ws = resized.shape[0] // rows, resized.shape[1] // cols
    x = resized.reshape(rows, hs, cols, ws, resized.shape[-1])
    return x.transpose(0, 2, 1, 3, 4).reshape(rows * cols, hs, ws, resized.shape[-1])
