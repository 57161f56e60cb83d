"""The package's layering: no import cycle, a config check imports no model code, a node no server code."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from meduniverse_flwr import registry

PACKAGE = Path(__file__).resolve().parents[1] / "meduniverse_flwr"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_at_load(path: Path) -> set[str]:
    """The package modules ``path`` imports when it is loaded (module level, not inside functions)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            if base.startswith("meduniverse_flwr"):
                for alias in node.names:  # ``from . import registry`` imports a module
                    candidate = f"{base}.{alias.name}"
                    found.add(candidate if (PACKAGE.parent / candidate.replace(".", "/")).with_suffix(".py").exists()
                              or (PACKAGE.parent / candidate.replace(".", "/") / "__init__.py").exists() else base)
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("meduniverse_flwr")}
    return found - {name}


def test_no_module_of_the_package_imports_itself_back_through_others():
    graph = {module_name(path): imports_at_load(path) for path in PACKAGE.rglob("*.py")}
    for start in graph:
        stack, seen = [(start, (start,))], set()
        while stack:
            node, trail = stack.pop()
            for nxt in graph.get(node, ()):
                assert nxt != start, f"import cycle: {' -> '.join((*trail, nxt))}"
                if nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, (*trail, nxt)))


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
