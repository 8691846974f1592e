"""Orbax checkpoints of MiMo: the on-disk layouts, streamed writing, restoring.

Layouts (shared with the training code; keep them exactly):

Orbax model directory (written by `mimo-jax convert hf-to-orbax`)::

    DST/config.json     the model config in the hub spelling (`ModelConfig.to_hf()`)
    DST/params/         Orbax checkpoint (StandardSave layout) of
                        `nnx.to_pure_dict(nnx.state(model))`: a nested dict keyed by the model's
                        state path (Params and the router's RouterBias), leaves np/jax arrays
    DST/fp8/            only with --keep-fp8: Orbax checkpoint (same layout) of the FP8
                        parameters, which are then absent from params/. Keyed by the same state
                        path; each leaf is {"payload": F8_E4M3 [(layers,) n, out, in],
                        "scale_inv": float32 [(layers,) n, out_blocks, in_blocks]} holding the n
                        released tensors of that parameter (hf_mapping name order) as stored.
    DST/mimo_jax.json   {"format": "mimo-jax-orbax", "version": 1, "dtype": ..., "fp8": bool,
                        "hf_dtypes": {released name: dtype where it differs from the default},
                        "source": ...}; written last: a directory without it is not valid

Training work directory::

    WORKDIR/checkpoints/<step>/params/   same tree as DST/params (StandardSave)
    WORKDIR/checkpoints/<step>/meta/     JsonSave of {"config": cfg.to_hf(), "tokenizer": ...}

`load(WORKDIR)` takes the latest step, `load(WORKDIR/checkpoints/<step>)` that step.

Streamed writing: Orbax saves a tree whose leaves are zero-byte placeholders; a custom type
handler creates each array (the metadata Orbax itself writes) and then lets the converter fill
the arrays slab by slab with TensorStore transactions of bounded size, before Orbax finalises
(and checks that every array has data). So the result is a regular StandardSave checkpoint,
readable by `ocp.StandardCheckpointer`, but the model is never in memory at once.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import math
import os
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts
from etils import epath
from flax import nnx

from mimo_jax.core.errors import CheckpointError
from mimo_jax.model.config import ModelConfig
from mimo_jax.model.shapes import abstract_model
from mimo_jax.parallel.placement import placer
from mimo_jax.sharding.rules import state_shardings

FORMAT = "mimo-jax-orbax"
VERSION = 1
CHUNK_BYTES = 128 << 20  # chunks larger than this are split (restores stay parallel)
# Streamed saves: transactions committing while the next one fills (each holds its data).
# More in flight, or smaller OCDBT data files (written in parallel), measured no faster on
# one core and cost CPU: the commit's time is the kernel copying into the page cache.
MAX_COMMITTING = 1
Path = tuple[Any, ...]


# ---------------------------------------------------------------------------- streamed save
class _Placeholder(np.ndarray):
    """Shape and dtype of a leaf, no data (a zero-strided view of one element)."""


def _placeholder(path: Path, shape: tuple[int, ...], dtype: np.dtype) -> _Placeholder:
    leaf = np.broadcast_to(np.zeros((), dtype), shape).view(_Placeholder)
    leaf.key = path
    return leaf


class SlabWriter:
    """Writes slabs into the arrays being saved, in TensorStore transactions of about
    `txn_bytes`; a full transaction commits in the background while the next one fills
    (at most `max_committing` in flight, which bounds the memory held: each holds its data).

    Written arrays are referenced, not copied, until their transaction commits: a caller
    must not modify an array after passing it to `write` until its `release` callback (if
    given) has run, which happens once the transaction holding it has committed.
    `on_commit` (if given) runs after each committed transaction."""

    def __init__(self, stores: dict[Path, ts.TensorStore], txn_bytes: int,
                 max_committing: int = 1, on_commit: Callable[[], None] | None = None):
        self.stores, self.txn_bytes, self.max_committing = stores, txn_bytes, max_committing
        self.on_commit = on_commit
        self._txn, self._pending, self._released = ts.Transaction(), 0, []
        self._committing: list[tuple[ts.Future, list[Callable[[], None]]]] = []
        self.written: dict[Path, int] = dict.fromkeys(stores, 0)

    def write(self, path: Path, index: tuple, value: np.ndarray,
              release: Callable[[], None] | None = None) -> None:
        store = self.stores[path].with_transaction(self._txn)
        store[index].write(value, can_reference_source_data_indefinitely=True).result()
        self.written[path] += value.size
        self._pending += value.nbytes
        if release is not None:
            self._released.append(release)
        if self._pending >= self.txn_bytes:
            self._commit_async()

    def _commit_async(self) -> None:
        if self._pending:
            self._committing.append((self._txn.commit_async(), self._released))
            self._txn, self._pending, self._released = ts.Transaction(), 0, []
        while len(self._committing) > self.max_committing:
            self._finish_oldest()

    def _finish_oldest(self) -> None:
        future, released = self._committing.pop(0)
        future.result()
        for release in released:
            release()
        if self.on_commit is not None:
            self.on_commit()

    def commit(self) -> None:
        """Commit what is pending and wait for every transaction in flight."""
        self._commit_async()
        while self._committing:
            self._finish_oldest()

    def abort(self) -> None:
        """Drop the open transaction and wait out the ones committing (errors ignored; the
        arrays written are not released: nothing is reused after a failure)."""
        self._txn.abort()
        for f, _ in self._committing:
            with contextlib.suppress(Exception):
                f.result()
        self._committing = []

    def check_complete(self) -> None:
        for path, n in self.written.items():
            size = math.prod(self.stores[path].shape)
            if n != size:
                raise RuntimeError(f"internal: leaf {path} got {n} of {size} elements")


class _Writeback:
    """Starts the kernel's writeback of the files written so far, in the background, after
    each commit: the disk then writes while the conversion goes on, instead of all at the
    final fsync (the kernel would wait for its dirty-page threshold, gigabytes, before
    starting). POSIX_FADV_DONTNEED writes dirty pages back asynchronously and drops the
    pages already clean, so the output does not pile up in the page cache either.
    Durability is still the final `fsync_tree`."""

    def __init__(self, directory: str):
        self.directory = directory
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="mimo-wb")
        self._queued: concurrent.futures.Future | None = None

    def kick(self) -> None:
        if self._queued is None or self._queued.done():  # one pass covers every file
            self._queued = self._pool.submit(self._pass)

    def _pass(self) -> None:
        for root, _, files in os.walk(self.directory):
            for name in files:
                try:
                    fd = os.open(os.path.join(root, name), os.O_RDONLY)
                except OSError:  # renamed/removed meanwhile (Orbax's own files)
                    continue
                try:
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                except OSError:
                    pass
                finally:
                    os.close(fd)

    def close(self) -> None:
        self._pool.shutdown(wait=True)


# Each commit's files are not fsynced (that serialises the pipeline on the disk); the saved
# directory is fsynced once at the end instead (`fsync_tree`), before it is declared valid.
_NO_SYNC = {"file_io_sync": False}


class _StreamHandler(ocp.type_handlers.NumpyHandler):
    """Creates the arrays of placeholder leaves (uncompressed, chosen chunks), then runs `fill`.

    `typestr` stays "np.ndarray", so the checkpoint restores with the standard handlers."""

    def __init__(self, fill: Callable[[SlabWriter], None], chunks: dict[Path, tuple[int, ...]],
                 txn_bytes: int):
        super().__init__()
        self.fill, self.chunks, self.txn_bytes = fill, chunks, txn_bytes
        self.error: BaseException | None = None

    async def _create_and_fill(self, values, infos, args) -> None:
        stores = {}
        for value, info, arg in zip(values, infos, args, strict=True):
            await info.await_path_creation()
            ocdbt = bool(info.is_ocdbt_checkpoint)
            spec = ocp.type_handlers.get_json_tspec_write(
                info, use_ocdbt=ocdbt, global_shape=value.shape, local_shape=value.shape,
                dtype=value.dtype, arg=arg,
                process_index=ocp.multihost.process_index() if ocdbt else None)
            zarr = spec if spec["driver"].startswith("zarr") else spec["base"]
            zarr["metadata"]["chunks"] = list(self.chunks[value.key])
            zarr["metadata"]["compressor"] = None  # weights barely compress; zstd costs CPU
            context = ts.Context(ts.Context.Spec(_NO_SYNC), parent=info.ts_context)
            stores[value.key] = await ts.open(ts.Spec(spec), create=True, open=True,
                                              context=context)
        writeback = _Writeback(os.fspath(infos[0].parent_dir)) if infos else None
        writer = SlabWriter(stores, self.txn_bytes, MAX_COMMITTING,
                            writeback.kick if writeback else None)
        try:
            self.fill(writer)
            writer.commit()
            writer.check_complete()
        except BaseException as e:  # Orbax wraps errors; keep the original for the caller
            writer.abort()
            self.error = e
            raise
        finally:
            if writeback is not None:
                writeback.close()

    async def serialize(self, values, infos, args=None):
        args = args or [ocp.SaveArgs()] * len(values)
        return [ocp.future.CommitFutureAwaitingContractedSignals(
            self._create_and_fill(values, infos, args), name="mimo_jax_stream")]


def fsync_tree(directory: str) -> None:
    """fsync every file and directory under `directory` (data first, then the names)."""
    dirs = []
    for root, _, files in os.walk(directory):
        dirs.append(root)
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    for d in reversed(dirs):
        fd = os.open(d, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def default_chunks(shape: tuple[int, ...], unit: tuple[int, ...], itemsize: int
                   ) -> tuple[int, ...]:
    """Start from the shape one write covers and halve its largest dim until <= CHUNK_BYTES."""
    chunk = list(unit)
    while math.prod(chunk) * itemsize > CHUNK_BYTES and max(chunk) > 1:
        i = int(np.argmax(chunk))
        chunk[i] = math.ceil(chunk[i] / 2)
    return tuple(max(1, c) for c in chunk)


def save_streamed(directory: str, leaves: dict[Path, tuple[tuple[int, ...], np.dtype]],
                  chunks: dict[Path, tuple[int, ...]], fill: Callable[[SlabWriter], None],
                  *, txn_bytes: int = 256 << 20) -> None:
    """Save a StandardSave-layout checkpoint of `leaves` whose data `fill(writer)` provides.

    `fill` must write every element of every leaf (checked), slab by slab; a slab should
    cover whole chunks (else TensorStore reads back and rewrites a chunk).
    """
    tree: dict = {}
    for path, (shape, dtype) in leaves.items():
        node = tree
        for k in path[:-1]:
            node = node.setdefault(str(k), {})
        node[str(path[-1])] = _placeholder(path, shape, np.dtype(dtype))
    handler = _StreamHandler(fill, chunks, txn_bytes)
    # A jax.Array handler too (the tree has none): Orbax warns when a registry lacks one.
    registry = ocp.type_handlers.create_type_handler_registry(
        (_Placeholder, handler), (jax.Array, ocp.type_handlers.ArrayHandler()))
    ckptr = ocp.Checkpointer(ocp.PyTreeCheckpointHandler(type_handler_registry=registry))
    try:
        ckptr.save(os.path.abspath(directory), args=ocp.args.PyTreeSave(tree))
    except BaseException:
        if handler.error is not None:
            raise handler.error from None
        raise
    finally:
        ckptr.close()
    fsync_tree(os.path.abspath(directory))


# ---------------------------------------------------------------------------- reading
class LeafReader:
    """Slab reads of single leaves of an Orbax checkpoint (for streaming exports)."""

    def __init__(self, directory: str):
        self.directory = os.path.abspath(directory)
        self.ocdbt = os.path.exists(os.path.join(self.directory, "manifest.ocdbt"))
        # The handler's metadata, not the Checkpointer's: a training step's `params/` item has
        # no step-level _CHECKPOINT_METADATA, and the Checkpointer warns about that.
        meta = ocp.StandardCheckpointHandler().metadata(epath.Path(self.directory))
        tree = getattr(meta, "tree", meta)
        self.leaves: dict[Path, Any] = {
            tuple(_key(k) for k in p): v
            for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]
        }
        self._open: dict[Path, ts.TensorStore] = {}
        self._context = ocp.type_handlers.get_ts_context(use_ocdbt=self.ocdbt)

    def __contains__(self, path: Path) -> bool:
        return tuple(str(k) for k in path) in self.leaves

    def store(self, path: Path) -> ts.TensorStore:
        path = tuple(str(k) for k in path)
        if path not in self._open:
            if path not in self.leaves:
                raise CheckpointError(f"{self.directory}: no parameter {'.'.join(path)}")
            info = ocp.type_handlers.ParamInfo(name=".".join(path),
                                               parent_dir=epath.Path(self.directory),
                                               is_ocdbt_checkpoint=self.ocdbt,
                                               ts_context=self._context)
            spec = ocp.type_handlers.get_json_tspec_read(info, use_ocdbt=self.ocdbt)
            self._open[path] = ts.open(spec, open=True, read=True,
                                       context=self._context).result()
        return self._open[path]

    def read(self, path: Path, index: tuple = ()) -> np.ndarray:
        return np.asarray(self.store(path)[index].read().result())


def _key(k) -> str:
    for attr in ("key", "idx", "name"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def restore_params(params_dir: str | os.PathLike, cfg: ModelConfig,
                   extra: dict[Path, np.ndarray] | None = None, placement=None,
                   abstract=None):
    """A `MiMo` with the parameters of an Orbax `params/` checkpoint (StandardSave of
    `nnx.to_pure_dict(nnx.state(model))`), cast to `cfg.param_dtype` (routers stay float32).

    `extra`: values for leaves absent from the checkpoint (the dequantised FP8 ones).
    `placement` (mesh, rules): restore every parameter directly into its shards.
    `abstract`: the abstract model to fill (default `abstract_model(cfg)`; one with FP8
    weights kept, whose payloads and scales come in `extra`).
    """
    graphdef, state = nnx.split(abstract_model(cfg) if abstract is None else abstract)
    flat = dict(nnx.to_flat_state(state))
    place = placer(state, placement)
    shardings = ({} if placement is None else
                 {p: v.get_value() for p, v in nnx.to_flat_state(state_shardings(state,
                                                                                 *placement))})
    extra = extra or {}
    params_dir = os.path.abspath(os.fspath(params_dir))
    stored = LeafReader(params_dir).leaves
    target: dict = {}
    for path, var in flat.items():
        if path in extra:
            continue
        key = tuple(str(k) for k in path)
        if key not in stored:
            raise CheckpointError(f"{params_dir}: parameter {'.'.join(key)} is missing")
        node = target
        for k in key[:-1]:
            node = node.setdefault(k, {})
        node[key[-1]] = jax.ShapeDtypeStruct(var.shape, var.dtype, sharding=shardings.get(path))
    unknown = sorted(".".join(k) for k in stored if k not in
                     {tuple(str(x) for x in p) for p in flat})
    if unknown:
        raise CheckpointError(f"{params_dir}: parameters the config does not have: {unknown[:3]}")
    restored = ocp.StandardCheckpointer().restore(params_dir, target)
    for path, var in flat.items():
        if path in extra:
            value = extra[path]
        else:
            value = restored
            for k in path:
                value = value[str(k)]
        if tuple(value.shape) != tuple(var.shape):
            raise CheckpointError(f"{params_dir}: {'.'.join(map(str, path))} has shape "
                                  f"{tuple(value.shape)}, the config expects {tuple(var.shape)}")
        if isinstance(value, jax.Array):
            var.set_value(value.astype(var.dtype))
        else:
            var.set_value(place(path, np.asarray(value, var.dtype)))
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


# ---------------------------------------------------------------------------- directories
def read_json(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"missing {path}") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON ({e})") from None


def is_model_dir(path: str) -> bool:
    return os.path.isdir(os.path.join(path, "params")) and (
        os.path.exists(os.path.join(path, "mimo_jax.json")))


def training_step_dir(path: str) -> str | None:
    """The step directory a training work dir / step path refers to (latest step), else None."""
    ckpts = os.path.join(path, "checkpoints")
    if os.path.isdir(ckpts):
        steps = [int(n) for n in os.listdir(ckpts)
                 if n.isdigit() and os.path.isdir(os.path.join(ckpts, n, "params"))]
        if not steps:
            raise CheckpointError(f"{ckpts} holds no finished checkpoint step")
        return os.path.join(ckpts, str(max(steps)))
    if os.path.isdir(os.path.join(path, "params")) and os.path.isdir(os.path.join(path, "meta")):
        return path
    return None


def step_config(step_dir: str) -> dict:
    """The hub-spelling config stored in a training step's `meta` item."""
    meta_dir = os.path.join(step_dir, "meta")
    files = [n for n in os.listdir(meta_dir) if not n.startswith("_")] if os.path.isdir(
        meta_dir) else []
    for name in files:
        meta = read_json(os.path.join(meta_dir, name))
        if isinstance(meta, dict) and "config" in meta:
            return meta["config"]
    raise CheckpointError(f"{meta_dir}: no training metadata with a 'config'")


def model_dir_info(path: str) -> dict:
    info = read_json(os.path.join(path, "mimo_jax.json"))
    if info.get("format") != FORMAT or info.get("version") != VERSION:
        raise CheckpointError(f"{path}/mimo_jax.json: not a {FORMAT} v{VERSION} directory")
    return info
