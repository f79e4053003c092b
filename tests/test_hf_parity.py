"""Converted weights run like their sources: HF LlamaForCausalLM and CLIPVisionModel (PyTorch,
transformers) on the same random weights, and tiny official checkpoints against the independent
numpy re-derivation of the official forward (tests/numpy_ref.py)."""
import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from owl_jax.convert import keymap
from owl_jax.convert.cli import main
from owl_jax.convert.hf_clip import fuse_qkv
from owl_jax.convert.official import jax_to_torch, torch_to_jax
from owl_jax.convert.torch_io import CheckpointReader
from owl_jax import checkpoint as ckpt
from owl_jax.families.owl1.config import save_official, tiny
from owl_jax.families.owl1.model import Owl
from owl_jax.encoders.vit import VisionTransformer
from owl_jax.testing.checkpoints import write_official_checkpoint
import numpy_ref  # tests/ is on sys.path (pytest rootdir-relative import)

# One tiny config (GQA in the LLM) for every test here, so the jitted forward compiles once per
# worker; the group keeps these tests on one xdist worker.
CFG = tiny(num_key_value_heads=2)
pytestmark = pytest.mark.xdist_group("convert_parity")


@functools.lru_cache(maxsize=4)
def _forward(cfg):
    """jit(params, ids [B, L], pixels NHWC [N, ...]) -> (logits, spliced input embeddings)."""
    model = Owl(cfg)

    @jax.jit
    def f(params, ids, px):
        v = {"params": params}
        embeds = model.apply(v, ids, model.apply(v, px, method=Owl.encode_images),
                             method=Owl.embed)
        return model.apply(v, ids, px), embeds
    return f


def _pixels(seed, n=2):
    """NCHW float64 (for numpy_ref / torch) and NHWC float32 (for owl_jax)."""
    px = np.random.default_rng(seed).standard_normal((n, 3, 28, 28))
    return px, jnp.asarray(px.transpose(0, 2, 3, 1), jnp.float32)


def _randomize(module: torch.nn.Module, seed: int):
    """Non-trivial weights: norm scales away from 1, non-zero biases."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
            elif p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=g) / np.sqrt(np.prod(p.shape[1:])))
            else:
                p.copy_(0.5 * torch.randn(p.shape, generator=g))


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """A tiny official config: the sizes of the parts HF does not provide."""
    d = str(tmp_path_factory.mktemp("base"))
    save_official(CFG, d)
    return d


def test_inv_freq_matches_hf_llama():
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
    cfg = CFG
    hf = LlamaRotaryEmbedding(LlamaConfig(hidden_size=cfg.text.hidden_size,
                                          num_attention_heads=cfg.text.num_attention_heads))
    np.testing.assert_array_equal(keymap.rope_inv_freq(cfg.text), hf.inv_freq.numpy())


def _hf_llama(tmp, tie=False, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM
    c = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                    rms_norm_eps=1e-6, tie_word_embeddings=tie, attn_implementation="eager")
    torch.manual_seed(seed)
    m = LlamaForCausalLM(c).eval()
    _randomize(m, seed)
    m.save_pretrained(tmp)
    with open(os.path.join(tmp, "tokenizer.model"), "wb") as f:
        f.write(b"not a real sentencepiece model; only copied")
    return m


def test_from_hf_llama_logits_match_transformers(tmp_path, base_dir):
    hf = _hf_llama(str(tmp_path / "hf"))
    assert main(["from-hf-llama", str(tmp_path / "hf"), str(tmp_path / "owl"), "--quiet",
                 "--base_config", base_dir, "--seed", "3"]) == 0
    cfg, params, meta = ckpt.load_checkpoint(str(tmp_path / "owl"))
    assert cfg == CFG  # text sizes from the HF config, the rest from --base_config
    assert meta["random_init"] == ["query_tokens", "abstractor", "vision_model"]
    assert os.path.exists(tmp_path / "owl" / "tokenizer.model")
    ids = np.array([[1, 17, 200, 5, 99, 42, 7, 255, 3, 64, 6],
                    [1, 8, 9, 10, 11, 12, 13, 14, 15, 2, 0]])   # no image slots
    ours, _ = _forward(cfg)(params, jnp.asarray(ids, jnp.int32), _pixels(0)[1])
    ours = np.asarray(ours)
    with torch.no_grad():
        ref = hf(torch.from_numpy(ids)).logits.numpy()
    assert np.abs(ref).max() > 1.0
    np.testing.assert_allclose(ours, ref, atol=1e-5, rtol=0)


def test_from_hf_llama_tied_head(tmp_path, base_dir):
    _hf_llama(str(tmp_path / "hf"), tie=True)
    assert "lm_head.weight" not in CheckpointReader(str(tmp_path / "hf")).index()
    assert main(["from-hf-llama", str(tmp_path / "hf"), str(tmp_path / "owl"), "--quiet",
                 "--base_config", base_dir]) == 0
    _, params, _ = ckpt.load_checkpoint(str(tmp_path / "owl"))
    lm = params["language_model"]
    np.testing.assert_array_equal(lm["lm_head"]["kernel"], lm["embed_tokens"]["embedding"].T)


def _hf_clip(tmp, eps=1e-6, seed=0):
    from transformers import CLIPVisionConfig, CLIPVisionModel
    c = CLIPVisionConfig(hidden_size=32, intermediate_size=80, num_hidden_layers=2,
                         num_attention_heads=4, image_size=28, patch_size=14, layer_norm_eps=eps,
                         hidden_act="quick_gelu", attn_implementation="eager")
    m = CLIPVisionModel(c).eval()
    _randomize(m, seed)
    m.save_pretrained(tmp)
    with open(os.path.join(tmp, "preprocessor_config.json"), "w") as f:
        json.dump({"image_mean": [0.5, 0.4, 0.3], "image_std": [0.2, 0.25, 0.3],
                   "crop_size": {"height": 28, "width": 28}}, f)
    return m


def test_from_hf_clip_matches_transformers(tmp_path, base_dir):
    hf = _hf_clip(str(tmp_path / "clip"))
    assert main(["from-hf-clip", str(tmp_path / "clip"), str(tmp_path / "owl"), "--quiet",
                 "--base_config", base_dir]) == 0
    cfg, params, meta = ckpt.load_checkpoint(str(tmp_path / "owl"))
    assert meta["random_init"] == ["query_tokens", "abstractor", "language_model"]
    assert cfg.image_mean == (0.5, 0.4, 0.3) and cfg.vision.layer_norm_eps == 1e-6
    px = np.random.default_rng(0).standard_normal((2, 3, 28, 28)).astype(np.float32)
    ours = VisionTransformer(cfg.vision).apply({"params": params["vision_model"]},
                                               jnp.asarray(px.transpose(0, 2, 3, 1)))
    with torch.no_grad():
        # Owl applies post_layernorm to every token; HF only to the pooled CLS.
        ref = hf.post_layernorm(hf(torch.from_numpy(px)).last_hidden_state).numpy()
    np.testing.assert_allclose(np.asarray(ours), ref, atol=1e-5, rtol=0)


def test_clip_fused_qkv_layout_and_prefixes(tmp_path, base_dir):
    """CLIPModel-style keys (`vision_model.` prefix, text tower) give the same ViT; the fused
    rows follow the official per-head [q|k|v] interleave; --clip_eps keeps CLIP's eps."""
    from safetensors.torch import load_file, save_file
    hf = _hf_clip(str(tmp_path / "clip"), eps=1e-5)
    sd = load_file(str(tmp_path / "clip" / "model.safetensors"))
    os.makedirs(tmp_path / "full")
    save_file({**{"vision_model." + k: v for k, v in sd.items()},
               "text_model.embeddings.token_embedding.weight": torch.zeros(4, 8),
               "logit_scale": torch.zeros(())}, str(tmp_path / "full" / "model.safetensors"))
    conf = json.load(open(tmp_path / "clip" / "config.json"))
    json.dump({"model_type": "clip", "vision_config": conf, "text_config": {}},
              open(tmp_path / "full" / "config.json", "w"))
    for src, out, extra in (("clip", "a", []), ("full", "b", ["--clip_eps"])):
        assert main(["from-hf-clip", str(tmp_path / src), str(tmp_path / out), "--quiet",
                     "--base_config", base_dir] + extra) == 0
    cfg_a, pa, _ = ckpt.load_checkpoint(str(tmp_path / "a"))
    cfg_b, pb, _ = ckpt.load_checkpoint(str(tmp_path / "b"))
    assert cfg_a.vision.layer_norm_eps == 1e-6 and cfg_b.vision.layer_norm_eps == 1e-5
    fa, fb = keymap.flatten(pa["vision_model"]), keymap.flatten(pb["vision_model"])
    assert all(np.array_equal(fa[k], fb[k]) for k in fa) and set(fa) == set(fb)
    qkv = pa["vision_model"]["layers_1"]["self_attn"]["query_key_value"]["kernel"]  # [D, 3D]
    attn = hf.encoder.layers[1].self_attn
    heads, hd = 4, 8
    w = qkv.T.reshape(heads, 3, hd, 32)
    for j, proj in enumerate((attn.q_proj, attn.k_proj, attn.v_proj)):
        np.testing.assert_array_equal(w[:, j].reshape(32, 32), proj.weight.detach().numpy())
    bias = fuse_qkv(attn.q_proj.bias.detach().numpy(), attn.k_proj.bias.detach().numpy(),
                    attn.v_proj.bias.detach().numpy(), heads)
    np.testing.assert_array_equal(
        pa["vision_model"]["layers_1"]["self_attn"]["query_key_value"]["bias"], bias)


def test_from_hf_llama_and_clip_compose(tmp_path):
    _hf_llama(str(tmp_path / "hf"))
    _hf_clip(str(tmp_path / "clip"))
    args = ["from-hf", str(tmp_path / "owl"), "--llama", str(tmp_path / "hf"), "--clip",
            str(tmp_path / "clip"), "--quiet", "--abstractor_layers", "1",
            "--abstractor_heads", "4", "--abstractor_intermediate", "48",
            "--num_query_tokens", "3"]
    assert main(args) == 0
    assert main(args[:1] + [str(tmp_path / "owl2")] + args[2:]) == 0
    assert main(args[:1] + [str(tmp_path / "owl3")] + args[2:] + ["--seed", "1"]) == 0
    cfg, p, meta = ckpt.load_checkpoint(str(tmp_path / "owl"))
    _, p2, _ = ckpt.load_checkpoint(str(tmp_path / "owl2"))
    _, p3, _ = ckpt.load_checkpoint(str(tmp_path / "owl3"))
    assert meta["random_init"] == ["query_tokens", "abstractor"]
    assert (cfg.vision.hidden_size, cfg.abstractor.hidden_size, cfg.text.hidden_size,
            cfg.image_tokens) == (32, 32, 64, 4)
    w = ("abstractor", "layers_0", "w1", "kernel")
    assert np.array_equal(keymap.get_path(p, w), keymap.get_path(p2, w))      # seeded
    assert not np.array_equal(keymap.get_path(p, w), keymap.get_path(p3, w))
    assert np.abs(keymap.get_path(p, w)).max() > 0
    assert os.path.exists(tmp_path / "owl" / "tokenizer.model")
    ckpt.check_params_against_config(
        {"/".join(k): v.shape for k, v in keymap.flatten(p).items()}, cfg, None, "owl")


# --------------------------------------------------------------------------------------------
# Full tiny official checkpoints: converted forward == numpy re-derivation on the same weights


@pytest.mark.parametrize("dtype,layout", [("bfloat16", "bin"), ("float32", "sharded_bin")])
def test_official_checkpoint_forward_matches_reference(tmp_path, dtype, layout):
    cfg = CFG
    src = str(tmp_path / "src")
    write_official_checkpoint(src, cfg, dtype, layout, seed=7)
    torch_to_jax(src, str(tmp_path / "jax"), progress=False)
    cfg2, params, _ = ckpt.load_checkpoint(str(tmp_path / "jax"), dtype=np.float32)
    sd = {k: np.asarray(v, np.float64) for k, v in CheckpointReader(src).tensors()}
    t = cfg.image_tokens
    ids = np.array([[1, 5, 6] + [-1] * t + [7, 8, 9], [1] + [-1] * t + [10, 11, 12, 13, 2]])
    px, px_nhwc = _pixels(1)
    ours, _ = _forward(cfg2)(params, jnp.asarray(ids, jnp.int32), px_nhwc)
    ref = numpy_ref.owl_logits(sd, cfg, ids, px)
    assert np.abs(ref).max() > 1.0
    np.testing.assert_allclose(np.asarray(ours), ref, atol=2e-4 * np.abs(ref).max(), rtol=0)


def test_exported_language_model_loads_strictly_into_transformers(tmp_path):
    """jax-to-torch output: the `language_model.` tensors load with strict key matching into
    transformers' LlamaForCausalLM (4.28.1 adds inv_freq, which we write too) and give our
    logits on the spliced embeddings."""
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = CFG
    write_official_checkpoint(str(tmp_path / "src"), cfg, "float32", "safetensors", seed=3)
    torch_to_jax(str(tmp_path / "src"), str(tmp_path / "jax"), progress=False)
    jax_to_torch(str(tmp_path / "jax"), str(tmp_path / "out"), fmt="safetensors",
                 progress=False)
    sd = {k: torch.from_numpy(np.array(v)) for k, v in
          CheckpointReader(str(tmp_path / "out")).tensors()}
    lm_sd = {k[len("language_model."):]: v for k, v in sd.items()
             if k.startswith("language_model.") and not k.endswith("rotary_emb.inv_freq")}
    t = cfg.text
    hf = LlamaForCausalLM(LlamaConfig(
        vocab_size=t.vocab_size, hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
        num_hidden_layers=t.num_hidden_layers, num_attention_heads=t.num_attention_heads,
        num_key_value_heads=t.kv_heads, rms_norm_eps=t.rms_norm_eps,
        max_position_embeddings=t.max_position_embeddings, attn_implementation="eager")).eval()
    hf.load_state_dict(lm_sd, strict=True)
    _, params, _ = ckpt.load_checkpoint(str(tmp_path / "jax"))
    t = cfg.image_tokens
    ids = jnp.array([[1, 4] + [-1] * t + [9, 8, 7, 6], [1] + [-1] * t + [3, 4, 5, 6, 2]],
                    jnp.int32)
    ours, embeds = _forward(cfg)(params, ids, _pixels(2)[1])
    with torch.no_grad():
        ref = hf(inputs_embeds=torch.from_numpy(np.array(embeds))).logits.numpy()
    np.testing.assert_allclose(np.asarray(ours), ref, atol=1e-4, rtol=0)
