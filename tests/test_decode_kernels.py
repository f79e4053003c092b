"""The decode-step CPU kernels (generate/cpu/decode_kernels.cc) against numpy in float64: the
matmul on ragged shapes (column tails, partial row sweeps, row groups past 8) and its batch
invariance, the cached attention with padded, unwritten and fully masked slots; and the switch
around them: when they are used, and the fallback to XLA when they cannot be built."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from owl_jax.generate.cpu import decode_kernels
from owl_jax.layers.core import Dense
from owl_jax.layers.attention import cached_attention

needs_kernel = pytest.mark.skipif(
    not decode_kernels.available(),
    reason=f"kernel not built here: {decode_kernels._state.get('why')}")


def _run(x, w):
    with decode_kernels.enabled():
        assert decode_kernels.matmul_applies(x, w)
        return np.asarray(jax.jit(decode_kernels.matmul)(x, w))


@needs_kernel
@pytest.mark.parametrize("k,n", [(1, 1), (7, 15), (16, 16), (17, 33), (33, 100), (64, 1000),
                                 (300, 47), (768, 130)])
def test_matches_numpy_on_ragged_shapes(k, n):
    rng = np.random.default_rng(k * 1000 + n)
    w = rng.standard_normal((k, n)).astype(np.float32)
    for m in (1, 2, 3, 5, 8, 9, 13, 16):
        x = rng.standard_normal((m, k)).astype(np.float32)
        want = x.astype(np.float64) @ w.astype(np.float64)
        got = _run(x, w)
        assert got.shape == (m, n)
        scale = np.abs(x).astype(np.float64) @ np.abs(w).astype(np.float64)
        assert np.all(np.abs(got - want) <= 1e-6 * k * scale + 1e-30), (m, k, n)


@needs_kernel
def test_leading_dims_and_batch_invariance():
    """[B, L, K] inputs; each row's result is bit-identical alone and in any batch, because
    every output element is summed in the same order whatever the batch."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((200, 70)).astype(np.float32)
    x = rng.standard_normal((3, 4, 200)).astype(np.float32)
    full = _run(x, w)
    assert full.shape == (3, 4, 70)
    rows = x.reshape(12, 200)
    for i in range(12):
        np.testing.assert_array_equal(_run(rows[i:i + 1], w)[0], full.reshape(12, 70)[i])
    np.testing.assert_array_equal(_run(rows[5:12], w), full.reshape(12, 70)[5:12])


def _dense_hlo(x, dtype=jnp.float32):
    dense = Dense(24, ("embed", "mlp"), use_bias=True, dtype=dtype)
    params = dense.init(jax.random.key(0), x)

    def f(p, x):
        return dense.apply(p, x)
    return params, jax.jit(f).lower(params, x).as_text(), f


@needs_kernel
def test_dense_uses_the_kernel_only_where_it_applies():
    x = jnp.ones((2, 1, 16))
    with decode_kernels.enabled():
        params, hlo, f = _dense_hlo(x)
        y = jax.jit(f)(params, x)
        assert decode_kernels.MATMUL in hlo
        # too many rows or bf16 compute: XLA's dot
        assert decode_kernels.MATMUL not in _dense_hlo(jnp.ones((1, 17, 16)))[1]
        assert decode_kernels.MATMUL not in _dense_hlo(x, jnp.bfloat16)[1]
    assert decode_kernels.MATMUL not in _dense_hlo(x)[1]  # not enabled outside the context
    p = nn.unbox(params)["params"]
    np.testing.assert_allclose(y, x @ p["kernel"] + p["bias"], rtol=1e-6)


def test_falls_back_to_xla_when_it_cannot_be_built(monkeypatch, broken_compiler, caplog):
    monkeypatch.setattr(decode_kernels, "_state", {})
    assert not decode_kernels.available()
    assert "/bin/false" in decode_kernels._state["why"]
    assert "decode kernels off" in caplog.text
    x, w = np.ones((1, 4), np.float32), np.ones((4, 3), np.float32)
    with decode_kernels.enabled():
        assert not decode_kernels.matmul_applies(x, w)
        np.testing.assert_array_equal(Dense(3, (None, None), use_bias=False).apply(
            {"params": {"kernel": w}}, x), x @ w)
    assert list(broken_compiler.iterdir()) == []  # no half-written library left behind


def _attention_ref(q, k, v, mask):
    """numpy float64: softmax over unmasked slots (all slots if none is unmasked)."""
    q, k, v = (a.astype(np.float64) for a in (q, k, v))
    s = np.einsum("nrd,nsd->nrs", q, k) / np.sqrt(q.shape[-1])
    s = np.where(mask, s, -np.inf)
    s = np.where(mask.any(-1, keepdims=True), s, 0.0)  # every slot equally
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("nrs,nsd->nrd", p, v)


@needs_kernel
@pytest.mark.parametrize("r,s,d", [(1, 1, 8), (1, 256, 64), (2, 17, 64), (4, 40, 100),
                                   (8, 33, 16), (2, 30, 200)])
def test_attention_matches_numpy(r, s, d):
    rng = np.random.default_rng(r * 100 + s)
    n = 6
    q = rng.standard_normal((n, r, d)).astype(np.float32)
    k = rng.standard_normal((n, s, d)).astype(np.float32)
    v = rng.standard_normal((n, s, d)).astype(np.float32)
    mask = np.ones((n, r, s), bool)
    mask[1, :, : s // 3] = False             # left padding
    mask[2, :, s // 2 + 1:] = False          # slots not written yet
    mask[3, :, ::3] = False                  # holes
    mask[4, 0, :] = False                    # nothing visible: uniform, as the XLA path
    mask[5, :, :] = rng.random((r, s)) < 0.5
    with decode_kernels.enabled():
        assert decode_kernels.attention_applies(q, k, v)
        got = np.asarray(jax.jit(decode_kernels.attention)(q, k, v, mask))
    want = _attention_ref(q, k, v, mask)
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5 * np.abs(want).max())


@needs_kernel
def test_cached_attention_with_and_without_the_kernel():
    """The model's `cached_attention` (grouped-query, [B, Lq, H, D]) gives the same result
    through the kernel and through XLA, and uses the kernel only inside `enabled()`."""
    rng = np.random.default_rng(0)
    b, lq, h, hkv, d, s = 3, 1, 4, 2, 16, 24
    q = rng.standard_normal((b, lq, h, d)).astype(np.float32)
    k = rng.standard_normal((hkv * b, s, d)).astype(np.float32)
    v = rng.standard_normal((hkv * b, s, d)).astype(np.float32)
    mask = rng.random((b, lq, s)) < 0.7
    def jitted():  # a new function each time: jit would reuse the trace of the same one
        return jax.jit(lambda *a: cached_attention(*a))
    want = np.asarray(jitted()(q, k, v, mask))
    assert decode_kernels.ATTENTION not in jitted().lower(q, k, v, mask).as_text()
    with decode_kernels.enabled():
        assert decode_kernels.ATTENTION in jitted().lower(q, k, v, mask).as_text()
        got = np.asarray(jitted()(q, k, v, mask))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@needs_kernel
def test_generator_decodes_through_the_kernels(monkeypatch):
    """A CPU Generator traces its decode step through both kernels (a regression that turned
    them off would go unnoticed otherwise) and gives the same greedy tokens as with XLA's ops,
    on a batch with different prompt lengths and image counts."""
    from owl_jax.generate import GenerationConfig, Generator
    from owl_jax.testing.models import FAST, prompt_rows, random_params, small_config
    cfg = small_config()
    params = jax.tree.map(jnp.asarray, random_params(cfg))
    rng = np.random.default_rng(1)
    rows = prompt_rows(cfg, rng)
    s = cfg.vision.image_size
    px = rng.standard_normal((3, s, s, 3)).astype(np.float32)
    gcfg = GenerationConfig(max_new_tokens=6)
    calls = {"matmul": 0, "attention": 0}
    for name in calls:
        real = getattr(decode_kernels, name)

        def counted(*a, _name=name, _real=real):
            calls[_name] += 1
            return _real(*a)
        monkeypatch.setattr(decode_kernels, name, counted)
    gen = Generator(cfg, params, compiler_options=FAST)
    assert gen.decode_kernels
    assert gen.compiler_options == {**decode_kernels.COMPILER_OPTIONS, **FAST}
    ours = gen.generate(rows, px, gcfg)
    assert calls["matmul"] > 0 and calls["attention"] > 0
    xla = Generator(cfg, params, compiler_options=FAST, decode_kernels=False)
    assert xla.compiler_options == FAST
    ref = xla.generate(rows, px, gcfg)
    assert [o.token_ids for o in ours] == [r.token_ids for r in ref]


def test_kernel_compiler_options_keep_the_norm_sums_out_of_ynnpack():
    """What decode_kernels.COMPILER_OPTIONS is for: XLA's default sends an RMSNorm's sum over [B, D]
    to YNNPACK as a library call (which costs more than the sum in a decode step); with the
    options it does not."""
    def rms_norm(x):
        return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + 1e-6)
    x = jnp.ones((8, 768), jnp.float32)
    default = jax.jit(rms_norm).lower(x).compile().as_text()
    ours = jax.jit(rms_norm, compiler_options=decode_kernels.COMPILER_OPTIONS).lower(x).compile()
    assert "__ynn_fusion" in default
    assert "__ynn_fusion" not in ours.as_text()
    np.testing.assert_allclose(np.asarray(ours(x)), np.ones((8, 768)), rtol=1e-6)


def test_materialize_is_an_identity_that_xla_cannot_fuse():
    from owl_jax.layers.attention import rope_cos_sin
    pos = jnp.arange(24, dtype=jnp.int32).reshape(2, 12)
    def fresh():  # jit caches traces whatever the context: a new function each time
        return jax.jit(lambda p: rope_cos_sin(p, 64, 10000.0, jnp.float32))
    plain = fresh()(pos)
    assert decode_kernels.MATERIALIZE not in fresh().lower(pos).as_text()
    with decode_kernels.enabled():
        hlo = fresh().lower(pos).as_text()
        got = fresh()(pos)
    assert hlo.count(decode_kernels.MATERIALIZE) == 2
    for a, b in zip(got, plain):
        np.testing.assert_array_equal(a, b)  # the same bits


def _int8_reference(x, wq, scale):
    """The int8 kernel's math re-derived in numpy: x quantized per row (sx = max |x| / 127,
    round half to even), the products summed exactly in int64, then float32(sum) * sx * scale."""
    rows = []
    for row in x.reshape(-1, x.shape[-1]):
        top = np.abs(row).max()
        sx = np.float32(top / np.float32(127)) if top > 0 else np.float32(1)
        acc = np.rint(row / sx).astype(np.int64) @ wq.astype(np.int64)
        rows.append(acc.astype(np.float32) * sx * scale)
    return np.stack(rows).reshape(x.shape[:-1] + (wq.shape[1],))


@needs_kernel
@pytest.mark.parametrize("k,n", [(1, 1), (7, 5), (13, 70), (64, 4100), (130, 4096), (768, 768),
                                 (2048, 200)])
def test_int8_matmul_is_the_quantized_product_bit_for_bit(k, n):
    """Ragged K (rows past K are padding), column tails of a 64-column tile, narrow w (threads
    split K) and wide w (threads split the columns), several rows, an all-zero row."""
    from owl_jax.generate.cpu.greedy_screen import int8_columns
    rng = np.random.default_rng(k + n)
    wq, scale = int8_columns(rng.standard_normal((k, n)).astype(np.float32))
    x = rng.standard_normal((3, k)).astype(np.float32)
    x[1] = 0
    with decode_kernels.enabled():
        got = np.asarray(jax.jit(decode_kernels.int8_matmul)(x, wq, scale))
    np.testing.assert_array_equal(got, _int8_reference(x, wq, scale))
    # and it approximates x @ the dequantized weights, as XLA's fallback computes it
    want = np.asarray(decode_kernels.int8_matmul(jnp.asarray(x), wq, scale))
    exact = x.astype(np.float64) @ (wq.astype(np.float64) * scale)
    np.testing.assert_allclose(want, exact, atol=1e-5 * np.abs(exact).max())
    assert np.abs(got - want).max() <= 0.02 * np.abs(want).max() + 1e-6


def test_dense_reads_an_int8_kernel_with_its_scale():
    """Dense given int8 `kernel` + `kernel_scale` (generate.cpu.self_draft's draft model)."""
    rng = np.random.default_rng(0)
    wq = rng.integers(-127, 128, (24, 40)).astype(np.int8)
    scale = rng.random(40).astype(np.float32)
    x = rng.standard_normal((2, 3, 24)).astype(np.float32)
    y = Dense(40, ("embed", "mlp"), use_bias=False).apply(
        {"params": {"kernel": wq, "kernel_scale": scale}}, x)
    np.testing.assert_allclose(y, x @ (wq.astype(np.float32) * scale), rtol=1e-5, atol=1e-5)
