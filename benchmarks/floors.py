"""What the machine allows a decode step, measured beside `benchmarks/decode.py`'s runs: the read
bandwidth over as many bytes as a step reads (`BandwidthProbe`, `step_bytes`) and the weight
matmuls of a step alone in XLA, PyTorch and owl-jax's decode kernel (`MatmulFloor`)."""
from __future__ import annotations

import functools
import time

import numpy as np


def best_time(fn, repeats):
    """The shortest of `repeats` timed calls of fn, in seconds."""
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


class BandwidthProbe:
    """Read bandwidth (bytes/s) over an array of `nbytes`: numpy (one thread) and XLA (all
    threads) summing it. `measure()` is called between the timed decode runs so that both see
    the same machine load; the best value over the calls counts."""

    def __init__(self, nbytes):
        import jax
        import jax.numpy as jnp
        self.nbytes = nbytes
        self.a = np.ones(nbytes // 4, np.float32)
        self.ja = jnp.asarray(self.a)
        self.f = jax.jit(jnp.sum)
        self.f(self.ja).block_until_ready()
        self.best = {"numpy": 0.0, "xla": 0.0}

    def measure(self, reads: int):
        """Reads the array `reads` times in a row (as many reads as the decode run it is
        compared with makes of the weights, so that both last about as long)."""
        for name, fn in (("numpy", lambda: self.a.sum()),
                         ("xla", lambda: self.f(self.ja).block_until_ready())):
            t = time.perf_counter()
            for _ in range(reads):
                fn()
            dt = time.perf_counter() - t
            self.best[name] = max(self.best[name], reads * self.nbytes / dt)
        return max(self.best.values())


def step_bytes(params):
    """The bytes of LLM weights one decode step reads: every layer, the final norm and the
    lm_head (the embedding gives one row, left out)."""
    import jax
    lm = params["language_model"]
    total = sum(x.nbytes for k, v in lm.items() if k != "embed_tokens"
                for x in jax.tree.leaves(v))
    return total


class MatmulFloor:
    """The weight matmuls of one decode step alone (every layer's q, k, v, o, gate, up, down and
    the lm_head, [b, D] rows, nothing else), in XLA and in PyTorch: no decoder that uses these
    libraries' fp32 GEMMs can take a step faster than its floor."""

    def __init__(self, params, hf, b):
        import jax
        import jax.numpy as jnp
        import torch
        lm = params["language_model"]
        layers = [lm[k] for k in sorted((k for k in lm if k.startswith("layers_")),
                                        key=lambda k: int(k.split("_")[1]))]
        self.kernels = [[l["self_attn"][n]["kernel"] for n in ("q_proj", "k_proj", "v_proj",
                                                               "o_proj")] +
                        [l["mlp"][n]["kernel"] for n in ("gate_proj", "up_proj", "down_proj")]
                        for l in layers]
        self.head = lm["lm_head"]["kernel"]

        from owl_jax.generate.cpu import decode_kernels

        def chain(kernels, head, x, mm=jnp.dot):
            for q, k, v, o, g, u, d in kernels:  # k, v are narrower than q with grouped heads
                kv = mm(x, k) + mm(x, v)
                x = x + mm(mm(x, q) + kv.sum(-1, keepdims=True), o)
                x = x + mm(mm(x, g) * mm(x, u), d)
            return mm(x, head)
        self.xla = jax.jit(chain)
        self.x = jnp.ones((b, self.head.shape[0]), jnp.float32) * 0.01
        self.kernel = None
        with decode_kernels.enabled():
            if decode_kernels.matmul_applies(self.x, self.head):  # built here, on AVX-512
                self.kernel = functools.partial(
                    jax.jit(functools.partial(chain, mm=decode_kernels.matmul)),
                    self.kernels, self.head, self.x)
                self.kernel().block_until_ready()
        self.hf_layers = hf.model.layers
        self.hf_head = hf.lm_head
        self.xt = torch.ones(b, self.head.shape[0]) * 0.01
        self.run_xla()
        self.best = {"xla": 1e9, "torch": 1e9, "kernel": 1e9}

    def run_xla(self):
        self.xla(self.kernels, self.head, self.x).block_until_ready()

    def run_torch(self):
        import torch
        with torch.no_grad():
            x = self.xt
            for layer in self.hf_layers:
                a, m = layer.self_attn, layer.mlp
                kv = a.k_proj(x) + a.v_proj(x)
                x = x + a.o_proj(a.q_proj(x) + kv.sum(-1, keepdim=True))
                x = x + m.down_proj(m.gate_proj(x) * m.up_proj(x))
            return self.hf_head(x)

    def measure(self, reps=10):
        fns = [("xla", self.run_xla), ("torch", self.run_torch)]
        if self.kernel is not None:
            fns.append(("kernel", lambda: self.kernel().block_until_ready()))
        for name, fn in fns:
            self.best[name] = min(self.best[name], best_time(fn, reps))
