"""The trainer: `train(config, workdir) -> final metrics`. One file, in the order things happen.

    1. processes and logging      jax.distributed (multi-process), banner
    2. mesh and rules             ('data', 'fsdp', 'tensor') sized by config.mesh
    3. model, optimizer, layout   abstract state + target shardings (no memory yet)
    4. input pipelines            per-process iterators (grain pipeline or synthetic)
    5. state                      resume the latest checkpoint, else init_from, else random
    6. compiled steps             train step (donated state, explicit shardings), eval step
    7. observability              TensorBoard + metrics.jsonl + tqdm, tokens/s, MFU
    8. preemption                 SIGTERM -> save at the next step boundary, exit cleanly
    9. the loop
   10. the end                    wait for checkpoints, export WORKDIR/export

Callable from Python (the demo does) and from `owl-train` (owl_jax/cli/train.py).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import signal
import time

import flax.linen as nn
import jax
import numpy as np

from owl_jax import sharding as sh
from owl_jax.train import checkpointing as ckpt_lib
from owl_jax.train import distributed, evaluation
from owl_jax.train import flops as flops_lib
from owl_jax.train import metrics as metrics_lib
from owl_jax.train import optimizer as opt_lib
from owl_jax.train import state as state_lib
from owl_jax.train import step as step_lib
from owl_jax.train import trainable as tr
from owl_jax.train.synthetic import SyntheticBatches

log = logging.getLogger("owl_jax.train")


# --------------------------------------------------------------------------------------------
# Input pipelines


def make_iterator(data_cfg, config, cfg, tokenizer, salt: int = 0):
    """This process's batch iterator (next / get_state / set_state), or None for kind 'none'."""
    kind = data_cfg.get("kind", "pipeline")
    pi, pc = jax.process_index(), jax.process_count()
    b = config.batch
    if b.global_size % pc:
        raise ValueError(f"batch.global_size={b.global_size} does not split over {pc} processes")
    if kind == "none":
        return None
    if kind == "synthetic":
        return SyntheticBatches(
            num_examples=int(data_cfg.num_examples), global_batch=int(b.global_size),
            seq_len=int(b.seq_len), image_size=cfg.vision.image_size,
            image_tokens=cfg.image_tokens, vocab_size=cfg.text.vocab_size,
            text_len=int(data_cfg.get("text_len", 16)),
            max_images_per_row=int(b.max_images_per_row), seed=int(config.seed) + salt,
            process_index=pi, process_count=pc, mean=cfg.image_mean, std=cfg.image_std)
    if kind == "pipeline":
        from owl_jax.data import pipeline
        if tokenizer is None:
            raise ValueError("data.kind='pipeline' needs a tokenizer: the recipe arg "
                             "tokenizer=DIR (--config.tokenizer_dir), or an init= / init_from "
                             "directory that holds tokenizer.model")
        if tokenizer.vocab_size > cfg.text.vocab_size:
            raise ValueError(f"the tokenizer {tokenizer.model_file} has {tokenizer.vocab_size} "
                             f"tokens, the model's vocab {cfg.text.vocab_size}: train from a "
                             f"checkpoint made for it (init=DIR), or for a fresh tiny model set "
                             f"--config.model.vocab_size={tokenizer.vocab_size}")
        block = data_cfg.to_dict()
        block.pop("kind", None)
        block.update(seq_len=int(b.seq_len), batch_size=int(b.global_size) // pc,
                     max_images_per_row=int(b.max_images_per_row))
        block["seed"] = int(block.get("seed", 0)) + int(config.seed) + salt
        return pipeline.make_train_iterator(block, tokenizer, cfg, pi, pc)
    raise ValueError(f"data.kind={kind!r}: expected pipeline, synthetic or none")


def model_batch(batch: dict) -> dict:
    missing = [k for k in step_lib.BATCH_KEYS if k not in batch]
    if missing:
        raise ValueError(f"input batch lacks {missing} (has {sorted(batch)})")
    return {k: batch[k] for k in step_lib.BATCH_KEYS}


def check_batch(batch: dict, config, cfg) -> None:
    b, pc = config.batch, jax.process_count()
    want = {"input_ids": (b.global_size // pc, b.seq_len),
            "pixel_values": (b.global_size // pc, b.max_images_per_row, cfg.vision.image_size,
                             cfg.vision.image_size, 3)}
    for k, shape in want.items():
        if tuple(batch[k].shape) != tuple(shape):
            raise ValueError(f"input batch {k} has shape {batch[k].shape}, the config implies "
                             f"{shape} (batch.global_size / processes, seq_len, "
                             f"max_images_per_row, image size)")


def row_digests(batch: dict) -> list:
    """Per-row identity for debugging data order: example ids when the source gives them,
    else a short hash of the row's tokens."""
    if "example_id" in batch:
        return [int(x) for x in np.asarray(batch["example_id"]).reshape(-1)]
    return [hashlib.sha1(np.ascontiguousarray(r).tobytes()).hexdigest()[:12]
            for r in batch["input_ids"]]


# --------------------------------------------------------------------------------------------
# Preemption


class Preemption:
    """SIGTERM sets a flag; the loop saves and stops at the next step boundary. With several
    processes the flag is OR-ed across them so that all stop at the same step."""

    def __init__(self):
        self.flag = False
        self._old = None

    def __enter__(self):
        try:
            self._old = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread: no handler, never preempted
            self._old = None
        return self

    def _handle(self, signum, frame):
        self.flag = True

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)

    def requested(self) -> bool:
        if jax.process_count() == 1:
            return self.flag
        from jax.experimental import multihost_utils
        return bool(np.any(multihost_utils.process_allgather(np.array([self.flag]))))


# --------------------------------------------------------------------------------------------
# The trainer


def train(config, workdir: str) -> dict:
    """Trains per `config` in `workdir` (resuming from its latest checkpoint). Returns the last
    logged train metrics plus {'step', 'preempted', 'export_dir', 'eval_loss'?}."""
    # 1. processes and logging ----------------------------------------------------------------
    distributed.initialize()
    os.makedirs(workdir, exist_ok=True)
    primary = jax.process_index() == 0
    if primary:
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config.to_json_best_effort(indent=1))

    # 2. mesh and rules -------------------------------------------------------------------------
    mesh = sh.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
    rules = sh.rules_from_config(config.sharding_rules)

    # 3. model, optimizer, layout ---------------------------------------------------------------
    cfg = state_lib.model_config(config)
    model = state_lib.build_model(config, cfg)
    tx, schedule = opt_lib.make_optimizer(config.optimizer, int(config.total_steps))
    layout = state_lib.make_layout(config, model, cfg, tx, mesh, rules)
    _check_divisibility(config, mesh)

    # 4. input pipelines ------------------------------------------------------------------------
    tokenizer = state_lib.load_tokenizer(config)
    train_it = make_iterator(config.data, config, cfg, tokenizer)
    if train_it is None:
        raise ValueError("data.kind='none': nothing to train on")

    # 5. state ----------------------------------------------------------------------------------
    ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"),
                                 keep=int(config.checkpoint.keep),
                                 async_save=bool(config.checkpoint.async_save))
    start = ckpt.latest_step()
    notes = []
    total = int(config.total_steps)
    writer = metrics_lib.MetricWriter(workdir, total, initial_step=start or 0)
    writer.log(f"owl-train: {distributed.describe()}; mesh {dict(mesh.shape)}")
    writer.log(f"owl-train: {tr.summary(layout.abstract.trainable, layout.abstract.frozen)}")
    if start is not None:
        state, data_state, saved_config = ckpt.restore(start, layout.abstract)
        train_it.set_state(data_state)
        notes.append(f"resumed from checkpoint step {start}")
        for line in config_changes(saved_config, ckpt_lib.config_to_dict(config)):
            writer.log(f"owl-train: resuming with a changed config: {line}")
    elif config.init_from:
        state, report = state_lib.init_from_export(layout, config.init_from, int(config.seed))
        notes.append(f"weights from {config.init_from}: {report['loaded']} loaded, "
                     f"{len(report['initialised'])} initialised "
                     f"{report['initialised'][:4]}{'...' if len(report['initialised']) > 4 else ''}"
                     + (f"; {report['resized']}" if report["resized"] else ""))
    else:
        state = state_lib.init_fresh(layout, int(config.seed))
        notes.append("random init")
    step = int(jax.device_get(state.step))
    if step >= total:
        writer.log(f"owl-train: nothing to do: the checkpoint in {workdir} is at step {step} "
                   f"and total_steps is {total} (raise --config.total_steps to train on)")
        for closing in (ckpt.close, writer.close, getattr(train_it, "close", lambda: None)):
            closing()
        export_dir = os.path.join(workdir, "export")
        return {"step": step, "preempted": False, "nothing_to_do": True,
                "export_dir": export_dir if os.path.isdir(export_dir) else None}

    # 6. compiled steps -------------------------------------------------------------------------
    sources = [s.get("spec") for s in config.data.get("sources", ())] or [config.data.kind]
    writer.log(f"owl-train: {'; '.join(notes)}; step {step}/{total}; reading the first batch "
               f"({', '.join(map(str, sources))})")
    first = next(train_it)
    first_state = train_it.get_state()
    check_batch(first, config, cfg)
    mb = model_batch(first)
    rule_ctx = lambda: _contexts(mesh, rules)  # noqa: E731
    with rule_ctx():  # compiled ahead of time: its memory is logged below
        train_step = step_lib.jit_train_step(layout, config, schedule, mb).lower(
            state, sh.global_batch(mb, mesh, rules)).compile()
    eval_fn = evaluation.make_eval_fn(layout, mb)
    # Everyone has compiled before the first collective runs (slow compilers would otherwise
    # hit collective timeouts on loaded hosts).
    distributed.barrier("owl_train_step_compiled")

    # 7. observability --------------------------------------------------------------------------
    fl = flops_lib.train_flops_per_step(
        cfg, global_batch=int(config.batch.global_size), seq_len=int(config.batch.seq_len),
        images_per_row=int(config.batch.max_images_per_row),
        trainable=tr.paths(layout.abstract.trainable),
        lora_rank=int(config.lora.rank), lora_targets=tuple(config.lora.targets))
    peak = float(config.peak_tflops) or flops_lib.peak_tflops(jax.devices()[0].device_kind)
    tokens_per_step = int(config.batch.global_size) * int(config.batch.seq_len)
    meter = metrics_lib.Throughput(tokens_per_step, fl["total"], jax.device_count(), peak)
    mem = train_step.memory_analysis()
    if mem is not None:
        gib = 2.0 ** 30
        writer.log(f"owl-train: step memory per device: arguments "
                   f"{mem.argument_size_in_bytes / gib:.3g} GiB, temporaries "
                   f"{mem.temp_size_in_bytes / gib:.3g} GiB")
    parts = ", ".join(f"{k} {v / 1e12:.3g}" for k, v in fl.items() if k != "total")
    writer.log(f"owl-train: analytic {fl['total'] / 1e12:.4g} TFLOP/step ({parts})")

    # 8.-9. preemption and the loop -------------------------------------------------------------
    cfg_dict = ckpt_lib.config_to_dict(config)
    last, eval_out, preempted, saved = {}, {}, False, start
    pending = (first, first_state)
    every = int(config.checkpoint.every_steps)
    with Preemption() as pre:
        while step < total:
            if pending:
                (batch, data_state), pending = pending, None
            else:  # the iterator state right after this batch is what a checkpoint stores
                batch = next(train_it)
                data_state = train_it.get_state()
            with rule_ctx():
                gb = sh.global_batch(model_batch(batch), mesh, rules)
                state, m = train_step(state, gb)
            step += 1
            if config.debug.sleep_after_step:  # debugging aid: makes preemption easy to time
                jax.block_until_ready(m)
                time.sleep(float(config.debug.sleep_after_step))
            meter.tick()
            writer.advance()
            if step % int(config.log_every) == 0 or step == total:
                last = {k: float(v) for k, v in jax.device_get(m).items()}
                if not math.isfinite(last["loss"]):
                    writer.log(f"step {step}: loss is {last['loss']}")
                last.update(meter.read())
                if config.debug.log_row_digests:
                    last["rows"] = row_digests(batch)
                writer.scalars(step, last)
            if (every and step % every == 0) or step == total:
                ckpt.save(step, state, data_state, cfg_dict)
                saved = step
            if config.eval_every and step % int(config.eval_every) == 0 and step < total:
                distributed.barrier(f"owl_train_eval_{step}")
                eval_out = _evaluate(config, cfg, layout, state, eval_fn, tokenizer, mesh,
                                     rules, writer, step)
            if step < total and pre.requested():
                if saved != step:
                    ckpt.save(step, state, data_state, cfg_dict)
                ckpt.wait()
                writer.log(f"owl-train: SIGTERM: saved step {step}, stopping")
                preempted = True
                break

    # 10. the end -------------------------------------------------------------------------------
    ckpt.wait()
    export_dir = None
    if not preempted:
        if config.eval_data.get("kind", "none") != "none":
            distributed.barrier(f"owl_train_eval_{step}")
            eval_out = _evaluate(config, cfg, layout, state, eval_fn, tokenizer, mesh, rules,
                                 writer, step)
        if config.export_at_end:
            export_dir = os.path.join(workdir, "export")
            tok_dir = tokenizer and os.path.dirname(tokenizer.model_file)
            ckpt_lib.export(export_dir, state, layout, config, tokenizer_dir=tok_dir)
            writer.log(f"owl-train: exported {export_dir}" + (
                f" with the tokenizer of {tok_dir}" if tok_dir else
                " without a tokenizer (none configured: set tokenizer_dir, or give owl-generate "
                "--tokenizer DIR)"))
    ckpt.close()
    writer.close()
    if hasattr(train_it, "close"):
        train_it.close()
    return {**last, "step": step, "preempted": preempted, "export_dir": export_dir,
            **{f"eval_{k}": v for k, v in eval_out.items() if k in ("loss", "tokens")}}


# Config fields whose change on a resume alters the run (schedule, batch, data, what trains).
_WATCHED = ("total_steps", "optimizer", "batch", "trainable", "lora", "data", "seed", "model")


def config_changes(saved: dict | None, now: dict) -> list[str]:
    """'field: old -> new' for every watched field that differs between the config a
    checkpoint was saved with and this run's."""
    if not saved:
        return []

    def flat(d, prefix=""):
        out = {}
        for k, v in d.items():
            if isinstance(v, dict):
                out.update(flat(v, f"{prefix}{k}."))
            else:
                out[prefix + k] = v
        return out
    a, b = flat(saved), flat(now)
    keys = sorted(k for k in set(a) | set(b) if k.split(".")[0] in _WATCHED)
    return [f"{k}: {a.get(k, '(unset)')!r} -> {b.get(k, '(unset)')!r}"
            for k in keys if a.get(k) != b.get(k)]


@contextlib.contextmanager
def _contexts(mesh, rules):
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        yield


def _check_divisibility(config, mesh) -> None:
    shape = dict(mesh.shape)
    rows = int(config.batch.global_size) // int(config.batch.micro_batches)
    if int(config.batch.global_size) % int(config.batch.micro_batches):
        raise ValueError(f"batch.global_size={config.batch.global_size} is not a multiple of "
                         f"batch.micro_batches={config.batch.micro_batches}")
    data_ways = shape["data"] * shape["fsdp"]
    if rows % data_ways:
        raise ValueError(f"a micro batch of {rows} rows does not split over the "
                         f"{data_ways} data-parallel devices (mesh data x fsdp)")


def _evaluate(config, cfg, layout, state, eval_fn, tokenizer, mesh, rules, writer, step):
    it = make_iterator(config.eval_data, config, cfg, tokenizer, salt=1_000_003)
    if it is None:
        return {}
    batches = [model_batch(next(it)) for _ in range(int(config.eval_batches))]
    if hasattr(it, "close"):
        it.close()
    with _contexts(mesh, rules):
        out = evaluation.held_out_loss(eval_fn, state, batches, mesh, rules)
    writer.scalars(step, out, split="eval")
    writer.log(f"eval @ {step}: loss {out['loss']:.4f} over {int(out['tokens'])} tokens")
    if config.num_samples:
        with jax.set_mesh(mesh):  # no logical rules: decoding uses tiny batch shapes
            gb = sh.global_batch(batches[0], mesh, rules)
            text = evaluation.generate_samples(layout, state, gb, int(config.num_samples),
                                               int(config.sample_tokens), tokenizer)
        writer.text(step, "samples", text)
    return out


def read_metrics(workdir: str, split: str = "train") -> dict[int, dict]:
    """{step: metrics} from WORKDIR/metrics.jsonl; a step logged twice (after a resume) keeps
    the later line."""
    out = {}
    path = os.path.join(workdir, "metrics.jsonl")
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                d = json.loads(line)
                if d.get("split") == split:
                    out[int(d["step"])] = d
    return out


__all__ = ["train", "read_metrics", "make_iterator"]
