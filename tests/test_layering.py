"""The package's layering, read from its folders: at most six modules at the top of ``meduniverse_flwr``,
every other in a package named after its role; no import cycle; and the rules between roles
(CONTRIBUTING.md "Layout"): the node side imports no server code, the wire no torch and neither side,
the reports no Flower, the run config nothing heavy."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from meduniverse_flwr import registry

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("meduniverse_flwr", "deploy")  # the app and its launcher: an import circle in either counts
TARGET_FIELDS = ("target", "loader", "paths")  # a registry entry's "module:attribute" fields


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_module(name: str) -> bool:
    base = ROOT / name.replace(".", "/")
    return base.with_suffix(".py").exists() or (base / "__init__.py").exists()


def table_modules(table: str) -> set[str]:
    """The modules the entries of ``registry.<table>`` name as their implementation."""
    targets = set()
    for entry in getattr(registry, table).values():
        targets |= {entry} if isinstance(entry, str) else {getattr(entry, f) for f in TARGET_FIELDS if hasattr(entry, f)}
    return {target.partition(":")[0] for target in targets}


def resolved_tables(call: ast.Call) -> set[str]:
    """The registry tables named in the arguments of a ``registry.resolve(...)`` call."""
    func = call.func
    if not (isinstance(func, ast.Attribute) and func.attr == "resolve"
            and isinstance(func.value, ast.Name) and func.value.id == "registry"):
        return set()
    names = {n.attr if isinstance(n, ast.Attribute) else getattr(n, "id", None) for arg in call.args for n in ast.walk(arg)}
    return {name for name in names if name and name.isupper() and isinstance(getattr(registry, name, None), dict)}


def imports_of(path: Path, name: str | None = None) -> set[str]:
    """Every module of ``PACKAGES`` that ``path`` (module ``name``) imports anywhere (module level,
    inside functions, under ``TYPE_CHECKING``), and the modules its ``registry.resolve`` calls import
    by name."""
    name = name or module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            if base.split(".")[0] in PACKAGES:
                for alias in node.names:  # ``from . import registry`` imports a module
                    candidate = f"{base}.{alias.name}"
                    found.add(candidate if is_module(candidate) else base)
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.split(".")[0] in PACKAGES}
        elif isinstance(node, ast.Call):
            found |= {module for table in resolved_tables(node) for module in table_modules(table)}
    return found - {name}


def import_graph() -> dict[str, set[str]]:
    return {module_name(path): imports_of(path) for package in PACKAGES for path in (ROOT / package).rglob("*.py")}


def external_imports(path: Path) -> set[str]:
    """The top-level names of the libraries ``path`` imports anywhere (relative imports are the package's)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and not node.level and node.module:
            found.add(node.module.split(".")[0])
        elif isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
    return found - set(PACKAGES)


def external_graph() -> dict[str, set[str]]:
    return {module_name(path): external_imports(path) for path in (ROOT / "meduniverse_flwr").rglob("*.py")}


# The roles: a package under meduniverse_flwr (its name), or one of the top-level modules.
NODE_SIDE = {"client_app", "node", "learn", "data"}  # what runs on a hospital's node
SERVER_SIDE = {"server_app", "server", "report", "tools"}
HEAVY = {"torch", "torchvision", "timm", "flwr", "matplotlib", "scipy", "opacus", "skimage", "nilearn", "mlflow",
         "tensorboard"}


def role(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def reach(graph: dict[str, set[str]], start: str) -> set[str]:
    """``start`` and every module of the package it imports, directly or through others."""
    seen, todo = {start}, [start]
    while todo:
        for nxt in graph.get(todo.pop(), ()):
            if nxt.startswith("meduniverse_flwr") and nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def rule_breaks(graph: dict[str, set[str]], externals: dict[str, set[str]]) -> list[str]:
    """Each import that breaks a rule between roles, as ``module -> imported (rule)``."""
    breaks = []
    for module, imported in graph.items():
        if not module.startswith("meduniverse_flwr."):
            continue
        mine = role(module)
        for other in (name for name in imported if name.startswith("meduniverse_flwr.")):
            theirs = role(other)
            if mine in NODE_SIDE and theirs in SERVER_SIDE:
                breaks.append(f"{module} -> {other} (the node side imports no server code)")
            if mine == "wire" and theirs not in {"wire", "common", "config", "registry"}:
                breaks.append(f"{module} -> {other} (the wire imports neither side)")
            if mine == "common" and theirs != "common":
                breaks.append(f"{module} -> {other} (common imports nothing of the package)")
        reached = reach(graph, module)
        libraries = {library: source for source in sorted(reached) for library in externals.get(source, ())}
        if mine == "wire" and "torch" in libraries:
            breaks.append(f"{module} -> torch through {libraries['torch']} (the wire imports no torch)")
        if mine == "report" and "flwr" in libraries:
            breaks.append(f"{module} -> flwr through {libraries['flwr']} (the reports import no Flower)")
        if mine == "config":
            breaks += [f"{module} -> {library} through {source} (the run config imports nothing heavy)"
                       for library, source in libraries.items() if library in HEAVY]
    return breaks


def first_cycle(graph: dict[str, set[str]]) -> str | None:
    for start in graph:
        stack, seen = [(start, (start,))], set()
        while stack:
            node, trail = stack.pop()
            for nxt in graph.get(node, ()):
                if nxt == start:
                    return " -> ".join((*trail, nxt))
                if nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, (*trail, nxt)))
    return None


def test_no_module_imports_itself_back_through_others():
    cycle = first_cycle(import_graph())
    assert cycle is None, f"import cycle: {cycle}"


def test_the_cycle_check_sees_imports_in_functions_and_type_checking_and_registry_targets(tmp_path):
    graph = import_graph()
    assert "deploy.preflight" in graph["deploy.launch"]  # imported inside a function
    assert "meduniverse_flwr.server.strategy.cyclic" in graph["meduniverse_flwr.server_app"]  # through registry.STRATEGIES
    assert "meduniverse_flwr.server.pretrain.models" in graph["meduniverse_flwr.server.pretrain.engine"]  # PRETRAIN_METHODS too
    hidden = tmp_path / "hidden.py"
    hidden.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from meduniverse_flwr import report\n"
                      "def f():\n    from deploy import launch\n")
    assert {"meduniverse_flwr.report", "deploy.launch"} <= imports_of(hidden, "meduniverse_flwr.hidden")
    planted = {**graph, "meduniverse_flwr.server.pretrain.settings": {"meduniverse_flwr.server.pretrain.engine"}}
    assert first_cycle(planted) is not None


def loaded_after(code: str) -> set[str]:
    out = subprocess.run([sys.executable, "-c", f"import sys; {code}; print(' '.join(sys.modules))"],
                         capture_output=True, text=True, check=True).stdout
    return set(out.split())


def test_checking_a_config_imports_neither_torch_nor_timm_nor_flwr():
    loaded = loaded_after("from meduniverse_flwr.config import RunConfig; RunConfig.with_defaults()")
    assert not {"torch", "timm", "flwr"} & loaded


def test_a_node_imports_no_server_code():
    loaded = loaded_after("import meduniverse_flwr.client_app")
    server_side = {name for name in loaded if name.startswith("meduniverse_flwr.") and role(name) in SERVER_SIDE}
    assert not server_side


def test_at_most_six_modules_at_the_top_every_other_in_a_role_package():
    top = sorted(path.name for path in (ROOT / "meduniverse_flwr").glob("*.py"))
    assert len(top) <= 6, top
    roles = {"common", "wire", "data", "learn", "node", "server", "report", "tools"}
    packages = {path.name for path in (ROOT / "meduniverse_flwr").iterdir() if path.is_dir() and path.name != "__pycache__"}
    assert packages == roles
    assert all((ROOT / "meduniverse_flwr" / name / "__init__.py").is_file() for name in roles)


def test_no_import_breaks_a_rule_between_roles():
    breaks = rule_breaks(import_graph(), external_graph())
    assert not breaks, "\n".join(breaks)


@pytest.mark.parametrize("module, imported, rule", [
    ("meduniverse_flwr.node.site", "meduniverse_flwr.server.validation", "the node side imports no server code"),
    ("meduniverse_flwr.learn.finetune", "meduniverse_flwr.report.stats", "the node side imports no server code"),
    ("meduniverse_flwr.wire.card", "meduniverse_flwr.data.npz", "the wire imports neither side"),
    ("meduniverse_flwr.wire.transport", "meduniverse_flwr.learn.model", "the wire imports no torch"),
    ("meduniverse_flwr.report.stats", "meduniverse_flwr.server.grid_io", "the reports import no Flower"),
    ("meduniverse_flwr.config", "meduniverse_flwr.learn.metrics", "the run config imports nothing heavy"),
    ("meduniverse_flwr.common.text", "meduniverse_flwr.registry", "common imports nothing of the package"),
])
def test_each_rule_fails_on_an_import_that_breaks_it(module, imported, rule):
    graph = import_graph()
    planted = {**graph, module: graph[module] | {imported}}
    assert any(module in line and f"({rule})" in line for line in rule_breaks(planted, external_graph()))


TARGETS = [*(entry.target for entry in registry.STRATEGIES.values()),
           *(term.target for term in registry.NODE_TERMS.values()),
           *(protocol.target for protocol in registry.EVAL_PROTOCOLS.values()),
           *(target for source in registry.SOURCES.values() for target in (source.loader, source.paths)),
           *registry.PARTITIONS.values(), *registry.PRETRAIN_METHODS.values(), *registry.TRACKERS.values(),
           *registry.CURATION_RULES.values()]


@pytest.mark.parametrize("target", TARGETS)
def test_every_registry_target_names_a_callable_of_the_package(target):
    assert callable(registry.resolve(target))


def test_a_target_outside_the_package_is_refused():
    with pytest.raises(ValueError, match="not a 'meduniverse_flwr.<module>:<name>'"):
        registry.resolve("os:system")


def test_every_node_term_of_a_strategy_is_registered_and_its_keys_declared():
    from conftest import default_run_config

    for entry in registry.STRATEGIES.values():
        assert entry.node_keeps in registry.NODE_KEEPS
        if entry.node_term:
            assert set(registry.NODE_TERMS[entry.node_term].keys) <= set(default_run_config())
