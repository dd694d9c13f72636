"""The package's layers import only downward and no module imports itself back through others.

Layer order (low to high): ground (errors, files, features, buckets, sharding, distributed, jsonl, progress;
configs holds gin files only)
-> models -> checkpoints -> data -> train -> eval -> experiment -> commands -> cli / launch / the
package facade. Every `import` counts, function-level ones included (`ast`, not runtime), so a lazy
import against the grain fails here too, naming the edge.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "jaxlm"
GROUND = ("errors", "files", "features", "buckets", "sharding", "distributed", "jsonl", "progress", "configs")
LAYERS = ("ground", "models", "checkpoints", "data", "train", "eval", "experiment", "commands", "top")
TOP = ("jaxlm", "jaxlm.cli", "jaxlm.launch")


def module_files() -> dict[str, Path]:
    mods = {}
    for f in PACKAGE.rglob("*.py"):
        parts = list(f.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = f
    return mods


def import_graph() -> dict[str, dict[str, int]]:
    """{module: {imported jaxlm module: line}} over every import statement, at any depth."""
    mods = module_files()

    def resolve(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, dict[str, int]] = {}
    for name, path in mods.items():
        base = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges: dict[str, int] = {}
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    pkg = base
                    for _ in range(node.level - 1):
                        pkg = pkg.rpartition(".")[0]
                    module = f"{pkg}.{node.module}" if node.module else pkg
                else:
                    module = node.module or ""
                targets = [module] + [f"{module}.{a.name}" for a in node.names]
            else:
                continue
            for target in targets:
                if target == "jaxlm" or target.startswith("jaxlm."):
                    resolved = resolve(target)
                    if resolved and resolved != name and resolved != "jaxlm":
                        edges.setdefault(resolved, node.lineno)
        graph[name] = edges
    return graph


def layer(module: str) -> int:
    if module in TOP:
        return LAYERS.index("top")
    part = module.split(".")[1]
    if part in GROUND:
        return LAYERS.index("ground")
    if part not in LAYERS:
        raise AssertionError(f"{module}: not in any layer; add it to GROUND or a layer package")
    return LAYERS.index(part)


def cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(graph[root]))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(graph[child])))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_no_import_cycles():
    graph = import_graph()
    assert len(graph) > 60  # the walk saw the package
    found = cycles(graph)
    assert not found, "import cycles: " + "; ".join(" <-> ".join(c) for c in found)


def test_imports_follow_the_layer_order():
    graph = import_graph()
    upward = [f"{m} (line {line}) -> {t}: {LAYERS[layer(m)]} imports {LAYERS[layer(t)]}"
              for m, edges in graph.items() for t, line in edges.items() if layer(t) > layer(m)]
    assert not upward, "imports against the layer order:\n" + "\n".join(sorted(upward))


def test_the_checker_catches_a_cycle_and_an_upward_edge():
    """The two checks above fail on the faults they exist for."""
    assert cycles({"a": {"b": 1}, "b": {"c": 1}, "c": {"a": 1}, "d": {}}) == [["a", "b", "c"]]
    assert layer("jaxlm.models.llama") < layer("jaxlm.train.steps")
    assert layer("jaxlm.sharding") == 0 and layer("jaxlm.cli") == len(LAYERS) - 1


def test_core_packages_form_a_dag():
    graph = import_graph()
    core = ("models", "checkpoints", "data", "train", "eval")
    package_edges = {p: {} for p in core}
    for m, edges in graph.items():
        for t in edges:
            a, b = (x.split(".")[1] if x.count(".") >= 1 else "" for x in (m, t))
            if a in core and b in core and a != b:
                package_edges[a][b] = 1
    assert not cycles(package_edges), package_edges


def test_loading_a_tokenizer_never_imports_tensorflow():
    code = ("import sys\n"
            "from jaxlm.checkpoints.pretrained import load_tokenizer\n"
            "from jaxlm.checkpoints.instruction_codec import text_codec\n"
            "tok = load_tokenizer('smollm2-135m-instruct')\n"
            "codec = text_codec('smollm2-135m-instruct')\n"
            "assert codec.encode('Hello') == tok.encode('Hello', add_special_tokens=False)\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'seqio')))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_gin_files_ship_in_the_package_and_resolve_from_any_directory(tmp_path, monkeypatch):
    """Every gin experiment lives under jaxlm/configs (package data), and `--gin_file=jaxlm/configs/...`
    with its includes parses from a directory that is not the checkout."""
    import tomllib

    from jaxlm.experiment.gin_config import parse_config

    config = tomllib.loads((PACKAGE.parent / "pyproject.toml").read_text())
    assert "configs/**/*.gin" in config["tool"]["setuptools"]["package-data"]["jaxlm"]
    shipped = sorted((PACKAGE / "configs").rglob("*.gin"))
    assert len(shipped) >= 40
    monkeypatch.chdir(tmp_path)
    parse_config(["jaxlm/configs/tests/tiny_lora.gin"])  # includes models/, runs/ and tests/ files
    import gin

    assert gin.query_parameter("%LORA_RANK") == 4


def test_gin_search_paths_find_files_and_their_includes(tmp_path, monkeypatch):
    """--gin_search_paths: a file and its relative include found under a directory that is neither the
    working directory nor the checkout; a search path that is not a directory is refused by name."""
    import gin
    import pytest

    from jaxlm.errors import ConfigError
    from jaxlm.experiment.gin_config import parse_config

    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "base.gin").write_text("include 'jaxlm/configs/tests/tiny_lora.gin'\nLORA_RANK = 2\n")
    (tmp_path / "mine" / "exp.gin").write_text("include 'base.gin'\nNUM_STEPS = 3\n")
    monkeypatch.chdir(PACKAGE.parent.parent)
    parse_config(["exp.gin"], [], [str(tmp_path / "mine")])
    assert gin.query_parameter("%LORA_RANK") == 2 and gin.query_parameter("%NUM_STEPS") == 3
    with pytest.raises(ConfigError, match="--gin_search_paths .*nowhere: not a directory"):
        parse_config(["exp.gin"], [], [str(tmp_path / "nowhere")])
