"""owl-train: train mPLUG-Owl from a config recipe, or dry-run its compiled step.

    owl-train --config configs/NAME.py[:ARGS] --workdir DIR [--config.KEY=VALUE ...]
    owl-train --config configs/owl1/owl_7b_stage1.py --dry_run [--devices 8]
              [--config.mesh.data=1 --config.mesh.fsdp=8 --config.mesh.tensor=1]
              [--peak_tflops 989 (--step_time S | --target_mfu 0.4)] [--topology v5p:2x2x2]

Multi-process: run the same command on every host with --coordinator_address HOST:PORT
--num_processes N --process_id I (or OWL_COORDINATOR_ADDRESS / OWL_NUM_PROCESSES /
OWL_PROCESS_ID in the environment; OWL_DISTRIBUTED=auto lets JAX detect TPU pods / SLURM).

`--config` uses ml_collections' config_flags: the text after ':' goes to the recipe's
get_config(arg), and `--config.a.b=v` overrides any field (typed like the field). A SIGTERM
saves a checkpoint at the next step boundary and exits 0; rerunning the command resumes.
`owl-train --config RECIPE --help` also lists that recipe's ARGS. See docs/training.md.
"""
from __future__ import annotations

import math
import os
import sys


HELP = ("-h", "--help", "-help", "--helpfull", "--helpshort")


def _flags(argv: list[str]):
    from absl import flags
    from ml_collections import config_flags
    fv = flags.FlagValues()
    # sys_argv: the --config.FIELD overrides are read from these args, not from sys.argv
    config_flags.DEFINE_config_file("config", None, "recipe file[:args]", flag_values=fv,
                                    lock_config=True, sys_argv=["owl-train"] + list(argv))
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
    if any(a in HELP for a in argv):
        return fv
    fv(["owl-train"] + list(argv))
    # grain reads absl flags (google/grain#1355): the global FLAGS must count as parsed.
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
    return fv


def _dry_run_devices(config, n_default: int) -> int:
    sizes = [int(config.mesh.data), int(config.mesh.fsdp), int(config.mesh.tensor)]
    known = math.prod(s for s in sizes if s != -1)
    return known if -1 not in sizes else max(n_default, known)


def _recipe_path(argv: list[str]) -> str | None:
    for i, a in enumerate(argv):
        if a.startswith("--config="):
            return a.split("=", 1)[1].split(":", 1)[0]
        if a == "--config" and i + 1 < len(argv):
            return argv[i + 1].split(":", 1)[0]
    return None


def _recipe_help(path: str) -> str:
    """The recipe file's docstring (its ARGS), and that of the recipe it wraps (tiny_*.py)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("owl_train_recipe", path)
    if spec is None or not os.path.isfile(path):
        return f"(no recipe file {path})"
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    docs = [mod.__doc__ or "(the recipe has no docstring)"]
    wrapped = getattr(mod, "recipe", None)
    if wrapped is not None and wrapped.__doc__:
        docs.append(f"{os.path.basename(wrapped.__file__)}:\n{wrapped.__doc__}")
    from owl_jax.configs.common import DATA_ARGS_HELP
    return (f"\nRecipe {path}:\n" + "\n".join(d.strip("\n") for d in docs) +
            "\n\nARGS every recipe takes:\n" + DATA_ARGS_HELP)


def usage(argv: list[str]) -> str:
    fv = _flags(["--help"])
    text = (__doc__.strip() + "\n\nflags:\n" +
            fv.get_help(prefix="  ", include_special_flags=False))
    path = _recipe_path(argv)
    return text + ("\n" + _recipe_help(path) if path else
                   "\n\nRecipes: configs/FAMILY/*.py (owl-train --config configs/FAMILY/NAME.py "
                   "--help lists one's ARGS).")


def _reason(e: Exception) -> str:
    """One line for a bad command line: config_flags wraps a recipe's own error (e.g. an unknown
    ARG) with its traceback; the last `SomeError: message` line is the reason."""
    if isinstance(e, AttributeError):
        return f"--config.FIELD names a field the recipe does not have: {e}"
    lines = [ln for ln in str(e).splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.split(":", 1)[0].endswith(("Error", "Exception"))]
    if errors:
        return errors[-1]
    return " ".join(ln.strip() for ln in lines[-4:])


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if any(a in HELP for a in argv):
        print(usage(argv))
        return 0
    recipe = _recipe_path(argv)
    if recipe and not os.path.isfile(recipe):
        print(f"owl-train: no recipe file {recipe} (the recipes are configs/FAMILY/*.py)",
              file=sys.stderr)
        return 2
    from absl import flags
    try:
        fv = _flags(argv)
        config = fv.config
        if config is not None:
            config.keys()  # a recipe that failed to load raises here, not at first use
    except (flags.Error, ValueError, KeyError, AttributeError, TypeError, OSError) as e:
        print(f"owl-train: {_reason(e)}\n(owl-train --help lists the flags; with --config "
              f"RECIPE, its ARGS)", file=sys.stderr)
        return 2
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
    if out.get("nothing_to_do"):
        return 0
    status = "preempted (SIGTERM), checkpoint saved" if out["preempted"] else "done"
    loss = f"; loss {out['loss']:.4f}" if "loss" in out else ""
    print(f"owl-train: {status} at step {out['step']}{loss}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
