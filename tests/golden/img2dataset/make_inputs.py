"""Input URL lists (LAION and COYO columns) and the images they point at, for make.sh."""
import os
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

root = sys.argv[1]
os.makedirs(f"{root}/img")
rng = np.random.default_rng(0)
laion, coyo = [], []
for i in range(24):
    w, h = (int(v) for v in rng.integers(24, 96, 2))
    img = Image.fromarray(rng.integers(0, 255, (h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8))
    img = img.resize((w, h), Image.BILINEAR)
    name = f"{i}.jpg"
    kind = i % 8
    if kind == 0:
        name = f"missing_{i}.jpg"  # 404
    elif kind == 1:
        open(f"{root}/img/{name}", "wb").write(b"\xff\xd8\xff\xe0 not an image")
    elif kind in (2, 3):
        name = f"{i}.png"
        img.convert("RGBA" if kind == 2 else "P").save(f"{root}/img/{name}")
    elif kind in (4, 5):
        img.convert("L" if kind == 4 else "CMYK").save(f"{root}/img/{name}", quality=90)
    else:
        img.save(f"{root}/img/{name}", quality=90)
    url = f"http://127.0.0.1:8765/img/{name}"
    cap = f"a caf\u00e9 \u2014 \u201cphoto\u201d {i}" if i % 5 else f"  line one\nline two {i}  "
    laion.append(dict(URL=url, TEXT=cap, WIDTH=float(w), HEIGHT=float(h),
                      similarity=round(float(rng.uniform(0.25, 0.4)), 4),
                      punsafe=float(rng.uniform(0, 0.2)), pwatermark=float(rng.uniform(0, 1)),
                      LICENSE="?", NSFW="UNLIKELY"))
    coyo.append(dict(id=1000 + i, url=url, text=cap, width=w, height=h,
                     clip_similarity_vitl14=round(float(rng.uniform(0.2, 0.4)), 4),
                     aesthetic_score_laion_v2=float(rng.uniform(3, 7)),
                     watermark_score=float(rng.uniform(0, 1))))
pq.write_table(pa.Table.from_pylist(laion), f"{root}/laion.parquet")
pq.write_table(pa.Table.from_pylist(coyo), f"{root}/coyo.parquet")
