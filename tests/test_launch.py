"""Launchers: dry runs print the expected commands; local.sh / multinode.sh really start
processes that form one jax.distributed job through the OWL_* contract (docs/launch.md); the
SLURM script hands every task its process id; the GPU XLA flags are accepted by XLA."""
import os
import shlex
import socket
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.slow  # every test runs the launch scripts in bash

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(REPO, "launch")

# The OWL_* contract, as docs/launch.md tells owl-train to implement it, then a cross-process
# sum over every device of the job.
PROBE = r'''
import os, sys
import jax, numpy as np
env = os.environ
if env.get("OWL_COORDINATOR_ADDRESS"):
    ids = env.get("OWL_LOCAL_DEVICE_IDS")
    jax.distributed.initialize(
        coordinator_address=env["OWL_COORDINATOR_ADDRESS"], num_processes=int(env["OWL_NUM_PROCESSES"]),
        process_id=int(env["OWL_PROCESS_ID"]),
        local_device_ids=[int(i) for i in ids.split(",")] if ids else None,
        cluster_detection_method="deactivate")
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
mesh = Mesh(np.array(jax.devices()), ("d",))
n = jax.device_count()
x = jax.make_array_from_callback((n,), NamedSharding(mesh, P("d")),
                                 lambda idx: np.arange(n, dtype=np.float32)[idx])
total = jax.jit(lambda a: a.sum(), out_shardings=NamedSharding(mesh, P()))(x)
print(f"process {jax.process_index()} of {jax.process_count()}: {n} devices, "
      f"{jax.local_device_count()} local, sum {float(total):g}, args {sys.argv[1:]}", flush=True)
'''


def _env(**kw):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OWL_", "SLURM_", "XLA_"))}
    env.update({k: str(v) for k, v in kw.items()})
    return env


def _bash(script, *args, timeout=120, **env):
    return subprocess.run(["bash", os.path.join(LAUNCH, script), *args], capture_output=True,
                          text=True, timeout=timeout, env=_env(**env), cwd=REPO)


def _free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def _env_and_argv(line):
    words = shlex.split(line)
    assert words[0] == "env"
    env, i = {}, 1
    while "=" in words[i] and not words[i].startswith("-"):
        k, v = words[i].split("=", 1)
        env[k] = v
        i += 1
    return env, words[i:]


# ------------------------------------------------------------------------------------------
# local.sh


def test_local_dry_run_prints_one_command_per_process():
    r = _bash("local.sh", "4", "--config", "configs/tiny.py:a=1", "--workdir", "/tmp/my run",
              DRY_RUN=1, OWL_PORT=23456)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 4
    for i, line in enumerate(lines):
        env, argv = _env_and_argv(line)
        assert env["OWL_COORDINATOR_ADDRESS"] == "127.0.0.1:23456"
        assert (env["OWL_NUM_PROCESSES"], env["OWL_PROCESS_ID"]) == ("4", str(i))
        assert env["JAX_CPU_COLLECTIVES_IMPLEMENTATION"] == "gloo"
        assert env["XLA_FLAGS"] == "--xla_force_host_platform_device_count=2"   # 8 / 4
        assert argv == ["owl-train", "--config", "configs/tiny.py:a=1", "--workdir", "/tmp/my run"]
    bad = _bash("local.sh", "3", DRY_RUN=1)
    assert bad.returncode == 2 and "do not split evenly" in bad.stderr


def test_local_processes_form_one_job(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text(PROBE)
    logs = tmp_path / "logs"
    r = _bash("local.sh", "2", "--workdir", "w", OWL_TRAIN=f"{sys.executable} {probe}",
              OWL_LOG_DIR=logs)
    assert r.returncode == 0, r.stdout + r.stderr
    for i in range(2):
        out = (logs / f"process_{i}.log").read_text()
        # 2 processes x 4 CPU devices; sum(0..7) = 28 needs both processes' shards.
        assert f"process {i} of 2: 8 devices, 4 local, sum 28, args ['--workdir', 'w']" in out
    assert "process 0 of 2" in r.stdout            # process 0's log is shown live


def test_local_stops_everyone_when_one_fails(tmp_path):
    script = tmp_path / "fail.py"
    script.write_text("import os, sys, time\n"
                      "if os.environ['OWL_PROCESS_ID'] == '1':\n    print('boom'); sys.exit(3)\n"
                      "time.sleep(60)\n")
    t0 = time.monotonic()
    r = _bash("local.sh", "2", OWL_TRAIN=f"{sys.executable} {script}", OWL_LOG_DIR=tmp_path / "logs")
    assert r.returncode == 3
    assert time.monotonic() - t0 < 30                # process 0 was stopped, not waited for
    assert "process_1 exited with status 3" in r.stderr and "boom" in r.stderr


# ------------------------------------------------------------------------------------------
# multinode.sh


def test_multinode_node_mode_dry_run_one_process_per_gpu():
    r = _bash("multinode.sh", "--node-rank", "1", "--nnodes", "2", "--coordinator", "node0:1234",
              "--procs-per-node", "4", "--", "--config", "c.py", DRY_RUN=1)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 4
    for i, line in enumerate(lines):
        env, argv = _env_and_argv(line)
        assert env["OWL_COORDINATOR_ADDRESS"] == "node0:1234" and env["OWL_NUM_PROCESSES"] == "8"
        assert (env["OWL_PROCESS_ID"], env["OWL_LOCAL_DEVICE_IDS"]) == (str(4 + i), str(i))
        assert "--xla_gpu_enable_latency_hiding_scheduler=true" in env["XLA_FLAGS"]
        assert argv == ["owl-train", "--config", "c.py"]


def test_multinode_over_ssh_forms_one_job(tmp_path):
    # A stand-in `ssh` that runs the remote command here, so the real quoting is exercised.
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "ssh").write_text('#!/bin/bash\nwhile [[ "$1" == -* ]]; do\n'
                                '  if [[ "$1" == -o ]]; then shift; fi; shift\ndone\n'
                                'echo "fake ssh to $1" >&2\nexec bash -c "$2"\n')
    (bindir / "ssh").chmod(0o755)
    probe = tmp_path / "probe.py"
    probe.write_text(PROBE)
    dry = _bash("multinode.sh", "--hosts", "127.0.0.1,localhost", "--port", "999", "--",
                "--workdir", "a b", DRY_RUN=1)
    assert dry.returncode == 0, dry.stderr
    ssh_lines = [shlex.split(x) for x in dry.stdout.strip().splitlines()]
    assert [w[:4] for w in ssh_lines] == [["ssh", "-tt", "-o", "BatchMode=yes"]] * 2
    assert [w[4] for w in ssh_lines] == ["127.0.0.1", "localhost"]
    assert "--node-rank 1 --nnodes 2 --coordinator 127.0.0.1:999" in ssh_lines[1][5]

    logs = tmp_path / "logs"
    r = _bash("multinode.sh", "--hosts", "127.0.0.1,localhost", "--port", str(_free_port()),
              "--platform", "cpu", "--log-dir", str(logs), "--", "--workdir", "a b",
              PATH=f"{bindir}:{os.environ['PATH']}", OWL_TRAIN=f"{sys.executable} {probe}",
              XLA_FLAGS="--xla_force_host_platform_device_count=2")
    assert r.returncode == 0, r.stdout + r.stderr
    for i in range(2):
        assert (f"process {i} of 2: 4 devices, 2 local, sum 6, args ['--workdir', 'a b']"
                in (logs / f"process_{i}.log").read_text())
        assert f"process {i} of 2" in (logs / f"node_{i}.log").read_text()


# ------------------------------------------------------------------------------------------
# gpu_slurm.sbatch


def _slurm_env(tmp_path, **kw):
    bindir = tmp_path / "bin"
    bindir.mkdir(exist_ok=True)
    (bindir / "scontrol").write_text('#!/bin/bash\n[[ "$1 $2" == "show hostnames" ]] || exit 1\n'
                                     'printf "gpu001\\ngpu002\\n"\n')
    # srun stand-in: runs every task here, one after the other, with the SLURM task variables.
    (bindir / "srun").write_text(
        '#!/bin/bash\nwhile [[ "$1" == --* ]]; do shift; done\n'
        'for ((t = 0; t < SLURM_JOB_NUM_NODES * SLURM_NTASKS_PER_NODE; t++)); do\n'
        '  SLURM_PROCID=$t SLURM_LOCALID=$((t % SLURM_NTASKS_PER_NODE)) "$@" || exit $?\ndone\n')
    for f in ("scontrol", "srun"):
        (bindir / f).chmod(0o755)
    return dict(PATH=f"{bindir}:{os.environ['PATH']}", SLURM_JOB_ID=4242, SLURM_JOB_NUM_NODES=2,
                SLURM_JOB_NODELIST="gpu[001-002]", SLURM_SUBMIT_DIR=REPO, **kw)


def test_slurm_dry_run_exports_contract_and_gpu_flags(tmp_path):
    r = _bash("gpu_slurm.sbatch", "--config", "configs/owl1/owl_7b_stage1.py", "--workdir", "/runs/x",
              DRY_RUN=1, **_slurm_env(tmp_path, SLURM_NTASKS_PER_NODE=8))
    assert r.returncode == 0, r.stderr
    *exports, srun = r.stdout.strip().splitlines()
    env = dict(shlex.split(e)[1].split("=", 1) for e in exports)
    assert env["OWL_COORDINATOR_ADDRESS"] == "gpu001:24242"          # first node, 20000 + job id % 20000
    assert env["OWL_NUM_PROCESSES"] == "16" and env["OWL_TASKS_PER_NODE"] == "8"
    assert "--xla_gpu_enable_latency_hiding_scheduler=true" in env["XLA_FLAGS"]
    assert env["NCCL_DEBUG"] == "WARN"
    words = shlex.split(srun)
    assert words[:4] == ["srun", "--kill-on-bad-exit=1", "--nodes=2", "--ntasks-per-node=8"]
    assert words[-5:] == ["owl-train", "--config", "configs/owl1/owl_7b_stage1.py", "--workdir", "/runs/x"]


def test_slurm_tasks_get_their_process_ids(tmp_path):
    show = tmp_path / "show_env.py"
    show.write_text("import os\nprint('task', *(os.environ.get(k, '-') for k in ("
                    "'OWL_COORDINATOR_ADDRESS', 'OWL_NUM_PROCESSES', 'OWL_PROCESS_ID', "
                    "'OWL_LOCAL_DEVICE_IDS')))\n")
    r = _bash("gpu_slurm.sbatch", **_slurm_env(tmp_path, SLURM_NTASKS_PER_NODE=2,
                                                OWL_TRAIN=f"{sys.executable} {show}"))
    assert r.returncode == 0, r.stderr
    assert r.stdout.split("\n")[:4] == [f"task gpu001:24242 4 {t} {t % 2}" for t in range(4)]
    # One task per node drives every GPU of its node, listed explicitly.
    r = _bash("gpu_slurm.sbatch", **_slurm_env(tmp_path, SLURM_NTASKS_PER_NODE=1, SLURM_GPUS_ON_NODE=4,
                                                OWL_TRAIN=f"{sys.executable} {show}"))
    assert r.returncode == 0, r.stderr
    assert r.stdout.split("\n")[:2] == ["task gpu001:24242 2 0 0,1,2,3", "task gpu001:24242 2 1 0,1,2,3"]


def test_gpu_xla_flags_are_accepted_by_xla(tmp_path):
    r = _bash("gpu_slurm.sbatch", DRY_RUN=1, **_slurm_env(tmp_path))
    flags = next(shlex.split(x)[1].split("=", 1)[1] for x in r.stdout.splitlines()
                 if x.startswith("export XLA_FLAGS="))
    code = "import jax; jax.numpy.zeros(1).block_until_ready()"
    for xla_flags, ok in ((flags, True), (flags + " --xla_gpu_no_such_flag=true", False)):
        run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             env=_env(JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags), timeout=120)
        assert (run.returncode == 0) == ok, run.stderr[-2000:]


# ------------------------------------------------------------------------------------------
# tpu_pod.sh


def _tpu(*args):
    r = _bash("tpu_pod.sh", "--dry-run", "--name", "owl-s1", "--zone", "us-east5-a", *args)
    assert r.returncode == 0, r.stderr
    return [shlex.split(x) for x in r.stdout.strip().splitlines()], r.stderr


def test_tpu_pod_dry_run_lifecycle():
    train_args = ["--config", "configs/owl1/owl_7b_stage1.py:batch=256", "--workdir", "gs://b/s1",
                  "--config.note=two words"]
    cmds, _ = _tpu("--accelerator", "v5p-64", "--spot", "--log-dir", "L", "--", *train_args)
    where = ["--zone=us-east5-a"]
    assert cmds[0] == ["gcloud", "compute", "tpus", "tpu-vm", "create", "owl-s1", *where,
                       "--accelerator-type=v5p-64", "--version=tpu-ubuntu2204-base", "--spot"]
    assert cmds[1][:2] == ["git", "archive"]
    assert cmds[2][:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"]
    assert cmds[2][-2:] == where + ["--worker=all"] and cmds[2][6] == "owl-s1:~/owl-jax.tar.gz"
    setup, train, collect = cmds[3], cmds[4], cmds[5]
    for c in (setup, train, collect):
        assert c[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "owl-s1"]
        assert "--worker=all" in c
    assert 'pip install -q -e ".[tpu]"' in setup[-1]
    # The same owl-train command on every worker, jax.distributed auto-detection, per-worker logs.
    remote = train[-1].removeprefix("--command=")
    assert "--output-directory=L" in train
    assert "OWL_DISTRIBUTED=auto" in remote
    assert shlex.split(remote.split("/bin/", 1)[1].split(" 2>&1")[0]) == ["owl-train", *train_args]
    assert "--output-directory=L/remote" in collect and "owl-train.log" in collect[-1]
    assert cmds[6] == ["gcloud", "compute", "tpus", "tpu-vm", "delete", "owl-s1", *where, "--quiet"]
    assert len(cmds) == 7


def test_tpu_pod_dry_run_queued_and_existing():
    cmds, err = _tpu("--accelerator", "v4-32", "--queued", "--project", "p", "--", "--workdir", "/x")
    assert cmds[0][:6] == ["gcloud", "compute", "tpus", "queued-resources", "create", "owl-s1"]
    assert "--node-id=owl-s1" in cmds[0] and "--project=p" in cmds[0]
    assert cmds[1][4] == "describe"                  # waits for ACTIVE
    assert cmds[-1][3:5] == ["queued-resources", "delete"] and "--force" in cmds[-1]
    assert "not on GCS" in err
    cmds, _ = _tpu("--existing", "--", "--workdir", "gs://b")
    assert not any(c[4] in ("create", "delete") for c in cmds if c[0] == "gcloud")
    missing = _bash("tpu_pod.sh", "--dry-run", "--name", "x", "--", "--workdir", "gs://b")
    assert missing.returncode == 2 and "--zone" in missing.stderr
