"""Tiny-from-config VLM fixtures (LLaVA and Qwen2-VL) for the vision_lm tests."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mmalign.vision_lm import scenes as S
from mmalign.vision_lm.adapter import VLMAdapter
from mmalign.vision_lm.tiny import build_tiny_llava


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def llava():
    model, processor = build_tiny_llava(S.vocabulary(), seed=0, vision_dim=32, text_dim=32)
    model.eval()
    return VLMAdapter(model, processor)


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    gen = S.SceneGenerator()
    scenes = [gen.sample(rng) for _ in range(6)]
    return scenes, [S.render(s, rng=rng) for s in scenes]


@pytest.fixture(scope="module")
def qwen2vl():
    """A Qwen2-VL built from config with a word-level tokenizer and its real processor classes."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import (AutoModelForImageTextToText, PreTrainedTokenizerFast, Qwen2VLConfig,
                              Qwen2VLImageProcessor, Qwen2VLProcessor)

    words = ["<pad>", "<unk>", "<|endoftext|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
             "<|video_pad|>", "a", "red", "circle", "blue", "square", "describe", ":"]
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", unk_token="<unk>", eos_token="<|endoftext|>",
                                  extra_special_tokens={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>"})
    ip = Qwen2VLImageProcessor(min_pixels=32 * 32, max_pixels=32 * 32, patch_size=8, merge_size=2,
                               temporal_patch_size=2)
    from transformers import Qwen2VLVideoProcessor

    vp = Qwen2VLVideoProcessor(min_pixels=32 * 32, max_pixels=32 * 32, patch_size=8, merge_size=2,
                               temporal_patch_size=2)
    proc = Qwen2VLProcessor(image_processor=ip, tokenizer=tok, video_processor=vp)
    cfg = Qwen2VLConfig(
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=2, vocab_size=len(words), max_position_embeddings=256,
                         rope_scaling={"type": "mrope", "mrope_section": [2, 2, 4]}, bos_token_id=2,
                         eos_token_id=2, pad_token_id=0),
        vision_config=dict(depth=1, embed_dim=32, hidden_size=32, num_heads=2, patch_size=8, spatial_merge_size=2,
                           temporal_patch_size=2, in_chans=3, out_hidden_size=32),
        image_token_id=5, video_token_id=6, vision_start_token_id=3, vision_end_token_id=4)
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_config(cfg).eval()
    return VLMAdapter(model, proc)


def _manual_response_logps(adapter: VLMAdapter, example) -> tuple[list[float], int]:  # noqa: ANN001
    """Reference log-probs of ``example``'s response (+ EOS) from one plain forward of processor output + response
    tokens, independent of the adapter's batching and masking; returns ``(per-token log-probs, prompt length)``."""
    tok = adapter.tokenizer
    with torch.no_grad():
        enc = adapter.processor(images=[example.images], text=[example.prompt], return_tensors="pt")
        resp = tok(example.response, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        ids = torch.cat([enc["input_ids"][0], torch.tensor(resp)]).unsqueeze(0)
        vision = {k: v for k, v in enc.items() if k not in ("input_ids", "attention_mask")}
        logits = adapter.model(input_ids=ids, **vision).logits[0]
    n_prompt = enc["input_ids"].shape[1]
    return [torch.log_softmax(logits[n_prompt - 1 + j], -1)[t].item() for j, t in enumerate(resp)], n_prompt


@pytest.fixture(scope="session")
def manual_response_logps():  # noqa: ANN201 - the function
    """Fixture: ``manual_response_logps(adapter, example)`` (see :func:`_manual_response_logps`)."""
    return _manual_response_logps
