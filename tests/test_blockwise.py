"""Blockwise attention (owl_jax.layers.blockwise) against a float64 numpy re-derivation of
attention with one softmax over several key sets: every key layout, grouped-query heads, the
structured masks (CacheMask, Owl3's TileMask) read a block at a time, blocks that do not divide
the lengths (the last block moved back), blocks nobody sees (skipped), and queries that see
nothing. The cache attention takes the blockwise path for a structured mask over many keys."""
import jax.numpy as jnp
import numpy as np
import pytest

from owl_jax.decoder.hyper import TileMask
from owl_jax.layers import attention, blockwise
from owl_jax.layers.masks import CacheMask, cache_mask

B, LQ, H, HKV, D = 2, 37, 4, 2, 8


def _reference(q, parts):
    """float64: parts = [(k, v, mask)] with k, v [B, Lk, Hkv, D], mask [B, Lq, Lk]."""
    q = np.asarray(q, np.float64)
    k = np.concatenate([np.asarray(p[0], np.float64) for p in parts], axis=1)
    v = np.concatenate([np.asarray(p[1], np.float64) for p in parts], axis=1)
    mask = np.concatenate([np.asarray(p[2]) for p in parts], axis=2)
    g = H // HKV
    k, v = np.repeat(k, g, axis=2), np.repeat(v, g, axis=2)     # query head i -> kv head i // g
    s = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(D)
    s = np.where(mask[:, None], s, -np.inf)
    seen = mask.any(-1)                                         # [B, Lq]
    s = np.where(seen[:, None, :, None], s, 0.0)
    p = np.exp(s - s.max(-1, keepdims=True))
    p = p / p.sum(-1, keepdims=True)
    return np.einsum("bhqk,bkhd->bqhd", p, v), seen


@pytest.fixture(scope="module")
def case():
    rng = np.random.default_rng(0)
    f32 = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)  # noqa: E731
    q = f32(B, LQ, H, D)
    # the KV cache view [Hkv, B, S, D]: left padding, queries at slots 5.., keys past them
    s = 53
    ck, cv = f32(HKV, B, s, D), f32(HKV, B, s, D)
    valid = np.ones((B, s), bool)
    valid[0, :9] = False
    cmask = CacheMask(jnp.asarray(valid), jnp.arange(LQ) + 5)
    # Owl3's visual keys [B, Hkv, T * P, D]: 5 tiles of 7; row 0's first 12 queries see none
    t, p = 5, 7
    vk, vv = f32(B, HKV, t * p, D), f32(B, HKV, t * p, D)
    tiles = rng.random((B, LQ, t)) > 0.4
    tiles[0, :12] = False
    tiles[1, :, 3:] = False             # tiles nobody sees: skipped blocks
    tmask = TileMask(jnp.asarray(tiles), p)
    # text keys [B, Lk, Hkv, D] with a dense mask
    tk, tv = f32(B, 11, HKV, D), f32(B, 11, HKV, D)
    dmask = rng.random((B, LQ, 11)) > 0.5
    return dict(q=q, cache=(ck, cv, cmask), visual=(vk, vv, tmask), text=(tk, tv, dmask))


def _canonical(k, layout):
    return np.einsum(f"{layout}->bkhd", np.asarray(k))


@pytest.mark.parametrize("q_block,k_block", [(8, 16), (5, 7), (64, 4), (37, 53)])
def test_blockwise_equals_numpy(case, q_block, k_block):
    ck, cv, cmask = case["cache"]
    vk, vv, tmask = case["visual"]
    parts = [blockwise.Keys(vk, vv, tmask, "bhkd"), blockwise.Keys(ck, cv, cmask, "hbkd")]
    want, seen = _reference(case["q"], [
        (_canonical(vk, "bhkd"), _canonical(vv, "bhkd"), tmask.dense()),
        (_canonical(ck, "hbkd"), _canonical(cv, "hbkd"), cmask.dense())])
    got = np.asarray(blockwise.attend(case["q"], parts, q_block=q_block, k_block=k_block,
                                      min_blockwise=0))
    assert 0 < (~seen).sum() < 10        # left padding: row 0's first queries see nothing
    np.testing.assert_allclose(got[seen], want[seen], atol=2e-6)
    assert not got[~seen].any()
    dense = blockwise.attend(case["q"], parts, min_blockwise=1 << 40)
    np.testing.assert_allclose(np.asarray(dense)[seen], want[seen], atol=2e-6)


def test_queries_that_see_nothing(case):
    """The visual keys alone: row 0's first 12 queries see no tile. Blockwise gives them zeros,
    the dense path the mean of the values (callers never read either)."""
    vk, vv, tmask = case["visual"]
    part = [blockwise.Keys(vk, vv, tmask, "bhkd")]
    want, seen = _reference(case["q"], [(_canonical(vk, "bhkd"), _canonical(vv, "bhkd"),
                                         tmask.dense())])
    assert not seen[0, :12].any() and seen.sum() > 40
    got = np.asarray(blockwise.attend(case["q"], part, q_block=8, k_block=16, min_blockwise=0))
    np.testing.assert_allclose(got[seen], want[seen], atol=2e-6)
    assert not got[~seen].any()
    dense = np.asarray(blockwise.attend(case["q"], part, min_blockwise=1 << 40))
    mean = np.repeat(_canonical(vv, "bhkd").mean(1), H // HKV, axis=1)   # [B, H, D]
    np.testing.assert_allclose(dense[0, :12], np.broadcast_to(mean[0], (12, H, D)), atol=1e-6)


def test_a_dense_mask_keeps_the_dense_path(case):
    tk, tv, dmask = case["text"]
    vk, vv, tmask = case["visual"]
    parts = [blockwise.Keys(vk, vv, tmask, "bhkd"), blockwise.Keys(tk, tv, jnp.asarray(dmask))]
    want, seen = _reference(case["q"], [(_canonical(vk, "bhkd"), _canonical(vv, "bhkd"),
                                         tmask.dense()), (tk, tv, dmask)])
    got = blockwise.attend(case["q"], parts, q_block=4, k_block=4, min_blockwise=0)
    np.testing.assert_allclose(np.asarray(got)[seen], want[seen], atol=2e-6)


def test_structured_masks_read_blocks_of_their_dense_tables(case):
    _, _, cmask = case["cache"]
    _, _, tmask = case["visual"]
    np.testing.assert_array_equal(cmask.dense(), cache_mask(cmask.kv_valid, cmask.q_slots))
    qi, ki = jnp.array([0, 3, 36]), jnp.array([2, 9, 10, 34])
    for m in (cmask, tmask):
        np.testing.assert_array_equal(m.block(qi, ki), np.asarray(m.dense())[:, qi][:, :, ki])


def test_cache_attention_goes_blockwise_for_long_structured_masks(case, monkeypatch):
    ck, cv, cmask = case["cache"]
    k, v = ck.reshape(HKV * B, -1, D), cv.reshape(HKV * B, -1, D)    # the cache's own layout
    dense = attention.cached_attention(case["q"], k, v, cmask.dense())
    calls = []
    real = blockwise.attend
    monkeypatch.setattr(blockwise, "attend", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    monkeypatch.setattr(blockwise, "MIN_BLOCKWISE", 0)
    monkeypatch.setattr(blockwise, "Q_BLOCK", 8)
    monkeypatch.setattr(blockwise, "K_BLOCK", 16)
    got = attention.cached_attention(case["q"], k, v, cmask)
    assert calls
    seen = np.asarray(cmask.dense()).any(-1)
    np.testing.assert_allclose(np.asarray(got)[seen], np.asarray(dense)[seen], atol=2e-6)


def test_gradients_match_the_dense_path(case):
    """Training runs the hyper layers' visual attention blockwise where it is long."""
    import jax
    vk, vv, tmask = case["visual"]
    seen = np.asarray(tmask.dense()).any(-1)

    def loss(q, k, v, **kw):
        out = blockwise.attend(q, [blockwise.Keys(k, v, tmask, "bhkd")], **kw)
        return jnp.sum(jnp.where(seen[:, :, None, None], out, 0.0) ** 2)
    dense = jax.grad(loss, argnums=(0, 1, 2))(case["q"], vk, vv, min_blockwise=1 << 40)
    blocks = jax.grad(loss, argnums=(0, 1, 2))(case["q"], vk, vv, q_block=8, k_block=16,
                                               min_blockwise=0)
    for a, b in zip(blocks, dense):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5)
