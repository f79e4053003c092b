"""owl-generate: ask a checkpoint about images in the terminal, the answer streamed as it grows.

    owl-generate --ckpt ckpts/owl-7b --image cat.jpg --prompt "What is in the image?"
    owl-generate --ckpt ckpts/owl-7b --image a.jpg --image b.jpg --chat
    owl-generate --ckpt ckpts/owl-7b --raw --prompt "$(cat prompt.txt)" --image a.jpg
    owl-generate --ckpt ckpts/owl3-2b --video clip.mp4 --prompt "Describe the video."

The question is wrapped in the checkpoint's family's template (Owl: system line, one
`Human: <image>` line per image, `Human: {question}`, `AI: `) unless --raw, which sends --prompt verbatim (it must then
hold one `<image>` per --image). --chat keeps a conversation: every turn is appended to the
template (`Human: ...`, `AI: ...`) and the whole conversation is the next prompt; type /reset to
start over (it answers "(conversation cleared)"), /exit (or an empty line, or Ctrl-D) to leave. Decoding flags use HF's names; see
docs/inference.md.
"""
from __future__ import annotations

import argparse
import os
import sys



def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="owl-generate", description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", required=True,
                   help="JAX checkpoint directory (owl-convert output or an owl-train export)")
    p.add_argument("--tokenizer", default=None,
                   help="directory holding the tokenizer (tokenizer.model; tokenizer.json for Qwen2-based "
                        "families), for a checkpoint without one "
                        "(default: the checkpoint's own)")
    p.add_argument("--image", action="append", default=[], help="image file (repeatable)")
    p.add_argument("--video", action="append", default=[],
                   help="video file (repeatable; families that take videos: its sampled "
                        "frames, placed after the images)")
    p.add_argument("--max_frames", type=int, default=None,
                   help="frames sampled from each --video at most (default: the family's)")
    p.add_argument("--prompt", help="the question (or, with --raw, the whole prompt)")
    p.add_argument("--raw", action="store_true", help="send --prompt verbatim, no template")
    p.add_argument("--chat", action="store_true", help="multi-turn conversation on stdin")
    p.add_argument("--max_new_tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top_k", type=int, default=0, help="0 = off")
    p.add_argument("--top_p", type=float, default=1.0)
    p.add_argument("--repetition_penalty", type=float, default=1.0)
    p.add_argument("--no_repeat_ngram_size", type=int, default=0)
    p.add_argument("--num_beams", type=int, default=1)
    p.add_argument("--length_penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prompt_lookup_num_tokens", type=int, default=0,
                   help="greedy: check up to this many tokens copied from the prompt per pass "
                        "(the same answer, faster where it quotes; 0 = off)")
    p.add_argument("--self_draft_tokens", type=int, default=4,
                   help="greedy on CPU: draft up to this many tokens with an int8 copy of the "
                        "LLM and check them in one pass (the same answer; 0 = one pass per "
                        "token)")
    p.add_argument("--dtype", default=None, help="bfloat16 / float32 (default: as stored)")
    p.add_argument("--tensor", type=int, default=1,
                   help="shard the weights over this many devices (tensor parallel)")
    p.add_argument("--stream_chunk", type=int, default=8,
                   help="tokens per compiled call between streamed updates")
    p.add_argument("--no_stream", action="store_true", help="print the answer only at the end")
    args = p.parse_args(argv)
    if args.raw and args.chat:
        p.error("--raw and --chat do not mix (--chat builds the template itself)")
    if not args.chat and not args.prompt:
        p.error("--prompt is required (or use --chat)")
    return args


class _Printer:
    """Prints only what was added to the text since the last call."""

    def __init__(self, out):
        self.out, self.shown = out, ""

    def __call__(self, text: str, final: bool = False):
        if text.endswith("\ufffd") and not final:  # a multi-byte character still incomplete
            return
        if text.startswith(self.shown):
            self.out.write(text[len(self.shown):])
        else:  # decoding changed earlier text (rare with byte fallback): reprint the line
            self.out.write("\r" + text)
        self.out.flush()
        self.shown = text


def main(argv=None, stdin=None, stdout=None) -> int:
    args = parse_args(argv)
    stdin = stdin or sys.stdin
    stdout = stdout or sys.stdout
    import owl_jax
    from owl_jax.families.owl1.processor import load_image

    try:
        images = [load_image(p) for p in args.image]
    except Exception as e:  # noqa: BLE001 - PIL raises many kinds
        print(f"owl-generate: cannot read image: {e}", file=sys.stderr)
        return 2
    missing = [v for v in args.video if not os.path.isfile(v)]
    if missing:
        print(f"owl-generate: cannot read video: {missing[0]}: no such file", file=sys.stderr)
        return 2
    mesh = None
    if args.tensor > 1:
        from owl_jax.sharding import make_mesh
        mesh = make_mesh(data=1, fsdp=1, tensor=args.tensor)
    try:
        owl = owl_jax.load_pretrained(args.ckpt, dtype=args.dtype, mesh=mesh,
                                      tokenizer=args.tokenizer, stream_chunk=args.stream_chunk)
        owl._need_tokenizer()
    except (OSError, ValueError) as e:
        print(f"owl-generate: cannot use --ckpt {args.ckpt}: {e}", file=sys.stderr)
        return 2
    videos = list(args.video)
    media = images + videos
    templ_kw = {}
    if videos:
        if getattr(owl.processor, "video_marker", None) is None:
            print(f"owl-generate: the {owl.family.name} family takes no videos (--video)",
                  file=sys.stderr)
            return 2
        if args.max_frames is not None:
            owl.processor.max_frames = args.max_frames
        templ_kw = {"n_videos": len(videos)}
    kw = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
              top_k=args.top_k, top_p=args.top_p, repetition_penalty=args.repetition_penalty,
              no_repeat_ngram_size=args.no_repeat_ngram_size, num_beams=args.num_beams,
              length_penalty=args.length_penalty, seed=args.seed,
              prompt_lookup_num_tokens=args.prompt_lookup_num_tokens,
              self_draft_tokens=args.self_draft_tokens)

    def answer(prompt: str) -> str:
        printer = None if args.no_stream else _Printer(stdout)
        try:
            out = owl.generate(prompt, media, stream=printer, **kw)
        except (ValueError, ImportError) as e:
            print(f"owl-generate: {e}", file=sys.stderr)
            return None
        (printer or _Printer(stdout))(out.text, final=True)
        stdout.write("\n")
        stdout.flush()
        return out.text

    if not args.chat:
        prompt = (args.prompt if args.raw
                  else owl.family.build_prompt(args.prompt, len(images), **templ_kw))
        return 0 if answer(prompt) is not None else 1

    turns: list[str] = []
    first = args.prompt
    while True:
        if first is not None:
            question, first = first, None
            stdout.write(f"Human: {question}\n")
        else:
            stdout.write("Human: ")
            stdout.flush()
            line = stdin.readline()
            if not line:
                break
            question = line.strip()
        if question in ("", "/exit", "/quit"):
            break
        if question == "/reset":
            turns = []
            stdout.write("(conversation cleared)\n")
            continue
        stdout.write("AI: ")
        stdout.flush()
        text = answer(owl.family.build_prompt(turns + [question], len(images), **templ_kw))
        if text is None:
            continue
        turns += [question, text.strip()]
    return 0


if __name__ == "__main__":
    sys.exit(main())
