"""Beam search with the semantics of HF's `BeamSearchScorer` (transformers 4.28, the version the
official mPLUG-Owl runs), on fixed shapes inside the compiled decode loop.

Per step, for each prompt: add the running beam scores to the beams' log-softmax (after the
repetition / n-gram processors), take the top 2 * num_beams (beam, token) candidates; an EOS among
the first num_beams candidates closes a hypothesis (score / length ** length_penalty, kept if it
is among the num_beams best so far); the first num_beams non-EOS candidates become the next
beams. A prompt is done when it holds num_beams hypotheses (early_stopping=True, the official
worker default) or, with early_stopping=False, when the best candidate score normalized by the
current length cannot beat the worst hypothesis. At max length the running beams are added as
hypotheses. The best hypothesis wins.

Length: the official path calls HF generate with `inputs_embeds`, so the sequence HF scores is
[BOS] + generated; a hypothesis closed by the EOS after g tokens has length 1 + g, which equals the
number of generated tokens including that EOS (transformers >= 4.36 counts the same way for any
prompt). Running beams added at max length T have length 1 + T (4.28; newer versions use T).

State layout: the model-side arrays (cache, kv_valid, pos0, seen, hist, visual, last) have
B * num_beams rows (prompt-major; a prompt's beams share one visual context, so reordering beams
leaves it as it is); the beam bookkeeping is [B, num_beams, ...].
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from owl_jax.generate import sampling
from owl_jax.generate.config import is_stop
from owl_jax.decoder.llama import select_cache_rows

_ROW_KEYS = ("kv_valid", "pos0", "seen", "hist", "visual")  # and the cache (`select_cache_rows`)
RESULT_KEYS = ("step", "scores", "tokens", "fin_tokens", "fin_scores", "fin_len", "done")


def start(state, logits, budget, knobs, spec):
    """Expands a prefilled B-row state to B * num_beams rows and takes the first beam step."""
    nb = spec.beams
    b, tc = state["tokens"].shape
    st = dict(state)
    for k in _ROW_KEYS:
        if k in st:
            st[k] = jax.tree.map(lambda x: jnp.repeat(x, nb, axis=0), st[k])
    st["cache"] = select_cache_rows(state["cache"], jnp.repeat(jnp.arange(b), nb), b)
    st.update(
        tokens=jnp.zeros((b, nb, tc), jnp.int32),
        scores=jnp.tile(jnp.array([0.0] + [-1e9] * (nb - 1), jnp.float32), (b, 1)),
        fin_tokens=jnp.zeros((b, nb, tc), jnp.int32),
        fin_scores=jnp.full((b, nb), -jnp.inf, jnp.float32),
        fin_len=jnp.zeros((b, nb), jnp.int32),
        fin_count=jnp.zeros((b,), jnp.int32),
        done=budget <= 0,
        last=jnp.zeros((b * nb,), jnp.int32),
    )
    return step(st, jnp.repeat(logits, nb, axis=0), knobs, spec)


def step(st, logits, knobs, spec):
    nb = spec.beams
    b, _, tc = st["tokens"].shape
    v = logits.shape[-1]
    lb = st["kv_valid"].shape[1] - tc
    t = st["step"]
    logp = jax.nn.log_softmax(logits, axis=-1)
    logp = sampling.process(logp, seen=st.get("seen"), penalty=knobs["penalty"],
                            hist=st.get("hist"), cur_len=lb + t, ngram=spec.ngram)
    cand = (logp.reshape(b, nb, v) + st["scores"][:, :, None]).reshape(b, nb * v)
    top_s, top_i = jax.lax.top_k(cand, 2 * nb)
    src = top_i // v
    tok = (top_i % v).astype(jnp.int32)
    rank = jnp.arange(2 * nb)[None]
    is_eos = is_stop(tok, knobs["eos"])
    done = st["done"]
    lp = knobs["length_penalty"]
    length = (t + 1).astype(jnp.float32)

    # Closed hypotheses: EOS among the first nb candidates of a prompt that is not done.
    close = is_eos & (rank < nb) & ~done[:, None]
    norm = top_s / length ** lp
    seqs = jnp.take_along_axis(st["tokens"], src[:, :, None], axis=1).at[:, :, t].set(tok)
    fin = {k: st[k] for k in ("fin_tokens", "fin_scores", "fin_len", "fin_count")}
    for j in range(2 * nb):
        fin = _add(fin, close[:, j], norm[:, j], seqs[:, j], t + 1, nb)

    # Next beams: the first nb candidates that are not EOS (there are always >= nb of them).
    order = jnp.argsort(jnp.where(is_eos, rank + 2 * nb, rank), axis=1)[:, :nb]
    nsrc = jnp.take_along_axis(src, order, axis=1)
    ntok = jnp.take_along_axis(tok, order, axis=1)
    nscore = jnp.take_along_axis(top_s, order, axis=1)
    new_tokens = jnp.take_along_axis(st["tokens"], nsrc[:, :, None], axis=1).at[:, :, t].set(ntok)
    flat = (jnp.arange(b)[:, None] * nb + nsrc).reshape(-1)
    flat_tok = ntok.reshape(-1)

    if spec.early_stopping:
        now_done = fin["fin_count"] >= nb
    else:  # 4.28 BeamHypotheses.is_done heuristic: best candidate / cur_len ** lp
        worst = jnp.min(fin["fin_scores"], axis=1)
        now_done = (fin["fin_count"] >= nb) & (worst >= jnp.max(top_s, axis=1) / length ** lp)
    new = dict(st, tokens=new_tokens, scores=nscore, done=done | now_done, last=flat_tok,
               step=t + 1, **fin)
    new["cache"] = select_cache_rows(st["cache"], flat, b * nb)
    if "seen" in st:
        new["seen"] = sampling.mark_seen(st["seen"][flat], flat_tok)
    if "hist" in st:
        new["hist"] = st["hist"][flat].at[:, lb + t].set(flat_tok)
    return new


def _add(fin, ok, score, seq, length, nb):
    """BeamHypotheses.add for one candidate per prompt: keep the nb best."""
    slot = jnp.argmin(fin["fin_scores"], axis=1)
    worst = jnp.min(fin["fin_scores"], axis=1)
    ok = ok & ((fin["fin_count"] < nb) | (score > worst))
    rows = jnp.arange(ok.shape[0])
    upd = lambda a, x: a.at[rows, slot].set(jnp.where(  # noqa: E731
        ok.reshape((-1,) + (1,) * (x.ndim - 1)), x, a[rows, slot]))
    return {
        "fin_tokens": upd(fin["fin_tokens"], seq),
        "fin_scores": upd(fin["fin_scores"], score),
        "fin_len": upd(fin["fin_len"], jnp.broadcast_to(length, ok.shape).astype(jnp.int32)),
        "fin_count": jnp.minimum(fin["fin_count"] + ok.astype(jnp.int32), nb),
    }


def finish(st, n_rows, length_penalty, stops):
    """Host side (numpy): BeamSearchScorer.finalize, then the best hypothesis per prompt, as
    (token_ids, finish_reason) pairs: the new tokens without the EOS, and "eos" or "length"."""
    out = []
    t = int(st["step"])
    nb = st["scores"].shape[1]
    for i in range(n_rows):
        hyps = [(float(s), st["fin_tokens"][i, k, :n].tolist())
                for k, (s, n) in enumerate(zip(st["fin_scores"][i], st["fin_len"][i]))
                if np.isfinite(s)]
        if not bool(st["done"][i]):
            for k in range(nb):
                score = float(st["scores"][i, k]) / (1 + t) ** length_penalty
                seq = st["tokens"][i, k, :t].tolist()
                if len(hyps) < nb or score > min(h[0] for h in hyps):
                    hyps.append((score, seq))
                    hyps = sorted(hyps, key=lambda h: h[0])[-nb:]
        best = max(hyps, key=lambda h: h[0])[1]
        if best and best[-1] in stops:
            out.append((best[:-1], "eos"))
        else:
            out.append((best, "length"))
    return out
