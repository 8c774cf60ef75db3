"""The code's shape: lint and types pass, and dependencies point one way.

Only the adapter and the composition root may import pyfuse3, and only the
vrange module may import intervaltree: everything below them is testable
without FUSE and replaceable piece by piece.  The foundations (protocol, config,
mountinfo, ...) import nothing of vrangefs beyond what is listed, so the client
library, the command line and the daemon can all stand on them; the client
imports nothing of the daemon; each command-line module has one job, and only
the one that runs the daemon imports it.
"""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "vrangefs"
ALLOWED = {
    "pyfuse3": {"operations.py", "mount.py"},
    "intervaltree": {"vrange.py"},
}
# The daemon's stack: lower layers must not import upper ones.
LAYERS = ["pagestore", "vrange", "inodes", "volume", "control", "operations", "mount", "cli"]
# Foundations: each imports nothing of vrangefs but the modules listed.
FOUNDATIONS: dict[str, set[str]] = {
    "protocol": set(),
    "mountinfo": set(),
    "errors": set(),
    "memory": set(),
    "sdnotify": set(),
    "config": {"protocol"},  # below mount, pressure and the command line
}
# The application library: foundations only, nothing of the daemon.
CLIENT = {"protocol", "mountinfo"}
# The command line, one module per job, and what of vrangefs each may import.
CLI: dict[str, set[str]] = {
    "output": {"protocol"},
    "rangetools": {"client", "config", "output", "protocol"},
    "unmount": {"config", "mountinfo", "protocol"},
    "launch": {"config", "memory", "mount", "mountinfo", "unmount"},  # runs the daemon
    "subscribe": {"client", "config", "protocol"},  # the event stream's reader: plain sockets
    "cli": {"config", "launch", "rangetools", "subscribe", "unmount"},
}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            if node.module == "vrangefs":
                found.update(f"vrangefs.{alias.name}" for alias in node.names)
    return found


@pytest.mark.parametrize("module", sorted(ALLOWED))
def test_only_the_allowed_modules_import(module: str) -> None:
    importers = {
        path.name
        for path in PACKAGE.glob("*.py")
        if any(name == module or name.startswith(module + ".") for name in _imports(path))
    }
    assert importers <= ALLOWED[module], f"{module} imported by {importers - ALLOWED[module]}"


def _vrangefs_imports(module: str) -> set[str]:
    """The vrangefs modules *module* imports, by short name (``config``, ``mount``, ...)."""
    return {
        name.split(".")[1]
        for name in _imports(PACKAGE / f"{module}.py")
        if name.startswith("vrangefs.")
    }


@pytest.mark.parametrize("module", sorted(FOUNDATIONS))
def test_foundations_import_only_what_is_listed(module: str) -> None:
    extra = _vrangefs_imports(module) - FOUNDATIONS[module]
    assert not extra, f"{module} imports {extra}"


def test_config_is_below_its_users() -> None:
    for user in ("mount", "pressure", "launch", "cli"):
        assert "config" in _vrangefs_imports(user), f"{user} does not use vrangefs.config"


def test_client_imports_nothing_of_the_daemon() -> None:
    extra = _vrangefs_imports("client") - CLIENT
    assert not extra, f"client imports {extra}"
    assert set(FOUNDATIONS) >= CLIENT  # and those import no more than listed there


@pytest.mark.parametrize("module", sorted(CLI))
def test_command_line_modules_keep_to_their_job(module: str) -> None:
    extra = _vrangefs_imports(module) - CLI[module]
    assert not extra, f"{module} imports {extra}"


def test_only_launch_runs_the_daemon() -> None:
    importers = {module for module in CLI if "mount" in _vrangefs_imports(module)}
    assert importers == {"launch"}


def test_layers_point_one_way() -> None:
    for lower_index, lower in enumerate(LAYERS):
        imports = _imports(PACKAGE / f"{lower}.py")
        for upper in LAYERS[lower_index + 1 :]:
            assert f"vrangefs.{upper}" not in imports, f"{lower} imports the upper layer {upper}"


# The core is synchronous and knows nothing of FUSE: neither the event loop nor
# the binding, not even by way of another vrangefs module it imports.
CORE = ["pagestore", "vrange", "pins", "inodes", "volume", "reclaim", "control"]
CORE += ["protocol", "errors", "memory", "config"]
NOT_IN_THE_CORE = {"trio", "pyfuse3"}


def _reachable(module: str) -> set[str]:
    """*module* and every vrangefs module it imports, directly or not."""
    seen: set[str] = set()
    todo = [module]
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            imports = _imports(PACKAGE / f"{name}.py")
            todo += [n.split(".")[1] for n in imports if n.startswith("vrangefs.")]
    return seen


@pytest.mark.parametrize("module", CORE)
def test_the_core_imports_neither_trio_nor_pyfuse3(module: str) -> None:
    for name in sorted(_reachable(module)):
        found = {i.split(".")[0] for i in _imports(PACKAGE / f"{name}.py")} & NOT_IN_THE_CORE
        via = "" if name == module else f" through vrangefs.{name}"
        assert not found, f"{module} imports {', '.join(sorted(found))}{via}"


def _tool(name: str) -> str:
    path = Path(sys.executable).with_name(name)
    found = str(path) if path.exists() else shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed (pip install -e '.[test]')")
    return found


def test_ruff_passes() -> None:
    result = subprocess.run(
        [_tool("ruff"), "check", "."], cwd=REPO, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.timeout(300)
def test_mypy_passes() -> None:
    result = subprocess.run(
        [_tool("mypy")], cwd=REPO, capture_output=True, text=True, check=False, timeout=280
    )
    assert result.returncode == 0, result.stdout + result.stderr
