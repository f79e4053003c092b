"""owl-convert for LLaVA: config.json readers / writers, llava-hf and original layouts round trip
bit-exact (every transformers key spelling, sharded, fp32 / fp16 / bf16), converted models run
as transformers' does, key errors are named, from-hf copies its sources and seeds the projector.
"""
import dataclasses
import json
import os
import shutil

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch

from owl_jax import checkpoint as ckpt
from owl_jax.convert import llava as conv
from owl_jax.convert.cli import main
from owl_jax.convert.torch_io import CheckpointError, CheckpointReader, ShardedWriter
from owl_jax.families.llava import config as lc, keymap
from test_llava_model import CFG, _close, _jitted, _pixels, _randomize, _rows, hf_llava

pytestmark = pytest.mark.xdist_group("llava_model")


def _arrays(directory):
    return {k: np.array(v, copy=True) for k, v in CheckpointReader(directory).tensors()}


def _write(directory, arrays, shard="10GB", fmt="safetensors"):
    w = ShardedWriter(directory, fmt, shard)
    for k, v in arrays.items():
        w.add(k, v)
    return w.close()


def _same_bits(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def _state(module, dtype=np.float32):
    return {k: v.detach().numpy().astype(dtype) for k, v in module.state_dict().items()}


# --------------------------------------------------------------------------------------------
# config.json


def test_hf_default_tables_are_transformers_defaults():
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig
    from owl_jax.decoder.hf_config import LLAMA_DEFAULTS
    for table, hf in ((LLAMA_DEFAULTS, LlamaConfig()),
                      (lc.HF_CLIP_VISION_DEFAULTS, CLIPVisionConfig()),
                      (lc.HF_LLAVA_DEFAULTS, LlavaConfig())):
        for k, v in table.items():
            got = hf.rope_parameters["rope_theta"] if k == "rope_theta" else getattr(hf, k)
            assert got == v, k


@pytest.mark.parametrize("cfg", [CFG, CFG.replace(projector="linear", image_aspect_ratio="square",
                                                  image_token_index=None,
                                                  vision_feature_select_strategy="full",
                                                  vision_feature_layer=1,
                                                  image_mean=(0.5, 0.4, 0.3))])
def test_config_round_trips(cfg, tmp_path):
    lc.save(cfg, str(tmp_path))
    assert lc.load(str(tmp_path)) == cfg
    tower = tmp_path / "tower"
    clip_conf, clip_pre = lc.clip_dicts(cfg)
    orig = lc.to_original_dict(cfg, str(tower))
    assert lc.from_original_dict(orig, clip_conf, clip_pre) == cfg
    assert orig["mm_projector_type"] == cfg.projector and orig["mm_hidden_size"] == 32


def test_transformers_reads_our_config_and_we_read_its():
    from transformers import LlavaConfig
    cfg = CFG.replace(text=dataclasses.replace(CFG.text, rope_theta=5e5))
    hf = LlavaConfig.from_dict(lc.to_hf_dict(cfg))
    t, v = hf.text_config, hf.vision_config
    assert (t.hidden_size, t.intermediate_size, t.num_hidden_layers, t.num_attention_heads,
            t.num_key_value_heads, t.vocab_size, t.rms_norm_eps) == (64, 96, 2, 4, 2, 100, 1e-6)
    assert t.rope_parameters["rope_theta"] == 5e5
    assert (v.hidden_size, v.intermediate_size, v.num_hidden_layers, v.image_size,
            v.patch_size, v.layer_norm_eps) == (32, 80, 3, 28, 14, 1e-5)
    assert (hf.image_token_index, hf.vision_feature_layer,
            hf.vision_feature_select_strategy) == (99, -2, "default")
    # transformers' own file (5.x keys: dtype, rope_parameters, head_dim, ...)
    assert lc.from_hf_dict(hf.to_dict(), lc.preprocessor_dict(cfg)) == cfg


def test_hub_config_leaving_fields_out_reads_as_transformers_does():
    """llava-1.5-7b-hf's config.json names only the fields that differ from the class
    defaults; the missing sizes are LlamaConfig's (7B), not errors."""
    hub = {"architectures": ["LlavaForConditionalGeneration"], "ignore_index": -100,
           "image_token_index": 32000, "model_type": "llava", "pad_token_id": 32001,
           "projector_hidden_act": "gelu",
           "text_config": {"_name_or_path": "lmsys/vicuna-7b-v1.5",
                           "architectures": ["LlamaForCausalLM"],
                           "max_position_embeddings": 4096, "model_type": "llama",
                           "rms_norm_eps": 1e-05, "torch_dtype": "float16",
                           "vocab_size": 32064},
           "tie_word_embeddings": False, "torch_dtype": "float16",
           "vision_config": {"hidden_size": 1024, "image_size": 336, "intermediate_size": 4096,
                             "model_type": "clip_vision_model", "num_attention_heads": 16,
                             "num_hidden_layers": 24, "patch_size": 14, "projection_dim": 768,
                             "vocab_size": 32000},
           "vision_feature_layer": -2, "vision_feature_select_strategy": "default",
           "vocab_size": 32064}
    assert lc.from_hf_dict(hub) == lc.LlavaConfig()
    assert lc.LlavaConfig().image_tokens == 576


@pytest.mark.parametrize("change,match", [
    ({"projector_hidden_act": "relu"}, "projector_hidden_act"),
    ({"vision_feature_layer": [-2, -1]}, "only one feature layer"),
    ({"vision_feature_select_strategy": "cls"}, "vision_feature_select_strategy"),
    ({"multimodal_projector_bias": False}, "multimodal_projector_bias"),
    ({"text_config": {"model_type": "mistral"}}, "text_config.model_type"),
    ({"vision_config": {"model_type": "siglip_vision_model"}}, "siglip_vision_model"),
    ({"vision_config": {"hidden_act": "gelu"}}, "hidden_act"),
    ({"text_config": {"rope_scaling": {"rope_type": "linear", "factor": 2.0}}}, "rope type"),
    ({"text_config": {"tie_word_embeddings": True}}, "tie_word_embeddings"),
    ({"image_token_index": 100}, "outside the vocabulary"),
    ({"model_type": "llava_next"}, "not a llava-hf"),
])
def test_hf_config_errors_name_the_field(change, match):
    d = lc.to_hf_dict(CFG)
    for k, v in change.items():
        d[k] = {**d[k], **v} if isinstance(v, dict) and isinstance(d.get(k), dict) else v
    with pytest.raises(ValueError, match=match):
        lc.from_hf_dict(d)


@pytest.mark.parametrize("change,match", [
    ({"mm_projector_type": "mlp3x_gelu"}, "mm_projector_type"),
    ({"mm_vision_select_feature": "cls"}, "mm_vision_select_feature"),
    ({"image_aspect_ratio": "anyres"}, "image_aspect_ratio"),
    ({"mm_patch_merge_type": "spatial_unpad"}, "mm_patch_merge_type"),
    ({"mm_use_im_start_end": True}, "mm_use_im_start_end"),
    ({"mm_hidden_size": 1024}, "mm_hidden_size"),
    ({"mm_vision_select_layer": None}, "mm_vision_select_layer"),
])
def test_original_config_errors_name_the_field(change, match):
    d = {**lc.to_original_dict(CFG, "/nowhere"), **change}
    with pytest.raises(ValueError, match=match):
        lc.from_original_dict(d, lc.clip_dicts(CFG)[0])


# --------------------------------------------------------------------------------------------
# llava-hf layout


def _spell_hub4(k):   # transformers 4.x hub files
    return k.replace("vision_tower.", "vision_tower.vision_model.", 1)


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory):
    """A random tiny llava-hf model, saved by transformers 5.23 itself."""
    hf = hf_llava(CFG, seed=12)
    d = str(tmp_path_factory.mktemp("hf_saved"))
    hf.save_pretrained(d)
    return hf, d


def _variant(hf_model, tmp, spelling, dtype, shard):
    hf, saved = hf_model
    src = str(tmp / f"src_{spelling}")
    if spelling == "modules":   # transformers 5.x module names (model.language_model.*, ...)
        arrays = _state(hf, dtype)
    else:
        arrays = {(_spell_hub4(k) if spelling == "hub4" else k): v.astype(dtype)
                  for k, v in _arrays(saved).items()}
    _write(src, arrays, shard)
    shutil.copy(os.path.join(saved, "config.json"), src)
    return src, arrays


@pytest.mark.parametrize("spelling,dtype,shard", [
    ("saved", np.float32, "10GB"), ("hub4", np.float16, "10GB"),
    ("modules", ml_dtypes.bfloat16, "10GB"), ("saved", np.float32, "60KB")])
def test_hf_round_trip_is_bit_exact(hf_model, tmp_path, spelling, dtype, shard):
    src, arrays = _variant(hf_model, tmp_path, spelling, dtype, shard)
    if shard != "10GB":
        assert os.path.exists(os.path.join(src, "model.safetensors.index.json"))
    dst, back = str(tmp_path / "jax"), str(tmp_path / "back")
    assert main(["torch-to-jax", src, dst, "--quiet"]) == 0
    meta = ckpt.load_meta(dst)
    assert meta["family"] == "llava" and meta["source_layout"] == "hf"
    assert main(["jax-to-torch", dst, back, "--quiet"]) == 0
    out = _arrays(back)
    want = {keymap.canonical_hf(k): v for k, v in arrays.items()}
    assert set(out) == set(want)
    for k, v in out.items():
        assert _same_bits(v, want[k]), k
    assert lc.load(back) == lc.load(dst) == CFG


def test_hf_export_loads_strictly_in_transformers_and_logits_match(hf_model, tmp_path):
    from transformers import LlavaForConditionalGeneration
    hf, saved = hf_model
    dst, back = str(tmp_path / "jax"), str(tmp_path / "back")
    conv.torch_to_jax(saved, dst, progress=False)
    cfg, params, _ = ckpt.load_checkpoint(dst)
    ids_t, ids = _rows(cfg, (0, 1, 2), 14, seed=13)
    px_t, px = _pixels(3, seed=14)
    with torch.no_grad():
        ref = hf(input_ids=ids_t, pixel_values=px_t).logits.numpy()
    _close(_jitted(cfg)(params, ids, px), ref)
    files = conv.jax_to_torch(dst, back, layout="hf", fmt="bin", progress=False)
    assert files == ["pytorch_model.bin"]
    loaded, info = LlavaForConditionalGeneration.from_pretrained(back, output_loading_info=True)
    assert not any(info.values()), info
    for k, v in hf.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k


def test_hf_key_errors_are_named(hf_model, tmp_path):
    _, saved = hf_model
    arrays = _arrays(saved)
    cases = {
        "missing": ({k: v for k, v in arrays.items() if k != "language_model.model.norm.weight"},
                    "missing key language_model.model.norm.weight [64]"),
        "extra": ({**arrays, "vision_tower.extra.weight": np.zeros(3, np.float32)},
                  "unexpected key vision_tower.extra.weight [3]"),
        "shape": ({**arrays, "multi_modal_projector.linear_2.bias": np.zeros(5, np.float32)},
                  "multi_modal_projector.linear_2.bias: the config implies shape [64], "
                  "model.safetensors has [5]"),
        "twice": ({**arrays, "model.multi_modal_projector.linear_2.bias":
                   arrays["multi_modal_projector.linear_2.bias"]}, "spelled twice"),
    }
    for name, (a, match) in cases.items():
        src = str(tmp_path / name)
        _write(src, a)
        shutil.copy(os.path.join(saved, "config.json"), src)
        with pytest.raises(CheckpointError, match=match.replace("[", r"\[")):
            conv.torch_to_jax(src, str(tmp_path / f"out_{name}"), progress=False)
        assert not os.path.exists(tmp_path / f"out_{name}")


def test_export_merges_lora_adapters(hf_model, tmp_path):
    _, saved = hf_model
    dst, lora_dst, back = (str(tmp_path / n) for n in ("jax", "lora", "back"))
    conv.torch_to_jax(saved, dst, progress=False)
    cfg, params, _ = ckpt.load_checkpoint(dst)
    params = jax.tree.map(np.array, params)
    rng, want = np.random.default_rng(15), {}
    for i in range(cfg.text.num_hidden_layers):
        q = params["language_model"][f"layers_{i}"]["self_attn"]["q_proj"]
        q["lora_a"] = rng.standard_normal((64, 2)).astype(np.float32)
        q["lora_b"] = rng.standard_normal((2, 64)).astype(np.float32)
        want[f"language_model.model.layers.{i}.self_attn.q_proj.weight"] = \
            (q["kernel"] + 2.0 * q["lora_a"] @ q["lora_b"]).T
    ckpt.save_checkpoint(lora_dst, params, cfg, lora={"rank": 2, "alpha": 4.0})
    conv.jax_to_torch(lora_dst, back, layout="hf", progress=False)
    out = _arrays(back)
    assert not any("lora" in k for k in out)
    for k, w in want.items():
        np.testing.assert_allclose(out[k], w, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------
# Original layout


def _original_source(tmp, cfg, seed, embedded=False):
    """An original LLaVA directory (LlavaLlamaForCausalLM keys, mm_vision_tower naming a hub
    id) and the CLIP tower as transformers 5.23 saves a CLIPVisionModel."""
    from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM
    llama = LlamaForCausalLM(LlamaConfig(**lc.text_to_dict(cfg.text)))
    clip = CLIPVisionModel(CLIPVisionConfig(**lc.vision_to_dict(cfg.vision)))
    _randomize(llama, seed)
    _randomize(clip, seed + 1)
    clip_dir, src = str(tmp / "clip"), str(tmp / "orig")
    clip.save_pretrained(clip_dir)
    arrays = _state(llama)
    g = np.random.default_rng(seed)
    for e in keymap.original_entries(cfg):
        if "mm_projector" in e.torch_key:
            arrays[e.torch_key] = g.standard_normal(e.torch_shape).astype(np.float32)
    if embedded:
        arrays.update({keymap.ORIGINAL_TOWER_PREFIX + "vision_model." + k: v
                       for k, v in _arrays(clip_dir).items()})
    _write(src, arrays, "100KB", fmt="bin")
    with open(os.path.join(src, "config.json"), "w") as f:
        json.dump(lc.to_original_dict(cfg, "openai/clip-vit-large-patch14-336"), f)
    return src, clip_dir, arrays


@pytest.mark.parametrize("projector", ["linear", "mlp2x_gelu"])
def test_original_round_trip_is_bit_exact(tmp_path, projector):
    from transformers import CLIPVisionModel, LlamaForCausalLM
    cfg = CFG.replace(projector=projector, image_token_index=None, image_aspect_ratio="square")
    src, clip_dir, arrays = _original_source(tmp_path, cfg, seed=20)
    dst, back = str(tmp_path / "jax"), str(tmp_path / "back")
    assert main(["torch-to-jax", src, dst, "--clip", clip_dir, "--quiet"]) == 0
    assert main(["jax-to-torch", dst, back, "--layout", "original", "--quiet"]) == 0
    out = _arrays(back)
    assert set(out) == set(arrays)
    assert all(_same_bits(out[k], arrays[k]) for k in arrays)
    tower, clip = _arrays(os.path.join(back, "vision_tower")), _arrays(clip_dir)
    assert set(tower) == {keymap.canonical_clip(k) for k in clip}
    assert all(_same_bits(tower[keymap.canonical_clip(k)], v) for k, v in clip.items())
    # the tower loads strictly in transformers, the LLM too (beside the projector, which only
    # the original code knows); the config finds the tower by itself
    _, info = CLIPVisionModel.from_pretrained(os.path.join(back, "vision_tower"),
                                              output_loading_info=True)
    assert not any(info.values()), info
    _, info = LlamaForCausalLM.from_pretrained(back, output_loading_info=True)
    assert sorted(info.pop("unexpected_keys")) == sorted(k for k in arrays if "mm_projector" in k)
    assert not any(info.values()), info
    assert lc.load(back) == lc.load(dst) == cfg


def test_original_tower_inside_the_checkpoint(tmp_path):
    """Self-trained runs store the tower under model.vision_tower.vision_tower.; its config
    still comes from the tower directory (here --clip, holding no weights)."""
    cfg = CFG.replace(image_token_index=None)
    src, clip_dir, _ = _original_source(tmp_path / "a", cfg, seed=21, embedded=True)
    ref_src, ref_clip, _ = _original_source(tmp_path / "b", cfg, seed=21)
    os.remove(os.path.join(clip_dir, "model.safetensors"))
    conv.torch_to_jax(src, str(tmp_path / "a" / "jax"), clip_dir, progress=False)
    conv.torch_to_jax(ref_src, str(tmp_path / "b" / "jax"), ref_clip, progress=False)
    got, ref = (ckpt._flat(ckpt.load_checkpoint(str(tmp_path / n / "jax"))[1]) for n in "ab")
    assert set(got) == set(ref)
    assert all(_same_bits(np.asarray(got[k]), np.asarray(ref[k])) for k in got)


def test_original_needs_its_tower(tmp_path, capsys):
    src, _, _ = _original_source(tmp_path, CFG.replace(image_token_index=None), seed=22)
    assert main(["torch-to-jax", src, str(tmp_path / "out"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "openai/clip-vit-large-patch14-336" in err and "--clip DIR" in err


def test_llava_hf_model_exports_to_the_original_layout_and_back(hf_model, tmp_path):
    _, saved = hf_model
    dst, orig, again = (str(tmp_path / n) for n in ("jax", "orig", "again"))
    conv.torch_to_jax(saved, dst, progress=False)
    conv.jax_to_torch(dst, orig, layout="original", progress=False)
    assert lc.load(orig) == CFG   # the image row stays (vocab 100) and is named
    conv.torch_to_jax(orig, again, progress=False)   # tower found at orig/vision_tower
    a, b = ckpt.load_checkpoint(dst)[1], ckpt.load_checkpoint(again)[1]
    fa, fb = ckpt._flat(a), ckpt._flat(b)
    assert set(fa) == set(fb) and all(_same_bits(np.asarray(fa[k]), np.asarray(fb[k]))
                                      for k in fa)


def test_export_refuses_what_llava_hf_cannot_hold(tmp_path):
    for name, cfg, match in (("linear", CFG.replace(projector="linear"), "linear"),
                             ("no_token", CFG.replace(image_token_index=None), "image token")):
        src, clip_dir, _ = _original_source(tmp_path / name, cfg, seed=23)
        dst = str(tmp_path / name / "jax")
        conv.torch_to_jax(src, dst, clip_dir, progress=False)
        with pytest.raises((CheckpointError, ValueError), match=match):
            conv.jax_to_torch(dst, str(tmp_path / name / "back"), layout="hf", progress=False)


# --------------------------------------------------------------------------------------------
# from-hf


@pytest.fixture(scope="module")
def hf_parts(tmp_path_factory):
    from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM
    root = tmp_path_factory.mktemp("parts")
    llama = LlamaForCausalLM(LlamaConfig(**lc.text_to_dict(CFG.text)))
    clip = CLIPVisionModel(CLIPVisionConfig(**lc.vision_to_dict(CFG.vision)))
    _randomize(llama, 30)
    _randomize(clip, 31)
    llama.save_pretrained(str(root / "llama"))
    clip.save_pretrained(str(root / "clip"))
    return str(root / "llama"), str(root / "clip")


def test_from_hf_copies_its_sources_and_seeds_the_projector(hf_parts, tmp_path):
    llama_dir, clip_dir = hf_parts
    dst, back = str(tmp_path / "jax"), str(tmp_path / "back")
    assert main(["from-hf", dst, "--family", "llava", "--llama", llama_dir, "--clip", clip_dir,
                 "--projector", "mlp2x_gelu", "--seed", "3", "--quiet"]) == 0
    cfg, params, meta = ckpt.load_checkpoint(dst)
    assert cfg.text == CFG.text
    assert cfg.vision == CFG.vision and cfg.image_token_index is None
    assert cfg.image_aspect_ratio == "pad" and meta["random_init"] == ["multi_modal_projector"]
    # LLM and tower: the sources, bit for bit (through the original layout's key names)
    conv.jax_to_torch(dst, back, layout="original", progress=False)
    llama, out = _arrays(llama_dir), _arrays(back)
    assert all(_same_bits(out[k], v) for k, v in llama.items())
    tower = _arrays(os.path.join(back, "vision_tower"))
    assert all(_same_bits(tower[keymap.canonical_clip(k)], v)
               for k, v in _arrays(clip_dir).items())
    # the projector: torch.nn.Linear's init, reproducible from the seed
    proj = params["multi_modal_projector"]
    want = conv.init_projector(cfg, 3)
    for name in ("linear_1", "linear_2"):
        fan_in = proj[name]["kernel"].shape[0]
        for leaf in ("kernel", "bias"):
            np.testing.assert_array_equal(proj[name][leaf], want[name][leaf])
            assert np.abs(proj[name][leaf]).max() <= 1 / np.sqrt(fan_in)
    assert not np.array_equal(conv.init_projector(cfg, 4)["linear_1"]["kernel"],
                              proj["linear_1"]["kernel"])


def test_from_hf_image_token_row_and_linear(hf_parts, tmp_path):
    llama_dir, clip_dir = hf_parts
    dst = str(tmp_path / "jax")
    assert main(["from-hf", dst, "--family", "llava", "--llama", llama_dir, "--clip", clip_dir,
                 "--projector", "linear", "--image_token", "--quiet"]) == 0
    cfg, params, _ = ckpt.load_checkpoint(dst)
    assert (cfg.text.vocab_size, cfg.image_token_index) == (101, 100)
    assert cfg.projector == "linear" and cfg.image_aspect_ratio == "square"
    assert set(params["multi_modal_projector"]) == {"linear_1"}
    lm = params["language_model"]
    emb, head = np.asarray(lm["embed_tokens"]["embedding"]), np.asarray(lm["lm_head"]["kernel"])
    np.testing.assert_allclose(emb[100], emb[:100].mean(0), rtol=1e-6)
    np.testing.assert_allclose(head[:, 100], head[:, :100].mean(1), rtol=1e-6)
    # the model runs (an image through the linear projector)
    ids = jnp.asarray([[1] + [-1] * cfg.image_tokens + [5, 6]], jnp.int32)
    assert _jitted(cfg)(params, ids, _pixels(1)[1]).shape == (1, 7, 101)


def test_from_hf_flags_belong_to_one_family(hf_parts, tmp_path, capsys):
    llama_dir, clip_dir = hf_parts
    assert main(["from-hf", str(tmp_path / "a"), "--family", "llava", "--llama", llama_dir,
                 "--clip", clip_dir, "--abstractor_layers", "2"]) == 2
    assert "--abstractor_layers does not apply to family llava" in capsys.readouterr().err
    assert main(["from-hf", str(tmp_path / "b"), "--llama", llama_dir,
                 "--projector", "linear"]) == 2
    assert main(["from-hf", str(tmp_path / "c"), "--family", "llava", "--llama",
                 llama_dir]) == 2
    assert "needs both --llama" in capsys.readouterr().err
