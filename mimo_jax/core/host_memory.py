"""Transparent huge pages for the host allocator (glibc), set before the process starts.

XLA:CPU allocates an executable's temporaries as one buffer per call, freshly from `malloc`
(the ~50M-parameter training step: one 816 MB buffer). glibc serves it with a new `mmap` and
unmaps it afterwards, so every step faults it in again, 4 KiB at a time: about 200,000 page
faults and 0.4 s of kernel time per step on the development VM. With the glibc tunable
`glibc.malloc.hugetlb=1`, malloc asks for transparent huge pages (`madvise(MADV_HUGEPAGE)`) on
such mappings: about 1,000 faults; the step ran 1.10x, 1.22x and 1.19x faster in three runs of
benchmarks/train_step (which times both mallocs side by side) but 0.90x in a fourth (see the
compaction caveat below: that benchmark runs four processes), the tiny-cpu step 1.14-1.16x.

Tunables are read when the process starts, so `ensure_huge_page_malloc` re-executes the
interpreter with the setting added. Only the command-line entry points of training call it
(`mimo-jax train | demo | mopd`, `python -m experiments run`; never an import or a library
function): the jitted forward of benchmarks/forward ran 0.96x as fast with it (each malloc in
its own child process), so generation, evaluation and conversion keep the default. It is a
no-op off Linux/glibc, when transparent huge pages are disabled, when the setting is already
there, and with MIMO_JAX_HUGE_PAGES=0.

Not for every process: PyTorch's CPU allocator, which maps and unmaps many mid-sized buffers
per step, measured slower with it (more kernel time zeroing and compacting 2 MiB pages), so
the benchmarks run the transformers baseline in a child process with the default allocator.
Huge pages need free 2 MiB blocks: when several such processes map gigabytes per step side by
side, the kernel compacts memory on the faults and a step can get slower than without (seen
with three ~50M training processes on 2 cores). Also tried: a single malloc arena that never
unmaps (`arena_max=1`, `mmap_max=0`): no faults at all, but the tiny-cpu step got slower
(allocator lock contention), so it is not used.
"""

from __future__ import annotations

import os
import platform
import sys
from collections.abc import Mapping

TUNABLE = "glibc.malloc.hugetlb=1"
OPT_OUT = "MIMO_JAX_HUGE_PAGES"
_THP = "/sys/kernel/mm/transparent_hugepage/enabled"


def _thp_available(path: str = _THP) -> bool:
    """Whether the kernel grants huge pages to regions that ask ("[always]" or "[madvise]")."""
    try:
        with open(path) as f:
            mode = f.read()
    except OSError:
        return False
    return "[always]" in mode or "[madvise]" in mode


def with_huge_pages(env: Mapping[str, str]) -> dict[str, str] | None:
    """`env` with the tunable added to GLIBC_TUNABLES, or None if nothing is to change (the
    tunable or an explicit hugetlb setting is there, or the user opted out)."""
    if env.get(OPT_OUT, "1") == "0":
        return None
    tunables = env.get("GLIBC_TUNABLES", "")
    if "glibc.malloc.hugetlb=" in tunables:  # already set, by us or deliberately by the user
        return None
    return {**env, "GLIBC_TUNABLES": f"{tunables}:{TUNABLE}" if tunables else TUNABLE}


def without_huge_pages(env: Mapping[str, str]) -> dict[str, str]:
    """`env` without the tunable this module adds (for a baseline run with the default malloc)."""
    out = dict(env)
    kept = [t for t in out.pop("GLIBC_TUNABLES", "").split(":") if t and t != TUNABLE]
    if kept:
        out["GLIBC_TUNABLES"] = ":".join(kept)
    return out


def ensure_huge_page_malloc() -> None:
    """Re-execute this Python command with huge-page malloc, if it applies (see the module
    docstring); returns normally when it does not. Call it first thing in an entry point."""
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return
    env = with_huge_pages(os.environ)
    if env is None or not _thp_available():
        return
    argv = list(getattr(sys, "orig_argv", []))[1:] or sys.argv  # keeps `-m module` and flags
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *argv], env)
