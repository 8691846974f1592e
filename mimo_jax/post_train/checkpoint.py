"""Orbax checkpoints of post-training runs: `WORKDIR/checkpoints/<step>/` with the items
`params` (every model variable, as training checkpoints: `mimo_jax.load`/`load_checkpoint`
read them), `opt_state`, `rng` and `meta` (model config, tokenizer, run config, step)."""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from flax import nnx

from mimo_jax.core.errors import CheckpointError
from mimo_jax.model.mimo import MiMo
from mimo_jax.train.checkpointing import _abstract, model_config_dict


class RunCheckpointer:
    def __init__(self, workdir: str, *, keep: int = 3):
        self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                               enable_async_checkpointing=False)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, model: MiMo, opt_state: Any, rng: jax.Array,
             meta: dict[str, Any]) -> None:
        items = dict(
            params=ocp.args.StandardSave(nnx.to_pure_dict(nnx.state(model))),
            rng=ocp.args.StandardSave({"key": rng}),
            meta=ocp.args.JsonSave(meta),
        )
        if opt_state is not None:
            items["opt_state"] = ocp.args.StandardSave(opt_state)
        self.manager.save(step, args=ocp.args.Composite(**items), force=True)
        self.manager.wait_until_finished()

    def restore(self, step: int, model: MiMo, opt_state: Any, rng: jax.Array):
        """(model with the saved variables, opt_state, rng, meta) onto the given targets."""
        state = nnx.state(model)
        args = ocp.args.Composite(
            params=ocp.args.StandardRestore(_abstract(nnx.to_pure_dict(state))),
            opt_state=ocp.args.StandardRestore(_abstract(opt_state)),
            rng=ocp.args.StandardRestore(_abstract({"key": rng})),
            meta=ocp.args.JsonRestore(),
        )
        try:
            out = self.manager.restore(step, args=args)
        except Exception as e:
            raise CheckpointError(
                f"cannot restore {os.path.join(self.directory, str(step))} "
                f"({type(e).__name__}: {str(e)[:300]}); it may be from another model or "
                "optimizer config: use another workdir") from None
        nnx.replace_by_pure_dict(state, out.params)
        return nnx.merge(nnx.graphdef(model), state), out.opt_state, out.rng["key"], out.meta

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def model_meta(model: MiMo, tokenizer_spec: dict, step: int, **extra: Any) -> dict[str, Any]:
    return {"config": model.cfg.to_hf(), "model_config": model_config_dict(model.cfg),
            "tokenizer": tokenizer_spec, "step": step, **extra}


def save_model(workdir: str, model: MiMo, tokenizer_spec: dict, **extra: Any) -> None:
    """A model alone as a checkpoint (step 0) that `load_checkpoint(workdir)` reads."""
    ck = RunCheckpointer(workdir, keep=1)
    try:
        ck.save(0, model, None, jax.random.key_data(jax.random.key(0)),
                model_meta(model, tokenizer_spec, 0, **extra))
    finally:
        ck.close()
