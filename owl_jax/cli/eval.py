"""owl-eval: generate answers for an evaluation set and score them.

    owl-eval --ckpt ckpts/owl-7b --task coco_caption --raw_dir /data/coco \\
             --data_dir /data/tfds --split test --batch_size 16 --out results/coco

`--raw_dir` builds the task's TFDS dataset (ArrayRecord) from the original files into
`--data_dir` first; later runs with the flag reuse that build while the raw files it read are
unchanged and rebuild it when they changed (runs without the flag use the build as it is).
Writes metrics.json, answers.jsonl (in the questions' input order) and, for coco_caption /
vqav2, predictions.json in the official results format. See docs/eval.md.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from owl_jax.eval import run, tfds_builders

DEFAULT_SPLIT = {"coco_caption": "test", "vqav2": "val", "owleval": "test"}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="owl-eval", description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", required=True, help="JAX checkpoint directory (owl_jax.load_pretrained)")
    p.add_argument("--task", required=True, choices=sorted(run.TASKS))
    p.add_argument("--data_dir", required=True, help="TFDS data dir holding the prepared dataset")
    p.add_argument("--raw_dir", help="original files to build the dataset from; rebuilt from them "
                   "when they changed since the last build (see docs/eval.md)")
    p.add_argument("--config", help="builder config: eval (default) or full (coco_caption, vqav2)")
    p.add_argument("--split", help="default: test for coco_caption / owleval, val for vqav2")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--max_new_tokens", type=int, help="default: 30 / 10 / 512 by task")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--num_beams", type=int, default=1)
    p.add_argument("--prompt", help="question template with {question} (see docs/eval.md)")
    p.add_argument("--max_examples", type=int, help="evaluate only the first N images / questions")
    p.add_argument("--num_threads", type=int, default=4, help="image decoding threads")
    p.add_argument("--model_id", help="owleval answers' model_id (default: checkpoint dir name)")
    args = p.parse_args(argv)
    if args.batch_size < 1:
        p.error("--batch_size must be >= 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    split = args.split or DEFAULT_SPLIT[args.task]
    if args.raw_dir:
        try:
            tfds_builders.prepare(args.task, args.raw_dir, args.data_dir, args.config)
        except FileNotFoundError as e:  # the builders name the missing file and the layout
            print(f"owl-eval: {e}", file=sys.stderr)
            return 2
    try:
        source = tfds_builders.load(args.task, split, args.data_dir, args.config)
    except Exception as e:  # noqa: BLE001 - tfds raises several kinds for "not prepared"
        print(f"owl-eval: cannot open split {split!r} of {tfds_builders.tfds_name(args.task, args.config)} "
              f"in {args.data_dir}: {e}\n(build it with --raw_dir DIR; see docs/eval.md)", file=sys.stderr)
        return 2

    import owl_jax  # the model stack is imported only once the data is known to be there
    generator = owl_jax.load_pretrained(args.ckpt)
    kwargs = {"model_id": args.model_id or os.path.basename(os.path.normpath(args.ckpt))} \
        if args.task == "owleval" else {}
    result = run.evaluate(generator, run.get_task(args.task, **kwargs), source,
                          batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                          temperature=args.temperature, num_beams=args.num_beams,
                          prompt=args.prompt, max_examples=args.max_examples,
                          num_threads=args.num_threads)
    paths = run.write_results(result, args.out, extra={
        "ckpt": os.path.abspath(args.ckpt), "split": split,
        "dataset": tfds_builders.tfds_name(args.task, args.config)})
    summary = {k: v for k, v in result.metrics.items()
               if k not in ("per_question_type", "prompt", "generation")}
    print(json.dumps(summary, indent=1))
    print("wrote " + ", ".join(paths.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
