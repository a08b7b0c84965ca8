"""The lab stays apart from the product (issue 9, item 7): no runtime module (agent, store,
fetch, p2p, the web page, the CLI apart from its ``demo`` and ``testbed`` verbs) imports
``supervisor_dcdeploy.lab``, at import time or lazily."""

from __future__ import annotations

import ast
import json
import pkgutil
import subprocess
import sys
from pathlib import Path

import supervisor_dcdeploy

PACKAGE = Path(supervisor_dcdeploy.__file__).resolve().parent
LAB = "supervisor_dcdeploy.lab"
# The only places the runtime may reach into the lab: the CLI verbs that run it, inside the
# verb's function, so that importing the CLI or running any other verb never loads it.
LAZY_ALLOWED = {("supervisor_dcdeploy.cli", "cmd_demo"), ("supervisor_dcdeploy.cli", "cmd_testbed")}


def runtime_modules() -> list[str]:
    names = []
    for info in pkgutil.walk_packages([str(PACKAGE)], prefix="supervisor_dcdeploy."):
        if info.name == LAB or info.name.startswith(LAB + "."):
            continue
        names.append(info.name)
    return sorted(names)


# Imports every module named in argv[1] (a JSON list), builds the CLI's parser, and prints
# the lab modules that ended up in sys.modules.
PROBE = """
import importlib, json, sys
for name in json.loads(sys.argv[1]):
    importlib.import_module(name)
from supervisor_dcdeploy import cli
cli.build_parser()
print(json.dumps(sorted(m for m in sys.modules
                        if m == "supervisor_dcdeploy.lab" or m.startswith("supervisor_dcdeploy.lab."))))
"""


def lab_modules_loaded_by(modules: list[str]) -> list[str]:
    out = subprocess.run([sys.executable, "-c", PROBE, json.dumps(modules)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.splitlines()[-1])


def test_the_runtime_modules_are_found():
    modules = runtime_modules()
    for expected in ("supervisor_dcdeploy.agent.worker", "supervisor_dcdeploy.store.zookeeper",
                     "supervisor_dcdeploy.fetch", "supervisor_dcdeploy.p2p.swarm",
                     "supervisor_dcdeploy.cli", "supervisor_dcdeploy.web.server"):
        assert expected in modules
    assert not [m for m in modules if m.startswith(LAB)]


def test_importing_every_runtime_module_loads_nothing_from_the_lab():
    assert lab_modules_loaded_by(runtime_modules()) == []


def test_the_probe_sees_a_lab_import():
    # The control: the same probe, given one lab module, reports it (so an empty answer above
    # means the runtime loaded none, not that the probe cannot see them).
    loaded = lab_modules_loaded_by(["supervisor_dcdeploy.lab.localdc"])
    assert "supervisor_dcdeploy.lab.localdc" in loaded


def _imports(module: str, path: Path) -> list[tuple[str, str | None, int]]:
    """(imported module, enclosing function or None, line) for every import in ``path``."""
    tree = ast.parse(path.read_text(), str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: list[tuple[str, str | None, int]] = []

    def visit(node: ast.AST, function: str | None) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                visit(child, function or child.name)
                continue
            if isinstance(child, ast.Import):
                found.extend((alias.name, function, child.lineno) for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = package.split(".")
                    base = base[:len(base) - (child.level - 1)]
                    target = ".".join(base + ([child.module] if child.module else []))
                else:
                    target = child.module or ""
                found.append((target, function, child.lineno))
                found.extend((f"{target}.{alias.name}", function, child.lineno)
                             for alias in child.names)
            visit(child, function)

    visit(tree, None)
    return found


def lab_imports_in_runtime() -> list[str]:
    bad = []
    for module in runtime_modules():
        spec_path = PACKAGE.joinpath(*module.split(".")[1:])
        path = spec_path / "__init__.py" if spec_path.is_dir() else spec_path.with_suffix(".py")
        for target, function, line in _imports(module, path):
            if (target == LAB or target.startswith(LAB + ".")) and \
                    (module, function) not in LAZY_ALLOWED:
                bad.append(f"{path.relative_to(PACKAGE.parent)}:{line} imports {target}")
    return sorted(set(bad))


def test_no_runtime_module_imports_the_lab_even_lazily():
    assert lab_imports_in_runtime() == []


def test_the_scan_resolves_relative_imports(tmp_path):
    # The control for the scan: relative imports of the lab from a runtime module and from
    # a subpackage resolve to the lab's name.
    top = tmp_path / "top.py"
    top.write_text("from .lab import localdc\n\ndef f():\n    from .lab.testbed import bed\n")
    sub = tmp_path / "sub.py"
    sub.write_text("from ..lab.zkserver import free_port\nimport supervisor_dcdeploy.lab.netns\n")
    assert [(t, f) for t, f, _ in _imports("supervisor_dcdeploy.cli", top)] == [
        ("supervisor_dcdeploy.lab", None), ("supervisor_dcdeploy.lab.localdc", None),
        ("supervisor_dcdeploy.lab.testbed", "f"), ("supervisor_dcdeploy.lab.testbed.bed", "f")]
    targets = [t for t, _, _ in _imports("supervisor_dcdeploy.agent.worker", sub)]
    assert "supervisor_dcdeploy.lab.zkserver" in targets
    assert "supervisor_dcdeploy.lab.netns" in targets
