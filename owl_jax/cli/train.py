"""owl-train: train mPLUG-Owl from a config recipe, or dry-run its compiled step.

    owl-train --config configs/NAME.py[:ARGS] --workdir DIR [--config.KEY=VALUE ...]
    owl-train --config configs/owl_7b_stage1.py --dry_run [--devices 8]
              [--config.mesh.data=1 --config.mesh.fsdp=8 --config.mesh.tensor=1]
              [--peak_tflops 989 (--step_time S | --target_mfu 0.4)] [--topology v5p:2x2x2]

Multi-process: run the same command on every host with --coordinator_address HOST:PORT
--num_processes N --process_id I (or OWL_COORDINATOR_ADDRESS / OWL_NUM_PROCESSES /
OWL_PROCESS_ID in the environment; OWL_DISTRIBUTED=auto lets JAX detect TPU pods / SLURM).

`--config` uses ml_collections' config_flags: the text after ':' goes to the recipe's
get_config(arg), and `--config.a.b=v` overrides any field (typed like the field). A SIGTERM
saves a checkpoint at the next step boundary and exits 0; rerunning the command resumes.
"""
from __future__ import annotations

import math
import os
import sys


def _flags(argv: list[str]):
    from absl import flags
    from ml_collections import config_flags
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "recipe file[:args]", flag_values=fv,
                                    lock_config=True)
    flags.DEFINE_string("workdir", None, "checkpoints, logs, export", flag_values=fv)
    flags.DEFINE_bool("dry_run", False, "compile the step from abstract shapes and report",
                      flag_values=fv)
    flags.DEFINE_integer("devices", 8, "dry run: CPU stand-in devices when a mesh axis is -1",
                         flag_values=fv)
    flags.DEFINE_float("peak_tflops", None, "dry run: peak TFLOP/s per device", flag_values=fv)
    flags.DEFINE_float("step_time", None, "dry run: seconds per step -> implied MFU",
                       flag_values=fv)
    flags.DEFINE_float("target_mfu", None, "dry run: MFU -> implied step time", flag_values=fv)
    flags.DEFINE_string("topology", None, "dry run: TPU topology e.g. v5p:2x2x2 (jax[tpu])",
                        flag_values=fv)
    flags.DEFINE_bool("no_unrolled_flops", False, "dry run: skip the unrolled FLOP count",
                      flag_values=fv)
    flags.DEFINE_string("coordinator_address", None, "multi-process: HOST:PORT of process 0",
                        flag_values=fv)
    flags.DEFINE_integer("num_processes", None, "multi-process: number of processes",
                         flag_values=fv)
    flags.DEFINE_integer("process_id", None, "multi-process: this process", flag_values=fv)
    fv(["owl-train"] + list(argv))
    # grain reads absl flags (google/grain#1355): the global FLAGS must count as parsed.
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
    return fv


def _dry_run_devices(config, n_default: int) -> int:
    sizes = [int(config.mesh.data), int(config.mesh.fsdp), int(config.mesh.tensor)]
    known = math.prod(s for s in sizes if s != -1)
    return known if -1 not in sizes else max(n_default, known)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    fv = _flags(argv)
    config = fv.config
    if config is None:
        print("owl-train: --config is required", file=sys.stderr)
        return 2
    if fv.dry_run:
        import jax
        from jax._src import xla_bridge
        devices = None
        if fv.topology:
            from owl_jax.train.dry_run import topology_devices
            try:
                devices = topology_devices(fv.topology)
            except RuntimeError as e:
                print(f"owl-train: {e}; skipping the topology dry run", file=sys.stderr)
                return 0
        else:
            n = _dry_run_devices(config, fv.devices)
            if not xla_bridge.backends_are_initialized():
                # The CPU backend's default scheduler favours concurrency over memory and
                # keeps every unrolled remat block live at once (4-5x the temporaries of a
                # memory-aware schedule); accelerators schedule for memory, so do that here.
                os.environ["XLA_FLAGS"] = (
                    os.environ.get("XLA_FLAGS", "") +
                    f" --xla_force_host_platform_device_count={n}"
                    " --xla_cpu_enable_concurrency_optimized_scheduler=false")
                jax.config.update("jax_platforms", "cpu")
                jax.config.update("jax_num_cpu_devices", n)
            cpus = jax.devices("cpu")
            if len(cpus) < n:
                print(f"owl-train: dry run needs {n} CPU devices, jax already started with "
                      f"{len(cpus)} (run it in a fresh process)", file=sys.stderr)
                return 2
            devices = cpus[:n]
        from owl_jax.train.dry_run import dry_run
        dry_run(config, peak_tflops=fv.peak_tflops, step_time=fv.step_time,
                target_mfu=fv.target_mfu, devices=devices,
                unrolled_flops=not fv.no_unrolled_flops)
        return 0
    if not fv.workdir:
        print("owl-train: --workdir is required", file=sys.stderr)
        return 2
    from owl_jax.train import distributed
    distributed.initialize(fv.coordinator_address, fv.num_processes, fv.process_id)
    from owl_jax.train.loop import train
    out = train(config, fv.workdir)
    status = "preempted (SIGTERM), checkpoint saved" if out["preempted"] else "done"
    print(f"owl-train: {status} at step {out['step']}; loss {out.get('loss', float('nan')):.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
