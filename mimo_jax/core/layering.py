"""The package's layers, in one place, and the import-graph check that enforces them.

A module may import from its own layer or a lower one, never a higher one, and no set of
modules may import each other in a circle. Lazy imports inside functions count, and so do
module names given to `importlib` as strings (the CLI's subcommands). The graph is read
from the source with `ast`; nothing is imported. `tests/test_import_graph.py` runs it.
"""

from __future__ import annotations

import ast
import os
from collections.abc import Iterable, Mapping

# Lowest first. A module belongs to the entry that is it or its nearest listed package; the
# root package `mimo_jax` (its __init__, the public API) matches only itself, so a new
# subpackage must be given a layer here.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("pallas_kernels",),  # kernels: no mimo_jax import at all
    ("mimo_jax.core",),  # dtypes, errors, log output
    ("mimo_jax.sharding",),  # logical-axis rules, meshes, activation constraints
    ("mimo_jax.model",),  # config, layers, attention, MoE, MiMo, abstract shapes
    ("mimo_jax.parallel",),  # sharded creation, memory plans, multi-host start-up
    ("mimo_jax.checkpoint",),  # safetensors, release names, FP8, Orbax, conversion, load()
    ("mimo_jax.data",),  # sources, tokenizers, Grain pipelines
    ("mimo_jax.inference",),  # KV caches, sampling, MTP speculation, generate()
    ("mimo_jax.train",),  # losses, optimiser, step, loop, checkpoints, metrics
    ("mimo_jax.post_train",),  # MOPD: rollouts with routing replay, teachers, IcePop loss
    ("mimo_jax.eval",),  # lm-eval backend, perplexity, MTP acceptance, passkey
    ("mimo_jax.commands", "mimo_jax.cli", "mimo_jax"),  # the CLI and the public API
)

ROOT = "mimo_jax"
Graph = dict[str, set[str]]


def layer_of(module: str, layers: Iterable[tuple[str, ...]] = LAYERS) -> int | None:
    """Index of the module's layer (the longest matching package), or None if unlayered."""
    best, best_len = None, -1
    for i, names in enumerate(layers):
        for name in names:
            under = module.startswith(name + ".") and name != ROOT
            if (module == name or under) and len(name) > best_len:
                best, best_len = i, len(name)
    return best


def module_files(root: str, packages: Iterable[str]) -> dict[str, str]:
    """{module name: file} for every .py file of the packages found under `root`."""
    out = {}
    for pkg in packages:
        base = os.path.join(root, pkg)
        for dirpath, _, files in os.walk(base):
            for f in files:
                if not f.endswith(".py"):
                    continue
                rel = os.path.relpath(os.path.join(dirpath, f), root)[:-3].split(os.sep)
                if rel[-1] == "__init__":
                    rel = rel[:-1]
                out[".".join(rel)] = os.path.join(dirpath, f)
    return out


def import_graph(root: str, packages: Iterable[str] = ("mimo_jax", "pallas_kernels")) -> Graph:
    """{module: modules it imports} among the packages' own modules, from their source."""
    files = module_files(root, packages)
    known = set(files)
    graph: Graph = {m: set() for m in files}
    for mod, path in files.items():
        is_pkg = os.path.basename(path) == "__init__.py"
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), filename=path)
        uses_importlib = any(isinstance(n, ast.Attribute) and n.attr == "import_module"
                             for n in ast.walk(tree))
        for node in ast.walk(tree):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: resolve against this module's package
                    parts = mod.split(".") if is_pkg else mod.split(".")[:-1]
                    parts = parts[: len(parts) - node.level + 1]
                    base = ".".join(parts + ([base] if base else []))
                for a in node.names:
                    sub = f"{base}.{a.name}"
                    targets.append(sub if sub in known else base)
            elif (isinstance(node, ast.Constant) and isinstance(node.value, str)
                  and node.value in known and uses_importlib):
                targets = [node.value]  # e.g. importlib.import_module over a list of names
            for t in targets:
                # `import a.b.c` needs a.b.c; map an unknown submodule to its nearest module.
                while t and t not in known and "." in t:
                    t = t.rsplit(".", 1)[0]
                if t in known and t != mod:
                    graph[mod].add(t)
    return graph


def cycles(graph: Mapping[str, Iterable[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph.get(start, ()))))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                comp = []
                while True:
                    top = stack.pop()
                    on_stack.discard(top)
                    comp.append(top)
                    if top == node:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))
    return out


def upward_imports(graph: Mapping[str, Iterable[str]],
                   layers: Iterable[tuple[str, ...]] = LAYERS) -> list[str]:
    """Edges from a lower layer to a higher one, and modules that belong to no layer."""
    layers = tuple(layers)
    problems = []
    for mod in sorted(graph):
        here = layer_of(mod, layers)
        if here is None:
            problems.append(f"{mod} belongs to no layer (add it to LAYERS)")
            continue
        for dep in sorted(graph[mod]):
            there = layer_of(dep, layers)
            if there is not None and there > here:
                problems.append(f"{mod} (layer {layers[here][0]}) imports {dep} "
                                f"(higher layer {layers[there][0]})")
    return problems


def check(root: str) -> list[str]:
    """Every layering problem and import circle in the source tree under `root`."""
    graph = import_graph(root)
    problems = upward_imports(graph)
    problems += ["import circle: " + " <-> ".join(c) for c in cycles(graph)]
    return problems
