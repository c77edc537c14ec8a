"""The packages follow the trust boundary (docs/architecture.md, "Trust boundary").

- `device_procs` (untrusted side) imports nothing from `vmm_core` (the trusted core);
- `ipc_protocol` and `jail` (what both sides share) import neither;
- `vmm_core` reaches device code in exactly one deliberate place, `vmm_core.devices.in_process`
  (the `--no-sandbox` backend); it starts device processes by module name (`-m
  device_procs.host`), never by import.

The `testing` subpackages are exempt on purpose: they are test doubles that play one side
against the other (a host-side guest driver, a core stand-in that spawns real devices).

Checked twice: statically (every import statement, including those inside functions) and by
importing every module in a subprocess where the forbidden packages cannot be found.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
GATEWAYS = {"vmm_core.devices.in_process"}
RULES = {  # package -> packages it must not import
    "device_procs": {"vmm_core"},
    "ipc_protocol": {"vmm_core", "device_procs", "jail"},
    "jail": {"vmm_core", "device_procs"},
    "vmm_core": {"device_procs"},
}


def modules(package: str) -> list[str]:
    out = []
    for path in sorted((ROOT / package).rglob("*.py")):
        rel = path.relative_to(ROOT).with_suffix("")
        parts = list(rel.parts)
        if "testing" in parts or path.name.startswith("_") and path.name != "__init__.py":
            continue
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out.append(".".join(parts))
    return out


def imported_names(module: str) -> set[str]:
    path = ROOT / Path(*module.split("."))
    path = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


@pytest.mark.parametrize("package", sorted(RULES))
def test_no_import_statement_crosses_the_boundary(package: str) -> None:
    crossings = []
    for module in modules(package):
        if module in GATEWAYS:
            continue
        for name in imported_names(module):
            if name.split(".")[0] in RULES[package]:
                crossings.append(f"{module} imports {name}")
    assert crossings == []


BLOCKER = r"""
import importlib, importlib.abc, sys
blocked = set(sys.argv[1].split(","))
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in blocked:
            raise ImportError(f"{name} is on the other side of the boundary")
        return None
sys.meta_path.insert(0, Block())
failed = []
for module in sys.argv[2].split(","):
    try:
        importlib.import_module(module)
    except ImportError as err:
        failed.append(f"{module}: {err}")
print("\n".join(failed))
sys.exit(1 if failed else 0)
"""


@pytest.mark.parametrize("package", sorted(RULES))
def test_every_module_imports_with_the_other_side_blocked(package: str) -> None:
    mods = [m for m in modules(package) if m not in GATEWAYS]
    run = subprocess.run([sys.executable, "-c", BLOCKER, ",".join(RULES[package]), ",".join(mods)],
                         capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr


def test_the_gateway_is_the_only_door() -> None:
    doors = [m for m in modules("vmm_core")
             if any(n.split(".")[0] == "device_procs" for n in imported_names(m))]
    assert doors == sorted(GATEWAYS)
