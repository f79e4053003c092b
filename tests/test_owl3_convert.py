"""mPLUG-Owl3 checkpoints: the official layout both ways (bit-exact round trips, fp32 / bf16,
single / sharded), named errors on bad keys, and from-hf (a Qwen2 + a SigLIP directory) checked
against transformers' Qwen2ForCausalLM and SiglipVisionModel on the same weights."""
import os
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from owl_jax import checkpoint as ckpt
from owl_jax.convert import owl3 as conv
from owl_jax.convert.cli import main
from owl_jax.convert.torch_io import CheckpointError, CheckpointReader

GOLDEN = os.path.join(os.path.dirname(__file__), "golden", "owl3")


def tensors(directory):
    return dict(CheckpointReader(directory).tensors())


@pytest.mark.parametrize("version", ["240728", "241101"])
def test_official_round_trip_is_bit_exact(version, tmp_path):
    src = os.path.join(GOLDEN, version)
    assert main(["torch-to-jax", src, str(tmp_path / "jax"), "--quiet"]) == 0
    cfg, _, meta = ckpt.load_checkpoint(str(tmp_path / "jax"))
    assert meta["family"] == "owl3" and cfg.version == version
    assert main(["jax-to-torch", str(tmp_path / "jax"), str(tmp_path / "pt"), "--quiet"]) == 0
    want = {k: v for k, v in tensors(src).items() if not k.startswith("vision_model.head.")}
    got = tensors(str(tmp_path / "pt"))
    assert sorted(got) == sorted(want)
    for k in want:
        assert got[k].dtype == want[k].dtype and np.array_equal(got[k], want[k]), k
    assert conv.load_config(str(tmp_path / "pt")) == cfg
    # bf16, sharded, and back: the bf16 bits survive
    assert main(["jax-to-torch", str(tmp_path / "jax"), str(tmp_path / "bf"), "--quiet",
                 "--dtype", "bfloat16", "--shard_size", "150KB"]) == 0
    assert os.path.exists(tmp_path / "bf" / "model.safetensors.index.json")
    assert main(["torch-to-jax", str(tmp_path / "bf"), str(tmp_path / "jbf"), "--quiet"]) == 0
    assert main(["jax-to-torch", str(tmp_path / "jbf"), str(tmp_path / "bf2"), "--quiet"]) == 0
    a, b = tensors(str(tmp_path / "bf")), tensors(str(tmp_path / "bf2"))
    assert sorted(a) == sorted(b)
    for k in a:
        assert str(a[k].dtype) == "bfloat16" and a[k].tobytes() == b[k].tobytes(), k


def test_bad_keys_are_named(tmp_path):
    src = os.path.join(GOLDEN, "240728")
    sd = load_file(os.path.join(src, "model.safetensors"))
    cases = {
        "missing key language_model.model.layers.2.self_attn.v_kv_proj.weight":
            lambda d: d.pop("language_model.model.layers.2.self_attn.v_kv_proj.weight"),
        "unexpected key language_model.model.layers.1.self_attn.v_kv_proj.weight":
            lambda d: d.update({"language_model.model.layers.1.self_attn.v_kv_proj.weight":
                                d["language_model.model.layers.0.self_attn.v_kv_proj.weight"]}),
        "language_model.model.layers.0.self_attn.gate_proj.0.weight: config.json implies "
        "shape [16, 16]":
            lambda d: d.update({"language_model.model.layers.0.self_attn.gate_proj.0.weight":
                                np.zeros((16, 8), np.float32)}),
    }
    for i, (message, edit) in enumerate(cases.items()):
        d = tmp_path / f"bad{i}"
        d.mkdir()
        shutil.copy(os.path.join(src, "config.json"), d / "config.json")
        bad = dict(sd)
        edit(bad)
        save_file(bad, str(d / "model.safetensors"))
        with pytest.raises(CheckpointError, match="(?s)" + message.replace("[", r"\[")):
            conv.torch_to_jax(str(d), str(tmp_path / f"out{i}"), progress=False)


def test_from_hf_qwen2_and_siglip_match_transformers(tmp_path):
    torch = pytest.importorskip("torch")
    from transformers import (Qwen2Config, Qwen2ForCausalLM, SiglipVisionConfig,
                              SiglipVisionModel)
    from owl_jax.families.owl3.model import Owl3
    torch.manual_seed(0)
    qc = Qwen2Config(vocab_size=96, hidden_size=48, intermediate_size=80, num_hidden_layers=3,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                     rope_theta=30000.0, rms_norm_eps=1e-5, tie_word_embeddings=True,
                     bos_token_id=1, eos_token_id=2)
    qwen = Qwen2ForCausalLM(qc).eval()
    sc = SiglipVisionConfig(hidden_size=32, intermediate_size=72, num_hidden_layers=3,
                            num_attention_heads=4, image_size=28, patch_size=14)
    sig = SiglipVisionModel(sc).eval()
    with torch.no_grad():
        for m in (qwen, sig):
            for name, p in m.named_parameters():
                p.copy_((1 if "norm" in name and "weight" in name else 0)
                        + 0.2 * torch.randn_like(p))
    qwen.save_pretrained(tmp_path / "qwen2")
    sig.save_pretrained(tmp_path / "siglip")
    assert main(["from-hf", str(tmp_path / "owl3"), "--family", "owl3", "--qwen2",
                 str(tmp_path / "qwen2"), "--siglip", str(tmp_path / "siglip"),
                 "--hyper_layers", "1,3", "--quiet"]) == 0
    cfg, params, _ = ckpt.load_checkpoint(str(tmp_path / "owl3"))
    assert cfg.text.tie_word_embeddings and "lm_head" not in params["language_model"]
    assert cfg.hyper_layers == (1, 3) and cfg.text.rope_theta == 30000.0
    kv = params["language_model"]["layers_0"]["self_attn"]["v_kv_proj"]
    assert kv["kernel"].shape == (48, 2 * 2 * 12) and not np.any(kv["bias"])
    assert 0.015 < float(np.std(kv["kernel"])) < 0.025   # N(0, 0.02), the official init
    model = Owl3(cfg)
    ids = np.random.default_rng(0).integers(3, 96, (2, 11)).astype(np.int32)
    logits = model.apply({"params": params}, jnp.asarray(ids))   # no images: plain Qwen2
    with torch.no_grad():
        want = qwen(torch.tensor(ids, dtype=torch.long)).logits.numpy()
    np.testing.assert_allclose(np.asarray(logits), want, atol=1e-4, rtol=1e-4)
    assert (np.asarray(logits).argmax(-1) == want.argmax(-1)).all()
    px = np.random.default_rng(1).standard_normal((2, 28, 28, 3)).astype(np.float32)
    feats = model.apply({"params": params}, jnp.asarray(px),
                        method=lambda m, x: m.vision_model(x))
    with torch.no_grad():
        hs = sig(torch.tensor(px.transpose(0, 3, 1, 2)), output_hidden_states=True)
    np.testing.assert_allclose(np.asarray(feats), hs.hidden_states[-2].numpy(), atol=1e-4,
                               rtol=1e-4)
