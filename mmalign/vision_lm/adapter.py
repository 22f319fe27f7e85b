"""The vision-language adapter: log-probabilities of responses under an image, a different image, a masked image.

It turns (prompt, response, images) examples into the tensors the core losses take, for any
``AutoModelForImageTextToText`` model with its ``AutoProcessor`` (LLaVA, LLaVA-NeXT, Qwen2-VL/2.5-VL, Idefics3 /
SmolVLM ...). What TRL's collator cannot express and this one can:

* a different image per branch (Re-Align's visual term): every branch is encoded with its own images;
* image tokens hidden from attention with keep-fraction ``1 - rho`` (BDHS): the 2-D attention mask is zeroed at a
  random subset of image-token positions, so no later token can read them (the image is still encoded). Positions
  are not changed: models with multimodal rotary positions (M-RoPE: Qwen2-VL/2.5-VL), which lay out positions from
  the attention mask, get position ids computed from the unhidden mask, passed explicitly;
* several frames per example (video as a list of images, or ``videos=`` for processors that take them);
* reference log-probs from the same model with LoRA disabled, or precomputed once (see ``refcache.py``).

Branches go through one concatenated forward pass; when every branch carries the same pixels (plain DPO), models that
splice image features into placeholder embeddings (LLaVA, LLaVA-NeXT, Idefics3, SmolVLM) encode the images once and
reuse the features in every branch. Family differences handled here: LLaVA-NeXT's ``image_sizes`` and AnyRes patch
stacks, Idefics3/SmolVLM's split sub-images with ``pixel_attention_mask`` (a variable number of sub-images per example,
padded with all-zero images), Qwen2-VL's flattened patches with ``image_grid_thw``. Truncation never cuts image
tokens: an over-long example raises ``ValueError`` naming it, or is dropped and counted when ``skip_invalid=True``.
"""

from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import torch
from torch import Tensor

from mmalign.train.fsdp import unwrap_model
from mmalign.vision_lm.loading import load_vlm  # noqa: F401  (re-exported: the adapter's users load models with it)

__all__ = ["VLExample", "EncodedBatch", "VLMAdapter", "load_vlm", "hide_image_tokens"]

# Processor outputs that are laid out per token of the prompt (padded / extended with the text).
_PER_TOKEN_KEYS = ("token_type_ids", "mm_token_type_ids")
# Vision tensors stacked as (examples or images, sub-images, ...) whose dim 1 varies with the image layout (LLaVA-NeXT
# AnyRes patches, Idefics3/SmolVLM split tiles). Processors pad dim 1 with all-zero entries, which the models ignore
# (LLaVA-NeXT keeps the first n patches given by image_sizes; Idefics3/SmolVLM drop all-zero sub-images), so branches
# with different layouts are padded the same way when concatenated.
_SUBIMAGE_KEYS = ("pixel_values", "pixel_attention_mask")
# Model types whose forward splices projected image features into the placeholder embeddings (masked_scatter) and
# needs nothing else from the pixels, so features encoded once can be reused across branches.
_SPLICE_FAMILIES = ("llava", "llava_next", "vipllava", "idefics3", "smolvlm")


@dataclass
class VLExample:
    """One prompt with its images (several images = several frames) and a response to score."""

    prompt: str
    response: str
    images: list[Any] = field(default_factory=list)
    videos: list[Any] | None = None


@dataclass
class EncodedBatch:
    """Right-padded ``input_ids``/``attention_mask`` (B, T), ``response_mask`` (B, T) marking response tokens,
    processor vision tensors in ``vision`` (pixel values, grid sizes ...), ``index`` = kept example indices."""

    input_ids: Tensor
    attention_mask: Tensor
    response_mask: Tensor
    vision: dict[str, Tensor]
    extra_tokens: dict[str, Tensor]
    index: list[int]

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> "EncodedBatch":
        def mv(t: Tensor) -> Tensor:
            if dtype is not None and t.is_floating_point():
                return t.to(device=device, dtype=dtype)
            return t.to(device)

        return EncodedBatch(
            mv(self.input_ids), mv(self.attention_mask), mv(self.response_mask),
            {k: mv(v) for k, v in self.vision.items()}, {k: mv(v) for k, v in self.extra_tokens.items()},
            list(self.index),
        )

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])


def _pad_cat(tensors: Sequence[Tensor], value: int) -> Tensor:
    width = max(t.shape[1] for t in tensors)
    return torch.cat([torch.nn.functional.pad(t, (0, width - t.shape[1]), value=value) for t in tensors], dim=0)


def concat_batches(batches: Sequence[EncodedBatch]) -> EncodedBatch:
    """Stack branches along the batch axis (right-padding to one length); vision tensors are concatenated on dim 0."""
    vision: dict[str, Tensor] = {}
    for key in batches[0].vision:
        parts = [b.vision[key] for b in batches]
        if any(p.shape[1:] != parts[0].shape[1:] for p in parts):
            if key in _SUBIMAGE_KEYS and all(p.ndim >= 4 and p.shape[2:] == parts[0].shape[2:] for p in parts):
                width = max(p.shape[1] for p in parts)
                parts = [torch.cat([p, p.new_zeros(p.shape[0], width - p.shape[1], *p.shape[2:])], dim=1)
                         for p in parts]
            else:
                raise ValueError(f"vision tensor {key!r} has per-branch shapes {[tuple(p.shape) for p in parts]} that "
                                 "cannot be concatenated; use the same number of images per example in every branch")
        vision[key] = torch.cat(parts, dim=0)
    offset, index = 0, []
    for b in batches:
        index += [i + offset for i in b.index]
        offset += len(b)
    return EncodedBatch(
        _pad_cat([b.input_ids for b in batches], 0), _pad_cat([b.attention_mask for b in batches], 0),
        _pad_cat([b.response_mask for b in batches], 0), vision,
        {k: _pad_cat([b.extra_tokens[k] for b in batches], 0) for k in batches[0].extra_tokens}, index,
    )


def _append_slot(batch: EncodedBatch, token: int) -> EncodedBatch:
    """``batch`` with one more response token (``token``) after each row's last real token."""
    lengths = batch.attention_mask.sum(1)
    rows = torch.arange(len(batch))

    def grow(t: Tensor, value: int) -> Tensor:
        out = t.new_zeros(t.shape[0], t.shape[1] + 1)
        out[:, :-1] = t
        out[rows, lengths] = value
        return out

    return EncodedBatch(grow(batch.input_ids, token), grow(batch.attention_mask, 1),
                        grow(batch.response_mask, 1), dict(batch.vision),
                        {k: grow(v, 0) for k, v in batch.extra_tokens.items()}, list(batch.index))


def hide_image_tokens(
    input_ids: Tensor, attention_mask: Tensor, image_token_ids: Sequence[int], rho: float | Tensor,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Attention mask with each image-token position hidden independently with probability ``rho`` (BDHS).

    A position is kept when ``u >= rho`` with ``u ~ U(0, 1)`` drawn from ``generator`` (on CPU, so a seed gives the
    same mask on every device); the expected kept fraction is ``1 - rho``. ``rho`` may be a float or a (B,) tensor
    (one value per row). ``rho = 0`` returns ``attention_mask`` unchanged; ``rho = 1`` hides every image token.
    """
    rho_t = torch.as_tensor(rho, dtype=torch.float32)
    if rho_t.ndim > 1 or (rho_t.ndim == 1 and rho_t.shape[0] != input_ids.shape[0]):
        raise ValueError(f"rho must be a float or a ({input_ids.shape[0]},) tensor, got shape {tuple(rho_t.shape)}")
    if bool(((rho_t < 0) | (rho_t > 1)).any()):
        raise ValueError(f"rho must be in [0, 1], got {rho}")
    is_image = torch.zeros_like(input_ids, dtype=torch.bool)
    for tid in image_token_ids:
        is_image |= input_ids == tid
    u = torch.rand(input_ids.shape, generator=generator, device="cpu").to(input_ids.device)
    rho_b = rho_t.to(input_ids.device).reshape(-1, 1) if rho_t.ndim == 1 else rho_t.to(input_ids.device)
    hidden = is_image & (u < rho_b)
    return attention_mask.masked_fill(hidden, 0)


def image_token_ids_of(model: Any) -> list[int]:
    """Placeholder token ids a model expands images/videos into (``image_token_id``, ``image_token_index`` ...)."""
    cfg = model.config
    ids = {getattr(cfg, k, None) for k in ("image_token_id", "image_token_index", "video_token_id")}
    ids.discard(None)
    if not ids:
        raise ValueError(f"model config {type(cfg).__name__} names no image token id")
    return sorted(int(i) for i in ids)


def _is_replicating_wrapper(model: Any) -> bool:
    """DDP / DataParallel: a wrapper whose gradient bookkeeping is tied to its own ``forward``."""
    return isinstance(model, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel))


class VLMAdapter:
    """Scores responses of a VLM: encode examples, run (concatenated) forwards, return per-token log-probs."""

    def __init__(self, model: Any, processor: Any, max_length: int | None = None, skip_invalid: bool = False,
                 share_images: bool = True) -> None:
        if max_length is not None and max_length <= 0:
            raise ValueError(f"max_length must be > 0 or None, got {max_length}")
        self.model = model
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.max_length = max_length
        self.skip_invalid = skip_invalid
        self.share_images = share_images
        self.num_skipped = 0
        self.image_token_ids = image_token_ids_of(unwrap_model(model))
        forward = getattr(model, "forward", None)
        params = inspect.signature(forward).parameters if forward is not None else {}
        self._accepts_logits_to_keep = "logits_to_keep" in params or "kwargs" in params

    @property
    def base_model(self) -> Any:
        """``self.model`` without training wrappers (see :func:`unwrap_model`)."""
        return unwrap_model(self.model)

    def _pad_id(self) -> int:
        """Filler id of padded (attention-masked) positions: the pad token, else EOS, else 0."""
        for tid in (self.tokenizer.pad_token_id, self.tokenizer.eos_token_id):
            if tid is not None:
                return int(tid)
        return 0

    def _rope_index_fn(self) -> Any:
        """The model's ``get_rope_index`` (M-RoPE families: Qwen2-VL, Qwen2.5-VL ...), or ``None``."""
        m = self.base_model
        if hasattr(m, "get_base_model"):  # peft
            m = m.get_base_model()
        for cand in (m, getattr(m, "model", None)):
            fn = getattr(cand, "get_rope_index", None)
            if callable(fn):
                return fn
        return None

    def mrope_position_ids(self, input_ids: Tensor, attention_mask: Tensor, vision: dict[str, Tensor],
                           extra_tokens: dict[str, Tensor]) -> Tensor | None:
        """Multimodal rotary position ids ``(3, B, T)`` laid out by the model from ``attention_mask``.

        ``None`` for models without M-RoPE, for text-only batches (plain positions are right then) and when the
        model's ``get_rope_index`` needs an input the processor did not return (the model then raises its own
        error). Computed from the UNHIDDEN mask: BDHS hides tokens from attention but keeps every position.
        """
        fn = self._rope_index_fn()
        if fn is None or not any(k in vision for k in ("image_grid_thw", "video_grid_thw")):
            return None
        params = inspect.signature(fn).parameters
        available = {**vision, **extra_tokens}
        kwargs: dict[str, Any] = {k: v for k, v in available.items() if k in params and k != "input_ids"}
        required = [n for n, p in params.items() if p.default is inspect.Parameter.empty
                    and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL) and n not in ("input_ids", "self")]
        if any(n not in kwargs for n in required):
            return None
        if "attention_mask" in params:
            kwargs["attention_mask"] = attention_mask
        with torch.no_grad():
            out = fn(input_ids, **kwargs)
        return out[0] if isinstance(out, tuple) else out

    # ----------------------------------------------------------------------------------------- encoding
    def encode(self, examples: Sequence[VLExample]) -> EncodedBatch:
        """Process prompts (with images) through the processor, append response tokens + EOS, right-pad."""
        if not examples:
            raise ValueError("examples must be non-empty")
        has_images = [bool(ex.images) for ex in examples]
        if len(set(has_images)) != 1:
            raise ValueError("either every example in a batch has images or none has")
        kwargs: dict[str, Any] = {"text": [ex.prompt for ex in examples], "return_tensors": "pt", "padding": True}
        if has_images[0]:
            kwargs["images"] = [list(ex.images) for ex in examples]
        if examples[0].videos is not None:
            kwargs["videos"] = [ex.videos for ex in examples]
        old_side = getattr(self.tokenizer, "padding_side", "right")
        self.tokenizer.padding_side = "right"
        no_pad = self.tokenizer.pad_token is None
        if no_pad:  # the processor refuses to pad without a pad token; padded prompt positions are dropped below
            filler = self.tokenizer.eos_token or self.tokenizer.unk_token
            if filler is None:
                raise ValueError("the tokenizer has no pad, EOS or unk token to pad prompts with; "
                                 "set tokenizer.pad_token")
            self.tokenizer.pad_token = filler
        try:
            proc = self.processor(**kwargs)
        finally:
            self.tokenizer.padding_side = old_side
            if no_pad:
                self.tokenizer.pad_token = None
        eos = self.tokenizer.eos_token_id
        rows, resp_rows, extra_rows, index = [], [], {k: [] for k in _PER_TOKEN_KEYS if k in proc}, []
        keep_vision = []
        for i, ex in enumerate(examples):
            n_prompt = int(proc["attention_mask"][i].sum())
            prompt_ids = proc["input_ids"][i, :n_prompt]
            resp = self.tokenizer(ex.response, add_special_tokens=False)["input_ids"]
            resp_ids = torch.tensor(list(resp) + ([eos] if eos is not None else []), dtype=torch.long)
            total = n_prompt + len(resp_ids)
            if self.max_length is not None and total > self.max_length:
                n_img = int(sum((prompt_ids == t).sum() for t in self.image_token_ids))
                if self.skip_invalid:
                    self.num_skipped += 1
                    continue
                raise ValueError(
                    f"example {i}: prompt + response is {total} tokens ({n_img} image tokens, {len(resp_ids)} "
                    f"response tokens) > max_length={self.max_length}; truncating would cut image or response "
                    "tokens, so raise max_length or pass skip_invalid=True to drop such examples"
                )
            rows.append(torch.cat([prompt_ids, resp_ids]).unsqueeze(0))
            resp_rows.append(torch.cat([torch.zeros(n_prompt), torch.ones(len(resp_ids))]).bool().unsqueeze(0))
            for k in extra_rows:
                extra_rows[k].append(torch.nn.functional.pad(proc[k][i, :n_prompt], (0, len(resp_ids))).unsqueeze(0))
            index.append(i)
            keep_vision.append(i)
        if not rows:
            raise ValueError(f"all {len(examples)} examples were longer than max_length={self.max_length}")
        ids = _pad_cat(rows, self._pad_id())
        attn = _pad_cat([torch.ones_like(r) for r in rows], 0)
        vision = {k: v for k, v in proc.items() if k not in ("input_ids", "attention_mask", *_PER_TOKEN_KEYS)
                  and isinstance(v, Tensor)}
        if len(keep_vision) != len(examples) and vision:
            vision = self._select_vision(vision, proc, keep_vision, [len(ex.images) for ex in examples])
        return EncodedBatch(ids, attn, _pad_cat(resp_rows, 0),
                            vision, {k: _pad_cat(v, 0) for k, v in extra_rows.items()}, index)

    def _select_vision(self, vision: dict[str, Tensor], proc: Any, keep: list[int],
                       images_per_example: list[int]) -> dict[str, Tensor]:
        """Drop the vision rows of skipped examples.

        A tensor's leading dim is per example (Idefics3/SmolVLM stacks, one LLaVA image each), per image (LLaVA
        frames, LLaVA-NeXT patch stacks, Qwen2-VL ``image_grid_thw``) or per patch (Qwen2-VL ``pixel_values``: split
        proportionally to each example's placeholder count).
        """
        n = len(images_per_example)
        per_token = [int(sum((proc["input_ids"][i] == t).sum() for t in self.image_token_ids)) for i in range(n)]
        out = {}
        for k, v in vision.items():
            if v.shape[0] == n:
                out[k] = v[keep]
                continue
            if v.shape[0] == sum(images_per_example):
                counts = images_per_example
            else:
                unit = v.shape[0] // sum(per_token) if sum(per_token) else 0
                if unit * sum(per_token) != v.shape[0]:
                    raise ValueError(f"cannot drop skipped examples from vision tensor {k!r} of shape {tuple(v.shape)};"
                                     " encode the examples one by one instead")
                counts = [c * unit for c in per_token]
            starts = torch.tensor([0] + counts).cumsum(0)
            out[k] = torch.cat([v[starts[i]:starts[i + 1]] for i in keep])
        return out

    # ----------------------------------------------------------------------------------------- scoring
    def model_inputs(self, batch: EncodedBatch, attention_mask: Tensor | None = None) -> dict[str, Any]:
        inputs: dict[str, Any] = {"input_ids": batch.input_ids,
                                  "attention_mask": batch.attention_mask if attention_mask is None else attention_mask}
        inputs.update(batch.vision)
        inputs.update(batch.extra_tokens)
        return inputs

    def token_logps(
        self, batch: EncodedBatch, *, rho: float | Tensor = 0.0, generator: torch.Generator | None = None,
        return_logits: bool = False, image_features: Tensor | None = None,
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """Per-token log-probs of the response tokens, left-aligned: ``(logps (B, L), mask (B, L), logits or None)``.

        Column ``j`` of row ``i`` is the ``j``-th response token of example ``i`` (``L`` = longest response in the
        batch, EOS included); ``mask`` marks real tokens; ``logits`` (B, L, V) float32 when ``return_logits``.
        ``rho > 0`` hides image tokens from attention (see :func:`hide_image_tokens`); positions stay those of the
        unhidden sequence (M-RoPE models get them explicitly, see :meth:`mrope_position_ids`). Log-probs are computed in
        float32 from the logits of the response positions only (``logits_to_keep``), so long image prompts never
        materialise (T, V) logits. ``image_features`` (LLaVA-style models only): precomputed projected features of
        every image placeholder, in order, spliced into the input embeddings instead of re-encoding pixels.
        """
        attn = batch.attention_mask
        position_ids = None
        if isinstance(rho, Tensor) or rho > 0:
            # M-RoPE models lay out positions from the attention mask: give them the unhidden layout explicitly
            position_ids = self.mrope_position_ids(batch.input_ids, attn, batch.vision, batch.extra_tokens)
            attn = hide_image_tokens(batch.input_ids, attn, self.image_token_ids, rho, generator)
        resp = batch.response_mask
        starts = resp.float().argmax(dim=1)  # first response token of each row
        first = int(starts.min())
        keep = batch.input_ids.shape[1] - first + 1
        inputs = self.model_inputs(batch, attn)
        if position_ids is not None:
            inputs["position_ids"] = position_ids
        if image_features is not None:
            embeds = self.base_model.get_input_embeddings()(batch.input_ids)
            is_image = torch.zeros_like(batch.input_ids, dtype=torch.bool)
            for tid in self.image_token_ids:
                is_image |= batch.input_ids == tid
            embeds = embeds.masked_scatter(is_image.unsqueeze(-1), image_features.to(embeds.dtype))
            inputs = {"inputs_embeds": embeds, "attention_mask": attn}
        if self._accepts_logits_to_keep:
            inputs["logits_to_keep"] = keep
        logits = self.model(**inputs, use_cache=False).logits[:, -keep:]
        logits = logits[:, :-1].float()  # logits[:, j] predicts input_ids[:, first + j]
        width = int(resp.sum(dim=1).max())
        idx = (starts - first).unsqueeze(1) + torch.arange(width, device=resp.device).unsqueeze(0)
        idx = idx.clamp(max=logits.shape[1] - 1)
        targets = torch.gather(batch.input_ids[:, first:], 1, idx)
        # From the response lengths, not gathered from response_mask: a clamped index of a row whose prompt is longer
        # (another image layout or prompt text) but whose response is shorter would land on its own last token again.
        mask = torch.arange(width, device=resp.device).unsqueeze(0) < resp.sum(dim=1, keepdim=True)
        logits = torch.gather(logits, 1, idx.unsqueeze(-1).expand(-1, -1, logits.shape[-1]))
        logps = torch.gather(logits, 2, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)
        logps = logps * mask
        return logps, mask, (logits if return_logits else None)

    def sequence_logps(self, batch: EncodedBatch, **kwargs: Any) -> Tensor:
        """Summed response log-probs ``(B,)``."""
        logps, _, _ = self.token_logps(batch, **kwargs)
        return logps.sum(dim=1)

    def branch_logps(
        self, branches: Sequence[EncodedBatch], *, rhos: Sequence[float] | None = None,
        generator: torch.Generator | None = None, return_logits: bool = False,
    ) -> list[tuple[Tensor, Tensor, Tensor | None]]:
        """Score several branches (e.g. chosen | rejected | chosen-under-retrieved-image) in ONE forward pass.

        Every branch keeps its own images; ``rhos[k]`` hides image tokens of branch ``k``. Returns per branch
        ``(token logps (B, L_k), mask (B, L_k), logits or None)``, ``L_k`` = longest response of branch ``k``.
        """
        if rhos is not None and len(rhos) != len(branches):
            raise ValueError(f"rhos must have one value per branch ({len(branches)}), got {len(rhos)}")
        cat = concat_batches(branches)
        sizes = [len(b) for b in branches]
        rho: float | Tensor = 0.0
        if rhos is not None and any(r > 0 for r in rhos):
            rho = torch.cat([torch.full((n,), float(r)) for n, r in zip(sizes, rhos)])
        feats = self._shared_image_features(branches)
        logps, mask, logits = self.token_logps(cat, rho=rho, generator=generator, return_logits=return_logits,
                                               image_features=feats)
        out, start = [], 0
        for n, b in zip(sizes, branches):
            sl = slice(start, start + n)
            width = int(b.response_mask.sum(dim=1).max())
            out.append((logps[sl, :width], mask[sl, :width], logits[sl, :width] if logits is not None else None))
            start += n
        return out

    def _shared_image_features(self, branches: Sequence[EncodedBatch]) -> Tensor | None:
        """Encode the images once when every branch carries the same vision inputs (same-image DPO).

        Mathematically identical to encoding them per branch (the gradient reaches the vision tower once, summed
        over branches) but runs the vision tower on half (or a third) of the images. Only for families whose
        forward merely splices image features into placeholder embeddings (``_SPLICE_FAMILIES``); others (e.g.
        Qwen2-VL, whose 3-D rotary positions need the image grid) take the plain path. Off when the model is wrapped
        in DDP / DataParallel: the vision tower would run outside the wrapper's ``forward``, where its gradient
        bookkeeping cannot see it, so every branch encodes its images inside the wrapped forward instead.
        """
        if not self.share_images or len(branches) < 2 or _is_replicating_wrapper(self.model):
            return None
        model = self.base_model
        if getattr(model.config, "model_type", None) not in _SPLICE_FAMILIES:
            return None
        first = branches[0].vision
        if "pixel_values" not in first or any(b.extra_tokens for b in branches):
            return None
        for b in branches[1:]:
            if set(b.vision) != set(first) or any(
                    b.vision[k].shape != v.shape or not torch.equal(b.vision[k], v) for k, v in first.items()):
                return None
        feats = model.get_image_features(**first)
        feats = getattr(feats, "pooler_output", feats)
        feats = torch.cat([f.reshape(-1, f.shape[-1]) for f in feats], dim=0) if isinstance(feats, (list, tuple)) \
            else feats.reshape(-1, feats.shape[-1])
        return torch.cat([feats] * len(branches), dim=0)

    @contextlib.contextmanager
    def eval_mode(self) -> Iterator[None]:
        """Context in which the model is in eval mode (no dropout); the previous mode is restored afterwards."""
        was_training = self.model.training
        self.model.eval()
        try:
            yield
        finally:
            self.model.train(was_training)

    @torch.no_grad()
    def next_token_logits(self, examples: Sequence[VLExample]) -> Tensor:
        """``(B, V)`` logits of the token that follows ``prompt + response`` of each example (eval mode, no grad).

        They are the logits at the EOS slot ``encode`` appends; a tokenizer without EOS gets a padding slot there
        instead (its logits depend only on the tokens before it).
        """
        batch = self.encode(examples)
        if self.tokenizer.eos_token_id is None:
            batch = _append_slot(batch, self._pad_id())
        batch = batch.to(next(self.model.parameters()).device)
        with self.eval_mode():
            _, mask, logits = self.token_logps(batch, return_logits=True)
        last = mask.sum(dim=1) - 1  # the EOS slot encode() appended: its logits predict the next token
        return logits[torch.arange(len(batch)), last]

    @contextlib.contextmanager
    def reference(self) -> Iterator[None]:
        """Context in which the model acts as the reference policy: LoRA disabled, no grad, eval mode."""
        if not hasattr(self.model, "disable_adapter"):
            raise ValueError("reference() needs a peft model (LoRA); without LoRA use precomputed reference log-probs")
        with self.eval_mode(), self.model.disable_adapter(), torch.no_grad():
            yield

    # ----------------------------------------------------------------------------------------- generation
    def generate(self, examples: Sequence[VLExample], *, max_new_tokens: int = 24, rho: float = 0.0,
                 generator: torch.Generator | None = None, temperature: float = 0.0,
                 stop_words: Sequence[str] = ()) -> list[str]:
        """Continue ``prompt + response`` of each example; see :func:`mmalign.vision_lm.generation.generate`."""
        from mmalign.vision_lm.generation import generate

        return generate(self, examples, max_new_tokens=max_new_tokens, rho=rho, generator=generator,
                        temperature=temperature, stop_words=stop_words)
