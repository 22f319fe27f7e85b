"""Generation with a :class:`~mmalign.vision_lm.adapter.VLMAdapter`: KV-cached greedy or sampled decoding that
keeps image tokens hidden (BDHS), M-RoPE positions, and lockstep decoding when parameters are sharded."""

from __future__ import annotations

from typing import Any, Sequence

import torch

from mmalign.vision_lm.adapter import VLExample, VLMAdapter, _is_replicating_wrapper, hide_image_tokens

__all__ = ["generate"]


@torch.no_grad()
def generate(
    adapter: VLMAdapter, examples: Sequence[VLExample], *, max_new_tokens: int = 24, rho: float = 0.0,
    generator: torch.Generator | None = None, temperature: float = 0.0, stop_words: Sequence[str] = (),
) -> list[str]:
    """Continue ``prompt + response`` of each example (greedy, or sampled with ``generator`` at ``temperature``).

    ``rho > 0`` hides image tokens during the whole generation (BDHS). Stops at EOS or after a stop word; returns
    the generated continuation text only. Uses the model's KV cache; the hidden-token mask is carried along.
    """
    batch = adapter.encode(examples)
    # DDP / DataParallel: generate with the module itself (no gradients; the wrapper's forward would run a
    # collective buffer broadcast per token, and processes generate different numbers of tokens)
    model = adapter.model.module if _is_replicating_wrapper(adapter.model) else adapter.model
    dev = next(model.parameters()).device
    batch = batch.to(dev)
    eos = adapter.tokenizer.eos_token_id
    # Drop the EOS encode() appended (only where it did: a tokenizer without EOS gets none), left-pad so every
    # row continues at the last column.
    lengths = batch.attention_mask.sum(1)
    if eos is not None:
        last_tok = batch.input_ids[torch.arange(len(batch), device=dev), lengths - 1]
        lengths = lengths - (last_tok == eos).long()
    width = int(lengths.max())
    pad = adapter._pad_id()
    ids = torch.full((len(batch), width), pad, dtype=torch.long, device=dev)
    attn = torch.zeros_like(ids)
    extra = {k: torch.zeros((len(batch), width), dtype=v.dtype, device=dev) for k, v in batch.extra_tokens.items()}
    for i, n in enumerate(lengths.tolist()):
        ids[i, width - n:] = batch.input_ids[i, :n]
        attn[i, width - n:] = 1
        for k, v in batch.extra_tokens.items():
            extra[k][i, width - n:] = v[i, :n]
    # Positions follow the real (unpadded) tokens, as in training; hidden image tokens keep their positions.
    # M-RoPE models (Qwen2-VL ...): the model's own 3-D layout of the unhidden sequence, then +1 per new token
    # on all three axes (what the model itself does with its rope deltas). Others: the 2-D cumsum, only
    # needed (and only passed) when rows are left-padded to different lengths.
    position_ids = adapter.mrope_position_ids(ids, attn, batch.vision, extra)
    mrope = position_ids is not None
    if not mrope and bool((attn == 0).any()):
        position_ids = (attn.cumsum(1) - 1).clamp(min=0)
    attn = hide_image_tokens(ids, attn, adapter.image_token_ids, rho, generator) if rho > 0 else attn
    stop_ids = {adapter.tokenizer.convert_tokens_to_ids(w) for w in stop_words}
    # sharded parameters (FSDP2, ZeRO-3) are gathered collectively in every forward: all processes keep stepping
    # until every one of them is done (finished rows only append padding), as HF's synced_gpus does
    from mmalign.train.fsdp import all_ranks_ok, runs_in_lockstep

    lockstep = runs_in_lockstep(model)
    out = torch.full((len(batch), max_new_tokens), -1, dtype=torch.long, device=dev)  # -1: nothing generated
    done = torch.zeros(len(batch), dtype=torch.bool, device=dev)
    past, step_ids = None, ids
    with adapter.eval_mode():
        for t in range(max_new_tokens):
            inputs: dict[str, Any] = {"input_ids": step_ids, "attention_mask": attn, "use_cache": True}
            if past is None:
                inputs.update(batch.vision)
                inputs.update(extra)
            else:
                inputs["past_key_values"] = past
            if position_ids is not None:
                inputs["position_ids"] = position_ids
            res = model(**inputs)
            past = res.past_key_values
            logits = res.logits[:, -1].float()
            if temperature > 0:
                probs = torch.softmax(logits / temperature, dim=-1).cpu()
                nxt = torch.multinomial(probs, 1, generator=generator).squeeze(1).to(dev)
            else:
                nxt = logits.argmax(-1)
            out[:, t] = torch.where(done, torch.full_like(nxt, -1), nxt)
            nxt = torch.where(done, torch.full_like(nxt, pad), nxt)  # finished rows only append padding
            if eos is not None:
                done |= nxt == eos
            for s in stop_ids:
                done |= nxt == s
            finished = bool(done.all())
            if lockstep:  # every process must agree, or the ones still generating wait forever
                finished = all_ranks_ok(finished, dev)
            if finished:
                break
            step_ids = nxt.unsqueeze(1)
            attn = torch.cat([attn, torch.ones_like(step_ids)], dim=1)
            if position_ids is not None:
                if mrope:  # next position = the largest one so far + 1, on every axis
                    nxt_pos = position_ids.amax(dim=(0, 2), keepdim=True) + 1  # (1, B, 1)
                    position_ids = nxt_pos.expand(position_ids.shape[0], -1, -1)
                else:
                    position_ids = position_ids[:, -1:] + 1
    stop_at = {eos, adapter.tokenizer.pad_token_id} - {None}
    texts = []
    for row in out.tolist():
        toks = []
        for tok in row:
            if tok < 0 or tok in stop_at:
                break
            toks.append(tok)
            if tok in stop_ids:
                break
        texts.append(adapter.tokenizer.decode(toks, skip_special_tokens=True).strip())
    return texts
