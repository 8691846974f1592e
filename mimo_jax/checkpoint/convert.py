"""Release safetensors <-> Orbax model directory, streaming (see orbax_io for the layouts).

hf-to-orbax reads one released tensor (or one row slab of a large one) at a time, in file
order, and writes it straight into its slot of the stacked Orbax array: host memory holds a
bounded read-ahead, two bounded TensorStore transactions and a bounded pool of free output
buffers, never a stacked group or the model. It is a pipeline: worker threads map tensors
(no copy), dequantise and transpose them into the model's layout in one pass
(`fp8.dequantize_into`), in file order but ahead of the writer (`pipeline.ordered_map`, a
byte budget); the writer fills one transaction while the previous one commits
(`orbax_io.SlabWriter`), whose output buffers then go back for reuse (`_Buffers`: no page
faults or zeroing per tensor) and whose source pages leave the page cache (read once); the
disk writes committed files back in the background meanwhile, and the output is fsynced
once at the end.
orbax-to-hf reads one parameter (one expert of a stacked one) at a time and streams it into
pre-planned safetensors shards.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import re
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterator

import numpy as np

from mimo_jax.checkpoint import fp8
from mimo_jax.checkpoint.hf_mapping import TensorMap, hf_shapes, tensor_maps, to_hf, to_model
from mimo_jax.checkpoint.orbax_io import (
    FORMAT,
    VERSION,
    LeafReader,
    Path,
    SlabWriter,
    default_chunks,
    model_dir_info,
    read_json,
    save_streamed,
    step_config,
    training_step_dir,
)
from mimo_jax.checkpoint.pipeline import ordered_map
from mimo_jax.checkpoint.release import (
    SCALE_SUFFIX,
    ReleaseReader,
    checkpoint_dtype,
    model_shapes,
)
from mimo_jax.checkpoint.safetensors_io import DTYPE_NAMES, DTYPES, ShardedWriter
from mimo_jax.core.dtypes import canonical_dtype
from mimo_jax.core.errors import CheckpointError
from mimo_jax.core.logs import Progress
from mimo_jax.model.config import ModelConfig

# What the release quantises (checkpoint.md §2): q/k/v, dense MLPs, experts.
QUANTIZED = re.compile(r".*(self_attn\.[qkv]_proj|mlp\.(gate|up|down)_proj|mlp\.experts\.\d+\."
                       r"(gate|up|down)_proj)\.weight$")
_ROUTER = re.compile(r".*mlp\.gate\.(weight|e_score_correction_bias)$")
SLAB_BYTES = 64 << 20  # larger plain 2-D tensors (embeddings, lm_head) are read in row slabs
READ_AHEAD_BYTES = 256 << 20  # read + laid out ahead of the writer (bounds the memory held)
EXPERT_KINDS = ("experts_gate_up", "experts_down")


@contextlib.contextmanager
def staged_output(dst: str, overwrite: bool) -> Iterator[str]:
    """A fresh directory next to `dst`, moved onto `dst` only when the body succeeds."""
    dst = os.path.abspath(dst)
    if os.path.lexists(dst) and not overwrite:
        raise FileExistsError(f"{dst} exists; pass --overwrite to replace it")
    parent = os.path.dirname(dst)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(dst)}.partial-", dir=parent)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if os.path.lexists(dst):
        old = tmp + ".old"
        os.rename(dst, old)
        os.rename(tmp, dst)
        shutil.rmtree(old)
    else:
        os.rename(tmp, dst)


def _groups(maps: list[TensorMap]) -> dict[Path, list[TensorMap]]:
    out: dict[Path, list[TensorMap]] = {}
    for m in maps:
        out.setdefault(m.path, []).append(m)
    return out


def _default_hf_dtype(name: str, dtype: str) -> np.dtype:
    return DTYPES["F32"] if _ROUTER.match(name) else np.dtype(
        {"bfloat16": DTYPES["BF16"], "float32": DTYPES["F32"], "float16": DTYPES["F16"]}[dtype])


# ---------------------------------------------------------------------------- hf -> orbax
def hf_to_orbax(src: str, dst: str, *, dtype: str | None = None, keep_fp8: bool = False,
                overwrite: bool = False, progress: bool = True,
                txn_bytes: int = 256 << 20) -> str:
    """Convert a release/HF directory into an Orbax model directory at `dst`."""
    if os.path.lexists(dst) and not overwrite:
        raise FileExistsError(f"{os.path.abspath(dst)} exists; pass --overwrite to replace it")
    if keep_fp8 and dtype is not None:
        raise ValueError("--keep-fp8 and --dtype exclude each other")
    reader = ReleaseReader(src)
    reader.validate()
    names = [n for m in reader.maps for n in m.hf_names]
    any_fp8 = any(reader.is_fp8(n) for n in names)
    if keep_fp8 and not any_fp8:
        raise CheckpointError(f"{src}: --keep-fp8 given but the checkpoint has no FP8 tensors")
    src_dtype = checkpoint_dtype(src)
    # Default: the checkpoint's torch_dtype (bfloat16 for the release); --keep-fp8 stores the
    # non-FP8 tensors in it too.
    dtype = canonical_dtype(dtype or src_dtype, what="conversion dtype")
    cfg = reader.cfg.replace(dtype=dtype, param_dtype=dtype)
    shapes = reader.shapes if cfg == reader.cfg else model_shapes(cfg)  # (traces the model)
    groups = _groups(reader.maps)
    fp8_paths = {p for p, g in groups.items()
                 if keep_fp8 and all(reader.is_fp8(n) for m in g for n in m.hf_names)}
    hf_dtypes = {n: DTYPE_NAMES[reader.ckpt.dtype(n)] for n in names
                 if not reader.is_fp8(n)
                 and reader.ckpt.dtype(n) != _default_hf_dtype(n, src_dtype)}

    total = sum(_source_bytes(reader, n) for n in names)
    bar = Progress(total, desc="hf-to-orbax", unit="B", unit_scale=True, enabled=progress)
    with staged_output(dst, overwrite) as tmp:
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(cfg.to_hf(), f, indent=2)
        plain = {p: g for p, g in groups.items() if p not in fp8_paths}
        leaves = {p: shapes[p] for p in shapes if p not in fp8_paths}
        chunks = {p: default_chunks(shapes[p][0], _unit_shape(shapes[p][0], g),
                                    shapes[p][1].itemsize) for p, g in plain.items()}
        for p in leaves:  # variables without released tensors would be left empty
            if p not in chunks:
                raise CheckpointError(f"internal: no released tensor maps to {p}")
        save_streamed(os.path.join(tmp, "params"), leaves, chunks,
                      lambda w: _fill_params(reader, plain, shapes, w, bar), txn_bytes=txn_bytes)
        if fp8_paths:
            fp8_leaves, fp8_chunks = {}, {}
            for p in fp8_paths:
                for leaf, (shape, dt) in _fp8_leaf_shapes(reader, groups[p]).items():
                    fp8_leaves[p + (leaf,)] = (shape, dt)
                    unit = (1,) * (len(shape) - 2) + shape[-2:]
                    fp8_chunks[p + (leaf,)] = default_chunks(shape, unit, dt.itemsize)
            save_streamed(os.path.join(tmp, "fp8"), fp8_leaves, fp8_chunks,
                          lambda w: _fill_fp8(reader, {p: groups[p] for p in fp8_paths}, w, bar),
                          txn_bytes=txn_bytes)
        bar.close()
        info = {"format": FORMAT, "version": VERSION, "dtype": dtype, "fp8": bool(fp8_paths),
                "hf_dtypes": hf_dtypes, "source": os.path.abspath(src)}
        with open(os.path.join(tmp, "mimo_jax.json"), "w") as f:
            json.dump(info, f, indent=2)
    return os.path.abspath(dst)


def _unit_shape(shape: tuple[int, ...], group: list[TensorMap]) -> tuple[int, ...]:
    """The part of a leaf one write covers: one layer of a stacked leaf, one expert."""
    lead = 1 if group[0].block is not None else 0
    unit = [1] * lead + list(shape[lead:])
    if group[0].kind in EXPERT_KINDS:
        unit[lead] = 1
    return tuple(unit)


def _fill_params(reader: ReleaseReader, groups: dict[Path, list[TensorMap]],
                 shapes: dict, writer: SlabWriter, bar: Progress) -> None:
    units = []  # (file, offset, path, map, expert or row slab)
    for path, group in groups.items():
        for m in group:
            if m.kind in EXPERT_KINDS:
                per = 2 if m.kind == "experts_gate_up" else 1
                for e in range(len(m.hf_names) // per):
                    units.append((*reader.offset(m.hf_names[per * e]), path, m, ("e", e, per)))
            elif (len(m.hf_names) == 1 and m.kind in ("copy", "linear")
                  and len(reader.ckpt.shape(m.hf_names[0])) == 2
                  and not reader.is_fp8(m.hf_names[0])
                  and reader.nbytes(m.hf_names[0]) > SLAB_BYTES):
                rows, _ = reader.ckpt.shape(m.hf_names[0])
                step = max(1, SLAB_BYTES * rows // reader.nbytes(m.hf_names[0]))
                for a in range(0, rows, step):
                    units.append((*reader.offset(m.hf_names[0]), path, m,
                                  ("rows", a, min(rows, a + step))))
            else:
                units.append((*reader.offset(m.hf_names[0]), path, m, None))
    units.sort(key=lambda u: (u[0], u[1], str(u[4])))

    def names_of(m: TensorMap, part) -> tuple[str, ...]:
        if part is not None and part[0] == "e":
            _, e, per = part
            return m.hf_names[per * e : per * (e + 1)]
        return m.hf_names

    def source_bytes(m: TensorMap, part) -> int:
        if part is not None and part[0] == "rows":
            name = m.hf_names[0]
            return reader.nbytes(name) * (part[2] - part[1]) // reader.ckpt.shape(name)[0]
        return sum(_source_bytes(reader, n) for n in names_of(m, part))

    buffers = _Buffers(READ_AHEAD_BYTES)

    def produce(unit) -> tuple[Path, tuple, np.ndarray, int, Callable[[], None]]:
        _, _, path, m, part = unit
        shape, dtype = shapes[path]
        lead = () if m.block is None else (m.block,)
        pshape = shape[len(lead):]
        taken: list[np.ndarray] = []
        alloc = functools.partial(buffers.take, into=taken)
        if part is None:
            value, index = _laid_out(reader, m.kind, m.hf_names, pshape, dtype, alloc), lead
        elif part[0] == "e":
            value = _laid_out(reader, m.kind, names_of(m, part), (1, *pshape[1:]), dtype,
                              alloc)[0]
            index = (*lead, part[1])
        else:
            _, a, b = part
            slab = reader.ckpt.file_of(m.hf_names[0]).map(m.hf_names[0], (a, b))
            if m.kind == "copy":
                value, index = _cast(slab, dtype, alloc), (*lead, slice(a, b))
            else:  # linear: released rows are our columns
                value = alloc(slab.shape[::-1], dtype)
                _transpose_into(value, slab)
                index = (*lead, slice(None), slice(a, b))
        rows = (part[1], part[2]) if part is not None and part[0] == "rows" else None

        def release() -> None:  # once the transaction holding `value` has committed
            buffers.give(taken)
            _drop_source(reader, names_of(m, part), rows)

        return path, index, value, source_bytes(m, part), release

    def unit_bytes(unit) -> int:
        _, _, path, m, part = unit
        shape, dtype = shapes[path]
        if part is None:
            n = math.prod(shape[0 if m.block is None else 1:])
        elif part[0] == "e":
            n = math.prod(shape[2 if m.block is not None else 1:])
        else:  # a row slab of the released matrix, whichever way it is laid out
            rows = reader.ckpt.shape(m.hf_names[0])[0]
            n = math.prod(shape[0 if m.block is None else 1:]) // rows * (part[2] - part[1])
        return n * dtype.itemsize + source_bytes(m, part)

    # closing(): on an error the workers stop now, not when the traceback is dropped
    with contextlib.closing(ordered_map(produce, ((u, unit_bytes(u)) for u in units),
                                        budget_bytes=READ_AHEAD_BYTES)) as done:
        for path, index, value, nbytes, release in done:
            writer.write(path, index, value, release)
            bar.update(nbytes)


class _Buffers:
    """Output arrays recycled: one goes back (`give`) once the transaction holding it has
    committed, and a later unit of the same size (or up to 2x smaller) reuses it. Fresh
    arrays cost page faults and page zeroing (a third of the CPU time of a bf16 conversion
    before), reused ones nothing. Free buffers kept: at most `limit_bytes` (the rest is
    dropped)."""

    def __init__(self, limit_bytes: int):
        self.limit = limit_bytes
        self._free: dict[int, list[np.ndarray]] = {}
        self._free_bytes = 0
        self._lock = threading.Lock()

    def take(self, shape: tuple[int, ...], dtype: np.dtype, into: list) -> np.ndarray:
        """An uninitialised array (the caller overwrites all of it); its buffer is appended
        to `into`, to be given back later."""
        dtype = np.dtype(dtype)
        nbytes = math.prod(shape) * dtype.itemsize
        buf = None
        with self._lock:
            fits = [n for n, free in self._free.items() if free and nbytes <= n <= 2 * nbytes]
            if fits:
                buf = self._free[min(fits)].pop()
                self._free_bytes -= buf.nbytes
        if buf is None:
            buf = np.empty(nbytes, np.uint8)
        into.append(buf)
        return buf[:nbytes].view(dtype).reshape(shape)

    def give(self, bufs: list[np.ndarray]) -> None:
        with self._lock:
            for buf in bufs:
                if self._free_bytes + buf.nbytes <= self.limit:
                    self._free.setdefault(buf.nbytes, []).append(buf)
                    self._free_bytes += buf.nbytes


def _new_array(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    return np.empty(shape, dtype)


def _cast(x: np.ndarray, dtype: np.dtype, alloc=_new_array) -> np.ndarray:
    if x.dtype == dtype:
        return x
    out = alloc(x.shape, dtype)
    out[...] = x  # the same rounding as astype
    return out


def _transpose_into(out: np.ndarray, x: np.ndarray) -> None:
    """out[...] = x.T (2-D, `out` may be strided), a few rows at a time (cache friendly)."""
    if x.dtype == out.dtype:  # a plain copy of bits (no float semantics in the way)
        out, x = out.view(_UINT[out.dtype.itemsize]), x.view(_UINT[x.dtype.itemsize])
    fp8.transpose_rows_into(out, x)  # (else cast in the same copy)


_UINT = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}


def _fp8_tensor(reader: ReleaseReader, name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(memory-mapped payload, scale rows, row -> scale-row map) of one FP8 tensor."""
    payload = reader.ckpt.file_of(name).map(name)
    scale = reader.ckpt.file_of(name + SCALE_SUFFIX).read(name + SCALE_SUFFIX)
    row_map, k_scale = reader.row_map(name)
    if k_scale is not None:  # per-head V: row indices point into [k_scale; v_scale]
        scale = np.concatenate([k_scale, scale])
    return payload, scale, row_map


def _put_transposed(reader: ReleaseReader, out2d: np.ndarray, name: str) -> None:
    """out2d[...] = released tensor `name`.T, dequantised (in the same pass) if FP8."""
    if reader.is_fp8(name):
        fp8.dequantize_into(out2d, *_fp8_tensor(reader, name), transposed=True)
    else:
        _transpose_into(out2d, reader.ckpt.file_of(name).map(name))


def _laid_out(reader: ReleaseReader, kind: str, names: tuple[str, ...],
              shape: tuple[int, ...], dtype: np.dtype, alloc=_new_array) -> np.ndarray:
    """`to_model(kind, [tensors of names], shape)` cast to `dtype`, built straight from the
    files: every layout but "copy" is the released [out, in] matrix transposed (reshaped),
    so each tensor is read, dequantised and transposed into its slot in one pass."""
    if kind == "copy":
        name, = names
        if reader.is_fp8(name):
            out = alloc(shape, dtype)
            fp8.dequantize_into(out, *_fp8_tensor(reader, name))
            return out
        return _cast(reader.ckpt.file_of(name).map(name), dtype, alloc)
    out = alloc(shape, dtype)
    if kind == "linear":  # [out, in] -> [in, out]
        _put_transposed(reader, out, names[0])
    elif kind == "heads_in":  # [n*h, d] -> [d, n, h]
        _put_transposed(reader, out.reshape(shape[0], -1), names[0])
    elif kind == "heads_out":  # [d, n*h] -> [n, h, d]
        _put_transposed(reader, out.reshape(-1, shape[-1]), names[0])
    elif kind == "experts_gate_up":  # E x ([f, d] gate, [f, d] up) -> [E, d, f, 2], E = 1 here
        for e in range(shape[0]):
            for c in (0, 1):
                _put_transposed(reader, out[e, :, :, c], names[2 * e + c])
    elif kind == "experts_down":  # E x [d, f] -> [E, f, d]
        for e in range(shape[0]):
            _put_transposed(reader, out[e], names[e])
    else:
        raise ValueError(f"unknown tensor kind {kind!r}")
    return out


def _drop_source(reader: ReleaseReader, names: tuple[str, ...],
                 rows: tuple[int, int] | None = None) -> None:
    """Drop converted source tensors (with their scales) from the page cache: the source is
    read once, and its freed pages take the output's (measured: keep-fp8 ~25% faster)."""
    for name in names:
        reader.ckpt.file_of(name).drop_cached(name, rows)
        if reader.is_fp8(name):
            reader.ckpt.file_of(name + SCALE_SUFFIX).drop_cached(name + SCALE_SUFFIX)


def _source_bytes(reader: ReleaseReader, name: str) -> int:
    scale = reader.nbytes(name + SCALE_SUFFIX) if reader.is_fp8(name) else 0
    return reader.nbytes(name) + scale


def _fp8_leaf_shapes(reader: ReleaseReader, group: list[TensorMap]) -> dict:
    m = group[0]
    lead = () if m.block is None else (len(group),)
    rows, cols = reader.ckpt.shape(m.hf_names[0])
    srows, scols = reader.ckpt.shape(m.hf_names[0] + SCALE_SUFFIX)
    n = len(m.hf_names)
    return {"payload": ((*lead, n, rows, cols), reader.ckpt.dtype(m.hf_names[0])),
            "scale_inv": ((*lead, n, srows, scols), DTYPES["F32"])}


def _fill_fp8(reader: ReleaseReader, groups: dict[Path, list[TensorMap]], writer: SlabWriter,
              bar: Progress) -> None:
    units = [(*reader.offset(n), p, m, j, n) for p, g in groups.items() for m in g
             for j, n in enumerate(m.hf_names)]
    units.sort(key=lambda u: (u[0], u[1]))

    def produce(unit):  # payload memory-mapped: written without a copy of our own
        _, _, path, m, j, name = unit
        return (path, m, j, reader.ckpt.file_of(name).map(name),
                reader.ckpt.file_of(name + SCALE_SUFFIX).read(name + SCALE_SUFFIX))

    with contextlib.closing(ordered_map(
            produce, ((u, _source_bytes(reader, u[5])) for u in units),
            budget_bytes=READ_AHEAD_BYTES)) as done:
        for path, m, j, payload, scale in done:
            lead = () if m.block is None else (m.block,)
            writer.write(path + ("payload",), (*lead, j), payload)
            writer.write(path + ("scale_inv",), (*lead, j), scale,
                         functools.partial(_drop_source, reader, (m.hf_names[j],)))
            bar.update(payload.nbytes + scale.nbytes)


def fp8_leaf_values(fp8_dir: str, cfg: ModelConfig) -> dict[Path, np.ndarray]:
    """Dequantised model-layout values of every parameter stored in an `fp8/` item."""
    leaves = LeafReader(fp8_dir)
    shapes = model_shapes(cfg)
    out: dict[Path, np.ndarray] = {}
    stored = {p[:-1] for p in leaves.leaves}
    for path, group in _groups(tensor_maps(cfg)).items():
        key = tuple(str(k) for k in path)
        if key not in stored:
            continue
        payload = leaves.read(key + ("payload",))
        scale = leaves.read(key + ("scale_inv",))
        shape, dtype = shapes[path]
        value = np.empty(shape, dtype)
        for m in group:
            lead = () if m.block is None else (m.block,)
            pshape = shape[len(lead):]
            kv = _kv_grid(leaves, key, lead, cfg, m)
            deq = []
            for j in range(len(m.hf_names)):
                s = scale[(*lead, j)]
                row_map = fp8.uniform_rows(payload.shape[-2])
                if kv is not None:
                    (k_rows, v_rows), k_scale = kv
                    row_map = k_rows if key[-1] == "k_proj" else v_rows
                    if key[-1] == "v_proj":
                        s = np.concatenate([k_scale, s])
                deq.append(fp8.dequantize(payload[(*lead, j)], s, row_map))
            value[lead] = to_model(m.kind, deq, pshape)
        out[path] = value
    return out


def _kv_grid(leaves: LeafReader, key: tuple, lead: tuple, cfg: ModelConfig, m: TensorMap):
    """Per-head grid row maps (and K's scale) for a stored K/V projection, else None."""
    if key[-1] not in ("k_proj", "v_proj"):
        return None
    k_key, v_key = key[:-1] + ("k_proj",), key[:-1] + ("v_proj",)
    if k_key + ("scale_inv",) not in leaves or v_key + ("payload",) not in leaves:
        return None
    k_store = leaves.store(k_key + ("payload",))
    n_dk = k_store.shape[-2]
    v_rows = leaves.store(v_key + ("payload",)).shape[-2]
    attn = "full" if n_dk != cfg.sliding_attention.num_kv_heads * cfg.sliding_attention.head_dim \
        else None
    spec = cfg.full_attention if attn else cfg.sliding_attention
    n = spec.num_kv_heads
    k_scale = leaves.read(k_key + ("scale_inv",), (*lead, 0))
    if not fp8.is_head_grid(k_scale.shape[0], n, n_dk // n):
        return None
    return fp8.head_grid_rows(n, n_dk // n, v_rows // n), k_scale


# ---------------------------------------------------------------------------- orbax -> hf
def _source(src: str) -> tuple[ModelConfig, str, str | None, dict]:
    """(config, params dir, fp8 dir, hf_dtypes) of an Orbax model dir or training step."""
    src = os.path.abspath(src)
    if os.path.exists(os.path.join(src, "mimo_jax.json")):
        info = model_dir_info(src)
        cfg = ModelConfig.from_hf(read_json(os.path.join(src, "config.json")))
        cfg = cfg.replace(dtype=info["dtype"], param_dtype=info["dtype"])
        return (cfg, os.path.join(src, "params"),
                os.path.join(src, "fp8") if info.get("fp8") else None, info.get("hf_dtypes", {}))
    step = training_step_dir(src)
    if step is None:
        raise CheckpointError(f"{src} is neither an Orbax model directory (mimo_jax.json) nor a "
                              "training work directory / checkpoint step")
    hf = step_config(step)
    dtype = canonical_dtype(str(hf.get("torch_dtype", "float32")))
    cfg = ModelConfig.from_hf(hf).replace(dtype=dtype, param_dtype=dtype)
    return cfg, os.path.join(step, "params"), None, {}


def orbax_to_hf(src: str, dst: str, *, fp8_out: bool = False, overwrite: bool = False,
                max_shard_bytes: int = 4 << 30, progress: bool = True) -> str:
    """Export an Orbax model directory / training checkpoint to the released layout."""
    if os.path.lexists(dst) and not overwrite:
        raise FileExistsError(f"{os.path.abspath(dst)} exists; pass --overwrite to replace it")
    cfg, params_dir, fp8_dir, hf_dtypes = _source(src)
    params = LeafReader(params_dir)
    stored8 = LeafReader(fp8_dir) if fp8_dir else None
    shapes = model_shapes(cfg)
    maps = tensor_maps(cfg)

    def in_fp8(m: TensorMap) -> bool:
        return stored8 is not None and tuple(str(k) for k in m.path) + ("payload",) in stored8

    def full_layer(name: str) -> bool:
        hit = re.match(r"^model\.layers\.(\d+)\.self_attn\.[kv]_proj", name)
        return bool(hit) and cfg.layer_types[int(hit.group(1))] == "full"

    plan, ignored = [], []
    for m in maps:
        pshape = shapes[m.path][0][0 if m.block is None else 1:]
        for name, shape in zip(m.hf_names, hf_shapes(m.kind, pshape), strict=True):
            quant = in_fp8(m) if fp8_out and in_fp8(m) else fp8_out and bool(QUANTIZED.match(name))
            if quant:
                plan.append((name, fp8.E4M3, shape))
                plan.append((name + SCALE_SUFFIX, DTYPES["F32"],
                             _scale_shape(cfg, name, shape, full_layer(name))))
            else:
                dt = DTYPES[hf_dtypes[name]] if name in hf_dtypes else _default_hf_dtype(
                    name, cfg.param_dtype)
                plan.append((name, dt, shape))
                if fp8_out and name.endswith(".weight") and len(shape) == 2 and not _ROUTER.match(
                        name):
                    ignored.append(name[: -len(".weight")])
    total = sum(dt.itemsize * int(np.prod(s)) for _, dt, s in plan)
    bar = Progress(total, desc="orbax-to-hf", unit="B", unit_scale=True, enabled=progress)
    with staged_output(dst, overwrite) as tmp:
        writer = ShardedWriter(tmp, plan, max_shard_bytes)
        dtypes = {name: dt for name, dt, _ in plan}
        kv_cache: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for m in maps:
            lead = () if m.block is None else (m.block,)
            per = {"experts_gate_up": 2, "experts_down": 1}.get(m.kind)
            parts = ([(e, m.hf_names[per * e : per * (e + 1)])
                      for e in range(len(m.hf_names) // per)] if per else [(None, m.hf_names)])
            for e, names in parts:
                for name, out in _export_unit(m, lead, e, names, params, stored8, in_fp8(m),
                                              fp8_out, cfg, full_layer, kv_cache, dtypes):
                    writer.write(name, out)
                    bar.update(out.nbytes)
        writer.close()
        bar.close()
        hf = cfg.to_hf()
        hf.pop("mimo_jax_mtp_hidden", None) if cfg.mtp_hidden == "post_norm" else None
        if fp8_out:
            hf["quantization_config"] = {
                "activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                "weight_block_size": [fp8.BLOCK, fp8.BLOCK], "packed_modules_mapping": {},
                "ignored_layers": ignored}
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(hf, f, indent=2)
    return os.path.abspath(dst)


def _scale_shape(cfg: ModelConfig, name: str, shape, full: bool) -> tuple[int, int]:
    if full:
        spec = cfg.full_attention
        kb, vb = fp8.head_grid(spec.num_kv_heads, spec.head_dim, spec.v_head_dim)
        rows = kb if ".k_proj." in name else vb
        return spec.num_kv_heads * rows, fp8.scale_shape(*shape)[1]
    return fp8.scale_shape(*shape)


def _export_unit(m, lead, e, names, params, stored8, in8, fp8_out, cfg, full_layer, kv_cache,
                 dtypes):
    """Yield (name, array) for the released tensors of one map (or one expert of it)."""
    key = tuple(str(k) for k in m.path)
    if in8:  # stored FP8: copy payloads and scales, or dequantise them (already HF layout)
        first = m.hf_names.index(names[0])
        sl = (*lead, slice(first, first + len(names)))
        payload = stored8.read(key + ("payload",), sl)
        scale = stored8.read(key + ("scale_inv",), sl)
        kv = _kv_grid(stored8, key, lead, cfg, m)
        for j, name in enumerate(names):
            if fp8_out:
                yield name, payload[j]
                yield name + SCALE_SUFFIX, scale[j]
                continue
            s, row_map = scale[j], None
            if kv is not None:
                (k_rows, v_rows), k_scale = kv
                row_map = k_rows if key[-1] == "k_proj" else v_rows
                s = np.concatenate([k_scale, s]) if key[-1] == "v_proj" else s
            yield name, fp8.dequantize(payload[j], s, row_map).astype(dtypes[name])
        return
    value = params.read(key, (*lead, e) if e is not None else lead)
    tensors = to_hf(m.kind, value[None] if e is not None else value)
    for name, t in zip(names, tensors, strict=True):
        if dtypes[name] != fp8.E4M3:
            yield name, t.astype(dtypes[name])
            continue
        if full_layer(name):  # K and V share blocks: quantise the pair, keep the other half
            if name not in kv_cache:
                k_name = name.replace(".v_proj.", ".k_proj.")
                v_name = name.replace(".k_proj.", ".v_proj.")
                other = params.read(key[:-1] + ("v_proj" if name == k_name else "k_proj",), lead)
                other = to_hf("heads_in", other)[0]
                k, v = (t, other) if name == k_name else (other, t)
                kq, ks, vq, vs = fp8.quantize_kv(k.astype(np.float32), v.astype(np.float32),
                                                 cfg.full_attention.num_kv_heads)
                kv_cache[k_name], kv_cache[v_name] = (kq, ks), (vq, vs)
            q, s = kv_cache.pop(name)
        else:
            q, s = fp8.quantize(t.astype(np.float32))
        yield name, q
        yield name + SCALE_SUFFIX, s
