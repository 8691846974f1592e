"""`launch`: the same `python -m experiments run` on every worker of a TPU VM slice.

1. `git archive` of the commit (HEAD by default; a tree with uncommitted changes is refused,
   since they would not travel) -> a tarball;
2. `gcloud compute tpus tpu-vm scp` of the tarball to every worker (`--worker=all`);
3. `gcloud compute tpus tpu-vm ssh NAME --zone Z --worker=all --command ...`: unpack, make a
   Python 3.11 venv with uv (TPU VM images ship an older Python), install the project at that
   commit with `.[tpu,experiments]` and the exact pins, set the environment, and run. `run`
   calls `jax.distributed.initialize()` (through `mimo_jax.parallel.maybe_initialize`) before
   touching devices and checks that all workers joined.
The run directory must be shared by the workers (gs://...), which also makes a preempted
slice resume: launching the same command again continues from the last checkpoint.
"""

from __future__ import annotations

import shlex
import subprocess
import sys

from experiments.lib import registry
from experiments.lib.rundir import git_info
from experiments.lib.spec import ExperimentError


def _gcloud_target(zone: str, project: str | None) -> list[str]:
    return ["--zone", zone] + (["--project", project] if project else [])


def remote_script(name: str, scale: str, *, root: str, sets: list[str], commit: str,
                  hosts: int) -> str:
    short = commit[:12]
    src = f"mimo-jax-{short}"
    run = ["python", "-m", "experiments", "run", name, "--scale", scale, "--root", root]
    for s in sets:
        run += ["--set", s]
    if hosts > 1:
        run.append("--distributed")
    env = {
        "MIMO_JAX_COMMIT": commit,  # recorded in git.json: the tarball has no .git
        "PYTHONUNBUFFERED": "1",
        "JAX_COMPILATION_CACHE_DIR": "$HOME/.cache/jax",
        "TF_CPP_MIN_LOG_LEVEL": "1",
    }
    exports = " ".join(f"{k}={v}" for k, v in env.items())
    log = f"$HOME/{src}/experiment-{name.replace('/', '_')}-{scale}.log"
    lines = [
        "set -euo pipefail",
        f"cd $HOME && rm -rf {src} && mkdir {src} && tar -xzf {src}.tar.gz -C {src} && cd {src}",
        "python3 -m pip install --user --quiet uv",
        "$HOME/.local/bin/uv venv --quiet --python 3.11 --seed .venv",
        ". .venv/bin/activate",
        "pip install --quiet -e '.[tpu,experiments,gcs]' -c constraints.txt",
        f"export {exports}",
        f"{shlex.join(run)} 2>&1 | tee -a {log}",
    ]
    return " && ".join(lines[1:]).join([lines[0] + "; ", ""])


def build_commands(name: str, scale_name: str, *, tpu: str, zone: str, project: str | None,
                   root: str, sets: list[str], commit: str) -> list[list[str]]:
    _, exps = registry.resolve(name)
    scale = exps[0].scale(scale_name)
    if not scale.is_tpu:
        raise ExperimentError(f"scale {scale_name} is not a TPU slice; `run` it locally")
    short = commit[:12]
    tarball = f"/tmp/mimo-jax-{short}.tar.gz"
    target = _gcloud_target(zone, project)
    return [
        ["git", "archive", "--format=tar.gz", "-o", tarball, commit],
        ["gcloud", "compute", "tpus", "tpu-vm", "scp", tarball, f"{tpu}:~/mimo-jax-{short}.tar.gz",
         *target, "--worker=all"],
        ["gcloud", "compute", "tpus", "tpu-vm", "ssh", tpu, *target, "--worker=all",
         "--command", remote_script(name, scale_name, root=root, sets=sets, commit=commit,
                                    hosts=scale.hosts)],
    ]


def launch(name: str, scale: str, *, tpu: str, zone: str, project: str | None, root: str,
           sets: list[str], commit: str | None = None, allow_dirty: bool = False,
           dry_run: bool = False, out=print) -> int:
    if not root.startswith("gs://") and not dry_run:
        raise ExperimentError(
            f"--root {root!r}: the workers of a slice need a shared run directory (gs://...)")
    git = git_info()
    if commit is None:
        commit = git.get("commit")
        if commit is None:
            raise ExperimentError("not a git checkout: pass --commit")
        if git.get("dirty") and not allow_dirty:
            raise ExperimentError(
                "the tree has uncommitted changes that would not reach the workers "
                f"({', '.join(git.get('changed_files', [])[:5])}); commit them or pass "
                "--allow-dirty")
    commands = build_commands(name, scale, tpu=tpu, zone=zone, project=project, root=root,
                              sets=list(sets), commit=commit)
    for i, cmd in enumerate(commands, 1):
        out(f"[{i}/{len(commands)}] {shlex.join(cmd)}")
        if not dry_run:
            rc = subprocess.run(cmd).returncode
            if rc:
                print(f"launch: step {i} failed with exit code {rc}", file=sys.stderr)
                return rc
    return 0
