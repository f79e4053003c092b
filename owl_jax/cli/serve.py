"""owl-serve: an OpenAI-compatible chat server (continuous batching) with a chat page.

    owl-serve --ckpt ckpts/llava-7b --dtype bfloat16 --slots 16
    curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
        -d '{"messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 32}'

Open http://127.0.0.1:8000/ for the chat page. Every family is served with its own template.
SIGTERM (or Ctrl-C) stops taking requests and finishes those in flight.
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="owl-serve", description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", required=True, help="JAX checkpoint directory (with its tokenizer)")
    p.add_argument("--tokenizer", default=None, help="directory holding tokenizer.model, for "
                                                     "a checkpoint without one")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--served-model-name", default=None,
                   help="the model id of /v1/models and requests (default: the --ckpt folder "
                        "name)")
    p.add_argument("--dtype", default=None, help="bfloat16 / float32 (default: as stored)")
    p.add_argument("--tensor", type=int, default=1,
                   help="shard the weights over this many local devices (tensor parallel)")
    p.add_argument("--slots", type=int, default=8, help="requests decoded together")
    p.add_argument("--max-len", type=int, default=None,
                   help="cache slots per request, prompt plus answer (default: the model's "
                        "context)")
    p.add_argument("--steps-per-call", type=int, default=4,
                   help="decode steps per compiled call (fewer host round trips; a finished "
                        "slot refills at most this many steps later)")
    p.add_argument("--prefill-rows", type=int, default=4,
                   help="most requests prefilled in one call (each row count 1, 2, 4, ... up "
                        "to this is one compiled shape per prompt-length bucket)")
    p.add_argument("--max-queue", type=int, default=256,
                   help="requests that may wait for a slot; more are answered 429")
    p.add_argument("--max-images", type=int, default=4, help="images per request")
    p.add_argument("--max-views", type=int, default=32,
                   help="for models that keep images outside the sequence (mPLUG-Owl3): the "
                        "most image views one request makes (a cut image gives its tiles and a "
                        "global view); every slot keeps their keys / values")
    p.add_argument("--max-tokens", type=int, default=256,
                   help="answer length when a request gives no max_tokens")
    p.add_argument("--allowed-local-media-path", default=None,
                   help="image_url may name files under this directory (default: data: URLs "
                        "only)")
    p.add_argument("--fast-compile", action="store_true",
                   help="compile with XLA optimizations off (tiny models, tests)")
    p.add_argument("--log-level", default="info")
    return p.parse_args(argv)


def build(args):
    """(pipeline, scheduler, options) for the parsed arguments."""
    import owl_jax
    from owl_jax.generate.slots import SlotEngine
    from owl_jax.serve.app import ServeOptions
    from owl_jax.serve.scheduler import Scheduler
    mesh = None
    if args.tensor > 1:
        from owl_jax.sharding import make_mesh
        mesh = make_mesh(data=1, fsdp=1, tensor=args.tensor)
    owl = owl_jax.load_pretrained(
        args.ckpt, dtype=args.dtype, mesh=mesh, tokenizer=args.tokenizer,
        compiler_options={"xla_backend_optimization_level": 0} if args.fast_compile else None)
    owl._need_tokenizer()
    engine = SlotEngine(owl.generator, slots=args.slots, max_len=args.max_len,
                        steps_per_call=args.steps_per_call, prefill_rows=args.prefill_rows,
                        max_views=args.max_views)
    engine.warmup()  # compile the decode step before taking requests
    name = args.served_model_name or os.path.basename(os.path.normpath(args.ckpt))
    options = ServeOptions(model_name=name, max_images=args.max_images,
                           max_tokens_default=args.max_tokens,
                           allowed_local_media_path=args.allowed_local_media_path)
    return owl, Scheduler(engine, max_queue=args.max_queue), options


def main(argv=None) -> int:
    args = parse_args(argv)
    import uvicorn
    from owl_jax.serve.app import create_app
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    try:
        owl, scheduler, options = build(args)
    except (OSError, ValueError) as e:
        print(f"owl-serve: cannot use --ckpt {args.ckpt}: {e}", file=sys.stderr)
        return 2
    app = create_app(owl, scheduler, options)
    # uvicorn: SIGTERM / SIGINT close the listening socket, wait for the requests in flight
    # (streams included), then run the app's shutdown, which drains the engine
    # uvicorn raises the signal again once it has shut down; after a clean drain, SIGTERM
    # ends the process with status 0
    signal.signal(signal.SIGTERM, lambda *_: None)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level.lower(),
                timeout_graceful_shutdown=None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
