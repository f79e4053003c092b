"""`make demo`: the whole owl-jax stack on a laptop CPU, end to end, in about ten minutes.

    python -m owl_jax.demo [--family owl1|llava] [--out demo_out] [--quick] [--eval-images 200]

1. data        synthetic coloured shapes as img2dataset webdataset shards (train, held out),
               an instruction set in the family's format (mPLUG-Owl's jsonl / LLaVA's json,
               images beside it), and the text-only warm-up corpus
2. tokenizer   a LLaMA-like sentencepiece model trained on the demo's text
3. init        a randomly initialised tiny model of the family written as a checkpoint directory
4. warmup      owl-train: the LLM learns the template and the words from text
5. stage 1     owl-train: LLM frozen, the vision side learns to caption (webdataset -> grain)
6. stage 2     owl-train: instruction tuning (mPLUG-Owl: LoRA on the LLM; LLaVA: projector +
               the whole LLM)
7. evaluate    greedy answers and captions for held-out images, scored by keywords
8. round trip  owl-convert jax-to-torch, then torch-to-jax; the converted model must give the
               same answers
The last line printed is `demo accuracy: X% on N held-out images`.

What differs per family is its `DemoFamily` (`owl_jax/families/<name>/demo.py`: model, template,
stage recipes; see owl_jax/demo/family.py); the scoring rule is in `owl_jax/demo/scoring.py`.
"""
from __future__ import annotations

import argparse
import io
import os
import shutil
import sys
import tarfile
import time


import numpy as np

from owl_jax.demo import family as demo_family, scoring, shapes

# Sample counts (full demo, --quick)
SIZES = dict(
    full=dict(train=12000, instruct=4000, text=4000, heldout=200, steps=None),
    quick=dict(train=64, instruct=32, text=64, heldout=8,
               steps=dict(warmup=3, stage1=3, stage2=3)),
)
TRAIN_SEED, HELDOUT_SEED, INSTRUCT_SEED, TEXT_SEED = 1, 2, 3, 4
IMAGE_PX = 64  # stored JPEG size; the model resizes to its own resolution (32) as upstream does
STAGES = ("warmup", "stage1", "stage2")


def demo_model_config(vocab_size: int, family: str = "owl1"):
    return demo_family.get(family).model_config(vocab_size)


class Steps:
    """Prints `[k/n] what` headers and remembers how long each step took."""

    def __init__(self, names: list[str]):
        self.names, self.k, self.times, self.t = names, 0, {}, None
        self.start = time.time()

    def __call__(self, what: str):
        self._close()
        name = self.names[self.k]
        self.k += 1
        print(f"\n[{self.k}/{len(self.names)}] {name}: {what}", flush=True)
        self.t = (name, time.time())

    def _close(self):
        if self.t:
            self.times[self.t[0]] = time.time() - self.t[1]
            self.t = None

    def summary(self) -> str:
        self._close()
        parts = ", ".join(f"{k} {v:.0f}s" for k, v in self.times.items())
        return f"total {time.time() - self.start:.0f}s ({parts})"


def _bar(total: int, desc: str):
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, unit="img", dynamic_ncols=True, leave=True)


# --------------------------------------------------------------------------------------------
# 1-3: data, tokenizer, initial checkpoint


def write_text_corpus(p: dict, n: int, family: str, fmt: str) -> list[str]:
    """The warm-up corpus: text-only conversations in the family's instruction format (`fmt`),
    and plain lines "red circle gray. a red circle on a gray background" plus the same
    conversations as one string each (a text-only webdataset shard: `.txt` members, no image,
    read by the pipeline's `text` task), both rendered for the family. Returns all the text
    written, as the model reads it."""
    import random
    demo = demo_family.get(family)
    os.makedirs(p["text_shards"], exist_ok=True)
    turns = shapes.text_turns(TEXT_SEED, n)
    shapes.write_text_conversations(p["text_conversations"], turns, fmt)
    convs = [demo.render(t, with_image=False) for t in turns]
    rng = random.Random(f"keywords/{TEXT_SEED}")
    lines = []
    for _ in range(n):
        c, s, b = (rng.choice(sorted(shapes.COLOURS)), rng.choice(shapes.SHAPES),
                   rng.choice(sorted(shapes.BACKGROUNDS)))
        # Keywords in random order: the LLM must pick each word by what it is, not where it
        # stands (image tokens later stand where no word did). Measured: +5-10 points of
        # shape accuracy after stage 1 over a fixed order.
        words = [c, s, b]
        rng.shuffle(words)
        lines.append(demo.keyword_line(" ".join(words),
                                       shapes.caption_for(c, s, b, rng.randrange(5))))
    lines += [demo.inference_text(t) for t in turns]
    with tarfile.open(os.path.join(p["text_shards"], "00000.tar"), "w") as tar:
        for i, line in enumerate(lines):
            data = line.encode()
            info = tarfile.TarInfo(f"{i:09d}.txt")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return convs + lines


def tokenizer_corpus(text: list[str], family: str, n_captions: int = 2000) -> list[str]:
    """Everything the model will read or write, so the small vocabulary covers it well."""
    import random
    rng = random.Random("tokenizer")
    out = list(text)
    for i in range(n_captions):  # conversations as stage 2 sees them (no pixels needed)
        c, sh, b = (rng.choice(sorted(shapes.COLOURS)), rng.choice(shapes.SHAPES),
                    rng.choice(sorted(shapes.BACKGROUNDS)))
        out.append(demo_family.get(family).render(shapes.conversation(
            shapes.ShapeSample(i, c, sh, b, shapes.caption_for(c, sh, b, i), None), rng)))
    return out


def init_checkpoint(p: dict, vocab_size: int, family: str, seed: int = 0) -> None:
    """A random tiny model of the family saved as a checkpoint directory (what `init_from`
    reads): `family.model(cfg).init(key, *family.dummy_inputs(cfg))`.

    Dense and conv kernels get LeCun-normal scales (std 1/sqrt(fan_in)) instead of the 7B
    model's fixed 0.02: at width 96-128, 0.02 starts every residual branch ~5x too small and
    the ViT learns shapes about twice as slowly (measured)."""
    import flax.linen as nn
    import jax

    from owl_jax import checkpoint as ckpt
    from owl_jax import families

    cfg = demo_model_config(vocab_size, family)
    fam = families.of_config(cfg)
    params = nn.unbox(fam.model(cfg).init(jax.random.key(seed), *fam.dummy_inputs(cfg)))["params"]

    def rescale(path, x):
        name = "/".join(str(getattr(k, "key", k)) for k in path)
        if name.endswith("kernel") and x.ndim >= 2:
            fan_in = int(np.prod(x.shape[:-1]))
            return x * (1.0 / np.sqrt(fan_in) / 0.02)
        return x
    params = jax.tree_util.tree_map_with_path(rescale, params)
    ckpt.save_checkpoint(p["init"], jax.device_get(params), cfg, tokenizer_dir=p["tokenizer"],
                         overwrite=True)
    n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    v = cfg.vision
    connector = demo_family.get(family).connector(cfg)
    print(f"  {n / 1e6:.2f}M parameters: ViT {v.num_hidden_layers}x{v.hidden_size} at "
          f"{v.image_size}px/{v.patch_size}px patches, {connector}, LLM "
          f"{cfg.text.num_hidden_layers}x{cfg.text.hidden_size}, vocab {cfg.text.vocab_size}",
          flush=True)


# --------------------------------------------------------------------------------------------
# 4-6: training


def stage_arg(family: str, stage: str, out: str, steps: int | None = None,
              fast: bool = False) -> str:
    """The configs/demo_shapes.py ARGS of one stage (the default family's spell no family=)."""
    from owl_jax.configs import demo_shapes
    default = family == demo_shapes.ARGS["family"]
    return ("" if default else f"family={family},") + f"stage={stage},out={out}" + \
        (f",steps={steps}" if steps else "") + (",fast" if fast else "")


def train_stage(stage: str, p: dict, out: str, steps: int | None, fast: bool = False,
                family: str = "owl1"):
    from owl_jax.configs import demo_shapes
    from owl_jax.train.loop import train
    arg = stage_arg(family, stage, out, steps, fast)
    config = demo_shapes.get_config(arg)
    workdir = p[f"run_{stage}"]
    shutil.rmtree(workdir, ignore_errors=True)  # a demo run always starts from scratch
    print(f"  owl-train --config configs/demo_shapes.py:{arg} --workdir {workdir}", flush=True)
    print(f"  {config.total_steps} steps of {config.batch.global_size} rows x "
          f"{config.batch.seq_len} tokens; trainable: {', '.join(config.trainable)}", flush=True)
    result = train(config, workdir)
    print(f"  final train loss {result.get('loss', float('nan')):.4f}; export: "
          f"{result['export_dir']}", flush=True)
    return result


def _parts(keys, part_names: dict) -> str:
    """Param paths -> their parts in words ("LLM/LoRA")."""
    names = []
    for k in sorted(keys):
        name = "LoRA" if k.endswith(("/lora_a", "/lora_b")) else \
            part_names.get(k.split("/")[0], k.split("/")[0])
        if name not in names:
            names.append(name)
    return "/".join(names)


def check_frozen(p: dict, family: str = "owl1") -> None:
    """Each stage changed exactly what its recipe trains: reads the three exports back and
    compares them leaf by leaf. A parameter outside the stage's `trainable` must come out
    bit-identical, and every `trainable` pattern must have changed something."""
    from owl_jax import checkpoint as ckpt
    from owl_jax.configs import demo_shapes
    from owl_jax.train import trainable as tr
    flat = {s: tr.flatten(ckpt.load_checkpoint(f"{p[f'run_{s}']}/export", check=False)[1])
            for s in STAGES}
    size = lambda keys, src: sum(int(np.prod(np.shape(flat[src][k]))) for k in keys)  # noqa: E731
    report = []
    for before, stage in zip(STAGES, STAGES[1:]):
        trainable = demo_shapes.get_config(stage_arg(family, stage, p["out"])).trainable
        a, b = flat[before], flat[stage]
        changed = {k for k in b if k not in a or not np.array_equal(np.asarray(a[k]),
                                                                    np.asarray(b[k]))}
        frozen = [k for k in b if not tr.is_trainable(k, trainable)]
        bad = sorted(k for k in changed if k in frozen)
        idle = [pat for pat in trainable if not any(tr.is_trainable(k, (pat,)) for k in changed)]
        if bad or idle:
            raise SystemExit(f"{stage} changed what it should have frozen ({bad[:3]}) or left "
                             f"a trainable part unchanged ({idle}); changed: {len(changed)}")
        n = stage.replace("stage", "stage ")
        part_names = demo_family.get(family).part_names
        report.append(f"{n} changed {size(changed, stage):,} {_parts(changed, part_names)} "
                      f"params and left the {size(frozen, stage):,} "
                      f"{_parts(frozen, part_names)} params bit-identical")
    print("  checked: " + "; ".join(report), flush=True)


# --------------------------------------------------------------------------------------------
# The demo


MARKER = ".owl_jax_demo"


def _fresh_output_dir(out: str) -> None:
    """Empties `out` for a new run, but only if it is empty or an earlier demo's output
    (it holds the marker file): never deletes a directory the demo did not make."""
    if os.path.isdir(out) and os.listdir(out):
        if not os.path.exists(os.path.join(out, MARKER)):
            raise SystemExit(f"{out} exists, is not empty and is not a demo output directory: "
                             f"pass another --out")
        shutil.rmtree(out)
    os.makedirs(out, exist_ok=True)
    open(os.path.join(out, MARKER), "w").close()


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="python -m owl_jax.demo", description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", choices=demo_family.names(), default="owl1",
                    help="the model family to train (default owl1, mPLUG-Owl)")
    ap.add_argument("--out", default="demo_out", help="output directory (default demo_out)")
    ap.add_argument("--quick", action="store_true",
                    help="a seconds-long run of the same code path (tests use it; accuracy "
                         "is meaningless)")
    ap.add_argument("--eval-images", type=int, default=None, help="held-out images to score")
    ap.add_argument("--steps", default="",
                    help="override steps per stage, e.g. warmup=300,stage1=2400,stage2=500")
    ap.add_argument("--min-accuracy", type=float, default=None,
                    help="exit with status 1 below this accuracy (default 0.9; --quick: none)")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    family, demo = args.family, demo_family.get(args.family)
    size = dict(SIZES["quick" if args.quick else "full"])
    if args.eval_images:
        size["heldout"] = args.eval_images
    steps = dict(size["steps"] or {})
    for part in filter(None, args.steps.split(",")):
        k, _, v = part.partition("=")
        steps[k.strip()] = int(v)
    min_acc = args.min_accuracy if args.min_accuracy is not None else (
        0.0 if args.quick else 0.9)

    from owl_jax.configs import demo_shapes
    fmt = demo.instruction_format
    p = demo_shapes.paths(args.out, fmt)
    _fresh_output_dir(p["out"])
    st = Steps(["data", "tokenizer", "init", *STAGES, "evaluate", "round trip"])
    print(f"owl-jax demo -> {p['out']} ({'quick' if args.quick else 'full'} run, "
          f"{demo.title})", flush=True)

    # 1. data ---------------------------------------------------------------------------------
    st(f"synthetic shapes as img2dataset webdataset shards, an instruction set in "
       f"{demo.title}'s format, and a text corpus")
    with _bar(size["train"], "  train shards") as bar:
        shards = shapes.write_webdataset(p["train_shards"], TRAIN_SEED, size["train"],
                                         per_shard=2000, size=IMAGE_PX, progress=bar.update)
    held_dir = p["heldout_shards"]
    with _bar(size["heldout"], "  held-out shards") as bar:
        shapes.write_webdataset(held_dir, HELDOUT_SEED, size["heldout"], per_shard=2000,
                                size=IMAGE_PX, progress=bar.update)
    with _bar(size["instruct"], "  instructions") as bar:
        shapes.write_instructions(p["instruct_dir"], INSTRUCT_SEED, size["instruct"],
                                  fmt=fmt, size=IMAGE_PX, progress=bar.update)
    text = write_text_corpus(p, size["text"], family, fmt)
    print(f"  {len(shards)} train shards ({size['train']} images) in {p['train_shards']}\n"
          f"  {size['heldout']} held-out images (split seed {HELDOUT_SEED}, train seed "
          f"{TRAIN_SEED}) in {held_dir}\n"
          f"  {size['instruct']} conversations in {p['instructions']}\n"
          f"  {len(text)} warm-up texts in {p['text_shards']}", flush=True)

    # 2. tokenizer ----------------------------------------------------------------------------
    st("sentencepiece (BPE, LLaMA special ids, byte fallback)")
    from owl_jax.testing.spm import train_tiny_tokenizer
    from owl_jax.tokenizer import OwlTokenizer
    # 640 pieces: at 512, "Blue", "Green" and "Yellow" were spelled "▁" + letters, so the one-word
    # answers ("Blue.") hinged on LoRA learning single letters from the image, and the colour
    # answer swung between 100% and 75% with the sample order. At 640 every colour is one piece.
    train_tiny_tokenizer(p["tokenizer"], vocab_size=640, texts=tokenizer_corpus(text, family))
    tok = OwlTokenizer.from_dir(p["tokenizer"])
    print(f"  vocab {tok.vocab_size}; '{shapes.caption_for('red', 'circle', 'white')}' -> "
          f"{len(tok.encode(shapes.caption_for('red', 'circle', 'white')))} tokens", flush=True)

    # 3. initial checkpoint -------------------------------------------------------------------
    st(f"a randomly initialised tiny {demo.title}")
    init_checkpoint(p, tok.vocab_size, family)

    # 4-6. training ---------------------------------------------------------------------------
    final = None
    for stage in STAGES:
        st(demo.stage_titles[stage])
        final = train_stage(stage, p, args.out, steps.get(stage), args.quick,
                            family)["export_dir"]
    check_frozen(p, family)

    # 7. evaluate -----------------------------------------------------------------------------
    st(f"answering questions about {size['heldout']} held-out images")
    from owl_jax.api import load_pretrained
    images = scoring.heldout_images(held_dir)
    xla = {"xla_backend_optimization_level": 0} if args.quick else None
    pipe = load_pretrained(final, compiler_options=xla)
    answers = scoring.answer_all(pipe, images)
    res = scoring.score(images, answers)
    print(f"  prompt: {pipe.family.build_prompt(shapes.COLOUR_QUESTION)!r}", flush=True)
    for i in range(min(4, len(images))):
        c, s = scoring.truth(images[i][0])
        print(f"  {c} {s}: Q: {shapes.COLOUR_QUESTION} A: {answers['colour'][i]!r} | "
              f"Q: {shapes.SHAPE_QUESTION} A: {answers['shape'][i]!r} | "
              f"caption: {answers['caption'][i]!r}", flush=True)

    # 8. round trip ---------------------------------------------------------------------------
    st("owl-convert jax-to-torch, then torch-to-jax, and the same questions again")
    from owl_jax.convert.cli import main as owl_convert
    for argv_ in (["jax-to-torch", final, p["torch"], *demo.convert_args],
                  ["torch-to-jax", p["torch"], p["roundtrip"]]):
        print(f"  owl-convert {' '.join(argv_)}", flush=True)
        rc = owl_convert(argv_)
        if rc:
            raise SystemExit(f"owl-convert {argv_[0]} failed with status {rc}")
    torch_files = sorted(f for f in os.listdir(p["torch"]) if not f.startswith("."))
    print(f"  PyTorch layout: {', '.join(torch_files)}", flush=True)
    again = scoring.answer_all(load_pretrained(p["roundtrip"], compiler_options=xla), images)
    same = sum(a == b for k in answers for a, b in zip(answers[k], again[k]))
    total = sum(len(v) for v in answers.values())
    print(f"  round trip: {same}/{total} answers identical", flush=True)

    # summary ---------------------------------------------------------------------------------
    print(f"\n{st.summary()}")
    print(f"colour question: {res['colour']:.1%}   shape question: {res['shape']:.1%}   "
          f"caption names both: {res['caption']:.1%}")
    ok = True
    if same != total:
        print("ERROR: the converted model answers differently", file=sys.stderr)
        ok = False
    print(f"demo accuracy: {100 * res['both']:.1f}% on {res['n']} held-out images", flush=True)
    if res["both"] < min_acc:
        print(f"ERROR: below the {min_acc:.0%} target", file=sys.stderr)
        ok = False
    return 0 if ok else 1
