"""Sources on shards written in the real img2dataset / COCO layouts (owl_jax.testing.shards)."""
import io
import os
import tarfile

import numpy as np
import pytest
from PIL import Image

from owl_jax.data import images as imgs
from owl_jax.data.sources import open_source, random_access
from owl_jax.data.sources_arrayrecord import pack_record, unpack_record
from owl_jax.data.spec import RawSample, Skipped, SourceError, expand_braces, parse_spec
from owl_jax.testing import shards

BAD = ["truncated_image", "undecodable_image", "missing_caption", "decompression_bomb"]
MODES = ["P", "RGBA", "L", "CMYK", "I;16", "LA"]


@pytest.fixture(scope="module")
def wds(tmp_path_factory):
    d = tmp_path_factory.mktemp("wds")
    return str(d), shards.write_webdataset(str(d), n_shards=3, per_shard=16, bad=BAD,
                                           modes=MODES, truncate_last=True)


@pytest.fixture(scope="module")
def pq(tmp_path_factory):
    d = tmp_path_factory.mktemp("pq")
    return str(d), shards.write_parquet(str(d), n_shards=2, per_shard=30,
                                        bad=["truncated_image", "missing_caption"], modes=["CMYK"])


def test_webdataset_exact_samples_and_skips(wds):
    d, m = wds
    stream = open_source(f"webdataset:{d}/{{00000..00003}}.tar")  # 00003 is a gap
    got = {ex["key"]: ex["text"] for ex in stream}
    assert got == m["samples"]
    assert stream.samples == len(m["samples"])
    assert dict(stream.skipped) == {**m["skipped"], "missing_shard": 1}
    assert m["skipped"]["truncated_tar"] == 1 and "00003.tar" in stream.skip_examples["missing_shard"]
    assert m["truncated_key"] in stream.skip_examples["truncated_tar"]


def test_webdataset_examples_carry_laion_metadata(wds):
    d, m = wds
    for ex in open_source(f"webdataset:{d}/*.tar"):
        assert ex["image"].dtype == np.uint8 and ex["image"].ndim == 3 and ex["image"].shape[2] == 3
        meta = m["meta"][ex["key"]]
        assert ex["similarity"] == meta["similarity"] and ex["NSFW"] == meta["NSFW"]
        assert ex["image"].shape[:2] == (meta["height"], meta["width"])


def test_modes_are_converted_not_skipped(wds):
    d, m = wds
    assert sorted(m["modes"].values()) == sorted(MODES)
    seen = {ex["key"]: ex["image"] for ex in open_source(f"webdataset:{d}") if ex["key"] in m["modes"]}
    assert set(seen) == set(m["modes"]) - {m.get("truncated_key")}


def _expected_rgb(img: Image.Image) -> np.ndarray:
    """Independent re-derivation of the colour conversion rules (numpy)."""
    if img.mode in ("RGBA", "LA"):
        a = np.asarray(img.convert("RGBA")).astype(np.float64)
        alpha = a[..., 3:] / 255.0
        return np.round(a[..., :3] * alpha + 255.0 * (1 - alpha))
    if img.mode == "I;16":
        g = np.round(np.asarray(img).astype(np.float64) / 257.0)
        return np.repeat(g[..., None], 3, 2)
    return np.asarray(img.convert("RGB")).astype(np.float64)


@pytest.mark.parametrize("mode", MODES)
def test_mode_conversion_values(mode):
    rng = np.random.default_rng(5)
    data, _ = shards.odd_mode_image(rng, mode, 37, 23)
    stored = Image.open(io.BytesIO(data))
    assert stored.mode == mode
    got = imgs.decode_image(data)
    assert got.shape == (23, 37, 3) and got.dtype == np.uint8
    np.testing.assert_allclose(got, _expected_rgb(stored), atol=1)
    if mode == "I;16":  # 8-bit grey * 257 must come back exactly
        assert np.array_equal(got[..., 0], np.asarray(stored).astype(np.int64) // 257)


def test_bad_image_reasons():
    rng = np.random.default_rng(0)
    for reason in ("truncated_image", "undecodable_image", "decompression_bomb"):
        with pytest.raises(imgs.BadImage) as e:
            imgs.decode_image(shards.bad_image(rng, reason, 40, 30))
        assert e.value.reason == reason
    good = shards.encode(shards.natural_image(rng, 40, 30))
    assert imgs.decode_image(good, max_pixels=1200).shape == (30, 40, 3)
    with pytest.raises(imgs.BadImage, match="decompression_bomb"):
        imgs.decode_image(good, max_pixels=1199)
    with pytest.raises(imgs.BadImage, match="missing_image"):
        imgs.decode_image(b"")


def test_read_image_file_reasons(tmp_path):
    missing = str(tmp_path / "nope.jpg")
    with pytest.raises(imgs.BadImage) as e:
        imgs.read_image_file(missing)
    assert (e.value.reason, e.value.detail) == ("missing_file", f"image file not found: {missing}")
    with pytest.raises(imgs.BadImage) as e:
        imgs.read_image_file(str(tmp_path))
    assert e.value.reason == "unreadable_file" and str(tmp_path) in e.value.detail
    (tmp_path / "x.jpg").write_bytes(b"not an image")
    with pytest.raises(imgs.BadImage, match="undecodable_image"):  # found, then not decodable
        imgs.decode_image(imgs.read_image_file(str(tmp_path / "x.jpg")))
    assert {"missing_file", "unreadable_file"} <= set(imgs.REASONS)


def test_parquet_skips_failed_rows_by_status(pq):
    d, m = pq
    stream = open_source(f"parquet:{d}/*.parquet")
    got = {ex["key"]: ex["text"] for ex in stream}
    assert got == m["samples"]
    assert dict(stream.skipped) == m["skipped"]
    assert m["skipped"]["failed_to_download"] >= 5


@pytest.mark.parametrize("name,column,limit", [
    ("min_clip_similarity", "clip_similarity_vitl14", 0.3),
    ("min_aesthetic", "aesthetic_score_laion_v2", 5.0),
    ("max_watermark", "watermark_score", 0.5),
])
def test_parquet_coyo_filters(pq, name, column, limit):
    d, m = pq

    def passes(meta):
        return meta[column] >= limit if name.startswith("min") else meta[column] <= limit

    keep = {k for k, meta in m["meta"].items() if passes(meta)}
    assert 0 < len(keep) < len(m["samples"])
    # metadata thresholds run before decoding, so a bad image can be filtered first; a missing
    # caption is checked before the thresholds
    bad_filtered = sum(not passes(meta) for reason, meta in m["bad"].values()
                       if reason != "missing_caption")
    stream = open_source(f"parquet:{d}", **{name: limit})
    assert {ex["key"] for ex in stream} == keep
    assert stream.skipped[f"filtered_{name}"] == len(m["samples"]) - len(keep) + bad_filtered


def test_laion_similarity_and_size_filters(wds):
    d, m = wds
    keep = {k for k, meta in m["meta"].items() if meta["similarity"] >= 0.3}
    assert {ex["key"] for ex in open_source(f"webdataset:{d}", min_similarity=0.3)} == keep
    keep = {k for k, meta in m["meta"].items() if min(meta["width"], meta["height"]) >= 60}
    bad_small = sum(min(meta["width"], meta["height"]) < 60 for k, (reason, meta) in
                    m["bad"].items() if reason != "missing_caption" and k != m["truncated_key"])
    stream = open_source(f"webdataset:{d}", min_size=60)
    assert {ex["key"] for ex in stream} == keep
    assert stream.skipped["filtered_min_size"] == len(m["samples"]) - len(keep) + bad_small
    with pytest.raises(ValueError, match="unknown filter"):
        open_source(f"webdataset:{d}", min_simlarity=0.3)


@pytest.mark.parametrize("karpathy", [False, True])
def test_coco_captions(tmp_path, karpathy):
    m = shards.write_coco(str(tmp_path), n_images=8, karpathy=karpathy)
    stream = open_source(f"coco:{m['annotations']}?images={m['images']}")
    assert {ex["key"]: ex["text"] for ex in stream} == m["samples"]
    # the first image's file is not written: its 2 captions are skipped as missing_file
    assert sum(m["skipped"].values()) == 2
    assert dict(stream.skipped) == {"missing_file": 2}
    name = "COCO_train2014_000000001000.jpg" if karpathy else "000000001000.jpg"
    path = os.path.join(m["images"], "train2014", name) if karpathy else \
        os.path.join(m["images"], name)
    assert stream.skip_examples["missing_file"] == \
        f"{path} (key 1000_50000): image file not found: {path}"
    if karpathy:
        keep = {k for k, s in m["splits"].items() if s in ("train", "restval")}
        stream = open_source(f"coco:{m['annotations']}?images={m['images']}&split=train,restval")
        assert {ex["key"] for ex in stream} == keep
    per_image = list(open_source(f"coco:{m['annotations']}?images={m['images']}&per=image"))
    assert len(per_image) == 7 and all(len(ex["captions"]) == 2 for ex in per_image)


def test_spec_parsing_and_errors(tmp_path):
    assert expand_braces("s/{008..011}.tar") == [f"s/{i:03d}.tar" for i in range(8, 12)]
    assert len(expand_braces("{0..1}/{00..02}")) == 6
    spec = parse_spec("coco:/a/b.json?images=/c&split=train")
    assert spec.option("images") == "/c" and spec.option("split") == "train"
    with pytest.raises(SourceError, match="must start with one of"):
        parse_spec("tar:/x")
    with pytest.raises(SourceError, match="no files match"):
        open_source(f"webdataset:{tmp_path}/*.tar")
    with pytest.raises(SourceError, match="needs \\?images="):
        open_source(f"coco:{tmp_path}/x.json")


def test_tar_index_random_access_matches_stream(wds):
    d, m = wds
    index, lost = random_access(f"webdataset:{d}")
    assert dict(lost) == {"truncated_tar": 1}
    streamed = {ex["key"]: ex["image"] for ex in open_source(f"webdataset:{d}", decode=False,
                                                            require_text=False)}
    got = {}
    for i in range(len(index)):
        raw = index[i]
        assert isinstance(raw, RawSample)
        got[raw.key] = raw.image
    assert {k: v for k, v in got.items() if v} == streamed


def test_truncated_tar_at_any_point_never_crashes(wds, tmp_path):
    d, m = wds
    data = open(f"{d}/00000.tar", "rb").read()
    full = {ex["key"] for ex in open_source(f"webdataset:{d}/00000.tar", decode=False,
                                              require_text=False)}
    with tarfile.open(f"{d}/00000.tar") as tf:
        end = max(mb.offset_data + mb.size for mb in tf.getmembers())
    # inside a header, at a header start, inside member data, inside the zero padding
    for cut in (100, 512, 3000, len(data) // 2, end + 600):
        p = tmp_path / f"cut{cut}.tar"
        p.write_bytes(data[:cut])
        stream = open_source(f"webdataset:{p}", decode=False, require_text=False)
        keys = {ex["key"] for ex in stream}
        lost = stream.skipped["truncated_tar"] + stream.skipped["corrupt_tar"]
        assert (keys, lost) == (full, 0) if cut > end else lost == 1 and keys < full
        index, lost = random_access(f"webdataset:{p}")
        assert {index[i].key for i in range(len(index))} == keys  # same samples survive
        assert sum(lost.values()) == (cut < end)
    p = tmp_path / "garbage.tar"
    p.write_bytes(b"x" * 5000)
    stream = open_source(f"webdataset:{p}")
    assert list(stream) == [] and sum(stream.skipped.values()) == 1


def test_record_round_trip():
    raw = RawSample("k1", b"\xff\xd8jpegbytes", "a caption é", {"similarity": 0.3, "n": None}, "w")
    back = unpack_record(pack_record(raw))
    assert (back.key, back.image, back.text, back.meta) == (raw.key, raw.image, raw.text, raw.meta)
    bad = unpack_record(b"nonsense", "file:record 3")
    assert isinstance(bad, Skipped) and bad.reason == "corrupt_record" and "record 3" in bad.where
