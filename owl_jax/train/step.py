"""The train step (jitted with donated state and explicit shardings) and the eval step.

One step = one optimizer update over the global batch. With `batch.micro_batches = K > 1` the
batch is cut into K slices that a `lax.scan` runs one after another, summing gradients, so only
one slice's activations live at a time. Row r of the global batch goes to slice r % K: every
device keeps the rows it already holds (no resharding), and the result equals the one-shot step
up to float summation order, because each slice's loss is divided by the token count of the
WHOLE batch (see loss.py).

Dropout keys: fold_in(fold_in(key(seed), step), slice), so a resumed run replays the same masks.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from owl_jax import sharding as sh
from owl_jax.data.images import normalize_pixels
from owl_jax.train import loss as loss_lib
from owl_jax.train import trainable as tr
from owl_jax.train.state import StateLayout, TrainState

BATCH_KEYS = ("input_ids", "targets", "loss_mask", "segment_ids", "positions", "pixel_values")


def forward(model, params, batch, *, train: bool, rng=None):
    """Logits [B, L, V] for a training batch dict (the contract: docs/data.md). uint8
    pixel_values (what the data pipeline ships) are normalized here, on the device; float ones
    pass as they are."""
    pixel_values = batch.get("pixel_values")
    if pixel_values is not None and pixel_values.shape[1] == 0:
        pixel_values = None
    if pixel_values is not None:
        pixel_values = normalize_pixels(pixel_values, model.cfg.image_mean, model.cfg.image_std)
    rngs = {"dropout": rng} if train and rng is not None else None
    return model.apply({"params": params}, batch["input_ids"], pixel_values,
                       batch["segment_ids"], batch["positions"], deterministic=not train,
                       rngs=rngs)


def _microbatches(batch, k: int, mesh, rules):
    """[B, ...] -> [K, B/K, ...] with slice j = rows j, j+K, j+2K, ... (device-local)."""
    data_axes = dict(rules).get("act_batch", ("data", "fsdp"))

    def cut(x):
        b = x.shape[0]
        if b % k:
            raise ValueError(f"batch of {b} rows does not split into {k} micro batches")
        y = jnp.swapaxes(x.reshape(b // k, k, *x.shape[1:]), 0, 1)
        return jax.lax.with_sharding_constraint(
            y, NamedSharding(mesh, P(None, data_axes, *([None] * (x.ndim - 1)))))
    return jax.tree.map(cut, batch)


def make_train_step(layout: StateLayout, config, schedule):
    """-> step(state, batch) -> (state, metrics); call it under jax.set_mesh + logical rules."""
    model, tx = layout.model, layout.tx
    k = int(config.batch.micro_batches)
    use_dropout = bool(config.model.dropout)
    seed = int(config.seed)

    def step(state: TrainState, batch):
        denom = loss_lib.denominator(batch["loss_mask"])
        step_key = jax.random.fold_in(jax.random.key(seed), state.step)

        def micro_loss(trainable, mb, key):
            params = tr.merge(trainable, state.frozen)
            logits = forward(model, params, mb, train=use_dropout, rng=key)
            total, n = loss_lib.masked_ce_sum(logits, mb["targets"], mb["loss_mask"])
            return total / denom, (total, n)

        grad_fn = jax.value_and_grad(micro_loss, has_aux=True)
        if k == 1:
            (_, (total, ntok)), grads = grad_fn(state.trainable, batch, step_key)
        else:
            mbs = _microbatches(batch, k, layout.mesh, layout.rules)

            def body(carry, xs):
                acc, total, ntok = carry
                mb, j = xs
                (_, (t, n)), g = grad_fn(state.trainable, mb, jax.random.fold_in(step_key, j))
                acc = jax.tree.map(lambda a, b: a + b.astype(a.dtype), acc, g)
                return (acc, total + t, ntok + n), None

            zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.trainable)
            (grads, total, ntok), _ = jax.lax.scan(
                body, (zeros, jnp.float32(0), jnp.float32(0)), (mbs, jnp.arange(k)))
        grad_norm = optax.tree.norm(grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.trainable)
        trainable = optax.apply_updates(state.trainable, updates)
        new_state = state.replace(step=state.step + 1, trainable=trainable, opt_state=opt_state)
        metrics = {"loss": total / denom, "trained_tokens": ntok, "grad_norm": grad_norm,
                   "lr": schedule(state.step), "param_norm": optax.tree.norm(trainable)}
        return new_state, metrics

    return step


def batch_shardings(mesh, rules, example_batch: dict):
    return {k: sh.batch_sharding(mesh, v.ndim, rules) for k, v in example_batch.items()}


def jit_train_step(layout: StateLayout, config, schedule, batch_spec: dict):
    """jit with donated state and explicit in/out shardings. batch_spec: {key: array or
    ShapeDtypeStruct} (only ndim is used)."""
    step = make_train_step(layout, config, schedule)
    repl = NamedSharding(layout.mesh, P())
    return jax.jit(step, donate_argnums=0,
                   in_shardings=(layout.shardings,
                                 batch_shardings(layout.mesh, layout.rules, batch_spec)),
                   out_shardings=(layout.shardings, repl),
                   compiler_options=layout.compiler_options)


def make_eval_step(layout: StateLayout):
    """-> eval(state, batch) -> {'ce_sum', 'tokens'} (summed, so batches can be aggregated)."""
    def eval_step(state: TrainState, batch):
        logits = forward(layout.model, state.params(), batch, train=False)
        total, n = loss_lib.masked_ce_sum(logits, batch["targets"], batch["loss_mask"])
        return {"ce_sum": total, "tokens": n}
    return eval_step
