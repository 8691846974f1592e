"""The jitted training and evaluation steps (pure functions of the split model state).

The model is split once into (graphdef, params: nnx.Param, other: RouterBias) and every step
maps (params, other, opt_state, batch, step) to new ones: the optimizer touches Params only,
the balance rule updates the RouterBias state afterwards.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from mimo_jax.model.config import ModelConfig
from mimo_jax.train.balance import load_imbalance, update_bias
from mimo_jax.train.config import TrainConfig
from mimo_jax.train.loss import loss_parts, shifted_targets, total_loss
from mimo_jax.train.optimizer import lr_schedule


def mtp_lambda(tc: TrainConfig, step: jax.Array) -> jax.Array:
    if tc.mtp_lambda_switch_step is None:
        return jnp.asarray(tc.mtp_lambda, jnp.float32)
    return jnp.where(step >= tc.mtp_lambda_switch_step, tc.mtp_lambda_late, tc.mtp_lambda)


def target_counts(batch: dict[str, jax.Array], n_heads: int) -> jax.Array:
    """Valid targets of the main head and each MTP head over the whole batch: [1 + n_mtp]."""
    return jnp.stack(
        [
            jnp.sum(shifted_targets(batch["ids"], batch["segment_ids"], 1 + k)[1])
            for k in range(n_heads)
        ]
    )


def make_train_step(
    graphdef: nnx.GraphDef,
    tc: TrainConfig,
    cfg: ModelConfig,
    tx: optax.GradientTransformation,
    *,
    donate: bool = True,
    state_shardings: tuple[Any, Any, Any] | None = None,
) -> Callable[..., tuple[Any, Any, Any, dict[str, jax.Array]]]:
    """The jitted step ``(params, other, opt_state, batch, step) -> (params, other, opt_state,
    metrics)``.

    With ``donate`` (default) the train state (params, other, opt_state) is donated: XLA updates
    it in place instead of holding two copies, so the caller must use the returned state and
    never read the arrays it passed in again (they are deleted).

    ``state_shardings``: the shardings of (params, other, opt_state) on a mesh (e.g.
    ``jax.tree.map(lambda x: x.sharding, state)``). The step returns its new state with exactly
    these shardings (metrics replicated), so the next step's inputs match the first one's and
    the step compiles once. Left to itself XLA hands back equivalent shardings spelled
    differently (size-1 mesh axes dropped, e.g. ``P('fsdp', 'tensor')`` -> ``P('fsdp',)``),
    which ``jax.jit`` treats as new input shardings: step 2 compiled again (seen with
    ``fsdp=2,context=4``).
    """
    n_heads = 1 + cfg.num_mtp_layers
    a = tc.grad_accum
    schedule = lr_schedule(tc)

    def micro_loss(params, other, mb, counts, lam):
        model = nnx.merge(graphdef, params, other)
        parts = loss_parts(model, mb, chunk=tc.loss_chunk_tokens)
        loss, aux = total_loss(
            parts,
            counts,
            mtp_lambda=lam,
            balance_coef=tc.balance_coef,
            z_loss_coef=tc.z_loss_coef,
            num_micro=a,
        )
        return loss, (aux, parts.expert_load)

    grad_fn = jax.value_and_grad(micro_loss, has_aux=True)

    def step_fn(params, other, opt_state, batch, step):
        counts = target_counts(batch, n_heads)
        lam = mtp_lambda(tc, step)
        micro = jax.tree.map(lambda x: x.reshape(a, x.shape[0] // a, *x.shape[1:]), batch)
        if a == 1:
            (loss, (aux, load)), grads = grad_fn(
                params, other, jax.tree.map(lambda x: x[0], micro), counts, lam
            )
        else:

            def body(carry, mb):
                (loss, (aux, load)), g = grad_fn(params, other, mb, counts, lam)
                return jax.tree.map(jnp.add, carry, (loss, aux, load, g)), None

            zero = jax.eval_shape(
                lambda: grad_fn(params, other, jax.tree.map(lambda x: x[0], micro), counts, lam)
            )
            zero = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), zero)
            init = (zero[0][0], zero[0][1][0], zero[0][1][1], zero[1])
            (loss, aux, load, grads), _ = jax.lax.scan(body, init, micro)
        grad_norm = optax.tree.norm(grads)
        num_zeros = sum(_count_zeros(g) for g in jax.tree.leaves(grads))
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        if load.size:
            other = update_bias(other, load, tc.bias_gamma, cfg)
        metrics = {
            "loss": loss,
            "ce": aux["ce"][0],
            "mtp_ce": aux["ce"][1:],
            "mtp_lambda": lam,
            "balance_loss": aux["balance"],
            "z_loss": aux["z"],
            "grad_norm": grad_norm,
            "grad_num_zeros": num_zeros,
            "lr": schedule(step),
            "tokens": counts[0],
        }
        if load.size:
            metrics["expert_load_imbalance"] = load_imbalance(load)
        return params, other, opt_state, metrics

    jit_kw: dict[str, Any] = {}
    if state_shardings is not None:
        meshes = [x.mesh for x in jax.tree.leaves(state_shardings) if isinstance(x, NamedSharding)]
        if meshes:
            replicated = NamedSharding(meshes[0], PartitionSpec())
            jit_kw["out_shardings"] = (*state_shardings, replicated)
    return jax.jit(step_fn, donate_argnums=(0, 1, 2) if donate else (), **jit_kw)


def _count_zeros(g: jax.Array) -> jax.Array:
    """Exact int32 count of zero entries. Reducing the minor axis first keeps the compare fused
    into the reduction (a flat sum of ``g == 0`` materialised an int32 copy of every gradient
    and tree-reduced it: ~4% of a CPU step)."""
    if g.ndim < 2:
        return jnp.sum(g == 0, dtype=jnp.int32)
    return jnp.sum(jnp.sum(g == 0, axis=-1, dtype=jnp.int32))


def make_eval_step(
    graphdef: nnx.GraphDef, tc: TrainConfig
) -> Callable[..., tuple[jax.Array, jax.Array]]:
    """(params, other, batch) -> (summed CE [1 + n_mtp], target counts [1 + n_mtp])."""

    def eval_fn(params, other, batch):
        model = nnx.merge(graphdef, params, other)
        parts = loss_parts(model, batch, chunk=tc.loss_chunk_tokens)
        return parts.nll_sum, parts.count

    return jax.jit(eval_fn)
