"""Tiny random-init VLMs of several ``transformers`` families with processors built offline (no hub access).

Each family is the real model class built by ``AutoModelForImageTextToText.from_config`` and the real processor class
around a locally built word-level tokenizer, so the adapter exercises the same code path as on a checkpoint:

* ``llava``: ``LlavaForConditionalGeneration`` + ``LlavaProcessor`` (see :mod:`mmalign.vision_lm.tiny`); one
  ``pixel_values`` row per image, ``(image_size / patch_size)^2`` placeholders.
* ``llava_next``: ``LlavaNextForConditionalGeneration`` + ``LlavaNextProcessor``; AnyRes: every image becomes a base
  view plus tiles of its best-fitting grid pinpoint, ``pixel_values`` (images, patches, 3, H, W) with ``image_sizes``,
  and a placeholder count that depends on the image's aspect ratio (unpadded features + one newline per row).
* ``idefics3`` / ``smolvlm``: ``Idefics3ForConditionalGeneration`` / ``SmolVLMForConditionalGeneration`` +
  ``Idefics3Processor``; images are resized to ``2 * image_size`` on the long edge and split into
  ``image_size`` tiles plus a global view, each tile ``(image_size / patch_size)^2 / 4`` placeholders after the pixel
  shuffle, wrapped in ``<fake_token_around_image>`` / ``<row_i_col_j>`` / ``<global-img>`` markers;
  ``pixel_values`` (examples, sub-images, 3, H, W) with ``pixel_attention_mask``.

SmolVLM gets the ``Idefics3Processor``: ``SmolVLMProcessor`` builds the same image prompt strings but requires the
``num2words`` package (for its video prompts), which is not a dependency here.
"""

from __future__ import annotations

from typing import Any, Sequence

__all__ = ["FAMILIES", "family_tokenizer", "tiny_family_config", "family_processor", "build_tiny_vlm"]

FAMILIES: tuple[str, ...] = ("llava", "llava_next", "idefics3", "smolvlm")
_IDEFICS_SPECIAL = ("<fake_token_around_image>", "<global-img>", "<end_of_utterance>",
                    *(f"<row_{i + 1}_col_{j + 1}>" for i in range(6) for j in range(6)))


def _check_family(family: str) -> None:
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")


def family_tokenizer(family: str, words: Sequence[str]) -> Any:
    """Word-level fast tokenizer over the family's special tokens + ``words``; every marker is a special token.

    Registering the Idefics3 markers as special tokens makes the tokenizer split the processor's unspaced expansion
    (``<fake_token_around_image><row_1_col_1><image><image>...``) exactly and drop the markers when decoding.
    """
    from mmalign.vision_lm.tiny import build_tokenizer

    _check_family(family)
    return build_tokenizer(words, _IDEFICS_SPECIAL if family in ("idefics3", "smolvlm") else ())


def tiny_family_config(
    family: str, vocab_size: int, *, image_size: int = 32, patch_size: int | None = None, vision_dim: int = 32,
    text_dim: int = 32, vision_layers: int = 1, text_layers: int = 1, heads: int = 2, max_positions: int = 512,
) -> Any:
    """The family's composite config with a tiny vision tower and a tiny Llama decoder.

    ``patch_size`` defaults to 16 for ``llava_next`` (4 patches per 32-pixel view) and 8 otherwise (Idefics3's
    pixel shuffle with scale factor 2 needs an even number of patches per side).
    """
    from transformers import CLIPVisionConfig, LlamaConfig

    _check_family(family)
    patch = patch_size or (16 if family == "llava_next" else 8)
    if image_size % patch:
        raise ValueError(f"image_size must be a multiple of patch_size, got {image_size} and {patch}")
    text: dict[str, Any] = dict(hidden_size=text_dim, intermediate_size=2 * text_dim, num_hidden_layers=text_layers,
                num_attention_heads=heads, num_key_value_heads=heads, vocab_size=vocab_size,
                max_position_embeddings=max_positions, pad_token_id=0, bos_token_id=2, eos_token_id=3)
    if family == "llava":
        from mmalign.vision_lm.tiny import tiny_llava_config

        return tiny_llava_config(vocab_size, image_size=image_size, patch_size=patch, vision_dim=vision_dim,
                                 text_dim=text_dim, vision_layers=vision_layers, text_layers=text_layers, heads=heads,
                                 max_positions=max_positions)
    if family == "llava_next":
        from transformers import LlavaNextConfig

        vision = CLIPVisionConfig(hidden_size=vision_dim, intermediate_size=2 * vision_dim,
                                  num_hidden_layers=vision_layers, num_attention_heads=heads, image_size=image_size,
                                  patch_size=patch)
        return LlavaNextConfig(vision_config=vision, text_config=LlamaConfig(**text), image_token_index=4,
                               image_grid_pinpoints=_pinpoints(image_size), vision_feature_layer=-1,
                               vision_feature_select_strategy="default")
    from transformers import Idefics3Config, SmolVLMConfig

    if (image_size // patch) % 2:
        raise ValueError(f"idefics3/smolvlm need an even number of patches per side, got {image_size}/{patch}")
    cls = Idefics3Config if family == "idefics3" else SmolVLMConfig
    return cls(vision_config=dict(hidden_size=vision_dim, intermediate_size=2 * vision_dim,
                                  num_hidden_layers=vision_layers, num_attention_heads=heads, image_size=image_size,
                                  patch_size=patch),
               text_config=dict(model_type="llama", **text), image_token_id=4, scale_factor=2)


def _pinpoints(image_size: int) -> list[list[int]]:
    s = image_size
    return [[s, s], [s, 2 * s], [2 * s, s], [2 * s, 2 * s]]


def family_processor(family: str, tokenizer: Any, config: Any) -> Any:
    """The family's processor for ``config`` (pixels scaled to [-1, 1], no resampling surprises on 32-px scenes)."""
    _check_family(family)
    vc = config.vision_config
    norm: dict[str, Any] = dict(image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5], do_convert_rgb=False)
    if family == "llava":
        from mmalign.vision_lm.tiny import build_processor

        return build_processor(tokenizer, image_size=vc.image_size, patch_size=vc.patch_size)
    if family == "llava_next":
        from transformers import LlavaNextImageProcessor, LlavaNextProcessor

        next_ip = LlavaNextImageProcessor(size={"shortest_edge": vc.image_size},
                                     crop_size={"height": vc.image_size, "width": vc.image_size},
                                     image_grid_pinpoints=config.image_grid_pinpoints, **norm)
        return LlavaNextProcessor(image_processor=next_ip, tokenizer=tokenizer, patch_size=vc.patch_size,
                                  vision_feature_select_strategy="default", num_additional_image_tokens=1)
    from transformers import Idefics3ImageProcessor, Idefics3Processor

    ip = Idefics3ImageProcessor(size={"longest_edge": 2 * vc.image_size}, max_image_size={"longest_edge": vc.image_size},
                                do_image_splitting=True, resample=2, **norm)  # 2 = bilinear
    seq = (vc.image_size // vc.patch_size) ** 2 // config.scale_factor ** 2
    return Idefics3Processor(image_processor=ip, tokenizer=tokenizer, image_seq_len=seq)


def build_tiny_vlm(family: str, words: Sequence[str], seed: int = 0, **config_kwargs: Any) -> tuple[Any, Any]:
    """``(model, processor)``: a seeded random-init tiny VLM of ``family`` and its offline-built processor."""
    import torch
    from transformers import AutoModelForImageTextToText

    tokenizer = family_tokenizer(family, words)
    cfg = tiny_family_config(family, len(tokenizer), **config_kwargs)
    processor = family_processor(family, tokenizer, cfg)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForImageTextToText.from_config(cfg)
    return model, processor
