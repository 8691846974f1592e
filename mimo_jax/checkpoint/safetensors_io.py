"""Lazy safetensors reading: header index first, memory-mapped payloads, one tensor at a time.

The `safetensors` package's numpy backend cannot return bfloat16 or float8, so the format is
read directly (8-byte little-endian header length, JSON header, raw little-endian payload) and
viewed through `ml_dtypes`.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
from collections.abc import Iterator

import ml_dtypes
import numpy as np

from mimo_jax.core.errors import CheckpointError

DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
DTYPE_NAMES: dict[np.dtype, str] = {v: k for k, v in DTYPES.items()}


class SafetensorsFile:
    """One `.safetensors` file: tensor names, dtypes and shapes up front, data on demand."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        try:
            size = os.path.getsize(self.path)
            with open(self.path, "rb") as f:
                prefix = f.read(8)
                if len(prefix) < 8:
                    raise CheckpointError(f"{self.path}: truncated (no safetensors header)")
                (header_len,) = struct.unpack("<Q", prefix)
                if header_len > min(size - 8, 100 << 20):
                    raise CheckpointError(f"{self.path}: corrupt header length {header_len}")
                header = json.loads(f.read(header_len))
        except FileNotFoundError:
            raise CheckpointError(f"missing checkpoint file {self.path}") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{self.path}: corrupt safetensors header ({e})") from None
        self.metadata = header.pop("__metadata__", None) or {}
        self._data_start = 8 + header_len
        self._entries = header
        payload = size - self._data_start
        for name, entry in header.items():
            if entry.get("dtype") not in DTYPES:
                raise CheckpointError(f"{self.path}: tensor {name!r} has unsupported dtype "
                                      f"{entry.get('dtype')!r}")
            begin, end = entry["data_offsets"]
            want = DTYPES[entry["dtype"]].itemsize * int(np.prod(entry["shape"], dtype=np.int64))
            if end - begin != want or end > payload:
                raise CheckpointError(
                    f"{self.path}: tensor {name!r} is truncated or corrupt (bytes {begin}..{end} "
                    f"of a {payload}-byte payload, {want} expected)"
                )
        self._mmap: np.memmap | None = None

    def keys(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def dtype(self, name: str) -> np.dtype:
        return DTYPES[self._entries[name]["dtype"]]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._entries[name]["shape"])

    def nbytes(self, name: str) -> int:
        begin, end = self._entries[name]["data_offsets"]
        return end - begin

    def read(self, name: str, rows: tuple[int, int] | None = None) -> np.ndarray:
        """A private copy of one tensor (or of rows [a, b) of its first axis), read with
        `pread`: unlike the mmap view it leaves nothing resident in this process afterwards."""
        shape, dtype = self.shape(name), self.dtype(name)
        begin, end = self._entries[name]["data_offsets"]
        if rows is not None:
            row_bytes = dtype.itemsize * int(np.prod(shape[1:], dtype=np.int64))
            begin, end = begin + rows[0] * row_bytes, begin + rows[1] * row_bytes
            shape = (rows[1] - rows[0], *shape[1:])
        out = np.empty(shape, dtype)
        view = memoryview(out.reshape(-1).view(np.uint8))
        with open(self.path, "rb", buffering=0) as f:
            f.seek(self._data_start + begin)
            got = 0
            while got < end - begin:
                n = f.readinto(view[got:])
                if not n:
                    raise CheckpointError(f"{self.path}: tensor {name!r} is truncated (file ends "
                                          f"after {got} of its {end - begin} bytes)")
                got += n
        return out

    def drop_cached(self, name: str, rows: tuple[int, int] | None = None) -> None:
        """Let the kernel drop this tensor's (or rows [a, b) of its) pages from the page
        cache (a hint: pages still mapped somewhere, or shared with a neighbour, stay). For
        streaming a checkpoint once: its pages are freed for reuse as soon as it is used,
        instead of crowding out other data (or, in a VM, growing its memory)."""
        begin, end = self._entries[name]["data_offsets"]
        if rows is not None:
            shape = self.shape(name)
            row_bytes = self.dtype(name).itemsize * int(np.prod(shape[1:], dtype=np.int64))
            begin, end = begin + rows[0] * row_bytes, begin + rows[1] * row_bytes
        if end > begin:
            fd = os.open(self.path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, self._data_start + begin, end - begin,
                                 os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)

    def map(self, name: str, rows: tuple[int, int] | None = None) -> np.ndarray:
        """One tensor (or rows [a, b) of it) as a read-only array over its own memory map,
        read in (populated) before this returns and unmapped when the array is dropped.

        For streaming: no allocation, no copy, and the read itself (in the kernel, without
        the GIL) overlaps with other threads' work; nothing stays resident afterwards."""
        shape, dtype = self.shape(name), self.dtype(name)
        begin, end = self._entries[name]["data_offsets"]
        if rows is not None:
            row_bytes = dtype.itemsize * int(np.prod(shape[1:], dtype=np.int64))
            begin, end = begin + rows[0] * row_bytes, begin + rows[1] * row_bytes
            shape = (rows[1] - rows[0], *shape[1:])
        if end == begin:
            return np.empty(shape, dtype)
        start = self._data_start + begin
        base = start - start % mmap.ALLOCATIONGRANULARITY
        with open(self.path, "rb", buffering=0) as f:
            size = os.fstat(f.fileno()).st_size
            if size < self._data_start + end:
                raise CheckpointError(f"{self.path}: tensor {name!r} is truncated (file ends "
                                      f"after {max(0, size - start)} of its {end - begin} bytes)")
            os.posix_fadvise(f.fileno(), start, end - begin, os.POSIX_FADV_WILLNEED)
            mapped = mmap.mmap(f.fileno(), self._data_start + end - base,
                               flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0),
                               prot=mmap.PROT_READ, offset=base)
        return np.frombuffer(mapped, np.uint8, end - begin, start - base).view(dtype).reshape(
            shape)

    def get(self, name: str) -> np.ndarray:
        """A read-only memory-mapped view of one tensor (no copy until used)."""
        if self._mmap is None:
            self._mmap = np.memmap(self.path, dtype=np.uint8, mode="r")
        begin, end = self._entries[name]["data_offsets"]
        raw = self._mmap[self._data_start + begin : self._data_start + end]
        return raw.view(self.dtype(name)).reshape(self.shape(name))


class SafetensorsCheckpoint:
    """A directory with `model.safetensors.index.json` (sharded) or a single safetensors file."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = os.fspath(directory)
        index_path = os.path.join(self.directory, "model.safetensors.index.json")
        if os.path.exists(index_path):
            try:
                with open(index_path) as f:
                    weight_map: dict[str, str] = json.load(f)["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise CheckpointError(
                    f"{index_path}: not a valid safetensors index ({e})"
                ) from None
        else:
            files = sorted(n for n in os.listdir(self.directory) if n.endswith(".safetensors"))
            if not files:
                raise CheckpointError(f"no .safetensors files in {self.directory}")
            weight_map = {}
            for name in files:
                for key in SafetensorsFile(os.path.join(self.directory, name)).keys():
                    weight_map[key] = name
        self.weight_map = weight_map
        self._files: dict[str, SafetensorsFile] = {}

    def file_of(self, name: str) -> SafetensorsFile:
        fname = self.weight_map[name]
        if fname not in self._files:
            self._files[fname] = SafetensorsFile(os.path.join(self.directory, fname))
            missing = [k for k, v in self.weight_map.items()
                       if v == fname and k not in self._files[fname]]
            if missing:
                raise CheckpointError(f"{fname}: tensors listed in the index are missing: "
                                      f"{missing[:5]}")
        return self._files[fname]

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def __iter__(self) -> Iterator[str]:
        return iter(self.weight_map)

    def get(self, name: str) -> np.ndarray:
        if name not in self.weight_map:
            raise CheckpointError(f"tensor {name!r} is missing from the checkpoint in "
                                  f"{self.directory}")
        return self.file_of(name).get(name)

    def dtype(self, name: str) -> np.dtype:
        return self.file_of(name).dtype(name)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.file_of(name).shape(name)


class ShardedWriter:
    """Writes tensors in a planned order into safetensors shards of at most `max_shard_bytes`
    (a larger tensor gets a shard of its own) plus `model.safetensors.index.json`.

    The plan (names, dtypes, shapes) is fixed up front so every header can be written before
    its payload; tensors then stream in one at a time.
    """

    def __init__(self, directory: str, plan: list[tuple[str, np.dtype, tuple[int, ...]]],
                 max_shard_bytes: int):
        self.directory = directory
        shards: list[list[tuple[str, np.dtype, tuple[int, ...]]]] = [[]]
        size = 0
        for entry in plan:
            nbytes = entry[1].itemsize * int(np.prod(entry[2], dtype=np.int64))
            if shards[-1] and size + nbytes > max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append(entry)
            size += nbytes
        n = len(shards)
        self._files = [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        self._shards = shards
        self.weight_map = {e[0]: f for f, sh in zip(self._files, shards, strict=True) for e in sh}
        self.total_bytes = 0
        self._queue = [(i, e) for i, sh in enumerate(shards) for e in sh]
        self._pos = 0
        self._handle = None
        self._shard = -1

    def _open(self, i: int) -> None:
        if self._handle is not None:
            self._handle.close()
        header: dict = {"__metadata__": {"format": "pt"}}
        offset = 0
        for name, dtype, shape in self._shards[i]:
            nbytes = dtype.itemsize * int(np.prod(shape, dtype=np.int64))
            header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape),
                            "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)  # payload 8-byte aligned, as safetensors writes it
        self._handle = open(os.path.join(self.directory, self._files[i]), "wb")
        self._handle.write(struct.pack("<Q", len(blob)) + blob)
        self._shard = i

    def write(self, name: str, value: np.ndarray) -> None:
        shard, (want_name, dtype, shape) = self._queue[self._pos]
        if name != want_name or value.dtype != dtype or value.shape != tuple(shape):
            raise ValueError(f"writer expected {want_name} {dtype}{list(shape)}, got {name} "
                             f"{value.dtype}{list(value.shape)}")
        if shard != self._shard:
            self._open(shard)
        self._handle.write(np.ascontiguousarray(value).reshape(-1).view(np.uint8).data)
        self.total_bytes += value.nbytes
        self._pos += 1

    def close(self) -> None:
        if self._pos != len(self._queue):
            raise ValueError(f"writer closed after {self._pos} of {len(self._queue)} tensors")
        if self._handle is not None:
            self._handle.close()
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": self.weight_map}
        with open(os.path.join(self.directory, "model.safetensors.index.json"), "w") as f:
            json.dump(index, f, indent=2)
