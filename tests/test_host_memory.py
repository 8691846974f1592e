"""mimo_jax.core.host_memory: the huge-page malloc tunable and the entry points' re-exec."""

import os
import platform
import subprocess
import sys

from mimo_jax.core import host_memory as hm


def test_tunable_is_added_once_and_kept_beside_the_users_own():
    assert hm.with_huge_pages({}) == {"GLIBC_TUNABLES": hm.TUNABLE}
    env = hm.with_huge_pages({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2", "X": "1"})
    assert env == {"GLIBC_TUNABLES": f"glibc.malloc.arena_max=2:{hm.TUNABLE}", "X": "1"}
    assert hm.with_huge_pages(env) is None  # already there: no second re-exec
    assert hm.with_huge_pages({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}) is None  # user's
    assert hm.with_huge_pages({hm.OPT_OUT: "0"}) is None


def test_baseline_environment_drops_only_our_tunable():
    assert hm.without_huge_pages({"GLIBC_TUNABLES": hm.TUNABLE, "X": "1"}) == {"X": "1"}
    env = {"GLIBC_TUNABLES": f"glibc.malloc.arena_max=2:{hm.TUNABLE}"}
    assert hm.without_huge_pages(env) == {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}
    assert hm.without_huge_pages({}) == {}


def test_thp_mode_is_read_from_the_kernel_setting(tmp_path):
    for mode, ok in [("always [madvise] never", True), ("[always] madvise never", True),
                     ("always madvise [never]", False)]:
        (tmp_path / "enabled").write_text(mode + "\n")
        assert hm._thp_available(str(tmp_path / "enabled")) is ok
    assert hm._thp_available(str(tmp_path / "missing")) is False


_PROBE = ("import os, sys; from mimo_jax.core import host_memory as hm; "
          "hm.ensure_huge_page_malloc(); "
          "print(hm.TUNABLE in os.environ.get('GLIBC_TUNABLES', '').split(':'), "
          "sys.flags.dev_mode, sys.argv[1:])")


def _probe(**env: str) -> str:
    clean = hm.without_huge_pages(os.environ)
    clean.pop(hm.OPT_OUT, None)
    out = subprocess.run([sys.executable, "-X", "dev", "-c", _PROBE, "arg1", "--flag"],
                         env={**clean, **env}, capture_output=True, text=True, check=True)
    return out.stdout.strip()


def test_entry_point_reexecs_with_the_same_command_line():
    applies = (sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"
               and hm._thp_available())
    # Interpreter flags (-X dev) and arguments survive the re-exec.
    assert _probe() == f"{applies} True ['arg1', '--flag']"
    assert _probe(**{hm.OPT_OUT: "0"}) == "False True ['arg1', '--flag']"


def test_entry_points_start_without_loading_jax():
    # The re-exec must come before jax (and its thread pools and 1-2 s of imports) loads.
    code = ("import sys, mimo_jax, mimo_jax.cli, mimo_jax.core.host_memory; "
            "print(sorted(m for m in ('jax', 'flax', 'numpy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "[]"


def test_package_exports_resolve_lazily():
    import mimo_jax

    assert sorted(mimo_jax._EXPORTS) == mimo_jax.__all__
    for name in mimo_jax.__all__:
        assert getattr(mimo_jax, name).__name__ == name
    assert set(mimo_jax.__all__) <= set(dir(mimo_jax))
    try:
        mimo_jax.no_such_name  # noqa: B018
    except AttributeError as e:
        assert "no_such_name" in str(e)
    else:
        raise AssertionError("unknown attribute resolved")


def test_only_the_training_subcommands_restart_with_huge_pages():
    from mimo_jax import cli

    assert cli.subcommand(["-q", "train", "--preset", "tiny-cpu"]) == "train"
    assert cli.subcommand(["--verbose", "demo"]) == "demo"
    assert cli.subcommand(["--help"]) is None
    assert set(cli.TRAINING_COMMANDS) == {"train", "demo", "mopd"}
    assert {"generate", "eval", "convert"}.isdisjoint(cli.TRAINING_COMMANDS)
