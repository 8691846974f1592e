"""Model configuration: one frozen dataclass, constructors per size, and the Hugging Face mapping.

Two spellings of the same config exist in the wild and `from_hf` accepts both, field by field:
- the hub's `config.json` (Xiaomi's remote code): `hybrid_layer_pattern`, `moe_layer_freq`,
  `swa_*` head fields, `rope_theta`/`swa_rope_theta`, `layernorm_epsilon`, `sliding_window_size`;
- transformers 5.23's `MiMoV2FlashConfig`: `layer_types`, `mlp_layer_types`, `rope_parameters`,
  `rms_norm_eps`, `sliding_window` (keys including the query), SWA KV heads = 2 x full KV heads.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Literal

from mimo_jax.core.dtypes import canonical_dtype

AttentionType = Literal["full", "sliding"]
MlpType = Literal["dense", "moe"]
ATTENTION_TYPES: tuple[str, ...] = ("full", "sliding")
MLP_TYPES: tuple[str, ...] = ("dense", "moe")


@dataclasses.dataclass(frozen=True)
class AttentionSpec:
    """Geometry of one attention type (full/global or sliding-window)."""

    num_heads: int
    num_kv_heads: int
    head_dim: int  # q/k
    v_head_dim: int
    rope_theta: float
    partial_rotary_factor: float
    has_sink: bool
    window: int | None  # keys visible to a query, itself included; None = full causal

    @property
    def rotary_dim(self) -> int:
        # transformers and the hub code both truncate: int(192 * 0.334) = 64.
        return int(self.head_dim * self.partial_rotary_factor)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Everything that changes the computation of a MiMo-V2-Flash-family model.

    Defaults are the released MiMo-V2-Flash (`ModelConfig.flash()`).
    """

    vocab_size: int = 152576
    hidden_size: int = 4096
    layer_types: tuple[str, ...] = ()  # per layer: "full" | "sliding"; () = the released rule
    mlp_types: tuple[str, ...] = ()  # per layer: "dense" | "moe"; () = dense first, then MoE
    num_layers: int = 48
    full_attention: AttentionSpec = AttentionSpec(64, 4, 192, 128, 5_000_000.0, 0.334, False, None)
    sliding_attention: AttentionSpec = AttentionSpec(64, 8, 192, 128, 10_000.0, 0.334, True, 129)
    value_scale: float = 0.707  # V is multiplied by this before attention (all layers, MTP too)
    intermediate_size: int = 16384  # dense MLP (layer 0 and every MTP head)
    moe_intermediate_size: int = 2048
    num_experts: int = 256
    num_experts_per_tok: int = 8
    n_group: int = 1
    topk_group: int = 1
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0
    router_correction_bias: bool = True  # "noaux_tc": a bias used for expert selection only
    moe_capacity_factor: float | None = None  # None = dropless
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 262144
    num_mtp_layers: int = 3  # not in the hub config; the release ships 3
    mtp_hidden: Literal["post_norm", "pre_norm"] = "post_norm"  # main hidden fed to MTP heads
    initializer_range: float = 0.02
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | None = None
    # Any spelling ("bf16", jnp.bfloat16, np.float32, ...) is accepted and stored canonical.
    dtype: str = "bfloat16"  # activations / matmul inputs
    param_dtype: str = "bfloat16"  # router weights and bias are always float32

    def __post_init__(self) -> None:
        if not self.layer_types:
            object.__setattr__(self, "layer_types", default_layer_types(self.num_layers))
        if not self.mlp_types:
            object.__setattr__(self, "mlp_types", ("dense",) + ("moe",) * (self.num_layers - 1))
        object.__setattr__(self, "layer_types", tuple(self.layer_types))
        object.__setattr__(self, "mlp_types", tuple(self.mlp_types))
        for name in ("dtype", "param_dtype"):
            object.__setattr__(self, name, canonical_dtype(getattr(self, name),
                                                         what=f"ModelConfig.{name}"))
        if isinstance(self.eos_token_id, list):
            object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))
        self.validate()

    # ----------------------------------------------------------------------------- sizes
    @classmethod
    def flash(cls, **overrides: Any) -> ModelConfig:
        """The released MiMo-V2-Flash: 48 layers, 309B total / 15B active, 3 MTP heads."""
        return cls(**overrides)

    @classmethod
    def tiny(cls, **overrides: Any) -> ModelConfig:
        """A few-million-parameter MiMo that trains visibly in minutes on 2 CPU cores.

        Same structure as the release (hybrid 5:1 attention with sinks, dense first layer, sigmoid
        top-k MoE, 3 MTP heads), with a byte-level vocabulary.
        """
        base = dict(
            vocab_size=512,
            hidden_size=128,
            num_layers=8,
            full_attention=AttentionSpec(4, 1, 32, 24, 5_000_000.0, 0.25, False, None),
            sliding_attention=AttentionSpec(4, 2, 32, 24, 10_000.0, 0.25, True, 65),
            intermediate_size=384,
            moe_intermediate_size=96,
            num_experts=8,
            num_experts_per_tok=2,
            max_position_embeddings=2048,
            num_mtp_layers=3,
            dtype="float32",
            param_dtype="float32",
        )
        base.update(overrides)
        return cls(**base)

    # ----------------------------------------------------------------------------- helpers
    def attention_spec(self, layer_type: str) -> AttentionSpec:
        return self.full_attention if layer_type == "full" else self.sliding_attention

    @property
    def layer_kinds(self) -> tuple[tuple[str, str], ...]:
        """(attention type, mlp type) per layer: what decides a layer's parameter structure."""
        return tuple(zip(self.layer_types, self.mlp_types, strict=True))

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    def validate(self) -> None:
        def fail(msg: str) -> None:
            raise ValueError(f"invalid ModelConfig: {msg}")

        for name in ("vocab_size", "hidden_size", "num_layers", "intermediate_size"):
            if getattr(self, name) < 1:
                fail(f"{name} must be >= 1, got {getattr(self, name)}")
        if len(self.layer_types) != self.num_layers:
            fail(f"{len(self.layer_types)} layer_types for {self.num_layers} layers")
        if len(self.mlp_types) != self.num_layers:
            fail(f"{len(self.mlp_types)} mlp_types for {self.num_layers} layers")
        for i, t in enumerate(self.layer_types):
            if t not in ATTENTION_TYPES:
                fail(f"layer {i}: unknown attention type {t!r} (want one of {ATTENTION_TYPES})")
        for i, t in enumerate(self.mlp_types):
            if t not in MLP_TYPES:
                fail(f"layer {i}: unknown mlp type {t!r} (want one of {MLP_TYPES})")
        for kind, spec in (("full", self.full_attention), ("sliding", self.sliding_attention)):
            if spec.num_heads < 1 or spec.num_kv_heads < 1:
                fail(f"{kind} attention needs >= 1 query and KV head")
            if spec.num_heads % spec.num_kv_heads:
                fail(
                    f"{kind} attention: {spec.num_heads} query heads not divisible by "
                    f"{spec.num_kv_heads} KV heads"
                )
            if spec.rotary_dim % 2 or not 0 <= spec.rotary_dim <= spec.head_dim:
                fail(
                    f"{kind} attention: rotary dim {spec.rotary_dim} (head_dim {spec.head_dim} x "
                    f"{spec.partial_rotary_factor}) must be even and <= head_dim"
                )
            if spec.window is not None and spec.window < 1:
                fail(f"{kind} attention: window must be >= 1 key or None, got {spec.window}")
        if self.sliding_attention.window is None and "sliding" in self.layer_types:
            fail("sliding layers need a window")
        if "moe" in self.mlp_types:
            e, k = self.num_experts, self.num_experts_per_tok
            if not 1 <= k <= e:
                fail(f"num_experts_per_tok={k} must be in [1, num_experts={e}]")
            if self.n_group < 1 or e % self.n_group:
                fail(f"num_experts={e} not divisible by n_group={self.n_group}")
            if not 1 <= self.topk_group <= self.n_group:
                fail(f"topk_group={self.topk_group} must be in [1, n_group={self.n_group}]")
            if self.n_group > 1 and e // self.n_group < 2:
                fail("grouped routing scores each group by its top-2 experts: need >= 2 per group")
            if k > self.topk_group * (e // self.n_group):
                fail(f"top-{k} cannot be chosen from {self.topk_group} groups of "
                     f"{e // self.n_group}")
        if self.moe_capacity_factor is not None and self.moe_capacity_factor <= 0:
            fail(f"moe_capacity_factor must be > 0 or None, got {self.moe_capacity_factor}")
        if self.num_mtp_layers < 0:
            fail(f"num_mtp_layers must be >= 0, got {self.num_mtp_layers}")
        if self.mtp_hidden not in ("post_norm", "pre_norm"):
            fail(f"mtp_hidden must be 'post_norm' or 'pre_norm', got {self.mtp_hidden!r}")

    # ----------------------------------------------------------------------------- HF I/O
    @classmethod
    def from_hf(
        cls,
        path_or_dict: str | os.PathLike | dict[str, Any],
        *,
        sliding_window_keys: int | None = None,
        **overrides: Any,
    ) -> ModelConfig:
        """Read a hub or transformers `config.json` (a directory, a file, or a dict).

        The sliding window follows transformers 5.23: a hub `sliding_window_size` of W means W+1
        keys (W previous tokens plus the query); a transformers `sliding_window` is already keys.
        `sliding_window_keys` overrides it (128 reproduces vLLM / the hub remote code).
        """
        hf = read_json_config(path_or_dict)
        n = int(hf.get("num_hidden_layers", 48))

        if "layer_types" in hf:
            renames = {"full_attention": "full", "sliding_attention": "sliding"}
            layer_types = tuple(renames.get(t, t) for t in hf["layer_types"])
        elif "hybrid_layer_pattern" in hf:
            layer_types = tuple("sliding" if int(p) else "full" for p in hf["hybrid_layer_pattern"])
        else:
            layer_types = default_layer_types(n)
        if "mlp_layer_types" in hf:
            mlp_types = tuple("moe" if t == "sparse" else t for t in hf["mlp_layer_types"])
        elif isinstance(hf.get("moe_layer_freq"), list):
            mlp_types = tuple("moe" if int(p) else "dense" for p in hf["moe_layer_freq"])
        else:
            mlp_types = ("dense",) + ("moe",) * (n - 1)

        rope = hf.get("rope_parameters") or {}
        _check_rope_types(hf)
        prf = hf.get("partial_rotary_factor", 0.334)
        full_rope = rope.get("full_attention", {})
        swa_rope = rope.get("sliding_attention", {})
        heads = int(hf.get("num_attention_heads", 64))
        kv = int(hf.get("num_key_value_heads", 4))
        head_dim = int(hf.get("head_dim", 192))
        v_head_dim = int(hf.get("v_head_dim", 128))
        if sliding_window_keys is not None:
            window = sliding_window_keys
        elif hf.get("sliding_window_size") is not None:
            window = int(hf["sliding_window_size"]) + 1
        else:
            window = int(hf.get("sliding_window", 129))
        full = AttentionSpec(
            num_heads=heads,
            num_kv_heads=kv,
            head_dim=head_dim,
            v_head_dim=v_head_dim,
            rope_theta=float(full_rope.get("rope_theta", hf.get("rope_theta", 5_000_000.0))),
            partial_rotary_factor=float(full_rope.get("partial_rotary_factor", prf)),
            has_sink=bool(hf.get("add_full_attention_sink_bias", False)),
            window=None,
        )
        sliding = AttentionSpec(
            num_heads=int(hf.get("swa_num_attention_heads", heads)),
            # transformers has no field for it and doubles the full layers' KV heads.
            num_kv_heads=int(hf.get("swa_num_key_value_heads", 2 * kv)),
            head_dim=int(hf.get("swa_head_dim", head_dim)),
            v_head_dim=int(hf.get("swa_v_head_dim", v_head_dim)),
            rope_theta=float(swa_rope.get("rope_theta", hf.get("swa_rope_theta", 10_000.0))),
            partial_rotary_factor=float(swa_rope.get("partial_rotary_factor", prf)),
            has_sink=bool(hf.get("add_swa_attention_sink_bias", True)),
            window=window,
        )
        if hf.get("hidden_act", "silu") != "silu":
            raise ValueError(f"unsupported hidden_act {hf['hidden_act']!r}: MiMo uses silu")
        if hf.get("n_shared_experts"):
            raise ValueError("MiMo-V2-Flash has no shared experts; n_shared_experts must be null")
        if hf.get("scoring_func", "sigmoid") != "sigmoid":
            raise ValueError(f"unsupported scoring_func {hf['scoring_func']!r}: want sigmoid")
        value_scale = hf.get("attention_value_scale", 0.707)
        fields: dict[str, Any] = dict(
            vocab_size=int(hf.get("vocab_size", 152576)),
            hidden_size=int(hf.get("hidden_size", 4096)),
            num_layers=n,
            layer_types=layer_types,
            mlp_types=mlp_types,
            full_attention=full,
            sliding_attention=sliding,
            value_scale=1.0 if value_scale is None else float(value_scale),
            intermediate_size=int(hf.get("intermediate_size", 16384)),
            moe_intermediate_size=int(hf.get("moe_intermediate_size", 2048)),
            num_experts=int(hf.get("n_routed_experts", hf.get("num_local_experts", 256))),
            num_experts_per_tok=int(hf.get("num_experts_per_tok", 8)),
            n_group=int(hf.get("n_group") or 1),
            topk_group=int(hf.get("topk_group") or 1),
            norm_topk_prob=bool(hf.get("norm_topk_prob", True)),
            routed_scaling_factor=float(hf.get("routed_scaling_factor") or 1.0),
            router_correction_bias=hf.get("topk_method", "noaux_tc") == "noaux_tc",
            rms_norm_eps=float(hf.get("layernorm_epsilon", hf.get("rms_norm_eps", 1e-5))),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            max_position_embeddings=int(hf.get("max_position_embeddings", 262144)),
            num_mtp_layers=int(hf.get("num_nextn_predict_layers", 3)),
            initializer_range=float(hf.get("initializer_range", 0.02)),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=hf.get("eos_token_id"),
            pad_token_id=hf.get("pad_token_id"),
        )
        if hf.get("mimo_jax_mtp_hidden") in ("post_norm", "pre_norm"):
            fields["mtp_hidden"] = hf["mimo_jax_mtp_hidden"]
        fields.update(overrides)
        return cls(**fields)

    def to_hf(self) -> dict[str, Any]:
        """The hub spelling of this config (what the released `config.json` uses).

        The sliding window is written as `sliding_window_size` = keys - 1, so `from_hf` (and
        transformers 5.23) read back the same number of keys.
        """
        full, swa = self.full_attention, self.sliding_attention
        if abs(full.partial_rotary_factor - swa.partial_rotary_factor) > 0:
            raise ValueError("the hub config has one partial_rotary_factor for both layer types")
        window_size = None if swa.window is None else swa.window - 1
        return {
            "architectures": ["MiMoV2FlashForCausalLM"],
            "model_type": "mimo_v2_flash",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": full.num_heads,
            "num_key_value_heads": full.num_kv_heads,
            "head_dim": full.head_dim,
            "v_head_dim": full.v_head_dim,
            "swa_num_attention_heads": swa.num_heads,
            "swa_num_key_value_heads": swa.num_kv_heads,
            "swa_head_dim": swa.head_dim,
            "swa_v_head_dim": swa.v_head_dim,
            "hybrid_layer_pattern": [int(t == "sliding") for t in self.layer_types],
            "moe_layer_freq": [int(t == "moe") for t in self.mlp_types],
            "sliding_window": window_size,
            "sliding_window_size": window_size,
            "add_swa_attention_sink_bias": swa.has_sink,
            "add_full_attention_sink_bias": full.has_sink,
            "attention_value_scale": self.value_scale,
            "partial_rotary_factor": full.partial_rotary_factor,
            "rope_theta": full.rope_theta,
            "swa_rope_theta": swa.rope_theta,
            "intermediate_size": self.intermediate_size,
            "moe_intermediate_size": self.moe_intermediate_size,
            "n_routed_experts": self.num_experts,
            "n_shared_experts": None,
            "num_experts_per_tok": self.num_experts_per_tok,
            "scoring_func": "sigmoid",
            "topk_method": "noaux_tc" if self.router_correction_bias else "greedy",
            "n_group": self.n_group,
            "topk_group": self.topk_group,
            "norm_topk_prob": self.norm_topk_prob,
            "routed_scaling_factor": self.routed_scaling_factor,
            "hidden_act": "silu",
            "layernorm_epsilon": self.rms_norm_eps,
            "attention_bias": False,
            "tie_word_embeddings": self.tie_word_embeddings,
            "max_position_embeddings": self.max_position_embeddings,
            "initializer_range": self.initializer_range,
            "num_nextn_predict_layers": self.num_mtp_layers,
            "mimo_jax_mtp_hidden": self.mtp_hidden,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": list(self.eos_token_id)
            if isinstance(self.eos_token_id, tuple)
            else self.eos_token_id,
            "pad_token_id": self.pad_token_id,
            "torch_dtype": self.param_dtype,
        }


# What a training stage may change on resume (a context extension): nothing here changes a
# parameter's shape or meaning, so a checkpoint of one stage continues in the next.
STAGE_MODEL_FIELDS: tuple[str, ...] = (
    "max_position_embeddings",
    "full_attention.rope_theta",
    "sliding_attention.rope_theta",
    "dtype",
)


def stage_changes(old: ModelConfig, new: ModelConfig) -> dict[str, tuple[Any, Any]]:
    """{field: (old, new)} of what `new` changes against `old`, all in `STAGE_MODEL_FIELDS`;
    raises ValueError naming any other changed field (it would not fit the checkpoint)."""
    changes: dict[str, tuple[Any, Any]] = {}
    for f in dataclasses.fields(ModelConfig):
        a, b = getattr(old, f.name), getattr(new, f.name)
        if isinstance(a, AttentionSpec):
            for g in dataclasses.fields(AttentionSpec):
                if getattr(a, g.name) != getattr(b, g.name):
                    changes[f"{f.name}.{g.name}"] = (getattr(a, g.name), getattr(b, g.name))
        elif a != b:
            changes[f.name] = (a, b)
    fixed = [k for k in changes if k not in STAGE_MODEL_FIELDS]
    if fixed:
        shown = ", ".join(f"{k}: {changes[k][0]!r} -> {changes[k][1]!r}" for k in fixed[:4])
        raise ValueError(
            f"a training stage can change only {', '.join(STAGE_MODEL_FIELDS)} of the model "
            f"(they keep the parameters as they are); this one changes {shown}")
    return changes


def default_layer_types(num_layers: int) -> tuple[str, ...]:
    """Full attention at layer 0 and every 6th layer (5, 11, ..., 47); sliding elsewhere."""
    return tuple("full" if i == 0 or (i + 1) % 6 == 0 else "sliding" for i in range(num_layers))


def _check_rope_types(hf: dict[str, Any]) -> None:
    """Only the plain RoPE the release uses (a per-layer-type base, no scaling) is implemented:
    refuse a scaled one rather than silently computing different logits."""
    rope = hf.get("rope_parameters") or {}
    nested = [rope.get(k) for k in ("full_attention", "sliding_attention")]
    dicts = [d for d in nested if isinstance(d, dict)] or ([rope] if rope else [])
    legacy = hf.get("rope_scaling")
    if isinstance(legacy, dict):
        dicts.append(legacy)
    for d in dicts:
        kind = d.get("rope_type", d.get("type", "default"))
        if kind not in (None, "default"):
            raise ValueError(
                f"RoPE type {kind!r} is not supported: mimo-jax implements the release's plain "
                "RoPE (rope_type 'default', one base per layer type); context extension "
                "changes the base (see docs/long_context.md)")


def read_json_config(path_or_dict: str | os.PathLike | dict[str, Any]) -> dict[str, Any]:
    if isinstance(path_or_dict, dict):
        return dict(path_or_dict)
    path = os.fspath(path_or_dict)
    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"no config.json at {path}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
