"""The official mPLUG-Owl loss: mean cross-entropy over the trained tokens of the global batch.

Upstream sets labels to -100 where the loss mask is 0 and lets `CrossEntropyLoss` average over
the rest; a batch whose responses were all truncated gives 0/0 = NaN there. Here the
denominator is max(#trained tokens, 1), so such a batch has loss 0 and zero gradients.

Gradient accumulation stays exact: every microbatch contributes sum(CE * mask) / N_global, where
N_global is counted over the whole step's batch before the microbatch loop.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def token_cross_entropy(logits, targets):
    """-log softmax(logits)[target] per position, in fp32. logits [B, L, V], targets [B, L]."""
    logits = logits.astype(jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    # Clamp: positions outside the loss mask may hold any id (e.g. -1 image slots).
    idx = jnp.clip(targets.astype(jnp.int32), 0, logits.shape[-1] - 1)
    picked = jnp.take_along_axis(logits, idx[..., None], axis=-1)[..., 0]
    return lse - picked


def masked_ce_sum(logits, targets, loss_mask):
    """(sum of CE over trained tokens, number of trained tokens), both fp32 scalars."""
    m = loss_mask.astype(jnp.float32)
    ce = token_cross_entropy(logits, targets)
    # where() rather than ce * m alone: a garbage target (e.g. a negative id under mask 0)
    # must not leak inf * 0 = NaN into the sum.
    return jnp.sum(jnp.where(m > 0, ce * m, 0.0)), jnp.sum(m)


def denominator(loss_mask):
    return jnp.maximum(jnp.sum(loss_mask.astype(jnp.float32)), 1.0)


def official_loss(logits, targets, loss_mask):
    total, _ = masked_ce_sum(logits, targets, loss_mask)
    return total / denominator(loss_mask)
