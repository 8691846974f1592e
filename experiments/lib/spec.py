"""Declared experiments: a `Scale` (where and how big), an `Experiment` (one training config
plus the evaluations to run after it) and a `Sweep` (a named list of experiments compared in
one report table).

An experiment is built on `mimo_jax.train.TrainConfig`: a preset plus `key=value` overrides
(`model.X`, `data.X`, plain fields), the scale's own overrides (mesh, batch, sequence length,
steps, model size) and finally the user's `--set` flags, in that order. Values may be
`Scaled(...)` markers that depend on the scale, e.g. a sliding window of "4 x the scale's
reference window" (16 -> 64 on a CPU, 128 -> 512 on a pod, the report's W=128 vs W=512).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any

from mimo_jax.train import TrainConfig


class ExperimentError(ValueError):
    """A declared experiment that cannot run as asked (unknown name or scale, memory, ...)."""


@dataclasses.dataclass(frozen=True)
class Scale:
    """Where an experiment runs and how big it is at that size."""

    name: str  # "tiny", "v5p-8", ...
    accelerator: str  # "cpu" | "v5p" | "v5e" (a key of mimo_jax.parallel.plan.CHIPS_GIB)
    chips: int  # devices in the slice (1 for a CPU run)
    hosts: int  # TPU VM workers; > 1 means jax.distributed.initialize() on every worker
    mesh: str  # TrainConfig.mesh ("" = one device)
    batch_size: int  # global sequences per optimizer step
    seq_len: int
    steps: int
    window: int  # the reference sliding window at this scale (keys, the query included)
    train: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # more overrides
    accelerator_type: str = ""  # gcloud --accelerator-type ("v5p-8", "v5litepod-16")
    runtime_version: str = ""  # gcloud --version / --runtime-version of the TPU VM image

    @property
    def is_tpu(self) -> bool:
        return self.accelerator != "cpu"

    def overrides(self) -> dict[str, Any]:
        out = {"batch_size": self.batch_size, "seq_len": self.seq_len, "steps": self.steps,
               "mesh": self.mesh}
        out.update(self.train)
        return out

    def with_(self, **changes: Any) -> Scale:
        """A copy with fields replaced; `train` is merged, not replaced."""
        if "train" in changes:
            changes["train"] = {**self.train, **changes["train"]}
        return dataclasses.replace(self, **changes)


@dataclasses.dataclass(frozen=True)
class Scaled:
    """A value that depends on the scale: `times` x the scale's attribute `of` (an int)."""

    of: str = "window"
    times: int = 1

    def resolve(self, scale: Scale) -> int:
        return int(getattr(scale, self.of)) * self.times

    def __repr__(self) -> str:
        return f"{self.times} x scale.{self.of}" if self.times != 1 else f"scale.{self.of}"


@dataclasses.dataclass(frozen=True)
class LayerPattern:
    """`model.layer_types` for any depth: `sliding_per_global` N gives the report's hybrid rule
    generalised (global at layer 0 and after every N sliding layers: 5 -> layers 0, 5, 11, ...);
    None gives global attention everywhere."""

    sliding_per_global: int | None

    def layer_types(self, num_layers: int) -> tuple[str, ...]:
        n = self.sliding_per_global
        if n is None:
            return ("full",) * num_layers
        return tuple("full" if i == 0 or (i + 1) % (n + 1) == 0 else "sliding"
                     for i in range(num_layers))

    def __repr__(self) -> str:
        n = self.sliding_per_global
        return "all global" if n is None else f"hybrid {n}:1 (global at 0 and every {n + 1}th)"


@dataclasses.dataclass(frozen=True)
class EvalSpec:
    """One evaluation run on the final parameters.

    kinds: "perplexity" (validation loss, perplexity, bits per byte on the held-out batches),
    "mtp" (teacher-forced acceptance per MTP head and the implied acceptance length),
    "passkey" (retrieval of a 5-digit key at `contexts`, given in units of the scale's window).
    """

    kind: str
    options: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    KINDS = ("perplexity", "mtp", "passkey")

    def __post_init__(self) -> None:
        if self.kind not in self.KINDS:
            raise ExperimentError(f"unknown eval {self.kind!r}; have {self.KINDS}")


@dataclasses.dataclass(frozen=True)
class Experiment:
    """One training configuration at several scales, and the evaluations that follow it."""

    name: str  # "sweep/variant/seed" style; also the run directory below the scale
    description: str
    scales: tuple[Scale, ...]
    preset: str = "tiny-cpu"
    train: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    evals: tuple[EvalSpec, ...] = ()
    labels: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # report grouping

    def scale(self, name: str | None = None) -> Scale:
        if name is None:
            return self.scales[0]
        for s in self.scales:
            if s.name == name:
                return s
        raise ExperimentError(
            f"experiment {self.name!r} has no scale {name!r}; have {[s.name for s in self.scales]}"
        )

    def overrides(self, scale: Scale) -> dict[str, Any]:
        """Scale overrides, then the experiment's (dict values such as
        `model.sliding_attention` are merged key by key), with `Scaled` markers resolved."""
        merged = dict(scale.overrides())
        for k, v in self.train.items():
            old = merged.get(k)
            merged[k] = {**old, **v} if isinstance(old, dict) and isinstance(v, dict) else v
        return {k: _resolve(v, scale) for k, v in merged.items()}

    def train_config(self, scale: str | Scale | None = None, sets: list[str] = ()) -> TrainConfig:
        """The resolved TrainConfig: preset <- scale <- experiment <- `sets` ("key=value")."""
        s = scale if isinstance(scale, Scale) else self.scale(scale)
        over = self.overrides(s)
        patterns = {k: over.pop(k) for k in list(over) if isinstance(over[k], LayerPattern)}
        try:
            tc = TrainConfig.preset(self.preset).override(over).override(list(sets))
            if patterns:  # layer patterns need the final number of layers
                n = tc.model_config().num_layers
                tc = tc.override({k: list(p.layer_types(n)) for k, p in patterns.items()})
            tc.validate(tc.model_config())
        except ValueError as e:
            raise ExperimentError(f"{self.name} at {s.name}: {e}") from None
        return tc

    def eval_options(self, spec: EvalSpec, scale: Scale) -> dict[str, Any]:
        return {k: _resolve(v, scale) for k, v in spec.options.items()}


@dataclasses.dataclass(frozen=True)
class Sweep:
    """A named list of experiments compared in one report table."""

    name: str
    description: str
    experiments: tuple[Experiment, ...]
    group_by: str = "variant"  # label whose values are the table's rows (seeds are averaged)
    claim: str = ""  # what the MiMo-V2-Flash report found, for the report's verdict
    metrics: tuple[str, ...] = ("val_loss", "bits_per_byte")
    # rows {variant: {metric: (mean, std | None, n)}} -> one sentence: does the direction
    # agree with the report?
    verdict: Callable[[dict], str] | None = None

    def __post_init__(self) -> None:
        names = [e.name for e in self.experiments]
        if len(set(names)) != len(names):
            raise ExperimentError(f"sweep {self.name!r} has duplicate experiment names")

    @property
    def scale_names(self) -> list[str]:
        seen: list[str] = []
        for e in self.experiments:
            seen += [s.name for s in e.scales if s.name not in seen]
        return seen


def _resolve(value: Any, scale: Scale) -> Any:
    if isinstance(value, Scaled):
        return value.resolve(scale)
    if isinstance(value, dict):
        return {k: _resolve(v, scale) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_resolve(v, scale) for v in value)
    return value


# --------------------------------------------------------------------------- memory check
def check_memory(tc: TrainConfig, scale: Scale, *, host_bytes: int | None = None):
    """The per-device memory plan of `tc` on the scale's slice; raise if it does not fit.

    Runs on abstract shapes only (nothing is allocated). A TPU scale must fit 90% of one chip's
    HBM; a CPU run must fit half the host's memory.
    """
    from mimo_jax.parallel.plan import CHIPS_GIB, GIB, format_plan, plan_memory
    from mimo_jax.sharding.mesh import mesh_shape
    from mimo_jax.sharding.rules import ShardingRules

    if tc.stages:  # every training stage must fit; the plan of the largest is returned
        tc.validate(tc.model_config())
        plans = []
        for i, stc in enumerate(tc.stage_configs(), start=1):
            try:
                plans.append(check_memory(stc, scale, host_bytes=host_bytes))
            except ExperimentError as e:
                raise ExperimentError(f"stage {i} (seq_len {stc.seq_len}, batch "
                                      f"{stc.batch_size}, mesh {stc.mesh!r}): {e}") from None
        return max(plans, key=lambda p: p.train_total)
    cfg = tc.model_config()
    tc.validate(cfg)
    devices = scale.chips
    if tc.mesh and not scale.is_tpu:  # a CPU/GPU run: the mesh spans this machine's devices
        import jax

        devices = jax.device_count()
    try:
        shape = mesh_shape(tc.mesh or "data=1", devices if tc.mesh else 1)
    except ValueError as e:
        raise ExperimentError(f"{scale.name}: {e}") from None
    if tc.mesh and math.prod(shape.values()) != devices:
        raise ExperimentError(f"mesh {tc.mesh!r} does not use the {devices} chips of {scale.name}")
    plan = plan_memory(
        cfg, shape, ShardingRules.preset(tc.sharding_preset),
        batch=tc.batch_size // tc.grad_accum, seq=tc.seq_len,
        param_bytes=4 if tc.param_dtype == "float32" else 2,
        compute_bytes=4 if tc.compute_dtype == "float32" else 2,
        remat="none" if tc.remat == "none" else "full",
        loss_chunk=tc.loss_chunk_tokens,
    )
    if scale.is_tpu:
        if scale.accelerator not in CHIPS_GIB:
            raise ExperimentError(f"no HBM size known for accelerator {scale.accelerator!r}")
        limit = 0.9 * CHIPS_GIB[scale.accelerator] * GIB
        where = f"90% of a {scale.accelerator} chip ({CHIPS_GIB[scale.accelerator]} GiB)"
    else:
        if host_bytes is None:
            import os

            host_bytes = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        limit = 0.5 * host_bytes
        where = f"half of this host's {host_bytes / GIB:.1f} GiB"
    if plan.train_total > limit:
        raise ExperimentError(
            f"{scale.name}: the training state needs {plan.train_total / GIB:.2f} GiB per device, "
            f"more than {where}; use more chips, a smaller batch or grad_accum, or remat\n"
            + format_plan(plan)
        )
    return plan
