"""A tiny LLaVA (real ``transformers`` classes) with a locally built word-level tokenizer, for offline work.

Everything the adapter touches on a real checkpoint is here too: ``LlavaForConditionalGeneration`` built with
``AutoModelForImageTextToText.from_config``, a ``LlavaProcessor`` that expands ``<image>`` into one placeholder per
vision patch, and a fast tokenizer built with the ``tokenizers`` library. No download is involved.
"""

from __future__ import annotations

from typing import Any, Sequence

__all__ = ["SPECIAL_TOKENS", "build_tokenizer", "build_processor", "tiny_llava_config", "build_tiny_llava"]

SPECIAL_TOKENS: tuple[str, ...] = ("<pad>", "<unk>", "<bos>", "<eos>", "<image>")


def build_tokenizer(words: Sequence[str], extra_special: Sequence[str] = ()) -> Any:
    """A whitespace word-level ``PreTrainedTokenizerFast`` over ``SPECIAL_TOKENS + extra_special + words``.

    ``extra_special`` (e.g. a family's image markers) are registered as special tokens, so the tokenizer splits them
    out of unspaced text exactly and drops them when decoding.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab: dict[str, int] = {}
    for w in (*SPECIAL_TOKENS, *extra_special, *words):
        if w in vocab:
            raise ValueError(f"words must be unique and must not repeat special tokens, got {w!r} twice")
        vocab[w] = len(vocab)
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>", bos_token="<bos>", eos_token="<eos>",
        extra_special_tokens={"image_token": "<image>"}, padding_side="right",
    )
    if extra_special:
        tok.add_special_tokens({"additional_special_tokens": list(extra_special)})
    return tok


def build_processor(tokenizer: Any, image_size: int = 32, patch_size: int = 8) -> Any:
    """A ``LlavaProcessor``: pixels scaled to [-1, 1], ``<image>`` expanded to ``(image_size / patch_size)^2``."""
    from transformers import CLIPImageProcessor, LlavaProcessor

    image_processor = CLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
        do_resize=True, do_center_crop=True, do_rescale=True, do_normalize=True,
        image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5], do_convert_rgb=False,
    )
    return LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=patch_size,
        vision_feature_select_strategy="default", num_additional_image_tokens=1,
    )


def tiny_llava_config(
    vocab_size: int, image_size: int = 32, patch_size: int = 8, vision_dim: int = 64, text_dim: int = 96,
    vision_layers: int = 2, text_layers: int = 2, heads: int = 4, max_positions: int = 256,
) -> Any:
    """A ``LlavaConfig`` of a CLIP vision tower and a Llama decoder of the given (tiny) sizes."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    if image_size % patch_size:
        raise ValueError(f"image_size must be a multiple of patch_size, got {image_size} and {patch_size}")
    vision = CLIPVisionConfig(
        hidden_size=vision_dim, intermediate_size=2 * vision_dim, num_hidden_layers=vision_layers,
        num_attention_heads=heads, image_size=image_size, patch_size=patch_size,
    )
    text = LlamaConfig(
        hidden_size=text_dim, intermediate_size=2 * text_dim, num_hidden_layers=text_layers,
        num_attention_heads=heads, num_key_value_heads=heads, vocab_size=vocab_size,
        max_position_embeddings=max_positions, pad_token_id=0, bos_token_id=2, eos_token_id=3,
    )
    return LlavaConfig(
        vision_config=vision, text_config=text, image_token_index=SPECIAL_TOKENS.index("<image>"),
        image_seq_length=(image_size // patch_size) ** 2, vision_feature_layer=-1,
        vision_feature_select_strategy="default",
    )


def build_tiny_llava(words: Sequence[str], seed: int = 0, **config_kwargs: Any) -> tuple[Any, Any]:
    """``(model, processor)``: a randomly initialised tiny LLaVA (seeded) and its processor."""
    from transformers import AutoModelForImageTextToText

    from mmalign.core.rng import seeded_global_rng

    tokenizer = build_tokenizer(words)
    cfg = tiny_llava_config(len(tokenizer), **config_kwargs)
    processor = build_processor(
        tokenizer, image_size=cfg.vision_config.image_size, patch_size=cfg.vision_config.patch_size
    )
    with seeded_global_rng(seed):
        model = AutoModelForImageTextToText.from_config(cfg)
    return model, processor
