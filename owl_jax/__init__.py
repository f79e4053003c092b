"""owl-jax: mPLUG-Owl in JAX/Flax."""
