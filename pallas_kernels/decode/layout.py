"""Packing a KV head's query heads and queries into rows, shared by the decode kernels."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def pack_rows(q: jax.Array, hkv: int, rows_padded: int) -> jax.Array:
    """[B, T, Hq, D] -> [B, Hkv, rows_padded, D]: query t of head k*G + j at row t*G + j, so
    one program reads each cache block once for all G heads sharing it."""
    b, t, hq, d = q.shape
    g = hq // hkv
    x = q.reshape(b, t, hkv, g, d).transpose(0, 2, 1, 3, 4).reshape(b, hkv, t * g, d)
    return jnp.pad(x, ((0, 0), (0, 0), (0, rows_padded - t * g), (0, 0)))


def unpack_rows(x: jax.Array, t: int, g: int) -> jax.Array:
    """Packed [B, Hkv, rows_padded(, D)] -> [B, T, Hkv * G(, D)]."""
    b, hkv = x.shape[:2]
    x = x[:, :, : t * g].reshape(b, hkv, t, g, *x.shape[3:])
    x = jnp.moveaxis(x, 2, 1)  # [B, T, Hkv, G(, D)]
    return x.reshape(b, t, hkv * g, *x.shape[4:])
