"""Periodic evaluation: held-out loss and a few generated samples for the log.

`held_out_loss` is the official loss over several eval batches (sum of CE / sum of trained
tokens across all of them). `generate_samples` takes each sample's prompt (everything up to its
first trained token), decodes greedily with `owl_jax.generate` (LoRA adapters merged for it),
and returns text (ids when no tokenizer is known).
"""
from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np

from owl_jax import sharding as sh
from owl_jax.data.images import normalize_pixels
from owl_jax.train import step as step_lib
from owl_jax.train import trainable as tr


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


def decode_params(layout, state):
    """The state's params as inference wants them: unrolled layers, LoRA adapters merged
    (W + alpha/r * A B, in fp32), cast to the compute dtype."""
    from owl_jax.layers.scan import unscan_params
    flat = tr.flatten(unscan_params(state.params()))
    lora = layout.model.lora
    if lora is not None:
        for path in [p for p in flat if p.endswith("/lora_a")]:
            base = path[: -len("lora_a")]
            a, b = flat.pop(path), flat.pop(base + "lora_b")
            k = flat[base + "kernel"]
            flat[base + "kernel"] = (k.astype(jnp.float32) + lora.scale * (
                a.astype(jnp.float32) @ b.astype(jnp.float32))).astype(k.dtype)
    dtype = layout.model.dtype
    return tr.unflatten({k: v.astype(dtype) for k, v in flat.items()})


_GENERATORS: dict = {}


def greedy(layout, state, rows: list[dict], max_new_tokens: int) -> list[list[int]]:
    """Greedy continuations of prompt rows ({'ids', 'pixel_values' [M, H, W, 3]}) with
    owl_jax.generate (KV cache, one compiled decode loop). The Generator is kept per layout,
    so later evaluations reuse its compiled functions with the new params."""
    from owl_jax.generate import GenerationConfig, Generator
    params = decode_params(layout, state)
    gen = _GENERATORS.get(id(layout))
    if gen is None:
        gen = Generator(layout.cfg, params, dtype=layout.model.dtype, mesh=layout.mesh)
        _GENERATORS.clear()
        _GENERATORS[id(layout)] = gen
    gen.params = params
    cfg = layout.cfg  # uint8 batch pixels -> the normalized float32 the Generator takes
    images = [normalize_pixels(r["pixel_values"][: int(np.sum(np.asarray(r["ids"]) < 0))
                                                 // cfg.image_tokens], cfg.image_mean, cfg.image_std)
              for r in rows]
    pixels = np.concatenate(images) if sum(len(i) for i in images) else None
    out = gen.generate([list(map(int, r["ids"])) for r in rows], pixels,
                       GenerationConfig(max_new_tokens=max_new_tokens, temperature=0.0))
    return [g.token_ids for g in out]


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
    if not rows:
        return "(no eval row has a trained token to prompt for)"
    generated = greedy(layout, state, rows, max_new_tokens)
    if tokenizer is not None:
        slots = layout.cfg.image_tokens

        def dec(ids):  # an image's slots (ids < 0) shown as <image>
            return "".join("<image>" * (len(run) // slots) if is_slot else tokenizer.decode(run)
                           for is_slot, run in ((k, list(g)) for k, g in itertools.groupby(
                               (int(t) for t in ids), key=lambda t: t < 0)))
    else:
        dec = lambda ids: " ".join(str(int(t)) for t in ids)
    lines = []
    for i, (r, new) in enumerate(zip(rows, generated)):
        lines.append(f"sample {i}: prompt={dec(r['ids'])!r}\n  reference={dec(r['reference'])!r}"
                     f"\n  generated={dec(new)!r}")
    return "\n".join(lines)


def make_eval_fn(layout, batch_spec: dict):
    from jax.sharding import NamedSharding, PartitionSpec as P
    return jax.jit(step_lib.make_eval_step(layout),
                   in_shardings=(layout.shardings,
                                 step_lib.batch_shardings(layout.mesh, layout.rules, batch_spec)),
                   out_shardings=NamedSharding(layout.mesh, P()),
                   compiler_options=layout.compiler_options)
