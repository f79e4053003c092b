"""Batched generation: encode images once, prefill once, then one compiled decode loop.

Layout of a batch (every row ends at the same cache slot, so one scalar slot index serves all):

    cache slot  0 ........ Lb-1 | Lb ........ Lb+Tc-1
    row 0       pad pad p p p p | t0 t1 t2 ...          (prompt left-padded to the bucket Lb)
    row 1       p p p p p p p p | t0 t1 ...

- RoPE positions are `cumsum(mask) - 1` per row (as HF does for left-padded batches), so a
  row's numbers do not depend on its padding; padded keys are masked out for every query.
- Prompt lengths are bucketed (`bucket_length`), as are the token capacity Tc, the batch size
  and the image count, so a new prompt length rarely means a new compile.
- Prefill runs the LLM over the whole prompt (the model's `prompt_inputs`: images spliced in),
  computes the head on the last position only and picks the first token. Long prompts attend
  block by block (`owl_jax.layers.blockwise`). The visual context (None for splice families;
  a cross-attention family's image keys / values) is computed there once and handed to every
  later `decode` call as `state["visual"]`, one entry per row. The decode loop is one
  `jax.lax.while_loop` inside one jitted function: feed the last token, write its K/V into the
  preallocated cache in place, pick the next token, stop a row at EOS or at its budget, stop the
  loop when every row is done. The state is donated so the cache is never copied.
- Streaming calls the same compiled loop with a smaller step limit (a chunk of N tokens), hands
  the text so far to a callback, and calls it again; each chunk costs one host round trip.

Token choice follows HF `generate` (see `owl_jax.generate.sampling`, `owl_jax.generate.beam`).
Plain greedy decoding with the CPU decode kernels reads an int8 copy of the lm_head and checks
its pick exactly (`owl_jax.generate.cpu.greedy_screen`: the same tokens, a quarter of the head's
bytes); for one prompt it checks several drafted tokens per pass over the weights
(`owl_jax.generate.cpu.speculative`: an int8 copy of the LLM or prompt lookup drafts them; the
same tokens). Results hold the new token ids only (HF 4.28 returns [BOS] + new tokens; we drop
the BOS) and never the EOS: a row that
stopped at EOS has `finish_reason == "eos"`, one that ran out of tokens `"length"`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import warnings
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from owl_jax.generate import beam as beam_lib
from owl_jax.generate import sampling
from owl_jax.generate.buckets import bucket_length, pow2
from owl_jax.generate.config import Generation, GenerationConfig, Spec, is_stop, stop_ids
from owl_jax.generate.cpu import decode_kernels, greedy_screen, speculative
from owl_jax.generate.cpu.decode_kernels import COMPILER_OPTIONS as KERNEL_COMPILER_OPTIONS
from owl_jax import families
from owl_jax.decoder import llama as llama_lib
from owl_jax.layers.masks import CacheMask, cache_mask


# -------------------------------------------------------------------------------------------
# The engine


def head_kernel(lm):
    """The decoder's head as a [D, V] kernel: its lm_head, or with tied word embeddings (no
    lm_head param) the embedding table transposed (a copy)."""
    if "lm_head" in lm:
        return lm["lm_head"]["kernel"]
    return jnp.asarray(lm["embed_tokens"]["embedding"]).T


class Generator(speculative.SpeculativeDecoding):
    """Compiled prefill + decode for one set of params.

    cfg: any family's model config. params: its unrolled param tree (plain arrays, in the compute dtype and, with a
    mesh, already placed on their shardings). mesh: optional; the KV cache is then sharded over
    the `tensor` axis by kv head. compiler_options: XLA options for every compile (e.g.
    {"xla_backend_optimization_level": 0} when compile time dominates, as in tests).
    decode_kernels: run the decode step's fp32 matmuls and attention through
    `generate.cpu.decode_kernels` (single-device CPU only; None: wherever that applies), compiled
    with KERNEL_COMPILER_OPTIONS under compiler_options. screen: the lm_head copy plain greedy
    decoding reads there ("int8", "bf16" or None for the fp32 head; `generate.cpu.greedy_screen`).
    matmul_precision: `jax.default_matmul_precision` for every call (None: "float32" for fp32,
    the backend's default for bf16).
    """

    def __init__(self, cfg, params, dtype=jnp.float32, mesh=None,
                 bucket: Callable[[int], int] = bucket_length, stream_chunk: int = 16,
                 compiler_options: dict | None = None, decode_kernels: bool | None = None,
                 screen: str | None = "int8", matmul_precision: str | None = None):
        self.cfg = cfg
        self.dtype = jnp.dtype(dtype)
        # fp32 means fp32 on every backend: JAX's default lets a GPU round fp32 dots to TF32
        # and a TPU to one bf16 pass, which the fp32 reference (HF, PyTorch) does not
        # (on an H100 the batch-8 benchmark then differed from HF in 1 of 8 rows' first 16
        # tokens). Pass "tensorfloat32" / "bfloat16" to trade that for speed.
        self.matmul_precision = matmul_precision or (
            "float32" if self.dtype == jnp.float32 else None)
        self.mesh = mesh
        if decode_kernels is None:  # the kernels have no sharding rule: one CPU device only
            decode_kernels = mesh is None and jax.default_backend() == "cpu"
        self.decode_kernels = decode_kernels
        self.bucket = bucket
        self.stream_chunk = stream_chunk
        self.model = families.of_config(cfg).model(cfg, dtype=self.dtype,
                                                   param_dtype=self.dtype)
        self.traces = 0  # how many times a prefill / decode function was traced (= compiled)
        if decode_kernels:
            compiler_options = {**KERNEL_COMPILER_OPTIONS, **(compiler_options or {})}
        self.compiler_options = compiler_options or None
        jit = functools.partial(jax.jit, compiler_options=self.compiler_options)
        self._prefill = jit(self._prefill_fn, static_argnames=("spec", "slots"))
        self._decode = jit(self._decode_fn, static_argnames=("spec",), donate_argnums=(1,))
        self._generate = jit(self._generate_fn, static_argnames=("spec", "slots"))
        self.screen = screen
        self.params = params

    @property
    def params(self):
        return self._params

    @params.setter
    def params(self, params):
        """New weights (same shapes): every later call uses them, and the copies made from the
        old ones (greedy screen, int8 draft) are made again. The compiled functions take the
        params as arguments, so no recompile."""
        # Leaves are put on the device once here: numpy passed to every call would be copied
        # every call (~60 ms for a 12-layer 768-wide model), and jax.Arrays on another device
        # (converters hand over host CPU arrays, `checkpoint.host_array`) would make every
        # compiled call run there, on the CPU of a GPU machine. With a mesh the caller has
        # placed them on their shardings.
        if self.mesh is None:
            device = jax.devices()[0]
            self._params = jax.tree.map(lambda a: jax.device_put(a, device), params)
        else:
            self._params = jax.tree.map(
                lambda a: a if isinstance(a, jax.Array) else jnp.asarray(a), params)
        # what the compiled functions get: the params, plus the greedy screen where it applies
        self._call_params = self._with_screen(self._params)
        self._self_draft_params = None

    def _with_screen(self, params):
        head = head_kernel(params[families.DECODER])
        with decode_kernels.enabled(self.decode_kernels):
            if not self.screen or self.dtype != jnp.float32 or not greedy_screen.applies(head):
                return params
        screen = greedy_screen.prepare(head, self.screen)
        if "lm_head" not in params[families.DECODER]:  # tied: keep the [D, V] copy it checks
            screen["head"] = head
        return dict(params, greedy_screen=screen)

    # ---------------------------------------------------------------------------------------
    # Model pieces (traced)

    def _lm(self, params, x, positions, mask, cache, index, hidden=False, visual=None):
        with decode_kernels.enabled(self.decode_kernels):
            return self.model.apply({"params": params}, x, positions, mask, cache, index, hidden,
                                    visual, method="decode")

    def _head(self, params, h):
        with decode_kernels.enabled(self.decode_kernels):
            return self.model.apply({"params": params}, h, method="head")

    def _constrain_cache(self, cache):
        if self.mesh is None or "tensor" not in self.mesh.shape:
            return cache
        t = self.mesh.shape["tensor"]
        spec = P("tensor", None, None) if self.cfg.text.kv_heads % t == 0 else P()
        sh = NamedSharding(self.mesh, spec)
        return jax.tree.map(lambda c: jax.lax.with_sharding_constraint(c, sh), cache)

    @staticmethod
    def _prompt_slots(state) -> int:
        """Lb: the cache slots the (left-padded) prompts take; new token t goes to Lb + t."""
        return state["kv_valid"].shape[1] - state["tokens"].shape[-1]

    def _feed(self, params, state, tokens, hidden=False, offset=0):
        """Feeds tokens [B, m] (each row's last token, then m - 1 more; or with an offset,
        tokens that far after it) at slots Lb + step - 1 + offset onwards; returns their
        next-token logits (or, with hidden, the final-normed hidden states) fp32 [B, m, ...]
        and the cache with them written."""
        m = tokens.shape[1]
        t = state["step"] + offset
        x = self.model.apply({"params": params}, tokens, method="embed_tokens")
        first = self._prompt_slots(state) + t - 1
        pos = (state["pos0"] + t - 1)[:, None] + jnp.arange(m)[None, :]
        mask = cache_mask(state["kv_valid"], first + jnp.arange(m))
        out, cache = self._lm(params, x, pos, mask, state["cache"], first, hidden,
                              state.get("visual"))
        return out.astype(jnp.float32), self._constrain_cache(cache)

    def _step_logits(self, params, state, hidden=False):
        """Feeds each row's last token and returns next-token logits (or, with hidden, the
        final-normed hidden states [B, D])."""
        out, cache = self._feed(params, state, state["last"][:, None], hidden)
        return out[:, 0], cache

    # ---------------------------------------------------------------------------------------
    # Prefill and decode (traced)

    def _prefill_fn(self, params, ids, valid, pixel_values, budget, knobs, *, spec, slots):
        """ids/valid [B, Lb] left-padded, pixel_values [N, H, W, 3] or None; encodes the
        images, splices them in, fills the cache; returns the decode state after the first
        token."""
        self.traces += 1
        b, lb = ids.shape
        positions = jnp.maximum(jnp.cumsum(valid, axis=1) - 1, 0).astype(jnp.int32)
        if pixel_values is not None:
            pixel_values = pixel_values.astype(self.dtype)
        x, visual = self.model.apply({"params": params}, ids, pixel_values, positions,
                                     method="prompt_inputs")
        kv_valid = jnp.concatenate([valid.astype(bool), jnp.ones((b, slots - lb), bool)], 1)
        cache = llama_lib.init_cache(self.cfg.text, b, slots, self.dtype)
        cache = self._constrain_cache(cache)
        mask = CacheMask(kv_valid, jnp.arange(lb))  # long prompts attend block by block
        hidden, cache = self._lm(params, x, positions, mask, cache, 0, True, visual)
        logits = self._head(params, hidden[:, -1]).astype(jnp.float32)
        tc = slots - lb
        state = {
            "cache": cache, "kv_valid": kv_valid, "pos0": valid.sum(1).astype(jnp.int32),
            "tokens": jnp.zeros((b, tc), jnp.int32), "step": jnp.zeros((), jnp.int32),
            "key": jax.random.key(knobs["seed"]),
        }
        if visual is not None:  # the images' per-row context, read by every decode step
            state["visual"] = visual
        # The token history the repetition penalty and n-gram ban look at: the prompt, or
        # (penalize_prompt=False, as the official generate whose HF call sees only
        # [BOS] + new tokens) just a BOS in the prompt's last slot.
        only_bos = jnp.where(jnp.arange(lb) == lb - 1, self.cfg.text.bos_token_id, -1)
        prompt = jnp.where(knobs["penalize_prompt"], jnp.where(valid > 0, ids, -1),
                           only_bos[None])
        if spec.penalty:
            state["seen"] = sampling.seen_from_prompt(prompt, self.cfg.text.vocab_size)
        if spec.ngram:
            state["hist"] = jnp.concatenate([prompt, jnp.full((b, tc), -1, jnp.int32)], 1)
        if spec.lookup:  # the whole sequence, where prompt lookup finds its drafts
            state["seq"] = jnp.concatenate([jnp.where(valid > 0, ids, -1),
                                            jnp.full((b, tc), -1, jnp.int32)], 1)
        if spec.draft:
            state["passes"] = jnp.zeros((), jnp.int32)
        if spec.self_draft:  # how many tokens the next pass drafts, 1 to k
            state["draft_len"] = jnp.int32(spec.self_draft)
        if spec.beam_search:
            return beam_lib.start(state, logits, budget, knobs, spec)
        state.update(count=jnp.zeros((b,), jnp.int32), done=budget <= 0,
                     eos_hit=jnp.zeros((b,), bool), budget=budget,
                     last=jnp.zeros((b,), jnp.int32))
        return self._choose(state, logits, knobs, spec)

    def _choose(self, state, logits, knobs, spec, tok=None):
        """Greedy / sampled token for every row that is not done (or `tok`, already chosen);
        bookkeeping."""
        lb = self._prompt_slots(state)
        t = state["step"]
        if tok is None:
            logits = sampling.process(
                logits, seen=state.get("seen"), penalty=knobs["penalty"],
                hist=state.get("hist"), cur_len=lb + t, ngram=spec.ngram)
            key = jax.random.fold_in(state["key"], t)
            tok = sampling.choose(logits, key, do_sample=spec.sample,
                                  temperature=knobs["temperature"], top_k=spec.top_k,
                                  top_p=knobs["top_p"] if spec.top_p else None)
        done = state["done"]
        tok = jnp.where(done, self.cfg.text.pad_token_id, tok)
        eos = ~done & is_stop(tok, knobs["eos"])
        count = state["count"] + (~done).astype(jnp.int32)
        new = dict(state, tokens=state["tokens"].at[:, t].set(tok), count=count,
                   eos_hit=state["eos_hit"] | eos, done=done | eos | (count >= state["budget"]),
                   last=tok, step=t + 1)
        if spec.penalty:
            new["seen"] = sampling.mark_seen(state["seen"], jnp.where(done, -1, tok))
        if spec.lookup:
            new["seq"] = state["seq"].at[:, lb + t].set(tok)
        if spec.ngram:
            new["hist"] = state["hist"].at[:, lb + t].set(jnp.where(done, -1, tok))
        return new

    def _decode_fn(self, params, state, limit, knobs, *, spec):
        """Runs decode steps until `limit` tokens exist or every row is done."""
        self.traces += 1

        def cond(st):
            return (st["step"] < limit) & ~jnp.all(st["done"])

        # plain greedy at a batch the fp32 head would also run through the decode kernels
        screened = ("greedy_screen" in params and state["last"].shape[0] <= decode_kernels.MAX_ROWS
                    and spec.plain_greedy)

        def body(st):
            if spec.draft:
                return self._speculative_step(params, st, knobs, spec)
            if screened:
                h, cache = self._step_logits(params, st, hidden=True)
                return self._choose(dict(st, cache=cache), None, knobs, spec,
                                    tok=self._greedy(params, h))
            logits, cache = self._step_logits(params, st)
            st = dict(st, cache=cache)
            if spec.beam_search:
                return beam_lib.step(st, logits, knobs, spec)
            return self._choose(st, logits, knobs, spec)

        return jax.lax.while_loop(cond, body, state)

    def _greedy(self, params, h):
        """Greedy tokens int32 [N] for final-normed hidden states h fp32 [N, D] (N <=
        MAX_ROWS where the params hold a greedy screen)."""
        if "greedy_screen" in params:
            screen = params["greedy_screen"]
            head = screen["head"] if "head" in screen else head_kernel(params[families.DECODER])
            return greedy_screen.tokens(h, head, screen)
        return sampling.greedy(self._head(params, h).astype(jnp.float32))

    def _generate_fn(self, params, ids, valid, pixel_values, budget, knobs, limit, *, spec,
                     slots):
        """Prefill and the whole decode loop in one compiled call (the non-streaming path)."""
        state = self._prefill_fn(params, ids, valid, pixel_values, budget, knobs, spec=spec,
                                 slots=slots)
        return self._decode_fn(params, state, limit, knobs, spec=spec)

    # ---------------------------------------------------------------------------------------
    # Host side

    @staticmethod
    def _pad_images(pixel_values):
        """[N, H, W, 3] -> N padded to a power of two with zero images (never spliced), so that
        image counts share compiles."""
        if pixel_values is None or len(pixel_values) == 0:
            return None
        n = pixel_values.shape[0]
        px = np.zeros((pow2(n),) + tuple(pixel_values.shape[1:]), np.float32)
        px[:n] = np.asarray(pixel_values, np.float32)
        return px

    def prepare(self, rows: Sequence[Sequence[int]], max_new_tokens: int,
                uniform_budget: bool = False, spare: int = 0):
        """Left-pads rows into buckets. Returns (ids, valid, budget, slots) as numpy: budget =
        new tokens each row may make (the context may allow fewer than max_new_tokens; beam
        search uses the smallest for all rows); slots: the cache length, with `spare` slots
        past the last new token (a prompt-lookup pass writes its whole draft)."""
        ctx = self.cfg.text.max_position_embeddings
        lens = [len(r) for r in rows]
        for i, n in enumerate(lens):
            if n == 0:
                raise ValueError(f"prompt {i} is empty (it needs at least the BOS token)")
            if n >= ctx:
                raise ValueError(
                    f"prompt {i} has {n} tokens (each image takes {self.cfg.image_tokens}); the "
                    f"model's context is {ctx} tokens (max_position_embeddings), so nothing "
                    f"can be generated. Shorten the prompt or use fewer images.")
        budget = np.array([min(max_new_tokens, ctx - n) for n in lens], np.int32)
        if (budget < max_new_tokens).any():
            i = int(np.argmin(budget))
            warnings.warn(f"prompt {i} has {lens[i]} tokens: only {budget[i]} of the "
                          f"{max_new_tokens} new tokens fit the {ctx}-token context")
        if uniform_budget:
            budget[:] = budget.min()
        b = pow2(len(rows))
        lb = self.bucket(max(lens))
        tc = pow2(max_new_tokens + spare, 16)
        ids = np.zeros((b, lb), np.int32)
        valid = np.zeros((b, lb), np.int32)
        for i, r in enumerate(rows):
            ids[i, lb - len(r):] = r
            valid[i, lb - len(r):] = 1
        ids[len(rows):, -1] = self.cfg.text.bos_token_id  # filler rows: one token, no budget
        valid[len(rows):, -1] = 1
        budget = np.concatenate([budget, np.zeros(b - len(rows), np.int32)])
        return ids, valid, budget, lb + tc

    def generate(self, rows: Sequence[Sequence[int]], pixel_values=None,
                 config: GenerationConfig = GenerationConfig(),
                 stream: Callable[[list[list[int]]], None] | None = None,
                 force_beam_search: bool = False) -> list[Generation]:
        """rows: prompt ids per row (BOS first, -1 image slots); pixel_values [N, H, W, 3]: all
        images in order of appearance. stream(tokens_so_far_per_row) is called after every
        chunk of `stream_chunk` tokens (greedy / sampling) or once at the end (beam search).
        force_beam_search runs the beam-search code even for num_beams=1 (where it must agree
        with greedy; a consistency check)."""
        config.validate()
        n_slots = sum(int(np.sum(np.asarray(r) < 0)) for r in rows)
        n_img = 0 if pixel_values is None else int(pixel_values.shape[0])
        if n_slots != n_img * self.cfg.image_tokens:
            raise ValueError(f"the prompts reserve {n_slots} image slots "
                             f"({n_slots / self.cfg.image_tokens:g} images of "
                             f"{self.cfg.image_tokens}) but {n_img} images were given")
        spec = Spec(sample=config.temperature > 0, top_k=config.top_k if config.temperature > 0
                    else 0, top_p=config.temperature > 0 and config.top_p < 1.0,
                    penalty=config.repetition_penalty != 1.0, ngram=config.no_repeat_ngram_size,
                    beams=config.num_beams, early_stopping=config.early_stopping,
                    beam_search=config.num_beams > 1 or force_beam_search)
        if len(rows) == 1 and spec.plain_greedy:
            lookup = self.draft_limit(config.prompt_lookup_num_tokens)
            spec = dataclasses.replace(
                spec, lookup=lookup, lookup_ngram=config.max_matching_ngram_size,
                self_draft=0 if lookup else self.draft_limit(config.self_draft_tokens))
        params = self._call_params
        if spec.self_draft:
            params = self._with_self_draft()
        ids, valid, budget, slots = self.prepare(rows, config.max_new_tokens,
                                                 uniform_budget=spec.beam_search,
                                                 spare=spec.draft)
        px = self._pad_images(pixel_values)
        eos = stop_ids(self.cfg.text, config.eos_token_id)
        knobs = {"temperature": jnp.float32(max(config.temperature, 1e-6)),
                 "top_p": jnp.float32(config.top_p),
                 "penalty": jnp.float32(config.repetition_penalty),
                 "length_penalty": jnp.float32(config.length_penalty),
                 "seed": jnp.uint32(config.seed % 2**32), "eos": jnp.asarray(eos),
                 "penalize_prompt": jnp.bool_(config.penalize_prompt)}
        with (jax.set_mesh(self.mesh) if self.mesh is not None else contextlib.nullcontext(),
              jax.default_matmul_precision(self.matmul_precision)):
            total = int(budget.max())
            if stream is None or spec.beam_search:
                state = self._generate(params, ids, valid, px, budget, knobs,
                                       jnp.int32(total), spec=spec, slots=slots)
            else:
                state = self._prefill(params, ids, valid, px, budget, knobs, spec=spec,
                                      slots=slots)
                limit = 1
                while True:
                    stream(self._partial(state, len(rows)))
                    if limit >= total or bool(jnp.all(state["done"])):
                        break
                    limit = min(limit + self.stream_chunk, total)
                    state = self._decode(params, state, jnp.int32(limit), knobs, spec=spec)
        if spec.beam_search:
            best = beam_lib.finish(jax.device_get({k: v for k, v in state.items()
                                                   if k in beam_lib.RESULT_KEYS}),
                                   len(rows), config.length_penalty, eos)
            out = [Generation(ids, reason) for ids, reason in best]
            if stream is not None:
                stream([g.token_ids for g in out])
            return out
        st = jax.device_get({k: state[k] for k in ("tokens", "count", "eos_hit")})
        # decode passes over the weights after the first token (prompt lookup makes fewer)
        self.last_passes = (int(state["passes"]) if "passes" in state
                            else int(st["count"].max()) - 1)
        out = []
        for i in range(len(rows)):
            n = int(st["count"][i])
            eos = bool(st["eos_hit"][i])
            out.append(Generation(st["tokens"][i, :n - 1 if eos else n].tolist(),
                                  "eos" if eos else "length"))
        return out

    @staticmethod
    def _partial(state, n_rows):
        st = jax.device_get({k: state[k] for k in ("tokens", "count", "eos_hit")})
        return [st["tokens"][i, :int(st["count"][i]) - int(st["eos_hit"][i])].tolist()
                for i in range(n_rows)]
