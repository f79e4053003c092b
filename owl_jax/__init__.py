"""owl-jax: mPLUG-Owl in JAX/Flax."""


def load_pretrained(*args, **kwargs):
    """Loads a JAX checkpoint directory for inference; see `owl_jax.api.load_pretrained`.
    (Imported lazily so that `import owl_jax` stays light.)"""
    from owl_jax.api import load_pretrained as _load
    return _load(*args, **kwargs)
