"""The training input pipeline (grain), one per JAX process.

    it = make_train_iterator(config, tokenizer, owl_cfg, process_index=None, process_count=None)
    batch = next(it)        # the training batch: numpy input_ids, targets, loss_mask,
                            # segment_ids, positions [B, L]; pixel_values uint8 [B, M, S, S, 3]
                            # (the train step normalizes them: images.normalize_pixels)
    state = it.get_state()  # JSON-able; a fresh iterator + set_state(state) continues exactly
    it.dropped              # Counter: reason -> samples dropped on this process so far
    it.close()              # stops worker processes

`config` is an ml_collections ConfigDict (or dict) holding a `data` block, or the block itself.
Its fields (defaults in `default_config()`):
  sources            list of {spec, weight=1.0, task, prompt="", filters={}}:
                     spec: a source spec (spec.py; arrayrecord / webdataset / coco / instruct);
                     task: "caption" (stage 1 pairs), "instruction" (stage 2 conversations,
                     the default for instruct: specs) or "text" (the sample's text, every token
                     trained); prompt: caption task text before the image; filters: thresholds
                     of filters.py (min_similarity, min_clip_similarity, min_aesthetic, ...).
  seq_len            L: row length; tasks cut samples to it (official max_length)
  batch_size         B: rows per batch on this process
  packing            True: greedy packing of several samples per row; False: one per row
  max_images_per_row M
  augment            True: RandomResizedCrop(S, scale=(0.5, 1), bicubic) + horizontal flip,
                     drawn per sample from (seed, index); False: bicubic resize to S x S
  seed               shuffle and augmentation seed (identical on every process)
  num_epochs         None: repeat forever; n: every source n times, each epoch reshuffled (a
                     mixture ends when its first source runs out)
  workers            decoding processes (grain mp_prefetch); 0 decodes in threads of this one.
                     A saved state only restores with the same number of workers.
  threads            decoding threads per process (grain ReadOptions.num_threads)
  read_buffer        samples each process decodes ahead; worker_buffer: ahead per worker
                     (at least two chunks)
  chunk              consecutive samples per worker message (amortizes the IPC cost)
  shm_min_bytes      other arrays at least this big go from workers through shared memory,
                     smaller ones through the pipe (a chunk's pixels are always one block)
  max_pixels         decompression-bomb limit (None: PIL's MAX_IMAGE_PIXELS)
  template           the family's conversation / caption template ("" = its default; LLaVA:
                     "plain" for stage 1, "vicuna_v1" for stage 2)
  max_consecutive_drops  this many dropped samples in a row (none kept) stop the pipeline with
                     an error naming the reasons and what to change (0: never)
`owl_cfg` is the model config of any family (`owl_jax.families`): the family lays out the
samples and transforms the images (`Family.samples`); S, the image slots and the image mean and
std come from the config (the mean and std are applied on the device by the train step,
`images.normalize_pixels`).

Order of operations, and why: each source is a random-access dataset that is globally
shuffled (Feistel, no memory; a cached permutation below 2**16 samples), cut to a multiple of
process_count and strided so every process reads an equal, disjoint share, repeated
(reshuffled per epoch) (grain_stages.ProcessShare), and mapped sample by sample in two phases
(tokenize; decode + augment with an RNG keyed by (seed, index)); sources are mixed by weight
(grain MapDataset.mix); chunks of consecutive samples are made, phase by phase, in the
workers; then, in this process, dropped samples are counted, samples are packed or padded
into rows, and rows batched. Nothing before the worker
boundary filters, so the sample order does not depend on the number of workers, and a state
is a handful of indices.
"""
from __future__ import annotations

import collections
import logging
from typing import Any

import grain
import numpy as np

from owl_jax import families
from owl_jax.data import images as imgs
from owl_jax.data import grain_stages as stages
from owl_jax.data import tasks
from owl_jax.data.filters import FilterSpec
from owl_jax.data.sources import Checks, random_access
from owl_jax.data.spec import Skipped, SourceError, parse_spec

log = logging.getLogger(__name__)
TASKS = ("caption", "instruction", "text")


def default_config():
    import ml_collections
    return ml_collections.ConfigDict(dict(
        sources=[], seq_len=512, batch_size=8, packing=True, max_images_per_row=4,
        augment=True, seed=0, num_epochs=None, workers=0, threads=2, read_buffer=32,
        worker_buffer=16, chunk=32, shm_min_bytes=1 << 20, max_pixels=None,
        template="", max_consecutive_drops=1000))


def data_config(config) -> dict[str, Any]:
    """The data block of `config` merged over the defaults, as a plain dict."""
    block = config["data"] if _has(config, "data") else config
    block = block.to_dict() if hasattr(block, "to_dict") else dict(block)
    out = default_config().to_dict()
    unknown = sorted(set(block) - set(out))
    if unknown:
        log.warning("data config: ignoring unknown fields %s", unknown)
    out.update({k: v for k, v in block.items() if k in out})
    if not out["sources"]:
        raise ValueError("data config: `sources` is empty")
    out["sources"] = [_source_config(s, i) for i, s in enumerate(out["sources"])]
    return out


def _has(config, key) -> bool:
    try:
        return key in config
    except TypeError:
        return False


def _source_config(s, i) -> dict[str, Any]:
    s = s.to_dict() if hasattr(s, "to_dict") else dict(s)
    if "spec" not in s:
        raise ValueError(f"data config: sources[{i}] has no `spec`")
    kind = parse_spec(s["spec"]).kind
    out = {"weight": 1.0, "task": "instruction" if kind == "instruct" else "caption",
           "prompt": "", "filters": {}, **s}
    if out["task"] not in TASKS:
        raise ValueError(f"data config: sources[{i}].task {out['task']!r} not in {TASKS}")
    if (kind == "instruct") != (out["task"] == "instruction"):
        raise ValueError(f"data config: sources[{i}]: task 'instruction' goes with instruct: "
                         f"specs only, got task {out['task']!r} for {s['spec']}")
    FilterSpec.from_kwargs(**out["filters"])  # names checked now, not in a worker
    return out


class SampleMaker:
    """Stored sample -> tokenized sample with uint8 images, or {"drop": reason}, in two
    phases that run in the decoding workers: `prepare` (checks, filters, tokenization) and
    `finish` (decode, transform). A chunk of samples is prepared before any is finished, so
    the Python work of a chunk runs back to back instead of between image decodes, which
    evict its code and data from the CPU caches (that doubled its cost).
    `rng` is grain's, keyed by (seed, index); None without augmentation."""

    def __init__(self, task: str, tokenizer, owl_cfg, cfg: dict, src: dict):
        self.task, self.tok, self.prompt = task, tokenizer, src["prompt"]
        self.seq_len, self.max_images = cfg["seq_len"], cfg["max_images_per_row"]
        self.model_cfg, self.samples = owl_cfg, families.of_config(owl_cfg).samples
        self.template = cfg["template"]
        self.image_tokens = owl_cfg.image_tokens
        self.size = owl_cfg.vision.image_size
        self.augment = cfg["augment"]
        self.checks = Checks(FilterSpec.from_kwargs(**src["filters"]), task != "instruction",
                             cfg["max_pixels"])

    @property
    def uses_rng(self) -> bool:
        return self.augment and self.task != "text"

    def __call__(self, element, rng: np.random.Generator | None = None):
        """Both phases on one stored sample."""
        return self.finish(self.prepare(element), rng)

    def prepare(self, el) -> dict:
        """-> {"drop": reason} or {"sample": tokenized sample, "images": [(kind, source)]}."""
        if isinstance(el, Skipped):
            return {"drop": el.reason}
        if self.task == "instruction":
            sample, reason = self.samples.conversation(self.tok, el, self.seq_len,
                                                       self.image_tokens, self.template)
            images = [("path", p) for p in el.images[:sample["num_images"]]] if sample else []
        else:
            reason = self.checks.check_raw(el)
            if reason and not (self.task == "text" and reason == "missing_image"):
                return {"drop": reason}
            if self.task == "text":
                sample, reason = tasks.text_sample(self.tok, el.text, self.seq_len)
                images = []
            else:
                sample, reason = self.samples.caption(self.tok, el.text, self.seq_len,
                                                      self.image_tokens, self.prompt,
                                                      self.template)
                images = [("raw", el)]
        if sample is None or sample["num_images"] > self.max_images:
            return {"drop": reason or "too_many_images"}
        return {"sample": sample, "images": images}

    def finish(self, prepared: dict, rng: np.random.Generator | None = None) -> dict:
        if "drop" in prepared:
            return prepared
        sample = prepared["sample"]
        try:
            pil = [self.checks.open_image(src)[0] if kind == "raw" else
                   imgs.open_image(imgs.read_image_file(src), self.checks.max_pixels)
                   for kind, src in prepared["images"]]
        except imgs.BadImage as e:
            return {"drop": e.reason}
        # uint8 all the way: 4x less to send from workers, to copy and to send to the device
        if len(pil) == 1:
            sample["pixels"] = self._pixels(pil[0], rng)[None]
        else:
            sample["pixels"] = np.stack([self._pixels(im, rng) for im in pil]) if pil else \
                np.zeros((0, self.size, self.size, 3), np.uint8)
        return sample

    def _pixels(self, img, rng) -> np.ndarray:
        return self.samples.pixels(img, self.model_cfg, self.augment, rng)


# What to change when every sample is dropped, by drop reason (prefix).
_REMEDIES = {
    "prompt_too_long": "samples do not fit a row of seq_len={L} tokens ({T} per image): raise "
                       "the recipe's seq=N (or --config.batch.seq_len)",
    "no_trained_tokens": "the answers are cut off at seq_len={L} tokens ({T} per image): raise "
                         "the recipe's seq=N (or --config.batch.seq_len)",
    "too_many_images": "samples hold more than max_images_per_row={M} images: raise the "
                       "recipe's images=N (or --config.batch.max_images_per_row)",
    "filtered_": "the source's filters reject them: loosen its `filters`",
    "empty_text": "the samples have no text: check the source's caption / conversation field",
    "missing_text": "the samples have no text: check the source's caption / conversation field",
    "missing_file": "image files named by the samples do not exist: check the images= folder "
                    "of the spec",
}


class PipelineStalled(SourceError):
    """Every sample of a long run was dropped: the data and the config do not fit."""


def _stall_error(cfg: dict, image_tokens: int):
    L, M = cfg["seq_len"], cfg["max_images_per_row"]

    def make(run: collections.Counter) -> PipelineStalled:
        reasons = ", ".join(f"{r} x {n}" for r, n in run.most_common())
        fixes = []
        for reason, _ in run.most_common():
            fix = next((v for k, v in _REMEDIES.items() if reason.startswith(k)),
                       "unreadable images: `owl-data stats SPEC` counts them by reason")
            fix = f"{reason}: {fix.format(L=L, M=M, T=image_tokens)}"
            if fix not in fixes:
                fixes.append(fix)
        specs = ", ".join(s["spec"] for s in cfg["sources"])
        return PipelineStalled(
            f"the input pipeline dropped {run.total()} samples in a row and kept none "
            f"({reasons}) reading {specs}. What to change: " + "; ".join(fixes) +
            ". (data.max_consecutive_drops sets this limit.)")
    return make


class TrainIterator(grain.DatasetIterator):
    """Batches of this process. `dropped` counts samples dropped while reading (restored with
    the state); `lost_at_open` what indexing the sources lost (missing shards, cut tars,
    unusable instruction records)."""

    def __init__(self, parent, dropped: collections.Counter, lost: collections.Counter,
                 sizes: dict[str, int]):
        super().__init__(parent)
        self.dropped, self.lost_at_open, self.source_sizes = dropped, lost, sizes

    def __next__(self) -> dict[str, np.ndarray]:
        return next(self._parent)

    def get_state(self):
        return self._parent.get_state()

    def set_state(self, state):
        self._parent.set_state(state)


def _process(process_index, process_count) -> tuple[int, int]:
    if process_index is None or process_count is None:
        import jax
        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    return process_index, process_count


def _seed(seed: int, i: int, salt: int) -> int:
    return int(np.random.SeedSequence([seed, i, salt]).generate_state(1)[0] >> 1)


def _mark_absl_flags_parsed(*_):
    """grain 0.2.18 reads absl flags in workers; with jax installed they are unparsed there
    (google/grain#1355). Also run in each worker (worker_init_fn)."""
    from absl import flags
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def build_sources(cfg, tokenizer, owl_cfg, process_index, process_count):
    """Per-source MapDatasets (shuffled, this process's share, repeated, mapped), weights,
    what indexing lost, and the sizes of this process's shares."""
    parts, weights, sizes = [], [], {}
    lost: collections.Counter = collections.Counter()
    for i, src in enumerate(cfg["sources"]):
        seq, lost_i = random_access(src["spec"])
        lost.update(lost_i)
        share = len(seq) // process_count
        if share == 0:
            raise SourceError(f"{src['spec']}: {len(seq)} samples cannot give each of "
                              f"{process_count} processes one")
        ds = stages.ProcessShare(seq, _seed(cfg["seed"], i, 1), process_index, process_count,
                                 cfg["num_epochs"])
        maker = SampleMaker(src["task"], tokenizer, owl_cfg, cfg, src)
        ds = ds.map(maker.prepare)
        if maker.uses_rng:
            ds = ds.random_map(maker.finish, seed=_seed(cfg["seed"], i, 2))
        else:  # no augmentation: grain's per-sample RNG reset would be wasted work
            ds = ds.map(maker.finish)
        parts.append(ds)
        weights.append(float(src["weight"]))
        sizes[src["spec"]] = share
    return parts, weights, lost, sizes


def make_train_iterator(config, tokenizer, owl_cfg, process_index: int | None = None,
                        process_count: int | None = None) -> TrainIterator:
    """See the module docstring. process_index / process_count default to jax's."""
    cfg = data_config(config)
    pi, pc = _process(process_index, process_count)
    parts, weights, lost, sizes = build_sources(cfg, tokenizer, owl_cfg, pi, pc)
    ds = parts[0] if len(parts) == 1 else grain.MapDataset.mix(parts, weights)
    # Consecutive samples travel in chunks: sending a sample from a worker costs ~0.4 ms of
    # CPU whatever its size (a fifth of decoding it). Chunks of the final sample order are
    # dealt to workers round-robin and unchunked in order, so the stream does not depend on
    # the number of workers.
    chunk = max(1, cfg["chunk"])
    ds = stages.Chunks(ds, chunk)
    prefetch = max(2, cfg["read_buffer"] // chunk)  # more threads than chunks ahead: idle
    it_ds = ds.to_iter_dataset(grain.ReadOptions(
        num_threads=min(cfg["threads"], prefetch), prefetch_buffer_size=prefetch))
    if cfg["workers"] > 0:
        _mark_absl_flags_parsed()
        # a chunk's pixels travel as one array (4.8 MB for 32 images at 224 px) through one
        # shared-memory block; smaller arrays (token ids, masks) are cheaper to pickle
        it_ds = it_ds.map(stages.stack_pixels)
        it_ds = grain.experimental.WithOptionsIterDataset(
            it_ds, grain.experimental.DatasetOptions(min_shm_size=cfg["shm_min_bytes"]))
        # at least two chunks per worker: with one, a worker idles while its chunk waits
        options = grain.MultiprocessingOptions(
            num_workers=cfg["workers"],
            per_worker_buffer_size=max(2, cfg["worker_buffer"] // chunk))
        it_ds = it_ds.mp_prefetch(options, worker_init_fn=_mark_absl_flags_parsed)
    dropped: collections.Counter = collections.Counter()
    L, M, B = cfg["seq_len"], cfg["max_images_per_row"], cfg["batch_size"]
    guard = dict(max_run=cfg["max_consecutive_drops"],
                 stall=_stall_error(cfg, owl_cfg.image_tokens))
    if cfg["packing"]:
        # Packed rows are laid out with image_size 0: their pixel_values are empty
        # placeholders, the real ones are copied into the batch from each row's uint8 `pixels`.
        rows = stages.pack_with_pixels(stages.Samples(it_ds, dropped, **guard), L, M)
        batches = rows.batch(B, drop_remainder=True, batch_fn=stages.BatchRows(owl_cfg, M))
    else:
        batches = stages.Samples(it_ds, dropped, B, stages.BatchSamples(owl_cfg, L, M), **guard)
    return TrainIterator(batches.__iter__(), dropped, lost, sizes)
