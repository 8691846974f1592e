"""TensorBoard event framing and the JSONL metrics logger."""

import json
import struct

import pytest

from mimo_jax.train.metrics import MetricsLogger
from mimo_jax.train.tensorboard import _masked_crc, crc32c, encode_event


def test_crc32c_known_vectors():
    assert crc32c(b"123456789") == 0xE3069283  # RFC 3720 check value
    assert crc32c(b"") == 0


def test_event_file_records_and_scalars(tmp_path):
    log = MetricsLogger(str(tmp_path), total_steps=10, start_step=0, tensorboard=True,
                        progress_bar=False, console_every=100)
    log.log({"step": 1, "loss": 2.5, "mtp_ce": [3.0, 3.5]})
    log.log({"step": 1, "split": "val", "loss": 2.0, "perplexity": 7.39})
    log.close()
    recs = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert recs[0] == {"step": 1, "loss": 2.5, "mtp_ce": [3.0, 3.5]} and recs[1]["split"] == "val"
    (path,) = (tmp_path / "tensorboard").iterdir()
    data, events = path.read_bytes(), []
    while data:  # TFRecord framing: len, masked crc(len), payload, masked crc(payload)
        (n,) = struct.unpack("<Q", data[:8])
        assert struct.unpack("<I", data[8:12])[0] == _masked_crc(data[:8])
        payload = data[12 : 12 + n]
        assert struct.unpack("<I", data[12 + n : 16 + n])[0] == _masked_crc(payload)
        events.append(payload)
        data = data[16 + n :]
    assert len(events) == 3 and b"brain.Event:2" in events[0]
    assert b"train/mtp_ce/1" in events[1] and struct.pack("<f", 3.5) in events[1]
    assert b"val/perplexity" in events[2]
    try:  # TensorBoard's own reader, where it is installed
        from tensorboard.backend.event_processing import event_accumulator
    except ImportError:
        return
    acc = event_accumulator.EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert acc.Scalars("train/loss")[0].value == pytest.approx(2.5)


def test_encode_event_fields():
    ev = encode_event(7, 1.0, scalars={"a": 1.0})
    assert ev.startswith(b"\x09" + struct.pack("<d", 1.0) + b"\x10\x07")
