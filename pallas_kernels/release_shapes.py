"""The release's kernel shapes (MiMo-V2-Flash) as abstract arguments, for compile checks.

Attention: q/k head dim 192, v 128, 64 query heads over 4 KV heads (full-attention layers) or
8 (sliding layers, with sinks); a 128-key window as the hub / vLLM read it and 129 as
transformers does; segment ids for packed documents; bf16. Ragged: 256 experts, 8K routed
rows, the fused gate/up projection (hidden 4096 -> 2 x 2048) and the down projection
(2048 -> 4096); their backward passes run the 4096 -> 2048 direction (dx) and the grouped
transposed products (dw).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

import pallas_kernels

SEQ = 4096
HEADS, HEAD_DIM, V_HEAD_DIM = 64, 192, 128


@dataclasses.dataclass(frozen=True)
class AttentionCase:
    kv_heads: int
    window: int | None
    sinks: bool
    segments: bool
    batch: int = 1
    seq: int = SEQ

    @property
    def name(self) -> str:
        w = "full" if self.window is None else f"w{self.window}"
        extra = ("_sinks" if self.sinks else "") + ("_seg" if self.segments else "")
        return f"{w}_kv{self.kv_heads}{extra}"

    def args(self) -> list[jax.ShapeDtypeStruct | None]:
        sds, bf16 = jax.ShapeDtypeStruct, jnp.bfloat16
        b, t = self.batch, self.seq
        return [
            sds((b, t, HEADS, HEAD_DIM), bf16),
            sds((b, t, self.kv_heads, HEAD_DIM), bf16),
            sds((b, t, self.kv_heads, V_HEAD_DIM), bf16),
            sds((HEADS,), jnp.float32) if self.sinks else None,
            sds((b, t), jnp.int32) if self.segments else None,
        ]

    def forward(self, implementation: str):
        def f(q, k, v, sinks, segment_ids):
            return pallas_kernels.attention(
                q, k, v, sinks=sinks, window=self.window, segment_ids=segment_ids,
                implementation=implementation, interpret=False)
        return f

    def backward(self, implementation: str):
        """Gradients of q, k, v (and sinks) of a scalar of the output: the whole backward."""
        fwd = self.forward(implementation)

        def loss(q, k, v, sinks, segment_ids):
            return jnp.sum(fwd(q, k, v, sinks, segment_ids).astype(jnp.float32))

        return jax.grad(loss, argnums=(0, 1, 2, 3) if self.sinks else (0, 1, 2))


ATTENTION_CASES = [
    AttentionCase(kv_heads=4, window=None, sinks=False, segments=False),  # full layers
    AttentionCase(kv_heads=4, window=None, sinks=False, segments=True),
    AttentionCase(kv_heads=8, window=128, sinks=True, segments=False),  # sliding layers
    AttentionCase(kv_heads=8, window=129, sinks=True, segments=True),
]


@dataclasses.dataclass(frozen=True)
class RaggedCase:
    k: int
    n: int
    experts: int = 256
    rows: int = 8192

    @property
    def name(self) -> str:
        return f"e{self.experts}_{self.k}to{self.n}_m{self.rows}"

    def args(self) -> list[jax.ShapeDtypeStruct]:
        sds = jax.ShapeDtypeStruct
        return [sds((self.rows, self.k), jnp.bfloat16),
                sds((self.experts, self.k, self.n), jnp.bfloat16),
                sds((self.experts,), jnp.int32)]

    def forward(self, implementation: str):
        def f(x, w, group_sizes):
            return pallas_kernels.ragged_matmul(x, w, group_sizes, implementation=implementation,
                                                interpret=False)
        return f

    def backward(self, implementation: str):
        """dx (a gmm with the weights transposed) and dw (a tgmm)."""
        fwd = self.forward(implementation)

        def loss(x, w, group_sizes):
            return jnp.sum(fwd(x, w, group_sizes).astype(jnp.float32))

        return jax.grad(loss, argnums=(0, 1))


RAGGED_CASES = [RaggedCase(k=4096, n=2048), RaggedCase(k=2048, n=4096)]


@dataclasses.dataclass(frozen=True)
class DecodeCase:
    """Cached attention at serving shapes: `queries` per row (1 = decode, 4 = verifying 3 MTP
    drafts) over a cache of `slots` (the sliding layers' 128-slot ring, or a global cache)
    plus the chunk's own keys; bf16 cache, as generation keeps it."""

    kv_heads: int
    slots: int
    window: int | None
    sinks: bool
    queries: int = 1
    batch: int = 8

    @property
    def name(self) -> str:
        kind = "global" if self.window is None else f"ring{self.slots}_w{self.window}"
        return f"decode_{kind}_hkv{self.kv_heads}_t{self.queries}_b{self.batch}"

    def args(self) -> list[jax.ShapeDtypeStruct | None]:
        sds, bf16, i32 = jax.ShapeDtypeStruct, jnp.bfloat16, jnp.int32
        b, t, s, h = self.batch, self.queries, self.slots, self.kv_heads
        return [sds((b, t, HEADS, HEAD_DIM), bf16), sds((b, h, s, HEAD_DIM), bf16),
                sds((b, h, s, V_HEAD_DIM), bf16), sds((b, s), i32),
                sds((b, t, h, HEAD_DIM), bf16), sds((b, t, h, V_HEAD_DIM), bf16),
                sds((b, t), i32), sds((b,), i32), sds((b,), i32),
                sds((HEADS,), jnp.float32) if self.sinks else None]

    def forward(self, implementation: str):
        """`implementation`: "pallas_gpu" or "pallas_tpu", compiled (never interpreted)."""
        from pallas_kernels.decode import IMPLEMENTATIONS

        impl = IMPLEMENTATIONS[implementation]

        def f(q, k_cache, v_cache, cache_pos, k_new, v_new, new_pos, q_offset, length, sinks):
            return impl(q, k_cache, v_cache, cache_pos, k_new, v_new, new_pos,
                        q_offset=q_offset, cache_length=length, sinks=sinks,
                        window=self.window, scale=HEAD_DIM**-0.5, interpret=False)

        return f

    def partial_args(self) -> list[jax.ShapeDtypeStruct]:
        """q, the cache, its positions, q_offset and cache_length: `partials`' arguments."""
        a = self.args()
        return [*a[:4], *a[7:9]]

    def partials(self, implementation: str):
        """The queries over the cache alone as (o, lse) partials: what context-parallel
        decoding runs on each device's slice of a global cache before merging across devices
        (`pallas_kernels.decode.cache_partials`), compiled (never interpreted)."""
        from pallas_kernels.decode import pallas_gpu, pallas_tpu

        mod = {"pallas_gpu": pallas_gpu, "pallas_tpu": pallas_tpu}[implementation]

        def f(q, k_cache, v_cache, cache_pos, q_offset, length):
            return mod.cache_part(q, k_cache, v_cache, cache_pos, q_offset, length,
                                  window=self.window, scale=HEAD_DIM**-0.5,
                                  block_sizes=mod.BlockSizes(), interpret=False)

        return f


DECODE_CASES = [
    DecodeCase(kv_heads=8, slots=128, window=128, sinks=True),  # sliding layers, decode
    DecodeCase(kv_heads=8, slots=128, window=128, sinks=True, queries=4),  # verify K = 3
    DecodeCase(kv_heads=4, slots=32768, window=None, sinks=False),  # global layers, 32K
    DecodeCase(kv_heads=4, slots=32768, window=None, sinks=False, queries=4),
]
