"""Training configuration: one typed dataclass, named presets, and `key=value` overrides.

`TrainConfig.preset("tiny-cpu").override(["lr=1e-3", "data.source=/corpus", "model.num_layers=4"])`
- plain keys set TrainConfig fields, `data.*` the DataConfig, `model.*` are ModelConfig fields
  passed to the preset's model constructor (`model_preset`: "tiny" or "flash").
Values are parsed as JSON when possible ("3", "1e-3", "true", "null", "[1,2]"), else strings.

`stages` makes one run a sequence of training stages (e.g. 32K pre-training, then a 256K
extension with a larger global-layer RoPE base): the fields above are stage 1, which ends at
`steps`; each later stage is a dict of the same `key=value` overrides applied on top of the
stages before it, with its own `steps` (the step it ends at). A stage may change anything
that does not change the parameters: sequence length, batch, optimizer schedule, data, mesh,
and the model's RoPE/context fields (`STAGE_MODEL_FIELDS`); training resumes across the
boundary from the previous stage's last checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from mimo_jax.core.dtypes import canonical_dtype
from mimo_jax.model.config import AttentionSpec, ModelConfig


@dataclasses.dataclass(frozen=True)
class DataConfig:
    source: str = "stdlib"  # "stdlib" (the interpreter's .py files) or comma-separated paths
    kind: str = "auto"  # auto | text | jsonl | parquet | arrayrecord
    field: str = "text"  # JSONL / Parquet text field
    tokenizer: dict = dataclasses.field(default_factory=lambda: {"kind": "byte"})
    val_fraction: float = 0.02  # held-out documents
    val_batches: int = 4  # fixed validation batches evaluated every `val_every` steps
    seed: int = 0  # split and shuffle seed


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything a training run needs besides the model shape (see `model_preset`/`model`)."""

    model_preset: str = "tiny"  # ModelConfig constructor: "tiny" | "flash"
    model: dict = dataclasses.field(default_factory=dict)  # ModelConfig overrides
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    # batch
    seq_len: int = 256
    batch_size: int = 16  # global rows per optimizer step (split over hosts)
    grad_accum: int = 1  # microbatches per step (batch_size must divide by it)
    steps: int = 300
    time_limit_minutes: float | None = None  # stop (and save) after this much training time
    # optimizer (paper §2: AdamW 0.9/0.95, wd 0.1, clip 1.0; warmup -> constant -> cosine)
    lr: float = 3e-3
    end_lr: float = 3e-4  # cosine floor
    warmup_steps: int = 20
    decay_steps: int = 0  # cosine length, ending at `steps`; 0 = no decay (constant after warmup)
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1  # not applied to norms, sinks and biases
    clip_norm: float = 1.0
    # precision and memory
    param_dtype: str = "float32"  # master weights and optimizer state
    compute_dtype: str = "float32"  # activations / matmul inputs ("bfloat16" on accelerators)
    remat: str = "none"  # none | full | dots | dots_no_batch
    mesh: str = ""  # "" = one device; else e.g. "data=1,fsdp=-1,expert=4,tensor=1"
    sharding_preset: str = "fsdp_tensor_expert"  # fsdp | fsdp_expert | fsdp_tensor_expert
    loss_chunk_tokens: int = 8192  # CE is computed over token chunks of this size
    # loss (paper §1.4, §2)
    mtp_lambda: float = 0.3  # MTP weight up to `mtp_lambda_switch_step`
    mtp_lambda_late: float = 0.1  # and after it
    mtp_lambda_switch_step: int | None = None  # None = never switch
    balance_coef: float = 1e-5  # sequence-level balance loss, summed over MoE layers
    bias_gamma: float = 1e-3  # correction-bias update rate (0 = off)
    z_loss_coef: float = 0.0  # optional z-loss on the main logits' log-partition
    # bookkeeping
    seed: int = 0  # model init
    log_every: int = 1
    console_every: int = 25
    val_every: int = 50
    save_every: int = 100
    keep_checkpoints: int = 3
    async_checkpointing: bool = True
    progress_bar: bool = True
    tensorboard: bool = True
    # later training stages: override dicts, each with the step it ends at (see module doc)
    stages: tuple[dict, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.stages, list | tuple) or not all(
            isinstance(s, dict) for s in self.stages
        ):
            raise ValueError(f"stages must be a list of override dicts, got {self.stages!r}")
        object.__setattr__(self, "stages", tuple(dict(s) for s in self.stages))

    # ------------------------------------------------------------------ construction
    @classmethod
    def preset(cls, name: str) -> TrainConfig:
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; have {sorted(PRESETS)}")
        return PRESETS[name]

    def override(self, items: list[str] | dict[str, Any]) -> TrainConfig:
        """A copy with `key=value` strings (or a {key: value} dict) applied."""
        pairs = items.items() if isinstance(items, dict) else [_split_kv(s) for s in items]
        cfg = self
        for key, raw in pairs:
            value = _parse_value(raw) if isinstance(raw, str) else raw
            if key.startswith("model."):
                cfg = dataclasses.replace(cfg, model={**cfg.model, key[6:]: value})
            elif key.startswith("data."):
                sub = key[5:]
                _check_field(DataConfig, sub, key)
                value = _coerce(DataConfig, sub, value, key)
                cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, **{sub: value}))
            else:
                _check_field(TrainConfig, key, key)
                if key in ("data", "model"):
                    raise ValueError(f"set {key} fields one by one: {key}.NAME=VALUE")
                cfg = dataclasses.replace(cfg, **{key: _coerce(TrainConfig, key, value, key)})
        return cfg

    def model_config(self) -> ModelConfig:
        """The ModelConfig this run trains (preset + overrides + the precision fields)."""
        makers = {"tiny": ModelConfig.tiny, "flash": ModelConfig.flash}
        if self.model_preset not in makers:
            raise ValueError(f"unknown model_preset {self.model_preset!r}; have {sorted(makers)}")
        fields = {f.name: f for f in dataclasses.fields(ModelConfig)}
        overrides = {}
        for k, v in self.model.items():
            if k not in fields:
                raise ValueError(f"model.{k}: ModelConfig has no field {k!r}")
            if k in ("full_attention", "sliding_attention") and isinstance(v, dict):
                base = getattr(makers[self.model_preset](), k)
                v = dataclasses.replace(base, **v) if isinstance(base, AttentionSpec) else v
            if isinstance(v, list):
                v = tuple(v)
            overrides[k] = v
        overrides.update(dtype=canonical_dtype(self.compute_dtype, what="compute_dtype"),
                         param_dtype=canonical_dtype(self.param_dtype, what="param_dtype"))
        return makers[self.model_preset](**overrides)

    # ------------------------------------------------------------------ stages
    def stage_configs(self) -> list[TrainConfig]:
        """Stage 1 (this config without `stages`), then each later stage resolved: its
        overrides on top of the previous stage's (dict values such as
        `model.full_attention` are merged key by key)."""
        out = [dataclasses.replace(self, stages=())]
        for i, stage in enumerate(self.stages, start=2):
            if "steps" not in stage:
                raise ValueError(f"invalid training config: stage {i} has no 'steps' (the step "
                                 "it ends at)")
            if "stages" in stage:
                raise ValueError(f"invalid training config: stage {i} cannot declare stages")
            prev = out[-1]
            merged: dict[str, Any] = {}
            for k, v in stage.items():
                old = prev.model.get(k[6:]) if k.startswith("model.") else None
                if isinstance(old, AttentionSpec):
                    old = dataclasses.asdict(old)
                merged[k] = {**old, **v} if isinstance(old, dict) and isinstance(v, dict) else v
            out.append(prev.override(merged))
        return out

    @property
    def total_steps(self) -> int:
        """The step the last stage ends at."""
        return int(self.stages[-1]["steps"]) if self.stages else self.steps

    def stage_at(self, step: int) -> tuple[int, TrainConfig]:
        """(1-based stage number, its config) of the stage that trains step `step` + 1."""
        configs = self.stage_configs()
        for i, tc in enumerate(configs, start=1):
            if step < tc.steps:
                return i, tc
        return len(configs), configs[-1]

    def validate(self, model_cfg: ModelConfig) -> None:
        if self.stages:
            self._validate_stages(model_cfg)
        self._validate_one(model_cfg)

    def _validate_stages(self, model_cfg: ModelConfig) -> None:
        from mimo_jax.model.config import stage_changes

        configs = self.stage_configs()
        for i, (prev, tc) in enumerate(zip(configs, configs[1:], strict=False), start=2):
            if tc.steps <= prev.steps:
                raise ValueError(
                    f"invalid training config: stage {i} ends at step {tc.steps}, not after "
                    f"stage {i - 1} (step {prev.steps})")
            cfg = tc.model_config()
            try:
                stage_changes(model_cfg, cfg)
            except ValueError as e:
                raise ValueError(f"invalid training config: stage {i}: {e}") from None
            tc._validate_one(cfg)

    def _validate_one(self, model_cfg: ModelConfig) -> None:
        def fail(msg: str) -> None:
            raise ValueError(f"invalid training config: {msg}")

        if self.seq_len < 2:
            fail(f"seq_len must be >= 2, got {self.seq_len}")
        if self.seq_len > model_cfg.max_position_embeddings:
            fail(
                f"seq_len {self.seq_len} is above the model's maximum "
                f"max_position_embeddings={model_cfg.max_position_embeddings}"
            )
        if self.batch_size < 1 or self.grad_accum < 1 or self.batch_size % self.grad_accum:
            fail(
                f"batch_size {self.batch_size} must be a positive multiple of "
                f"grad_accum {self.grad_accum}"
            )
        if self.steps < 0 or self.warmup_steps < 0 or self.decay_steps < 0:
            fail("steps, warmup_steps and decay_steps must be >= 0")
        if self.warmup_steps + self.decay_steps > max(self.steps, 1) and self.decay_steps:
            fail(
                f"warmup_steps {self.warmup_steps} + decay_steps {self.decay_steps} exceed "
                f"steps {self.steps}"
            )
        if self.remat not in ("none", "full", "dots", "dots_no_batch"):
            fail(f"unknown remat {self.remat!r}")
        if self.loss_chunk_tokens < 1:
            fail("loss_chunk_tokens must be >= 1")
        for name in ("log_every", "val_every", "save_every", "keep_checkpoints", "console_every"):
            if getattr(self, name) < 1:
                fail(f"{name} must be >= 1")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        d = dict(d)
        d["data"] = DataConfig(**d.get("data", {}))
        d["stages"] = tuple(d.get("stages", ()))
        return cls(**d)


def _split_kv(item: str) -> tuple[str, str]:
    if "=" not in item:
        raise ValueError(f"--set wants KEY=VALUE, got {item!r}")
    k, v = item.split("=", 1)
    return k.strip(), v


def _parse_value(raw: str) -> Any:
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return raw


def _check_field(cls, name: str, key: str) -> None:
    names = [f.name for f in dataclasses.fields(cls)]
    if name not in names:
        raise ValueError(f"unknown setting {key!r}; {cls.__name__} has {names}")


def _coerce(cls, name: str, value: Any, key: str) -> Any:
    """Ints where floats are wanted are fine; anything else must match the field's type."""
    typ = str(next(f.type for f in dataclasses.fields(cls) if f.name == name))
    if value is None:
        if "None" not in typ:
            raise ValueError(f"{key} cannot be null")
        return None
    if typ.startswith("float") and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    for t, py in (("int", int), ("bool", bool), ("str", str), ("dict", dict)):
        if typ.startswith(t) and not (
            isinstance(value, py) and (py is not int or not isinstance(value, bool))
        ):
            raise ValueError(f"{key} wants {typ}, got {value!r}")
    if typ.startswith("float") and not isinstance(value, float):
        raise ValueError(f"{key} wants {typ}, got {value!r}")
    return value


# Tiny MiMo for 2 CPU cores: the release's structure (hybrid 5:1 attention with sinks, dense
# first layer, sigmoid top-k MoE with correction bias, 3 MTP heads) at a few million parameters.
_TINY_CPU = TrainConfig(
    model_preset="tiny",
    model={"num_layers": 4, "vocab_size": 259, "max_position_embeddings": 2048},
    seq_len=128,
    batch_size=16,
    steps=2000,
    lr=3e-3,
    end_lr=3e-4,
    warmup_steps=30,
    decay_steps=0,
    val_every=100,
    save_every=200,
    console_every=50,
)

# The released MiMo-V2-Flash shape with the paper's Stage-1 recipe (for pods): 32K rows,
# 2048 rows per step (~67M tokens), lr 3.2e-4 after 50B warm-up tokens, cosine to 1e-4 over
# 10T tokens after 12T constant; bf16 compute on float32 master weights, full remat.
_FLASH = TrainConfig(
    model_preset="flash",
    model={},
    data=DataConfig(tokenizer={"kind": "byte"}),
    seq_len=32768,
    batch_size=2048,
    steps=745 + 178_814 + 149_011,
    lr=3.2e-4,
    end_lr=1.0e-4,
    warmup_steps=745,
    decay_steps=149_011,
    compute_dtype="bfloat16",
    remat="full",
    loss_chunk_tokens=8192,
    mtp_lambda=0.3,
    mtp_lambda_late=0.1,
    balance_coef=1e-5,
    bias_gamma=1e-3,
    log_every=10,
    val_every=1000,
    save_every=500,
    progress_bar=False,
)

PRESETS: dict[str, TrainConfig] = {"tiny-cpu": _TINY_CPU, "flash": _FLASH}
