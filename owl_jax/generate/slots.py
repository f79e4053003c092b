"""Continuous batching: a fixed set of decode slots that requests join and leave between steps.

    engine = SlotEngine(generator, slots=8)
    events = engine.admit([SlotRequest(ids, pixels, max_new_tokens=64)])   # prefill + insert
    while engine.busy:
        events += engine.step()        # `steps_per_call` decode steps for every live slot
                                       # (dispatched; the previous call's tokens are read)

Layout (one row per slot, each request at its own length, so one index per row):

    cache slot   0 ......... n-1 | n ........ | ... T-1
    slot 0       p p p p p p p p | t1 t2 ...              (request A, prompt of n tokens)
    slot 1       p p p | t1 t2 t3 t4 t5 ...               (request B, joined later)

- A request's prompt starts at cache slot 0 of its row, so its RoPE position equals its cache
  slot and one `length` per row says both where the next token is written (the decoder's
  per-row `cache_index`) and which keys it may see (slots <= length). What a previous occupant
  left beyond `length` is never read.
- Prefill runs waiting requests together (right-padded to a length bucket, images encoded and
  spliced as the model's `prompt_inputs` does), picks each one's first token, and `insert`
  copies each row's KV cache (and its visual context, for families that have one) into a free
  slot. Shapes: prefill compiles once per (rows, length bucket, image count) bucket, insert
  once per prefill shape, the step once.
- A step is one compiled call that runs `steps_per_call` decode steps over all slots (a scan);
  rows that are not live compute and are ignored. Each slot carries its own sampling settings
  (temperature, top_p, seed), stop token and budget; a slot stops on EOS or its budget inside
  the call, and the host frees a finished or cancelled slot at once (the next step's `keep`).
- Token choice is the engine's (`owl_jax.generate.sampling`): greedy, or a draw from the
  row's own key `fold_in(key(seed), t)` for its t-th token, on one row's logits: a request
  gets the tokens `Generator.generate` gives it alone, whatever else shares the batch.

The model pieces (`prompt_inputs`, `decode`, `head`, the cache
sharding over a `tensor` mesh axis, the CPU decode kernels) are the `Generator`'s.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from owl_jax.decoder import llama as llama_lib
from owl_jax.generate import sampling
from owl_jax.generate.buckets import bucket_length, pow2
from owl_jax.generate.config import MAX_STOPS, is_stop, stop_ids
from owl_jax.generate.engine import Generator
from owl_jax.layers.masks import CacheMask


@dataclasses.dataclass
class SlotRequest:
    """One generation request: prompt ids (BOS first, -1 at image slots), its images
    [N, H, W, 3] in order (or None), and its decoding settings. temperature 0 = greedy."""
    ids: list[int]
    pixel_values: Any = None
    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    eos_token_id: int | tuple[int, ...] | None = None   # None: the model config's stop ids
    # set by the engine
    budget: int = 0                   # new tokens it may make (max_new_tokens, the context)
    tokens: list[int] = dataclasses.field(default_factory=list)
    finish_reason: str | None = None  # "eos", "length" or "cancelled" once finished
    id: int = -1
    stops: Any = None                 # int32 [MAX_STOPS] (generate.config.stop_ids)


@dataclasses.dataclass
class Event:
    """What one admit / step call gave a request: new token ids (never the EOS) and, when it
    ended, why ("eos" or "length")."""
    request: SlotRequest
    tokens: list[int]
    finish_reason: str | None = None


_ids = itertools.count()


class SlotEngine:
    """Fixed decode slots over one `Generator`'s model and params.

    slots: how many requests decode together. max_len: cache slots per row, prompt plus new
    tokens (default and at most the model's context). steps_per_call: decode steps per
    compiled call (more: fewer host round trips; fewer: a finished slot is refilled sooner).
    prefill_rows: most requests prefilled in one call (default: slots).
    max_views: for a model that keeps a visual context (cross-attention: mPLUG-Owl3), the most
    images (pixel views: a cut image's tiles and global view, a video's frames) one request may
    hold. Every slot keeps that many images' context, and such requests are prefilled one at
    a time with their images padded to that count, so one slot layout serves every request.
    """

    def __init__(self, generator: Generator, slots: int = 8, max_len: int | None = None,
                 steps_per_call: int = 4, prefill_rows: int | None = None,
                 bucket=bucket_length, max_views: int = 32):
        if slots < 1 or steps_per_call < 1:
            raise ValueError(f"slots and steps_per_call must be >= 1, got {slots}, "
                             f"{steps_per_call}")
        self.gen = generator
        self.cfg = generator.cfg
        ctx = self.cfg.text.max_position_embeddings
        self.max_len = min(max_len or ctx, ctx)
        self.slots = slots
        self.steps_per_call = steps_per_call
        self.prefill_rows = min(prefill_rows or slots, slots)
        self.bucket = bucket
        self.max_views = max_views
        self.visual = self._keeps_visual_context()
        if self.visual:
            self.prefill_rows = 1
        jit = functools.partial(jax.jit, compiler_options=generator.compiler_options)
        self._prefill = jit(self._prefill_fn)
        self._insert = jit(self._insert_fn, donate_argnums=(0,))
        self._step = jit(self._step_fn, donate_argnums=(1,))
        self._init = jit(self._init_fn)
        self.state = None
        self.live: list[SlotRequest | None] = [None] * slots
        self._pending = None  # (tokens of the call in flight, the slots' owners then)

    # ---------------------------------------------------------------------------------------
    # Host side

    @property
    def free(self) -> int:
        return sum(r is None for r in self.live)

    @property
    def active(self) -> int:
        return self.slots - self.free

    @property
    def busy(self) -> bool:
        """Requests hold slots, or a call's tokens are still to be read."""
        return self.active > 0 or self._pending is not None

    def _keeps_visual_context(self) -> bool:
        """Whether the model's prefill returns a visual context (traced shapes only)."""
        s = self.cfg.vision.image_size
        ids = jnp.array([[-1] * self.cfg.image_tokens + [self.cfg.text.bos_token_id]], jnp.int32)
        pos = jnp.arange(ids.shape[1])[None]

        def inputs(params, px):
            return self.gen.model.apply({"params": params}, ids, px, pos,
                                        method="prompt_inputs")
        _, visual = jax.eval_shape(inputs, self.gen._call_params,
                                   jax.ShapeDtypeStruct((1, s, s, 3), self.gen.dtype))
        return visual is not None

    def _context(self):
        mesh = self.gen.mesh
        return contextlib.ExitStack() if mesh is None else jax.set_mesh(mesh)

    def check(self, req: SlotRequest) -> SlotRequest:
        """Validates a request and sets its budget; ValueError naming the problem."""
        n = len(req.ids)
        if n == 0:
            raise ValueError("the prompt is empty (it needs at least the BOS token)")
        if n >= self.max_len:
            raise ValueError(
                f"the prompt has {n} tokens (each image takes {self.cfg.image_tokens}); this "
                f"server's context is {self.max_len} tokens, so nothing can be generated. "
                f"Shorten the prompt or use fewer images.")
        n_slots = sum(1 for i in req.ids if i < 0)
        n_img = 0 if req.pixel_values is None else len(req.pixel_values)
        if n_slots != n_img * self.cfg.image_tokens:
            raise ValueError(f"the prompt reserves {n_slots} image slots but {n_img} images "
                             f"were given ({self.cfg.image_tokens} slots each)")
        if self.visual and n_img > self.max_views:
            raise ValueError(f"the request makes {n_img} image views (a cut image's tiles and "
                             f"global view count apart); this engine holds at most "
                             f"{self.max_views} per request")
        if req.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {req.max_new_tokens}")
        if req.temperature < 0 or not 0.0 < req.top_p <= 1.0:
            raise ValueError(f"temperature must be >= 0 and top_p in (0, 1], got "
                             f"{req.temperature}, {req.top_p}")
        req.budget = min(req.max_new_tokens, self.max_len - n)
        req.stops = stop_ids(self.cfg.text, req.eos_token_id)
        if req.id < 0:
            req.id = next(_ids)
        return req

    def admit(self, requests: list[SlotRequest]) -> list[Event]:
        """Prefills `requests` (at most `free` of them; in groups of `prefill_rows`) into free
        slots. Returns each one's first event (its first token, or its end)."""
        if len(requests) > self.free:
            raise ValueError(f"{len(requests)} requests but only {self.free} free slots")
        events = []
        for i in range(0, len(requests), self.prefill_rows):
            events += self._admit_group([self.check(r) for r in
                                         requests[i:i + self.prefill_rows]])
        return events

    def _admit_group(self, reqs: list[SlotRequest]) -> list[Event]:
        if self.state is None:
            with self._context():
                self.state = self._init()
        b = pow2(len(reqs))
        lb = min(self.bucket(max(len(r.ids) for r in reqs)), self.max_len)
        ids = np.zeros((b, lb), np.int32)
        lens = np.ones((b,), np.int32)
        ids[:, 0] = self.cfg.text.bos_token_id  # filler rows: one BOS
        temp = np.zeros((b,), np.float32)
        top_p = np.ones((b,), np.float32)
        seed = np.zeros((b,), np.uint32)
        pixels = []
        for i, r in enumerate(reqs):
            ids[i, :len(r.ids)] = r.ids
            lens[i] = len(r.ids)
            temp[i], top_p[i], seed[i] = r.temperature, r.top_p, r.seed % 2**32
            if r.pixel_values is not None and len(r.pixel_values):
                pixels.append(np.asarray(r.pixel_values, np.float32))
        px = np.concatenate(pixels) if pixels else None
        if self.visual:  # always max_views images: zeros past the request's own (never seen)
            s = self.cfg.vision.image_size
            padded = np.zeros((self.max_views, s, s, 3), np.float32)
            if px is not None:
                padded[:len(px)] = px
            px = padded
        else:
            px = self.gen._pad_images(px)
        events = []
        with self._context(), jax.default_matmul_precision(self.gen.matmul_precision):
            prefix = self._prefill(self.gen._call_params, ids, lens, px, temp, top_p, seed)
            if prefix["visual"] is not None:
                self._ensure_visual(prefix["visual"])
            first = np.asarray(prefix["first"])
            for i, r in enumerate(reqs):
                slot = self.live.index(None)
                self.state = self._insert(
                    self.state, prefix, np.int32(i), np.int32(slot), np.int32(len(r.ids)),
                    np.int32(r.budget), np.float32(r.temperature), np.float32(r.top_p),
                    np.uint32(r.seed % 2**32), r.stops)
                self.live[slot] = r
                events.append(self._take(slot, first[i:i + 1]))
        return events

    def _ensure_visual(self, visual):
        """Slot rows for the model's per-row visual context, made at its first use (every
        prefill's has one shape: max_views images)."""
        if "visual" not in self.state:
            self.state = dict(self.state, visual=jax.tree.map(
                lambda v: jnp.zeros((self.slots,) + tuple(v.shape[1:]), v.dtype), visual))

    def _take(self, slot: int, toks) -> Event:
        """Host bookkeeping for the tokens a slot made (-1: it was not live)."""
        r = self.live[slot]
        if r is None:
            return None
        new, reason = [], None
        for t in toks:
            t = int(t)
            if t < 0:
                break
            if t in r.stops:
                reason = "eos"
                break
            new.append(t)
            if len(r.tokens) + len(new) >= r.budget:
                reason = "length"
                break
        r.tokens += new
        if reason is not None:
            r.finish_reason = reason
            self.live[slot] = None
        return Event(r, new, reason)

    def step(self) -> list[Event]:
        """Dispatches `steps_per_call` decode steps over all slots, then reads the tokens of
        the call before it (so the host's bookkeeping overlaps the device's work); an event per
        request that made tokens or ended there. A request that ends or is cancelled has its
        slot freed at once; what the call in flight makes for it is dropped."""
        pending, self._pending = self._pending, None
        if self.active:
            keep = np.array([r is not None for r in self.live])
            with self._context(), jax.default_matmul_precision(self.gen.matmul_precision):
                self.state, toks = self._step(self.gen._call_params, self.state, keep)
            self._pending = (toks, list(self.live))
        if pending is None:
            return []
        toks, owners = pending
        toks = np.asarray(toks)
        events = []
        for s, owner in enumerate(owners):
            if owner is not None and self.live[s] is owner:
                events.append(self._take(s, toks[s]))
        return events

    def warmup(self):
        """Compiles the step (and a one-row prefill) with a one-token request."""
        self.admit([SlotRequest([self.cfg.text.bos_token_id], max_new_tokens=2,
                                eos_token_id=-1)])
        while self.busy:
            self.step()

    def cancel(self, req: SlotRequest) -> bool:
        """Frees the request's slot at once (its row stops at the next step). False when it
        holds none (finished, or never admitted)."""
        for s, r in enumerate(self.live):
            if r is req:
                self.live[s] = None
                req.finish_reason = "cancelled"
                return True
        return False

    # ---------------------------------------------------------------------------------------
    # Device side (traced)

    def _init_fn(self):
        s = self.slots
        cache = llama_lib.init_cache(self.cfg.text, s, self.max_len, self.gen.dtype)
        zeros = lambda dt: jnp.zeros((s,), dt)  # noqa: E731
        return {"cache": self.gen._constrain_cache(cache), "length": zeros(jnp.int32),
                "last": zeros(jnp.int32), "count": zeros(jnp.int32),
                "budget": zeros(jnp.int32), "active": zeros(bool),
                "temperature": zeros(jnp.float32), "top_p": jnp.ones((s,), jnp.float32),
                "seed": zeros(jnp.uint32),
                "eos": jnp.full((s, MAX_STOPS), -1, jnp.int32)}

    @staticmethod
    def _choose(logits, temperature, top_p, seed, count):
        """Per-row token choice: greedy where temperature is 0, else a draw with the row's own
        key fold_in(key(seed), count) on its own logits (as `sampling.choose` on one row)."""
        greedy = sampling.greedy(logits)

        def row(lg, t, p, sd, c):
            key = jax.random.fold_in(jax.random.key(sd), c)
            lg = lg[None] / jnp.maximum(t, 1e-6)
            lg = jnp.where(p < 1.0, sampling.top_p_mask(lg, p), lg)
            return jax.random.categorical(key, lg, axis=-1)[0].astype(jnp.int32)

        def sample(_):
            drawn = jax.vmap(row)(logits, temperature, top_p, seed, count)
            return jnp.where(temperature > 0, drawn, greedy)
        return jax.lax.cond(jnp.any(temperature > 0), sample, lambda _: greedy, None)

    def _prefill_fn(self, params, ids, lens, pixel_values, temperature, top_p, seed):
        """ids [b, Lb] right-padded, lens [b]: each row's KV cache [.., Lb, ..], its visual
        context (or None) and its first token."""
        gen, model = self.gen, self.gen.model
        b, lb = ids.shape
        idx = jnp.arange(lb, dtype=jnp.int32)
        positions = jnp.broadcast_to(idx, (b, lb))
        if pixel_values is not None:
            pixel_values = pixel_values.astype(gen.dtype)
        x, visual = model.apply({"params": params}, ids, pixel_values, positions,
                                method="prompt_inputs")
        cache = gen._constrain_cache(llama_lib.init_cache(self.cfg.text, b, lb, gen.dtype))
        mask = CacheMask(idx[None, :] < lens[:, None], idx)  # right padding never seen
        hidden, cache = gen._lm(params, x, positions, mask, cache, 0, True, visual)
        last = jnp.take_along_axis(hidden, (lens - 1)[:, None, None], axis=1)[:, 0]
        logits = gen._head(params, last).astype(jnp.float32)
        first = self._choose(logits, temperature, top_p, seed, jnp.zeros((b,), jnp.int32))
        return {"cache": cache, "visual": visual, "first": first}

    def _insert_fn(self, state, prefix, row, slot, n, budget, temperature, top_p, seed, eos):
        """Copies prefill row `row` into slot `slot` (its KV cache at slots [0, Lb), its visual
        context) and sets the slot's settings."""
        hkv = self.cfg.text.kv_heads

        def put(dst, src):  # dst [Hkv * S, T, D], src [Hkv * b, Lb, D]
            src = src.reshape(hkv, -1, *src.shape[1:])
            src = jax.lax.dynamic_slice_in_dim(src, row, 1, axis=1)
            out = dst.reshape(hkv, self.slots, *dst.shape[1:])
            out = jax.lax.dynamic_update_slice(out, src.astype(out.dtype), (0, slot, 0, 0))
            return out.reshape(dst.shape)

        first = prefix["first"][row]
        new = dict(state, cache=self.gen._constrain_cache(
            jax.tree.map(put, state["cache"], prefix["cache"])))
        if "visual" in state:
            new["visual"] = jax.tree.map(lambda v, p: v.at[slot].set(p[row].astype(v.dtype)),
                                         state["visual"], prefix["visual"])
        for name, value in (("length", n), ("last", first), ("count", 1), ("budget", budget),
                            ("active", ~is_stop(first, eos) & (budget > 1)),
                            ("temperature", temperature), ("top_p", top_p), ("seed", seed),
                            ("eos", eos)):
            new[name] = state[name].at[slot].set(value)
        return new

    def _step_fn(self, params, state, keep):
        """`steps_per_call` decode steps for every slot; tokens int32 [S, steps] (-1 where
        the slot was not live)."""
        gen, t_max = self.gen, self.max_len
        keys = jnp.arange(t_max)

        def one(st, _):
            act = st["active"]
            at = jnp.minimum(st["length"], t_max - 1)  # where this token's K / V go
            x = gen.model.apply({"params": params}, st["last"][:, None], method="embed_tokens")
            mask = (keys[None, :] <= at[:, None])[:, None, :]
            logits, cache = gen._lm(params, x, at[:, None], mask, st["cache"], at, False,
                                    st.get("visual"))
            tok = self._choose(logits[:, 0].astype(jnp.float32), st["temperature"],
                               st["top_p"], st["seed"], st["count"])
            count = st["count"] + act
            length = st["length"] + act
            done = is_stop(tok, st["eos"]) | (count >= st["budget"]) | (length >= t_max)
            new = dict(st, cache=gen._constrain_cache(cache), count=count, length=length,
                       last=jnp.where(act, tok, st["last"]), active=act & ~done)
            return new, jnp.where(act, tok, -1)

        state = dict(state, active=state["active"] & keep)
        state, toks = jax.lax.scan(one, state, None, length=self.steps_per_call)
        return state, toks.T
