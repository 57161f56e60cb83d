"""The package's layering: no import cycle, a config check imports no model code, a node no server code."""

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
    assert "meduniverse_flwr.baselines" in graph["meduniverse_flwr.server_app"]  # through registry.STRATEGIES
    assert "meduniverse_flwr.pretrain.models" in graph["meduniverse_flwr.pretrain.engine"]  # PRETRAIN_METHODS too
    hidden = tmp_path / "hidden.py"
    hidden.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from meduniverse_flwr import report\n"
                      "def f():\n    from deploy import launch\n")
    assert {"meduniverse_flwr.report", "deploy.launch"} <= imports_of(hidden, "meduniverse_flwr.hidden")
    planted = {**graph, "meduniverse_flwr.pretrain.settings": {"meduniverse_flwr.pretrain.engine"}}
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
    server_side = {name for name in loaded if name.startswith("meduniverse_flwr.")
                   and name.split(".")[1] in ("strategy", "server_app", "driver", "server_privacy", "baselines",
                                              "centralized", "scoring", "report", "results")}
    assert not server_side


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
