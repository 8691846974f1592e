"""The training loop: data, model, optimizer, checkpoints with exact resume, metrics, SIGTERM.

`train(tc, workdir)` resumes from the latest checkpoint in `workdir/checkpoints` when there is
one (the model config and tokenizer must match), else starts from a random init. Every
`save_every` steps, at the end, on SIGTERM/SIGINT (a TPU VM preemption) and when the time
limit is reached it saves params, optimizer state, data-iterator state, RNG and configs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import signal
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from mimo_jax.core.errors import CheckpointError
from mimo_jax.data import (
    load_tokenizer,
    open_source,
    split_documents,
    train_iterator,
    validation_batches,
)
from mimo_jax.model.config import ModelConfig
from mimo_jax.model.mimo import MiMo
from mimo_jax.parallel.placement import create_sharded
from mimo_jax.sharding.mesh import make_mesh
from mimo_jax.sharding.rules import ShardingRules, activate, activation_sharding
from mimo_jax.train.checkpointing import Checkpointer, check_compatible, model_config_dict
from mimo_jax.train.config import TrainConfig
from mimo_jax.train.metrics import MetricsLogger, flops_per_token, peak_flops_per_device
from mimo_jax.train.optimizer import make_optimizer
from mimo_jax.train.step import make_eval_step, make_train_step


@dataclasses.dataclass
class TrainResult:
    step: int  # the step reached (and saved)
    start_step: int  # where this run started (0 or the resumed checkpoint)
    losses: list[float]  # per-step training loss of this run
    val_loss: float | None
    val_perplexity: float | None
    stopped_by: str  # "steps" | "signal" | "time_limit"
    model: MiMo | None = None


def _meta(tc: TrainConfig, cfg: ModelConfig, tok_spec: dict, step: int) -> dict[str, Any]:
    return {
        "config": cfg.to_hf(),
        "model_config": model_config_dict(cfg),
        "tokenizer": tok_spec,
        "train_config": tc.to_dict(),
        "step": step,
    }


def evaluate(eval_step, params, other, batches, to_device) -> tuple[float, float]:
    """(mean main-head CE, perplexity) over fixed validation batches."""
    nll = count = 0.0
    for b in batches:
        s, c = eval_step(params, other, to_device(b))
        nll += float(s[0])
        count += float(c[0])
    loss = nll / max(count, 1.0)
    return loss, math.exp(min(loss, 50.0))


class _StopFlag:
    """Turns SIGTERM/SIGINT into a flag the loop checks after each step."""

    def __init__(self):
        self.signal: int | None = None
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: no handlers
                pass
        return self

    def _handle(self, signum, frame):
        self.signal = signum

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def train(tc: TrainConfig, workdir: str, *, log=None) -> TrainResult:
    """Train `tc` into `workdir`, resuming from its latest checkpoint; with `tc.stages`, run
    the stages in order (each resumes from the previous stage's last checkpoint)."""
    if not tc.stages:
        return _train_stage(tc, workdir, log=log)
    tc.validate(tc.model_config())
    stages = tc.stage_configs()
    result: TrainResult | None = None
    for i, stc in enumerate(stages):
        ckpt = Checkpointer(workdir, keep=1 << 30, async_save=False)
        try:
            latest = ckpt.latest_step()
        finally:
            ckpt.close()
        if latest is not None and latest >= stc.steps and i + 1 < len(stages):
            continue  # this stage is done
        prev_end = stages[i - 1].steps if i else 0
        r = _train_stage(stc, workdir, log=log, stage=(i + 1, len(stages), prev_end))
        if result is not None:
            r.start_step, r.losses = result.start_step, result.losses + r.losses
        result = r
        if r.stopped_by != "steps":
            break
    assert result is not None
    return result


def _train_stage(tc: TrainConfig, workdir: str, *, log=None,
                 stage: tuple[int, int, int] | None = None) -> TrainResult:
    """One stage; `stage` = (number, of how many, the step the previous stage ended at)."""
    cfg = tc.model_config()
    tc.validate(cfg)
    placement = None
    if tc.mesh:
        placement = (make_mesh(tc.mesh), ShardingRules.preset(tc.sharding_preset))
    elif jax.process_count() > 1:
        raise ValueError("multi-host training needs a mesh: set mesh=... (e.g. fsdp=-1)")
    tok = load_tokenizer(tc.data.tokenizer)
    if tok.vocab_size > cfg.vocab_size:
        raise ValueError(
            f"tokenizer has {tok.vocab_size} ids but the model vocab_size is "
            f"{cfg.vocab_size}: set model.vocab_size >= {tok.vocab_size}"
        )
    os.makedirs(workdir, exist_ok=True)
    ckpt = Checkpointer(workdir, keep=tc.keep_checkpoints, async_save=tc.async_checkpointing)
    latest = ckpt.latest_step()
    stage_changes = {}
    if latest is not None:  # fail on an incompatible checkpoint before any work
        stage_changes = check_compatible(ckpt.read_meta(latest), cfg, tok.spec,
                                         ckpt.step_dir(latest), stage_change=stage is not None)
    # A checkpoint of an earlier stage: this stage reads its own data (new length/batch/mix).
    new_stage = stage is not None and latest is not None and latest <= stage[2]

    docs = open_source(tc.data.source, tc.data.kind, tc.data.field)
    split = split_documents(
        len(docs), tc.data.val_fraction, tc.data.seed, jax.process_index(), jax.process_count()
    )
    local_batch = tc.batch_size // jax.process_count()
    data_it = train_iterator(docs, split, tok, tc.seq_len, local_batch, tc.data.seed)
    val = validation_batches(docs, split, tok, tc.seq_len, local_batch, tc.data.val_batches)

    tx = make_optimizer(tc)
    rng = jax.random.key_data(jax.random.key(tc.seed))
    if placement is None:
        model = MiMo(cfg, rngs=nnx.Rngs(tc.seed), remat=tc.remat)
    else:  # parameters are created in their shards; the optimizer state follows them
        model = create_sharded(cfg, *placement, seed=tc.seed, remat=tc.remat)
    def init_opt_state(params):
        opt_state = jax.jit(tx.init)(params)
        if placement is None:
            return opt_state
        # Leaves that follow no parameter (the step count) go to every device of the mesh.
        replicated = NamedSharding(placement[0], PartitionSpec())
        return jax.tree.map(
            lambda x: x if len(x.sharding.device_set) > 1 else jax.device_put(x, replicated),
            opt_state,
        )

    if latest is None:
        graphdef, params, other = nnx.split(model, nnx.Param, ...)
        opt_state = init_opt_state(params)
        step = 0
    else:
        # The fresh model and optimizer state are the restore targets: shapes and shardings.
        state = nnx.state(model)
        _, fresh_params, _ = nnx.split(model, nnx.Param, ...)
        restored, opt_state, rng = ckpt.restore(
            latest,
            model_state=nnx.to_pure_dict(state),
            opt_state=init_opt_state(fresh_params),
            data_iter=None if new_stage else data_it,
            rng=rng,
        )
        nnx.replace_by_pure_dict(state, restored)
        model = nnx.merge(nnx.graphdef(model), state)
        graphdef, params, other = nnx.split(model, nnx.Param, ...)
        step = latest
    start_step = step

    # On a mesh the step hands back its state in the shardings it was given: one compile.
    shardings = None
    if placement is not None:
        shardings = jax.tree.map(lambda x: x.sharding, (params, other, opt_state))
    train_step = make_train_step(graphdef, tc, cfg, tx, state_shardings=shardings)
    eval_step = make_eval_step(graphdef, tc)
    tokens_per_step = tc.batch_size * tc.seq_len
    flops_step = flops_per_token(cfg, tc.seq_len) * tokens_per_step
    peak, _ = peak_flops_per_device()
    if placement is not None:
        peak *= placement[0].size

    def to_device(batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        if placement is None:
            return {k: jnp.asarray(v) for k, v in batch.items()}
        # Each host holds its rows of the global batch; the array spans the whole mesh.
        out = {}
        for k, v in batch.items():
            shape = (tc.batch_size, *v.shape[1:])
            sharding = activation_sharding(*placement, shape, ("batch",) + (None,) * (v.ndim - 1))
            out[k] = jax.make_array_from_process_local_data(sharding, v, shape)
        return out

    logger = MetricsLogger(
        workdir,
        total_steps=None if tc.time_limit_minutes else tc.steps,
        start_step=step,
        tensorboard=tc.tensorboard,
        progress_bar=tc.progress_bar,
        console_every=tc.console_every,
        config={"train": tc.to_dict(), "model": model_config_dict(cfg)},
    )
    say = log or logger.write
    if stage is not None:
        changed = ", ".join(f"{k} {a} -> {b}" for k, (a, b) in stage_changes.items())
        say(f"stage {stage[0]}/{stage[1]} (steps {stage[2]}..{tc.steps}, seq_len {tc.seq_len}, "
            f"batch {tc.batch_size}){': model ' + changed if changed else ''}")
    say(
        f"{'resuming from step ' + str(step) if latest is not None else 'starting'}: "
        f"{len(split.train)} train / {len(split.val)} val documents, "
        f"{tokens_per_step} tokens/step, {flops_per_token(cfg, tc.seq_len):.3g} FLOPs/token"
    )

    def save(at: int, wait: bool = False) -> None:
        ckpt.save(
            at,
            model_state=nnx.to_pure_dict(nnx.state(nnx.merge(graphdef, params, other))),
            opt_state=opt_state,
            data_iter=data_it,
            rng=rng,
            meta=_meta(tc, cfg, tok.spec, at),
            wait=wait,
        )

    losses: list[float] = []
    val_loss = val_ppl = None
    stopped_by = "steps"
    val_step = None
    saved_at = latest
    t_start = time.monotonic()
    t_last, step_last = time.perf_counter(), step
    try:
        mesh_ctx = contextlib.nullcontext() if placement is None else activate(*placement)
        with _StopFlag() as stop, mesh_ctx:
            while step < tc.steps:
                batch = to_device(next(data_it))
                params, other, opt_state, m = train_step(
                    params, other, opt_state, batch, jnp.asarray(step, jnp.int32)
                )
                step += 1
                if step % tc.log_every == 0 or step == tc.steps:
                    m = jax.device_get(m)
                    now = time.perf_counter()
                    dt = (now - t_last) / max(step - step_last, 1)
                    t_last, step_last = now, step
                    rec = {
                        "step": step,
                        **m,
                        "step_time_s": dt,
                        "tokens_per_s": tokens_per_step / dt,
                        "mfu": flops_step / dt / peak,
                    }
                    losses.append(float(m["loss"]))
                    logger.log(rec)
                    logger.advance(step, float(m["loss"]))
                if val and (step % tc.val_every == 0 or step == tc.steps):
                    val_loss, val_ppl = evaluate(eval_step, params, other, val, to_device)
                    val_step = step
                    logger.log(
                        {"step": step, "split": "val", "loss": val_loss, "perplexity": val_ppl}
                    )
                    t_last = time.perf_counter()
                if step % tc.save_every == 0:
                    save(step)
                    saved_at = step
                if stop.signal is not None:
                    stopped_by = "signal"
                    say(f"signal {stop.signal}: saving step {step} and stopping")
                    break
                if (
                    tc.time_limit_minutes
                    and time.monotonic() - t_start > 60 * tc.time_limit_minutes
                ):
                    stopped_by = "time_limit"
                    break
        if saved_at != step:
            save(step, wait=True)
        if val and val_step != step:  # the reported validation is of the final params
            with contextlib.nullcontext() if placement is None else activate(*placement):
                val_loss, val_ppl = evaluate(eval_step, params, other, val, to_device)
    finally:
        ckpt.close()
        logger.close()
    return TrainResult(
        step, start_step, losses, val_loss, val_ppl, stopped_by, nnx.merge(graphdef, params, other)
    )


def load_checkpoint(workdir: str, step: int | None = None) -> tuple[MiMo, dict[str, Any]]:
    """The model (all variables) and meta of a training checkpoint, for sampling or export."""
    from mimo_jax.train.checkpointing import model_config_from_dict

    ckpt = Checkpointer(workdir, keep=1 << 30, async_save=False)
    try:
        step = ckpt.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"no checkpoint in {ckpt.directory}")
        meta = ckpt.read_meta(step)
        cfg = model_config_from_dict(meta["model_config"])
        abstract = nnx.eval_shape(lambda: MiMo(cfg, rngs=nnx.Rngs(0)))
        state = nnx.state(abstract)
        import orbax.checkpoint as ocp

        from mimo_jax.train.checkpointing import _abstract

        out = ckpt.manager.restore(
            step,
            args=ocp.args.Composite(
                params=ocp.args.StandardRestore(_abstract(nnx.to_pure_dict(state)))
            ),
        )
        nnx.replace_by_pure_dict(state, out.params)
        return nnx.merge(nnx.graphdef(abstract), state), meta
    finally:
        ckpt.close()
