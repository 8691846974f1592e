"""Orbax training checkpoints: `WORKDIR/checkpoints/<step>/` with items

- `params`: `nnx.to_pure_dict(nnx.state(model))`, every model variable (Params and RouterBias)
  as a nested dict by state path (what `mimo-jax convert` and `load` read);
- `meta`: JSON {"config": ModelConfig.to_hf(), "model_config": every ModelConfig field,
  "tokenizer": spec, "train_config": TrainConfig, "step": int};
- `opt_state`: the optax state; `data`: the Grain iterator state; `rng`: the run's key data.

Saves are asynchronous and Orbax writes each step into a temporary directory that it renames
only when complete, so a crash or kill during a save leaves the previous steps usable.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp

from mimo_jax.core.errors import CheckpointError
from mimo_jax.model.config import AttentionSpec, ModelConfig, stage_changes


def model_config_dict(cfg: ModelConfig) -> dict[str, Any]:
    """Every ModelConfig field, JSON-able (to_hf() drops e.g. dtype and capacity factor)."""
    d = dataclasses.asdict(cfg)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def model_config_from_dict(d: dict[str, Any]) -> ModelConfig:
    d = dict(d)
    for k in ("full_attention", "sliding_attention"):
        d[k] = AttentionSpec(**d[k])
    for k in ("layer_types", "mlp_types"):
        d[k] = tuple(d[k])
    if isinstance(d.get("eos_token_id"), list):
        d["eos_token_id"] = tuple(d["eos_token_id"])
    return ModelConfig(**d)


def checkpoint_directory(workdir: str) -> str:
    """WORKDIR/checkpoints, or the location named in WORKDIR/checkpoints.url (e.g. a gs://
    bucket every host of a TPU slice shares, while metrics stay on local disk)."""
    pointer = os.path.join(workdir, "checkpoints.url")
    if os.path.isfile(pointer):
        with open(pointer) as f:
            url = f.read().strip()
        if url:
            return url
    return os.path.abspath(os.path.join(workdir, "checkpoints"))


class Checkpointer:
    def __init__(self, workdir: str, *, keep: int = 3, async_save: bool = True):
        self.directory = checkpoint_directory(workdir)
        local = "://" not in self.directory
        if local and os.path.exists(self.directory) and not os.path.isdir(self.directory):
            raise CheckpointError(f"{self.directory} exists and is not a directory")
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=async_save, create=True
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def step_dir(self, step: int) -> str:
        return os.path.join(self.directory, str(step))

    def read_meta(self, step: int) -> dict[str, Any]:
        try:
            out = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
            meta = out.meta
        except Exception as e:
            raise CheckpointError(
                f"checkpoint {self.step_dir(step)} is unreadable ({type(e).__name__}: {e}); "
                "move it aside to resume from an earlier step"
            ) from None
        if not isinstance(meta, dict) or "model_config" not in meta:
            raise CheckpointError(f"checkpoint {self.step_dir(step)} has no usable meta item")
        return meta

    def save(
        self,
        step: int,
        *,
        model_state: dict,
        opt_state: Any,
        data_iter: Any,
        rng: jax.Array,
        meta: dict[str, Any],
        wait: bool = False,
    ) -> None:
        """Start an (async) save of everything needed to resume at `step`."""
        args = ocp.args.Composite(
            params=ocp.args.StandardSave(model_state),
            opt_state=ocp.args.StandardSave(opt_state),
            rng=ocp.args.StandardSave({"key": rng}),
            data=grain.checkpoint.CheckpointSave(data_iter),
            meta=ocp.args.JsonSave(meta),
        )
        self.manager.save(step, args=args, force=True)
        if wait:
            self.manager.wait_until_finished()

    def restore(
        self, step: int, *, model_state: dict, opt_state: Any, data_iter: Any, rng: jax.Array
    ) -> tuple[dict, Any, jax.Array]:
        """Restore onto abstract targets (ShapeDtypeStructs); the data iterator in place
        (`data_iter=None`: a new training stage reads its own data from the start)."""
        items = dict(
            params=ocp.args.StandardRestore(_abstract(model_state)),
            opt_state=ocp.args.StandardRestore(_abstract(opt_state)),
            rng=ocp.args.StandardRestore(_abstract({"key": rng})),
        )
        if data_iter is not None:
            items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
        args = ocp.args.Composite(**items)
        try:
            out = self.manager.restore(step, args=args)
        except Exception as e:
            raise CheckpointError(
                f"cannot restore checkpoint {self.step_dir(step)} ({type(e).__name__}: "
                f"{str(e)[:500]}); it may be corrupt or from a different model/optimizer "
                "config; move it aside to resume from an earlier step"
            ) from None
        return out.params, out.opt_state, out.rng["key"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def _abstract(tree: Any) -> Any:
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])

    def one(x):
        if isinstance(x, jax.ShapeDtypeStruct) and x.sharding is not None:
            return x
        return jax.ShapeDtypeStruct(
            x.shape, x.dtype, sharding=getattr(x, "sharding", None) or sharding
        )

    return jax.tree.map(one, tree)


def check_compatible(
    meta: dict[str, Any], cfg: ModelConfig, tokenizer_spec: dict, where: str,
    *, stage_change: bool = False,
) -> dict[str, tuple[Any, Any]]:
    """Raise CheckpointError if the checkpoint's model or tokenizer differs from this run's.

    `stage_change`: this run is the next training stage of the checkpoint's, which may change
    the fields in `STAGE_MODEL_FIELDS` (RoPE bases, context length); returns those changes.
    """
    saved = meta.get("model_config", {})
    want = model_config_dict(cfg)
    diffs = [k for k in sorted(set(saved) | set(want)) if saved.get(k) != want.get(k)]
    changes: dict[str, tuple[Any, Any]] = {}
    if diffs and stage_change:
        try:
            changes = stage_changes(model_config_from_dict(saved), cfg)
            diffs = []
        except (TypeError, ValueError):
            pass  # reported below, field by field
    if diffs:
        shown = ", ".join(
            f"{k}: checkpoint {saved.get(k)!r} vs run {want.get(k)!r}" for k in diffs[:4]
        )
        raise CheckpointError(
            f"checkpoint {where} was trained with a different model config ({shown}); use "
            "another --workdir or the same settings"
        )
    if meta.get("tokenizer") != tokenizer_spec:
        raise CheckpointError(
            f"checkpoint {where} used tokenizer {meta.get('tokenizer')} but this run uses "
            f"{tokenizer_spec}; use another --workdir or the same tokenizer"
        )
    return changes
