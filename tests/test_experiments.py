"""experiments/: declarations, `list`/`show`, a smoke `run` (resume, remote mirror), `launch
--dry-run` for a multi-host slice, and `report` on two run directories."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from experiments import LayerPattern, Scaled, resolve, sweeps
from experiments.__main__ import main
from experiments.lib import launch as launch_mod
from experiments.lib import scales
from experiments.lib.spec import ExperimentError, check_memory


def test_list_names_every_sweep_and_experiment(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    all_sweeps = sweeps()
    assert {"attention", "hybrid_ratio", "mtp_lambda", "smoke"} <= set(all_sweeps)
    for sweep in all_sweeps.values():
        assert f"{sweep.name}:" in out
        for e in sweep.experiments:
            assert e.name in out


def test_show_every_experiment(capsys):
    for sweep in sweeps().values():
        for e in sweep.experiments:
            assert main(["show", e.name]) == 0
            out = capsys.readouterr().out
            assert f"# {e.name} at tiny" in out and "training total" in out
            assert "FAILS" not in out
    # Every TPU scale of one ablation: resolved config and a passing memory check.
    for scale in ("v5p-8", "v5e-16", "v5p-128"):
        assert main(["show", "attention/swa4x-sink/s0", "--scale", scale]) == 0
        out = capsys.readouterr().out
        assert "window 512, sink True" in out and "FAILS" not in out


def test_scaled_values_and_layer_patterns():
    _, [e] = resolve("attention/swa4x-sink/s1")
    tiny, pod = e.train_config("tiny"), e.train_config("v5p-128")
    assert tiny.model_config().sliding_attention.window == 4 * scales.TINY.window
    assert pod.model_config().sliding_attention.window == 512
    assert (tiny.seed, tiny.data.seed, pod.mesh) == (1, 0, "data=4,fsdp=16")
    _, [g] = resolve("attention/global/s0")
    assert set(g.train_config("tiny").model_config().layer_types) == {"full"}
    assert LayerPattern(3).layer_types(8) == ("full", "sliding", "sliding", "full", "sliding",
                                              "sliding", "sliding", "full")
    assert LayerPattern(5).layer_types(12).count("full") == 3
    assert repr(Scaled("window", 4)) == "4 x scale.window"
    # --set comes last and wins; a bad key names itself.
    assert e.train_config("tiny", ["lr=0.5"]).lr == 0.5
    with pytest.raises(ExperimentError, match="no_such_field"):
        e.train_config("tiny", ["no_such_field=1"])
    with pytest.raises(ExperimentError, match="no scale 'v9'"):
        e.scale("v9")


def test_memory_check_refuses_what_does_not_fit():
    _, [e] = resolve("attention/swa-sink/s0")
    scale = scales.V5E_16
    too_big = e.train_config(scale, ["batch_size=4096", "remat=none"])
    with pytest.raises(ExperimentError, match="GiB per device"):
        check_memory(too_big, scale)
    with pytest.raises(ExperimentError, match="half of this host"):
        check_memory(e.train_config("tiny"), scales.TINY, host_bytes=1 << 20)


def _read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    """`run smoke` (4 steps and every eval), then the same command again."""
    from experiments.lib.runner import run_experiment

    root = str(tmp_path_factory.mktemp("runs"))
    _, [exp] = resolve("smoke")
    argv = ["x", "run", "smoke", "--set", "lr=0.01"]
    first = run_experiment(exp, "tiny", sets=["lr=0.01"], root=root, argv=argv,
                           log=lambda s: None)
    second = run_experiment(exp, "tiny", sets=["lr=0.01"], root=root, argv=argv,
                            log=lambda s: None)
    return root, first, second


def test_run_smoke_writes_a_complete_run_dir(smoke_run):
    root, first, _ = smoke_run
    d = os.path.join(root, "tiny", "smoke")
    for name in ("config.json", "command.txt", "git.json", "attempts.jsonl", "metrics.jsonl",
                 "eval.json", "summary.json"):
        assert os.path.isfile(os.path.join(d, name)), name
    assert os.listdir(os.path.join(d, "tensorboard"))
    assert "4" in os.listdir(os.path.join(d, "checkpoints"))
    cfg = json.load(open(os.path.join(d, "config.json")))
    assert cfg["train_config"]["model"]["num_layers"] == 2 and cfg["scale"]["name"] == "tiny"
    assert cfg["train_config"]["lr"] == 0.01 and cfg["sets"] == ["lr=0.01"]
    assert "experiments run smoke --set lr=0.01" in open(os.path.join(d, "command.txt")).read()
    assert json.load(open(os.path.join(d, "git.json")))["commit"]
    assert first["step"] == 4 and first["tokens"] == 4 * 4 * 64
    m = first["metrics"]
    assert 0 < m["val_loss"] < 10 and 0 < m["bits_per_byte"] < 12
    assert 0 <= m["mtp_acc_2"] <= m["mtp_acc_1"] <= 1 and 1 <= m["acceptance_length"] <= 3
    assert 0 <= m["passkey@8W"] <= 1 and "passkey_gain@8W" in m


def test_rerun_resumes_and_reuses_the_evals(smoke_run):
    root, first, second = smoke_run
    d = os.path.join(root, "tiny", "smoke")
    ends = [a for a in _read_jsonl(os.path.join(d, "attempts.jsonl")) if a["event"] == "end"]
    assert [(a["start_step"], a["step"]) for a in ends] == [(0, 4), (4, 4)]
    steps = [r["step"] for r in _read_jsonl(os.path.join(d, "metrics.jsonl"))
             if r.get("split") != "val"]
    assert steps == [1, 2, 3, 4]  # nothing trained twice
    assert second["metrics"] == first["metrics"]  # the evaluation of step 4 is reused
    assert second["attempts"] == 2 and second["cpu_s"] > first["cpu_s"] > 0


@pytest.mark.slow  # extra coverage: two more trainings
def test_remote_root_trains_locally_and_mirrors(tmp_path):
    """A bucket root: checkpoints go straight to ROOT (checkpoints.url), metrics are mirrored;
    a fresh machine (new local dir) resumes from the bucket."""
    from experiments.lib.runner import run_experiment

    _, [exp] = resolve("smoke")
    remote = str(tmp_path / "bucket")
    quiet = dict(root=remote, argv=["x"], log=lambda s: None, evaluate=False)
    run_experiment(exp, "tiny", sets=["steps=2"], local_dir=str(tmp_path / "vm1"), **quiet)
    d = os.path.join(remote, "tiny", "smoke")
    assert "2" in os.listdir(os.path.join(d, "checkpoints"))
    assert not os.path.exists(tmp_path / "vm1" / "checkpoints")
    assert len(_read_jsonl(os.path.join(d, "metrics.jsonl"))) >= 2
    s = run_experiment(exp, "tiny", sets=["steps=3"], local_dir=str(tmp_path / "vm2"), **quiet)
    assert s["step"] == 3
    train = [r for r in _read_jsonl(os.path.join(d, "metrics.jsonl")) if r.get("split") != "val"]
    assert [r["step"] for r in train] == [1, 2, 3]


def test_launch_dry_run_prints_every_worker_command(capsys, monkeypatch):
    commit = "0123456789abcdef0123456789abcdef01234567"
    rc = main(["launch", "smoke", "--scale", "v5p-128", "--tpu", "pod-1", "--zone",
               "us-east5-a", "--project", "proj", "--root", "gs://bkt/runs", "--commit", commit,
               "--set", "lr=0.001", "--dry-run"])
    assert rc == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3
    archive, scp, ssh = lines
    assert f"git archive --format=tar.gz -o /tmp/mimo-jax-{commit[:12]}.tar.gz {commit}" in archive
    assert "tpu-vm scp" in scp and "--worker=all" in scp and "--project proj" in scp
    assert "tpu-vm ssh pod-1 --zone us-east5-a --project proj --worker=all --command" in ssh
    for part in (f"MIMO_JAX_COMMIT={commit}", "uv venv", "--python 3.11",
                 "pip install --quiet -e", "constraints.txt",
                 "python -m experiments run smoke --scale v5p-128 --root gs://bkt/runs",
                 "--set lr=0.001 --distributed"):
        assert part in ssh, part
    # A single-host slice needs no distributed flag; a CPU scale cannot be launched.
    cmds = launch_mod.build_commands("smoke", "v5p-8", tpu="v", zone="z", project=None,
                                     root="gs://b", sets=[], commit=commit)
    assert "--distributed" not in cmds[-1][-1] and "--project" not in cmds[-1]
    with pytest.raises(ExperimentError, match="not a TPU slice"):
        launch_mod.build_commands("smoke", "tiny", tpu="v", zone="z", project=None,
                                  root="gs://b", sets=[], commit=commit)
    # Uncommitted changes would not reach the workers: refused unless asked for.
    monkeypatch.setattr(launch_mod, "git_info",
                        lambda: {"commit": commit, "dirty": True, "changed_files": ["a.py"]})
    with pytest.raises(ExperimentError, match="uncommitted"):
        launch_mod.launch("smoke", "v5p-8", tpu="v", zone="z", project=None, root="gs://b",
                          sets=[], dry_run=True, out=lambda s: None)
    with pytest.raises(ExperimentError, match="shared run directory"):
        launch_mod.launch("smoke", "v5p-8", tpu="v", zone="z", project=None, root="/local",
                          sets=[], commit=commit, out=lambda s: None)


def _fake_run(root, name, seed, val_loss, acc):
    d = os.path.join(root, name)
    os.makedirs(d)
    labels = {"variant": name.split("/")[1], "seed": seed}
    summary = {"experiment": name, "scale": "tiny", "labels": labels, "step": 3, "steps": 3,
               "tokens": 3 * 64, "cpu_s": 12.0 + seed, "wall_s": 20.0, "commit": "abc",
               "dirty": False, "metrics": {"val_loss": val_loss, "bits_per_byte": val_loss / 2,
                                           "passkey@4W": acc}}
    json.dump(summary, open(os.path.join(d, "summary.json"), "w"))
    open(os.path.join(d, "command.txt"), "w").write(f"python -m experiments run {name}\n")
    with open(os.path.join(d, "attempts.jsonl"), "w") as f:
        f.write(json.dumps({"event": "start", "load_avg": [1.5, 1, 1]}) + "\n")
        f.write(json.dumps({"event": "end", "load_avg": [2.5, 1, 1], "cpu_s": 12.0}) + "\n")
    with open(os.path.join(d, "metrics.jsonl"), "w") as f:
        for step in (1, 2, 3):
            f.write(json.dumps({"step": step, "loss": 5 - step, "ce": 4.0 - step}) + "\n")
    return d


def test_report_on_two_run_dirs(tmp_path):
    from experiments.lib.report import write_report

    a = _fake_run(str(tmp_path), "attention/swa-sink/s0", 0, 2.0, 0.25)
    b = _fake_run(str(tmp_path), "attention/swa-sink/s1", 1, 2.2, 0.35)
    out = tmp_path / "results"
    paths = write_report([], runs=[a, b], out=str(out), title="two")
    md = open(paths[0]).read()
    assert paths[0].endswith("two.md")
    # Mean and sample standard deviation over the two seeds.
    assert "| swa-sink | 2.1000 ± 0.1414 (n=2) | 1.0500 ± 0.0707 (n=2) |" in md
    assert "python -m experiments run attention/swa-sink/s0" in md
    assert "1.5 → 2.5" in md and "Total: 2 runs" in md
    assert "Direction vs the report" in md
    saved = _read_jsonl(str(out / "two_runs.jsonl"))
    assert [r["experiment"] for r in saved] == ["attention/swa-sink/s0", "attention/swa-sink/s1"]
    pngs = [p for p in paths if p.endswith(".png")]
    assert len(pngs) == 2
    for p in pngs:
        assert open(p, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def _cli_run(root, devices, cache, *sets):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_COMPILATION_CACHE_DIR": str(cache),
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
           "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
           "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
    cmd = [sys.executable, "-m", "experiments", "run", "smoke", "--root", str(root), "--no-eval",
           "--set", "batch_size=8", "--set", "tensorboard=false", "--set", "data.val_batches=0"]
    for s in sets:
        cmd += ["--set", s]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    rows = _read_jsonl(os.path.join(root, "tiny", "smoke", "metrics.jsonl"))
    return {r["step"]: r["loss"] for r in rows if r.get("split") != "val"}


@pytest.mark.slow  # ~2 min on 2 cores
def test_resume_on_another_mesh(tmp_path):
    """Saved on 8 devices (fsdp=8), resumed on 4 (fsdp=4): the steps after the resume equal a
    straight run on 4 devices."""
    cache = tmp_path / "xla_cache"
    moved, straight = tmp_path / "moved", tmp_path / "straight"
    first = _cli_run(moved, 8, cache, "mesh=fsdp=8", "steps=3")
    assert sorted(first) == [1, 2, 3]
    resumed = _cli_run(moved, 4, cache, "mesh=fsdp=4", "steps=5")
    ref = _cli_run(straight, 4, cache, "mesh=fsdp=4", "steps=5")
    np.testing.assert_allclose([first[s] for s in (1, 2, 3)], [ref[s] for s in (1, 2, 3)],
                               rtol=2e-4)
    np.testing.assert_allclose([resumed[4], resumed[5]], [ref[4], ref[5]], rtol=2e-4)
    ends = [a for a in _read_jsonl(os.path.join(moved, "tiny", "smoke", "attempts.jsonl"))
            if a["event"] == "end"]
    assert [(a["start_step"], a["step"]) for a in ends] == [(0, 3), (3, 5)]
