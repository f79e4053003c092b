"""owl-train on device meshes and across processes give the same training run.

Each run is the real CLI in a subprocess (tiny stage-1 recipe, synthetic data, dropout on):
  A  1 process x 1 device,  mesh 1x1x1
  B  1 process x 8 devices, mesh data 2 x fsdp 2 x tensor 2
  C  2 processes x 4 devices (jax.distributed on localhost, gloo), mesh 2x2x2
  D  B's checkpoint of step 2, resumed on 8 devices with mesh 1x8x1 (another layout: restore
     onto a different mesh) and trained to the end (same process as B: `loop.train` twice)
All must log the same loss at every step (1e-5). A, B+D, C run concurrently.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

# One module fixture runs every process: keep the tests on one xdist worker.
pytestmark = pytest.mark.xdist_group("train_distributed")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 4
ARGS = ["--config", f"{ROOT}/configs/tiny_stage1.py:steps={STEPS}",
        "--config.checkpoint.every_steps=2", "--config.checkpoint.keep=10",
        "--config.log_every=1", "--config.export_at_end=false", "--config.num_samples=0",
        "--config.eval_every=0", "--config.eval_data.kind=none"]


def env(devices: int, cache: str) -> dict:
    e = dict(os.environ)
    e.update(JAX_PLATFORMS="cpu", PYTHONPATH=ROOT,
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
             JAX_COMPILATION_CACHE_DIR=cache, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    return e


def launch(workdir, mesh, devices, cache, extra=(), log_name=None):
    cmd = [sys.executable, "-m", "owl_jax.cli.train", *ARGS, f"--config.mesh.data={mesh[0]}",
           f"--config.mesh.fsdp={mesh[1]}", f"--config.mesh.tensor={mesh[2]}",
           "--workdir", str(workdir), *extra]
    log_path = log_name or f"{workdir}.log"
    p = subprocess.Popen(cmd, env=env(devices, cache), stdout=open(log_path, "w"),
                         stderr=subprocess.STDOUT)
    p.log_path = log_path
    return p


def finish(procs, timeout=600):
    for p in procs:
        p.wait(timeout=timeout)
    for p in procs:
        if p.returncode != 0:
            log = open(p.log_path).read()
            raise AssertionError(f"owl-train failed ({p.returncode}):\n{log[-4000:]}")


def losses(workdir) -> dict[int, float]:
    out = {}
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        for line in f:
            d = json.loads(line)
            if d["split"] == "train":
                out[d["step"]] = d["loss"]
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


BD_DRIVER = """
import os, shutil, sys
from absl import flags
from ml_collections import config_flags
from owl_jax.train.loop import train
b, d = sys.argv[1], sys.argv[2]
fv = flags.FlagValues()
config_flags.DEFINE_config_file("config", flag_values=fv)
fv(["x"] + sys.argv[3:])
c = fv.config
c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 2, 2, 2
train(c, b)
shutil.copytree(b, d)
for step in os.listdir(os.path.join(d, "checkpoints")):
    if step.isdigit() and int(step) > 2:
        shutil.rmtree(os.path.join(d, "checkpoints", step))
os.remove(os.path.join(d, "metrics.jsonl"))
c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, 8, 1
train(c, d)
"""


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mesh")
    cache = str(tmp / "jax_cache")
    a, b, c, d = (tmp / n for n in "abcd")
    port = free_port()
    multi = [launch(c, (2, 2, 2), 4, cache,
                    ["--coordinator_address", f"localhost:{port}", "--num_processes", "2",
                     "--process_id", str(i)], log_name=f"{c}.{i}.log") for i in range(2)]
    bd = subprocess.Popen([sys.executable, "-c", BD_DRIVER, str(b), str(d), *ARGS],
                          env=env(8, cache), stdout=open(f"{b}.log", "w"),
                          stderr=subprocess.STDOUT)
    bd.log_path = f"{b}.log"
    finish([launch(a, (1, 1, 1), 1, cache), bd, *multi])
    return {k: str(v) for k, v in dict(a=a, b=b, c=c, d=d).items()}


def test_mesh_2x2x2_matches_single_device(runs):
    la, lb = losses(runs["a"]), losses(runs["b"])
    assert sorted(la) == list(range(1, STEPS + 1))
    for s in la:
        assert lb[s] == pytest.approx(la[s], rel=1e-5), s
    assert la[STEPS] < la[1]  # it trains


def test_two_processes_match_one(runs):
    la, lc = losses(runs["a"]), losses(runs["c"])
    log = open(runs["c"] + ".0.log").read()
    assert "process 0/2 holding 4/8 devices" in log
    for s in la:
        assert lc[s] == pytest.approx(la[s], rel=1e-5), s
    files = os.listdir(os.path.join(runs["c"], "checkpoints", str(STEPS), "data"))
    assert sorted(f for f in files if f.endswith(".json")) == ["process_0-of-2.json",
                                                              "process_1-of-2.json"]


def test_restore_onto_another_mesh(runs):
    la, ld = losses(runs["a"]), losses(runs["d"])
    log = open(runs["b"] + ".log").read()  # B then D, in one process
    assert "resumed from checkpoint step 2" in log and "'fsdp': 8" in log
    assert sorted(ld) == list(range(3, STEPS + 1))
    for s in ld:
        assert ld[s] == pytest.approx(la[s], rel=1e-5), s
