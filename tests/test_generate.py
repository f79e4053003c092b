"""The generation engine against independent references: HF transformers' `generate` (PyTorch
LlamaForCausalLM on the same weights: greedy, repetition penalty, no-repeat-ngram, beam search),
HF's top-k / top-p warpers, a full-recomputation greedy loop through `Owl.__call__`, and
row-by-row consistency of batches with different lengths and image counts."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from owl_jax.generate import sampling
from owl_jax.generate import GenerationConfig, Generator, bucket_length
from owl_jax.generate.config import MAX_STOPS, stop_ids
from owl_jax.families.owl1.model import Owl
from owl_jax.testing.models import FAST, VOCAB, prompt_rows, random_params, small_config, to_hf


@pytest.fixture(scope="module")
def model():
    cfg = small_config()
    params = random_params(cfg)
    # A louder EOS column so that answers (and beam hypotheses) do end within a few tokens.
    params["language_model"]["lm_head"]["kernel"][:, 2] *= 2.5
    return cfg, params, Generator(cfg, jax.tree.map(jnp.asarray, params), compiler_options=FAST)


def test_host_params_are_put_on_the_device_once(model):
    """Numpy params become device arrays in the Generator: jit would copy host leaves to the
    device on every call (~60 ms per generate for a 12-layer 768-wide model)."""
    cfg, params, _ = model
    gen = Generator(cfg, params)
    leaves, host = jax.tree.leaves(gen.params), jax.tree.leaves(params)
    assert len(leaves) == len(host) and all(isinstance(a, jax.Array) for a in leaves)
    for a, h in zip(leaves, host):
        np.testing.assert_array_equal(np.asarray(a), h)


def test_new_params_are_what_later_calls_use(model, batch):
    """Setting `gen.params` (as the trainer's periodic evaluation does with each new state)
    makes every later call read the new weights, the greedy screen's and the int8 draft's copies
    included: the tokens equal a fresh engine's on the new weights, and the old buffers may be
    deleted (donated by the train step) without breaking it."""
    cfg, params, _ = model
    rows, px = batch
    gc = GenerationConfig(max_new_tokens=6, eos_token_id=-1)
    old = jax.tree.map(jnp.array, params)
    gen = Generator(cfg, old, compiler_options=FAST)
    before = [gen.generate(rows, px, gc), gen.generate(rows[:1], None, gc)]  # batch, self-draft
    new = random_params(cfg, seed=1)
    gen.params = jax.tree.map(jnp.array, new)
    jax.tree.map(lambda a: a.delete(), old)
    fresh = Generator(cfg, new, compiler_options=FAST)
    for r, p, was in ((rows, px, before[0]), (rows[:1], None, before[1])):
        got = [g.token_ids for g in gen.generate(r, p, gc)]
        assert got == [g.token_ids for g in fresh.generate(r, p, gc)]
        assert got != [g.token_ids for g in was]  # the new weights answer differently


@pytest.mark.slow
def test_params_on_another_device_move_to_the_default_one():
    """Converters hand over jax.Arrays on the host CPU; on a GPU machine the compiled calls
    would follow them and run on the CPU. Two CPU devices stand in (params on the second)."""
    import os
    import subprocess
    import sys
    code = """
import flax.linen as nn, jax, jax.numpy as jnp
from owl_jax.families.owl1.config import tiny
from owl_jax.generate import Generator
from owl_jax.families.owl1.model import Owl
cfg = tiny()
s = cfg.vision.image_size
shapes = nn.unbox(jax.eval_shape(lambda: Owl(cfg).init(
    jax.random.key(0), jnp.zeros((1, 2), jnp.int32), jnp.zeros((1, s, s, 3)))))["params"]
other = jax.devices()[1]
params = jax.tree.map(lambda a: jax.device_put(jnp.zeros(a.shape, a.dtype), other), shapes)
gen = Generator(cfg, params)
print(sorted({d.id for a in jax.tree.leaves(gen.params) for d in a.devices()}))
"""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2",
               JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[0]", out.stdout


def test_fp32_dots_are_traced_at_full_precision(model):
    """JAX's default precision lets a GPU run fp32 dots in TF32 and a TPU in one bf16 pass; the
    engine traces fp32 models under "float32" (bf16 ones keep the backend's default)."""
    cfg, params, _ = model
    for dtype, want in ((jnp.float32, "float32"), (jnp.bfloat16, None)):
        gen = Generator(cfg, jax.tree.map(lambda a: jnp.asarray(a, dtype), params), dtype=dtype,
                        compiler_options=FAST)
        seen, lm = [], gen._lm

        def spy(*a, **k):
            seen.append(jax.config.jax_default_matmul_precision)
            return lm(*a, **k)
        gen._lm = spy
        gen.generate([[1, 5, 6]], None, GenerationConfig(max_new_tokens=3))
        assert len(seen) >= 2 and set(seen) == {want}, dtype


@pytest.fixture(scope="module")
def batch(model):
    cfg, _, _ = model
    rng = np.random.default_rng(1)
    s = cfg.vision.image_size
    rows = prompt_rows(cfg, rng)
    px = rng.standard_normal((3, s, s, 3)).astype(np.float32)
    return rows, px


def _full_greedy(cfg, params, row, px, n):
    """Greedy by recomputing the whole sequence with Owl.__call__ every step (no cache).
    Right padding to a fixed length keeps one compile; causality makes it harmless."""
    model = Owl(cfg)
    length = len(row) + n
    f = jax.jit(lambda p, ids, px: model.apply({"params": p}, ids, px), compiler_options=FAST)
    seq = list(row)
    for _ in range(n):
        ids = np.zeros((1, length), np.int32)
        ids[0, :len(seq)] = seq
        logits = f(params, ids, px)
        seq.append(int(jnp.argmax(logits[0, len(seq) - 1])))
    return seq[len(row):]


# -------------------------------------------------------------------------------------------
# Batching, caching, stopping


def test_batch_rows_match_single_prompts_and_full_recompute(model, batch):
    cfg, params, gen = model
    rows, px = batch
    gc = GenerationConfig(max_new_tokens=8, eos_token_id=-1)
    together = gen.generate(rows, px, gc)
    img_of = [px[:0], px[:1], px[1:3], px[:0]]
    for i, row in enumerate(rows):
        alone = gen.generate([row], img_of[i] if len(img_of[i]) else None, gc)[0]
        assert alone.token_ids == together[i].token_ids, i
        assert together[i].finish_reason == "length" and len(alone.token_ids) == 8
    # KV-cached decoding equals recomputing everything (the row with two images)
    assert together[2].token_ids == _full_greedy(cfg, params, rows[2], px[1:3], 8)
    # the answers depend on the prompt (the test would be vacuous otherwise)
    assert len({tuple(g.token_ids) for g in together}) == len(rows)


def test_eos_stops_its_row_only(model, batch):
    _, _, gen = model
    rows, px = batch
    free = gen.generate(rows, px, GenerationConfig(max_new_tokens=8, eos_token_id=-1))
    # as "EOS", pick a token row 0 makes (after step 2) that no other row makes
    others = {t for g in free[1:] for t in g.token_ids}
    stop = next(t for t in free[0].token_ids[2:] if t not in others)
    k = free[0].token_ids.index(stop)
    out = gen.generate(rows, px, GenerationConfig(max_new_tokens=8, eos_token_id=stop))
    assert out[0].finish_reason == "eos" and out[0].token_ids == free[0].token_ids[:k]
    for o, f in zip(out[1:], free[1:]):
        assert o.finish_reason == "length" and o.token_ids == f.token_ids


def test_several_stop_ids_stop_each_row_at_the_first_of_them(model, batch):
    cfg, _, gen = model
    rows, px = batch
    free = gen.generate(rows, px, GenerationConfig(max_new_tokens=8, eos_token_id=-1))
    # row 0 stops at one id, row 1 at another; a third id nobody makes
    a = next(t for t in free[0].token_ids[2:] if t not in free[1].token_ids)
    b = next(t for t in free[1].token_ids[1:] if t not in free[0].token_ids)
    stops = (cfg.text.vocab_size + 3, a, b)
    for beam in (False, True):   # one beam is greedy; its hypotheses close at any stop id
        out = gen.generate(rows, px, GenerationConfig(max_new_tokens=8, eos_token_id=stops),
                           force_beam_search=beam)
        for g, f, t in zip(out, free, (a, b)):
            assert g.finish_reason == "eos" and g.token_ids == f.token_ids[:f.token_ids.index(t)]
    # None: the model config's eos_token_id and stop_token_ids
    np.testing.assert_array_equal(stop_ids(cfg.text), [cfg.text.eos_token_id, -1, -1, -1])
    qwen = dataclasses.replace(cfg.text, stop_token_ids=(a, b))
    np.testing.assert_array_equal(stop_ids(qwen), [cfg.text.eos_token_id, a, b, -1])
    with pytest.raises(ValueError, match="eos_token_id"):
        stop_ids(cfg.text, tuple(range(MAX_STOPS + 1)))


def test_streaming_grows_to_the_final_answer(model, batch):
    _, _, gen = model
    rows, px = batch
    gc = GenerationConfig(max_new_tokens=9, eos_token_id=-1)
    seen = []
    gen.stream_chunk = 3
    out = gen.generate(rows[:1], None, gc, stream=seen.append)
    final = gen.generate(rows[:1], None, gc)
    assert out[0].token_ids == final[0].token_ids
    lens = [len(s[0]) for s in seen]
    assert lens[0] == 1 and lens[-1] == 9 and lens == sorted(lens) and len(lens) >= 3
    for s in seen:
        assert s[0] == final[0].token_ids[:len(s[0])]


def test_prompt_too_long_is_a_clear_error(model):
    cfg, _, gen = model
    ctx = cfg.text.max_position_embeddings
    with pytest.raises(ValueError, match=r"prompt 1 has \d+ tokens.*context is %d" % ctx):
        gen.generate([[1, 5], [1] * ctx], None, GenerationConfig(max_new_tokens=4))
    with pytest.raises(ValueError, match="image slots"):
        gen.generate([[1, -1, -1]], None, GenerationConfig(max_new_tokens=4))
    with pytest.warns(UserWarning, match="only 3 of the 10 new tokens fit"):
        _, _, budget, _ = gen.prepare([[1] * 5, [1] * (ctx - 3)], 10)
    assert budget.tolist() == [10, 3]  # each row stops at its own budget


def test_prompt_lengths_in_one_bucket_share_a_compile(model):
    _, _, gen = model
    assert bucket_length(5) == bucket_length(32) == 32 and bucket_length(33) == 64
    assert bucket_length(130) == 160 and bucket_length(256) == 256
    assert bucket_length(300) == 320 and bucket_length(513) == 640
    gc = GenerationConfig(max_new_tokens=5)
    gen.generate([[1, 4, 5, 6]], None, gc)
    before = gen.traces
    gen.generate([[1] + [7] * 20], None, gc)
    gen.generate([[1] + [8] * 30], None, GenerationConfig(max_new_tokens=7))  # same capacity
    assert gen.traces == before
    gen.generate([[1] + [8] * 40], None, gc)  # next bucket: prefill and decode retrace
    assert gen.traces == before + 2


# -------------------------------------------------------------------------------------------
# Sampling


def test_greedy_is_numpy_argmax():
    """The max + min greedy pick equals np.argmax: the first of tied maxima, the first NaN."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((6, 1000)).astype(np.float32)
    x[1, [7, 500]] = x[1].max() + 1          # a tie: the first wins
    x[2, 999] = np.inf
    x[3, [3, 900]] = np.nan                  # NaN: the first NaN, as np / jnp.argmax
    x[4] = -np.inf
    x[5] = 0.0
    got = np.asarray(jax.jit(sampling.greedy)(jnp.asarray(x)))
    np.testing.assert_array_equal(got, np.argmax(x, axis=-1))
    assert got.dtype == np.int32


def test_sampling_seeds_and_top_k_one(model, batch):
    _, _, gen = model
    rows, px = batch
    greedy = gen.generate(rows, px, GenerationConfig(max_new_tokens=8, eos_token_id=-1))
    sample = lambda **kw: [g.token_ids for g in gen.generate(  # noqa: E731
        rows, px, GenerationConfig(max_new_tokens=8, eos_token_id=-1, **kw))]
    assert sample(temperature=1.0, top_k=1, seed=3) == [g.token_ids for g in greedy]
    a = sample(temperature=1.5, top_p=0.95, seed=0)
    assert a == sample(temperature=1.5, top_p=0.95, seed=0)
    assert a != sample(temperature=1.5, top_p=0.95, seed=1)
    assert a != [g.token_ids for g in greedy]


def test_top_k_top_p_match_hf_warpers():
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((4, 50)).astype(np.float32) * 3
    top_k = jax.jit(sampling.top_k_mask, static_argnums=1)
    top_p = jax.jit(sampling.top_p_mask)
    for k in (1, 5, 50):
        ref = TopKLogitsWarper(k)(None, torch.from_numpy(logits)).numpy()
        np.testing.assert_array_equal(np.asarray(top_k(logits, k)), ref)
    for p in (0.05, 0.5, 0.9, 1.0):
        ref = TopPLogitsWarper(p)(None, torch.from_numpy(logits)).numpy()
        got = np.asarray(top_p(logits, np.float32(p)))
        np.testing.assert_array_equal(np.isinf(got), np.isinf(ref))


def test_ngram_ban_matches_hf_processor():
    from transformers.generation.logits_process import NoRepeatNGramLogitsProcessor
    rng = np.random.default_rng(0)
    seqs = rng.integers(0, 6, (5, 30))
    banned = jax.jit(sampling.ngram_banned, static_argnums=(2, 3))
    for n in (2, 3):
        for cur in (1, 2, 7, 30):
            ref = NoRepeatNGramLogitsProcessor(n)(torch.from_numpy(seqs[:, :cur]),
                                                  torch.zeros(5, 6)).numpy()
            hist = np.full((5, 34), -1)
            hist[:, :cur] = seqs[:, :cur]
            got = banned(hist, np.int32(cur), n, 6)
            np.testing.assert_array_equal(np.asarray(got), np.isinf(ref), err_msg=f"{n} {cur}")


# -------------------------------------------------------------------------------------------
# Against HF transformers generate (text-only prompts, same weights)


@pytest.fixture(scope="module")
def hf(model):
    cfg, params, _ = model
    return to_hf(cfg, params)


def _hf_new_tokens(hf, row, **kw):
    ids = torch.tensor([row])
    with torch.no_grad():
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), pad_token_id=0, **kw)
    new = out[0, len(row):].tolist()
    if 2 in new:
        return new[:new.index(2)], "eos"
    return new, "length"


@pytest.mark.parametrize("kw", [
    dict(),
    dict(repetition_penalty=1.8, no_repeat_ngram_size=2),
    dict(num_beams=3),
    dict(num_beams=3, no_repeat_ngram_size=2, repetition_penalty=1.3, length_penalty=0.5),
], ids=["greedy", "penalty_ngram", "beam3", "beam3_ngram_penalty_lp"])
def test_matches_hf_generate(model, hf, kw):
    _, _, gen = model
    rng = np.random.default_rng(5)
    rows = [[1] + rng.integers(3, VOCAB, n).tolist() for n in (4, 11, 7)]
    n_new = 24
    ours = gen.generate(rows, None, GenerationConfig(max_new_tokens=n_new, **kw))
    n_eos, n_len = 0, 0
    for row, got in zip(rows, ours):
        ref, reason = _hf_new_tokens(hf, row, max_new_tokens=n_new, do_sample=False,
                                     early_stopping=True, **kw)
        assert (got.token_ids, got.finish_reason) == (ref, reason), row
        n_eos += reason == "eos"
    assert n_eos >= 1  # stopping at EOS (for beams: hypotheses closed by EOS) was exercised


def test_penalties_over_new_tokens_only_as_official(model, hf):
    """penalize_prompt=False: the history is [BOS] + new tokens, what the official generate's
    HF call sees. Reference: HF's own processors applied to exactly that sequence."""
    from transformers import LogitsProcessorList
    from transformers.generation.logits_process import (NoRepeatNGramLogitsProcessor,
                                                        RepetitionPenaltyLogitsProcessor)
    _, _, gen = model

    class OnNewTokens:
        def __init__(self, n_prompt):
            self.n = n_prompt
            self.procs = [RepetitionPenaltyLogitsProcessor(1.8), NoRepeatNGramLogitsProcessor(2)]

        def __call__(self, input_ids, scores):
            seq = torch.cat([torch.ones_like(input_ids[:, :1]), input_ids[:, self.n:]], 1)
            for p in self.procs:
                scores = p(seq, scores)
            return scores
    rng = np.random.default_rng(6)
    rows = [[1] + rng.integers(3, VOCAB, n).tolist() for n in (4, 11, 7)]
    kw = dict(repetition_penalty=1.8, no_repeat_ngram_size=2)
    ours = gen.generate(rows, None, GenerationConfig(max_new_tokens=24, penalize_prompt=False,
                                                      **kw))
    full = gen.generate(rows, None, GenerationConfig(max_new_tokens=24, **kw))
    assert [g.token_ids for g in ours] != [g.token_ids for g in full]  # the scope matters
    for row, got in zip(rows, ours):
        ref = _hf_new_tokens(hf, row, max_new_tokens=24, do_sample=False,
                             logits_processor=LogitsProcessorList([OnNewTokens(len(row))]))
        assert (got.token_ids, got.finish_reason) == ref, row


def test_one_beam_is_greedy(model, batch):
    _, _, gen = model
    rows, px = batch
    gc = GenerationConfig(max_new_tokens=8)
    greedy = gen.generate(rows, px, gc)
    beam = gen.generate(rows, px, gc, force_beam_search=True)
    assert [g.token_ids for g in beam] == [g.token_ids for g in greedy]


def test_bf16_decoding_follows_bf16_logits(model, batch):
    cfg, params, _ = model
    rows, px = batch
    p16 = jax.tree.map(lambda x: jnp.asarray(x, jnp.bfloat16), params)
    gen = Generator(cfg, p16, dtype=jnp.bfloat16, compiler_options=FAST)
    out = gen.generate(rows[:1], None, GenerationConfig(max_new_tokens=4, eos_token_id=-1))
    assert out[0].token_ids == _full_greedy_bf16(cfg, p16, rows[0], None, 4)


def _full_greedy_bf16(cfg, params, row, px, n):
    model = Owl(cfg, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    seq = list(row)
    f = jax.jit(lambda p, ids, px: model.apply({"params": p}, ids, px), compiler_options=FAST)
    for _ in range(n):
        ids = np.zeros((1, len(row) + n), np.int32)
        ids[0, :len(seq)] = seq
        seq.append(int(jnp.argmax(f(params, ids, px)[0, len(seq) - 1].astype(jnp.float32))))
    return seq[len(row):]
