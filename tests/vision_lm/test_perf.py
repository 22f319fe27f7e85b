"""The throughput/MFU code path: a tiny CPU run (default) and the 2B-parameter bf16 measurement (GPU only)."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

from mmalign.vision_lm.perf import dpo_step_throughput, llava_2b_config
from mmalign.vision_lm.tiny import tiny_llava_config


def test_throughput_path_runs_on_a_tiny_model():
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_config(tiny_llava_config(40, vision_dim=32, text_dim=32))
    before = [p.detach().clone() for p in model.parameters()]
    out = dpo_step_throughput(model, batch_pairs=2, prompt_text_tokens=4, response_tokens=6, steps=2, warmup=1)
    assert out["tokens_per_s"] > 0 and out["tokens_per_step"] == 4 * (16 + 10)
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))  # it really trained


def test_2b_config_size():
    from transformers import AutoModelForImageTextToText

    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(llava_2b_config())
    n = sum(p.numel() for p in model.parameters())
    assert 1.8e9 < n < 2.3e9


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_2b_bf16_tokens_per_second_and_mfu():
    from transformers import AutoModelForImageTextToText

    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_config(llava_2b_config(), dtype=torch.bfloat16).cuda()
    out = dpo_step_throughput(model, batch_pairs=4, prompt_text_tokens=32, response_tokens=128, steps=5)
    assert math.isfinite(out["tokens_per_s"]) and out["tokens_per_s"] > 0
    print("VLM_2B_PERF " + json.dumps({**out, "device": torch.cuda.get_device_name()}))
    dest = os.environ.get("MMALIGN_PERF_OUT")
    if dest:
        with open(dest, "w") as f:
            json.dump({**out, "device": torch.cuda.get_device_name()}, f, indent=1)
