"""Training: train state, trainable sets, optimizer, loss, step, checkpoints, the loop.

Entry points: `owl_jax.train.loop.train(config, workdir) -> final metrics` and the `owl-train`
CLI (owl_jax/cli/train.py). See docs/training.md.
"""
