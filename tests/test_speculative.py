"""Speculative greedy decoding: prompt lookup's drafts against a plain-Python re-derivation of
HF's rule, the int8 self-draft model against the fp32 one, and generation with either draft
against plain greedy decoding (the same tokens, in fewer passes)."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from owl_jax.generate.cpu import decode_kernels, greedy_screen, lookup, self_draft, speculative
from owl_jax.families.owl1.config import tiny
from owl_jax.generate import GenerationConfig, Generator
from owl_jax.testing.models import FAST, VOCAB, random_params, small_config


def _draft_reference(seq, cur, k, max_ngram):
    """HF PromptLookupCandidateGenerator: the last n tokens (n = max_ngram down to 1), their
    first earlier occurrence that is followed by a known token, then up to k tokens after it."""
    seq = list(seq[:cur])
    for n in range(max_ngram, 0, -1):
        tail = seq[cur - n:]
        if cur < n or min(tail) < 0:
            continue
        for i in range(cur - n):
            if seq[i:i + n] == tail:
                out = []
                for tok in seq[i + n:i + n + k]:
                    if tok < 0:
                        break
                    out.append(tok)
                return out
    return []


def test_draft_matches_the_reference():
    rng = np.random.default_rng(0)
    f = jax.jit(lookup.draft, static_argnums=(2, 3))
    hits = 0
    for trial in range(200):
        length = 40
        seq = rng.integers(0, 4, length).astype(np.int32)   # 4 symbols: many repeats
        seq[rng.random(length) < 0.05] = -1                 # image slots / padding
        cur = int(rng.integers(1, length + 1))
        seq[cur:] = -1                                      # not made yet
        k, m = int(rng.integers(1, 6)), int(rng.integers(1, 4))
        tokens, n = f(jnp.asarray(seq)[None], jnp.int32(cur), k, m)
        want = _draft_reference(seq.tolist(), cur, k, m)
        assert int(n[0]) == len(want), (seq, cur, k, m)
        assert np.asarray(tokens[0, :len(want)]).tolist() == want
        assert not np.asarray(tokens[0, len(want):]).any()
        hits += bool(want)
    assert 50 < hits < 200  # both cases occur


def test_accepted_is_the_confirmed_prefix():
    draft = jnp.array([[5, 6, 7], [5, 6, 7], [5, 6, 7], [5, 6, 7]])
    n_real = jnp.array([3, 3, 1, 0])
    greedy = jnp.array([[5, 6, 7, 9], [5, 0, 7, 9], [5, 6, 7, 9], [5, 6, 7, 9]])
    assert speculative.accepted(draft, n_real, greedy).tolist() == [3, 1, 1, 0]


pytestmark = pytest.mark.skipif(not decode_kernels.available(), reason="no decode kernels")


@pytest.fixture(scope="module")
def model():
    cfg = small_config()  # grouped-query attention: 4 heads over 2 kv heads
    params = random_params(cfg)
    params["language_model"]["lm_head"]["kernel"][:, 2] *= 2.5  # EOS comes up
    return cfg, Generator(cfg, jax.tree.map(jnp.asarray, params), compiler_options=FAST)


def _prompts(cfg, rng):
    t = cfg.image_tokens
    w = lambda n: rng.integers(3, VOCAB, n).tolist()  # noqa: E731
    phrase = w(5)
    return [[1] + phrase + w(3) + phrase + w(2) + phrase[:2],        # quotes itself
            [1] + w(2) + [-1] * t + w(4) + [-1] * t + w(3),           # two images
            [1] + w(12)]


# the GenerationConfig field that asks for each kind of draft
DRAFTS = pytest.mark.parametrize("draft", ["prompt_lookup_num_tokens", "self_draft_tokens"])


@DRAFTS
def test_same_tokens_as_plain_greedy_in_fewer_passes(model, draft):
    cfg, gen = model
    s = cfg.vision.image_size
    rng = np.random.default_rng(3)
    px = rng.standard_normal((2, s, s, 3)).astype(np.float32)
    plain = GenerationConfig(max_new_tokens=40, eos_token_id=-1, self_draft_tokens=0)
    saved = 0
    for row in _prompts(cfg, rng):
        images = px if -1 in row else None
        want = gen.generate([row], images, plain)[0]
        for k in (1, 3, 7):
            got = gen.generate([row], images, dataclasses.replace(plain, **{draft: k}))[0]
            assert got.token_ids == want.token_ids and got.finish_reason == "length"
            assert gen.last_passes <= len(want.token_ids) - 1
            saved = max(saved, len(want.token_ids) - 1 - gen.last_passes)
    assert saved >= 5  # drafts were accepted: the comparison is not vacuous


@DRAFTS
def test_eos_and_the_budget_cut_an_accepted_draft(model, draft):
    cfg, gen = model
    rng = np.random.default_rng(5)
    row = _prompts(cfg, rng)[0]
    free = gen.generate([row], None, GenerationConfig(max_new_tokens=40, eos_token_id=-1,
                                                      self_draft_tokens=0))[0]
    lk = {draft: 7}
    # every token it makes as the EOS, and budgets that end mid-draft
    for stop in set(free.token_ids):
        k = free.token_ids.index(stop)
        out = gen.generate([row], None, GenerationConfig(max_new_tokens=40, eos_token_id=stop,
                                                         **lk))
        assert out[0].finish_reason == "eos" and out[0].token_ids == free.token_ids[:k], stop
    for n in (1, 2, 9, 23):
        out = gen.generate([row], None, GenerationConfig(max_new_tokens=n, eos_token_id=-1, **lk))
        assert out[0].token_ids == free.token_ids[:n] and out[0].finish_reason == "length"


def test_emit_cuts_after_eos_and_at_the_budget(model):
    """A pass that confirms tokens past an EOS or past the budget keeps only those before."""
    _, gen = model
    lb, tc = 4, 16
    state = {"kv_valid": jnp.ones((1, lb + tc), bool), "tokens": jnp.zeros((1, tc), jnp.int32),
             "seq": jnp.full((1, lb + tc), -1, jnp.int32), "step": jnp.int32(3),
             "count": jnp.array([3]), "budget": jnp.array([10]), "eos_hit": jnp.array([False]),
             "done": jnp.array([False]), "last": jnp.array([0])}
    tok, n = jnp.array([[7, 2, 9, 9]]), jnp.array([4])
    out = gen._emit(state, tok, n, {"eos": jnp.int32(2)})
    assert out["count"].tolist() == [5] and out["eos_hit"].tolist() == [True]
    assert out["done"].tolist() == [True] and out["tokens"][0, 3:5].tolist() == [7, 2]
    out = gen._emit(state, tok, n, {"eos": jnp.int32(-1)})
    assert out["count"].tolist() == [7] and int(out["step"]) == 7 and int(out["last"][0]) == 9
    assert out["seq"][0, lb + 3:lb + 7].tolist() == [7, 2, 9, 9] and not out["done"][0]
    out = gen._emit(dict(state, budget=jnp.array([5])), tok, n, {"eos": jnp.int32(-1)})
    assert out["count"].tolist() == [5] and out["done"].tolist() == [True]
    assert int(out["last"][0]) == 2 and not out["eos_hit"][0]


@DRAFTS
def test_streaming_with_a_draft(model, draft):
    cfg, gen = model
    row = _prompts(cfg, np.random.default_rng(6))[0]
    gc = GenerationConfig(max_new_tokens=20, eos_token_id=-1, self_draft_tokens=0)
    seen = []
    gen.stream_chunk = 3
    out = gen.generate([row], None, dataclasses.replace(gc, **{draft: 4}), stream=seen.append)
    want = gen.generate([row], None, gc)
    assert out[0].token_ids == want[0].token_ids
    assert len(seen) >= 3 and all(s[0] == want[0].token_ids[:len(s[0])] for s in seen)


def test_where_lookup_runs(model):
    cfg, gen = model
    assert gen.draft_limit(4) == 4
    assert gen.draft_limit(50) == decode_kernels.MAX_QUERIES // 2 - 1  # 2 query heads per kv
    assert Generator(cfg, gen.params, decode_kernels=False).draft_limit(4) == 0
    # a batch decodes plainly (its rows would advance by different counts): same tokens
    rows = _prompts(cfg, np.random.default_rng(7))[::2]
    gc = GenerationConfig(max_new_tokens=12, eos_token_id=-1)
    assert ([g.token_ids for g in gen.generate(rows, None, gc)] ==
            [g.token_ids for g in gen.generate(
                rows, None, dataclasses.replace(gc, prompt_lookup_num_tokens=4))])


def test_with_the_greedy_screen():
    """A wide vocabulary: the check pass's rows go through the int8 greedy screen."""
    cfg = tiny(vocab_size=5000)
    gen = Generator(cfg, random_params(cfg), compiler_options=FAST)
    assert "greedy_screen" in gen._call_params
    rng = np.random.default_rng(8)
    phrase = rng.integers(3, 5000, 6).tolist()
    row = [1] + phrase + rng.integers(3, 5000, 4).tolist() + phrase[:3]
    plain = GenerationConfig(max_new_tokens=32, eos_token_id=-1)
    want = gen.generate([row], None, plain)[0].token_ids
    for draft in ("prompt_lookup_num_tokens", "self_draft_tokens"):
        got = gen.generate([row], None, dataclasses.replace(plain, **{draft: 5}))
        assert got[0].token_ids == want


def test_the_self_draft_model_is_the_int8_llm(model):
    """Every layer kernel as int8_columns quantizes it; the embedding, norms and (with an int8
    greedy screen) the head copy are the arrays the engine already holds, not copies."""
    _, gen = model
    lm = gen.params["language_model"]
    screen = greedy_screen.prepare(lm["lm_head"]["kernel"], "int8")
    draft = self_draft.prepare(lm, screen)
    for name, layer in lm.items():
        if not name.startswith("layers_"):
            continue
        for path, w in jax.tree_util.tree_leaves_with_path(layer):
            if path[-1].key != "kernel":
                continue
            node = draft[name]
            for p in path[:-1]:
                node = node[p.key]
            wq, scale = greedy_screen.int8_columns(w)
            assert node["kernel"].dtype == jnp.int8
            np.testing.assert_array_equal(node["kernel"], wq)
            np.testing.assert_array_equal(node["kernel_scale"], scale)
    assert draft["embed_tokens"] is lm["embed_tokens"] and draft["norm"] is lm["norm"]
    assert draft["lm_head"]["kernel"] is screen["w"]
    own = self_draft.prepare(lm)["lm_head"]  # without a screen: its own int8 head
    np.testing.assert_array_equal(own["kernel"], screen["w"])


def test_a_useless_draft_still_gives_greedy_tokens(model):
    """The draft only decides the speed: a draft model whose every token is wrong (its head
    negated) gives the same tokens as plain greedy, one token a pass."""
    cfg, gen = model
    row = _prompts(cfg, np.random.default_rng(8))[2]
    gc = GenerationConfig(max_new_tokens=16, eos_token_id=-1, self_draft_tokens=3)
    want = gen.generate([row], None, dataclasses.replace(gc, self_draft_tokens=0))[0]
    good = gen.generate([row], None, gc)[0]
    assert gen.last_passes < len(want.token_ids) - 1
    params = gen._with_self_draft()
    head = params["self_draft"]["lm_head"]
    gen._self_draft_params = dict(params, self_draft=dict(
        params["self_draft"], lm_head=dict(head, kernel_scale=-head["kernel_scale"])))
    try:
        bad = gen.generate([row], None, gc)[0]
    finally:
        gen._self_draft_params = params
    assert bad.token_ids == good.token_ids == want.token_ids
    assert gen.last_passes == len(want.token_ids) - 1
