"""The package's layering: imports only go down (mimo_jax.core.layering.LAYERS), no circles."""

from pathlib import Path

from mimo_jax.core import layering

ROOT = Path(__file__).resolve().parents[1]


def test_source_tree_has_no_upward_import_and_no_circle():
    problems = layering.check(str(ROOT))
    assert not problems, "\n".join(problems)


def test_graph_is_read_from_source():
    graph = layering.import_graph(str(ROOT))
    # a top-level import, a lazy import inside a function, and an importlib string
    assert "mimo_jax.model.config" in graph["mimo_jax.model.mimo"] or any(
        d.startswith("mimo_jax.model.") for d in graph["mimo_jax.model.mimo"])
    assert "mimo_jax.checkpoint.loading" in graph["mimo_jax.commands.generate"] or \
        "mimo_jax" in graph["mimo_jax.commands.generate"]
    assert "mimo_jax.commands.train" in graph["mimo_jax.cli"]
    assert not any(d.startswith("mimo_jax") for m, ds in graph.items()
                   if m.startswith("pallas_kernels") for d in ds)


def test_a_reintroduced_circle_and_an_upward_import_fail():
    graph = {
        "mimo_jax.model.mimo": {"mimo_jax.checkpoint.loading"},  # model -> checkpoint: upward
        "mimo_jax.checkpoint.loading": {"mimo_jax.checkpoint.orbax_io"},
        "mimo_jax.checkpoint.orbax_io": {"mimo_jax.checkpoint.convert"},
        "mimo_jax.checkpoint.convert": {"mimo_jax.checkpoint.loading"},  # a circle of three
        "mimo_jax.core.dtypes": set(),
        "mimo_jax.somewhere": set(),  # not in any layer
    }
    assert layering.cycles(graph) == [["mimo_jax.checkpoint.convert",
                                       "mimo_jax.checkpoint.loading",
                                       "mimo_jax.checkpoint.orbax_io"]]
    problems = layering.upward_imports(graph)
    assert any("mimo_jax.model.mimo" in p and "higher layer" in p for p in problems)
    assert "mimo_jax.somewhere belongs to no layer (add it to LAYERS)" in problems
    assert layering.layer_of("other_pkg.x") is None
    assert layering.layer_of("mimo_jax") == layering.layer_of("mimo_jax.cli")


def test_lazy_import_in_a_function_counts(tmp_path):
    pkg = tmp_path / "mimo_jax"
    (pkg / "core").mkdir(parents=True)
    (pkg / "model").mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "core" / "__init__.py").write_text("")
    (pkg / "model" / "__init__.py").write_text("")
    (pkg / "model" / "m.py").write_text("from . import n\n")
    (pkg / "model" / "n.py").write_text("def f():\n    from mimo_jax.model import m\n")
    (pkg / "core" / "c.py").write_text("def g():\n    import mimo_jax.model.m\n")
    problems = layering.check(str(tmp_path))
    assert "import circle: mimo_jax.model.m <-> mimo_jax.model.n" in problems
    assert any(p.startswith("mimo_jax.core.c (layer mimo_jax.core) imports mimo_jax.model.m")
               for p in problems)
