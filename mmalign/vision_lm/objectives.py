"""Preference pairs -> batches -> core losses: the glue between the VLM adapter and ``mmalign.core.losses``.

``PairCollator`` decodes each batch's images (pairs hold :class:`~mmalign.data.LazyImage` references, never decoded
pixels), encodes chosen / rejected (/ chosen-under-retrieved-image) branches, each with its own images, and attaches
labels, RRPO segment ids and cached reference log-probs. ``PreferenceObjective`` is the trainer's
``loss_fn(model, batch)``: one concatenated policy forward, reference log-probs from the cache or from the same
model with LoRA disabled, optional online BDHS regeneration, then the core loss looked up by name in
:data:`mmalign.registry.LOSSES`.

Methods: ``realign`` and ``rrpo`` (which need a third branch or token-level inputs) and every registered loss with
the pairwise signature ``fn(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, *,
...)`` (``dpo``, ``ipo``, ``cdpo``, ``robust_dpo`` and any loss a user registers): keyword options it declares among
``beta``, ``eps``, ``chosen_lengths`` and ``rejected_lengths`` are passed. Labels: a pair with label ``l`` < 0.5 was
swapped when loaded (so ``l`` >= 0.5 here); a soft label trains ``l · loss(chosen, rejected) + (1 − l) ·
loss(rejected, chosen)`` per pair (for DPO: binary cross-entropy against the soft target ``l``), which needs the
loss's ``reduction="none"``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from mmalign.train.fsdp import unwrap_model
from mmalign.vision_lm.adapter import EncodedBatch, VLExample, VLMAdapter

__all__ = ["PrefPair", "PairCollator", "PreferenceObjective", "METHODS", "segments_for", "pairwise_loss",
           "check_method"]

METHODS = ("dpo", "ipo", "cdpo", "robust_dpo", "realign", "rrpo")  # the built-in ones; any pairwise loss works
_SPECIAL = ("realign", "rrpo")
_PAIRWISE = ("policy_chosen_logps", "policy_rejected_logps", "ref_chosen_logps", "ref_rejected_logps")
_OPTIONS = ("beta", "eps", "chosen_lengths", "rejected_lengths")


def pairwise_loss(method: str) -> Callable[..., tuple[Tensor, dict[str, Any]]]:
    """The registered loss ``method`` if it has the pairwise signature (see the module docstring), else raise."""
    import inspect

    from mmalign.registry import LOSSES

    if method not in LOSSES:
        raise ValueError(f"method {method!r} is not a registered loss; registered: {', '.join(LOSSES.names())}")
    fn = LOSSES.get(method)
    names = list(inspect.signature(fn).parameters)[:4]
    if tuple(names) != _PAIRWISE:
        raise ValueError(f"loss {method!r} takes ({', '.join(names)}, ...), not the pairwise sequence log-probs "
                         f"({', '.join(_PAIRWISE)}) a VLM method needs; VLM methods: realign, rrpo or a pairwise loss")
    return fn


def check_method(method: str) -> None:
    """Raise unless ``method`` is usable by the VLM objective."""
    if method not in _SPECIAL:
        pairwise_loss(method)


def _takes(fn: Callable[..., Any], name: str) -> bool:
    import inspect

    return name in inspect.signature(fn).parameters


@dataclass
class PrefPair:
    """One preference pair. ``rejected_images`` (default: ``images``) gives the rejected branch its own images;
    ``retrieved_images`` adds Re-Align's visual branch (chosen answer under the retrieved image). Segment ids are
    RRPO's phrase tags per response token (without EOS); ``None`` = computed from a token diff."""

    prompt: str
    chosen: str
    rejected: str
    images: list[Any] = field(default_factory=list)
    rejected_images: list[Any] | None = None
    retrieved_images: list[Any] | None = None
    chosen_segments: list[int] | None = None
    rejected_segments: list[int] | None = None
    label: float = 1.0  # P(chosen ≻ rejected) in [0.5, 1] (pairs with a lower label are loaded swapped)
    videos: list[Any] | None = None  # per video: a list of frames (or an array), for processors that take videos


def segments_for(tokenizer: Any, pair: PrefPair) -> tuple[list[int], list[int]]:
    """RRPO segment ids of a pair: supplied ones, or a diff over the tokenized responses."""
    from mmalign.vision_lm.methods import diff_segments

    if pair.chosen_segments is not None and pair.rejected_segments is not None:
        return list(pair.chosen_segments), list(pair.rejected_segments)
    c = tokenizer(pair.chosen, add_special_tokens=False)["input_ids"]
    r = tokenizer(pair.rejected, add_special_tokens=False)["input_ids"]
    return diff_segments(c, r)


def _pad_rows(rows: Sequence[Sequence[float]], width: int, dtype: torch.dtype) -> Tensor:
    out = torch.zeros(len(rows), width, dtype=dtype)
    for i, r in enumerate(rows):
        n = min(len(r), width)
        out[i, :n] = torch.as_tensor(list(r)[:n], dtype=dtype)
    return out


class PairCollator:
    """Turns a list of ``(index, PrefPair)`` into a batch dict of encoded branches (+ segments, + cached refs)."""

    def __init__(self, adapter: VLMAdapter, *, with_retrieved: bool = False, with_segments: bool = False,
                 ref_cache: dict[str, Tensor] | None = None, keep_raw: bool = False) -> None:
        self.adapter = adapter
        self.with_retrieved = with_retrieved
        self.with_segments = with_segments
        self.ref_cache = ref_cache
        self.keep_raw = keep_raw

    def __call__(self, items: Sequence[tuple[int, PrefPair]]) -> dict[str, Any]:
        idx = [i for i, _ in items]
        pairs = [decoded(p) for _, p in items]
        enc = self.adapter.encode
        chosen = enc([VLExample(p.prompt, p.chosen, p.images, p.videos) for p in pairs])
        rejected = enc([VLExample(p.prompt, p.rejected, p.rejected_images if p.rejected_images is not None
                                  else p.images, p.videos) for p in pairs])
        if len(chosen) != len(pairs) or len(rejected) != len(pairs):
            raise ValueError("an example was dropped as too long; filter pairs with VLMAdapter.encode before training")
        batch: dict[str, Any] = {"index": torch.tensor(idx), "chosen": chosen, "rejected": rejected,
                                 "labels": torch.tensor([float(p.label) for p in pairs])}
        if self.with_retrieved:
            if any(p.retrieved_images is None for p in pairs):
                raise ValueError("method 'realign' needs retrieved_images on every pair")
            batch["retrieved"] = enc([VLExample(p.prompt, p.chosen, p.retrieved_images) for p in pairs])
        if self.with_segments:
            segs = [segments_for(self.adapter.tokenizer, p) for p in pairs]
            batch["chosen_segments"] = _pad_rows([s[0] for s in segs], chosen.response_mask.sum(1).max().item(),
                                                 torch.long)
            batch["rejected_segments"] = _pad_rows([s[1] for s in segs], rejected.response_mask.sum(1).max().item(),
                                                   torch.long)
        if self.ref_cache is not None:
            ids = batch["index"]
            for key, val in self.ref_cache.items():
                branch = key.split("/")[0]  # "chosen/tokens" -> width of the chosen branch
                ref = val[ids]
                if ref.ndim >= 2:
                    ref = ref[:, : int(batch[branch].response_mask.sum(1).max())]
                batch[f"ref/{key}"] = ref
        if self.keep_raw:
            batch["raw"] = _Raw(pairs)
        return batch


def decoded(pair: PrefPair) -> PrefPair:
    """``pair`` with its lazy images decoded (a new object: the data set keeps only the references)."""
    from dataclasses import replace

    from mmalign.data.media import load_images

    videos = None if pair.videos is None else [load_images(v) if isinstance(v, list) else v for v in pair.videos]
    return replace(pair, images=load_images(pair.images) or [], rejected_images=load_images(pair.rejected_images),
                   retrieved_images=load_images(pair.retrieved_images), videos=videos)


class _Raw:
    """Un-encoded pairs carried through ``send_to_device`` untouched (online BDHS regenerates from them)."""

    def __init__(self, pairs: list[PrefPair]) -> None:
        self.pairs = pairs

    def to(self, *args: Any, **kwargs: Any) -> "_Raw":
        return self


class PreferenceObjective:
    """``loss_fn(model, batch) -> (loss, metrics)`` for DPO / IPO / cDPO / robust DPO / Re-Align / RRPO.

    Reference log-probs come from ``batch["ref/..."]`` (precomputed cache) when present, else from the same model
    with LoRA disabled. ``online`` (a callable ``(adapter, pairs) -> list[str]``) regenerates the rejected answers
    of a random subset of rows (each with probability ``online_prob``; 1.0 = fully online BDHS, 0.5 = Mixed-DPO)
    from the current policy before scoring (in step across processes when the parameters are sharded).
    """

    def __init__(self, adapter: VLMAdapter, method: str = "dpo", *, beta: float = 0.1, eps: float = 0.1,
                 alpha: float = 0.01, visual_weight: float = 1.0,
                 online: Callable[[VLMAdapter, list[PrefPair]], list[str]] | None = None, online_prob: float = 1.0,
                 seed: int = 0) -> None:
        check_method(method)
        if not 0 <= online_prob <= 1:
            raise ValueError(f"online_prob must be in [0, 1], got {online_prob}")
        self.adapter, self.method = adapter, method
        self.beta, self.eps, self.alpha, self.visual_weight = beta, eps, alpha, visual_weight
        self.online, self.online_prob = online, online_prob
        self.rng = np.random.default_rng(seed)

    def _regenerate(self, batch: dict[str, Any]) -> dict[str, Any]:
        from dataclasses import replace

        pairs: list[PrefPair] = batch["raw"].pairs
        rows = [i for i in range(len(pairs)) if self.rng.random() < self.online_prob]
        new = self._generate_in_step([pairs[i] for i in rows])
        if not rows:
            return batch
        updated = list(pairs)
        for i, text in zip(rows, new):
            p = updated[i]
            # the supplied phrase ids (if any) described the old rejected answer: the new pair has none, so RRPO's
            # segments below come from a token diff of chosen vs the regenerated answer
            updated[i] = replace(p, rejected=text, chosen_segments=None, rejected_segments=None)
        rejected = self.adapter.encode([VLExample(p.prompt, p.rejected, p.rejected_images if p.rejected_images
                                                  is not None else p.images) for p in updated])
        dev = batch["chosen"].input_ids.device
        out = {**batch, "rejected": rejected.to(dev), "raw": _Raw(updated)}
        if "chosen_segments" in batch or "rejected_segments" in batch:  # RRPO: phrase ids of the new pairs
            segs = [segments_for(self.adapter.tokenizer, p) for p in updated]
            out["chosen_segments"] = _pad_rows([c for c, _ in segs], int(batch["chosen"].response_mask.sum(1).max()),
                                               torch.long).to(dev)
            out["rejected_segments"] = _pad_rows([r for _, r in segs], int(rejected.response_mask.sum(1).max()),
                                                 torch.long).to(dev)
        return out

    def _generate_in_step(self, todo: list[PrefPair]) -> list[str]:
        """Regenerate the rejected answers of ``todo`` (possibly none) with ``self.online``.

        With parameters sharded over processes (FSDP2, ZeRO-3) every forward is a collective, but BDHS makes a
        data-dependent number of generate calls. So every process regenerates the union of all processes' rows, in
        rank order (the same inputs and the same seeded random streams give the same calls everywhere), and keeps its
        own slice: sharding trades the redundant generation for memory.
        """
        from mmalign.train.fsdp import runs_in_lockstep

        if not runs_in_lockstep(self.adapter.model):
            return self.online(self.adapter, todo) if todo else []  # type: ignore[misc]
        import torch.distributed as dist

        gathered: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, todo)
        union = [p for part in gathered for p in part]
        if not union:
            return []
        new = self.online(self.adapter, union)  # type: ignore[misc]
        start = sum(len(part) for part in gathered[: dist.get_rank()])
        return new[start:start + len(todo)]

    def _hard_labels_only(self, labels: Tensor | None) -> None:
        if labels is not None and bool((labels < 1).any()):
            raise ValueError(f"method {self.method!r} has no soft-label form: labels must be 0 or 1")

    def _pairwise(self, pol: list[Tensor], ref: list[Tensor], lengths: tuple[Tensor, Tensor],
                  labels: Tensor | None) -> tuple[Tensor, dict[str, Any]]:
        """The registered pairwise loss; soft labels mix both orderings per pair (see the module docstring)."""
        fn = pairwise_loss(self.method)
        values = {"beta": self.beta, "eps": self.eps, "chosen_lengths": lengths[0], "rejected_lengths": lengths[1]}
        kw = {k: v for k, v in values.items() if _takes(fn, k)}
        if labels is None or bool((labels >= 1).all()):
            return fn(pol[0], pol[1], ref[0], ref[1], **kw)
        if not _takes(fn, "reduction"):
            raise ValueError(f"loss {self.method!r} takes no reduction argument, so soft labels cannot weight it "
                             "per pair: use labels 0 or 1")
        swapped = {**kw, **({"chosen_lengths": lengths[1], "rejected_lengths": lengths[0]}
                            if "chosen_lengths" in kw else {})}
        forward, metrics = fn(pol[0], pol[1], ref[0], ref[1], **kw, reduction="none")
        backward, _ = fn(pol[1], pol[0], ref[1], ref[0], **swapped, reduction="none")
        labels = labels.to(forward.dtype)
        return (labels * forward + (1 - labels) * backward).mean(), metrics

    def _scores(self, branches: list[EncodedBatch], kl: bool) -> list[tuple[Tensor, Tensor, Tensor | None]]:
        return self.adapter.branch_logps(branches, return_logits=kl)

    def __call__(self, model: Any, batch: dict[str, Any]) -> tuple[Tensor, dict[str, Any]]:
        from mmalign.core.losses import realign as realign_mod, rrpo as rrpo_mod

        # the adapter calls the (possibly DDP-wrapped) model's forward and reads config / helpers from the module
        # inside it; with a DDP wrapper it encodes images inside the wrapped forward (no shared-feature shortcut)
        self.adapter.model = model
        if self.online is not None:
            batch = self._regenerate(batch)
            batch = {k: v for k, v in batch.items() if not k.startswith("ref/")}  # refs of old rejecteds are stale
        names = ["chosen", "rejected"] + (["retrieved"] if self.method == "realign" else [])
        branches = [batch[n] for n in names]
        kl = self.method == "rrpo"
        if all(f"ref/{n}/tokens" in batch for n in names) and (not kl or "ref/chosen/logprobs" in batch):
            ref_tokens = [batch[f"ref/{n}/tokens"] for n in names]
            ref_chosen_lp = batch.get("ref/chosen/logprobs")
        else:
            # the reference pass (no grad) runs before the policy pass: its transient activations are freed before
            # the policy's saved activations build up, instead of adding to their peak
            self.adapter.model = unwrap_model(model)
            with self.adapter.reference():
                ref = self._scores(branches, kl)
            self.adapter.model = model
            ref_tokens = [r[0] for r in ref]
            ref_chosen_lp = torch.log_softmax(ref[0][2], -1) if kl else None
            del ref
        policy = self._scores(branches, kl)
        pol_sum = [p[0].sum(1) for p in policy]
        ref_sum = [r.sum(1) for r in ref_tokens]
        labels = batch.get("labels")
        if self.method == "realign":
            self._hard_labels_only(labels)
            loss, metrics = realign_mod.realign_loss(pol_sum[0], pol_sum[1], pol_sum[2], ref_sum[0], ref_sum[1],
                                                     ref_sum[2], beta=self.beta, visual_weight=self.visual_weight)
        elif self.method == "rrpo":
            self._hard_labels_only(labels)
            (pc, mc, logits_c), (pr, _, _) = policy
            token_kl = rrpo_mod.tokenwise_kl(ref_chosen_lp, torch.log_softmax(logits_c, -1), mc)
            loss, metrics = rrpo_mod.rrpo_loss(
                pc, pr, ref_tokens[0], ref_tokens[1], batch["chosen_segments"][:, : pc.shape[1]],
                batch["rejected_segments"][:, : pr.shape[1]], token_kl, beta=self.beta, alpha=self.alpha,
                chosen_mask=mc)
        else:
            lengths = (policy[0][1].sum(1), policy[1][1].sum(1))
            loss, metrics = self._pairwise(pol_sum, ref_sum, lengths, labels)
        return loss, metrics
