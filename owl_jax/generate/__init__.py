"""Batched generation: `Generator` (engine.py) runs prefill and a compiled decode loop for any
family's model; `GenerationConfig` / `Generation` (config.py) are the request and the result;
sampling.py and beam.py choose tokens; cpu/ holds the CPU speed path (C++ decode kernels, greedy
screen, speculative decoding)."""
from owl_jax.generate.buckets import bucket_length
from owl_jax.generate.config import Generation, GenerationConfig, Spec
from owl_jax.generate.engine import Generator

__all__ = ["Generation", "GenerationConfig", "Generator", "Spec", "bucket_length"]
