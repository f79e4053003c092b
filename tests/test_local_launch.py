"""`launch/local.sh 2` runs the tiny stage-1 recipe to completion: two owl-train processes on
localhost (jax.distributed, gloo CPU collectives, 2 CPU devices each, mesh fsdp=4) train on real
img2dataset webdataset shards through the grain pipeline with a sentencepiece tokenizer, save
checkpoints holding both processes' data-iterator states, log a finite loss (metrics.jsonl and
TensorBoard) and export the final model, which loads back and differs from the initial weights
only in what stage 1 trains (ViT, query tokens, abstractor; the LLM is frozen).
One test: the run is shared and expensive (xdist must not split it).
"""
from __future__ import annotations

import glob
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from owl_jax.testing import shards
from owl_jax.testing.spm import train_tiny_tokenizer

pytestmark = pytest.mark.slow  # starts subprocesses

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS, BATCH, SAMPLES, VOCAB = 3, 8, 32, 512


def _recipe(tmp, spec: str) -> str:
    """tiny_stage1 with a real data block (config_flags cannot set a list of dicts)."""
    path = tmp / "recipe.py"
    path.write_text(
        "import ml_collections\n"
        "from owl_jax.configs.owl1 import tiny_stage1\n"
        "def get_config(arg=None):\n"
        "    c = tiny_stage1.get_config(arg)\n"
        "    c.data = ml_collections.ConfigDict(dict(kind='pipeline', sources=[dict(\n"
        f"        spec={spec!r}, task='caption')], packing=True, augment=True,\n"
        "        workers=0, threads=1, seed=0))\n"
        "    return c\n")
    return str(path)


def test_local_sh_two_processes_train_tiny_stage1(tmp_path):
    wds = shards.write_webdataset(str(tmp_path / "wds"), n_shards=2, per_shard=SAMPLES // 2,
                                  failure_rate=0.0)
    assert len(wds["samples"]) == SAMPLES
    tok_dir = str(tmp_path / "tok")
    train_tiny_tokenizer(tok_dir, vocab_size=VOCAB)
    recipe = _recipe(tmp_path, f"webdataset:{tmp_path}/wds/{{00000..00001}}.tar")
    workdir, logs = tmp_path / "run", tmp_path / "logs"

    env = {k: v for k, v in os.environ.items() if not k.startswith(("OWL_", "XLA_", "JAX_"))}
    env.update(OWL_LOCAL_DEVICES="4", OWL_LOG_DIR=str(logs), PYTHONPATH=ROOT,
               OWL_TRAIN=f"{sys.executable} -m owl_jax.cli.train")
    cmd = ["bash", os.path.join(ROOT, "launch", "local.sh"), "2",
           "--config", f"{recipe}:steps={STEPS},batch={BATCH}", "--workdir", str(workdir),
           f"--config.tokenizer_dir={tok_dir}", f"--config.model.vocab_size={VOCAB}",
           "--config.checkpoint.every_steps=2", "--config.checkpoint.async_save=false",
           "--config.eval_data.kind=none", "--config.eval_every=0", "--config.num_samples=0"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]

    # Both processes ran to the end, each in its own log; process 0 saw the whole job.
    for i in range(2):
        log = (logs / f"process_{i}.log").read_text()
        assert f"owl-train: done at step {STEPS}; loss" in log, log[-2000:]
    log0 = (logs / "process_0.log").read_text()
    assert "process 0/2 holding 2/4 devices" in log0 and "'fsdp': 4" in log0, log0[-2000:]
    assert "random init" in log0 and f"exported {workdir}/export" in log0

    # A finite loss for every step, in metrics.jsonl and in the TensorBoard event file; the
    # first one is that of a near-uniform prediction over the vocabulary.
    lines = [json.loads(s) for s in (workdir / "metrics.jsonl").read_text().splitlines()]
    train = {d["step"]: d for d in lines if d["split"] == "train"}
    assert sorted(train) == list(range(1, STEPS + 1))
    assert all(math.isfinite(d["loss"]) and d["loss"] > 0 for d in train.values())
    assert abs(train[1]["loss"] - math.log(VOCAB)) < 1.0, train[1]
    assert all(d["tokens_per_s"] > 0 for d in train.values())
    events = glob.glob(str(workdir / "tensorboard" / "events.out.tfevents.*"))
    assert events and b"train/loss" in open(events[0], "rb").read()

    # Checkpoints at the planned steps, each with both processes' data-iterator states.
    steps = sorted(int(s) for s in os.listdir(workdir / "checkpoints") if s.isdigit())
    assert steps == [2, STEPS]
    data = os.listdir(workdir / "checkpoints" / str(STEPS) / "data")
    assert sorted(f for f in data if f.endswith(".json")) == ["process_0-of-2.json",
                                                              "process_1-of-2.json"]

    # The export loads; stage 1 changed the trained modules and left the frozen LLM as
    # initialised (same seed -> same random init as a fresh one-process layout would give).
    from owl_jax.checkpoint import load_checkpoint
    cfg, params, meta = load_checkpoint(str(workdir / "export"))
    assert cfg.text.vocab_size == VOCAB and os.path.exists(workdir / "export" / "tokenizer.model")
    assert meta.get("trained_steps") == STEPS, meta
    leaves = _flat(params)
    assert all(np.isfinite(v).all() for v in leaves.values())
    init = _initial_params(recipe)
    assert sorted(init) == sorted(leaves)
    changed = {k for k, v in leaves.items() if not np.array_equal(v, init[k])}
    assert any(k.startswith("abstractor/") for k in changed)
    assert any(k.startswith("vision_model/") for k in changed)
    assert not any(k.startswith("language_model/") for k in changed), sorted(changed)[:5]


def _initial_params(recipe: str) -> dict:
    """The run's initial weights rebuilt here on one device: same recipe and seed (the random
    init does not depend on the mesh)."""
    import importlib.util

    import jax

    from owl_jax import sharding as sh
    from owl_jax.train import optimizer as opt_lib
    from owl_jax.train import state as state_lib
    spec = importlib.util.spec_from_file_location("tiny_recipe", recipe)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    c = mod.get_config(f"steps={STEPS},batch={BATCH}")
    c.model.vocab_size = VOCAB
    cfg = state_lib.model_config(c)
    model = state_lib.build_model(c, cfg)
    tx, _ = opt_lib.make_optimizer(c.optimizer, int(c.total_steps))
    mesh = sh.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    layout = state_lib.make_layout(c, model, cfg, tx, mesh, sh.rules_from_config(c.sharding_rules))
    return _flat(state_lib.host_params_unrolled(state_lib.init_fresh(layout, int(c.seed))))


def _flat(tree) -> dict:
    import jax
    return {"/".join(str(getattr(k, "key", k)) for k in path): np.asarray(v)
            for path, v in jax.tree_util.tree_flatten_with_path(tree)[0]}
