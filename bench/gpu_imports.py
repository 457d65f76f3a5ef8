"""Import everything the workers, tests, benches and scripts import from outside the standard library,
and every module of the service and its tests, with the Python that runs this (bench/gpu_check.sh: the lent
machine's python3 with the kit on PYTHONPATH). Prints one line per failure with the file that
imports it, and where the main packages came from; exits 1 on any failure. Standard library only.
"""

from __future__ import annotations

import ast
import importlib
import importlib.metadata
import os
import pkgutil
import sys
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("worker", "tasks", "producer", "tests")
SCRIPT_DIRS = ("bench", "scripts")
NOT_CARRIED = {"playwright": "the docs extra, for scripts/flower_screenshot.py only"}
RUNTIME_ONLY = {"flower": "celery's flower command", "hiredis": "redis-py's reply parser"}
"""Imported by no file here, but used when the service runs."""
SHOWN = ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "tokenizers", "huggingface_hub",
         "safetensors", "celery", "kombu", "redis", "hiredis", "flower", "numpy")


def third_party_imports() -> dict[str, list[tuple[str, str]]]:
    """{module: [(where, name imported from it or "")]}, for every import statement, nested ones too."""
    found: dict[str, list[tuple[str, str]]] = {}
    local = {*PACKAGES, *(p.stem for folder in SCRIPT_DIRS for p in (ROOT / folder).glob("*.py"))}
    for folder in (*PACKAGES, *SCRIPT_DIRS):
        for path in sorted((ROOT / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Import):
                    pairs = [(alias.name, "") for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    pairs = [(node.module, alias.name) for alias in node.names]
                else:
                    continue
                for module, name in pairs:
                    top = module.split(".")[0]
                    if top not in sys.stdlib_module_names and top not in local and top != "__future__":
                        where = f"{path.relative_to(ROOT)}:{node.lineno}"
                        found.setdefault(module, []).append((where, name))
    return found


def _import(module: str, names: set[str]) -> str | None:
    try:
        loaded = importlib.import_module(module)
        for name in sorted(names - {"", "*"}):
            if not hasattr(loaded, name):
                importlib.import_module(f"{module}.{name}")
    except Exception as exc:  # noqa: BLE001 - any failure to import is what this reports
        return "".join(traceback.format_exception_only(type(exc), exc)).strip().splitlines()[-1]
    return None


def _origin(package: str) -> str:
    try:
        version = importlib.metadata.version(package)
        location = Path(importlib.import_module(package).__file__).parent.parent
    except Exception:  # noqa: BLE001
        return f"{package} missing"
    kit = any(str(location).startswith(p) for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p)
    return f"{package} {version}" + (" (kit)" if kit else "")


def main() -> int:
    sys.path.insert(0, str(ROOT))
    found = third_party_imports()
    failures = []
    for module in sorted(found):
        top = module.split(".")[0]
        if top in NOT_CARRIED:
            print(f"gpu_imports: not checked: {module} ({NOT_CARRIED[top]})")
            continue
        error = _import(module, {name for _, name in found[module]})
        if error:
            failures.append(f"gpu_imports: FAILED {module} (imported by {found[module][0][0]}): {error}")
    for module, why in RUNTIME_ONLY.items():
        if error := _import(module, set()):
            failures.append(f"gpu_imports: FAILED {module} ({why}): {error}")
    own = 0
    for package in PACKAGES:
        for info in pkgutil.walk_packages([str(ROOT / package)], f"{package}."):
            own += 1
            if error := _import(info.name, set()):
                failures.append(f"gpu_imports: FAILED {info.name}: {error}")
    print("gpu_imports: " + ", ".join(_origin(p) for p in SHOWN))
    print(f"gpu_imports: Python {sys.version.split()[0]}: {len(found) + len(RUNTIME_ONLY)} third-party modules, "
          f"{own} of {', '.join(PACKAGES)}: {len(failures)} failed")
    for line in failures:
        print(line, file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
