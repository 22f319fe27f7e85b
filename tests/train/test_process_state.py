"""accelerate's process state under torchrun on CPU: mmalign's jobs must see every process, or refuse to start."""

from __future__ import annotations

import subprocess
from pathlib import Path

from _sharded import ENV, TORCHRUN

SCRIPT = """
import os, sys
from accelerate import PartialState
from mmalign.train.compat import process_state
if sys.argv[1] == "plain-first":
    PartialState()  # created without cpu=True: on a machine without a GPU this state sees one process
try:
    state = process_state()
    print(f"rank {os.environ['RANK']} sees {state.process_index}/{state.num_processes}", flush=True)
except RuntimeError as e:
    print(f"rank {os.environ['RANK']} refused: {e}", flush=True)
"""


def _run(tmp_path: Path, mode: str) -> str:
    script = tmp_path / "state.py"
    script.write_text(SCRIPT)
    proc = subprocess.run([*TORCHRUN, str(script), mode], env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return proc.stdout


def test_process_state_joins_the_torchrun_group_on_cpu(tmp_path: Path) -> None:
    out = _run(tmp_path, "first")
    assert "rank 0 sees 0/2" in out and "rank 1 sees 1/2" in out


def test_a_state_created_without_cpu_is_refused_not_trained_on(tmp_path: Path) -> None:
    import pytest
    import torch

    if torch.cuda.is_available():
        pytest.skip("with a GPU a plain state joins the group: nothing to refuse")
    out = _run(tmp_path, "plain-first")
    assert out.count("refused: launched on 2 processes (WORLD_SIZE) but accelerate's process state sees 1") == 2
