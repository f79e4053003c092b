"""owl-serve throughput and time to first token, against two baselines measured in the same run.

Starts `owl-serve` (a subprocess) on a checkpoint (default: a small random LLaVA-layout model
built here, with a tiny tokenizer), and drives it over loopback with the official `openai`
client from C concurrent clients (threads; default 16 and 64), every request with one image
(a PNG data URL) and greedy decoding, streamed. Prints, per C: output tokens/s, p50 / p99 time
to first token, and the ratios to
  (a) the offline ceiling: `load_pretrained(...).generate` over the same requests in batches of
      --slots rows (no HTTP, no scheduling), in this process, warmed up;
  (b) the same server answering one request at a time (one client).
Measurements run in rounds (ceiling, one at a time, each concurrency, back to back); each ratio
compares one round's figures, and the medians over rounds are printed.
Goals at 16 clients: >= 0.8x the offline ceiling and >= 4x one at a time.

    python benchmarks/serve.py                       # small random model, 16 and 64 clients
    python benchmarks/serve.py --ckpt ckpts/llava-7b --dtype bfloat16 --slots 16 --max-tokens 128
"""
from __future__ import annotations

import argparse
import base64
import io
import json
import os
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # run from a checkout without installing

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", default=None, help="checkpoint (default: a small random one)")
    p.add_argument("--family", default="llava", help="family of the random checkpoint")
    p.add_argument("--hidden", type=int, default=512, help="random checkpoint: LLM width")
    p.add_argument("--layers", type=int, default=4, help="random checkpoint: LLM layers")
    p.add_argument("--dtype", default=None)
    p.add_argument("--slots", type=int, default=16)
    p.add_argument("--steps-per-call", type=int, default=8)
    p.add_argument("--prefill-rows", type=int, default=4)
    p.add_argument("--clients", default="16,64", help="concurrency levels")
    p.add_argument("--requests", type=int, default=64, help="requests per concurrency level")
    p.add_argument("--sequential", type=int, default=8, help="requests sent one at a time")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3, help="measurement rounds (medians)")
    p.add_argument("--out", default=None, help="also write the results here (JSON)")
    return p.parse_args(argv)


def random_checkpoint(args, directory):
    from owl_jax import families
    from owl_jax.checkpoint import save_checkpoint
    from owl_jax.testing.models import random_params
    from owl_jax.testing.spm import train_tiny_tokenizer
    tok = os.path.join(directory, "tok")
    train_tiny_tokenizer(tok, vocab_size=384)
    cfg = families.get(args.family).tiny(
        vocab_size=384, hidden_size=args.hidden, intermediate_size=args.hidden * 11 // 4,
        num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64,
        num_key_value_heads=args.hidden // 64, max_position_embeddings=1024)
    path = os.path.join(directory, "ckpt")
    # random weights with no EOS bias: answers run to max_tokens or a chance EOS, alike on
    # both paths
    save_checkpoint(path, random_params(cfg, seed=0), cfg, tokenizer_dir=tok)
    return path


def image_url(i: int) -> str:
    rgb = np.random.default_rng(i).integers(0, 256, (48 + i % 7, 64, 3), np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def requests(n: int):
    words = ["cat", "city", "river", "forest", "street", "market", "beach", "garden"]
    return [(f"Describe the {words[i % 8]} in this picture, number {i}.", image_url(i))
            for i in range(n)]


def start_server(args, ckpt, port):
    cmd = [sys.executable, "-m", "owl_jax.cli.serve", "--ckpt", ckpt, "--port", str(port),
           "--slots", str(args.slots), "--steps-per-call", str(args.steps_per_call),
           "--prefill-rows", str(args.prefill_rows),
           "--max-queue", "1024", "--log-level", "warning", "--served-model-name", "bench"]
    if args.dtype:
        cmd += ["--dtype", args.dtype]
    proc = subprocess.Popen(cmd, cwd=ROOT)
    import httpx2
    deadline = time.monotonic() + 600
    while True:
        if proc.poll() is not None:
            raise RuntimeError("owl-serve exited")
        try:
            if httpx2.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200:
                return proc
        except httpx2.TransportError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError("owl-serve did not come up")
        time.sleep(0.5)


def drive(url, reqs, clients: int, max_tokens: int):
    """Sends reqs from `clients` threads (each its own openai client); returns tokens/s and
    the times to first token."""
    import openai
    todo = list(enumerate(reqs))
    lock = threading.Lock()
    ttft, tokens, errors = [], [0], []

    def worker():
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0,
                               timeout=600)
        while True:
            with lock:
                if not todo:
                    return
                _, (question, img) = todo.pop(0)
            t0 = time.perf_counter()
            first = None
            try:
                stream = client.chat.completions.create(
                    model="bench", max_tokens=max_tokens, temperature=0, stream=True,
                    stream_options={"include_usage": True},
                    messages=[{"role": "user", "content": [
                        {"type": "image_url", "image_url": {"url": img}},
                        {"type": "text", "text": question}]}])
                n = 0
                for chunk in stream:
                    if chunk.choices and chunk.choices[0].delta.content and first is None:
                        first = time.perf_counter() - t0
                    if chunk.usage is not None:
                        n = chunk.usage.completion_tokens
            except Exception as e:  # noqa: BLE001 - counted and reported
                with lock:
                    errors.append(repr(e))
                continue
            with lock:
                tokens[0] += n
                if first is not None:
                    ttft.append(first)

    threads = [threading.Thread(target=worker) for _ in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if errors:
        raise RuntimeError(f"{len(errors)} requests failed, e.g. {errors[0]}")
    return {"tokens": tokens[0], "seconds": wall, "tokens_per_s": tokens[0] / wall,
            "ttft_p50_s": float(np.percentile(ttft, 50)),
            "ttft_p99_s": float(np.percentile(ttft, 99))}


class Offline:
    """The ceiling: the pipeline's batched generate over the same requests, --slots rows per
    call (images decoded and transformed as the server does), warmed up on the first batch."""

    def __init__(self, ckpt, args, reqs):
        import owl_jax
        self.owl = owl_jax.load_pretrained(ckpt, dtype=args.dtype)
        self.args, self.reqs = args, reqs
        self._batch(reqs[:args.slots])  # compile

    def _batch(self, rs):
        owl = self.owl
        prompts = [owl.family.build_prompt(q, 1) for q, _ in rs]
        imgs = [[Image.open(io.BytesIO(base64.b64decode(u.split(",", 1)[1])))] for _, u in rs]
        return sum(len(g.token_ids) for g in owl.generate(
            prompts, imgs, max_new_tokens=self.args.max_tokens, self_draft_tokens=0))

    def run(self):
        t0 = time.perf_counter()
        s = self.args.slots
        n = sum(self._batch(self.reqs[i:i + s]) for i in range(0, len(self.reqs), s))
        wall = time.perf_counter() - t0
        return {"tokens": n, "seconds": wall, "tokens_per_s": n / wall}


def main(argv=None):
    args = parse_args(argv)
    from owl_jax.serve.background import free_port
    levels = [int(x) for x in args.clients.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = args.ckpt or random_checkpoint(args, tmp)
        reqs = requests(args.requests)
        results = {"slots": args.slots, "max_tokens": args.max_tokens,
                   "requests": args.requests, "steps_per_call": args.steps_per_call,
                   "prefill_rows": args.prefill_rows, "rounds": []}
        ceiling = Offline(ckpt, args, reqs)
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        proc = start_server(args, ckpt, port)
        try:
            # an untimed pass at every concurrency first: it compiles the prefill shapes
            # (rows, length bucket, images) that the arrival patterns make
            for c in [1] + levels:
                drive(url, reqs if c > 1 else reqs[:args.sequential], c, args.max_tokens)
            # rounds of (ceiling, one at a time, each concurrency) back to back: each ratio
            # compares measurements of one round, so a shared machine's changing load
            # touches both sides alike; the medians over rounds are reported
            for k in range(args.rounds):
                rnd = {"offline": ceiling.run(),
                       "one_at_a_time": drive(url, reqs[:args.sequential], 1, args.max_tokens)}
                for c in levels:
                    r = drive(url, reqs, c, args.max_tokens)
                    r["x_offline"] = r["tokens_per_s"] / rnd["offline"]["tokens_per_s"]
                    r["x_one_at_a_time"] = (r["tokens_per_s"]
                                            / rnd["one_at_a_time"]["tokens_per_s"])
                    rnd[f"clients_{c}"] = r
                results["rounds"].append(rnd)
                print(f"round {k}:", json.dumps(rnd), flush=True)
        finally:
            proc.terminate()
            proc.wait(120)
    rounds = results["rounds"]
    median = lambda f: float(np.median([f(r) for r in rounds]))  # noqa: E731
    print(f"offline ceiling {median(lambda r: r['offline']['tokens_per_s']):.0f} tokens/s, "
          f"one at a time {median(lambda r: r['one_at_a_time']['tokens_per_s']):.0f} tokens/s "
          f"(medians of {len(rounds)} rounds)")
    for c in levels:
        summary = {key: median(lambda r: r[f"clients_{c}"][key]) for key in (
            "tokens_per_s", "x_offline", "x_one_at_a_time", "ttft_p50_s", "ttft_p99_s")}
        results[f"clients_{c}"] = summary
        print(f"{c} clients: {summary['tokens_per_s']:.0f} output tokens/s = "
              f"{summary['x_offline']:.2f}x the offline ceiling, "
              f"{summary['x_one_at_a_time']:.1f}x one at a time; time to first token p50 "
              f"{summary['ttft_p50_s']:.2f} s, p99 {summary['ttft_p99_s']:.2f} s")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    return results


if __name__ == "__main__":
    main()
