"""Train checkpoints (orbax CheckpointManager) and the end-of-training export.

    WORKDIR/checkpoints/<step>/state/    TrainState (step, trainable, frozen, opt_state)
    WORKDIR/checkpoints/<step>/data/     process_<i>-of-<n>.json: each process's input-iterator
                                         state, taken right after the batch of that step
    WORKDIR/checkpoints/<step>/config/   the run's config (JSON)

Saves are asynchronous (the step loop continues while arrays are written) and the manager keeps
the last `keep`. A checkpoint only counts once orbax has committed it, so a run killed mid-save
resumes from the previous one. Restoring takes the abstract state of the CURRENT run (shapes and
target shardings), so a checkpoint written on one mesh restores onto another.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

# --------------------------------------------------------------------------------------------
# Per-process data-iterator state as an orbax item


class DataStateHandler(ocp.CheckpointHandler):
    """Writes / reads one JSON file per process (grain's layout: process_<i>-of-<n>.json).

    It stores a state dict captured when the batch was drawn rather than asking a live iterator,
    so the loop may prefetch ahead of the step being checkpointed.
    """

    def save(self, directory: epath.Path, args: "DataStateSave"):
        name = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
        (directory / name).write_text(json.dumps(args.state, indent=1))

    def restore(self, directory: epath.Path, args: "DataStateRestore" = None):
        name = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
        path = directory / name
        if not path.exists():
            found = sorted(p.name for p in directory.iterdir())
            raise ValueError(f"{path} missing: the checkpoint's data state was written by "
                             f"another process count ({found}); the input pipeline state is "
                             f"tied to the number of processes")
        return json.loads(path.read_text())

    def metadata(self, directory):
        return None

    def finalize(self, directory):
        pass

    def close(self):
        pass


@ocp.args.register_with_handler(DataStateHandler, for_save=True)
@dataclasses.dataclass
class DataStateSave(ocp.args.CheckpointArgs):
    state: Any


@ocp.args.register_with_handler(DataStateHandler, for_restore=True)
@dataclasses.dataclass
class DataStateRestore(ocp.args.CheckpointArgs):
    pass


# --------------------------------------------------------------------------------------------
# The manager


class Checkpointer:
    def __init__(self, directory: str, keep: int = 3, async_save: bool = True):
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True)
        self.manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=("state", "data", "config"),
            item_handlers={"state": ocp.StandardCheckpointHandler(),
                           "data": DataStateHandler(),
                           "config": ocp.JsonCheckpointHandler()})

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state, data_state: dict, config_dict: dict) -> bool:
        return self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=DataStateSave(data_state),
            config=ocp.args.JsonSave(config_dict)), force=True)

    def restore(self, step: int, abstract_state):
        """-> (state in the shardings of `abstract_state`, data state dict, config dict)."""
        out = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), data=DataStateRestore(),
            config=ocp.args.JsonRestore()))
        return out.state, out.data, out.config

    def wait(self):
        self.manager.wait_until_finished()

    def close(self):
        self.manager.wait_until_finished()
        self.manager.close()


def config_to_dict(config) -> dict:
    return json.loads(config.to_json_best_effort())


# --------------------------------------------------------------------------------------------
# Export: an owl-convert style directory that owl-generate / owl-convert / init_from read


def export(directory: str, state, layout, config, tokenizer_dir: str | None = None,
           overwrite: bool = True) -> dict:
    """Writes the full param tree (unrolled layout, LoRA adapters unmerged) with config.json,
    tokenizer files and owl_jax.json (which records the LoRA rank / alpha / targets; the
    converter's jax-to-torch merges them)."""
    from owl_jax import checkpoint as ckpt
    from owl_jax.train.state import host_params_unrolled
    params = host_params_unrolled(state)
    lora = None
    if config.lora.rank:
        lora = {"rank": int(config.lora.rank), "alpha": float(config.lora.alpha),
                "targets": list(config.lora.targets)}
    return ckpt.save_checkpoint(directory, params, layout.cfg, tokenizer_dir=tokenizer_dir,
                                lora=lora, overwrite=overwrite,
                                extra_meta={"trained_steps": int(jax.device_get(state.step))})
