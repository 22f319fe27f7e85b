"""Packaging: every subpackage is listed, envs ship as mmalign.envs, import stays fast and light."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_subpackage_is_listed_in_pyproject() -> None:
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    on_disk = {"mmalign." + ".".join(p.parent.relative_to(ROOT / "mmalign").parts)
               for p in (ROOT / "mmalign").rglob("__init__.py")}
    on_disk = {name.rstrip(".") for name in on_disk}
    on_disk |= {"mmalign.envs." + ".".join(p.parent.relative_to(ROOT / "envs").parts)
                for p in (ROOT / "envs").rglob("__init__.py")}
    on_disk = {name.rstrip(".") for name in on_disk}
    assert on_disk <= listed, f"missing from pyproject packages: {sorted(on_disk - listed)}"


def test_envs_import_as_mmalign_envs_without_a_top_level_envs() -> None:
    code = ("import importlib.util, mmalign.envs; "
            "print(importlib.util.find_spec('envs') is None or 'site-packages' not in "
            "(importlib.util.find_spec('envs').origin or ''))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "True"


def test_import_mmalign_is_fast_and_light() -> None:
    """`import mmalign` stays under 1.5 s; the core, data and trainer modules load no domain library."""
    code = (
        "import time, sys; t = time.perf_counter(); import mmalign, mmalign.config, mmalign.registry; "
        "d = time.perf_counter() - t; import mmalign.core, mmalign.data, mmalign.train, mmalign.jobs; heavy = [m for m in ('transformers', 'diffusers', 'gymnasium', 'mujoco', "
        "'open_clip', 'ot', 'stable_baselines3', 'accelerate', 'peft') if m in sys.modules]; print(d, heavy)"
    )
    # best of three: the first import also warms the OS file cache
    times = []
    for _ in range(3):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/")
        assert out.returncode == 0, out.stderr
        seconds, heavy = out.stdout.split(" ", 1)
        assert heavy.strip() == "[]", f"import mmalign pulled in heavy libraries: {heavy}"
        times.append(float(seconds))
    assert min(times) < 1.5, f"import mmalign took {min(times):.2f} s"


def test_each_domain_extra_provides_the_optional_libraries_its_code_imports() -> None:
    """``pip install mmalign[diffusion]`` must be enough for mmalign/diffusion (its benchmark imports POT)."""
    import ast
    import re

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    dist = {"ot": "pot", "diffusers": "diffusers", "transformers": "transformers", "peft": "peft",
            "datasets": "datasets", "gymnasium": "gymnasium", "mujoco": "mujoco",
            "stable_baselines3": "stable-baselines3", "open_clip": "open-clip-torch", "imageio": "imageio"}
    base = {re.split(r"[<>=\[ ]", r)[0].lower() for r in project["dependencies"]}
    for folder, extra in (("vision_lm", "vlm"), ("diffusion", "diffusion"), ("robotics", "robotics")):
        provided = base | {re.split(r"[<>=\[ ]", r)[0].lower() for r in project["optional-dependencies"][extra]}
        for path in (ROOT / "mmalign" / folder).glob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                         else [node.module] if isinstance(node, ast.ImportFrom) and node.module and not node.level
                         else [])
                for name in names:
                    top = name.split(".")[0]
                    if top in dist:
                        where = path.relative_to(ROOT)
                        assert dist[top] in provided, f"{where} imports {top}: add {dist[top]} to [{extra}]"
