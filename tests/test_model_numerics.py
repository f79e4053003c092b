"""Owl v1 (encoders, connectors, decoder, families/owl1) against an independent float64 numpy
derivation of the official math.

Weights are drawn in the OFFICIAL PyTorch layout and mapped into the Flax tree by a small
mapping written for the tests (tests/official_layout.py), so a transposition, a wrong eps, a
wrong qkv interleave or a splice-order bug shows up as a mismatch. Also: packing (segment_ids),
the KV cache against full recomputation, and scan + remat against the unrolled layers.
"""
from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from owl_jax.connectors.abstractor import AbstractorConfig
from owl_jax.families.owl1.config import OwlConfig
from owl_jax.decoder.llama import TextConfig
from owl_jax.encoders.vit import VisionConfig
from owl_jax.decoder import llama
from owl_jax.layers import masks
from owl_jax.families.owl1.model import Owl
from owl_jax.layers.scan import scan_params, unscan_params

import numpy_ref as ref  # tests/ is on sys.path (pytest rootdir-relative import)
from official_layout import nchw_to_nhwc, official_to_flax, random_official_state_dict

# Every width differs (Dv 24, abstractor FFN 36, Dt 40, LLM FFN 56, vocab 97, head dims 8/6/10)
# and the eps values are not the defaults, so transposes, head splits and eps mix-ups all show.
CFG = OwlConfig(
    vision=VisionConfig(hidden_size=24, intermediate_size=40, num_hidden_layers=2,
                        num_attention_heads=3, image_size=28, patch_size=14, layer_norm_eps=1e-4),
    abstractor=AbstractorConfig(hidden_size=24, num_hidden_layers=2, num_attention_heads=4,
                                intermediate_size=36, layer_norm_eps=1e-3,
                                encoder_hidden_size=24),
    text=TextConfig(vocab_size=97, hidden_size=40, intermediate_size=56, num_hidden_layers=2,
                    num_attention_heads=4, max_position_embeddings=64, rms_norm_eps=1e-5),
    num_query_tokens=3,
)
T = CFG.image_tokens  # 4 LLM slots per image
IMG = [-1] * T


def rel_err(got, want):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-6))


@pytest.fixture(autouse=True)
def _full_fp32_matmuls():
    """Parity at 1e-5 needs true fp32 dots; GPUs / TPUs default to TF32 / bf16 passes."""
    with jax.default_matmul_precision("highest"):
        yield


@pytest.fixture(scope="module")
def sd():
    return random_official_state_dict(CFG, seed=0)


@pytest.fixture(scope="module")
def params(sd):
    return jax.tree.map(jnp.asarray, official_to_flax(sd, CFG))


@pytest.fixture(scope="module")
def pixels():
    """Four NCHW images (official layout) and the same in NHWC for the model."""
    x = np.random.default_rng(1).standard_normal((4, 3, 28, 28))
    return x, jnp.asarray(nchw_to_nhwc(x), jnp.float32)


MODEL = Owl(CFG)
# XLA:CPU spends far longer compiling than running these tiny graphs; its cheapest settings
# keep the file within its time budget and do not change fp32 results beyond rounding.
FAST = dict(xla_backend_optimization_level=0, xla_llvm_disable_expensive_passes=True)


def _apply(method, model=MODEL):
    return jax.jit(lambda p, *a: model.apply({"params": p}, *a, method=method),
                   compiler_options=FAST)


# One jitted function per method, shared by the tests so equal shapes compile once.
CALL = _apply(Owl.__call__)
ENCODE = _apply(Owl.encode_images)


# --------------------------------------------------------------------------------------------
# Parameter layout


def test_mapped_params_match_model_init(params):
    ids = jnp.zeros((1, 8), jnp.int32)
    shapes = jax.eval_shape(lambda: MODEL.init(jax.random.key(0), ids,
                                               jnp.zeros((1, 28, 28, 3))))
    want = jax.tree.map(lambda x: x.shape, nn.unbox(shapes["params"]))
    got = jax.tree.map(lambda x: x.shape, params)
    assert jax.tree.structure(got) == jax.tree.structure(want)
    assert got == want


# --------------------------------------------------------------------------------------------
# Vision, abstractor, splice


def test_vision_matches_reference(sd, params, pixels):
    px_nchw, px = pixels
    got = _apply(lambda m, x: m.vision_model(x))(params, px)
    want = ref.vision_forward(sd, CFG, px_nchw)
    assert got.shape == want.shape == (4, 5, 24)
    assert rel_err(got, want) < 1e-5


def test_abstractor_matches_reference(sd, params, pixels):
    px_nchw, px = pixels
    got = ENCODE(params, px)
    want = ref.encode_images(sd, CFG, px_nchw)
    assert got.shape == want.shape == (4, T, 40)
    assert rel_err(got, want) < 1e-5
    np.testing.assert_array_equal(np.asarray(got[:, -1]),
                                  np.broadcast_to(sd["abstractor.vit_eos"][0], (4, 40))
                                  .astype(np.float32))
    # Encoding images one at a time gives the same features (no cross-image interaction).
    one = ENCODE(params, px[2:3])
    np.testing.assert_allclose(np.asarray(one[0]), np.asarray(got[2]), rtol=1e-5, atol=1e-5)


def _rows():
    """Three rows with 1, 0 and 2 images; flat image order = order of appearance in the batch."""
    r0 = [1, 5, 6] + IMG + [7, 8, 9, 10, 11, 12, 13, 14, 15]
    r1 = [1, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31, 32, 33, 34]
    r2 = [1] + IMG + [40, 41, 42] + IMG + [43, 44, 45, 46]
    ids = np.array([r0, r1, r2], np.int32)
    assert ids.shape == (3, 16) and (ids < 0).sum() == 3 * T
    return ids


def test_splice_order_of_appearance(sd, params):
    ids = _rows()
    feats = np.random.default_rng(2).standard_normal((3, T, 40)).astype(np.float32)
    got = _apply(Owl.embed)(params, jnp.asarray(ids), jnp.asarray(feats))
    want = ref.splice(sd, ids, feats.astype(np.float64))
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6, atol=1e-6)
    # Row 2's second image sits after the text between its two runs.
    np.testing.assert_array_equal(np.asarray(got[2, 8:12]), feats[2])


# --------------------------------------------------------------------------------------------
# Full logits


def test_logits_0_1_2_images_in_one_batch(sd, params, pixels):
    px_nchw, px = pixels
    ids = _rows()
    got = CALL(params, jnp.asarray(ids), px[:3])
    want = ref.owl_logits(sd, CFG, ids, px_nchw[:3])
    assert got.shape == want.shape == (3, 16, 97)
    assert rel_err(got, want) < 1e-5
    # Each row alone (with only its own images) gives the same logits as inside the batch.
    for b, imgs in ((0, [0]), (2, [1, 2])):
        alone = ref.owl_logits(sd, CFG, ids[b:b + 1], px_nchw[imgs])
        assert rel_err(got[b:b + 1], alone) < 1e-5


def test_text_only_without_pixels(sd, params):
    ids = np.array([[1, 3, 4, 5, 6, 7, 8, 9], [1, 90, 91, 92, 93, 94, 95, 96]], np.int32)
    got = CALL(params, jnp.asarray(ids))
    assert rel_err(got, ref.owl_logits(sd, CFG, ids)) < 1e-5


def test_per_row_image_layout_equals_flat(params, pixels):
    """[B, M, H, W, 3] (training contract, unused slots zero) == the flat official order."""
    _, px = pixels
    ids = jnp.asarray(_rows())
    per_row = jnp.zeros((3, 2, 28, 28, 3)).at[0, 0].set(px[0]).at[2, 0].set(px[1]) \
        .at[2, 1].set(px[2])
    np.testing.assert_allclose(np.asarray(CALL(params, ids, per_row)),
                               np.asarray(CALL(params, ids, px[:3])), rtol=1e-5, atol=1e-5)


def test_bf16_compute_stays_close(sd, params, pixels):
    px_nchw, px = pixels
    ids = _rows()
    got = _apply(Owl.__call__, Owl(CFG, dtype=jnp.bfloat16))(params, jnp.asarray(ids), px[:3])
    assert got.dtype == jnp.bfloat16
    want = ref.owl_logits(sd, CFG, ids, px_nchw[:3])
    err = rel_err(got, want)
    assert err < 5e-2, err
    # Same argmax almost everywhere (random logits have well separated maxima).
    agree = (np.asarray(got.astype(jnp.float32)).argmax(-1) == want.argmax(-1)).mean()
    assert agree > 0.9, agree


# --------------------------------------------------------------------------------------------
# Packing


def test_segment_packing_equals_separate_samples(sd, params, pixels):
    px_nchw, px = pixels
    a = [1, 5] + IMG + [6, 7, 8]          # 9 tokens, one image
    b = [1, 30, 31, 32, 33]               # 5 tokens, text only
    c = [1] + IMG + [50, 51]              # 7 tokens, one image
    n = 24
    pad = lambda x: x + [0] * (n - len(x))
    # Row 0 packs a, b, c (+ 3 padding); rows 1-3 hold each sample alone (right padding is
    # invisible to causal attention). One call, one compile.
    ids = [a + b + c + [0] * 3, pad(a), pad(b), pad(c)]
    seg = [[1] * 9 + [2] * 5 + [3] * 7 + [0] * 3, pad([1] * 9), pad([1] * 5), pad([1] * 7)]
    imgs = px[jnp.asarray([0, 1, 0, 1])]  # row 0: a's and c's images; then a's; then c's
    got = np.asarray(CALL(params, jnp.asarray(ids, jnp.int32), imgs, jnp.asarray(seg, jnp.int32)))
    np.testing.assert_allclose(got[0, :9], got[1, :9], rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(got[0, 9:14], got[2, :5], rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(got[0, 14:21], got[3, :7], rtol=2e-5, atol=2e-5)
    # and the reference agrees on the third sample, whose RoPE positions restart at 0
    assert rel_err(got[0, 14:21], ref.owl_logits(sd, CFG, np.array([c]), px_nchw[1:2])[0]) < 1e-5


# --------------------------------------------------------------------------------------------
# KV cache vs full recomputation


STEPS = 8


@functools.partial(jax.jit, compiler_options=FAST)
def _prefill(params, ids, valid, pixel_values, cache):
    """Left-padded prompts [B, L] (valid False on pads) written into the cache at slot 0."""
    m, v = MODEL, {"params": params}
    l = ids.shape[1]
    img = m.apply(v, pixel_values, method=Owl.encode_images)
    emb = m.apply(v, ids, img, method=Owl.embed)
    kv_valid = jnp.zeros((ids.shape[0], cache[0]["k"].shape[1]), bool).at[:, :l].set(valid)
    pos = jnp.where(valid, jnp.cumsum(valid, axis=1) - 1, 1)  # HF: cumsum(mask) - 1, pads 1
    logits, cache = m.apply(v, emb, pos, masks.cache_mask(kv_valid, jnp.arange(l)), cache, 0,
                            method=Owl.decode)
    return logits[:, -1], cache, kv_valid, pos[:, -1] + 1


@functools.partial(jax.jit, compiler_options=FAST)
def _step(params, tok, pos, kv_valid, cache, slot):
    m, v = MODEL, {"params": params}
    kv_valid = kv_valid.at[:, slot].set(True)
    e = m.apply(v, tok[:, None], method=Owl.embed_tokens)
    logits, cache = m.apply(v, e, pos[:, None], masks.cache_mask(kv_valid, slot[None]), cache,
                            slot, method=Owl.decode)
    return logits[:, 0], cache, kv_valid


def _greedy_cached(params, ids, valid, pixel_values, steps):
    b, l = ids.shape
    cache = llama.init_cache(CFG.text, b, l + steps)
    last, cache, kv_valid, pos = _prefill(params, ids, valid, pixel_values, cache)
    toks, outs = [], []
    for t in range(steps):
        tok = jnp.argmax(last, -1)
        toks.append(tok)
        outs.append(last)
        if t < steps - 1:
            last, cache, kv_valid = _step(params, tok, pos, kv_valid, cache,
                                          jnp.asarray(l + t, jnp.int32))
            pos = pos + 1
    return np.stack(toks, 1), np.stack(outs, 1)


def _greedy_recompute(params, prompts, pixel_values, steps):
    """Each prompt alone (no left padding), the whole growing sequence through Owl.__call__.
    Rows are right-padded to one fixed length (causal attention never sees the tail)."""
    n = max(len(p) for p in prompts) + steps
    seqs = [list(p) for p in prompts]
    toks, outs = [], []
    for _ in range(steps):
        ids = jnp.asarray([s + [0] * (n - len(s)) for s in seqs], jnp.int32)
        logits = np.asarray(CALL(params, ids, pixel_values))
        last = np.stack([logits[i, len(s) - 1] for i, s in enumerate(seqs)])
        tok = last.argmax(-1)
        toks.append(tok)
        outs.append(last)
        for s, t in zip(seqs, tok):
            s.append(int(t))
    return np.stack(toks, 1), np.stack(outs, 1)


def test_kv_cache_greedy_equals_recompute_with_left_padding(params, pixels):
    _, px = pixels
    long = [1, 5, 6] + IMG + [7, 8, 9, 10, 11]            # 12 tokens
    short = [1] + IMG + [60, 61, 62]                       # 8 tokens, left-padded by 4
    ids = jnp.asarray([long, [0] * 4 + short], jnp.int32)
    valid = jnp.asarray([[True] * 12, [False] * 4 + [True] * 8])
    toks, logits = _greedy_cached(params, ids, valid, px[:2], STEPS)
    want_toks, want_logits = _greedy_recompute(params, [long, short], px[:2], STEPS)
    np.testing.assert_array_equal(toks, want_toks)
    assert rel_err(logits, want_logits) < 1e-5
    assert len(set(want_toks[0].tolist())) > 1  # the test decodes something non-trivial


# --------------------------------------------------------------------------------------------
# scan + remat


def test_scan_remat_matches_unrolled_logits_and_grads(params, pixels):
    _, px = pixels
    ids = jnp.asarray(_rows())
    w = jnp.asarray(np.random.default_rng(3).standard_normal((3, 16, 97)), jnp.float32)
    scanned = Owl(CFG, scan_layers=True, remat_policy="full")

    def loss(model, p):
        logits = model.apply({"params": p}, ids, px[:3])
        return jnp.mean(logits * w), logits

    def grad_fn(model):
        return jax.jit(jax.value_and_grad(functools.partial(loss, model), has_aux=True),
                       compiler_options=FAST)

    (_, logits_u), g_u = grad_fn(MODEL)(params)
    sp = scan_params(params)
    assert sp["language_model"]["layers"]["layer"]["mlp"]["up_proj"]["kernel"].shape == (2, 40, 56)
    n_vit = CFG.vision.num_hidden_layers
    assert sp["vision_model"]["layers"]["layer"]["mlp"]["fc1"]["kernel"].shape[0] == n_vit
    assert not any(k.startswith("layers_") for k in sp["vision_model"])
    assert sp["abstractor"]["layers"]["layer"]["w1"]["kernel"].shape[0] == \
        CFG.abstractor.num_hidden_layers
    # the scanned model's own init has exactly this layout
    init = jax.eval_shape(lambda: nn.unbox(scanned.init(jax.random.key(0), ids, px[:3])["params"]))
    assert jax.tree.structure(init) == jax.tree.structure(sp)
    (_, logits_s), g_s = grad_fn(scanned)(sp)
    np.testing.assert_allclose(np.asarray(logits_s), np.asarray(logits_u), rtol=1e-5, atol=1e-5)
    g_s = unscan_params(g_s)
    assert jax.tree.structure(g_s) == jax.tree.structure(g_u)
    # Per leaf, against the largest gradient anywhere (some are ~0 by symmetry: the key bias
    # of a softmax gets no gradient, so a per-leaf relative error would compare noise).
    scale = max(float(jnp.abs(g).max()) for g in jax.tree.leaves(g_u))
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g_s), jax.tree.leaves(g_u)):
        err = float(jnp.abs(a - b).max()) / scale
        assert err < 1e-5, (jax.tree_util.keystr(path), err)
    assert float(jnp.abs(g_u["query_tokens"]).max()) > 1e-3 * scale  # grads reach the vision side
    assert float(jnp.abs(g_u["language_model"]["layers_0"]["self_attn"]["q_proj"]["kernel"])
                 .max()) > 1e-3 * scale


def test_saving_a_scanned_tree_is_refused(params, tmp_path):
    from owl_jax.checkpoint import save_checkpoint
    for tower in ("vision_model", "abstractor", "language_model"):
        one = {**params, tower: scan_params(params)[tower]}
        with pytest.raises(ValueError, match="scanned layout"):
            save_checkpoint(str(tmp_path / tower), one, CFG)
