"""FP8 E4M3 block (de)quantisation as the release stores it (checkpoint.md §4).

`W[i, j] = fp8[i, j] * scale_inv[row_block(i), j // 128]`. The row -> scale-row map is uniform
(`i // 128`, the last block may be partial) except for the K/V projections of the global
attention layers, which were quantised per KV head as a fused [K_h; V_h] matrix: a block can
straddle K's tail and V's head, so V rows 0..63 of head h use K's scale row 2h+1 (§4.2).
"""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np

BLOCK = 128
E4M3 = np.dtype(ml_dtypes.float8_e4m3fn)
E4M3_MAX = 448.0
# fp8 byte -> float32: a table lookup is several times faster than ml_dtypes' astype.
_LUT = np.arange(256, dtype=np.uint8).view(E4M3).astype(np.float32)


def uniform_rows(rows: int) -> np.ndarray:
    """Scale row of each weight row on the uniform 128-row grid."""
    return np.arange(rows) // BLOCK


def head_grid(num_heads: int, k_dim: int, v_dim: int) -> tuple[int, int]:
    """(K, V) scale rows per head of the fused per-head grid."""
    k_blocks = math.ceil(k_dim / BLOCK)
    return k_blocks, math.ceil((k_dim + v_dim) / BLOCK) - k_blocks


def is_head_grid(k_scale_rows: int, num_heads: int, k_dim: int) -> bool:
    """Whether a K scale with this many rows uses the per-head grid (it has more rows than the
    uniform grid would)."""
    k_blocks = math.ceil(k_dim / BLOCK)
    return k_scale_rows == num_heads * k_blocks != math.ceil(num_heads * k_dim / BLOCK)


def head_grid_rows(num_heads: int, k_dim: int, v_dim: int) -> tuple[np.ndarray, np.ndarray]:
    """Scale-row maps for K and V on the per-head grid, indexing the concatenation
    [k_scale; v_scale] (so a V row straddling K's last block points into k_scale)."""
    kb, vb = head_grid(num_heads, k_dim, v_dim)
    k_rows = np.concatenate([h * kb + np.arange(k_dim) // BLOCK for h in range(num_heads)])
    v_rows = []
    for h in range(num_heads):
        b = (k_dim + np.arange(v_dim)) // BLOCK  # block within the fused head
        v_rows.append(np.where(b < kb, h * kb + b, num_heads * kb + h * vb + b - kb))
    return k_rows, np.concatenate(v_rows)


def dequantize(payload: np.ndarray, scale_inv: np.ndarray, row_map: np.ndarray | None = None,
               out_dtype: np.dtype | type = np.float32) -> np.ndarray:
    """fp8 [R, C] x scale [*, ceil(C/128)] -> `out_dtype`. `row_map[i]` picks the scale row of
    weight row i (default uniform); edge blocks may be partial."""
    out = np.empty(payload.shape, out_dtype)
    dequantize_into(out, payload, scale_inv, row_map)
    return out


_UINT = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}
_SLAB_ELEMS = 1 << 19  # rows per step: index + values of one slab stay in the L2 cache


def dequantize_into(out: np.ndarray, payload: np.ndarray, scale_inv: np.ndarray,
                    row_map: np.ndarray | None = None, *, transposed: bool = False) -> None:
    """`dequantize` written into `out` ([R, C], or [C, R] with `transposed`: the release's
    [out, in] written as our [in, out] in the same pass), any strides, any float dtype.

    Bit-identical to `float32(fp8) * scale` rounded once to `out.dtype`: every (scale row,
    column block) gets a 256-entry table of exactly those products, and the payload bytes
    index it, so no float32 copy of the weight is ever made. Row slabs keep the temporaries
    small; numpy releases the GIL in each step, so threads can dequantise side by side.
    """
    r, c = payload.shape
    if row_map is None:
        row_map = uniform_rows(r)
    cb = math.ceil(c / BLOCK)
    if scale_inv.ndim != 2 or scale_inv.shape[1] != cb or row_map.max(initial=-1) >= len(scale_inv):
        raise ValueError(f"scale shape {scale_inv.shape} does not fit a {payload.shape} weight")
    if out.shape != ((c, r) if transposed else (r, c)):
        raise ValueError(f"output {out.shape} does not fit a {payload.shape} weight "
                         f"({'transposed' if transposed else 'as stored'})")
    uint = _UINT[out.dtype.itemsize]
    # tables[s, b, code] = float32(code) * scale[s, b], rounded to the output dtype
    tables = (_LUT * np.asarray(scale_inv, np.float32)[:, :, None]).astype(out.dtype)
    tables = tables.view(uint).reshape(len(scale_inv), cb * 256)
    index_dt = np.uint16 if cb * 256 <= 1 << 16 else np.int32
    col_base = (np.arange(c) // BLOCK * 256).astype(index_dt)
    codes = payload.view(np.uint8)
    dst = out.view(uint)
    # Runs of rows sharing a scale row, at most one slab each.
    step = max(1, min(BLOCK, _SLAB_ELEMS // max(c, 1)))
    cuts = set(range(0, r, step)) | set((np.flatnonzero(np.diff(row_map)) + 1).tolist())
    bounds = sorted(cuts) + [r]
    idx = np.empty((step, c), index_dt)
    values = np.empty((step, c), uint)
    for a, b in zip(bounds[:-1], bounds[1:], strict=True):
        n = b - a
        np.add(codes[a:b], col_base, out=idx[:n], dtype=index_dt)
        if not transposed and dst[a:b].flags.c_contiguous:  # gathered straight into place
            np.take(tables[row_map[a]], idx[:n], out=dst[a:b], mode="clip")
            continue
        # take(out=) into a reused buffer: no temporary per slab ("clip": no bounds buffering)
        np.take(tables[row_map[a]], idx[:n], out=values[:n], mode="clip")
        if transposed:
            transpose_rows_into(dst[:, a:b], values[:n])
        else:
            dst[a:b] = values[:n]


_T_ROWS = 16  # rows per transposed copy: measured ~2x faster than 128 (cache/TLB friendly)


def transpose_rows_into(dst: np.ndarray, src: np.ndarray) -> None:
    """dst[...] = src.T (2-D, same dtype, any strides), a few source rows at a time: each
    step reads a short run of contiguous rows and writes a short contiguous run into every
    destination row, which is much faster than one strided copy of a tall slab."""
    for a in range(0, src.shape[0], _T_ROWS):
        dst[:, a : a + _T_ROWS] = src[a : a + _T_ROWS].T


def quantize(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Uniform 128x128 blocks: scale = block amax / 448 (1 for all-zero blocks), E4M3 payload."""
    r, c = w.shape
    rb, cb = math.ceil(r / BLOCK), math.ceil(c / BLOCK)
    padded = np.zeros((rb * BLOCK, cb * BLOCK), np.float32)
    padded[:r, :c] = w
    blocks = padded.reshape(rb, BLOCK, cb, BLOCK)
    amax = np.abs(blocks).max(axis=(1, 3))
    scale = np.where(amax > 0, amax / E4M3_MAX, 1.0).astype(np.float32)
    q = np.clip(blocks / scale[:, None, :, None], -E4M3_MAX, E4M3_MAX)
    return q.reshape(padded.shape)[:r, :c].astype(E4M3), scale


def quantize_kv(k: np.ndarray, v: np.ndarray, num_heads: int
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """K [n*dk, C] and V [n*dv, C] on the per-head grid: each head's [K_h; V_h] is quantised as
    one matrix, its blocks split into K's and V's scale rows as the release stores them."""
    dk, dv = k.shape[0] // num_heads, v.shape[0] // num_heads
    kb, vb = head_grid(num_heads, dk, dv)
    kq, vq, ks, vs = [], [], [], []
    for h in range(num_heads):
        fused = np.concatenate([k[h * dk : (h + 1) * dk], v[h * dv : (h + 1) * dv]]).astype(
            np.float32)
        q, s = quantize(fused)
        kq.append(q[:dk])
        vq.append(q[dk:])
        ks.append(s[:kb])
        vs.append(s[kb:])
    return (np.concatenate(kq), np.concatenate(ks), np.concatenate(vq), np.concatenate(vs))


def scale_shape(rows: int, cols: int) -> tuple[int, int]:
    """The uniform grid's scale shape for a [rows, cols] weight."""
    return math.ceil(rows / BLOCK), math.ceil(cols / BLOCK)
