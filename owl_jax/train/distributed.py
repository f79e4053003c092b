"""Multi-process start-up: `jax.distributed.initialize` from flags or environment.

Sources, first that applies:
  1. explicit arguments (owl-train --coordinator_address / --num_processes / --process_id);
  2. OWL_COORDINATOR_ADDRESS, OWL_NUM_PROCESSES, OWL_PROCESS_ID (+ OWL_LOCAL_DEVICE_IDS)
     (launch/ scripts set these; SLURM users can map SLURM_PROCID etc. onto them);
  3. OWL_DISTRIBUTED=auto: let JAX detect the cluster (TPU pods, SLURM, Open MPI, GKE).
Single-process runs call nothing.

On CPU the collectives need gloo (`jax_cpu_collectives_implementation`), set here before the
backend starts. Call `initialize` before anything touches jax devices.
"""
from __future__ import annotations

import os

import jax

_done = False


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, local_device_ids: list[int] | None = None,
               timeout_s: int = 300) -> bool:
    """Returns True if jax.distributed was initialised (now or before)."""
    global _done
    if _done:
        return True
    env = os.environ
    coordinator_address = coordinator_address or env.get("OWL_COORDINATOR_ADDRESS")
    if num_processes is None and env.get("OWL_NUM_PROCESSES"):
        num_processes = int(env["OWL_NUM_PROCESSES"])
    if process_id is None and env.get("OWL_PROCESS_ID"):
        process_id = int(env["OWL_PROCESS_ID"])
    if local_device_ids is None and env.get("OWL_LOCAL_DEVICE_IDS"):
        local_device_ids = [int(x) for x in env["OWL_LOCAL_DEVICE_IDS"].split(",")]
    auto = env.get("OWL_DISTRIBUTED", "").lower() == "auto"
    if not coordinator_address and not auto:
        return False
    if coordinator_address and (num_processes is None or process_id is None):
        raise ValueError("multi-process run: set the coordinator address, the number of "
                         "processes and this process's id together (flags or OWL_* env)")
    platforms = (env.get("JAX_PLATFORMS") or "").lower()
    if platforms in ("", "cpu") or "cpu" in platforms.split(","):
        # CPU collectives across processes need gloo; harmless when a GPU/TPU backend runs.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        # Gloo gives up on a peer after 30 s by default: processes that compile at different
        # speeds (loaded hosts) reach their first collective further apart than that.
        if "xla_cpu_collective_timeout_seconds" not in env.get("XLA_FLAGS", ""):
            os.environ["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                                       " --xla_cpu_collective_timeout_seconds=1800").strip()
    kwargs = dict(initialization_timeout=timeout_s)
    if coordinator_address:
        kwargs.update(coordinator_address=coordinator_address, num_processes=num_processes,
                      process_id=process_id)
        if local_device_ids is not None:
            kwargs["local_device_ids"] = local_device_ids
    jax.distributed.initialize(**kwargs)
    _done = True
    return True


def barrier(name: str, timeout_s: int = 1800) -> None:
    """All processes wait here (coordination service, not a device collective, so it tolerates
    processes arriving minutes apart). No-op in single-process runs. `name` must be unique."""
    if jax.process_count() == 1:
        return
    from orbax.checkpoint import multihost
    multihost.get_barrier_sync_fn()(key=name, timeout_ms=timeout_s * 1000)


def describe() -> str:
    return (f"process {jax.process_index()}/{jax.process_count()} holding "
            f"{jax.local_device_count()}/{jax.device_count()} devices "
            f"({jax.devices()[0].device_kind})")
