"""mmalign.core imports only torch, numpy, the standard library, mmalign.registry, mmalign.config and mmalign.core."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import mmalign

CORE = Path(mmalign.__file__).parent / "core"
# safetensors: a base dependency, the no-pickle weight format of reward-model folders (a data format, no code)
ALLOWED_THIRD_PARTY = {"torch", "numpy", "safetensors"}
ALLOWED_MMALIGN = ("mmalign.registry", "mmalign.config", "mmalign.core")  # config: its torch-free scalar checks
HEAVY = (
    "transformers",
    "diffusers",
    "gymnasium",
    "mujoco",
    "open_clip",
    "ot",
    "stable_baselines3",
    "accelerate",
    "peft",
    "scipy",
)


def _imported_modules(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative import: stays inside mmalign.core
                continue
            found.append((node.lineno, node.module or ""))
    return found


def test_every_core_file_imports_only_allowed_modules() -> None:
    files = sorted(CORE.rglob("*.py"))
    assert len(files) > 5
    stdlib = sys.stdlib_module_names
    bad = []
    for path in files:
        for lineno, name in _imported_modules(path):
            top = name.split(".")[0]
            if top == "__future__" or top in stdlib or top in ALLOWED_THIRD_PARTY:
                continue
            if top == "mmalign" and any(name == p or name.startswith(p + ".") for p in ALLOWED_MMALIGN):
                continue
            bad.append(f"{path.relative_to(CORE.parent)}:{lineno} imports {name}")
    assert not bad, "mmalign.core may import only torch/numpy/safetensors/stdlib/mmalign.registry/mmalign.config/mmalign.core:\n" + "\n".join(bad)


def test_importing_core_loads_no_heavy_library() -> None:
    code = (
        "import sys, mmalign.core; "
        f"print(','.join(m for m in {HEAVY!r} if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.strip() == "", f"importing mmalign.core loaded: {out.stdout.strip()}"
