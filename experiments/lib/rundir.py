"""Run directories, local or on a bucket (`gs://...`, through `etils.epath` as Orbax does).

`ROOT/SCALE/EXPERIMENT/` holds:
- `config.json`: the experiment, its scale, the `--set` flags, the resolved TrainConfig and
  the memory plan; `command.txt`: the exact command of the latest attempt;
- `git.json`: the commit (and whether the tree had uncommitted changes);
- `attempts.jsonl`: one line per start and end of an attempt (host, commit, steps, CPU and
  wall time, load average), so preemptions and resumes are visible;
- `metrics.jsonl`, `tensorboard/`, `checkpoints/` (from `mimo_jax.train.train`);
- `eval.json` (the evaluations of the final step) and `summary.json` (what reports read).

With a remote root, training runs in a local work directory whose `checkpoints.url` points
Orbax at ROOT/.../checkpoints (written by every host of a slice); metrics and TensorBoard
files are mirrored to the bucket every minute and at the end, and pulled back when a fresh
VM resumes the run.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import threading
from typing import Any

from etils import epath


def is_remote(path: str) -> bool:
    return "://" in str(path)


def join(root: str, *parts: str) -> str:
    return "/".join([str(root).rstrip("/"), *parts])


def read_json(path: str) -> Any | None:
    p = epath.Path(path)
    return json.loads(p.read_text()) if p.exists() else None


def write_json(path: str, obj: Any) -> None:
    p = epath.Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def append_jsonl(path: str, obj: Any) -> None:
    p = epath.Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    old = p.read_text() if p.exists() else ""  # buckets have no append
    p.write_text(old + json.dumps(obj, sort_keys=True, default=str) + "\n")


def read_jsonl(path: str) -> list[dict[str, Any]]:
    p = epath.Path(path)
    if not p.exists():
        return []
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]


def local_workdir(run_dir: str, base: str | None = None) -> str:
    """Where a remote run trains on this machine (stable per run directory)."""
    base = base or os.path.join(os.path.expanduser("~"), ".cache", "mimo-jax", "runs")
    digest = hashlib.sha1(run_dir.encode()).hexdigest()[:12]
    return os.path.join(base, f"{run_dir.rstrip('/').split('/')[-1]}-{digest}")


MIRRORED = ("metrics.jsonl", "tensorboard")


def _files(local: str) -> list[str]:
    out = []
    for name in MIRRORED:
        path = os.path.join(local, name)
        if os.path.isfile(path):
            out.append(name)
        elif os.path.isdir(path):
            for dirpath, _, files in os.walk(path):
                out += [os.path.relpath(os.path.join(dirpath, f), local) for f in files]
    return out


def push(local: str, remote: str) -> int:
    """Copy metrics and TensorBoard files that changed from `local` to `remote`."""
    n = 0
    for rel in _files(local):
        src = os.path.join(local, rel)
        dst = epath.Path(remote) / rel
        data = open(src, "rb").read()
        if dst.exists() and dst.stat().length == len(data):
            continue
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_bytes(data)
        n += 1
    return n


def pull(remote: str, local: str) -> int:
    """Bring metrics and TensorBoard files of a remote run onto a fresh machine."""
    n = 0
    root = epath.Path(remote)
    for name in MIRRORED:
        src = root / name
        if not src.exists():
            continue
        paths = [src] if src.is_file() else _walk(src)
        for p in paths:
            dst = os.path.join(local, os.path.relpath(str(p), str(root)))
            if os.path.exists(dst):
                continue
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            with open(dst, "wb") as f:
                f.write(p.read_bytes())
            n += 1
    return n


def _walk(d: epath.Path) -> list[epath.Path]:
    """Files below `d` (buckets have no recursive glob)."""
    out = []
    for p in d.iterdir():
        out += _walk(p) if p.is_dir() else [p]
    return out


class Mirror:
    """Pushes a local work directory to its remote run directory every `every_s` seconds."""

    def __init__(self, local: str, remote: str, every_s: float = 60.0):
        self.local, self.remote, self.every_s = local, remote, every_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> Mirror:
        self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.wait(self.every_s):
            try:
                push(self.local, self.remote)
            except Exception as e:  # a flaky bucket must not stop training
                print(f"mirror to {self.remote} failed ({e}); retrying", flush=True)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        push(self.local, self.remote)


def git_info(cwd: str | None = None) -> dict[str, Any]:
    """The commit of the code that runs: git when available, else what the launcher set."""
    if os.environ.get("MIMO_JAX_COMMIT"):
        return {"commit": os.environ["MIMO_JAX_COMMIT"], "dirty": False,
                "source": "MIMO_JAX_COMMIT (installed by experiments launch)"}
    cwd = cwd or os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True,
                                text=True, check=True).stdout.strip()
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                                cwd=cwd, capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return {"commit": None, "dirty": None, "source": "not a git checkout"}
    changed = [line[3:] for line in status.splitlines()]
    return {"commit": commit, "dirty": bool(changed), "changed_files": changed[:50],
            "source": "git"}
