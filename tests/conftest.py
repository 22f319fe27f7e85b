"""Shared test setup: offline, CPU, deterministic."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("MUJOCO_GL", "egl")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

# Tiny tensors: one thread avoids oversubscription on small CI machines (and keeps timings stable).
torch.set_num_threads(1)

# Importing triton (pulled in lazily by torch's compiler stack, e.g. on the first optimizer) after a MuJoCo EGL
# context exists segfaults the process on this stack; import it first, once, for the whole test session.
import torch._dynamo  # noqa: E402,F401


def _load_script(name: str):  # noqa: ANN202 - a module object
    """Import ``scripts/<name>.py`` (scripts are not a package) as a fresh module."""
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / f"{name}.py"
    if str(path.parent) not in sys.path:  # as `python scripts/<name>.py` does: scripts import their helpers by name
        sys.path.insert(0, str(path.parent))
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None, path
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def load_script():  # noqa: ANN201 - the loader function
    """Fixture: ``load_script("bench_vlm")`` imports ``scripts/bench_vlm.py`` for tests of benchmark scripts."""
    return _load_script
