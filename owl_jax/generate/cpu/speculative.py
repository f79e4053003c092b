"""Speculative greedy decoding: several drafted tokens checked in one pass over the weights.

At batch 1 a decode step is bound by memory: it streams every weight once for one token. A pass
of k + 1 rows (the last token and a draft of k) streams them once too, and costs ~10-20% more.
The pass keeps the draft's longest prefix that greedy decoding confirms, plus the greedy token
after it: 1 to k + 1 tokens. The decode kernels give each row of a pass the bits a one-token step
would give it (each output row is summed the same way whatever the row count), so the tokens are
those of plain greedy decoding, bit for bit, whatever the draft; the draft only decides the speed.

Two drafts (`GenerationConfig`):
- prompt lookup (`owl_jax.generate.cpu.lookup`, `prompt_lookup_num_tokens`): copied from an earlier
  occurrence of the last n-gram;
- the int8 self-draft (`generate.cpu.self_draft`, `self_draft_tokens`, on by default): the LLM with
  int8 weights, one cheap step per drafted token. Its length follows HF's schedule for
  assistant models, so a draft model that is often wrong costs one int8 step a pass.

`SpeculativeDecoding` is mixed into `owl_jax.generate.Generator`, whose decode loop calls
`_speculative_step` for one prompt, plain greedy, on the CPU kernels (`draft_limit`).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from owl_jax import families
from owl_jax.generate.config import is_stop
from owl_jax.generate.cpu import decode_kernels, lookup, self_draft


def accepted(tokens, n_real, greedy):
    """How many draft tokens greedy decoding confirms: the longest prefix of tokens [B, k] (of
    n_real real ones) with tokens[:, j] == greedy[:, j], greedy [B, k + 1] being the greedy
    pick after the last token and after each draft token. Returns int32 [B] in [0, n_real]."""
    k = tokens.shape[1]
    ok = (tokens == greedy[:, :k]) & (jnp.arange(k)[None, :] < n_real[:, None])
    return jnp.sum(jnp.cumprod(ok, axis=1), axis=1).astype(jnp.int32)


class SpeculativeDecoding:
    """The check pass and the int8 draft of `owl_jax.generate.Generator` (which provides
    `_feed`, `_greedy`, `_prompt_slots` and the params)."""

    def _with_self_draft(self):
        """The call params plus the int8 draft model, made at the first request that uses it
        (a quarter of the LLM's fp32 bytes in memory)."""
        if self._self_draft_params is None:
            self._self_draft_params = dict(self._call_params, self_draft=self_draft.prepare(
                self.params[families.DECODER], self._call_params.get("greedy_screen")))
        return self._self_draft_params

    def draft_limit(self, k: int) -> int:
        """The draft length (prompt lookup or self-draft) this engine runs for a request of k
        (0: plain decoding). The check pass must give every row the bits a one-token step gives
        it, which the decode kernels do (each output row is summed the same way whatever the
        row count), so it runs where they do, with its k + 1 rows within their row limits."""
        if not (k and self.decode_kernels and decode_kernels.available()
                and self.dtype == jnp.float32):
            return 0
        group = self.cfg.text.num_attention_heads // self.cfg.text.kv_heads
        return max(0, min(k, decode_kernels.MAX_ROWS - 1, decode_kernels.MAX_QUERIES // group - 1))

    def _speculative_step(self, params, st, knobs, spec):
        """One fp32 pass over the weights for the last token and a draft (batch 1, plain
        greedy): emits the draft's prefix that greedy decoding confirms and the greedy token
        after it. The draft comes from prompt lookup or from the int8 copy of the LLM. Without
        a lookup draft the pass still runs its k + 1 rows: at batch 1 it costs about what a
        one-token step does (both stream the weights once), while a lax.cond between the two
        made every pass ~2x slower (XLA copied the state through it)."""
        if spec.lookup:
            cur = self._prompt_slots(st) + st["step"]  # tokens known, prompt slots included
            draft, n_real = lookup.draft(st["seq"], cur, spec.lookup, spec.lookup_ngram)
        else:
            draft, cache = self._self_draft(params, st, spec.self_draft)
            st = dict(st, cache=cache)
            n_real = jnp.full(draft.shape[:1], st["draft_len"], jnp.int32)
        h, cache = self._feed(params, st, jnp.concatenate([st["last"][:, None], draft], 1),
                              hidden=True)                                   # [B, k + 1, D]
        tok = self._greedy(params, h.reshape(-1, h.shape[-1])).reshape(h.shape[:2])
        n = accepted(draft, n_real, tok) + 1
        st = dict(st, cache=cache, passes=st["passes"] + 1)
        if spec.self_draft:
            # HF's schedule for assistant models: two more after a fully confirmed draft, one
            # fewer (at least one) otherwise. A draft model that is often wrong then costs one
            # int8 step a pass instead of k.
            full = n[0] > n_real[0]
            st["draft_len"] = jnp.where(full, jnp.minimum(st["draft_len"] + 2, spec.self_draft),
                                        jnp.maximum(st["draft_len"] - 1, 1))
        return self._emit(st, tok, n, knobs)

    def _self_draft(self, params, st, k):
        """st["draft_len"] (<= k) greedy tokens from the int8 draft model, one step each, as
        int32 [B, k] (zeros after them), and the cache with their K/V written (the check pass
        overwrites those slots)."""
        draft_params = {**params, families.DECODER: params["self_draft"]}

        def body(i, carry):
            cache, last, toks = carry
            logits, cache = self._feed(draft_params, dict(st, cache=cache), last[:, None],
                                       offset=i)
            tok = jnp.argmax(logits[:, 0], axis=-1).astype(jnp.int32)
            return cache, tok, jax.lax.dynamic_update_slice(toks, tok[:, None], (0, i))

        b = st["last"].shape[0]
        cache, _, toks = jax.lax.fori_loop(0, st["draft_len"], body,
                                           (st["cache"], st["last"], jnp.zeros((b, k), jnp.int32)))
        return toks, cache

    def _emit(self, st, tok, n, knobs):
        """Appends the first n of tok [B, m] to every row (batch 1: the rows share `step`),
        cut after an EOS and at the row's budget."""
        lb = self._prompt_slots(st)
        t = st["step"]
        j = jnp.arange(tok.shape[1])[None, :]
        eos = is_stop(tok, knobs["eos"]) & (j < n[:, None])
        n = jnp.where(eos.any(1), jnp.argmax(eos, 1).astype(jnp.int32) + 1, n)
        n = jnp.minimum(n, st["budget"] - st["count"])
        hit = jnp.any(eos & (j < n[:, None]), 1)
        count = st["count"] + n
        # the m - n tokens past the new ones are written too and overwritten later (the
        # buffers have m spare columns; the draft and the results read only the first count)
        new = dict(st, tokens=jax.lax.dynamic_update_slice(st["tokens"], tok, (0, t)),
                   count=count, eos_hit=st["eos_hit"] | hit,
                   done=st["done"] | hit | (count >= st["budget"]),
                   last=jnp.take_along_axis(tok, (n - 1)[:, None], 1)[:, 0], step=t + n[0])
        if "seq" in st:
            new["seq"] = jax.lax.dynamic_update_slice(st["seq"], tok, (0, lb + t))
        return new
