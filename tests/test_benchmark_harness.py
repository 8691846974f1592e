"""benchmarks/common.py timing rules and benchmarks/readme_table.py's README rewriting."""

import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import common  # noqa: E402
import readme_table  # noqa: E402


def test_time_runs_warms_up_and_takes_at_least_five():
    calls, setups = [], []
    times = common.time_runs(lambda: calls.append(1), repeats=2, warmup=2,
                             setup=lambda: setups.append(1))
    assert len(times) == common.MIN_REPEATS and len(calls) == 2 + common.MIN_REPEATS
    assert len(setups) == len(calls)
    assert common.median_seconds(lambda: None, repeats=1) >= 0
    cond = common.conditions()
    assert len(cond["load_avg_start"]) == 3 and len(cond["load_avg_end"]) == 3


def test_interleaved_runs_alternate_sides_and_rotate_the_order():
    calls = []
    fns = {k: (lambda k=k: calls.append(k)) for k in "abc"}
    times = common.interleaved_runs(fns, repeats=3, warmup=2)
    assert {k: len(v) for k, v in times.items()} == {"a": 5, "b": 5, "c": 5}  # at least 5
    assert calls[:6] == list("abcabc")  # warm-up rounds
    rounds = [calls[6 + 3 * r: 9 + 3 * r] for r in range(5)]
    assert [r[0] for r in rounds] == list("abcab")  # each side leads in turn
    assert all(sorted(r) == list("abc") for r in rounds)  # one call of each per round
    calls.clear()
    times = common.interleaved_runs(fns, repeats=5, warmup=0, settle=1)
    assert len(times["a"]) == 5 and calls[:6] == list("aabbcc")  # settle, then the timed call


_FAKE_SIDES = """
import os

def factory(log, reply):
    def side(name):
        def run():
            print("noise on stdout must not reach the protocol pipe")
            with open(log, "a") as f:
                f.write(name + "\\n")
        return run

    def broken():
        raise ValueError("side exploded")

    return ({"a": side("a"), "b": side("b"), "broken": broken},
            {"reply": reply, "env": os.environ.get("MIMO_TEST_CHILD_ENV", "")})
"""


def test_child_process_runs_sides_in_its_own_environment(tmp_path):
    (tmp_path / "fake_sides.py").write_text(_FAKE_SIDES)
    log = tmp_path / "calls.txt"
    env = dict(os.environ, PYTHONPATH=str(tmp_path), MIMO_TEST_CHILD_ENV="child-only")
    with common.ChildProcess("fake_sides:factory", {"log": str(log), "reply": [1, "x"]},
                             env=env) as child:
        assert child.sides == ["a", "b", "broken"]
        assert child.info == {"reply": [1, "x"], "env": "child-only"}
        times = common.interleaved_runs({"a": child.side("a"), "b": child.side("b")},
                                        repeats=5, warmup=1)
        assert len(times["a"]) == 5 and all(t >= 0 for t in times["b"])
        assert log.read_text().split() == ["a", "b"] + ["a", "b", "b", "a"] * 2 + ["a", "b"]
        with pytest.raises(RuntimeError, match="side exploded"):
            child.side("broken")()
        child.side("a")()  # still serving after a side failed
        with pytest.raises(KeyError, match="no side 'c'"):
            child.side("c")
    assert child.proc.returncode == 0


def test_child_process_reports_a_factory_that_fails(tmp_path):
    (tmp_path / "bad_sides.py").write_text("def factory():\n    raise ImportError('nope')\n")
    with pytest.raises(RuntimeError, match="exited before it was ready"):
        common.ChildProcess("bad_sides:factory", {},
                            env=dict(os.environ, PYTHONPATH=str(tmp_path)))


def test_readme_table_rewrites_between_markers_idempotently(tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    (results / "forward.json").write_text(json.dumps(
        {"machine": {"date": "2026-12-01 10:00 UTC", "load_avg_start": [1.5, 1, 1],
                     "load_avg_end": [2.0, 1, 1]}, "speedup": 3.25}))
    (results / "convert.json").write_text(json.dumps(
        {"meta": {"date": "2026-12-02T10:00:00"}, "rows": [
            {"mode": "keep-fp8", "tree": "this tree", "ratio_to_raw": 0.61, "src_gbps": 0.7},
            {"mode": "keep-fp8", "tree": "baseline", "ratio_to_raw": 0.2, "src_gbps": 0.2}]}))
    (results / "train_step.json").write_text("{not json")
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\nbefore\n{readme_table.BEGIN}\nold table\n{readme_table.END}\n"
                      "after\n")
    assert readme_table.rewrite(str(readme), str(results))
    text = readme.read_text()
    assert text.startswith("# x\n\nbefore\n") and text.endswith(f"{readme_table.END}\nafter\n")
    assert "old table" not in text
    assert "| 3.25x transformers eager (forward) | 2026-12-01, load 1.5 -> 2.0 |" in text
    assert "keep-fp8 0.61x raw read (0.70 GB/s) |" in text and "0.20x" not in text
    row = next(ln for ln in text.splitlines() if "train_step.py" in ln)
    assert row.endswith("| no results | - |")
    assert not readme_table.rewrite(str(readme), str(results))  # idempotent
    assert readme.read_text() == text


def test_readme_table_needs_one_marker_pair(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("no markers\n")
    with pytest.raises(SystemExit, match="expected one"):
        readme_table.rewrite(str(readme), str(tmp_path))


def test_the_real_readme_has_the_markers():
    readme = os.path.join(os.path.dirname(__file__), "..", "README.md")
    text = open(readme).read()
    assert text.count(readme_table.BEGIN) == 1 and text.count(readme_table.END) == 1
