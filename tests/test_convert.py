"""owl-convert: official PyTorch layout <-> owl_jax checkpoints, LoRA merge, errors.

References: the official key list / shapes and the official->flax mapping re-derived in
tests/official_layout.py (independent of convert/keymap.py), the Owl module's own param shapes,
a numpy LoRA merge, and bit-exact round trips.
"""
import json
import os
import subprocess
import sys
import textwrap

import ml_dtypes
import numpy as np
import pytest
import torch

from owl_jax.convert import keymap
from owl_jax.families.owl1 import keymap as owl_keymap
from owl_jax.convert.cli import main
from owl_jax.convert.official import jax_to_torch, torch_to_jax
from owl_jax.convert.torch_io import CheckpointError, CheckpointReader, numpy_to_torch
from owl_jax import checkpoint as ckpt
from owl_jax.families.owl1.config import OwlConfig, save_official, tiny
from owl_jax.testing.checkpoints import write_official_checkpoint
import official_layout  # tests/ is on sys.path (pytest rootdir-relative import)

DTYPES = ("float32", "float16", "bfloat16")
LAYOUTS = ("bin", "sharded_bin", "safetensors", "sharded_safetensors")


def _cfg():
    # GQA in the LLM and non-square sizes everywhere, so a transposed / swapped tensor shows.
    return tiny(num_key_value_heads=2)


def _read(directory):
    return dict(CheckpointReader(directory).tensors())


def _bits(x):
    return np.ascontiguousarray(x).view(np.uint8)


# --------------------------------------------------------------------------------------------
# The key table


def test_keymap_matches_reference_and_model():
    cfg = _cfg()
    entries = owl_keymap.official_entries(cfg)
    torch_shapes = {e.torch_key: e.torch_shape for e in entries if e.kind != keymap.BUFFER}
    assert torch_shapes == official_layout.official_shapes(cfg)
    assert {e.path_str: e.jax_shape for e in entries if e.kind != keymap.BUFFER} == \
        ckpt.expected_shapes(cfg)
    bufs = [e.torch_key for e in entries if e.kind == keymap.BUFFER]
    assert bufs == [f"language_model.model.layers.{i}.self_attn.rotary_emb.inv_freq"
                    for i in range(cfg.text.num_hidden_layers)]
    # The released 7B model: 7,123,070,976 elements including the 32 inv_freq buffers.
    big = owl_keymap.official_entries(OwlConfig())
    assert sum(int(np.prod(e.torch_shape)) for e in big) == 7_123_070_976
    assert sum(e.kind == keymap.BUFFER for e in big) == 32


# --------------------------------------------------------------------------------------------
# Round trips


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_round_trip_bit_exact(tmp_path, dtype, layout):
    cfg = _cfg()
    src, jx, back = tmp_path / "src", tmp_path / "jax", tmp_path / "back"
    keys = write_official_checkpoint(str(src), cfg, dtype, layout, seed=1)
    meta = torch_to_jax(str(src), str(jx), progress=False)
    assert meta["dtype"] == dtype and meta["lora"] is None
    fmt = "safetensors" if "safetensors" in layout else "bin"
    shard = "40KB" if layout.startswith("sharded") else "10GB"
    names = jax_to_torch(str(jx), str(back), fmt=fmt, shard_size=shard, progress=False)
    assert (len(names) > 1) == layout.startswith("sharded")
    a, b = _read(str(src)), _read(str(back))
    assert set(b) == set(a) == set(keys)          # exactly the official keys, inv_freq included
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert np.array_equal(_bits(a[k]), _bits(b[k])), k
    for f in ("config.json", "preprocessor_config.json"):
        assert json.load(open(src / f)) == json.load(open(back / f))


def test_jax_params_equal_reference_mapping(tmp_path):
    """Values land where official_layout's independent official->flax mapping puts them."""
    cfg = _cfg()
    write_official_checkpoint(str(tmp_path / "src"), cfg, "float32", "sharded_safetensors")
    torch_to_jax(str(tmp_path / "src"), str(tmp_path / "jax"), progress=False)
    got_cfg, params, meta = ckpt.load_checkpoint(str(tmp_path / "jax"))
    assert got_cfg == cfg
    sd = {k: v for k, v in _read(str(tmp_path / "src")).items() if "inv_freq" not in k}
    want = official_layout.official_to_flax(sd, cfg)
    flat_w, flat_g = keymap.flatten(want), keymap.flatten(params)
    assert set(flat_w) == set(flat_g)
    for p in flat_w:
        np.testing.assert_array_equal(flat_g[p], flat_w[p], err_msg="/".join(p))


def test_dtype_flag_and_cast_on_load(tmp_path):
    cfg = _cfg()
    write_official_checkpoint(str(tmp_path / "src"), cfg, "bfloat16", "bin")
    meta = torch_to_jax(str(tmp_path / "src"), str(tmp_path / "f32"), dtype="float32",
                        progress=False)
    assert meta["dtype"] == "float32"
    torch_to_jax(str(tmp_path / "src"), str(tmp_path / "bf16"), progress=False)
    _, p32, _ = ckpt.load_checkpoint(str(tmp_path / "f32"))
    _, pcast, _ = ckpt.load_checkpoint(str(tmp_path / "bf16"), dtype=np.float32)
    _, pbf, _ = ckpt.load_checkpoint(str(tmp_path / "bf16"))
    k = ("language_model", "layers_1", "mlp", "down_proj", "kernel")
    assert keymap.get_path(pbf, k).dtype == ml_dtypes.bfloat16
    assert keymap.get_path(pcast, k).dtype == np.float32
    np.testing.assert_array_equal(keymap.get_path(pcast, k), keymap.get_path(p32, k))
    # fp32 master copy -> bf16 official files: bit-identical to the original bf16 files.
    jax_to_torch(str(tmp_path / "f32"), str(tmp_path / "back"), dtype="bfloat16",
                 progress=False)
    a, b = _read(str(tmp_path / "src")), _read(str(tmp_path / "back"))
    assert all(np.array_equal(_bits(a[k]), _bits(b[k])) for k in a)


@pytest.mark.slow
def test_restore_into_shardings_8_devices(tmp_path):
    cfg = _cfg()
    write_official_checkpoint(str(tmp_path / "src"), cfg, "bfloat16", "safetensors")
    torch_to_jax(str(tmp_path / "src"), str(tmp_path / "jax"), progress=False)
    code = textwrap.dedent(f"""
        import jax, numpy as np
        from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
        from owl_jax import checkpoint as ckpt
        mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("fsdp", "tensor"))
        _, host, _ = ckpt.load_checkpoint({str(tmp_path / "jax")!r}, dtype=np.float32)
        def spec(x):
            if x.ndim == 2 and x.shape[0] % 4 == 0 and x.shape[1] % 2 == 0:
                return NamedSharding(mesh, P("fsdp", "tensor"))
            return NamedSharding(mesh, P())
        shardings = jax.tree.map(spec, host)
        _, params, _ = ckpt.load_checkpoint({str(tmp_path / "jax")!r}, dtype=np.float32,
                                            shardings=shardings)
        emb = params["language_model"]["embed_tokens"]["embedding"]
        assert emb.sharding == shardings["language_model"]["embed_tokens"]["embedding"]
        assert len(emb.addressable_shards) == 8 and emb.addressable_shards[0].data.shape[0] \\
            == emb.shape[0] // 4
        assert emb.dtype == np.float32
        for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(host)):
            np.testing.assert_array_equal(np.asarray(a), b)
        print("OK")
    """)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
               JAX_PLATFORMS="cpu")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0 and "OK" in r.stdout, r.stderr[-3000:]


# --------------------------------------------------------------------------------------------
# LoRA (PEFT keys)


def _numpy_merge(sd, base, scale):
    w = sd[base + ".weight"].astype(np.float32)
    a = sd[base + ".lora_A.default.weight"].astype(np.float32)
    b = sd[base + ".lora_B.default.weight"].astype(np.float32)
    return w + np.float32(scale) * (b @ a)


@pytest.mark.parametrize("dtype,base_layer", [("float32", False), ("bfloat16", True)])
def test_lora_merge_against_numpy(tmp_path, dtype, base_layer):
    cfg = _cfg()
    lora = dict(rank=4, alpha=16, targets=("q_proj", "v_proj"), base_layer=base_layer)
    keys = write_official_checkpoint(str(tmp_path / "src"), cfg, dtype, "sharded_bin", lora=lora)
    assert any(k.startswith("base_model.model.") and "lora_B.default" in k for k in keys)
    torch_to_jax(str(tmp_path / "src"), str(tmp_path / "jax"), progress=False)
    _, params, meta = ckpt.load_checkpoint(str(tmp_path / "jax"))
    assert meta["merged_lora"] == {"rank": 4, "alpha": 16.0, "targets": ["q_proj", "v_proj"]}
    raw = _read(str(tmp_path / "src"))
    sd = {k[len("base_model.model."):].replace(".base_layer.", "."): v for k, v in raw.items()}
    for i in range(cfg.text.num_hidden_layers):
        for proj in ("q_proj", "v_proj"):
            base = f"language_model.model.layers.{i}.self_attn.{proj}"
            want = _numpy_merge(sd, base, 16 / 4)
            got = keymap.get_path(params, ("language_model", f"layers_{i}", "self_attn", proj,
                                           "kernel")).T.astype(np.float32)
            tol = 1e-6 if dtype == "float32" else 2 ** -7 * np.abs(want).max()
            np.testing.assert_allclose(got, want, atol=tol, rtol=0)
            assert np.abs(want - sd[base + ".weight"].astype(np.float32)).max() > 1e-2
        k_proj = ("language_model", f"layers_{i}", "self_attn", "k_proj", "kernel")
        np.testing.assert_array_equal(
            keymap.get_path(params, k_proj).T,
            sd[f"language_model.model.layers.{i}.self_attn.k_proj.weight"])


def test_lora_alpha_from_flags_and_keep_unmerged(tmp_path):
    cfg = _cfg()
    lora = dict(rank=4, alpha=8, targets=("q_proj", "v_proj"), write_config=False)
    src = str(tmp_path / "src")
    write_official_checkpoint(src, cfg, "float32", "safetensors", lora=lora)
    with pytest.raises(ValueError, match="--lora_alpha"):
        torch_to_jax(src, str(tmp_path / "x"), progress=False)
    with pytest.raises(ValueError, match="rank 8 .* rank 4"):
        torch_to_jax(src, str(tmp_path / "x"), lora_alpha=8, lora_r=8, progress=False)
    torch_to_jax(src, str(tmp_path / "merged"), lora_alpha=8, lora_r=4, progress=False)
    meta = torch_to_jax(src, str(tmp_path / "kept"), lora_alpha=8, keep_lora=True,
                        progress=False)
    assert meta["lora"] == {"rank": 4, "alpha": 8.0, "targets": ["q_proj", "v_proj"]}
    _, kept, _ = ckpt.load_checkpoint(str(tmp_path / "kept"))
    q = keymap.get_path(kept, ("language_model", "layers_0", "self_attn", "q_proj"))
    assert q["lora_a"].shape == (cfg.text.hidden_size, 4)
    assert q["lora_b"].shape == (4, cfg.text.hidden_size)
    # Export merges the kept adapters: same files as exporting the merged conversion.
    jax_to_torch(str(tmp_path / "kept"), str(tmp_path / "kept_t"), progress=False)
    jax_to_torch(str(tmp_path / "merged"), str(tmp_path / "merged_t"), progress=False)
    a, b = _read(str(tmp_path / "kept_t")), _read(str(tmp_path / "merged_t"))
    assert set(a) == set(b) and all(np.array_equal(a[k], b[k]) for k in a)
    assert not any("lora" in k or k.startswith("base_model") for k in a)


def test_kept_lora_forward_equals_merged(tmp_path):
    """Owl(lora=...) on the unmerged adapters == plain Owl on the merged weights."""
    import jax
    import jax.numpy as jnp
    from owl_jax.layers.core import LoraSpec
    from owl_jax.families.owl1.model import Owl
    cfg = _cfg()
    src = str(tmp_path / "src")
    write_official_checkpoint(src, cfg, "float32", "bin",
                              lora=dict(rank=4, alpha=16, targets=("q_proj", "v_proj")))
    torch_to_jax(src, str(tmp_path / "m"), progress=False)
    torch_to_jax(src, str(tmp_path / "k"), keep_lora=True, progress=False)
    _, pm, _ = ckpt.load_checkpoint(str(tmp_path / "m"))
    _, pk, meta = ckpt.load_checkpoint(str(tmp_path / "k"))
    ids = jnp.array([[1, 5, 9, 3, 7, 2]], jnp.int32)
    spec = LoraSpec(rank=meta["lora"]["rank"], alpha=meta["lora"]["alpha"])
    plain = Owl(cfg)
    adapted = Owl(cfg, lora=spec, lora_targets=tuple(meta["lora"]["targets"]))
    lm = jax.jit(lambda p: plain.apply({"params": p}, ids))(pm)
    lk = jax.jit(lambda p: adapted.apply({"params": p}, ids))(pk)
    np.testing.assert_allclose(np.asarray(lk), np.asarray(lm), atol=1e-4, rtol=1e-4)
    assert float(jnp.abs(lm).max()) > 0.1


# --------------------------------------------------------------------------------------------
# Bad input: clear errors naming the key / file


def _rewrite_safetensors(directory, fn):
    from safetensors.torch import save_file
    path = os.path.join(directory, "model.safetensors")
    sd = {k: numpy_to_torch(np.array(v)) for k, v in _read(directory).items()}
    fn(sd)
    save_file(sd, path, metadata={"format": "pt"})


@pytest.fixture
def good_src(tmp_path):
    src = str(tmp_path / "src")
    write_official_checkpoint(src, _cfg(), "float32", "safetensors")
    return src


def test_error_missing_key(good_src, tmp_path):
    key = "abstractor.encoder.layers.1.crossattention.output.mlp.w3.weight"
    _rewrite_safetensors(good_src, lambda sd: sd.pop(key))
    with pytest.raises(CheckpointError, match=f"missing key {key}"):
        torch_to_jax(good_src, str(tmp_path / "out"), progress=False)
    assert not os.path.exists(tmp_path / "out")  # nothing written on failure


def test_error_unexpected_key(good_src, tmp_path):
    _rewrite_safetensors(good_src, lambda sd: sd.update(
        {"vision_model.encoder.layers.0.mlp.fc3.weight": torch.zeros(3, 3)}))
    with pytest.raises(CheckpointError, match=r"unexpected key vision_model\.encoder\.layers"
                                              r"\.0\.mlp\.fc3\.weight \[3, 3\]"):
        torch_to_jax(good_src, str(tmp_path / "out"), progress=False)


def test_error_wrong_shape(good_src, tmp_path):
    key = "language_model.model.layers.0.mlp.up_proj.weight"
    _rewrite_safetensors(good_src, lambda sd: sd.update({key: torch.zeros(95, 64)}))
    with pytest.raises(CheckpointError, match=rf"{key}: config.json implies shape \[96, 64\], "
                                              rf"model.safetensors has \[95, 64\]"):
        torch_to_jax(good_src, str(tmp_path / "out"), progress=False)


def test_error_config_does_not_match_weights(good_src, tmp_path):
    path = os.path.join(good_src, "config.json")
    c = json.load(open(path))
    c["text_config"]["vocab_size"] = 300
    json.dump(c, open(path, "w"))
    with pytest.raises(CheckpointError) as e:
        torch_to_jax(good_src, str(tmp_path / "out"), progress=False)
    msg = str(e.value)
    assert "language_model.model.embed_tokens.weight: config.json implies shape [300, 64], " \
           "model.safetensors has [256, 64]" in msg
    assert "language_model.lm_head.weight" in msg


def test_error_fewer_layers_in_config(good_src, tmp_path):
    path = os.path.join(good_src, "config.json")
    c = json.load(open(path))
    c["vision_config"]["num_hidden_layers"] = 1
    json.dump(c, open(path, "w"))
    with pytest.raises(CheckpointError, match="unexpected key vision_model.encoder.layers.1."):
        torch_to_jax(good_src, str(tmp_path / "out"), progress=False)


@pytest.mark.parametrize("layout", ["bin", "safetensors", "sharded_bin"])
def test_error_truncated_file(tmp_path, layout):
    src = str(tmp_path / "src")
    write_official_checkpoint(src, _cfg(), "float16", layout)
    files = sorted(f for f in os.listdir(src) if f.endswith((".bin", ".safetensors")))
    victim = os.path.join(src, files[-1])
    size = os.path.getsize(victim)
    with open(victim, "r+b") as f:
        f.truncate(size // 2)
    with pytest.raises(CheckpointError, match=f"{files[-1]}: unreadable or truncated"):
        torch_to_jax(src, str(tmp_path / "out"), progress=False)


def test_error_missing_shard_and_no_weights(tmp_path):
    src = str(tmp_path / "src")
    write_official_checkpoint(src, _cfg(), "float16", "sharded_safetensors")
    index = json.load(open(os.path.join(src, "model.safetensors.index.json")))
    victim = sorted(set(index["weight_map"].values()))[1]
    assert victim.startswith("model-00002-of-")
    os.remove(os.path.join(src, victim))
    with pytest.raises(CheckpointError, match=f"shard files that do not exist: .*{victim}"):
        torch_to_jax(src, str(tmp_path / "out"), progress=False)
    empty = tmp_path / "empty"
    empty.mkdir()
    save_official(_cfg(), str(empty))
    with pytest.raises(CheckpointError, match="no weights found"):
        torch_to_jax(str(empty), str(tmp_path / "out"), progress=False)


def test_error_not_weights_only(tmp_path):
    src = str(tmp_path / "src")
    save_official(_cfg(), src)
    torch.save({"x": torch.zeros(2), "evil": OwlConfig}, os.path.join(src, "pytorch_model.bin"))
    with pytest.raises(CheckpointError,
                       match="refused: .*global owl_jax.families.owl1.config.OwlConfig"):
        torch_to_jax(src, str(tmp_path / "out"), progress=False)


class _Touch:
    """Unpickling this runs `callable(marker)`, which would create the marker file."""

    def __init__(self, how, marker):
        self.how, self.marker = how, marker

    def __reduce__(self):
        if self.how == "system":
            return os.system, (f"touch {self.marker}",)
        return open, (self.marker, "w")


@pytest.mark.parametrize("legacy", [True, False], ids=["legacy", "zip"])
@pytest.mark.parametrize("how,global_name", [("system", "posix.system"), ("open", "io.open")])
def test_malicious_pickle_is_refused_not_run(tmp_path, capsys, legacy, how, global_name):
    src = str(tmp_path / "src")
    save_official(_cfg(), src)
    marker = tmp_path / "ran"
    path = os.path.join(src, "pytorch_model.bin")
    torch.save({"x": torch.zeros(2), "y": _Touch(how, str(marker))}, path,
               _use_new_zipfile_serialization=not legacy)
    assert main(["torch-to-jax", src, str(tmp_path / "o"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert not marker.exists()  # the callable never ran
    assert f"{path}: refused: it holds objects (global {global_name}) that a weights-only " \
           f"load does not allow" in err
    assert "truncated" not in err and "\x1b" not in err and "weights_only=False" not in err
    assert not os.path.exists(tmp_path / "o")


def _legacy_bin(directory):
    """A one-file legacy (non-zip) checkpoint of the tiny model; returns its path and bytes."""
    write_official_checkpoint(directory, _cfg(), "float16", "bin")
    path = os.path.join(directory, "pytorch_model.bin")
    torch.save(torch.load(path, weights_only=True), path, _use_new_zipfile_serialization=False)
    return path, open(path, "rb").read()


def test_truncated_legacy_pickle_is_truncated_not_refused(tmp_path):
    src = str(tmp_path / "src")
    path, data = _legacy_bin(src)
    assert not data.startswith(b"PK")
    assert len(CheckpointReader(src).index()) > 0
    # inside a GLOBAL line torch's unpickler sees a clipped global name ("collections.Ord") and
    # refuses it; that is still a truncated file
    inside_global = data.index(b"collections\nOrderedDict") + len("collections\nOrd")
    for cut in (inside_global, 60, len(data) // 3, len(data) - 10):
        with open(path, "wb") as f:
            f.write(data[:cut])
        with pytest.raises(CheckpointError) as e:
            CheckpointReader(src).index()
        msg = str(e.value)
        assert msg.startswith(f"{path}: unreadable or truncated torch checkpoint"), (cut, msg)
        assert "refused" not in msg and "\x1b" not in msg


def test_cli_reports_errors_and_converts(good_src, tmp_path, capsys):
    os.remove(os.path.join(good_src, "config.json"))
    assert main(["torch-to-jax", good_src, str(tmp_path / "o"), "--quiet"]) == 2
    assert "config.json: not found" in capsys.readouterr().err
    src = str(tmp_path / "src2")
    write_official_checkpoint(src, _cfg(), "bfloat16", "sharded_bin")
    assert main(["torch-to-jax", src, str(tmp_path / "j"), "--quiet"]) == 0
    assert main(["torch-to-jax", src, str(tmp_path / "j"), "--quiet"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(["jax-to-torch", str(tmp_path / "j"), str(tmp_path / "t"), "--quiet",
                 "--format", "safetensors", "--shard_size", "50KB", "--dtype", "float16"]) == 0
    back = _read(str(tmp_path / "t"))
    assert all(v.dtype == np.float16 for v in back.values())
    assert os.path.exists(tmp_path / "t" / "model.safetensors.index.json")
