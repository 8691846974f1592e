"""`mimo-jax` end to end through `cli.main`: every subcommand (demo has its own test), the
global --quiet/--verbose flags, dtype flags in any spelling, and the error exits with their
messages. One tiny training run (a subprocess whose stderr is a pipe, as in a CI log) makes
the checkpoint the other commands read."""

import json
import logging
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import mimo_jax
from mimo_jax import cli
from mimo_jax.core import logs

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["model.num_layers=2", "model.hidden_size=32", "model.intermediate_size=64",
        "model.moe_intermediate_size=16", "model.vocab_size=260", "model.num_mtp_layers=2",
        "seq_len=32", "batch_size=4", "data.val_batches=1", "val_every=2", "console_every=1",
        "save_every=1000"]


@pytest.fixture(autouse=True)
def normal_verbosity():
    yield
    logs.set_verbosity("normal")  # cli.main sets it process-wide


@pytest.fixture(scope="module")
def train_run(tmp_path_factory):
    """`mimo-jax train` for 2 steps with stderr not a terminal: (workdir, stdout, stderr)."""
    root = tmp_path_factory.mktemp("cli")
    corpus = root / "corpus"
    corpus.mkdir()
    for i in range(30):
        (corpus / f"f{i}.py").write_text(f"def function_{i}(x):\n    return x * {i}\n" * 3)
    work = root / "work"
    args = ["train", "--workdir", str(work), "--steps", "2", "--set", f"data.source={corpus}"]
    for item in TINY:
        args += ["--set", item]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": REPO}
    proc = subprocess.run([sys.executable, "-m", "mimo_jax.cli", *args], capture_output=True,
                          text=True, env=env, cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return work, proc.stdout, proc.stderr


@pytest.fixture(scope="module")
def hf_dir(train_run, tmp_path_factory):
    dst = tmp_path_factory.mktemp("export") / "hf"
    assert cli.main(["convert", "orbax-to-hf", str(train_run[0]), str(dst)]) == 0
    return dst


def test_train_log_is_plain_lines_without_warnings(train_run):
    work, out, err = train_run
    assert "\r" not in out + err  # no progress-bar frames in a non-terminal log
    lines = (out + err).splitlines()
    assert not [line for line in lines if "WARNING" in line or "Warning" in line], lines
    assert 4 <= len(lines) <= 10, lines
    assert err.splitlines()[0].startswith("starting: ")
    assert [line.split(":")[0] for line in err.splitlines()[1:]] == ["step 1", "step 2", "step 2"]
    assert out.startswith("stopped at step 2 (steps), val loss ")  # the result, on stdout
    assert (work / "checkpoints" / "2").is_dir() and any((work / "tensorboard").iterdir())


def test_train_errors_and_dtype_spellings(tmp_path, capsys):
    base = ["train", "--workdir", str(tmp_path / "w")]
    assert cli.main([*base, "--set", "param_dtype=int8"]) == 2
    assert "mimo-jax train: error: param_dtype must be one of float32, bfloat16" in (
        capsys.readouterr().err)
    assert cli.main([*base, "--set", "no_such_setting=1"]) == 2
    assert "unknown setting 'no_such_setting'" in capsys.readouterr().err
    assert cli.main([*base, "--set", "data.source=/nonexistent/corpus", "--steps", "1"]) == 2
    assert "/nonexistent/corpus" in capsys.readouterr().err
    assert cli.main([*base, "--print-config", "--set", "param_dtype=bf16",
                     "--set", "compute_dtype=F32"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert (printed["param_dtype"], printed["compute_dtype"]) == ("bfloat16", "float32")
    with pytest.raises(SystemExit) as e:
        cli.main([*base, "--nope"])
    assert e.value.code == 2 and "unrecognized arguments: --nope" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        cli.main(["train"])
    assert e.value.code == 2 and "--workdir" in capsys.readouterr().err


def test_load_accepts_any_dtype_spelling(train_run):
    work = train_run[0]
    for dtype, want in [(jnp.bfloat16, "bfloat16"), ("bf16", "bfloat16"),
                        (np.float32, "float32"), ("F32", "float32")]:
        model = mimo_jax.load(str(work), dtype=dtype)
        assert model.cfg.dtype == model.cfg.param_dtype == want
        dtypes = {path: v.get_value().dtype
                  for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
        assert dtypes[("embed",)] == jnp.dtype(want)
        # every parameter in that dtype, except the routers (kept float32 by design)
        assert {p for p, d in dtypes.items() if d != want} <= {
            p for p in dtypes if p[-1] == "router"}
    with pytest.raises(ValueError, match="got 'int8'"):
        mimo_jax.load(str(work), dtype="int8")
    cfg = mimo_jax.ModelConfig.tiny(dtype=jnp.bfloat16)
    assert cfg.dtype == "bfloat16" and cfg.replace(dtype="f32").dtype == "float32"


def test_convert_both_ways_inspect_and_quiet(train_run, hf_dir, tmp_path, capsys):
    assert sorted(p.name for p in hf_dir.iterdir())[0] == "config.json"
    orbax = tmp_path / "orbax"
    assert cli.main(["--quiet", "convert", "hf-to-orbax", str(hf_dir), str(orbax),
                     "--dtype", "BF16"]) == 0
    out, err = capsys.readouterr()
    assert out == f"wrote {orbax}\n" and err == ""
    assert json.loads((orbax / "mimo_jax.json").read_text())["dtype"] == "bfloat16"
    assert cli.main(["inspect", str(orbax)]) == 0
    text = capsys.readouterr().out
    assert "Orbax model directory (dtype bfloat16" in text and "MTP layers found: [0, 1]" in text
    assert cli.main(["inspect", str(hf_dir)]) == 0
    assert "inconsistencies: none" in capsys.readouterr().out
    # A taken destination, a missing source, a bad dtype, an unknown flag.
    assert cli.main(["convert", "hf-to-orbax", str(hf_dir), str(orbax)]) == 1
    assert "exists; pass --overwrite" in capsys.readouterr().err
    assert cli.main(["convert", "orbax-to-hf", str(tmp_path / "missing"), str(tmp_path / "x")]) == 1
    assert "mimo-jax convert: error: " in capsys.readouterr().err
    assert cli.main(["inspect", str(tmp_path / "missing")]) == 1
    assert "mimo-jax inspect: error: " in capsys.readouterr().err
    for argv in (["hf-to-orbax", "a", "b", "--dtype", "float64"],
                 ["orbax-to-hf", "a", "b", "--bogus"]):
        with pytest.raises(SystemExit) as e:
            cli.main(["convert", *argv])
        assert e.value.code == 2
    err = capsys.readouterr().err
    assert "argument --dtype: dtype must be one of float32, bfloat16, float16" in err
    assert "got 'float64'" in err and "unrecognized arguments: --bogus" in err


def test_generate(train_run, capsys):
    work = str(train_run[0])
    # (--speculative through the CLI: tests/test_generate.py)
    assert cli.main(["generate", "--checkpoint", work, "--prompt", "def ", "--max-new-tokens",
                     "3", "--json", "--dtype", "f32"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert 1 <= len(out["tokens"]) <= 3 and isinstance(out["text"], str)
    assert out["acceptance_length"] is None and out["tokens_per_second"] > 0
    assert cli.main(["generate", "--checkpoint", work + "/nope", "--prompt", "x"]) == 2
    assert "mimo-jax generate: error: " in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        cli.main(["generate", "--checkpoint", work, "--prompt", "x", "--dtype", "fp8"])
    assert e.value.code == 2 and "got 'fp8'" in capsys.readouterr().err


def test_info_and_plan(hf_dir, capsys):
    assert cli.main(["info", "--config", "flash"]) == 0
    assert "parameters: total 308.779B, active 15.446B" in capsys.readouterr().out
    # (the forward pass `info` runs by default compiles for ~20 s; the model tests cover it)
    assert cli.main(["info", "--config", str(hf_dir), "--no-forward"]) == 0
    out = capsys.readouterr().out
    assert "layers: 2 (1 sliding, 1 full), MTP heads: 2" in out
    assert cli.main(["info", "--config", str(hf_dir / "nope")]) == 2
    assert "mimo-jax info: error: no config.json" in capsys.readouterr().err
    plan = ["plan", "--config", "flash", "--mesh", "fsdp=16,expert=8", "--batch", "128",
            "--seq", "4096"]
    assert cli.main([*plan, "--param-dtype", "bf16"]) == 0
    bf16 = capsys.readouterr().out
    assert cli.main([*plan, "--param-dtype", "float32"]) == 0
    f32 = capsys.readouterr().out
    assert "bfloat16 weights" in bf16 and "float32 weights" in f32

    def params_gib(text):
        (row,) = [line for line in text.splitlines() if line.startswith("parameters")]
        return float(row.split()[-1])

    assert params_gib(f32) == pytest.approx(2 * params_gib(bf16), rel=0.01)
    assert cli.main(["plan", "--config", "tiny", "--mesh", "fsdp=-1", "--batch", "8",
                     "--seq", "64"]) == 2
    assert "give --devices" in capsys.readouterr().err
    assert cli.main(["plan", "--config", "tiny", "--mesh", "fsdp=2,bogus=2", "--batch", "8",
                     "--seq", "64"]) == 2
    assert "unknown mesh axes ['bogus']" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        cli.main(["plan", "--mesh", "fsdp=2", "--batch", "8", "--seq", "64",
                  "--param-dtype", "int4"])
    assert e.value.code == 2 and "argument --param-dtype" in capsys.readouterr().err


def test_global_flags(capsys):
    assert cli.main(["--verbose", "info", "--config", "tiny", "--no-forward"]) == 0
    assert logging.getLogger("absl").level == logging.INFO and logs.verbosity() == "verbose"
    assert cli.main(["info", "--config", "tiny", "--no-forward"]) == 0
    assert logs.verbosity() == "normal"
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        cli.main(["--quiet", "--verbose", "info"])
    assert e.value.code == 2 and "not allowed with argument" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        cli.main([])
    assert e.value.code == 2 and "required: command" in capsys.readouterr().err
