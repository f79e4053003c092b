"""What generic code promises every family (owl1, llava, minigpt4, owl3), checked on each:

- the generation engine: a batch of prompts with 0, 1 and 2 images gives each row what the
  prompt gives alone, and KV-cached greedy decoding equals recomputing the whole sequence with
  the model's own forward pass;
- checkpoints record the family and load back as it (`load_pretrained` -> the family's model,
  processor and template);
- the trainer: the family's tiny recipe trains (synthetic data), resumes from its checkpoint,
  exports; the export loads and generates what the engine gives on the trained weights.
"""
import importlib
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import owl_jax
from owl_jax import families
from owl_jax.checkpoint import save_checkpoint
from owl_jax.generate import GenerationConfig, Generator
from owl_jax.layers.masks import segment_mask
from owl_jax.testing.models import FAST, VOCAB, random_params

FAMILIES = ["owl1", "llava", "minigpt4", "owl3"]
SERVED = FAMILIES  # families whose engine and checkpoint paths are checked here
RECIPES = {"owl1": "owl1.tiny_stage1", "llava": "llava.stage1", "minigpt4": "minigpt4.stage1",
           "owl3": "owl3.stage1"}


def tiny_cfg(name):
    return families.get(name).tiny(vocab_size=VOCAB, num_key_value_heads=2)  # GQA


def rows_for(cfg, rng):
    t = cfg.image_tokens
    w = lambda n: rng.integers(3, VOCAB - 1, n).tolist()  # noqa: E731 (not the image token)
    return [[1] + w(9), [1] + w(2) + [-1] * t + w(4), [1] + w(3) + [-1] * t + w(2) + [-1] * t
            + w(1)]


def full_greedy(cfg, params, row, px, n):
    """Greedy continuation by recomputing the whole sequence with the model's __call__."""
    model = families.of_config(cfg).model(cfg)
    f = jax.jit(lambda p, ids, px: model.apply({"params": p}, ids, px), compiler_options=FAST)
    seq = list(row)
    for _ in range(n):
        ids = np.zeros((1, len(row) + n), np.int32)
        ids[0, :len(seq)] = seq
        logits = f(params, ids, None if px is None else px[None])
        seq.append(int(jnp.argmax(logits[0, len(seq) - 1])))
    return seq[len(row):]


@pytest.mark.parametrize("name", SERVED)
def test_engine_batches_and_cache_match_recompute(name):
    cfg = tiny_cfg(name)
    params = random_params(cfg, seed=3)
    rng = np.random.default_rng(0)
    rows = rows_for(cfg, rng)
    s = cfg.vision.image_size
    px = rng.standard_normal((3, s, s, 3)).astype(np.float32)
    gen = Generator(cfg, params, compiler_options=FAST)
    gc = GenerationConfig(max_new_tokens=6, eos_token_id=-1)
    together = gen.generate(rows, px, gc)
    per_row = [None, px[:1], px[1:3]]
    for i, row in enumerate(rows):
        alone = gen.generate([row], per_row[i], gc)[0]
        assert alone.token_ids == together[i].token_ids, (name, i)
    assert together[2].token_ids == full_greedy(cfg, params, rows[2], px[1:3], 6)
    assert len({tuple(g.token_ids) for g in together}) == len(rows)  # not vacuous


def _out_of_sequence_model(cfg):
    """A LLaVA whose images stay out of the sequence, as a cross-attention family's do: the
    image slots embed as token 0 and each row's mean image embedding (its visual context,
    computed once at prefill) is added to every position the LLM reads, prefill and decode."""
    from owl_jax.families.llava.model import Llava

    class OutOfSequence(Llava):
        def embed(self, input_ids, image_embeds=None):
            return super().embed(input_ids, None)

        def visual_context(self, input_ids, image_embeds, positions):
            if image_embeds is None:
                return jnp.zeros((input_ids.shape[0], self.cfg.text.hidden_size))
            # images come flat, in row order; padding images (past the last slot) belong to none
            per_row = (input_ids < 0).sum(1) // self.cfg.image_tokens
            row_of = jnp.searchsorted(jnp.cumsum(per_row), jnp.arange(image_embeds.shape[0]),
                                      side="right")
            owner = jax.nn.one_hot(row_of, input_ids.shape[0], dtype=jnp.float32).T
            return (owner @ image_embeds.mean(1)) / jnp.maximum(per_row, 1)[:, None]

        def decode(self, embeds, positions, mask, cache, cache_index, return_hidden=False,
                   visual=None):
            return super().decode(embeds + visual[:, None], positions, mask, cache,
                                  cache_index, return_hidden)

    return OutOfSequence(cfg)


def test_engine_carries_the_visual_context_to_every_decode_step():
    cfg = tiny_cfg("llava")
    params = random_params(cfg, seed=4)
    model = _out_of_sequence_model(cfg)
    rng = np.random.default_rng(1)
    rows = rows_for(cfg, rng)
    s = cfg.vision.image_size
    px = rng.standard_normal((3, s, s, 3)).astype(np.float32)
    gen = Generator(cfg, params, compiler_options=FAST)
    gen.model = model  # before the first call traces anything
    gc = GenerationConfig(max_new_tokens=6, eos_token_id=-1)
    together = gen.generate(rows, px, gc)
    per_row = [None, px[:1], px[1:3]]
    for i, row in enumerate(rows):
        assert gen.generate([row], per_row[i], gc)[0].token_ids == together[i].token_ids, i
    beams = gen.generate(rows, px, gc, force_beam_search=True)
    assert [g.token_ids for g in beams] == [g.token_ids for g in together]

    # Reference: the whole sequence recomputed per token, the context added to every position.
    def full(p, ids, px):
        emb = model.apply({"params": p}, px, method="encode_images")
        ctx = model.apply({"params": p}, ids, emb, None, method="visual_context")
        x = model.apply({"params": p}, ids, None, method="embed") + ctx[:, None]
        pos = jnp.arange(ids.shape[1])[None]
        out, _ = model.apply({"params": p}, x, pos, segment_mask(jnp.ones(ids.shape, jnp.int32)),
                             None, None, method=lambda m, *a: m.language_model(*a))
        return out
    f = jax.jit(full, compiler_options=FAST)
    seq = list(rows[2])
    for _ in range(6):
        ids = np.array([seq], np.int32)
        seq.append(int(jnp.argmax(f(params, ids, px[1:3])[0, -1])))
    assert together[2].token_ids == seq[len(rows[2]):]
    # not vacuous: other images (the same ids) give another answer
    other = rng.standard_normal((2, s, s, 3)).astype(np.float32)
    assert gen.generate([rows[2]], other, gc)[0].token_ids != together[2].token_ids


@pytest.fixture(scope="module")
def bpe_tokenizer_dir(tmp_path_factory):
    """A Qwen2-style tokenizer.json within the tiny configs' 384 ids (families whose
    `Family.tokenizer` reads one)."""
    from owl_jax.testing.bpe import write_tokenizer
    d = tmp_path_factory.mktemp("bpe")
    write_tokenizer(str(d), vocab_size=380)
    return str(d)


@pytest.mark.parametrize("name", SERVED)
def test_checkpoint_records_the_family(name, tmp_path, tokenizer_dir, bpe_tokenizer_dir):
    if families.get(name).tokenizer is not None:   # not LLaMA's SentencePiece model
        tokenizer_dir = bpe_tokenizer_dir
    cfg = families.get(name).tiny(vocab_size=384, num_key_value_heads=2)
    params = random_params(cfg, seed=1)
    meta = save_checkpoint(str(tmp_path), params, cfg, tokenizer_dir=tokenizer_dir)
    assert meta["family"] == name
    with open(tmp_path / "owl_jax.json") as f:
        assert json.load(f)["family"] == name
    owl = owl_jax.load_pretrained(str(tmp_path), compiler_options=FAST)
    assert owl.family.name == name and owl.config == cfg
    question = owl.family.build_prompt("What is it?", 1)
    batch = owl.prepare([question], [[np.zeros((20, 30, 3), np.uint8)]])
    n_views = len(batch["pixel_values"])   # an image may give several views (Owl3's tiles)
    assert n_views >= 1 and int((batch["input_ids"] < 0).sum()) == cfg.image_tokens * n_views
    assert owl.logits(batch).shape[-1] == cfg.text.vocab_size


@pytest.mark.parametrize("name", FAMILIES)
def test_tiny_recipe_trains_resumes_and_exports(name, tmp_path, tokenizer_dir,
                                                bpe_tokenizer_dir):
    from owl_jax.train.loop import train
    if families.get(name).tokenizer is not None:   # trains and exports the family's own
        tokenizer_dir = bpe_tokenizer_dir
    recipe = importlib.import_module(f"owl_jax.configs.{RECIPES[name]}")
    arg = "steps={}" + ("" if name == "owl1" else ",size=tiny")
    c = recipe.get_config(arg.format(2))
    c.tokenizer_dir = tokenizer_dir
    c.eval_every = 0
    c.eval_data.kind = "none"
    assert c.model.family == name
    out = train(c, str(tmp_path))
    assert out["step"] == 2 and np.isfinite(out["loss"])
    c = recipe.get_config(arg.format(3))
    c.tokenizer_dir = tokenizer_dir
    c.eval_every = 0
    c.eval_data.kind = "none"
    out = train(c, str(tmp_path))  # resumes from step 2
    assert out["step"] == 3
    export = out["export_dir"]
    with open(os.path.join(export, "owl_jax.json")) as f:
        meta = json.load(f)
    assert meta["family"] == name and meta["trained_steps"] == 3
    owl = owl_jax.load_pretrained(export, compiler_options=FAST)
    assert isinstance(owl.config, families.get(name).config_type)
    prompt = owl.family.build_prompt("Hi", 0)
    got = owl.generate(prompt, [], max_new_tokens=4, eos_token_id=-1)
    ids = owl.processor.encode(prompt)
    want = Generator(owl.config, owl.params, compiler_options=FAST).generate(
        [ids], None, GenerationConfig(max_new_tokens=4, eos_token_id=-1))[0]
    assert got.token_ids == want.token_ids and len(got.token_ids) == 4
    # a fresh tiny model takes the tokenizer's vocabulary
    assert owl.config.text.vocab_size == owl.tokenizer.vocab_size


def test_checkpoints_written_before_families_load_as_owl1(tmp_path, tokenizer_dir):
    cfg = families.get("owl1").tiny(vocab_size=384)
    save_checkpoint(str(tmp_path), random_params(cfg), cfg, tokenizer_dir=tokenizer_dir)
    path = tmp_path / "owl_jax.json"
    meta = json.loads(path.read_text())
    del meta["family"]  # the directory format before families
    path.write_text(json.dumps(meta))
    assert families.name_of_checkpoint(str(tmp_path)) == "owl1"
    assert owl_jax.load_pretrained(str(tmp_path), compiler_options=FAST).config == cfg


def test_pipeline_lays_out_llava_samples_as_llava(tmp_path, tokenizer_dir):
    """A LLaVA config makes the data pipeline use LLaVA's layout and loss mask (vicuna_v1) and
    its image transform: each row equals `masks.conversation_sample` of its record."""
    from owl_jax.data.conversation import InstructionReader
    from owl_jax.data.pipeline import make_train_iterator
    from owl_jax.families.llava import masks
    from owl_jax.testing import shards
    from owl_jax.tokenizer import OwlTokenizer
    coco = shards.write_coco(str(tmp_path / "coco"), n_images=3, missing_images=0)
    shards.write_llava(str(tmp_path / "llava.json"), sorted(os.listdir(coco["images"])), n=3,
                       missing=())
    cfg = families.get("llava").tiny(vocab_size=384)
    tok = OwlTokenizer.from_dir(tokenizer_dir)
    spec = f"instruct:{tmp_path}/llava.json?images={coco['images']}"
    it = make_train_iterator(dict(sources=[dict(spec=spec)], seq_len=200, batch_size=1,
                                  packing=False, max_images_per_row=1, workers=0, threads=1,
                                  num_epochs=1, seed=0, augment=False, template="vicuna_v1"),
                             tok, cfg, 0, 1)
    rows = list(it)
    convs = list(InstructionReader("llava").read(str(tmp_path / "llava.json")))
    want = {}
    for conv in convs:
        sample, _ = masks.conversation_sample(tok, conv, 200, cfg.image_tokens, "vicuna_v1")
        want[tuple(sample["input_ids"][:-1])] = sample  # rows hold inputs; targets shift by one
    assert len(rows) == len(convs) == 4
    for b in rows:
        n = int(b["segment_ids"][0].sum())
        ref = want[tuple(b["input_ids"][0, :n].tolist())]
        np.testing.assert_array_equal(b["loss_mask"][0, :n], ref["loss_mask"][:n])
        assert ref["loss_mask"][:n].sum() > 0
    with_image = [b for b in rows if (b["input_ids"] < 0).any()]
    assert len(with_image) == 3 and all(b["pixel_values"][0, 0].any() for b in with_image)


def test_pipeline_lays_out_minigpt4_stage2_as_minigpt4(tmp_path, tokenizer_dir):
    """MiniGPT-4's stage-2 data (cc_sbu_align's filter_cap.json, images {image_id}.jpg) through
    the data pipeline with its recipe's template: each row is `samples.caption` of its pair,
    and its image is the train transform of the file."""
    from PIL import Image
    from owl_jax.data.pipeline import make_train_iterator
    from owl_jax.families.minigpt4 import samples
    from owl_jax.tokenizer import OwlTokenizer
    os.makedirs(tmp_path / "image")
    caps = {2: "A red square on a white background.", 5: "Two blue circles.",
            7: "A green triangle next to a yellow star."}
    for i in caps:
        Image.new("RGB", (40 + i, 36), (30 * i, 200, 90)).save(tmp_path / "image" / f"{i}.jpg")
    (tmp_path / "filter_cap.json").write_text(json.dumps(
        {"annotations": [{"image_id": str(i), "caption": c} for i, c in caps.items()]}))
    cfg = families.get("minigpt4").tiny(vocab_size=384)
    tok = OwlTokenizer.from_dir(tokenizer_dir)
    spec = f"coco:{tmp_path}/filter_cap.json?images={tmp_path}/image"
    it = make_train_iterator(dict(sources=[dict(spec=spec, task="caption")], seq_len=120,
                                  batch_size=1, packing=False, max_images_per_row=1, workers=0,
                                  threads=1, num_epochs=1, seed=0, augment=True,
                                  template="minigpt4_align"), tok, cfg, 0, 1)
    rows = list(it)
    want = {tuple(samples.caption(tok, c, 120, cfg.image_tokens,
                                  template="minigpt4_align")[0]["input_ids"][:-1]): c
            for c in caps.values()}
    assert len(rows) == 3
    seen = set()
    for b in rows:
        n = int(b["segment_ids"][0].sum())
        key = tuple(b["input_ids"][0, :n].tolist())
        assert key in want
        seen.add(want[key])
        assert b["loss_mask"][0, :n].sum() > 0 and b["pixel_values"][0, 0].any()
    assert seen == set(caps.values())


@pytest.mark.parametrize("name", ["llava", "minigpt4"])
def test_owl_generate_answers_with_a_checkpoint_of_the_family(name, tmp_path, tokenizer_dir):
    import io
    from owl_jax.cli.generate import main
    from PIL import Image
    cfg = families.get(name).tiny(vocab_size=384)
    save_checkpoint(str(tmp_path / "ckpt"), random_params(cfg, seed=2), cfg,
                    tokenizer_dir=tokenizer_dir)
    Image.new("RGB", (40, 30), (200, 30, 30)).save(tmp_path / "a.png")
    owl = owl_jax.load_pretrained(str(tmp_path / "ckpt"), compiler_options=FAST)
    want = owl.generate(owl.family.build_prompt("What is it?", 1), [str(tmp_path / "a.png")],
                        max_new_tokens=5).text
    out = io.StringIO()
    assert main(["--ckpt", str(tmp_path / "ckpt"), "--image", str(tmp_path / "a.png"),
                 "--prompt", "What is it?", "--max_new_tokens", "5"], stdout=out) == 0
    assert out.getvalue() == want + "\n"


# How each family's chat prompt starts and ends.
PROMPT_ENDS = {"llava": ("A chat between", "ASSISTANT:"),
               "minigpt4": ("Give the following image: <Img>ImageContent</Img>.",
                            "###Assistant:")}


@pytest.mark.parametrize("name", ["llava", "minigpt4"])
def test_owl_eval_asks_in_the_family_template(name, tmp_path, tokenizer_dir):
    """owl-eval's loop with a LLaVA / MiniGPT-4 checkpoint: every question goes out in the
    family's template."""
    from owl_jax.eval import run, tfds_builders
    from owl_jax.testing import shards
    shards.write_coco(str(tmp_path / "coco"), n_images=8, karpathy=True, missing_images=0)
    tfds_builders.prepare("coco_caption", str(tmp_path / "coco"), str(tmp_path / "tfds"))
    source = tfds_builders.load("coco_caption", "test", str(tmp_path / "tfds"))
    cfg = families.get(name).tiny(vocab_size=384)
    save_checkpoint(str(tmp_path / "ckpt"), random_params(cfg, seed=4), cfg,
                    tokenizer_dir=tokenizer_dir)
    owl = owl_jax.load_pretrained(str(tmp_path / "ckpt"), compiler_options=FAST)
    asked = []

    class Recording:
        family = owl.family

        def generate(self, prompts, images, **kw):
            asked.extend(prompts)
            return owl.generate(prompts, images, **kw)
    result = run.evaluate(Recording(), "coco_caption", source, batch_size=2, max_new_tokens=3,
                          progress=False)
    assert len(result.rows) == 2 and asked
    start, end = PROMPT_ENDS[name]
    assert all(p.startswith(start) and p.endswith(end) for p in asked)
    assert all(isinstance(r["caption"], str) for r in result.rows)


@pytest.mark.parametrize("name", FAMILIES)
def test_init_from_a_checkpoint_of_the_family(name, tmp_path, tokenizer_dir):
    """A recipe starts from a checkpoint of its family: the weights arrive unchanged, and with
    res= the ViT position table is resized (any family's tower)."""
    from owl_jax import sharding as sh
    from owl_jax.train import optimizer as opt_lib
    from owl_jax.train import state as state_lib
    from owl_jax.train import trainable as tr
    cfg = families.get(name).tiny(vocab_size=384)
    params = random_params(cfg, seed=5)
    save_checkpoint(str(tmp_path), params, cfg, tokenizer_dir=tokenizer_dir)
    recipe = importlib.import_module(f"owl_jax.configs.{RECIPES[name]}")
    for res, resized in ((None, False), (56, True)):
        c = recipe.get_config(f"size=tiny,init={tmp_path}" + (f",res={res}" if res else ""))
        c.model.scan_layers = False
        mcfg = state_lib.model_config(c)
        tx, _ = opt_lib.make_optimizer(c.optimizer, int(c.total_steps))
        layout = state_lib.make_layout(c, state_lib.build_model(c, mcfg), mcfg, tx,
                                       sh.make_mesh(1, 1, 1, devices=jax.devices()[:1]),
                                       sh.rules_from_config(c.sharding_rules))
        state, report = state_lib.init_from_export(layout, str(tmp_path), 0)
        assert ("to model.image_size=56 px" in report["resized"]) if resized else \
            report["resized"] == ""
        got = tr.flatten(jax.device_get(state_lib.host_params_unrolled(state)))
        for k, v in tr.flatten(params).items():
            if not resized or "position_embedding" not in k:
                np.testing.assert_array_equal(np.asarray(got[k], np.float32), v, err_msg=k)


@pytest.mark.slow
def test_llava_trains_the_same_on_a_2x2x2_mesh(tmp_path):
    """The LLaVA tiny recipe (dropout on, synthetic data) through the real CLI on one device and
    on 8 CPU devices as mesh data 2 x fsdp 2 x tensor 2: the same loss at every step (Owl's
    runs, with several processes and restores: tests/test_train_distributed.py)."""
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    runs = {}
    for name, mesh, devices in (("one", (1, 1, 1), 1), ("mesh", (2, 2, 2), 8)):
        env = dict(os.environ, JAX_PLATFORMS="cpu",
                   XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
        cmd = [sys.executable, "-m", "owl_jax.cli.train", "--config",
               f"{root}/configs/llava/stage1.py:size=tiny,steps=3",
               f"--config.mesh.data={mesh[0]}", f"--config.mesh.fsdp={mesh[1]}",
               f"--config.mesh.tensor={mesh[2]}", "--config.eval_data.kind=none",
               "--config.eval_every=0", "--config.num_samples=0",
               "--config.export_at_end=false", "--workdir", str(tmp_path / name)]
        runs[name] = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True)
    loss, logs = {}, {}
    for name, p in runs.items():
        out = logs[name] = p.communicate(timeout=600)[0]
        assert p.returncode == 0, out[-3000:]
        with open(tmp_path / name / "metrics.jsonl") as f:
            loss[name] = {d["step"]: d["loss"] for d in map(json.loads, f)
                          if d["split"] == "train"}
    assert "holding 8/8 devices" in logs["mesh"]
    assert "mesh {'data': 2, 'fsdp': 2, 'tensor': 2}" in logs["mesh"]
    assert sorted(loss["one"]) == [1, 2, 3]
    for step, value in loss["one"].items():
        assert loss["mesh"][step] == pytest.approx(value, rel=1e-5), step
