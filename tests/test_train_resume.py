"""Preemption and restarts of owl-train with the real grain pipeline (img2dataset webdataset
shards + a sentencepiece tokenizer, random-resized-crop augmentation on):

- a run killed with SIGKILL mid-way and started again logs exactly the loss sequence of an
  uninterrupted run, on exactly the same rows;
- one epoch (the first 8 steps of 4 rows over 32 samples) sees every sample exactly once;
- SIGTERM makes the trainer save a checkpoint at the step it reached and exit 0 (that
  checkpoint is an ordinary one: the SIGKILL case covers resuming from it).
All checks are one test: the runs are shared, and xdist must not split them over workers.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from owl_jax.testing import shards
from owl_jax.testing.spm import train_tiny_tokenizer

pytestmark = pytest.mark.slow  # starts subprocesses

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS, BATCH, SAMPLES = 10, 4, 32


@pytest.fixture(scope="module")
def resume_setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("resume")
    wds = shards.write_webdataset(str(tmp / "wds"), n_shards=2, per_shard=SAMPLES // 2,
                                  failure_rate=0.0)
    assert len(wds["samples"]) == SAMPLES
    tok_dir = str(tmp / "tok")
    train_tiny_tokenizer(tok_dir, vocab_size=512)
    args = ["--config", f"{ROOT}/configs/owl1/tiny_stage1.py:steps={STEPS},batch={BATCH}",
            "--config.data.kind=pipeline",  # replaced below by a full data block
            "--config.checkpoint.every_steps=2", "--config.checkpoint.keep=10",
            "--config.log_every=1", "--config.export_at_end=false", "--config.num_samples=0",
            "--config.eval_every=0", "--config.eval_data.kind=none",
            "--config.debug.log_row_digests=true", f"--config.tokenizer_dir={tok_dir}",
            "--config.batch.max_images_per_row=1"]
    return dict(tmp=tmp, args=args, spec=f"webdataset:{tmp}/wds/{{00000..00001}}.tar",
                cache=str(tmp / "jax_cache"))


def start(setup, name, sleep=0.0):
    """owl-train in a subprocess. The data block is set through a tiny wrapper recipe since
    config_flags cannot override a list of dicts from the command line."""
    tmp = setup["tmp"]
    recipe = tmp / "recipe.py"
    recipe.write_text(
        "from owl_jax.configs.owl1 import tiny_stage1\n"
        "import ml_collections\n"
        "def get_config(arg=None):\n"
        "    c = tiny_stage1.get_config(arg)\n"
        "    c.data = ml_collections.ConfigDict(dict(kind='pipeline', sources=[dict(\n"
        f"        spec={setup['spec']!r}, task='caption')], packing=False, augment=True,\n"
        "        workers=0, threads=1, seed=5))\n"
        "    return c\n")
    args = [a if not a.startswith(f"{ROOT}/configs/owl1/tiny_stage1.py")
            else a.replace(f"{ROOT}/configs/owl1/tiny_stage1.py", str(recipe))
            for a in setup["args"] if a != "--config.data.kind=pipeline"]
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT,
               JAX_COMPILATION_CACHE_DIR=setup["cache"],
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    workdir = tmp / name
    cmd = [sys.executable, "-m", "owl_jax.cli.train", *args, "--workdir", str(workdir),
           f"--config.debug.sleep_after_step={sleep}", "--config.model.vocab_size=512"]
    log = open(f"{workdir}.log", "a")
    return subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT), str(workdir)


def wait_ok(proc, workdir, timeout=300):
    proc.wait(timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"owl-train exit {proc.returncode}:\n"
                             f"{open(workdir + '.log').read()[-4000:]}")


def metrics(workdir) -> dict[int, dict]:
    out = {}
    path = os.path.join(workdir, "metrics.jsonl")
    if os.path.exists(path):
        for line in open(path):
            d = json.loads(line)
            if d["split"] == "train":
                out[d["step"]] = d  # a step logged again after a restart: the later wins
    return out


@pytest.fixture(scope="module")
def resume_runs(resume_setup):
    setup = resume_setup
    """Wave 1 (concurrently): the uninterrupted run, a run SIGKILLed at step >= 5 and a run
    SIGTERMed at step >= 3. Then the killed run is started again."""
    ref, ref_wd = start(setup, "uninterrupted", sleep=0.2)
    # The others start once the reference has compiled (and cached) its step: they then load
    # the compiled programs from the persistent cache instead of compiling them again.
    t0 = time.time()
    while not metrics(ref_wd) and ref.poll() is None and time.time() - t0 < 600:
        time.sleep(0.1)
    killed, killed_wd = start(setup, "killed", sleep=0.5)
    termed, termed_wd = start(setup, "sigterm", sleep=0.5)
    pending = {"kill": (killed, killed_wd, 5, signal.SIGKILL),
               "term": (termed, termed_wd, 3, signal.SIGTERM)}
    t0 = time.time()
    while pending and time.time() - t0 < 600:
        for name, (proc, wd, step, sig) in list(pending.items()):
            if proc.poll() is not None:
                raise AssertionError(f"{name} exited early:\n{open(wd + '.log').read()[-3000:]}")
            if max(metrics(wd), default=0) >= step:
                proc.send_signal(sig)
                del pending[name]
        time.sleep(0.05)
    assert not pending, "timed out waiting for training steps"
    killed.wait()
    out = {"killed_at": max(metrics(killed_wd))}
    wait_ok(termed, termed_wd, timeout=120)
    out["termed_log"] = open(termed_wd + ".log").read()
    out["termed_at"] = max(metrics(termed_wd))
    out["termed_ckpts"] = sorted(int(s) for s in os.listdir(os.path.join(termed_wd,
                                                                           "checkpoints"))
                                 if s.isdigit())
    wait_ok(ref, ref_wd)
    proc, wd = start(setup, "killed")
    wait_ok(proc, wd)
    out.update(reference=metrics(ref_wd), killed=metrics(killed_wd),
               killed_log=open(killed_wd + ".log").read())
    return out


def test_restarts_replay_exactly_and_sigterm_saves(resume_runs):
    """One test (the runs are shared and expensive; xdist must not split them)."""
    reference = resume_runs["reference"]
    assert sorted(reference) == list(range(1, STEPS + 1))
    # One epoch = SAMPLES / BATCH steps: every sample exactly once.
    epoch = [r for s in range(1, SAMPLES // BATCH + 1) for r in reference[s]["rows"]]
    assert len(epoch) == len(set(epoch)) == SAMPLES

    # SIGKILL mid-run, then rerun: the same rows and bitwise the same losses at every step.
    assert resume_runs["killed_at"] < STEPS
    assert "resumed from checkpoint step" in resume_runs["killed_log"]
    got = resume_runs["killed"]
    assert sorted(got) == list(range(1, STEPS + 1))
    for s in range(1, STEPS + 1):
        assert got[s]["rows"] == reference[s]["rows"], s
        assert got[s]["loss"] == reference[s]["loss"], s

    # SIGTERM: a checkpoint at the step reached, exit code 0 (wait_ok checked it).
    stopped = resume_runs["termed_at"]
    assert "preempted (SIGTERM), checkpoint saved" in resume_runs["termed_log"]
    assert stopped < STEPS
    assert resume_runs["termed_ckpts"][-1] == stopped
