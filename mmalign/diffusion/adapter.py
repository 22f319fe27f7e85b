"""Diffusion adapter: turns a diffusers UNet + a batch of (chosen, rejected) latents into per-sample denoising errors.

Works with any ``UNet2DConditionModel`` (SD 1.x/2.x, SDXL with ``added_cond_kwargs``, the tiny pixel-space UNet of
the offline benchmark), optionally wrapped by peft LoRA. As in the official Diffusion-DPO and MaPO code, the two
images of a pair share one noise draw and one timestep and go through the network in one concatenated ``2B`` forward;
the per-sample errors (mean over C, H, W) are what the core losses in :mod:`mmalign.core.losses` consume.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
from torch import Tensor


__all__ = [
    "PairBatch",
    "check_pair_batch",
    "paired_noise_and_timesteps",
    "training_target",
    "unet_forward",
    "denoising_errors",
    "pair_denoising_errors",
    "reference_context",
    "reference_pair_errors",
    "conditioned",
    "add_lora",
    "LORA_TARGETS",
    "SFT",
    "diffusion_loss",
    "loss_needs_reference",
    "loss_options",
    "make_loss_fn",
]

LORA_TARGETS: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")


@dataclass
class PairBatch:
    """One batch of preference pairs in model space (VAE latents, or pixels for a pixel-space UNet).

    chosen, rejected: ``[B, C, H, W]``; encoder_hidden_states: ``[B, L, D]`` (precomputed text embeddings);
    text_embeds ``[B, P]`` and time_ids ``[B, 6]``: SDXL's added conditioning (both or neither); label ``[B]``:
    P(chosen ≻ rejected) in [0.5, 1] where not 1 (kept ties: 0.5), the weight of the pair's first ordering.
    """

    chosen: Tensor
    rejected: Tensor
    encoder_hidden_states: Tensor
    text_embeds: Tensor | None = None
    time_ids: Tensor | None = None
    label: Tensor | None = None
    captions: list[str] | None = None  # prompts, when the loss encodes them itself (text encoders in training)

    @classmethod
    def from_mapping(cls, batch: dict[str, Tensor]) -> "PairBatch":
        needed = ("chosen", "rejected") if "captions" in batch else ("chosen", "rejected", "encoder_hidden_states")
        missing = [k for k in needed if k not in batch]
        if missing:
            raise ValueError(f"batch must hold keys chosen, rejected, encoder_hidden_states; missing {missing}")
        return cls(batch["chosen"], batch["rejected"], batch.get("encoder_hidden_states"),  # type: ignore[arg-type]
                   batch.get("text_embeds"), batch.get("time_ids"), batch.get("label"), batch.get("captions"))

    def added_cond_kwargs(self) -> dict[str, Tensor] | None:
        if self.text_embeds is None:
            return None
        return {"text_embeds": self.text_embeds, "time_ids": self.time_ids}  # type: ignore[dict-item]


def check_pair_batch(batch: PairBatch) -> None:
    """Raise ``ValueError`` naming the offending field when a pair batch is malformed (before any forward)."""
    c, r, e = batch.chosen, batch.rejected, batch.encoder_hidden_states
    if c.ndim != 4:
        raise ValueError(f"chosen must be [B, C, H, W], got shape {tuple(c.shape)}")
    if r.shape != c.shape:
        raise ValueError(f"rejected must have the shape of chosen {tuple(c.shape)}, got {tuple(r.shape)} "
                         "(size-mismatched pair: resize or crop both images to one resolution)")
    if e.ndim != 3 or e.shape[0] != c.shape[0]:
        raise ValueError(f"encoder_hidden_states must be [B={c.shape[0]}, L, D], got shape {tuple(e.shape)}")
    for name, t in (("chosen", c), ("rejected", r), ("encoder_hidden_states", e)):
        if not torch.isfinite(t).all():
            raise ValueError(f"{name} holds non-finite values (corrupt image or latent)")
    if batch.label is not None and (batch.label.shape != (c.shape[0],) or not bool(
            ((batch.label >= 0.5) & (batch.label <= 1)).all())):
        raise ValueError(f"label must be [B={c.shape[0]}] with P(chosen > rejected) in [0.5, 1] (pairs ordered "
                         f"chosen-first), got shape {tuple(batch.label.shape)}")
    if (batch.text_embeds is None) != (batch.time_ids is None):
        raise ValueError("text_embeds and time_ids (SDXL added conditioning) must be given together, got only one")
    if batch.text_embeds is not None:
        if batch.text_embeds.ndim != 2 or batch.text_embeds.shape[0] != c.shape[0]:
            raise ValueError(f"text_embeds must be [B={c.shape[0]}, P], got shape {tuple(batch.text_embeds.shape)}")
        if batch.time_ids is None or batch.time_ids.shape != (c.shape[0], 6):
            got = None if batch.time_ids is None else tuple(batch.time_ids.shape)
            raise ValueError(f"time_ids must be [B={c.shape[0]}, 6], got shape {got}")


def paired_noise_and_timesteps(
    like: Tensor, num_train_timesteps: int, generator: torch.Generator | None = None,
    timesteps: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """One noise draw ``[B, C, H, W]`` and one timestep ``[B]`` per pair (to be repeated for chosen and rejected)."""
    noise = torch.randn(like.shape, generator=generator, dtype=torch.float32).to(like.device, like.dtype)
    if timesteps is None:
        timesteps = torch.randint(0, num_train_timesteps, (like.shape[0],), generator=generator)
    return noise, timesteps.to(like.device).long()


def training_target(scheduler: Any, x0: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
    """What the UNet regresses: ε (epsilon), ``scheduler.get_velocity`` (v_prediction) or x0 (sample)."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(x0, noise, timesteps)
    if kind == "sample":
        return x0
    raise ValueError(f"scheduler prediction_type must be epsilon, v_prediction or sample, got {kind!r}")


def unet_forward(model: torch.nn.Module, noisy: Tensor, timesteps: Tensor, hidden: Tensor,
                 added: dict[str, Tensor] | None) -> Tensor:
    kwargs: dict[str, Any] = {"encoder_hidden_states": hidden, "return_dict": False}
    if added is not None:
        kwargs["added_cond_kwargs"] = added
    return model(noisy, timesteps, **kwargs)[0]


def denoising_errors(model: torch.nn.Module, scheduler: Any, x0: Tensor, noise: Tensor, timesteps: Tensor,
                     hidden: Tensor, added: dict[str, Tensor] | None = None) -> Tensor:
    """Per-sample denoising error ``mean_{C,H,W} (model_pred - target)^2`` ``[N]`` (float32)."""
    noisy = scheduler.add_noise(x0, noise, timesteps)
    pred = unet_forward(model, noisy, timesteps, hidden, added)
    target = training_target(scheduler, x0, noise, timesteps)
    return (pred.float() - target.float()).pow(2).mean(dim=tuple(range(1, pred.ndim)))


def _doubled(batch: PairBatch, noise: Tensor, timesteps: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Any]:
    x0 = torch.cat([batch.chosen, batch.rejected], dim=0)
    added = batch.added_cond_kwargs()
    if added is not None:
        added = {k: v.repeat(2, *([1] * (v.ndim - 1))) for k, v in added.items()}
    hidden = batch.encoder_hidden_states.repeat(2, 1, 1)
    return x0, noise.repeat(2, 1, 1, 1), timesteps.repeat(2), hidden, added


Embed = Callable[[torch.nn.Module, Any], dict[str, Tensor]]


def conditioned(batch: PairBatch, module: torch.nn.Module, embed: Embed | None) -> PairBatch:
    """``batch`` with its prompt conditioning encoded by ``module``'s text encoders (``embed``), or as it is."""
    if embed is None:
        return batch
    if batch.captions is None:
        raise ValueError("the loss encodes prompts itself (text encoders in training) but the batch has no captions")
    cond = embed(module, batch.captions)
    return dataclasses.replace(batch, encoder_hidden_states=cond["encoder_hidden_states"],
                               text_embeds=cond.get("text_embeds", batch.text_embeds))


def pair_denoising_errors(model: torch.nn.Module, scheduler: Any, batch: PairBatch, noise: Tensor,
                          timesteps: Tensor) -> tuple[Tensor, Tensor]:
    """Errors ``(err_chosen [B], err_rejected [B])`` from ONE forward over ``[chosen; rejected]`` with shared (ε, t)."""
    x0, n2, t2, hidden, added = _doubled(batch, noise, timesteps)
    err = denoising_errors(model, scheduler, x0, n2, t2, hidden, added)
    return err.chunk(2)


@contextlib.contextmanager
def reference_context(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Yield the reference network of a LoRA-wrapped ``model``: the same weights with adapters disabled."""
    from mmalign.train.fsdp import unwrap_model

    # DDP / accelerate wrappers hide peft's disable_adapter: toggle on the inner module
    inner = unwrap_model(model)
    if hasattr(inner, "disable_adapter"):  # peft.PeftModel
        with inner.disable_adapter():
            yield inner
        return
    raise ValueError("model has no LoRA adapters to disable; pass a frozen reference copy (ref_model) for full "
                     "fine-tuning, or wrap the model with peft LoRA")


@torch.no_grad()
def reference_pair_errors(model: torch.nn.Module, ref_model: torch.nn.Module | None, scheduler: Any,
                          batch: PairBatch, noise: Tensor, timesteps: Tensor,
                          embed: Embed | None = None) -> tuple[Tensor, Tensor]:
    """Reference errors on the same (ε, t): ``ref_model`` if given (frozen copy), else ``model`` with LoRA off.

    With ``embed`` the prompts are encoded by the reference's own text encoders (the copy's, or LoRA disabled).
    """
    if ref_model is not None:
        return pair_denoising_errors(ref_model, scheduler, conditioned(batch, ref_model, embed), noise, timesteps)
    with reference_context(model) as ref:
        return pair_denoising_errors(ref, scheduler, conditioned(batch, ref, embed), noise, timesteps)


def add_lora(model: torch.nn.Module, r: int = 8, alpha: float | None = None,
             target_modules: tuple[str, ...] = LORA_TARGETS, dropout: float = 0.0, seed: int = 0) -> torch.nn.Module:
    """:func:`mmalign.train.lora.add_lora` with the diffusion defaults: the attention projections, Gaussian init
    (as diffusers' DPO script). Only the adapters train; ``reference_context(model)`` gives the untouched base."""
    from mmalign.train.lora import add_lora as lora

    return lora(model, r=r, alpha=alpha, dropout=dropout, target_modules=target_modules, seed=seed, init="gaussian")


SFT = "sft"  # not a preference loss: denoising on the chosen image only, the SFT-on-chosen baseline
_ERR_ARGS = ("model_err_chosen", "model_err_rejected")
_REF_ARGS = ("ref_err_chosen", "ref_err_rejected")


def diffusion_loss(method: str) -> tuple[Callable[..., Any], bool]:
    """The registered loss ``method`` (:data:`mmalign.registry.LOSSES`) and whether it needs reference errors.

    A diffusion loss is a pure function of per-sample denoising errors: it takes ``model_err_chosen`` and
    ``model_err_rejected`` ``[B]`` and, if it needs a reference, ``ref_err_chosen`` and ``ref_err_rejected``; its
    other keyword arguments are hyper-parameters. Raises ``ValueError`` naming the method and what is expected.
    """
    import inspect

    from mmalign.registry import LOSSES

    if method not in LOSSES:
        raise ValueError(f"method {method!r} is neither {SFT!r} nor a registered loss; registered: {LOSSES.names()}")
    fn = LOSSES.get(method)
    params = inspect.signature(fn).parameters
    if not all(a in params for a in _ERR_ARGS):
        raise ValueError(f"loss {method!r} does not take per-sample denoising errors ({', '.join(_ERR_ARGS)}): it "
                         f"is not a diffusion loss; takes {list(params)}")
    return fn, all(a in params for a in _REF_ARGS)


def loss_needs_reference(method: str) -> bool:
    """Whether ``method`` compares against a reference network (Diffusion-DPO: yes; MaPO and SFT: no)."""
    return method != SFT and diffusion_loss(method)[1]


def loss_options(method: str, options: dict[str, Any]) -> dict[str, Any]:
    """The entries of ``options`` that the loss ``method`` takes as keyword arguments (others are left out)."""
    import inspect

    if method == SFT:
        return {}
    params = inspect.signature(diffusion_loss(method)[0]).parameters
    return {k: v for k, v in options.items() if k in params and k not in _ERR_ARGS + _REF_ARGS}


def make_loss_fn(
    method: str, scheduler: Any, *, generator: torch.Generator | None = None, ref_model: torch.nn.Module | None = None,
    options: dict[str, Any] | None = None, validate: bool = True, embed: Embed | None = None,
) -> Callable[[torch.nn.Module, Any], tuple[Tensor, dict[str, Tensor]]]:
    """``loss_fn(model, batch) -> (loss, metrics)`` for :class:`mmalign.train.Trainer`.

    method: ``sft`` (denoising MSE on the chosen image only) or any registered diffusion loss
    (:func:`diffusion_loss`), e.g. ``mapo`` (reference-free) or ``diffusion_dpo`` (reference = ``ref_model``, or
    ``model`` with LoRA disabled). ``options``: hyper-parameters, passed to the loss where its signature names them
    (e.g. ``beta``; ``c``, ``temperature``, ``margin_weight``). ``generator`` draws the shared (ε, t) of each pair;
    the batch may be a :class:`PairBatch` or a dict. ``embed`` (text encoders in training): prompts are encoded
    from the batch's ``captions`` by the model's text encoders each step, and by the reference's for the reference.
    """
    num_t = int(scheduler.config.num_train_timesteps)

    def prepare(model: torch.nn.Module, batch: Any) -> tuple[PairBatch, PairBatch, Tensor, Tensor]:
        """The batch as given, as the model is conditioned on it (checked), and the pairs' shared (ε, t)."""
        pb = batch if isinstance(batch, PairBatch) else PairBatch.from_mapping(batch)
        policy = conditioned(pb, model, embed)
        if validate:
            check_pair_batch(policy)
        noise, timesteps = paired_noise_and_timesteps(pb.chosen, num_t, generator)
        return pb, policy, noise, timesteps

    if method == SFT:
        def sft_fn(model: torch.nn.Module, batch: Any) -> tuple[Tensor, dict[str, Tensor]]:
            _, pb, noise, timesteps = prepare(model, batch)
            # only the chosen image is seen: half the forward of a pairwise method
            err_w = denoising_errors(model, scheduler, pb.chosen, noise, timesteps, pb.encoder_hidden_states,
                                     pb.added_cond_kwargs())
            loss = err_w.mean()
            return loss, {"diffusion/model_err_chosen": loss.detach()}

        return sft_fn
    fn, needs_ref = diffusion_loss(method)
    kwargs = loss_options(method, dict(options or {}))
    err_names = ("diffusion/model_err_chosen", "diffusion/model_err_rejected")
    missing: list[bool] = []  # per err_names: does the loss leave it out? (read once: reading metrics syncs)

    def loss_fn(model: torch.nn.Module, batch: Any) -> tuple[Tensor, dict[str, Tensor]]:
        pb, policy, noise, timesteps = prepare(model, batch)
        err_w, err_l = pair_denoising_errors(model, scheduler, policy, noise, timesteps)
        errs = (err_w, err_l)
        if needs_ref:
            errs += reference_pair_errors(model, ref_model, scheduler, pb if embed else policy, noise, timesteps,
                                          embed)
        if pb.label is None:
            loss, metrics = fn(*errs, **kwargs)
        else:
            # P(chosen ≻ rejected) = p: the loss of each ordering weighted by its probability (same errors, swapped)
            p = pb.label.to(err_w.dtype)
            forward, metrics = fn(*errs, reduction="none", **kwargs)
            backward, _ = fn(*errs[:2][::-1], *errs[2:][::-1], reduction="none", **kwargs)
            loss = (p * forward + (1.0 - p) * backward).mean()
        # every method logs the policy's errors under one name, so runs of all methods plot on one axis
        if not missing:
            missing.extend(k not in metrics for k in err_names)
        if not any(missing):
            return loss, metrics
        extra = {k: v.detach().mean() for k, v, m in zip(err_names, (err_w, err_l), missing) if m}
        return loss, {**metrics, **extra}

    return loss_fn
