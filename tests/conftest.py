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
