"""AdamW with warm-up then cosine / linear / constant decay, global-norm clipping, and a weight
decay mask. It is applied to the TRAINABLE tree only (see trainable.py), so frozen parameters
carry no optimizer state at all.

Schedule convention (HF `get_*_schedule_with_warmup`, which the official stage-2 script uses):
the update of optimizer step s (0-based) uses lr(s), with lr(s) = peak * s / warmup during the
warm-up (so the very first update has lr 0), then the decay from peak at s = warmup down to
peak * end_lr_ratio at s = total_steps.
"""
from __future__ import annotations

import re

import optax

from owl_jax.train import trainable as tr


def make_schedule(opt, total_steps: int) -> optax.Schedule:
    peak, warmup = float(opt.lr), int(opt.warmup_steps)
    end = peak * float(opt.end_lr_ratio)
    decay_steps = max(int(total_steps) - warmup, 1)
    if opt.decay == "cosine":
        decay = optax.cosine_decay_schedule(peak, decay_steps, alpha=float(opt.end_lr_ratio))
    elif opt.decay == "linear":
        decay = optax.linear_schedule(peak, end, decay_steps)
    elif opt.decay == "constant":
        decay = optax.constant_schedule(peak)
    else:
        raise ValueError(f"optimizer.decay={opt.decay!r}: expected cosine, linear or constant")
    if warmup <= 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), decay], [warmup])


def decay_mask_fn(no_decay_patterns):
    """params -> bool tree: True where weight decay applies (not matching `no_decay`)."""
    compiled = [re.compile(p) for p in no_decay_patterns]

    def fn(params):
        return tr.tree_map_with_path(
            lambda path, _: not any(p.search(path) for p in compiled), params)
    return fn


def scale_by_path(lr_scale):
    """Multiplies the update of each parameter whose path matches a pattern by its factor (the
    first pattern that matches; others unchanged). After AdamW this is exactly a learning rate
    of lr * factor for those parameters (the whole AdamW update, weight decay included, is
    proportional to lr), e.g. LLaVA's separate projector lr."""
    rules = [(re.compile(p), float(f)) for p, f in lr_scale]

    def factor(path):
        return next((f for p, f in rules if p.search(path)), 1.0)

    def update(updates, state, params=None):
        return tr.tree_map_with_path(lambda path, u: u * factor(path) if factor(path) != 1.0
                                     else u, updates), state
    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def make_optimizer(opt, total_steps: int):
    """-> (optax transformation, schedule). The schedule is the base lr's (`opt.lr_scale`,
    pairs (regex, factor), scales it per parameter)."""
    schedule = make_schedule(opt, total_steps)
    parts = []
    if opt.clip_norm and opt.clip_norm > 0:
        parts.append(optax.clip_by_global_norm(float(opt.clip_norm)))
    parts.append(optax.adamw(schedule, b1=float(opt.b1), b2=float(opt.b2), eps=float(opt.eps),
                             weight_decay=float(opt.weight_decay),
                             mask=decay_mask_fn(tuple(opt.no_decay))))
    if opt.get("lr_scale"):
        parts.append(scale_by_path(opt.lr_scale))
    return optax.chain(*parts), schedule
