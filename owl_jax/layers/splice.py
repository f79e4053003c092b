"""Image embeddings written into the prompt slots that reserve them (ids < 0)."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def splice_images(text_embeds, input_ids, image_embeds, slots: int | None = None):
    """Writes image tokens into the slots the prompt reserves (ids < 0).

    text_embeds [B, L, D]; input_ids [B, L] with one run of `slots` negative ids per image
    (default: T, the image token count). image_embeds either
      [N, T, D]: a flat list ordered by appearance across the batch, row-major, as the
        official `pixel_values`; slot k of the batch belongs to image k // slots; or
      [B, M, T, D]: M images per row (unused ones are padding); slot k of row b belongs to image
        (b, k // slots). This form shards with the batch, so training uses it.
    Slot j of an image's run takes its token j; runs longer than T (the official processor's
    fixed 65 slots with fewer queries) keep the text embedding after token T - 1, as the official
    model leaves them. Rows may hold any number of images, including none.
    """
    b, l, d = text_embeds.shape
    t = image_embeds.shape[-2]
    slots = slots or t
    is_slot = input_ids < 0
    if image_embeds.ndim == 3:
        k = jnp.cumsum(is_slot.reshape(-1)).reshape(b, l) - 1
        img = jnp.clip(k // slots, 0, image_embeds.shape[0] - 1)
        tok = k % slots
        picked = image_embeds[img, jnp.minimum(tok, t - 1)]
    else:
        k = jnp.cumsum(is_slot, axis=1) - 1
        img = jnp.clip(k // slots, 0, image_embeds.shape[1] - 1)
        tok = k % slots
        # vmapped over rows, the gather keeps the batch as a batching dim, so it partitions with
        # the batch; indexing with arange(b) made XLA all-gather every row's images (fsdp).
        picked = jax.vmap(lambda e, i, j: e[i, j])(image_embeds, img, jnp.minimum(tok, t - 1))
    fill = is_slot & (tok < t)
    return jnp.where(fill[..., None], picked.astype(text_embeds.dtype), text_embeds)
