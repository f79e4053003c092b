"""owl-train on device meshes and across processes give the same training run.

Each run is the real CLI in a subprocess (a tiny stage-1 recipe of each family, synthetic data,
dropout on):
  A  1 process x 1 device,  mesh 1x1x1
  B  1 process x 8 devices, mesh data 2 x fsdp 2 x tensor 2
  C  2 processes x 4 devices (jax.distributed on localhost, gloo), mesh 2x2x2
  D  B's checkpoint of step 2 (8 devices, 2x2x2) restored onto 1 device (mesh 1x1x1) and
     trained to the end
All must log the same loss at every step (1e-5). A, B, C run concurrently; D after B (it finds
A's compiled step in the persistent compilation cache).
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # starts subprocesses

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 4
RECIPES = {"owl1": f"{ROOT}/configs/owl1/tiny_stage1.py:steps={STEPS}",
           "llava": f"{ROOT}/configs/llava/stage1.py:size=tiny,steps={STEPS}",
           "owl3": f"{ROOT}/configs/owl3/stage1.py:size=tiny,steps={STEPS}"}
ARGS = ["--config.checkpoint.every_steps=2", "--config.checkpoint.keep=10",
        "--config.log_every=1", "--config.export_at_end=false", "--config.num_samples=0",
        "--config.eval_every=0", "--config.eval_data.kind=none"]


def env(devices: int, cache: str) -> dict:
    e = dict(os.environ)
    e.update(JAX_PLATFORMS="cpu", PYTHONPATH=ROOT,
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
             JAX_COMPILATION_CACHE_DIR=cache, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    return e


def launch(recipe, workdir, mesh, devices, cache, extra=(), log_name=None):
    cmd = [sys.executable, "-m", "owl_jax.cli.train", "--config", recipe, *ARGS,
           f"--config.mesh.data={mesh[0]}",
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


@pytest.fixture(scope="module", params=sorted(RECIPES))
def mesh_runs(request, tmp_path_factory):
    recipe = RECIPES[request.param]
    tmp = tmp_path_factory.mktemp(f"mesh_{request.param}")
    cache = str(tmp / "jax_cache")
    a, b, c, d = (tmp / n for n in "abcd")
    port = free_port()
    multi = [launch(recipe, c, (2, 2, 2), 4, cache,
                    ["--coordinator_address", f"localhost:{port}", "--num_processes", "2",
                     "--process_id", str(i)], log_name=f"{c}.{i}.log") for i in range(2)]
    first = launch(recipe, a, (1, 1, 1), 1, cache)
    finish([launch(recipe, b, (2, 2, 2), 8, cache)])
    # D: B's run restarted from its step-2 checkpoint on another mesh (one device).
    shutil.copytree(b, d)
    for step in os.listdir(d / "checkpoints"):
        if step.isdigit() and int(step) > 2:
            shutil.rmtree(d / "checkpoints" / step)
    os.remove(d / "metrics.jsonl")
    finish([first])  # A has compiled (and cached) the 1-device step by now
    finish([launch(recipe, d, (1, 1, 1), 1, cache), *multi])
    return {k: str(v) for k, v in dict(a=a, b=b, c=c, d=d).items()}


def test_meshes_processes_and_restores_agree(mesh_runs):
    """One test (the runs are shared and expensive; xdist must not split them)."""
    la = losses(mesh_runs["a"])
    assert sorted(la) == list(range(1, STEPS + 1))

    # B: the 8-device mesh (2, 2, 2) == one device.
    lb = losses(mesh_runs["b"])
    for s in la:
        assert lb[s] == pytest.approx(la[s], rel=1e-5), ("mesh 2x2x2", s)

    # C: two processes x 4 devices (gloo) == one process.
    lc = losses(mesh_runs["c"])
    assert "process 0/2 holding 4/8 devices" in open(mesh_runs["c"] + ".0.log").read()
    for s in la:
        assert lc[s] == pytest.approx(la[s], rel=1e-5), ("2 processes", s)
    files = os.listdir(os.path.join(mesh_runs["c"], "checkpoints", str(STEPS), "data"))
    assert sorted(f for f in files if f.endswith(".json")) == ["process_0-of-2.json",
                                                              "process_1-of-2.json"]

    # D: B's step-2 checkpoint (8 devices, 2x2x2) restored onto one device continues A's curve.
    ld = losses(mesh_runs["d"])
    log = open(mesh_runs["d"] + ".log").read()
    assert "resumed from checkpoint step 2" in log and "holding 1/1 devices" in log
    assert sorted(ld) == list(range(3, STEPS + 1))
    for s in ld:
        assert ld[s] == pytest.approx(la[s], rel=1e-5), ("restored on 1 device", s)
