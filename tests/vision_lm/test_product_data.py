"""The user's data through `vlm train`: video pairs end to end, and one tokenising pass before training."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from test_product import TEMPLATE, _qwen, cfg, pairs_file, tiny_folder  # noqa: I001  (tests dir on sys.path)

from mmalign.vision_lm.train import run

# TEMPLATE with Qwen2-VL's image and video placeholders
VIDEO_TEMPLATE = TEMPLATE.replace(
    "{% if p['type'] == 'image' %}IMG {% else %}",
    "{% if p['type'] == 'image' %}<|vision_start|> <|image_pad|> <|vision_end|> {% elif p['type'] == 'video' %}"
    "<|vision_start|> <|video_pad|> <|vision_end|> {% else %}")


def test_video_pairs_train_a_step_through_vlm_train(tmp_path: Path) -> None:
    """A preference file whose prompts hold a video (frames as files) trains a Qwen2-VL step via `vlm train`."""
    from PIL import Image

    from mmalign.cli import run_job
    from mmalign.vision_lm.loading import load_processor
    from mmalign.vision_lm.train import prepare_pairs

    model, proc = _qwen("qwen2_vl")
    proc.chat_template = VIDEO_TEMPLATE
    model_dir = tmp_path / "model"
    model.save_pretrained(model_dir)
    proc.save_pretrained(model_dir)
    data = tmp_path / "data"
    data.mkdir()
    rng = np.random.default_rng(0)
    rows = []
    for i in range(2):
        frames = []
        for t in range(2):  # two frames: one temporal patch of Qwen2-VL's temporal_patch_size=2
            Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(data / f"v{i}_{t}.png")
            frames.append(f"v{i}_{t}.png")
        rows.append({"prompt": [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "describe"}]}],
                     "chosen": "a big red circle .", "rejected": "a small blue square .", "videos": [frames]})
    (data / "pairs.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    c = cfg(model_dir, data / "pairs.jsonl")
    pairs, _, _ = prepare_pairs(c, load_processor(str(model_dir)))
    assert "<|video_pad|>" in pairs[0].prompt and pairs[0].images == [] and len(pairs[0].videos[0]) == 2
    trainer = {"max_steps": 1, "batch_size": 2, "progress": False, "plots": False, "cpu": True}
    out = run_job("vlm.train", None, [f"model_path={model_dir}", f"data={data / 'pairs.jsonl'}", "max_length=512"] +
                  [f"trainer.{k}={v}" for k, v in trainer.items()], str(tmp_path / "run"), False)
    assert out["step"] == 1 and math.isfinite(out["train/loss"]) and out["n_pairs"] == 2
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()


def test_one_tokenising_pass_gives_lengths_and_unknown_tokens(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Preparing the data tokenizes nothing; the check before training encodes each pair once (as the collator
    will), and that pass yields both the over-long rows (named) and the unknown-token rate."""
    from transformers import PreTrainedTokenizerBase

    from mmalign.data import DataValidationError
    from mmalign.vision_lm.adapter import VLMAdapter
    from mmalign.vision_lm.loading import load_processor, load_vlm
    from mmalign.vision_lm.objectives import PairCollator
    from mmalign.vision_lm.pairs import scan_pairs
    from mmalign.vision_lm.train import prepare_pairs

    model_dir = tiny_folder("llava", tmp_path / "model")
    data = pairs_file(tmp_path / "data", n=3)
    rows = [json.loads(x) for x in data.read_text().splitlines()]
    rows[1]["chosen"] = [{"role": "assistant", "content": "a big red circle zebra . " * 8}]
    data.write_text("\n".join(json.dumps(r) for r in rows))
    processor = load_processor(str(model_dir))
    calls = {"tok": 0, "collate": 0}
    tok_call, collate = PreTrainedTokenizerBase.__call__, PairCollator.__call__

    def counted_tok(self, *a, **k):
        calls["tok"] += 1
        return tok_call(self, *a, **k)

    def counted_collate(self, *a, **k):
        calls["collate"] += 1
        return collate(self, *a, **k)

    monkeypatch.setattr(PreTrainedTokenizerBase, "__call__", counted_tok)
    monkeypatch.setattr(PairCollator, "__call__", counted_collate)
    pairs, rownums, _ = prepare_pairs(cfg(model_dir, data), processor)
    assert calls["tok"] == 0
    model, _ = load_vlm(str(model_dir))
    adapter = VLMAdapter(model, processor, max_length=40)
    with pytest.raises(DataValidationError, match=r"1 of 3 rows in x\.jsonl .*\n  row 1: over-long pair: prompt "
                                                  r"\+ response is \d+ tokens"):
        scan_pairs(adapter, pairs, rownums, with_retrieved=False, skip_invalid=False, source="x.jsonl")
    assert calls["collate"] == 3  # one encoding per pair
    adapter.max_length = 512
    scan = scan_pairs(adapter, pairs, rownums, with_retrieved=False, skip_invalid=False)
    words = 3 * (1 + 5 + 5) + 7 * 8  # prompt "describe"; responses + EOS; row 1's chosen is 8 x 7 tokens
    assert scan.dropped == 0 and scan.oov_rate == pytest.approx(8 / (words - 5), abs=0.02)
    assert scan.oov_words[0] == "zebra"


def test_reference_pass_runs_first_without_grad_and_cpu_heap_memory_is_returned(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Per step: the reference forward (LoRA disabled, no grad) comes before the policy forward, so its transient
    memory is freed before the policy's saved activations build up; a CPU run fixes glibc's mmap threshold."""
    import platform

    import torch

    from mmalign.vision_lm.adapter import VLMAdapter
    from mmalign.vision_lm.train import _return_freed_heap_memory

    grad_modes: list[bool] = []
    token_logps = VLMAdapter.token_logps

    def recorded(self, *a, **k):
        grad_modes.append(torch.is_grad_enabled())
        return token_logps(self, *a, **k)

    monkeypatch.setattr(VLMAdapter, "token_logps", recorded)
    model_dir = tiny_folder("llava", tmp_path / "model")
    out = run(cfg(model_dir, pairs_file(tmp_path / "data"), trainer={"max_steps": 2}), tmp_path / "run")
    assert out["step"] == 2
    assert grad_modes[-4:] == [False, True, False, True]  # per step: reference, then policy (the scan only encodes)
    if platform.libc_ver()[0] == "glibc":
        assert _return_freed_heap_memory()


def test_cpu_return_memory_trims_the_heap_after_every_update(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With ``cpu_return_memory`` the heap's free pages go back to the OS once per optimizer update, not otherwise."""
    import platform

    import mmalign.train.memory as memory

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("glibc's allocator only")
    calls: list[int] = []
    monkeypatch.setattr(memory, "trim_heap", lambda: calls.append(1) or True)
    model_dir = tiny_folder("llava", tmp_path / "model")
    data = pairs_file(tmp_path / "data")
    run(cfg(model_dir, data, trainer={"max_steps": 3}), tmp_path / "plain")
    assert calls == []
    run(cfg(model_dir, data, cpu_return_memory=True, trainer={"max_steps": 3}), tmp_path / "returned")
    assert len(calls) == 3
