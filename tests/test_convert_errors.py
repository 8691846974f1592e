"""Broken checkpoints and interrupted conversions: clear errors, nothing valid-looking at DST."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from convert_util import save_with_mtp, tiny_model
from flax import nnx
from safetensors.torch import load_file, save_file

from mimo_jax import CheckpointError
from mimo_jax.checkpoint import hf_to_orbax

NAME = "model.layers.1.mlp.experts.2.up_proj.weight"


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    d = tmp_path_factory.mktemp("good")
    save_with_mtp(tiny_model(seed=7), str(d / "hf"), mtp_layers=1)
    return d / "hf"


def _broken(good, tmp_path, edit):
    src = tmp_path / "src"
    shutil.copytree(good, src)
    tensors = load_file(str(src / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(src / "model.safetensors"), metadata={"format": "pt"})
    index = json.load(open(src / "model.safetensors.index.json"))
    index["weight_map"] = {**{k: "model.safetensors" for k in tensors},
                           **{k: v for k, v in index["weight_map"].items() if "mtp" in k}}
    json.dump(index, open(src / "model.safetensors.index.json", "w"))
    return src


def _expect_error(src, tmp_path, *needles):
    with pytest.raises(CheckpointError) as e:
        hf_to_orbax(str(src), str(tmp_path / "dst"), progress=False)
    for needle in needles:
        assert needle in str(e.value), str(e.value)
    assert sorted(os.listdir(tmp_path)) == ["src"]  # no DST, no partial directory


@pytest.mark.parametrize("case", ["unknown", "missing", "shape", "dtype"])
def test_bad_tensor(good, tmp_path, case):
    def edit(t):
        if case == "unknown":
            t["model.layers.1.mlp.experts.9.up_proj.weight"] = t[NAME].clone()
        elif case == "missing":
            del t[NAME]
        elif case == "shape":
            t[NAME] = t[NAME][:-1].clone()
        else:
            t[NAME] = t[NAME].to(torch.int32)

    src = _broken(good, tmp_path, edit)
    name = "model.layers.1.mlp.experts.9.up_proj.weight" if case == "unknown" else NAME
    needles = {"unknown": ["unknown"], "missing": ["missing"], "shape": ["shape"],
               "dtype": ["I32"]}[case]
    _expect_error(src, tmp_path, name, *needles,
                  *([] if case == "missing" else ["model.safetensors"]))


def test_truncated_and_corrupt_shards(good, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(good, src)
    path = src / "model-mtp.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[:-100])
    _expect_error(src, tmp_path, "model-mtp.safetensors", "truncated", "model.mtp.layers.0.")
    path.write_bytes(data[:8] + b"{not json" + data[17:])
    _expect_error(src, tmp_path, "model-mtp.safetensors", "corrupt")


_CHILD = """
import sys, time
from mimo_jax.checkpoint import convert, orbax_io
write = orbax_io.SlabWriter.write
def slow(self, *a):
    write(self, *a)
    print("WRITING", flush=True)
    time.sleep(0.05)
orbax_io.SlabWriter.write = slow
convert.hf_to_orbax(sys.argv[1], sys.argv[2], progress=False)
"""


def test_killed_conversion_leaves_no_valid_dst(good, tmp_path):
    dst = tmp_path / "dst"
    proc = subprocess.Popen([sys.executable, "-c", _CHILD, str(good), str(dst)],
                            stdout=subprocess.PIPE, text=True)
    seen = 0
    deadline = time.time() + 120
    while seen < 20 and time.time() < deadline:
        if proc.stdout.readline().startswith("WRITING"):
            seen += 1
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert seen == 20 and proc.returncode == -signal.SIGKILL
    assert not dst.exists()
    leftovers = os.listdir(tmp_path)
    assert all(n.startswith(".dst.partial-") for n in leftovers), leftovers
    for n in leftovers:
        assert not (tmp_path / n / "mimo_jax.json").exists()
    import mimo_jax

    with pytest.raises(CheckpointError):
        mimo_jax.load(str(dst))
    # The interrupted attempt does not block a retry, and the retry's result is complete.
    hf_to_orbax(str(good), str(dst), progress=False)
    state = nnx.to_pure_dict(nnx.state(mimo_jax.load(str(dst))))
    released = load_file(str(good / "model.safetensors"))
    np.testing.assert_array_equal(np.asarray(state["embed"]),
                                  released["model.embed_tokens.weight"].numpy())
    np.testing.assert_array_equal(np.asarray(state["lm_head"]).T,
                                  released["lm_head.weight"].numpy())
