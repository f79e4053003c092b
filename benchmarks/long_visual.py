"""Many images in context: mPLUG-Owl3's hyper attention against splicing the same image features
into the token sequence (the LLaVA-Interleave way), with the same SigLIP, projector and LLM.

    python benchmarks/long_visual.py [--images 8,32,128,400] [--image_size 84] [--budget_gb 2,8]
    python benchmarks/long_visual.py --image_size 384 --images 8,32,128,400 --max_tokens 6000

Both models are one `Owl3` module: the hyper model reads the images through its hyper layers
(each image is one placeholder of a few tokens in the text); the splice model is the same
module with no hyper layers, whose sequence holds every image's P feature vectors at its
placeholder (its LLM params are the hyper model's minus v_kv_proj / gate_proj). The prompt:
a short system text, then per image a placeholder and a few words, then a question.

For each number of images N it measures, in this run:
  - first-token latency: SigLIP + projector on the N images, the prefill (visual K/V of the
    hyper layers / the spliced sequence), the first greedy token; best of --repeats, the two
    models' runs alternating;
  - prefill memory: XLA's memory analysis of the compiled prefill (arguments + outputs +
    temporaries - aliased), compiled only, so points too large to run are still sized;
  - decode tokens/s with the images in context (a compiled loop of --new_tokens greedy steps);
and prints every figure as a ratio, splice / hyper (latency, memory) or hyper / splice
(tokens/s). A splice point whose prefill needs more than --max_gb, or whose sequence is longer
than --max_tokens, is sized, not run. Then, for each memory budget (--budget_gb; by default the
splice prefill at the largest N both ran), the most images each model's prefill fits in it
(over compiled prefills, by doubling and bisection) and their ratio.

Both prefills are the engine's: chunked image encoding (IMAGE_CHUNK images at a time),
blockwise attention over long sequences (`owl_jax.layers.blockwise`), the head on the last
position; the hyper model goes from pixels to its hyper layers' keys / values a chunk of
images at a time (`Owl3.prompt_inputs`).
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, __file__.rsplit("/benchmarks/", 1)[0])

from owl_jax.decoder.llama import TextConfig, init_cache  # noqa: E402
from owl_jax.encoders.siglip import SiglipConfig  # noqa: E402
from owl_jax.families.owl3.config import Owl3Config  # noqa: E402
from owl_jax.families.owl3.model import Owl3, dummy_inputs, media_id  # noqa: E402
from owl_jax.layers.masks import CacheMask  # noqa: E402

GIB = 2.0 ** 30
PLACEHOLDER = 3      # text tokens of an `<|image|>` placeholder (BPE pieces <| image |>)
WORDS = 4            # text tokens after each image


def configs(args) -> tuple[Owl3Config, Owl3Config]:
    """(hyper, splice): SigLIP-small-shaped tower, a Qwen2-shaped LLM, 3 hyper layers."""
    if args.smoke:
        vision = SiglipConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=2, image_size=28, patch_size=14)
        text = TextConfig(vocab_size=512, hidden_size=64, intermediate_size=128,
                          num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                          max_position_embeddings=65536, rope_theta=1e6, qkv_bias=True)
        hyper = (1, 3)
    else:
        vision = SiglipConfig(hidden_size=384, intermediate_size=1536, num_hidden_layers=12,
                              num_attention_heads=6, image_size=args.image_size, patch_size=14)
        text = TextConfig(vocab_size=32000, hidden_size=768, intermediate_size=2048,
                          num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=2,
                          max_position_embeddings=262144, rope_theta=1e6, qkv_bias=True)
        hyper = (1, 5, 9)
    cfg = Owl3Config(vision=vision, text=text, hyper_layers=hyper, version=args.version)
    return cfg, dataclasses.replace(cfg, hyper_layers=())


def splice_params(params, cfg):
    """The hyper model's params without its hyper layers' extras (the same LLM otherwise)."""
    lm = dict(params["language_model"])
    for i in cfg.hyper_layers:
        layer = dict(lm[f"layers_{i - 1}"])
        attn = {k: v for k, v in layer["self_attn"].items()
                if k not in ("v_kv_proj", "gate_proj")}
        lm[f"layers_{i - 1}"] = {**layer, "self_attn": attn}
    return {**params, "language_model": lm}


def prompt(n: int, per_image: int, rng) -> tuple[np.ndarray, np.ndarray]:
    """(ids [1, L], is_image [L]): per image `per_image` slots (its first a media slot for the
    hyper model: per_image = PLACEHOLDER; its features for the splice model: per_image = P)
    then WORDS text tokens; 8 tokens before, 16 after."""
    ids, img = list(rng.integers(10, 500, 8)), [False] * 8
    for _ in range(n):
        ids += list(rng.integers(10, 500, per_image + WORDS))
        img += [True] * per_image + [False] * WORDS
    ids += list(rng.integers(10, 500, 16))
    img += [False] * 16
    return np.array([ids], np.int32), np.array(img)


class Bench:
    """Compiled prefill (pixels -> first token, cache, visual) and decode loop of one model."""

    def __init__(self, cfg, params, n: int, new_tokens: int, splice: bool, rng):
        self.cfg, self.params, self.splice = cfg, params, splice
        self.model = Owl3(cfg)
        p = cfg.tokens_per_image
        ids, img = prompt(n, p if splice else PLACEHOLDER, rng)
        if not splice:  # each placeholder's first token is the image's media slot
            starts = np.nonzero(img & ~np.roll(img, 1))[0]
            ids[0, starts] = media_id(ids[0, starts])
        self.ids, self.is_image = ids, img
        self.length = ids.shape[1]
        self.total = self.length + new_tokens
        self.new_tokens = new_tokens
        s = cfg.vision.image_size
        self.pixel_shape, self.rng = (n, s, s, 3), rng
        self._prefill = jax.jit(self.prefill_fn)
        self._decode = jax.jit(self.decode_fn)

    def prefill_fn(self, params, ids, pixels):
        m, l, s = self.model, self.length, self.total
        pos = jnp.arange(l)[None]
        if self.splice:
            feats = m.apply({"params": params}, pixels, method="encode_images")   # [N, P, D]
            x = m.apply({"params": params}, jnp.maximum(ids, 0), method="embed_tokens")
            flat = feats.reshape(-1, feats.shape[-1])
            at = np.maximum(np.cumsum(self.is_image) - 1, 0)     # feature of each slot
            x = jnp.where(self.is_image[None, :, None], flat[at][None], x)
            visual = None
        else:  # as the engine's prefill
            x, visual = m.apply({"params": params}, ids, pixels, pos, method="prompt_inputs")
        cache = init_cache(self.cfg.text, 1, s, x.dtype)
        mask = CacheMask(jnp.ones((1, s), bool), jnp.arange(l))   # as the engine's prefill
        hidden, cache = m.apply({"params": params}, x, pos, mask, cache, 0, True,
                                method="decode", visual=visual)
        logits = m.apply({"params": params}, hidden[:, -1], method="head")
        return jnp.argmax(logits[0]), cache, visual

    def decode_fn(self, params, token, cache, visual):
        m, s = self.model, self.total

        def step(i, carry):
            tok, cache, out = carry
            t = self.length + i
            x = m.apply({"params": params}, tok.reshape(1, 1), method="embed_tokens")
            mask = (jnp.arange(s) <= t)[None, None]
            logits, cache = m.apply({"params": params}, x, jnp.full((1, 1), t), mask, cache, t,
                                    method="decode", visual=visual)
            nxt = jnp.argmax(logits[0, -1]).astype(jnp.int32)
            return nxt, cache, out.at[i].set(nxt)
        out = jnp.zeros(self.new_tokens, jnp.int32)
        return jax.lax.fori_loop(0, self.new_tokens, step, (token.astype(jnp.int32), cache,
                                                            out))[2]

    def prefill_bytes(self) -> float:
        """XLA's size of the compiled prefill (nothing is allocated: abstract pixels)."""
        px = jax.ShapeDtypeStruct(self.pixel_shape, jnp.float32)
        mem = self._prefill.lower(self.params, self.ids, px).compile().memory_analysis()
        return float(mem.argument_size_in_bytes + mem.output_size_in_bytes
                     + mem.temp_size_in_bytes - mem.alias_size_in_bytes)

    def warm(self) -> None:
        """Compiles and runs the prefill and the decode loop once."""
        self.pixels = self.rng.standard_normal(self.pixel_shape).astype(np.float32)
        self.state = jax.block_until_ready(self._prefill(self.params, self.ids, self.pixels))
        jax.block_until_ready(self._decode(self.params, *self.state))

    def time_prefill(self) -> float:
        t = time.perf_counter()
        jax.block_until_ready(self._prefill(self.params, self.ids, self.pixels))
        return time.perf_counter() - t

    def time_decode(self) -> float:
        """Tokens per second of the decode loop."""
        t = time.perf_counter()
        jax.block_until_ready(self._decode(self.params, *self.state))
        return self.new_tokens / (time.perf_counter() - t)


def alternate(benches, repeats: int) -> list[dict]:
    """Best first-token latency and decode rate of each bench, their timed runs alternating
    (a load that comes and goes on a shared machine hits both sides alike)."""
    for b in benches:
        b.warm()
    first = [[] for _ in benches]
    rate = [[] for _ in benches]
    for _ in range(repeats):
        for i, b in enumerate(benches):
            first[i].append(b.time_prefill())
        for i, b in enumerate(benches):
            rate[i].append(b.time_decode())
    return [{"first_s": min(f), "tok_s": max(r)} for f, r in zip(first, rate)]


def most_images(size, budget: float, limit: int) -> tuple[int, bool]:
    """The most images whose prefill needs at most `budget` bytes (size(n) -> bytes): doubling
    from 1, then bisection to 2%; (limit, True) when even `limit` fits, (0, False) when 1
    does not."""
    if size(1) > budget:
        return 0, False
    lo = 1
    while True:
        hi = min(2 * lo, limit)
        if size(hi) > budget:
            break
        if hi == limit:
            return limit, True
        lo = hi
    while hi - lo > max(1, lo // 50):
        mid = (lo + hi) // 2
        if size(mid) <= budget:
            lo = mid
        else:
            hi = mid
    return lo, False


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", default="8,32,128,400", help="numbers of images, comma-separated")
    ap.add_argument("--image_size", type=int, default=84,
                    help="SigLIP input px (patch 14): (size/14)^2 features per image "
                         "(mPLUG-Owl3: 384 -> 729)")
    ap.add_argument("--version", default="240728", choices=("240728", "241101"))
    ap.add_argument("--new_tokens", type=int, default=16, help="decode steps timed")
    ap.add_argument("--repeats", type=int, default=3,
                    help="timed runs per point and side, alternating (best counts)")
    ap.add_argument("--max_gb", type=float, default=6.0,
                    help="splice points whose compiled prefill needs more are sized, not run")
    ap.add_argument("--budget_gb", default="",
                    help="memory budgets in GiB, comma-separated, in which each model's most "
                         "images are found (default: the splice prefill at the largest N both "
                         "ran)")
    ap.add_argument("--max_images", type=int, default=4096,
                    help="the most images the budget search tries")
    ap.add_argument("--max_tokens", type=int, default=0,
                    help="splice points over this many tokens are sized, not run (0: no limit)")
    ap.add_argument("--smoke", action="store_true", help="tiny models and counts (tests)")
    args = ap.parse_args(argv)
    if args.smoke:
        args.images, args.new_tokens, args.repeats, args.max_images = "2,4", 4, 1, 64
    counts = [int(x) for x in args.images.split(",")]
    cfg, splice_cfg = configs(args)
    rng = np.random.default_rng(0)
    params = Owl3(cfg).init(jax.random.key(0), *dummy_inputs(cfg))["params"]
    sparams = splice_params(params, cfg)
    p, t = cfg.tokens_per_image, cfg.text
    print(f"LLM {t.num_hidden_layers} x {t.hidden_size} ({t.num_attention_heads} heads, "
          f"{t.kv_heads} kv), hyper layers {list(cfg.hyper_layers)} ({cfg.fusion}); SigLIP "
          f"{cfg.vision.num_hidden_layers} x {cfg.vision.hidden_size} at {cfg.image_size} px: "
          f"{p} features per image; float32 on {jax.devices()[0].device_kind} "
          f"({jax.device_count()} device)")

    def hyper_at(n):
        return Bench(cfg, params, n, args.new_tokens, False, np.random.default_rng(n))

    def splice_at(n):
        return Bench(splice_cfg, sparams, n, args.new_tokens, True, np.random.default_rng(n))

    largest_both = None
    for n in counts:
        h, s = hyper_at(n), splice_at(n)
        hm, sm = h.prefill_bytes(), s.prefill_bytes()
        runs_splice = sm <= args.max_gb * GIB and (not args.max_tokens
                                                     or s.length <= args.max_tokens)
        hr, *sr = alternate([h, s] if runs_splice else [h], args.repeats)
        line = (f"N={n:4d}: hyper {h.length} tokens, first token {hr['first_s']:.3g} s, "
                f"prefill memory {hm / GIB:.3g} GiB, decode {hr['tok_s']:.3g} tok/s | splice "
                f"{s.length} tokens, prefill memory {sm / GIB:.3g} GiB")
        if not runs_splice:
            print(line + " (over --max_gb / --max_tokens: not run) | memory splice/hyper "
                         f"{sm / hm:.3g}x", flush=True)
            continue
        sr = sr[0]
        largest_both = n
        print(line + f", first token {sr['first_s']:.3g} s, decode {sr['tok_s']:.3g} tok/s | "
                     f"ratios: first-token latency splice/hyper "
                     f"{sr['first_s'] / hr['first_s']:.3g}x, prefill memory splice/hyper "
                     f"{sm / hm:.3g}x, decode tok/s hyper/splice "
                     f"{hr['tok_s'] / sr['tok_s']:.3g}x", flush=True)
    if largest_both is not None:
        print(f"largest N both ran: {largest_both}")
    budgets = [float(x) * GIB for x in args.budget_gb.split(",")] if args.budget_gb else [
        splice_at(largest_both or counts[0]).prefill_bytes()]
    for budget in budgets:
        fits = {}
        for name, at in (("splice", splice_at), ("hyper", hyper_at)):
            sizes: dict[int, float] = {}

            def size(n, at=at, sizes=sizes):
                if n not in sizes:
                    sizes[n] = at(n).prefill_bytes()
                return sizes[n]
            fits[name] = most_images(size, budget, args.max_images)
        (n_s, cap_s), (n_h, cap_h) = fits["splice"], fits["hyper"]
        ratio = f"{n_h / n_s:.3g}x" if n_s else "-"
        print(f"memory budget {budget / GIB:.3g} GiB (the whole prefill, weights included): splice "
              f"fits {'>= ' * cap_s}{n_s} images, hyper {'>= ' * cap_h}{n_h}: "
              f"{'>= ' * (cap_h and not cap_s)}{ratio} more images", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
