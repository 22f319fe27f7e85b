"""Tiny random-init VLMs of several ``transformers`` families with processors built offline (no hub access).

Each family is the real model class built by ``AutoModelForImageTextToText.from_config`` and the real processor class
around a locally built word-level tokenizer, so the adapter exercises the same code path as on a checkpoint:

* ``llava``: ``LlavaForConditionalGeneration`` + ``LlavaProcessor`` (see :mod:`mmalign.vision_lm.tiny`); one
  ``pixel_values`` row per image, ``(image_size / patch_size)^2`` placeholders.
* ``llava_next``: ``LlavaNextForConditionalGeneration`` + ``LlavaNextProcessor``; AnyRes: every image becomes a base
  view plus tiles of its best-fitting grid pinpoint, ``pixel_values`` (images, patches, 3, H, W) with ``image_sizes``,
  and a placeholder count that depends on the image's aspect ratio (unpadded features + one newline per row).
* ``idefics3`` / ``smolvlm``: ``Idefics3ForConditionalGeneration`` + ``Idefics3Processor`` /
  ``SmolVLMForConditionalGeneration`` + ``SmolVLMProcessor`` (with its ``SmolVLMImageProcessor`` and
  ``SmolVLMVideoProcessor``); images are resized to ``2 * image_size`` on the long edge and split into
  ``image_size`` tiles plus a global view, each tile ``(image_size / patch_size)^2 / 4`` placeholders after the pixel
  shuffle, wrapped in ``<fake_token_around_image>`` / ``<row_i_col_j>`` / ``<global-img>`` markers;
  ``pixel_values`` (examples, sub-images, 3, H, W) with ``pixel_attention_mask``.

``SmolVLMProcessor`` refuses to build without the ``num2words`` package (it spells out frame counts in its video
prompts), which the ``vlm`` extra therefore requires. For images its prompt strings equal Idefics3's.
"""

from __future__ import annotations

from typing import Any, Sequence

__all__ = ["FAMILIES", "family_tokenizer", "tiny_family_config", "family_processor", "build_tiny_vlm",
           "whole_image_patch_features"]

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
    sizes: dict[str, Any] = dict(size={"longest_edge": 2 * vc.image_size},
                                 max_image_size={"longest_edge": vc.image_size}, resample=2, **norm)  # 2 = bilinear
    seq = (vc.image_size // vc.patch_size) ** 2 // config.scale_factor ** 2
    if family == "idefics3":
        from transformers import Idefics3ImageProcessor, Idefics3Processor

        return Idefics3Processor(image_processor=Idefics3ImageProcessor(do_image_splitting=True, **sizes),
                                 tokenizer=tokenizer, image_seq_len=seq)
    from transformers import SmolVLMImageProcessor, SmolVLMProcessor, SmolVLMVideoProcessor

    return SmolVLMProcessor(image_processor=SmolVLMImageProcessor(do_image_splitting=True, **sizes),
                            video_processor=SmolVLMVideoProcessor(**sizes), tokenizer=tokenizer, image_seq_len=seq)


def build_tiny_vlm(family: str, words: Sequence[str], seed: int = 0, **config_kwargs: Any) -> tuple[Any, Any]:
    """``(model, processor)``: a seeded random-init tiny VLM of ``family`` and its offline-built processor."""
    from transformers import AutoModelForImageTextToText

    from mmalign.core.rng import seeded_global_rng

    tokenizer = family_tokenizer(family, words)
    cfg = tiny_family_config(family, len(tokenizer), **config_kwargs)
    processor = family_processor(family, tokenizer, cfg)
    with seeded_global_rng(seed):
        model = AutoModelForImageTextToText.from_config(cfg)
    return model, processor


def whole_image_patch_features(model: Any, processor: Any, images: Sequence[Any]) -> tuple[Any, Any, Any]:
    """``(tower, pixel_values, features)`` for per-patch supervision of any family's vision tower.

    ``pixel_values`` (N, 3, S, S) holds one whole-image view per image at the tower's resolution: the image itself
    (LLaVA), the AnyRes base view (LLaVA-NeXT, first sub-image) or the global view (Idefics3 / SmolVLM, last
    sub-image); ``features(pix)`` -> (N, (S / patch)^2, D) are the tower's last-layer patch states in row-major
    order, CLIP's CLS state dropped as LLaVA does (the Idefics3 tower has none).
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    inner = base.model if hasattr(base, "model") else base
    kind = getattr(base.config, "model_type", None)
    if kind in ("idefics3", "smolvlm"):
        tower = inner.vision_model
        pix = processor.image_processor([[im] for im in images], return_tensors="pt")["pixel_values"][:, -1]
        return tower, pix, lambda x: tower(pixel_values=x).last_hidden_state
    tower = inner.vision_tower
    pix = processor.image_processor(list(images), return_tensors="pt")["pixel_values"]
    if pix.ndim == 5:  # LLaVA-NeXT: (N, views, 3, S, S) with the resized whole image first
        pix = pix[:, 0]
    return tower, pix, lambda x: tower(x, output_hidden_states=True).hidden_states[-1][:, 1:]
