"""FP8 block (de)quantisation: uniform grid with partial edges, the per-head K/V grid."""

import numpy as np

from mimo_jax.checkpoint import fp8


def _loop_dequant(q, s, row_scale):
    w = q.astype(np.float32)
    out = np.empty_like(w)
    for i in range(w.shape[0]):
        for j in range(w.shape[1]):
            out[i, j] = w[i, j] * row_scale(i)[j // 128]
    return out


def test_uniform_partial_edges_match_elementwise_rule():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(200, 300)).astype(np.float32)  # 2 x 3 blocks, both edges partial
    q, s = fp8.quantize(w)
    assert q.dtype == fp8.E4M3 and s.shape == (2, 3) and s.dtype == np.float32
    np.testing.assert_array_equal(fp8.dequantize(q, s), _loop_dequant(q, s, lambda i: s[i // 128]))
    # scale = block amax / 448, so each block's largest entry maps to +-448 exactly
    np.testing.assert_allclose(s[1, 2], np.abs(w[128:, 256:]).max() / 448, rtol=1e-6)
    assert np.abs(q.astype(np.float32)).max() == 448
    err = np.abs(fp8.dequantize(q, s) - w)
    assert (err <= 2**-4 * np.abs(w) + s.max() * 2**-9).all()  # E4M3: 3 mantissa bits


def test_zero_block_has_unit_scale():
    q, s = fp8.quantize(np.zeros((130, 10), np.float32))
    assert (s == 1).all() and not q.astype(np.float32).any()


def test_head_grid_follows_the_release_table():
    # Flash global layers: 4 KV heads, K 192, V 128 -> k scale 8 rows, v scale 4 rows (§4.2).
    assert fp8.head_grid(4, 192, 128) == (2, 1)
    assert fp8.is_head_grid(8, 4, 192) and not fp8.is_head_grid(6, 4, 192)
    assert not fp8.is_head_grid(12, 8, 192)  # sliding layers stay uniform
    k_rows, v_rows = fp8.head_grid_rows(4, 192, 128)
    for h in range(4):
        assert (k_rows[192 * h : 192 * h + 128] == 2 * h).all()
        assert (k_rows[192 * h + 128 : 192 * (h + 1)] == 2 * h + 1).all()
        assert (v_rows[128 * h : 128 * h + 64] == 2 * h + 1).all()  # K tail's scale row
        assert (v_rows[128 * h + 64 : 128 * (h + 1)] == 8 + h).all()  # v_scale[h]


def test_quantize_kv_shares_the_straddling_block():
    rng = np.random.default_rng(1)
    k = rng.normal(size=(2 * 192, 200)).astype(np.float32)
    v = rng.normal(size=(2 * 128, 200)).astype(np.float32)
    v[64:128] *= 50  # head 0's V tail dominates its own block only
    v[:64] *= 20  # head 0's V head dominates the block shared with K rows 128..191
    kq, ks, vq, vs = fp8.quantize_kv(k, v, 2)
    assert ks.shape == (4, 2) and vs.shape == (2, 2)
    shared = np.concatenate([k[128:192], v[:64]])  # head 0, fused rows 128..255
    np.testing.assert_allclose(ks[1], [np.abs(shared[:, :128]).max() / 448,
                                       np.abs(shared[:, 128:]).max() / 448], rtol=1e-6)
    np.testing.assert_allclose(vs[0, 0], np.abs(v[64:128, :128]).max() / 448, rtol=1e-6)
    k_rows, v_rows = fp8.head_grid_rows(2, 192, 128)
    deq_v = fp8.dequantize(vq, np.concatenate([ks, vs]), v_rows)
    ref_v = _loop_dequant(vq, None, lambda i: ks[2 * (i // 128) + 1] if i % 128 < 64
                          else vs[i // 128])
    np.testing.assert_array_equal(deq_v, ref_v)
    assert np.abs(deq_v - v).max() <= 2**-4 * np.abs(v).max()
    np.testing.assert_array_equal(fp8.dequantize(kq, ks, k_rows),
                                  _loop_dequant(kq, None, lambda i: ks[2 * (i // 192)
                                                                      + (i % 192) // 128]))
