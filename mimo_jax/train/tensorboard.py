"""A minimal TensorBoard event-file writer for scalars (no TensorFlow, tensorboardX or protobuf).

An event file is a TFRecord stream of `Event` protos: each record is
len (u64 LE), masked crc32c(len) (u32), data, masked crc32c(data). The few proto fields
needed (Event.wall_time=1 double, step=2 int64, file_version=3 string, summary=5;
Summary.value=1; Value.tag=1 string, simple_value=2 float) are encoded by hand.
"""

from __future__ import annotations

import os
import socket
import struct
import time

_CRC_TABLE = []
for _i in range(256):
    _c = _i
    for _ in range(8):
        _c = (_c >> 1) ^ 0x82F63B78 if _c & 1 else _c >> 1
    _CRC_TABLE.append(_c)


def crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for b in data:
        crc = _CRC_TABLE[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def _masked_crc(data: bytes) -> int:
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _field_bytes(num: int, payload: bytes) -> bytes:
    return _varint(num << 3 | 2) + _varint(len(payload)) + payload


def encode_event(
    step: int,
    wall_time: float,
    *,
    scalars: dict[str, float] | None = None,
    file_version: str | None = None,
) -> bytes:
    msg = _varint(1 << 3 | 1) + struct.pack("<d", wall_time) + _varint(2 << 3 | 0) + _varint(step)
    if file_version is not None:
        msg += _field_bytes(3, file_version.encode())
    if scalars:
        summary = b"".join(
            _field_bytes(
                1, _field_bytes(1, tag.encode()) + _varint(2 << 3 | 5) + struct.pack("<f", float(v))
            )
            for tag, v in scalars.items()
        )
        msg += _field_bytes(5, summary)
    return msg


def record(data: bytes) -> bytes:
    header = struct.pack("<Q", len(data))
    return (
        header
        + struct.pack("<I", _masked_crc(header))
        + data
        + struct.pack("<I", _masked_crc(data))
    )


class EventWriter:
    """Appends scalar summaries to `logdir/events.out.tfevents.<time>.<host>`."""

    def __init__(self, logdir: str):
        os.makedirs(logdir, exist_ok=True)
        name = f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{os.getpid()}"
        self.path = os.path.join(logdir, name)
        self._f = open(self.path, "ab")
        self._f.write(record(encode_event(0, time.time(), file_version="brain.Event:2")))
        self._f.flush()

    def scalars(self, step: int, values: dict[str, float]) -> None:
        self._f.write(record(encode_event(step, time.time(), scalars=values)))

    def flush(self) -> None:
        self._f.flush()

    def close(self) -> None:
        self._f.close()
