"""Decode speed of owl-jax against HF transformers on the same weights (fp32; CPU by default).

    python benchmarks/decode.py                  # everything (a few minutes on 2 cores)
    python benchmarks/decode.py --parts decode   # only the text decode comparison
    python benchmarks/decode.py --parts ttft --vision small
    python benchmarks/decode.py --layers 22 --width 2048 --heads 32 --kv_heads 4 --mlp 5632
    python benchmarks/decode.py --hf_llama /path/to/hf-llama      # a local checkpoint's LLM
    python benchmarks/decode.py --device cuda    # HF on CUDA, owl-jax on JAX's GPU backend

Baselines, measured in the same process:
- decode: `LlamaForCausalLM.generate` (PyTorch, KV cache, greedy, do_sample=False,
  min_new_tokens = max_new_tokens so both sides make exactly the same number of tokens) on a
  random 12-layer, 768-wide LLaMA (12 heads, MLP 2048, vocab 32000), 128-token prompt, 128 new
  tokens, batch 1 and 8. Our side converts the same HF weights with
  `convert.hf_llama.read_llama_params` and runs `owl_jax.generate.Generator` greedy. At batch
  1 that is, by default, speculative: an int8 copy of the LLM drafts tokens that one fp32 pass
  checks (`generate.cpu.self_draft`; the same tokens). The benchmark also times one pass per token
  (`self_draft_tokens=0`) and prints both.
- memory-bandwidth limit at batch 1: the machine's read bandwidth (best of numpy and XLA
  summing an array as large as the weights one step reads, so both see the same cache
  hierarchy, as many times in a row as the decode steps, between the decode runs) divided by
  those bytes (every layer, the final norm and the lm_head; the KV cache
  and one embedding row are left out, which makes the limit slightly optimistic for us). Our
  greedy step reads the lm_head as an int8 copy (`generate.cpu.greedy_screen`, exact tokens), so
  the benchmark also prints the fraction of the limit for the bytes it actually reads.
- matmul floors: the weight matmuls of one decode step alone, [batch, D] rows through every
  kernel, in XLA, in PyTorch and in our decode kernel (`generate.cpu.decode_kernels`, which our
  decode step uses on CPU): what a decoder built on each pays per step.
- time to first token of a one-image prompt: our encode + splice + prefill + first token
  against the same steps in PyTorch (a torch re-implementation of the ViT and abstractor,
  `benchmarks/torch_vision.py`, then `language_model(inputs_embeds=...)` with HF LLaMA), on
  the same weights.
- prompt lookup at batch 1 (`--lookup K`, 4 by default, 0 to skip): ours with
  `prompt_lookup_num_tokens=K` against HF generate with the same option, and against both
  plain runs.

Our runs and the baseline's alternate, `--repeats` times, and each side keeps its best time (the
machine may be shared: a load change then hits both sides).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from anywhere

from benchmarks.floors import BandwidthProbe, MatmulFloor, best_time, step_bytes  # noqa: E402


# -------------------------------------------------------------------------------------------
# Models on shared weights


def build_models(tmp, vocab=32000, width=768, layers=12, heads=12, kv_heads=None, mlp=2048,
                 vision="small", hf_llama=None):
    """The HF LLaMA (random weights of the given shape, or the checkpoint in `hf_llama`) and our
    OwlConfig + params with the same LLM weights and a random vision side."""
    import jax
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from owl_jax.convert.hf_llama import read_llama_params, read_text_config
    from owl_jax.connectors.abstractor import AbstractorConfig
    from owl_jax.families.owl1.config import OwlConfig
    from owl_jax.encoders.vit import VisionConfig
    from owl_jax.families.owl1.model import Owl
    import flax.linen as nn
    import jax.numpy as jnp

    if hf_llama:
        hf = LlamaForCausalLM.from_pretrained(hf_llama, dtype=torch.float32, local_files_only=True,
                                              attn_implementation="sdpa").eval()
        tmp = hf_llama
    else:
        torch.manual_seed(0)
        hc = LlamaConfig(vocab_size=vocab, hidden_size=width, intermediate_size=mlp,
                         num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=kv_heads or heads, max_position_embeddings=2048,
                         tie_word_embeddings=False, attn_implementation="sdpa")
        hf = LlamaForCausalLM(hc).eval()
        hf.save_pretrained(tmp)
    text = read_text_config(tmp)
    print(f"LLM: {text.num_hidden_layers} layers, {text.hidden_size} wide, "
          f"{text.num_attention_heads} heads ({text.num_key_value_heads} kv), MLP "
          f"{text.intermediate_size}, vocab {text.vocab_size}"
          + (f", from {hf_llama}" if hf_llama else ", random weights"), flush=True)
    if vision == "vit-l":  # the real mPLUG-Owl ViT-L/14 + abstractor sizes
        vcfg, acfg = VisionConfig(), AbstractorConfig()
    else:                  # a documented smaller stand-in (ViT-B/16-like at 224 px)
        vcfg = VisionConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                            num_attention_heads=12, image_size=224, patch_size=16)
        acfg = AbstractorConfig(hidden_size=768, num_hidden_layers=6, num_attention_heads=12,
                                intermediate_size=2048, encoder_hidden_size=768)
    cfg = OwlConfig(vision=vcfg, abstractor=acfg, text=text, num_query_tokens=64)
    s = vcfg.image_size
    shapes = jax.eval_shape(lambda: Owl(cfg).init(jax.random.key(0), jnp.zeros((1, 2), jnp.int32),
                                                  jnp.zeros((1, s, s, 3))))
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda a: (0.02 * rng.standard_normal(a.shape)).astype(np.float32),
                          nn.unbox(shapes)["params"])
    params["language_model"] = read_llama_params(tmp, text, progress=False)["language_model"]
    return cfg, params, hf


# -------------------------------------------------------------------------------------------
# Parts


def bench_decode(cfg, params, hf, args):
    """Our runs, HF's runs (and at batch 1 the bandwidth probe) alternate, so that a change of
    machine load hits both sides; each side keeps its best time."""
    import dataclasses
    import torch
    from owl_jax.generate import GenerationConfig, Generator
    gen = Generator(cfg, params)
    rng = np.random.default_rng(1)
    n_new, n_prompt = args.new_tokens, args.prompt_tokens
    # EOS never stops either side: HF gets min_new_tokens, we an EOS id outside the vocabulary.
    gcfg = GenerationConfig(max_new_tokens=n_new, eos_token_id=-1)
    g1 = dataclasses.replace(gcfg, max_new_tokens=1)
    # one pass over the weights per token: batch 1 without the int8 self-draft
    one_pass = dataclasses.replace(gcfg, self_draft_tokens=0)
    cpu = args.device == "cpu"  # on a GPU: no bandwidth probe or CPU matmul floors
    probe = BandwidthProbe(step_bytes(params)) if 1 in args.batches and cpu else None
    results = {}
    for b in args.batches:
        rows = [[1] + p.tolist() for p in rng.integers(3, cfg.text.vocab_size, (b, n_prompt - 1))]
        ids = torch.tensor(rows, device=args.device)
        kw = dict(max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False,
                  attention_mask=torch.ones_like(ids), pad_token_id=0)
        gen.generate(rows, None, g1)
        ours = gen.generate(rows, None, gcfg)  # compiles
        passes = gen.last_passes
        runs = {"ours": lambda: gen.generate(rows, None, gcfg),
                "ours1": lambda: gen.generate(rows, None, g1),
                "hf": lambda: hf.generate(ids, **kw)}
        if passes < n_new - 1:  # the self-draft ran: time one pass per token too
            plain = gen.generate(rows, None, one_pass)
            assert [g.token_ids for g in plain] == [g.token_ids for g in ours]
            runs["plain"] = lambda: gen.generate(rows, None, one_pass)
        with torch.no_grad():
            ref = hf.generate(ids, **kw)  # warm-up
        best = {name: 1e9 for name in runs}
        floor = MatmulFloor(params, hf, b) if cpu else None
        for _ in range(args.repeats):
            for name, fn in runs.items():
                with torch.no_grad():
                    best[name] = min(best[name], best_time(fn, 1))
            if floor is not None:
                floor.measure()
            if b == 1 and probe is not None:
                probe.measure(n_new - 1)
        same = sum(int(np.array_equal(o.token_ids[:16], r[n_prompt:n_prompt + 16].cpu().numpy()))
                   for o, r in zip(ours, ref))
        step = (best["ours"] - best["ours1"]) / (n_new - 1)
        # a pass over the weights: the one-token step (measured without the self-draft)
        one = best.get("plain", best["ours"])
        results[b] = dict(ours=b * n_new / best["ours"], hf=b * n_new / best["hf"], step=step,
                          first=best["ours1"], hf_time=best["hf"],
                          pass_step=(one - best["ours1"]) / (n_new - 1))
        print(f"batch {b}: owl-jax {b * n_new / best['ours']:8.1f} tok/s   HF "
              f"{b * n_new / best['hf']:8.1f} tok/s   ratio {best['hf'] / best['ours']:5.2f}x   "
              f"(first 16 tokens identical in {same}/{b} rows; our decode "
              f"{1e3 * step:.2f} ms a token, prefill + first token {1e3 * best['ours1']:.1f} ms)",
              flush=True)
        if "plain" in best:
            print(f"batch {b}: that is greedy decoding with the int8 self-draft (the default; "
                  f"{passes} fp32 passes for {n_new - 1} tokens after the first, the same "
                  f"tokens); one pass per token (self_draft_tokens=0): owl-jax "
                  f"{b * n_new / best['plain']:.1f} tok/s, ratio "
                  f"{best['hf'] / best['plain']:.2f}x, step {1e3 * results[b]['pass_step']:.2f} ms",
                  flush=True)
        if b == 1 and args.lookup:
            bench_lookup(gen, hf, rows, ids, kw, gcfg, args, best)
        if floor is None:
            continue
        print(f"batch {b}: the step's weight matmuls alone take {1e3 * floor.best['xla']:.2f} ms "
              f"in XLA, {1e3 * floor.best['torch']:.2f} ms in PyTorch"
              + (f", {1e3 * floor.best['kernel']:.2f} ms in owl-jax's decode kernel"
                 if floor.kernel else "") + " (floors for a decode step)", flush=True)
    if 1 in results and probe is not None:
        bw = max(probe.best.values())
        limit = bw / probe.nbytes
        ours, one = 1.0 / results[1]["step"], 1.0 / results[1]["pass_step"]
        print(f"batch 1 bandwidth limit: {probe.nbytes / 1e6:.0f} MB of weights per token, read "
              f"bandwidth {bw / 1e9:.1f} GB/s (numpy {probe.best['numpy'] / 1e9:.1f}, XLA "
              f"{probe.best['xla'] / 1e9:.1f}) -> {limit:.1f} tok/s; owl-jax decode {ours:.1f} "
              f"tok/s = {100 * ours / limit:.0f}% of the limit (one pass per token: {one:.1f} "
              f"tok/s = {100 * one / limit:.0f}%)", flush=True)
        screen = gen._call_params.get("greedy_screen")
        # our greedy step reads a copy of the head (generate.cpu.greedy_screen)
        if screen is not None:
            read = (probe.nbytes - params["language_model"]["lm_head"]["kernel"].nbytes
                    + sum(a.nbytes for a in screen.values()))
            print(f"batch 1: our one-token greedy step reads {read / 1e6:.0f} MB (the lm_head as "
                  f"its {screen['w'].dtype} screen copy): {100 * one * read / bw:.0f}% of the "
                  f"bandwidth limit for those bytes", flush=True)
            # What one pass per token at that limit would give: our measured prefill + first
            # token, then every other token at read / bw, against this run's HF time.
            r1 = results[1]
            ceiling = r1["hf_time"] / (r1["first"] + (n_new - 1) * read / bw)
            print(f"batch 1: one pass per token at that limit would give {ceiling:.2f}x "
                  f"(measured: {r1['hf_time'] * r1['ours'] / n_new:.2f}x)", flush=True)
    return results


def bench_lookup(gen, hf, rows, ids, kw, gcfg, args, plain):
    """Batch 1 with prompt lookup on both sides (ours: `generate.cpu.lookup`; HF: generate's
    prompt_lookup_num_tokens), against the plain runs `plain` already timed. How much lookup
    gains depends on how much the output repeats the prompt or itself; this random model's
    greedy output falls into loops, which favours it."""
    import dataclasses
    import torch
    k = args.lookup
    lcfg = dataclasses.replace(gcfg, prompt_lookup_num_tokens=k)
    hkw = dict(kw, prompt_lookup_num_tokens=k)
    ours = gen.generate(rows, None, lcfg)[0]
    passes = gen.last_passes
    with torch.no_grad():
        ref = hf.generate(ids, **hkw)[0, ids.shape[1]:].tolist()
    best = {"ours": 1e9, "hf": 1e9}
    for _ in range(args.repeats):
        for name, fn in (("ours", lambda: gen.generate(rows, None, lcfg)),
                         ("hf", lambda: hf.generate(ids, **hkw))):
            with torch.no_grad():
                best[name] = min(best[name], best_time(fn, 1))
    n = gcfg.max_new_tokens
    print(f"batch 1, prompt lookup of {k} tokens on both sides: owl-jax {n / best['ours']:.1f} "
          f"tok/s ({passes} passes for {n - 1} tokens after the first)   HF "
          f"{n / best['hf']:.1f} tok/s   ratio {best['hf'] / best['ours']:.2f}x; against plain "
          f"HF {plain['hf'] / best['ours']:.2f}x, against our plain greedy "
          f"{plain['ours'] / best['ours']:.2f}x (same tokens as HF: {ours.token_ids == ref})",
          flush=True)


def bench_ttft(cfg, params, hf, args):
    import torch
    import jax
    from owl_jax.generate import GenerationConfig, Generator
    from owl_jax.layers.splice import splice_images
    gen = Generator(cfg, params)
    t_img = cfg.image_tokens
    rng = np.random.default_rng(2)
    s = cfg.vision.image_size
    px = rng.standard_normal((1, s, s, 3)).astype(np.float32)
    text = rng.integers(3, cfg.text.vocab_size, 64).tolist()
    row = [1] + text[:32] + [-1] * t_img + text[32:]
    gcfg = GenerationConfig(max_new_tokens=1)
    ours = gen.generate([row], px, gcfg)

    from benchmarks.torch_vision import TorchOwlVision
    tv = TorchOwlVision(cfg, params, args.device)
    ids = torch.tensor([row], device=args.device)
    pv = torch.from_numpy(px).permute(0, 3, 1, 2).contiguous().to(args.device)

    def torch_first():
        with torch.no_grad():
            q = tv(pv)                                   # [1, 65, D]
            emb = hf.model.embed_tokens(ids.clamp(min=0))
            slots = (ids[0] < 0).nonzero()[:, 0]
            emb[0, slots] = q[0]
            out = hf(inputs_embeds=emb, attention_mask=torch.ones_like(ids), logits_to_keep=1)
            return int(out.logits[0, -1].argmax())
    ref = torch_first()
    t_ours, t_hf = 1e9, 1e9
    for _ in range(args.repeats):  # alternate, best of each
        t_ours = min(t_ours, best_time(lambda: gen.generate([row], px, gcfg), 1))
        t_hf = min(t_hf, best_time(torch_first, 1))
    print(f"time to first token, 1 image ({cfg.vision.num_hidden_layers}-layer "
          f"{cfg.vision.hidden_size}-wide ViT at {s}px + {cfg.abstractor.num_hidden_layers}-layer "
          f"abstractor, {len(row)}-token prompt): owl-jax {1e3 * t_ours:.0f} ms   PyTorch "
          f"{1e3 * t_hf:.0f} ms   ratio {t_hf / t_ours:.2f}x   (same first token: "
          f"{ours[0].token_ids[:1] == [ref]})", flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--parts", default="decode,ttft")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--prompt_tokens", type=int, default=128)
    ap.add_argument("--new_tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--vision", choices=("small", "vit-l"), default="small")
    ap.add_argument("--device", default="cpu",
                    help="torch device for HF (cuda: compare with JAX on its default GPU backend)")
    ap.add_argument("--lookup", type=int, default=4,
                    help="also time batch 1 with prompt lookup of this many tokens (0: not)")
    model = ap.add_argument_group("the LLM (random weights; the defaults are the benchmark's 12 x 768 model)")
    model.add_argument("--layers", type=int, default=12)
    model.add_argument("--width", type=int, default=768)
    model.add_argument("--heads", type=int, default=12)
    model.add_argument("--kv_heads", type=int, default=None, help="grouped-query attention")
    model.add_argument("--mlp", type=int, default=2048)
    model.add_argument("--vocab", type=int, default=32000)
    model.add_argument("--hf_llama", default=None,
                       help="a HF LLaMA checkpoint directory to use instead (fp32, local)")
    args = ap.parse_args(argv)
    args.batches = [int(b) for b in args.batches.split(",")]
    parts = args.parts.split(",")
    import torch
    print(f"torch threads {torch.get_num_threads()}, {os.cpu_count()} CPUs, "
          f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        cfg, params, hf = build_models(
            tmp, vocab=args.vocab, width=args.width, layers=args.layers, heads=args.heads,
            kv_heads=args.kv_heads, mlp=args.mlp, vision=args.vision, hf_llama=args.hf_llama)
    hf.to(args.device)
    if "decode" in parts:
        bench_decode(cfg, params, hf, args)
    if "ttft" in parts:
        bench_ttft(cfg, params, hf, args)


if __name__ == "__main__":
    sys.exit(main())
