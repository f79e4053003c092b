"""owl-data convert / stats / preview on img2dataset-style shards the tests write."""
import io
import json
import os
import tarfile

import numpy as np
import pytest
from PIL import Image

from owl_jax.cli.data import FILTER_FLAGS, build_parser, main
from owl_jax.data.sources import open_source
from owl_jax.testing import shards

FILTER_NAMES = [name for name, _ in FILTER_FLAGS]


@pytest.fixture(scope="module")
def wds(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("wds"))
    m = shards.write_webdataset(d, n_shards=3, per_shard=12, modes=["CMYK", "RGBA"],
                                bad=["truncated_image", "missing_caption", "decompression_bomb"],
                                size=(40, 90))
    return d, m


def run(capsys, *argv):
    rc = main(list(argv))
    out = capsys.readouterr()
    return rc, (json.loads(out.out) if rc == 0 else None), out.err


def tar_members(d):
    out = {}
    for name in sorted(os.listdir(d)):
        if name.endswith(".tar"):
            with tarfile.open(os.path.join(d, name)) as tf:
                for m in tf.getmembers():
                    out[m.name] = tf.extractfile(m).read()
    return out


@pytest.mark.slow  # --workers 2: a pool of spawned processes
def test_convert_keeps_bytes_and_counts(wds, tmp_path, capsys):
    d, m = wds
    out = str(tmp_path / "ar")
    rc, summary, err = run(capsys, "convert", f"webdataset:{d}", out, "--workers", "2")
    assert rc == 0 and "converted" in err
    assert summary["samples"] == len(m["samples"]) and summary["shards"] == 3
    assert summary["skipped"] == m["skipped"]
    assert summary["img2dataset"]["failed_to_download"] == m["failed"]
    assert sorted(f for f in os.listdir(out) if f.endswith(".array_record")) == \
        ["00000.array_record", "00001.array_record", "00002.array_record"]
    members = tar_members(d)
    got = list(open_source(f"arrayrecord:{out}", decode=False))
    assert {ex["key"]: ex["text"] for ex in got} == m["samples"]
    for ex in got:
        mode = m["modes"].get(ex["key"])
        if mode is None:  # stored JPEG, RGB: the bytes are kept as they were
            assert ex["image"] == members[ex["key"] + ".jpg"] and "reencoded" not in ex
            assert ex["similarity"] == m["meta"][ex["key"]]["similarity"]
        else:  # CMYK JPEG / RGBA PNG: re-encoded once, as RGB JPEG
            img = Image.open(io.BytesIO(ex["image"]))
            assert (img.format, img.mode, ex["stored_mode"], ex["reencoded"]) == \
                ("JPEG", "RGB", mode, True)


def test_convert_is_resumable(wds, tmp_path, capsys):
    d, m = wds
    out = str(tmp_path / "ar")
    assert run(capsys, "convert", f"webdataset:{d}", out, "--quiet")[0] == 0
    mtimes = {f: os.stat(os.path.join(out, f)).st_mtime_ns for f in os.listdir(out)}
    # a crash while writing shard 1: data written, counts not (and a stale temp file)
    os.remove(os.path.join(out, "00001.stats.json"))
    with open(os.path.join(out, "00001.array_record.tmp-999"), "wb") as f:
        f.write(b"partial")
    rc, summary, _ = run(capsys, "convert", f"webdataset:{d}", out, "--quiet")
    assert rc == 0 and summary["resumed_shards"] == 2 and summary["samples"] == len(m["samples"])
    for name in ("00000.array_record", "00002.array_record", "00000.stats.json"):
        assert os.stat(os.path.join(out, name)).st_mtime_ns == mtimes[name]  # not redone
    assert os.stat(os.path.join(out, "00001.array_record")).st_mtime_ns != mtimes["00001.array_record"]
    assert {ex["key"] for ex in open_source(f"arrayrecord:{out}")} == set(m["samples"])
    assert not [f for f in os.listdir(out) if ".tmp-" in f]


def test_convert_resize_and_filters(wds, tmp_path, capsys):
    d, m = wds
    out = str(tmp_path / "small")
    rc, summary, _ = run(capsys, "convert", f"webdataset:{d}", out, "--quiet", "--resize", "50",
                         "--min_similarity", "0.3")
    keep = {k for k, meta in m["meta"].items() if meta["similarity"] >= 0.3}
    assert rc == 0 and summary["samples"] == len(keep)
    for ex in open_source(f"arrayrecord:{out}"):
        meta = m["meta"][ex["key"]]
        w, h = meta["width"], meta["height"]
        if min(w, h) > 50:
            s = 50 / min(w, h)
            assert ex["image"].shape[:2] == (round(h * s), round(w * s)) and ex["reencoded"]
        else:
            assert ex["image"].shape[:2] == (h, w)


def test_stats_parquet_by_reason(tmp_path, capsys):
    m = shards.write_parquet(str(tmp_path), n_shards=2, per_shard=25,
                             bad=["undecodable_image", "missing_caption"])
    rc, stats, _ = run(capsys, "stats", f"parquet:{tmp_path}/*.parquet", "--quiet", "--workers", "1")
    assert rc == 0 and stats["samples"] == len(m["samples"]) and stats["skipped"] == m["skipped"]
    assert "row" in stats["skip_examples"]["failed_to_download"]
    rc, fast, _ = run(capsys, "stats", f"parquet:{tmp_path}", "--quiet", "--no_decode")
    assert fast["samples"] == len(m["samples"]) + 1  # the undecodable image is not looked at


def test_preview_contact_sheet(wds, tmp_path, capsys):
    d, m = wds
    out = str(tmp_path / "grid.png")
    rc, res, err = run(capsys, "preview", f"webdataset:{d}", "--n", "6", "--out", out,
                       "--cols", "3", "--cell", "64")
    assert rc == 0 and len(res["shown"]) == 6 and set(res["shown"]) <= set(m["samples"])
    assert res["out"] == out and f"wrote {out} (6 examples)" in err
    sheet = np.asarray(Image.open(out).convert("RGB"))
    assert sheet.shape[1] == 3 * (64 + 8) + 8 and sheet.shape[0] > 2 * 64
    assert (sheet < 128).any() and (sheet == 255).any()  # captions drawn on white


def test_preview_never_overwrites_without_flag(wds, tmp_path, capsys, monkeypatch):
    d, _ = wds
    monkeypatch.chdir(tmp_path)
    (tmp_path / "grid.png").write_bytes(b"someone's picture")
    rc, _, err = run(capsys, "preview", f"webdataset:{d}", "--n", "2")  # default --out grid.png
    assert rc == 2 and (tmp_path / "grid.png").read_bytes() == b"someone's picture"
    assert f"{tmp_path / 'grid.png'} already exists; pass --overwrite" in err
    rc, res, err = run(capsys, "preview", f"webdataset:{d}", "--n", "2", "--overwrite")
    assert rc == 0 and res["out"] == str(tmp_path / "grid.png")
    assert f"wrote {tmp_path / 'grid.png'}" in err
    assert Image.open(tmp_path / "grid.png").format == "PNG"


def test_preview_with_nothing_to_show_is_an_error(wds, tmp_path, capsys):
    d, _ = wds
    out = tmp_path / "grid.png"
    rc, _, err = run(capsys, "preview", f"webdataset:{d}", "--out", str(out),
                     "--min_similarity", "2")
    assert rc == 2 and "no usable examples" in err and "filtered_min_similarity" in err
    assert not out.exists()


def _help(capsys, *argv) -> str:
    with pytest.raises(SystemExit) as e:
        main([*argv, "--help"])
    assert e.value.code == 0
    return capsys.readouterr().out


def test_flags_use_underscores_with_help_and_defaults(capsys):
    top = _help(capsys)
    assert all(cmd in top for cmd in ("convert", "stats", "preview")) and "source specs" in top
    for cmd in ("convert", "stats", "preview"):
        text = " ".join(_help(capsys, cmd).split())  # argparse wraps the help texts
        assert all(f"--{name} " in text for name in FILTER_NAMES)
        assert text.count("(default: None = off)") == len(FILTER_NAMES)
        assert "--allow_missing_caption" in text and "--max_pixels N" in text
        dashed = [f for f in text.split() if f.startswith("--") and "-" in f[2:]]
        assert dashed == [], dashed
    assert "above T (default: None = off)" in " ".join(_help(capsys, "stats").split())
    assert "(default: 95)" in _help(capsys, "convert")
    preview = " ".join(_help(capsys, "preview").split())
    assert "(default: grid.png)" in preview and "--overwrite replace --out if it exists" in preview


def test_dashed_flags_are_hidden_aliases():
    parser = build_parser()
    dashed = parser.parse_args(["stats", "x", "--min-similarity", "0.3", "--max-aspect-ratio", "2",
                                "--allow-missing-caption", "--max-pixels", "99", "--no-decode"])
    plain = parser.parse_args(["stats", "x", "--min_similarity", "0.3", "--max_aspect_ratio", "2",
                               "--allow_missing_caption", "--max_pixels", "99", "--no_decode"])
    assert vars(dashed) == vars(plain)
    assert plain.min_similarity == 0.3 and plain.no_decode and plain.max_pixels == 99
    assert parser.parse_args(["convert", "x", "o", "--no-verify"]).no_verify
    defaults = parser.parse_args(["stats", "x"])
    assert defaults.min_similarity is None and not defaults.no_decode


def test_errors_are_clear(tmp_path, capsys):
    rc, _, err = run(capsys, "stats", f"webdataset:{tmp_path}/none-*.tar")
    assert rc == 2 and "no files match" in err
    rc, _, err = run(capsys, "stats", "s3:/bucket/x.tar")
    assert rc == 2 and "must start with one of" in err
