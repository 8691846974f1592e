"""Where generation runs: the mesh of a sharded model, and the shardings of its KV caches.

A model loaded with `mimo_jax.load(path, mesh=mesh)` or made by `create_sharded` carries its
mesh in its parameters' shardings; `serving_mesh` finds it (and the preset rules that placed
it) so `generate` needs no extra arguments. KV caches are sharded like the activations that
fill them: batch rows over the batch axes, KV heads over the axes the K/V projections split
their heads on; ring buffers and the MTP heads' caches alike. A global layer's cache (slot =
position, max_len slots) also splits its slots over the `context` axis, contiguous blocks of
S/n slots per shard, so context parallelism divides the long-context cache instead of copying
it to every shard; ring buffers (W slots) stay whole on each context shard. Axes that do not
divide a dimension (a batch of 1, 4 KV heads on 8 tensor shards) are left out, never an error.
"""

from __future__ import annotations

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from mimo_jax.inference.kv_cache import KVCache, LayerKV, cache_axes, usable_axes
from mimo_jax.model.config import ModelConfig
from mimo_jax.model.mimo import scan_plan
from mimo_jax.sharding.rules import ShardingRules, active, axes_of

PRESETS = ("fsdp_tensor_expert", "fsdp_expert", "fsdp")


def _model_mesh(model) -> Mesh | None:
    for _, var in nnx.to_flat_state(nnx.state(model)):
        sharding = getattr(var.get_value(), "sharding", None)
        if isinstance(sharding, NamedSharding) and sharding.mesh.size > 1:
            return sharding.mesh
    return None


def _placed_by(model, mesh: Mesh, rules: ShardingRules) -> bool:
    for _, var in nnx.to_flat_state(nnx.state(model)):
        value = var.get_value()
        want = NamedSharding(mesh, rules.spec(axes_of(var)))
        if not value.sharding.is_equivalent_to(want, value.ndim):
            return False
    return True


def serving_mesh(model, mesh: Mesh | None = None, rules: ShardingRules | None = None
                 ) -> tuple[Mesh, ShardingRules] | None:
    """(mesh, rules) to generate under, or None for one device.

    Explicit arguments win; then a block of `mimo_jax.sharding.activate`; then the mesh the
    parameters live on, with the preset whose rules placed every parameter where it is."""
    if mesh is not None:
        return mesh, rules or ShardingRules.preset()
    ctx = active()
    if ctx is not None:
        return ctx[0], rules or ctx[1]
    found = _model_mesh(model)
    if found is None:
        return None
    if rules is not None:
        return found, rules
    for name in PRESETS:
        preset = ShardingRules.preset(name)
        if _placed_by(model, found, preset):
            return found, preset
    raise ValueError(
        f"the model is sharded over mesh {dict(found.shape)} by rules that are not a preset "
        f"({', '.join(PRESETS)}); pass the rules it was placed with: generate(..., rules=...)")


def batch_sharding(mesh: Mesh, rules: ShardingRules, shape: tuple[int, ...]) -> NamedSharding:
    """Batch-leading arrays (tokens, lengths, hidden rows, logits): rows over the batch axes."""
    bax = usable_axes(mesh, rules.mesh_axes("batch"), shape[0])
    return NamedSharding(mesh, P(bax or None, *(None,) * (len(shape) - 1)))


def kv_spec(mesh: Mesh, rules: ShardingRules, shape: tuple[int, ...], *,
            global_layer: bool = False) -> P:
    """[(blocks,) B, Hkv, S, D]: rows over the batch axes, KV heads over the head axes, and a
    global layer's slots over the context axis."""
    lead = len(shape) - 4
    bax, hax, sax = cache_axes(mesh, rules, shape[lead], shape[lead + 1], shape[lead + 2],
                               global_layer=global_layer)
    return P(*(None,) * lead, bax or None, hax or None, sax or None, None)


def global_layers(cfg: ModelConfig) -> tuple[list[bool], list[bool]]:
    """Which prefix layers and which block positions of a cache are global (slot = position)."""
    plan = scan_plan(cfg)
    full = [cfg.attention_spec(kind).window is None for kind in cfg.layer_types]
    return full[:plan.num_prefix], full[plan.num_prefix:plan.num_prefix + plan.period]


def cache_shardings(cache: KVCache, mesh: Mesh, rules: ShardingRules,
                    cfg: ModelConfig) -> KVCache:
    """NamedShardings for every array of a cache (real or abstract) of a model with config
    `cfg` (which says the layers that are global)."""
    def kv(layer: LayerKV, full: bool) -> LayerKV:
        return LayerKV(*(NamedSharding(mesh, kv_spec(mesh, rules, x.shape, global_layer=full))
                         for x in layer))

    b = cache.length.shape[0]
    bax = usable_axes(mesh, rules.mesh_axes("batch"), b) or None
    # Empty arrays (no MTP heads in use) come out of XLA replicated: keep them so.
    mtp_pos = P(None, bax, None) if cache.mtp_pos.size else P()
    prefix_full, block_full = global_layers(cfg)
    return KVCache(
        prefix=tuple(kv(x, f) for x, f in zip(cache.prefix, prefix_full, strict=True)),
        blocks=tuple(kv(x, f) for x, f in zip(cache.blocks, block_full, strict=True)),
        mtp=tuple(kv(x, False) for x in cache.mtp),
        ring_pos=NamedSharding(mesh, P(bax, None)),
        mtp_pos=NamedSharding(mesh, mtp_pos),
        length=NamedSharding(mesh, P(bax)),
    )


def constrain_cache(cache: KVCache, ctx: tuple[Mesh, ShardingRules] | None,
                    cfg: ModelConfig) -> KVCache:
    """Pin a cache computed inside a jitted step to its shardings (a no-op on one device)."""
    if ctx is None:
        return cache
    return jax.tree.map(jax.lax.with_sharding_constraint, cache,
                        cache_shardings(cache, *ctx, cfg))
