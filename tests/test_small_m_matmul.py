"""The decode-step matmul kernel (owl_jax/csrc/small_m_matmul.cc) against numpy in float64, on
ragged shapes (column tails, partial row sweeps, row groups past 8), its batch invariance, and
the switch around it: when it is used, and the fallback to XLA's dot when it cannot be built."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from owl_jax import small_m_matmul
from owl_jax.models.layers import Dense

needs_kernel = pytest.mark.skipif(
    not small_m_matmul.available(),
    reason=f"kernel not built here: {small_m_matmul._state.get('why')}")


def _run(x, w):
    with small_m_matmul.enabled():
        assert small_m_matmul.applies(x, w)
        return np.asarray(jax.jit(small_m_matmul.kernel)(x, w))


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
    with small_m_matmul.enabled():
        params, hlo, f = _dense_hlo(x)
        y = jax.jit(f)(params, x)
        assert small_m_matmul.TARGET in hlo
        # too many rows or bf16 compute: XLA's dot
        assert small_m_matmul.TARGET not in _dense_hlo(jnp.ones((1, 17, 16)))[1]
        assert small_m_matmul.TARGET not in _dense_hlo(x, jnp.bfloat16)[1]
    assert small_m_matmul.TARGET not in _dense_hlo(x)[1]  # not enabled outside the context
    p = nn.unbox(params)["params"]
    np.testing.assert_allclose(y, x @ p["kernel"] + p["bias"], rtol=1e-6)


def test_falls_back_to_xla_when_it_cannot_be_built(monkeypatch, tmp_path, caplog):
    monkeypatch.setattr(small_m_matmul, "_state", {})
    monkeypatch.setenv("OWL_JAX_CACHE", str(tmp_path))
    monkeypatch.setenv("CXX", "/bin/false")
    monkeypatch.setattr(small_m_matmul, "_cpu_flags", lambda: "flags : avx512f")
    monkeypatch.setattr(small_m_matmul.platform, "machine", lambda: "x86_64")
    assert not small_m_matmul.available()
    assert "/bin/false" in small_m_matmul._state["why"]
    assert "kernel off" in caplog.text
    x, w = np.ones((1, 4), np.float32), np.ones((4, 3), np.float32)
    with small_m_matmul.enabled():
        assert not small_m_matmul.applies(x, w)
        np.testing.assert_array_equal(small_m_matmul.matmul(x, w), x @ w)
    assert list(tmp_path.iterdir()) == []  # no half-written library left behind
