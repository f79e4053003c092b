"""Periodic evaluation: held-out loss and a few generated samples for the log.

`held_out_loss` is the official loss over several eval batches (sum of CE / sum of trained
tokens across all of them). `generate_samples` takes each sample's prompt (everything up to its
first trained token), decodes greedily, and returns text (ids when no tokenizer is known).
Decoding goes through `owl_jax.generate` when that module provides `greedy_ids`; otherwise a
simple fixed-shape loop re-runs the full forward per token (fine for the short samples logged
here, and compiled once per run).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from owl_jax import sharding as sh
from owl_jax.train import step as step_lib


def held_out_loss(eval_fn, state, batches, mesh, rules) -> dict:
    total, tokens = 0.0, 0.0
    for b in batches:
        out = eval_fn(state, sh.global_batch(b, mesh, rules))
        total += float(out["ce_sum"])
        tokens += float(out["tokens"])
    return {"loss": total / max(tokens, 1.0), "tokens": tokens}


def prompts_from_batch(batch: dict, n: int) -> list[dict]:
    """The first n rows' first segment cut at its first trained position (the prompt the model
    must continue), with that row's images and the reference continuation."""
    out = []
    for r in range(min(n, batch["input_ids"].shape[0])):
        mask = batch["loss_mask"][r]
        seg = batch["segment_ids"][r]
        first = np.flatnonzero(mask > 0)
        if first.size == 0:
            continue
        p = int(first[0])
        same = seg == seg[p]
        ref = batch["targets"][r][(mask > 0) & same]
        out.append({"ids": batch["input_ids"][r][: p + 1][same[: p + 1]],
                    "pixel_values": batch["pixel_values"][r], "reference": ref})
    return out


_GREEDY: dict = {}


def _greedy_fn(model, length: int):
    key = (id(model), length)
    if key not in _GREEDY:
        _GREEDY[key] = _build_greedy(model, length)
    return _GREEDY[key]


def _build_greedy(model, length: int):
    def run(params, ids, pixel_values, n_prompt, steps):
        seg = (jnp.arange(length) < n_prompt).astype(jnp.int32)[None]

        def body(i, carry):
            ids, seg = carry
            pos = n_prompt + i
            logits = model.apply({"params": params}, ids, pixel_values, seg,
                                 jnp.arange(length, dtype=jnp.int32)[None])
            nxt = jnp.argmax(logits[0, pos - 1]).astype(jnp.int32)
            return ids.at[0, pos].set(nxt), seg.at[0, pos].set(1)

        ids, _ = jax.lax.fori_loop(0, steps, body, (ids, seg))
        return ids
    return jax.jit(run, static_argnames=("steps",))


def greedy_ids(model, params, prompt_ids, pixel_values, max_new_tokens: int,
               eos_id: int = 2) -> list[int]:
    try:  # the inference path, with a KV cache, when it exists
        from owl_jax import generate as gen  # noqa: F401
        if hasattr(gen, "greedy_ids"):
            return list(gen.greedy_ids(model, params, prompt_ids, pixel_values, max_new_tokens))
    except ImportError:
        pass
    n = len(prompt_ids)
    length = n + max_new_tokens
    ids = np.zeros((1, length), np.int32)
    ids[0, :n] = prompt_ids
    out = _greedy_fn(model, length)(params, jnp.asarray(ids), jnp.asarray(pixel_values)[None],
                                    jnp.int32(n), steps=max_new_tokens)
    new = [int(t) for t in np.asarray(jax.device_get(out))[0, n:]]
    return new[: new.index(eos_id) + 1] if eos_id in new else new


def first_rows(global_batch: dict, n: int, mesh) -> dict:
    """Rows [0, n) of a global (sharded, possibly multi-process) batch, replicated so that every
    process holds the same numpy copy."""
    from jax.sharding import NamedSharding, PartitionSpec as P
    take = jax.jit(lambda x: x[:n], out_shardings=NamedSharding(mesh, P()))
    return {k: np.asarray(take(v).addressable_data(0)) for k, v in global_batch.items()}


def generate_samples(layout, state, global_batch: dict, n: int, max_new_tokens: int,
                     tokenizer=None) -> str:
    """Text block for the log: prompt, reference and greedy continuation per sample."""
    rows = prompts_from_batch(first_rows(global_batch, n, layout.mesh), n)
    params = state.params()
    if tokenizer is not None:
        dec = lambda ids: tokenizer.decode([int(t) for t in ids])
    else:
        dec = lambda ids: " ".join(str(int(t)) for t in ids)
    lines = []
    for i, r in enumerate(rows):
        new = greedy_ids(layout.model, params, r["ids"], r["pixel_values"], max_new_tokens,
                         layout.cfg.text.eos_token_id)
        lines.append(f"sample {i}: prompt={dec(r['ids'])!r}\n  reference={dec(r['reference'])!r}"
                     f"\n  generated={dec(new)!r}")
    return "\n".join(lines)


def make_eval_fn(layout, batch_spec: dict):
    from jax.sharding import NamedSharding, PartitionSpec as P
    return jax.jit(step_lib.make_eval_step(layout),
                   in_shardings=(layout.shardings,
                                 step_lib.batch_shardings(layout.mesh, layout.rules, batch_spec)),
                   out_shardings=NamedSharding(layout.mesh, P()))
