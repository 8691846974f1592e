"""The converter's building blocks: table dequantisation straight into (transposed, strided)
outputs, memory-mapped tensor reads, and the ordered bounded read-ahead."""

import threading
import time

import ml_dtypes
import numpy as np
import pytest

from mimo_jax.checkpoint import fp8
from mimo_jax.checkpoint.pipeline import ordered_map
from mimo_jax.checkpoint.safetensors_io import DTYPES, SafetensorsFile, ShardedWriter
from mimo_jax.core.errors import CheckpointError

BF16 = np.dtype(ml_dtypes.bfloat16)


def _reference(q, s, row_map, dtype):
    """The definition: float32(fp8) * its block's float32 scale, rounded once to `dtype`."""
    cols = np.arange(q.shape[1]) // fp8.BLOCK
    return (q.astype(np.float32) * s[row_map][:, cols]).astype(dtype)


def _payload(rng, rows, cols):
    q = rng.integers(0, 256, (rows, cols), np.uint8)
    q[(q & 0x7F) == 0x7F] = 0x3F  # E4M3 has no infinities; keep NaN out of the comparison
    return q.view(fp8.E4M3)


@pytest.mark.parametrize("dtype", [np.float32, BF16, np.float16])
@pytest.mark.parametrize("rows,cols,grid", [(200, 300, None), (2 * 192, 260, "k"),
                                            (2 * 128, 130, "v"), (5, 1000, None)])
def test_dequantize_into_is_bit_exact_any_layout(dtype, rows, cols, grid):
    rng = np.random.default_rng(rows + cols)
    q = _payload(rng, rows, cols)
    if grid is None:
        row_map = fp8.uniform_rows(rows)
    else:  # the per-head K/V grid: V rows point into [k_scale; v_scale]
        k_rows, v_rows = fp8.head_grid_rows(2, 192, 128)
        row_map = k_rows if grid == "k" else v_rows
    s = rng.uniform(1e-4, 1e-1, (row_map.max() + 1, -(-cols // 128))).astype(np.float32)
    want = _reference(q, s, row_map, dtype).view(f"u{np.dtype(dtype).itemsize}")
    got = fp8.dequantize(q, s, row_map, out_dtype=dtype)
    assert got.dtype == dtype and np.array_equal(got.view(want.dtype), want)
    # transposed into a strided slot (as one expert's gate or up half of [d, f, 2])
    slots = np.zeros((cols, rows, 2), dtype)
    fp8.dequantize_into(slots[:, :, 1], q, s, row_map, transposed=True)
    assert np.array_equal(slots[:, :, 1].T.view(want.dtype), want)
    assert not slots[:, :, 0].astype(np.float32).any()  # the other half untouched


def test_dequantize_into_rejects_mismatched_shapes():
    q = _payload(np.random.default_rng(0), 128, 256)
    s = np.ones((1, 2), np.float32)
    with pytest.raises(ValueError, match="output"):
        fp8.dequantize_into(np.empty((128, 256), np.float32), q, s, transposed=True)
    with pytest.raises(ValueError, match="scale shape"):
        fp8.dequantize_into(np.empty((128, 256), np.float32), q, np.ones((1, 3), np.float32))


def test_map_matches_read_and_catches_truncation(tmp_path):
    rng = np.random.default_rng(0)
    a = rng.normal(size=(300, 70)).astype(np.float32)
    b = rng.integers(0, 256, (9000, 5), np.uint8)  # spans several pages, odd offsets
    c = a[:3, :3].astype(BF16)
    plan = [("a", a.dtype, a.shape), ("b", b.dtype, b.shape), ("c", c.dtype, c.shape)]
    w = ShardedWriter(str(tmp_path), plan, 1 << 30)
    for name, v in zip("abc", (a, b, c), strict=True):
        w.write(name, v)
    w.close()
    f = SafetensorsFile(tmp_path / "model-00001-of-00001.safetensors")
    for name, v in zip("abc", (a, b, c), strict=True):
        got = f.map(name)
        assert got.dtype == v.dtype and not got.flags.writeable
        assert np.array_equal(got.view(np.uint8), v.view(np.uint8))
        assert np.array_equal(f.map(name, (1, 3)).view(np.uint8), v[1:3].view(np.uint8))
    assert f.map("b", (4, 4)).shape == (0, 5)
    path = tmp_path / "model-00001-of-00001.safetensors"
    with open(path, "r+b") as fh:  # the file shrinks after its header was read
        fh.truncate(path.stat().st_size - 10)
    with pytest.raises(CheckpointError, match="truncated"):
        f.map("c")
    assert DTYPES["BF16"] == BF16


def test_ordered_map_keeps_order_and_bounds_bytes_in_flight():
    held, peak, lock = [0], [0], threading.Lock()

    def work(i):
        with lock:
            held[0] += 10
            peak[0] = max(peak[0], held[0])
        time.sleep(0.002 * (i % 3))  # finish out of order
        return i

    out = []
    for i in ordered_map(work, ((i, 10) for i in range(40)), budget_bytes=35, workers=4):
        with lock:
            held[0] -= 10
        out.append(i)
    assert out == list(range(40))
    assert peak[0] <= 40  # budget 35: at most 3 items queued ahead of the one consumed


def test_ordered_map_runs_an_item_larger_than_the_budget_and_propagates_errors():
    assert list(ordered_map(lambda x: x * 2, [(1, 100), (2, 100)], budget_bytes=10)) == [2, 4]

    def fail(i):
        if i == 3:
            raise KeyError("boom")
        return i

    started = []
    with pytest.raises(KeyError, match="boom"):
        for _ in ordered_map(lambda i: started.append(i) or fail(i),
                             ((i, 1) for i in range(1000)), budget_bytes=4, workers=2):
            pass
    assert len(started) < 20  # nothing far past the failure ran
