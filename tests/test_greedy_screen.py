"""The greedy screen picks exactly the fp32 path's greedy tokens while reading a bf16 or int8
head."""
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from owl_jax.generate.cpu import decode_kernels, greedy_screen
from owl_jax.generate import sampling
from owl_jax.families.owl1.config import tiny
from owl_jax.generate import GenerationConfig, Generator

pytestmark = pytest.mark.skipif(not decode_kernels.available(), reason="no decode kernels")

D, V = 64, 5000  # at least decode_kernels.ROW_SPLIT_BELOW_N columns


def _head(rng, d=D, v=V):
    return (rng.standard_normal((d, v)) * 0.05).astype(np.float32)


@jax.jit
def _full(h, w):
    return sampling.greedy(decode_kernels.matmul(h, w))


_screen = jax.jit(greedy_screen.tokens)


KINDS = ["bf16", "int8"]


@pytest.mark.parametrize("dtype", [ml_dtypes.bfloat16, np.int8])
def test_narrow_weight_matmul_is_the_widened_product(dtype):
    rng = np.random.default_rng(0)
    w, h = _head(rng), rng.standard_normal((3, D)).astype(np.float32)
    wq = (w * 2000).astype(dtype)  # int8: whole numbers in [-127, 127]
    got = np.asarray(jax.jit(decode_kernels.matmul)(h, jnp.asarray(wq)), np.float64)
    want = h.astype(np.float64) @ wq.astype(np.float64)
    # fp32 sums of D products: within gamma_D * sum |h| |w| of the exact value
    assert np.all(np.abs(got - want) <= D * 2.0 ** -24 * (np.abs(h) @ np.abs(wq.astype(float))))


def _approx(h, screen):
    return jax.jit(greedy_screen.approx_logits)(jnp.asarray(h), screen)


def test_int8_copy():
    """Per-column scale max |w| / 127: every value within half a step, the largest exact."""
    rng = np.random.default_rng(3)
    w = _head(rng)
    screen = greedy_screen.prepare(w, "int8")
    q, scale = np.asarray(screen["w"]), np.asarray(screen["scale"])
    assert q.dtype == np.int8 and np.abs(q).max(0).min() == 127
    assert np.abs(q * scale - w).max() <= 0.5001 * scale.max()


@pytest.mark.parametrize("kind", KINDS)
def test_the_bound_holds(kind):
    """|fp32 kernel logit - screen logit| <= ||h|| * bound, for every column."""
    rng = np.random.default_rng(1)
    w = _head(rng)
    screen = greedy_screen.prepare(w, kind)
    for scale in (1e-3, 1.0, 300.0):
        h = (rng.standard_normal((4, D)) * scale).astype(np.float32)
        full = np.asarray(jax.jit(decode_kernels.matmul)(h, jnp.asarray(w)), np.float64)
        approx = np.asarray(_approx(h, screen), np.float64)
        r = np.linalg.norm(h.astype(np.float64), axis=1, keepdims=True)
        gap = np.abs(full - approx) / (r * np.asarray(screen["bound"], np.float64))
        assert gap.max() <= 1.0
        assert gap.max() > 1e-3  # and it is not vacuous


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("batch", [1, 3, 8, 16])
def test_tokens_equal_the_fp32_greedy(batch, kind):
    rng = np.random.default_rng(batch)
    w = _head(rng)
    screen = greedy_screen.prepare(w, kind)
    wj = jnp.asarray(w)
    for _ in range(10):
        h = jnp.asarray(rng.standard_normal((batch, D)).astype(np.float32))
        np.testing.assert_array_equal(_screen(h, wj, screen), _full(h, wj))


@pytest.mark.parametrize("kind", KINDS)
def test_ties_nan_and_the_fallback(kind):
    """Exact ties (first index wins), near-ties of one ulp, more candidates than the screen
    keeps, inf and NaN rows: the same tokens as the fp32 path, and the check says which rows
    it could not settle."""
    rng = np.random.default_rng(7)
    w = _head(rng)
    w[:, 4000] = w[:, 123]                                      # an exact tie with column 123
    w[:, 777] = np.nextafter(w[:, 42], np.float32(np.inf))      # a near-tie with column 42
    w[:, 3000:3100] = w[:, [2999]]                             # 101 equal columns
    screen = greedy_screen.prepare(w, kind)
    wj = jnp.asarray(w)
    h = np.zeros((6, D), np.float32)
    h[0] = w[:, 123] * 10                                       # picks 123 over 4000
    h[1] = np.abs(w[:, 42]) * 10                                 # 42 against 777
    h[2] = w[:, 2999] * 10                                      # 101 candidates: fallback
    h[3] = rng.standard_normal(D)
    h[4, 0] = np.nan
    h[5, 1] = np.inf
    hj = jnp.asarray(h)
    np.testing.assert_array_equal(_screen(hj, wj, screen), _full(hj, wj))
    _, safe = jax.jit(decode_kernels.greedy_screen)(
        hj, wj, _approx(hj, screen), screen["bound"])
    assert list(np.asarray(safe)) == [True, True, False, True, False, False]


def test_applies_only_where_the_head_is_wide_fp32_and_the_kernels_run():
    wide = jnp.zeros((D, V), jnp.float32)
    assert not greedy_screen.applies(wide)  # outside decode_kernels.enabled()
    with decode_kernels.enabled():
        assert greedy_screen.applies(wide)
        assert not greedy_screen.applies(jnp.zeros((D, 1000), jnp.float32))
        assert not greedy_screen.applies(wide.astype(jnp.bfloat16))


@pytest.mark.parametrize("kind", KINDS)
def test_generation_with_the_screen_equals_without(kind):
    from owl_jax.testing.models import FAST, random_params
    cfg = tiny(vocab_size=V)
    params = random_params(cfg)
    gen = Generator(cfg, params, compiler_options=FAST, screen=kind)
    assert gen._call_params["greedy_screen"]["w"].dtype == {"bf16": jnp.bfloat16,
                                                            "int8": jnp.int8}[kind]
    plain = Generator(cfg, params, compiler_options=FAST, screen=None)
    assert "greedy_screen" not in plain._call_params
    rng = np.random.default_rng(0)
    rows = [[1] + rng.integers(3, V, n).tolist() for n in (5, 17, 9)]
    g = GenerationConfig(max_new_tokens=24, eos_token_id=-1)
    want = plain.generate(rows, None, g)
    for a, b in zip(gen.generate(rows, None, g), want):
        np.testing.assert_array_equal(a.token_ids, b.token_ids)
    streamed = []
    gen.generate(rows[:1], None, g, stream=streamed.append)
    np.testing.assert_array_equal(streamed[-1][0], want[0].token_ids)
