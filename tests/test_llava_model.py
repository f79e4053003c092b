"""The LLaVA model against transformers on the same random weights: LLaVA-1.5 (mlp2x_gelu) against
`LlavaForConditionalGeneration`, LLaVA v1 (linear projector, which llava-hf cannot express)
against CLIPVisionModel -> torch Linear -> LlamaForCausalLM(inputs_embeds=...) composed by hand.
"""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from owl_jax.convert.keymap import get_path
from owl_jax.convert.llava import params_from_state_dict
from owl_jax.families import llava
from owl_jax.families.llava import config as llava_config, keymap
from owl_jax.families.llava.model import Llava
from owl_jax.layers.scan import scan_params
from owl_jax.testing.models import random_params

pytestmark = pytest.mark.xdist_group("llava_model")

VOCAB = 100  # the last id (99) is the image token
CFG = llava.config.tiny(vocab_size=VOCAB, num_key_value_heads=2)
T = CFG.image_tokens


def _randomize(module: torch.nn.Module, seed: int):
    """Non-trivial weights: norm scales away from 1, non-zero biases, unit-ish activations."""
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


def hf_llava(cfg, seed=0):
    """transformers' LlavaForConditionalGeneration built from our config.json (eval, eager)."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration
    hc = LlavaConfig.from_dict(llava_config.to_hf_dict(cfg))
    model = LlavaForConditionalGeneration._from_config(hc, attn_implementation="eager").eval()
    _randomize(model, seed)
    return model


@functools.lru_cache(maxsize=8)
def _jitted(cfg, method=None, scan=False):
    model = Llava(cfg, scan_layers=scan)
    return jax.jit(lambda p, *a: model.apply({"params": p}, *a, method=method))


def _pixels(n, seed=1, size=28):
    px = np.random.default_rng(seed).standard_normal((n, 3, size, size)).astype(np.float32)
    return torch.from_numpy(px), jnp.asarray(px.transpose(0, 2, 3, 1))


def _rows(cfg, image_counts, length, seed=2):
    """Same-length rows holding 0, 1, 2... images: HF ids (image_token_index at image slots),
    ours (-1 there)."""
    rng = np.random.default_rng(seed)
    hf, ours = [], []
    for n in image_counts:
        text = length - n * cfg.image_tokens
        cuts = sorted(rng.choice(np.arange(1, text), n, replace=False)) if n else []
        row, prev = [], 0
        for c in list(cuts) + [text]:
            row += list(rng.integers(3, cfg.image_token_index, c - prev))
            if c != text:
                row += [-1] * cfg.image_tokens
            prev = c
        ours.append(row)
        hf.append([cfg.image_token_index if t < 0 else t for t in row])
    return torch.tensor(hf), jnp.asarray(ours, jnp.int32)


def _close(ours, ref, rel=1e-4):
    ours, ref = np.asarray(ours), np.asarray(ref)
    assert ours.shape == ref.shape
    err, scale = np.abs(ours - ref).max(), np.abs(ref).max()
    assert err <= rel * scale, f"max diff {err} vs scale {scale}"


@pytest.mark.parametrize("layer,strategy", [(-2, "default"), (1, "full"), (-1, "default")])
def test_image_features_match_hf(layer, strategy):
    cfg = CFG.replace(vision_feature_layer=layer, vision_feature_select_strategy=strategy)
    hf = hf_llava(cfg, seed=3)
    params = params_from_state_dict(hf.state_dict(), cfg)
    px_t, px = _pixels(2)
    with torch.no_grad():
        ref = torch.stack(list(hf.get_image_features(
            pixel_values=px_t, vision_feature_layer=layer,
            vision_feature_select_strategy=strategy).pooler_output))
    ours = _jitted(cfg, Llava.encode_images)(params, px)
    assert ours.shape == (2, cfg.image_tokens, cfg.text.hidden_size)
    assert cfg.image_tokens == 4 + (strategy == "full")
    _close(ours, ref.numpy(), 1e-5)


@pytest.fixture(scope="module")
def v15():
    hf = hf_llava(CFG, seed=4)
    return hf, params_from_state_dict(hf.state_dict(), CFG)


def test_logits_match_hf_with_0_1_2_images(v15):
    hf, params = v15
    ids_t, ids = _rows(CFG, (0, 1, 2), 14)
    px_t, px = _pixels(3)
    with torch.no_grad():
        ref = hf(input_ids=ids_t, pixel_values=px_t).logits.numpy()
    ours = _jitted(CFG)(params, ids, px)
    assert ours.shape == (3, 14, VOCAB)
    _close(ours, ref)
    # the text-only row does not depend on the images at all
    _close(_jitted(CFG)(params, ids[:1]), ref[:1])


def test_greedy_tokens_match_hf(v15):
    hf, params = v15
    ids_t, ids = _rows(CFG, (1, 2), 12, seed=5)
    px_t, px = _pixels(3, seed=6)
    hf_ids = ids_t
    for _ in range(4):
        with torch.no_grad():
            nxt_hf = hf(input_ids=hf_ids, pixel_values=px_t).logits[:, -1].argmax(-1)
        nxt = jnp.argmax(_jitted(CFG)(params, ids, px)[:, -1], -1)
        assert nxt.tolist() == nxt_hf.tolist()
        hf_ids = torch.cat([hf_ids, nxt_hf[:, None]], 1)
        ids = jnp.concatenate([ids, nxt[:, None].astype(jnp.int32)], 1)


def test_scan_layers_match_unrolled(v15):
    _, params = v15
    _, ids = _rows(CFG, (1, 2), 12, seed=7)
    _, px = _pixels(3, seed=8)
    ref = _jitted(CFG)(params, ids, px)
    _close(_jitted(CFG, scan=True)(scan_params(params), ids, px), ref, 1e-5)


def test_family_seam():
    fam = llava.FAMILY
    assert fam.name == "llava" and fam.model is Llava and fam.tiny() == llava.config.tiny()
    ids, px = fam.dummy_inputs(CFG)
    shapes = nn.unbox(jax.eval_shape(lambda: Llava(CFG).init(jax.random.key(0), ids, px)))
    assert set(shapes["params"]) == {"vision_tower", "multi_modal_projector", "language_model"}
    # every tower layer and the unused post-LayerNorm exist (checkpoints hold them)
    assert {f"layers_{i}" for i in range(3)} | {"post_layernorm"} <= \
        set(shapes["params"]["vision_tower"])
    names = [n for n, _, _ in fam.image_flops(CFG)]
    assert names == ["vision", "projector"]


def _torch_module(module, entries, params, heads):
    sd = {e.torch_key: torch.from_numpy(keymap.to_torch(e, np.asarray(get_path(params, e.path)),
                                                        heads)) for e in entries}
    module.load_state_dict(sd, strict=True)
    return module.eval()


def test_v1_linear_projector_matches_hand_composed_reference():
    from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM
    cfg = CFG.replace(projector="linear", image_aspect_ratio="square")
    params = random_params(cfg, seed=9)
    heads = cfg.vision.num_attention_heads
    clip = _torch_module(CLIPVisionModel(CLIPVisionConfig(**llava_config.vision_to_dict(
        cfg.vision))), keymap.clip_entries(cfg, prefix=""), params, heads)
    lm_cfg = LlamaConfig(**llava_config.text_to_dict(cfg.text))
    lm_cfg._attn_implementation = "eager"
    entries = keymap.original_entries(cfg)
    llama = _torch_module(LlamaForCausalLM(lm_cfg), [e for e in entries if "mm_projector"
                                                     not in e.torch_key], params, heads)
    proj = _torch_module(torch.nn.Linear(cfg.vision.hidden_size, cfg.text.hidden_size),
                         [keymap.Entry(e.torch_key.split(".")[-1], e.path, e.kind,
                                       e.torch_shape, e.jax_shape)
                          for e in entries if "mm_projector" in e.torch_key], params, heads)
    ids_t, ids = _rows(cfg, (0, 1, 2), 13, seed=10)
    px_t, px = _pixels(3, seed=11)
    with torch.no_grad():
        feats = proj(clip(px_t, output_hidden_states=True).hidden_states[-2][:, 1:])
        slots = ids_t == cfg.image_token_index
        embeds = llama.get_input_embeddings()(torch.where(slots, 0, ids_t))
        embeds[slots] = feats.reshape(-1, feats.shape[-1])
        ref = llama(inputs_embeds=embeds).logits.numpy()
    _close(_jitted(cfg, Llava.encode_images)(params, px), feats.numpy(), 1e-5)
    _close(_jitted(cfg)(params, ids, px), ref)


def test_generation_engine_matches_hf_generate(v15):
    """The engine (left-padded batch, KV cache, one compiled decode loop; the CPU speculative
    path for the single prompt) gives HF `generate`'s greedy tokens for prompts with 0, 1 and 2
    images of different lengths."""
    from owl_jax.generate import GenerationConfig, Generator
    hf, params = v15
    rows, pixels = [], []
    for i, (n, length) in enumerate(((0, 9), (1, 8 + T), (2, 5 + 2 * T))):
        ids_t, ids = _rows(CFG, (n,), length, seed=20 + i)
        px_t, px = _pixels(n, seed=30 + i) if n else (None, None)
        with torch.no_grad():
            ref = hf.generate(input_ids=ids_t, max_new_tokens=6, do_sample=False,
                              eos_token_id=None, pad_token_id=0,
                              **({"pixel_values": px_t} if n else {}))
        rows.append((np.asarray(ids[0]).tolist(), px, ref[0, length:].tolist()))
        if n:
            pixels.append(np.asarray(px))
    gen = Generator(CFG, params, compiler_options={"xla_backend_optimization_level": 0})
    gc = GenerationConfig(max_new_tokens=6, eos_token_id=-1)
    batch = gen.generate([r[0] for r in rows], np.concatenate(pixels), gc)
    assert [g.token_ids for g in batch] == [r[2] for r in rows]
    one = gen.generate([rows[2][0]], np.asarray(rows[2][1]), gc)[0]  # speculative on CPU
    assert one.token_ids == rows[2][2]
