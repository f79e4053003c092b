"""The Python API: `owl_jax.load_pretrained(path)` -> an object that prepares inputs as the
official processor does, computes logits, and generates.

    owl = owl_jax.load_pretrained("ckpt/", dtype="bfloat16")
    prompt = build_prompt("What is in the image?", n_images=1)
    out = owl.generate(prompt, [Image.open("cat.jpg")], max_new_tokens=64)
    print(out.text)                                  # one prompt -> one Generation
    outs = owl.generate([p1, p2], [[img1], [img2, img3]], temperature=0.7, top_p=0.9)  # a list
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from owl_jax import checkpoint as ckpt_lib
from owl_jax import families
from owl_jax.families.batching import IMAGE_TOKEN, encode_rows
from owl_jax.generate import Generation, GenerationConfig, Generator

_DTYPES = {"float32": jnp.float32, "fp32": jnp.float32, "bfloat16": jnp.bfloat16,
           "bf16": jnp.bfloat16, "float16": jnp.float16, "fp16": jnp.float16}


def as_dtype(dtype):
    if dtype is None:
        return None
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(_DTYPES)}")
        return jnp.dtype(_DTYPES[dtype])
    return jnp.dtype(dtype)


def merge_lora(params, rank: int, alpha: float):
    """Folds unmerged adapters into their kernels: W + (alpha / rank) * A @ B (in fp32)."""
    scale = alpha / rank

    def walk(node):
        if not isinstance(node, Mapping):
            return node
        node = {k: walk(v) for k, v in node.items()}
        if "lora_a" in node and "lora_b" in node and "kernel" in node:
            k = node["kernel"]
            merged = (np.asarray(k, np.float32) + scale * np.asarray(node["lora_a"], np.float32)
                      @ np.asarray(node["lora_b"], np.float32))
            node = {n: v for n, v in node.items() if n not in ("lora_a", "lora_b")}
            node["kernel"] = merged.astype(np.asarray(k).dtype)
        return node
    return walk(params)


class OwlPipeline:
    """A loaded model of any family: `.config`, `.family`, `.params`, `.tokenizer`,
    `.processor`, and `.prepare` / `.logits` / `.generate`."""

    def __init__(self, config, params, tokenizer,
                 dtype=jnp.float32, mesh=None, stream_chunk: int = 8,
                 compiler_options: dict | None = None):
        self.config = config
        self.family = families.of_config(config)
        self.params = params
        self.tokenizer = tokenizer
        self.dtype = jnp.dtype(dtype)
        self.mesh = mesh
        self.processor = (self.family.processor(tokenizer, config) if tokenizer is not None
                          else None)
        self.generator = Generator(config, params, dtype=self.dtype, mesh=mesh,
                                   stream_chunk=stream_chunk, compiler_options=compiler_options)
        model = self.family.model(config, dtype=self.dtype, param_dtype=self.dtype)

        def forward(params, ids, mask, pixel_values):
            logits = model.apply({"params": params}, ids, pixel_values, segment_ids=mask)
            return logits.astype(jnp.float32)
        self._forward = jax.jit(forward, compiler_options=compiler_options or None)

    def _need_tokenizer(self):
        if self.tokenizer is None:
            raise ValueError("this checkpoint has no tokenizer (tokenizer.model, or "
                             "tokenizer.json for Qwen2-based families): pass a directory that "
                             "holds one (owl-generate --tokenizer DIR, load_pretrained(..., "
                             "tokenizer=DIR)) or copy the tokenizer files into the checkpoint")

    # ---------------------------------------------------------------------------------------

    def prepare(self, prompts: str | Sequence[str], images=None) -> dict:
        """Model inputs exactly as the official processor builds them: input_ids [B, L] int32
        (BOS, chunk-wise text ids, -1 x (Q+1) per `<image>`, right-padded with EOS),
        attention_mask [B, L], pixel_values [N, H, W, 3] (all images in order)."""
        self._need_tokenizer()
        if isinstance(prompts, str):
            prompts = [prompts]
            images = [_image_list(images)]
        return self.processor(list(prompts), images)

    def logits(self, batch: Mapping[str, Any]) -> np.ndarray:
        """fp32 numpy logits [B, L, V] of a `prepare` batch (padding positions hold junk)."""
        ids = np.asarray(batch["input_ids"], np.int32)
        mask = np.asarray(batch.get("attention_mask", np.ones_like(ids)), np.int32)
        px = batch.get("pixel_values")
        if px is not None and len(px) == 0:
            px = None
        n_slots = int((ids < 0).sum())
        n_img = 0 if px is None else len(px)
        if n_slots != n_img * self.config.image_tokens:
            raise ValueError(f"input_ids reserve {n_slots} image slots but {n_img} images were "
                             f"given ({self.config.image_tokens} slots each)")
        if px is not None:
            px = np.asarray(px, np.float32)
        with jax.default_matmul_precision(self.generator.matmul_precision):  # fp32: no TF32
            return np.asarray(self._forward(self.params, ids, mask, px))

    def generate(self, prompts: str | Sequence[str], images=None, *,
                 max_new_tokens: int = 256, temperature: float = 0.0, top_k: int = 0,
                 top_p: float = 1.0, repetition_penalty: float = 1.0,
                 no_repeat_ngram_size: int = 0, num_beams: int = 1,
                 length_penalty: float = 1.0, early_stopping: bool = True, seed: int = 0,
                 penalize_prompt: bool = True,
                 eos_token_id: int | tuple[int, ...] | None = None,
                 prompt_lookup_num_tokens: int = 0, self_draft_tokens: int = 4,
                 stream: Callable | None = None) -> Generation | list[Generation]:
        """Generates for one prompt (returns one Generation) or a list of prompts with a list of
        image lists (returns a list). Prompts are used verbatim: wrap questions with the family's
        template (`owl.family.build_prompt(question, n_images)`). temperature 0 = greedy.
        Options are HF generate's (see `owl_jax.generate.GenerationConfig`); penalize_prompt=False
        applies repetition_penalty / no_repeat_ngram_size to [BOS] + new tokens only, as the
        official mPLUG-Owl generate does. prompt_lookup_num_tokens > 0: greedy decoding of one
        prompt checks drafts copied from the prompt (`generate.cpu.lookup`): the same answer,
        faster where it quotes the prompt or repeats itself. self_draft_tokens: greedy decoding of one
        prompt on CPU drafts up to this many tokens with an int8 copy of the LLM and checks them
        in one fp32 pass (`generate.cpu.self_draft`): the same answer, in fewer passes; 0: one pass
        per token.

        stream(text_so_far) (or stream(list_of_texts) for a list of prompts) is called as the
        answer grows, every `stream_chunk` tokens.

        A family whose chat ends answers with a marker (its processor's `stop_text`: MiniGPT-4's
        "###") gets `text` cut before the first one, as its own chat does; `token_ids` stay
        whole.
        """
        self._need_tokenizer()
        single = isinstance(prompts, str)
        if single:
            prompts, images = [prompts], [_image_list(images)]
        prompts = list(prompts)
        if hasattr(self.processor, "encode_batch"):  # media that expand the prompt (Owl3)
            rows, pixels = self.processor.encode_batch(prompts, images)
        else:
            rows, pixels = encode_rows(prompts, images, self.processor.encode,
                                       self.processor.image, _image_list,
                                       getattr(self.processor, "image_marker", IMAGE_TOKEN))
        px = np.stack(pixels) if pixels else None
        config = GenerationConfig(
            max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
            repetition_penalty=repetition_penalty, no_repeat_ngram_size=no_repeat_ngram_size,
            num_beams=num_beams, length_penalty=length_penalty, early_stopping=early_stopping,
            seed=seed, penalize_prompt=penalize_prompt, eos_token_id=eos_token_id,
            prompt_lookup_num_tokens=prompt_lookup_num_tokens, self_draft_tokens=self_draft_tokens)
        on_tokens = None
        if stream is not None:
            def on_tokens(tokens):
                texts = [self.tokenizer.decode(t) for t in tokens]
                stream(texts[0] if single else texts)
        out = self.generator.generate(rows, px, config, stream=on_tokens)
        stop = getattr(self.processor, "stop_text", None)  # e.g. MiniGPT-4's "###"
        for g in out:
            g.text = self.tokenizer.decode(g.token_ids)
            if stop and stop in g.text:
                g.text = g.text[:g.text.index(stop)]
        return out[0] if single else out


def _image_list(images) -> list:
    if images is None:
        return []
    if isinstance(images, (list, tuple)):
        return list(images)
    return [images]  # one image (PIL, array, path or bytes)


def load_pretrained(path: str, dtype=None, mesh=None, tokenizer: str | None = None,
                    stream_chunk: int = 8, rules=None,
                    compiler_options: dict | None = None) -> OwlPipeline:
    """Loads a JAX checkpoint directory (`owl-convert torch-to-jax` output).

    dtype: compute and weight dtype ("bfloat16", "float32", ...); None keeps the stored dtype.
    mesh: a `jax.sharding.Mesh` (e.g. `owl_jax.sharding.make_mesh(tensor=8)`): weights are
      restored straight into their shardings (logical rules `owl_jax.sharding.DEFAULT_RULES`
      unless `rules` is given), for models that do not fit one device.
    tokenizer: a directory with the family's tokenizer files (tokenizer.model; tokenizer.json
      for Qwen2-based families) when the checkpoint has none.
    stream_chunk: tokens per compiled call when streaming (see docs/inference.md).
    compiler_options: XLA options for every compile (e.g. {"xla_backend_optimization_level": 0}
      for tiny models, where compile time dominates).
    """
    from owl_jax import sharding as sh
    dtype = as_dtype(dtype)
    meta = ckpt_lib.load_meta(path)
    lora = meta.get("lora")
    shardings = None
    if mesh is not None and not lora:
        shardings = _param_shardings(ckpt_lib.load_config(path), mesh, rules or sh.DEFAULT_RULES)
    cfg, params, meta = ckpt_lib.load_checkpoint(path, dtype=dtype, shardings=shardings)
    if lora:
        params = merge_lora(params, int(lora["rank"]), float(lora["alpha"]))
        if mesh is not None:
            params = sh.shard_params(params, _param_shardings(cfg, mesh, rules or sh.DEFAULT_RULES))
    if mesh is None:
        params = jax.tree.map(jnp.asarray, params)
    if dtype is None:
        kinds = {jnp.dtype(x.dtype) for x in jax.tree.leaves(params)}
        dtype = kinds.pop() if len(kinds) == 1 else jnp.dtype(jnp.float32)
    try:
        tok = families.of_config(cfg).load_tokenizer(tokenizer or path)
    except FileNotFoundError:
        if tokenizer is not None:
            raise
        tok = None
    return OwlPipeline(cfg, params, tok, dtype=dtype, mesh=mesh, stream_chunk=stream_chunk,
                       compiler_options=compiler_options)


def _param_shardings(cfg, mesh, rules):
    from owl_jax import sharding as sh
    family = families.of_config(cfg)
    abstract = jax.eval_shape(
        lambda: family.model(cfg).init(jax.random.key(0), *family.dummy_inputs(cfg)))["params"]
    return sh.param_shardings(abstract, mesh, rules)
