"""Sources, `owl-data stats` and `convert` on genuine img2dataset 1.47 output (tests/golden/
img2dataset, made by its make.sh from localhost URLs: 404s, non-images, RGB / L / CMYK / P /
RGBA images). The reference is img2dataset's own sidecar metadata: every row's status, caption,
size and kept columns."""
import glob
import io
import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from owl_jax.cli.data import main
from owl_jax.data.sources import open_source

GOLDEN = os.path.join(os.path.dirname(__file__), "golden", "img2dataset")
LAION = ("webdataset", "laion_wds", ("similarity", "punsafe", "pwatermark", "NSFW"))
COYO = ("parquet", "coyo_parquet", ("id", "clip_similarity_vitl14", "aesthetic_score_laion_v2"))


def sidecar_rows(folder: str) -> dict[str, dict]:
    """key -> row of img2dataset's per-shard parquet (all rows, failures included)."""
    rows = {}
    for f in sorted(glob.glob(os.path.join(GOLDEN, folder, "*.parquet"))):
        rows.update({r["key"]: r for r in pq.read_table(f).to_pylist()})
    return rows


def status_counts(rows) -> dict[str, int]:
    out = {}
    for r in rows.values():
        out[r["status"]] = out.get(r["status"], 0) + 1
    return out


@pytest.mark.parametrize("kind,folder,columns", [LAION, COYO])
def test_open_source_matches_img2dataset_metadata(kind, folder, columns):
    rows = sidecar_rows(folder)
    counts = status_counts(rows)
    assert counts["success"] and counts["failed_to_download"] and counts["failed_to_resize"]
    stream = open_source(f"{kind}:{os.path.join(GOLDEN, folder)}")
    got = {ex["key"]: ex for ex in stream}
    assert set(got) == {k for k, r in rows.items() if r["status"] == "success"}
    for key, ex in got.items():
        row = rows[key]
        assert ex["text"] == row["caption"]  # byte-exact, whitespace and newlines included
        assert {c: ex[c] for c in columns} == {c: row[c] for c in columns}
        assert ex["image"].dtype == np.uint8
        assert ex["image"].shape == (row["height"], row["width"], 3)
    if kind == "parquet":  # failed rows are in the file: skipped and counted by status
        assert dict(stream.skipped) == {k: v for k, v in counts.items() if k != "success"}
        jpg = {r["key"]: r["jpg"] for r in rows.values() if r["status"] == "success"}
        for key, ex in got.items():
            ref = np.asarray(Image.open(io.BytesIO(jpg[key])).convert("RGB"))
            np.testing.assert_array_equal(ex["image"], ref)
    else:  # failed rows never reach the tar
        assert dict(stream.skipped) == {}


@pytest.mark.parametrize("kind,folder,columns", [LAION, COYO])
def test_stats_counts_and_filters(kind, folder, columns, capsys):
    rows = sidecar_rows(folder)
    counts = status_counts(rows)
    spec = f"{kind}:{os.path.join(GOLDEN, folder)}/*.{'tar' if kind == 'webdataset' else 'parquet'}"
    assert main(["stats", spec, "--quiet"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["samples"] == counts["success"]
    if kind == "webdataset":
        shard_stats = [json.load(open(f))
                       for f in glob.glob(os.path.join(GOLDEN, folder, "*_stats.json"))]
        keys = ("count", "successes", "failed_to_download", "failed_to_resize")
        assert out["img2dataset"] == {k: sum(s[k] for s in shard_stats) for k in keys}
    else:
        assert out["skipped"] == {k: v for k, v in counts.items() if k != "success"}

    column, flag = (("similarity", "--min-similarity") if kind == "webdataset" else
                    ("clip_similarity_vitl14", "--min-clip-similarity"))
    kept = [r[column] for r in rows.values() if r["status"] == "success"]
    threshold = float(np.median(kept))
    assert main(["stats", spec, "--quiet", "--no-decode", flag, str(threshold)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["samples"] == sum(v >= threshold for v in kept)
    assert out["skipped"][f"filtered_{flag[2:].replace('-', '_')}"] == \
        sum(v < threshold for v in kept)


def test_convert_then_read_back(tmp_path, capsys):
    rows = sidecar_rows("laion_wds")
    out_dir = str(tmp_path / "ar")
    assert main(["convert", f"webdataset:{os.path.join(GOLDEN, 'laion_wds')}", out_dir,
                 "--quiet"]) == 0
    capsys.readouterr()
    back = {ex["key"]: ex for ex in open_source(f"arrayrecord:{out_dir}")}
    assert set(back) == {k for k, r in rows.items() if r["status"] == "success"}
    assert all(ex["text"] == rows[k]["caption"] and ex["similarity"] == rows[k]["similarity"]
               for k, ex in back.items())
