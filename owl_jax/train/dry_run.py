"""Compile the real train step from abstract shapes for a mesh, without weights or data.

    owl-train --config configs/owl1/owl_7b_stage1.py --dry_run [--config.mesh.fsdp=8 ...]
              [--peak_tflops 989 --step_time 12.5 | --target_mfu 0.4] [--topology v5p:2x2x2]

By default the mesh's devices are CPU devices standing in for accelerators (the CLI sets the
CPU device count before jax starts). The train state and the batch are `ShapeDtypeStruct`s with
their target shardings, so nothing is allocated; XLA compiles the SPMD program one device runs
and reports:

- memory per device (`compiled.memory_analysis()`): arguments (state shard + batch shard),
  outputs, temporaries; peak ~ arguments + outputs - aliased (donated) + temporaries. CPU
  compilation stands in for the accelerator's: the same sharding, but buffer assignment and
  fusion differ, so treat the figures as estimates (within tens of percent);
- FLOPs: XLA's count for the compiled per-device program counts the body of a loop ONCE. The
  step has two loops (the scanned LLM layers, and the gradient-accumulation scan), so that
  figure is far below the real work. We therefore also lower (trace only, no compile) the same
  step with the layers unrolled and one micro batch, and scale it by the micro-batch count: that
  is the whole step's HLO FLOPs, rematerialisation included. The analytic model FLOPs
  (flops.py) exclude recomputation; MFU uses them.
"""
from __future__ import annotations

import copy
import os

import flax.linen as nn
import jax
import jax.numpy as jnp

from owl_jax import sharding as sh
from owl_jax.train import flops as flops_lib
from owl_jax.train import optimizer as opt_lib
from owl_jax.train import state as state_lib
from owl_jax.train import step as step_lib
from owl_jax.train import trainable as tr


def abstract_batch(config, cfg, mesh, rules, rows: int | None = None) -> dict:
    b = config.batch
    n = int(rows or b.global_size)
    s = cfg.vision.image_size
    shapes = {"input_ids": ((n, b.seq_len), jnp.int32), "targets": ((n, b.seq_len), jnp.int32),
              "loss_mask": ((n, b.seq_len), jnp.float32),
              "segment_ids": ((n, b.seq_len), jnp.int32),
              "positions": ((n, b.seq_len), jnp.int32),
              "pixel_values": ((n, b.max_images_per_row, s, s, 3), jnp.uint8)}
    return {k: jax.ShapeDtypeStruct(shape, dt, sharding=sh.batch_sharding(mesh, len(shape), rules))
            for k, (shape, dt) in shapes.items()}


def _lower(config, mesh, rules, rows=None):
    cfg = state_lib.model_config(config)
    model = state_lib.build_model(config, cfg)
    tx, schedule = opt_lib.make_optimizer(config.optimizer, int(config.total_steps))
    layout = state_lib.make_layout(config, model, cfg, tx, mesh, rules)
    batch = abstract_batch(config, cfg, mesh, rules, rows)
    fn = step_lib.jit_train_step(layout, config, schedule, batch)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        return fn.lower(layout.abstract, batch), layout, cfg


def _lowered_flops(lowered) -> float:
    """XLA's FLOP count of a lowered (unpartitioned, whole-step) module."""
    c = lowered.cost_analysis()
    if c is None:
        # PJRT plugin backends (TPU) cannot analyse a lowered module; the analysis is a walk
        # over the same HLO, so let the CPU client do it.
        from jax._src import xla_bridge
        from jax._src.lib import _jax
        c = _jax.hlo_module_cost_analysis(xla_bridge.get_backend("cpu"),
                                          lowered._lowering.hlo().as_hlo_module())
    c = c[0] if isinstance(c, (list, tuple)) else c
    return float(c.get("flops", 0.0))


def topology_devices(topology: str):
    """'v5p:2x2x2' -> devices of that TPU topology (needs jax[tpu]); raises RuntimeError."""
    try:
        from jax.experimental import topologies
        kind, _, shape = topology.partition(":")
        desc = topologies.get_topology_desc(platform="tpu", topology_name=f"{kind}:{shape}")
        return desc.devices
    except Exception as e:  # noqa: BLE001 - no libtpu, unknown name, ...
        raise RuntimeError(f"--topology {topology}: unavailable here ({type(e).__name__}: {e}); "
                           f"it needs jax[tpu] (pip install -e .[tpu])") from None


def dry_run(config, peak_tflops: float | None = None, step_time: float | None = None,
            target_mfu: float | None = None, devices=None, unrolled_flops: bool = True,
            print_fn=print) -> dict:
    """Compiles the step for `config`'s mesh; prints and returns the figures."""
    config = copy.deepcopy(config)
    if config.init_from and not os.path.exists(os.path.join(config.init_from, "config.json")):
        print_fn(f"dry run: {config.init_from} not here; model shape from "
                 f"model.size={config.model.size!r}")
        config.init_from = ""
    rules = sh.rules_from_config(config.sharding_rules)
    mesh = sh.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor, devices=devices)
    n_dev = mesh.devices.size
    lowered, layout, cfg = _lower(config, mesh, rules)
    compiled = lowered.compile()
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    fl = flops_lib.train_flops_per_step(
        cfg, global_batch=int(config.batch.global_size), seq_len=int(config.batch.seq_len),
        images_per_row=int(config.batch.max_images_per_row),
        trainable=tr.paths(layout.abstract.trainable),
        lora_rank=int(config.lora.rank), lora_targets=tuple(config.lora.targets))

    gib = 2.0 ** 30
    out = {
        "devices": n_dev, "mesh": dict(mesh.shape), "device_kind": mesh.devices.flat[0].device_kind,
        "params_trainable": tr.count(layout.abstract.trainable),
        "params_frozen": tr.count(layout.abstract.frozen),
        "mem_arguments_gib": mem.argument_size_in_bytes / gib,
        "mem_outputs_gib": mem.output_size_in_bytes / gib,
        "mem_aliased_gib": mem.alias_size_in_bytes / gib,
        "mem_temp_gib": mem.temp_size_in_bytes / gib,
        "compiled_flops_per_device_loops_once": float(cost.get("flops", 0.0)),
        "analytic_model_flops_per_step": fl["total"],
        "analytic_by_module": {k: v for k, v in fl.items() if k != "total"},
    }
    out["mem_peak_gib"] = (out["mem_arguments_gib"] + out["mem_outputs_gib"]
                           - out["mem_aliased_gib"] + out["mem_temp_gib"])
    # The compiler's own peak of live buffers (TPU reports it; the CPU client gives 0).
    out["mem_compiler_peak_gib"] = getattr(mem, "peak_memory_in_bytes", 0) / gib
    if unrolled_flops:
        flat = copy.deepcopy(config)
        flat.model.scan_layers = False
        k = int(config.batch.micro_batches)
        flat.batch.micro_batches = 1
        rows = int(config.batch.global_size) // k
        lo, _, _ = _lower(flat, mesh, rules, rows=rows)
        out["hlo_flops_per_step_unrolled"] = _lowered_flops(lo) * k
    tokens = int(config.batch.global_size) * int(config.batch.seq_len)
    if peak_tflops:
        peak = peak_tflops * 1e12 * n_dev
        if step_time:
            out["mfu_at_step_time"] = fl["total"] / step_time / peak
            out["tokens_per_s_at_step_time"] = tokens / step_time
        if target_mfu:
            out["step_time_at_target_mfu_s"] = fl["total"] / (target_mfu * peak)
            out["tokens_per_s_at_target_mfu"] = tokens / out["step_time_at_target_mfu_s"]
    print_fn(format_report(out, config, peak_tflops, step_time, target_mfu))
    return out


def format_report(o: dict, config, peak_tflops, step_time, target_mfu) -> str:
    b = config.batch
    lines = [
        f"dry run: {o['devices']} x {o['device_kind']} devices, mesh {o['mesh']}",
        f"  batch {b.global_size} rows x {b.seq_len} tokens, {b.micro_batches} micro batches, "
        f"{b.max_images_per_row} image(s)/row; scan_layers={config.model.scan_layers}, "
        f"remat={config.model.remat_policy}, compute {config.model.dtype}",
        f"  params: trainable {o['params_trainable']:,}, frozen {o['params_frozen']:,}",
        f"  memory per device (GiB): arguments {o['mem_arguments_gib']:.4g}, outputs "
        f"{o['mem_outputs_gib']:.4g}, aliased {o['mem_aliased_gib']:.4g}, temporaries "
        f"{o['mem_temp_gib']:.4g} -> peak ~{o['mem_peak_gib']:.4g}"
        + (f" (compiler's peak {o['mem_compiler_peak_gib']:.4g})"
           if o["mem_compiler_peak_gib"] else ""),
        f"  FLOPs/step, analytic model (no remat): {o['analytic_model_flops_per_step']:.4g} "
        f"(" + ", ".join(f"{k} {v:.3g}" for k, v in o["analytic_by_module"].items()) + ")",
        f"  FLOPs/device, compiled (loop bodies counted once): "
        f"{o['compiled_flops_per_device_loops_once']:.4g}",
    ]
    if "hlo_flops_per_step_unrolled" in o:
        h = o["hlo_flops_per_step_unrolled"]
        lines.append(f"  FLOPs/step, HLO unrolled x micro batches (incl. remat): {h:.4g} = "
                     f"{h / o['analytic_model_flops_per_step']:.3f} x analytic")
    if peak_tflops and step_time:
        lines.append(f"  at {step_time:g} s/step on {peak_tflops:g} TFLOP/s devices: MFU "
                     f"{100 * o['mfu_at_step_time']:.1f}%, "
                     f"{o['tokens_per_s_at_step_time']:,.0f} tokens/s")
    if peak_tflops and target_mfu:
        lines.append(f"  MFU {100 * target_mfu:.0f}% on {peak_tflops:g} TFLOP/s devices means "
                     f"{o['step_time_at_target_mfu_s']:.3g} s/step, "
                     f"{o['tokens_per_s_at_target_mfu']:,.0f} tokens/s")
    return "\n".join(lines)
