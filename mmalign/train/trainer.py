"""One training loop on accelerate for every gradient-trained model in mmalign.

The loop owns devices, precision, gradient accumulation, clipping, LR schedules, optional LoRA, logging, plots and
atomic resumable checkpoints. What is being optimised is a ``loss_fn(model, batch) -> (loss, metrics)`` supplied by
the domain, which typically calls a pure core loss. Data order is a pure function of (seed, epoch, step), so a run
resumed from a checkpoint sees exactly the batches an uninterrupted run would have seen. With ``num_workers > 0`` the
worker processes' torch, numpy and python RNGs are seeded before every micro-batch from (seed, step, micro-batch,
rank), so random augmentation in ``__getitem__``/``collate_fn`` resumes exactly too (and does not depend on the number
of workers); with ``num_workers=0`` items are loaded in the main process from its global RNGs, which a fresh run
seeds from ``cfg.seed`` and a checkpoint saves and restores. Multi-GPU and multi-node runs go through
``accelerate launch`` or ``torchrun`` with no code change: each process takes its shard of every global batch.
``distributed="fsdp"`` shards parameters, gradients and optimizer state with torch FSDP2
(applied by the trainer, see :mod:`mmalign.train.fsdp`); ``distributed="deepspeed"`` hands model and optimizer to
DeepSpeed ZeRO (:mod:`mmalign.train.zero`). With ``optimizer_in_backward`` one process applies each parameter's
update inside the backward pass, so the whole model's gradients never exist at once. Checkpoints are consolidated in
every case, so a run may resume on a different number of processes or with another strategy as long as the global
batch is the same.
"""

from __future__ import annotations

import contextlib
import json
import random
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from mmalign.train.batches import _batch_seeds, _default_collate, _SeededBatches, _StepBatches  # noqa: F401
from mmalign.train.checkpoint import (
    SCALER,
    CheckpointError,
    frozen_base,
    latest_checkpoint,
    load_checkpoint,
    model_state_tensors,
    save_checkpoint,
    save_run_weights,
    unshare_tensors,
)
from mmalign.train.compat import (  # noqa: F401  (check_launch, _legacy_fingerprint: re-exported)
    process_state,
    _check_max_steps,
    _fingerprint,
    _legacy_fingerprint,
    _lr_lambda,
    check_launch,
)
from mmalign.train.config import TrainerConfig
from mmalign.train.logging import MetricsLogger, plot_metrics
from mmalign.train.memory import _step_in_backward, enable_gradient_checkpointing

__all__ = ["Trainer", "enable_gradient_checkpointing", "seed_everything", "resolve_mixed_precision"]

LossFn = Callable[[torch.nn.Module, Any], "tuple[torch.Tensor, dict[str, Any]]"]


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices) global RNGs."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_mixed_precision(setting: str, cpu: bool = False) -> str:
    """``auto`` becomes bf16 on a CUDA GPU that supports it and ``no`` elsewhere."""
    if setting != "auto":
        return setting
    if not cpu and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16"
    return "no"


def _cuda_rng_devices() -> list[int]:
    """The CUDA devices whose RNGs evaluation forks: every one once CUDA is in use, none before (nor without CUDA).

    An ``eval_fn`` drawing from a CUDA generator would otherwise shift the training draws after it (dropout, noise)
    and an uninterrupted run would no longer equal a resumed one. Forking a device's RNG copies a small host-side
    state; asking ``is_initialized`` (not for the RNG states) keeps a CPU run on a GPU machine from initialising CUDA.
    """
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return list(range(torch.cuda.device_count()))
    return []


def _last_logged(path: Path) -> dict[str, Any]:
    """The metrics of the latest row holding ``train/loss`` merged with the rows logged after it."""
    from mmalign.train.logging import read_metrics

    rows = read_metrics(path)
    start = max((i for i, r in enumerate(rows) if "train/loss" in r), default=len(rows))
    out: dict[str, Any] = {}
    for row in rows[start:]:
        out.update({k: v for k, v in row.items() if k != "step"})
    return out


class Trainer:
    """Trains ``model`` by minimising ``loss_fn(model, batch)`` over ``train_dataset`` (see module docstring).

    Args:
        cfg: the trainer settings.
        model: the module to train (built and seeded by the caller; only parameters with ``requires_grad`` train).
        train_dataset: anything with ``__len__`` and ``__getitem__``.
        loss_fn: ``(model, batch) -> (scalar loss, metrics)``; metrics are scalars or 1-element tensors.
        run_dir: the run folder; the trainer writes ``metrics.jsonl``, ``tensorboard/``, ``plots/``,
            ``checkpoints/`` and ``model.safetensors`` (final weights; a LoRA run's without its frozen base, read
            back with :func:`mmalign.train.checkpoint.load_run_weights`) into it.
        collate_fn: turns a list of dataset items into a batch (default: torch's ``default_collate``).
        eval_fn: ``(unwrapped model) -> metrics`` run on the main process every ``eval_every`` steps and at the end,
            under a forked RNG so evaluation never changes the training trajectory.
        generators: random generators owned by ``loss_fn`` (e.g. diffusion noise); they are checkpointed and
            restored with the global RNG states, so a resumed run draws exactly what an uninterrupted one would.
    """

    def __init__(
        self,
        cfg: TrainerConfig,
        model: torch.nn.Module,
        train_dataset: Any,
        loss_fn: LossFn,
        run_dir: Path,
        collate_fn: Callable[[Sequence[Any]], Any] | None = None,
        eval_fn: Callable[[torch.nn.Module], dict[str, Any]] | None = None,
        generators: dict[str, torch.Generator] | None = None,
    ) -> None:
        from accelerate import Accelerator

        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.loss_fn = loss_fn
        self.eval_fn = eval_fn
        self.generators = dict(generators or {})
        self.collate_fn = collate_fn or _default_collate
        self.dataset = train_dataset
        # the process state first: without a GPU, accelerate only joins a torchrun/gloo group when told cpu=True
        use_cpu = process_state(cfg.cpu).device.type == "cpu"
        self.accelerator = Accelerator(mixed_precision=resolve_mixed_precision(cfg.mixed_precision, use_cpu),
                                       cpu=use_cpu)
        acc = self.accelerator
        check_launch(cfg, str(acc.distributed_type.value))
        # one process has nothing to shard: it trains plainly and writes the same checkpoints
        self.sharded = cfg.distributed == "fsdp" and acc.num_processes > 1
        self.zero = cfg.distributed == "deepspeed" and acc.num_processes > 1
        if self.zero:
            from mmalign.train.zero import _import_deepspeed, deepspeed_config

            _import_deepspeed(acc.device.type)  # a missing install or another device fails here, before any work
            self._zero_config = deepspeed_config(
                batch_size=cfg.batch_size, grad_accum_steps=cfg.grad_accum_steps, max_grad_norm=cfg.max_grad_norm,
                zero_stage=cfg.zero_stage, mixed_precision=str(acc.mixed_precision),
                offload_optimizer=cfg.zero_offload_optimizer)
        global_batch = cfg.batch_size * cfg.grad_accum_steps * acc.num_processes
        if len(train_dataset) < global_batch:
            raise ValueError(
                f"train_dataset has {len(train_dataset)} examples, fewer than one global batch of {global_batch} "
                f"(batch_size {cfg.batch_size} x grad_accum_steps {cfg.grad_accum_steps} x {acc.num_processes} processes)"
            )
        self.dropped_per_epoch = len(train_dataset) % global_batch
        if cfg.lora.enabled:
            model = self._apply_lora(model)
        if cfg.gradient_checkpointing:
            enable_gradient_checkpointing(model)
        # the base LoRA leaves frozen, named and fingerprinted while whole (before sharding): checkpoints leave it out
        self._frozen = frozen_base(model) if cfg.lora.enabled else None
        if self.sharded:
            from mmalign.train.fsdp import shard_model

            # before the optimizer exists: fully_shard replaces the parameters with sharded ones
            model = shard_model(model, cfg.fsdp_wrap, acc.device, mixed_precision=str(acc.mixed_precision))
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise ValueError("model has no parameters with requires_grad=True: nothing to train")
        # torch's fused AdamW (CPU and GPU kernels; TRL's default too): one pass per parameter without the per-tensor
        # loop's temporaries, which otherwise raise the peak of a step inside backward
        self.optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                           betas=(cfg.adam_betas[0], cfg.adam_betas[1]),
                                           fused=True)
        # The scheduler stays outside accelerate.prepare: its wrapper steps once per process, we step once per update.
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, _lr_lambda(cfg.lr_schedule, cfg.warmup_steps, cfg.max_steps)
        )
        if cfg.optimizer_in_backward:
            if acc.num_processes > 1:  # DDP averages gradients after backward, too late for an update inside it
                raise ValueError(f"optimizer_in_backward runs in one process (gradients are averaged over processes "
                                 f"only after the backward pass); this run has {acc.num_processes}")
            _step_in_backward(self.optimizer, params)
        self._raw_model = model
        self.model: Any = None  # prepared in train(), after a possible checkpoint load
        self.step = 0
        self._checkpointed_step: int | None = None  # the step the latest checkpoint (loaded or written) holds

    def _apply_lora(self, model: torch.nn.Module) -> torch.nn.Module:
        from mmalign.train.lora import add_lora

        lo = self.cfg.lora
        # seeded from cfg.seed inside a forked RNG: nothing has seeded the global RNGs yet (torch seeds them
        # differently in every process), and the caller's streams stay as they were
        return add_lora(model, r=lo.r, alpha=lo.alpha, dropout=lo.dropout, target_modules=list(lo.target_modules),
                        seed=self.cfg.seed)

    @property
    def strategy(self) -> str:
        """How the processes share the work in this run: ddp, fsdp or deepspeed (one process always trains plainly)."""
        return "fsdp" if self.sharded else "deepspeed" if self.zero else "ddp"

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    def unwrapped_model(self) -> torch.nn.Module:
        if self.model is None or self.model is self._raw_model:  # not wrapped (one process, FSDP2)
            return self._raw_model
        if self.zero or isinstance(self.model, torch.nn.parallel.DistributedDataParallel):
            return self.model.module
        # other wrappers: accelerate knows them (its unwrap imports DeepSpeed whenever it is installed, ~1 s)
        return self.accelerator.unwrap_model(self.model)

    def _start_zero(self) -> None:
        """Hand model and (possibly just restored) optimizer to DeepSpeed; remember what checkpoints need."""
        from mmalign.train.fsdp import optimizer_param_names
        from mmalign.train.zero import initialize

        model = self._raw_model
        self._zero_names = optimizer_param_names(model, self.optimizer)
        self._zero_params = [p for g in self.optimizer.param_groups for p in g["params"]]
        self._zero_groups = self.optimizer.state_dict()["param_groups"]
        # in bf16 DeepSpeed casts the module and builds fp32 masters from the rounded weights: give it the exact ones
        masters = ({n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
                   if self._zero_config["bf16"]["enabled"] else None)
        self.model = initialize(model, self.optimizer, self._zero_config, masters=masters)

    # -- checkpoints -------------------------------------------------------------------------------------------
    def _ckpt_root(self) -> Path:
        return self.run_dir / "checkpoints"

    def full_model_state(self) -> dict[str, torch.Tensor] | None:
        """Consolidated model weights (CPU under FSDP) on the main process, None elsewhere; collective when sharded."""
        if self.sharded:
            from mmalign.train.fsdp import gather_full_state

            tensors, _ = gather_full_state(self.unwrapped_model(), None)
            return unshare_tensors(tensors) if tensors is not None else None
        if self.zero and self.model is not None:
            from mmalign.train import zero

            tensors, _ = zero.gather_full_state(self.model, self._zero_params, self._zero_groups, optimizer=False)
            return unshare_tensors(tensors) if tensors is not None else None
        return model_state_tensors(self.unwrapped_model()) if self.is_main else None

    def save(self) -> Path:
        """Write a checkpoint of the current step (collective in a distributed run)."""
        from mmalign.train.fsdp import gather_full_state, optimizer_param_names

        acc = self.accelerator
        model = self.unwrapped_model()
        skip = self._frozen.names if self._frozen is not None else frozenset()  # a LoRA run's base: not saved
        if self.zero:  # every process takes part in the gather; rank 0 receives the full state
            from mmalign.train import zero

            names = self._zero_names
            tensors, opt_state = zero.gather_full_state(self.model, self._zero_params, self._zero_groups)
            tensors = unshare_tensors(tensors, skip) if tensors is not None else None  # tied: one copy per name
        elif self.sharded:
            names = optimizer_param_names(model, self.optimizer)
            tensors, opt_state = gather_full_state(model, self.optimizer)
            tensors = unshare_tensors(tensors, skip) if tensors is not None else None
        else:
            names = optimizer_param_names(model, self.optimizer)
            tensors = model_state_tensors(model, skip) if self.is_main else None
            opt_state = self.optimizer.state_dict() if self.is_main else None
        frozen = {"frozen_base": self._frozen.record()} if self._frozen is not None else {}
        path = save_checkpoint(
            self._ckpt_root(), self.step, model_tensors=tensors, optimizer=None, optimizer_state=opt_state,
            param_names=names, scheduler=self.scheduler if self.is_main else None,
            trainer_state={"config_fingerprint": _fingerprint(self.cfg, acc.num_processes), "seed": self.cfg.seed,
                           "distributed": self.strategy, "max_steps": self.cfg.max_steps,
                           **({"zero_stage": self.cfg.zero_stage} if self.zero else {}), **frozen},
            rank=acc.process_index, world_size=acc.num_processes, barrier=acc.wait_for_everyone,
            keep=self.cfg.keep_checkpoints, generators=self.generators,
            scaler=acc.scaler if self.is_main else None,  # fp16: scale and growth tracker, the same on every process
        )
        self._checkpointed_step = self.step
        return path

    def _resume(self) -> None:
        from mmalign.train.fsdp import all_ranks_ok

        acc = self.accelerator
        path = latest_checkpoint(self._ckpt_root())
        if path is None:  # stopped before its first save: an uninterrupted run starts at step 0 too
            if self.is_main:
                print(f"[mmalign] --resume: {self._ckpt_root()} holds no complete checkpoint yet (the run stopped "
                      f"before its first save); training starts at step 0")
            return
        state = load_checkpoint(path, model=self._raw_model, optimizer=self.optimizer, scheduler=self.scheduler,
                                rank=acc.process_index, generators=self.generators,
                                agree=lambda ok: all_ranks_ok(ok, acc.device), scaler=acc.scaler,
                                frozen=self._frozen)
        if state.get("config_fingerprint") not in {_fingerprint(self.cfg, acc.num_processes),
                                                   _legacy_fingerprint(self.cfg)}:
            raise CheckpointError(f"{path} was written with different training settings; refusing to resume")
        self.step = int(state["step"])
        if "max_steps" not in state and self.cfg.lr_schedule != "constant" and self.is_main:
            print(f"[mmalign] {path} does not record max_steps (written by an earlier version): it cannot be checked "
                  f"that the {self.cfg.lr_schedule!r} LR schedule is unchanged; resume with the run's max_steps")
        _check_max_steps(self.cfg, state.get("max_steps"), self.step, path)
        self._checkpointed_step = self.step
        scaling = acc.scaler is not None and acc.scaler.is_enabled()
        if self.is_main and scaling and not (path / SCALER).is_file():
            print(f"[mmalign] {path} holds no fp16 loss-scaler state (written by an earlier version or without a "
                  f"loss scaler): the loss scale restarts from its default, so the run may differ from an "
                  f"uninterrupted one")
        elif self.is_main and not scaling and (path / SCALER).is_file():
            print(f"[mmalign] {path} holds an fp16 loss-scaler state, but this run has no loss scaler (mixed "
                  f"precision {acc.mixed_precision!r} on {acc.device}): it is not used")

    def _write_run_info(self) -> None:
        """Append this start to ``run_info.json``: what the run resolved (device, precision, processes, strategy).

        A resumed run adds an entry (with the step it resumed at); earlier entries are kept.
        """
        import platform

        from mmalign.train.checkpoint import atomic_write_text

        acc = self.accelerator
        info = {
            "device": str(acc.device),
            "device_name": (torch.cuda.get_device_name(acc.device) if acc.device.type == "cuda"
                            else platform.processor() or platform.machine()),
            "mixed_precision": str(acc.mixed_precision),
            "num_processes": acc.num_processes,
            "distributed": self.strategy,
            **({"zero_stage": self.cfg.zero_stage} if self.zero else {}),
            "resumed_at_step": self.step,
            "torch": torch.__version__,
        }
        path = self.run_dir / "run_info.json"
        try:
            starts = json.loads(path.read_text())["starts"] if path.is_file() else []
        except (ValueError, KeyError, TypeError):
            starts = []  # unreadable (e.g. from a crash mid-write of an older version): start the list anew
        atomic_write_text(path, json.dumps({"starts": [*starts, info]}, indent=1) + "\n")

    # -- the loop ----------------------------------------------------------------------------------------------
    def _evaluate(self) -> dict[str, Any]:
        from mmalign.train.fsdp import runs_in_lockstep

        # a sharded forward needs every process, so under FSDP and ZeRO-3 all run eval_fn and the main process reports
        model = self.unwrapped_model()
        if self.eval_fn is None or not (self.is_main or runs_in_lockstep(model)):
            return {}
        np_state, py_state = np.random.get_state(), random.getstate()
        was_training = model.training
        model.eval()
        # DeepSpeed casts the module itself under bf16, so its inputs need autocast as in training
        cast = self.accelerator.autocast() if self.zero else contextlib.nullcontext()
        with torch.random.fork_rng(devices=_cuda_rng_devices()), torch.no_grad(), cast:
            out = self.eval_fn(model)
        model.train(was_training)
        np.random.set_state(np_state)
        random.setstate(py_state)
        return out if self.is_main else {}

    def _optimizer_step(self) -> None:
        """Apply the accumulated gradients and advance the LR schedule, unless the fp16 loss scaler skipped the step.

        With fp16 the scaler skips an update whose gradients overflowed (and lowers the scale); the schedule then
        stays where it is as well, so every applied update gets the LR of its own position in the schedule.
        """
        # A skipped update lowers the scale. accelerate's own flag misses the skips of a fused optimizer (the scaler
        # calls its step with the overflow flag rather than leaving step uncalled), so the scale is compared instead.
        scaler = self.accelerator.scaler
        scale = scaler.get_scale() if scaler is not None and scaler.is_enabled() else None
        # DeepSpeed stepped inside engine.step (no fp16 there: the config refuses it); optimizer_in_backward in backward
        if not self.zero and not self.cfg.optimizer_in_backward:
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        skipped = scaler.get_scale() < scale if scale is not None else self.accelerator.optimizer_step_was_skipped
        if not skipped:
            self.scheduler.step()

    def train(self, resume: bool = False) -> dict[str, Any]:
        """Run until ``max_steps`` optimizer steps; with ``resume``, continue from the latest checkpoint."""
        from accelerate.utils import send_to_device
        from torch.utils.data import DataLoader
        from tqdm.auto import tqdm

        cfg, acc = self.cfg, self.accelerator
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if resume:
            self._resume()
        if self._checkpointed_step is None:
            # a fresh run, or a resume before the first checkpoint: the global RNGs (dropout, augmentation loaded in
            # this process) start from cfg.seed whatever the job drew before, as a resumed run restores them; so two
            # runs of the same settings are the same run, and a job may run its phases in any order or skip some
            seed_everything(cfg.seed)
        logger = MetricsLogger(self.run_dir, enabled=self.is_main)
        if resume:
            logger.truncate_after(self.step)
        if self.is_main and self.dropped_per_epoch:
            print(f"[mmalign] {self.dropped_per_epoch} examples per epoch do not fill a global batch and are left "
                  f"out of that epoch (a different subset each epoch)")
        if self.sharded:  # already placed and sharded; accelerate.prepare would wrap it in DDP as well
            self.model = self._raw_model
        elif self.zero:  # DeepSpeed places, partitions and reduces; the optimizer state (if resumed) moves along
            self._start_zero()
        else:
            self.model, self.optimizer = acc.prepare(self._raw_model, self.optimizer)
        if self.is_main:
            self._write_run_info()
        workers = cfg.num_workers > 0
        sampler = _StepBatches(len(self.dataset), cfg.batch_size, cfg.grad_accum_steps, acc.num_processes,
                               acc.process_index, cfg.seed, self.step, cfg.max_steps, keyed=workers)
        # workers reseed per micro-batch (see _SeededBatches); without workers the main process's restored RNGs load
        dataset = _SeededBatches(self.dataset, cfg.seed, acc.process_index) if workers else self.dataset
        # Own generator: creating the iterator must not draw from the global RNG that a resume just restored.
        loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=self.collate_fn,
                            num_workers=cfg.num_workers, generator=torch.Generator().manual_seed(cfg.seed))
        batches = iter(loader)
        bar = tqdm(total=cfg.max_steps, initial=self.step, disable=not (cfg.progress and self.is_main),
                   desc="train", dynamic_ncols=True)
        self.model.train()
        if cfg.optimizer_in_backward:  # each hook steps the one parameter holding a gradient: none may be stale
            self.optimizer.zero_grad(set_to_none=True)
        # what the run reports at the end: the latest training row and the evaluations after it (a resumed run takes
        # them from the log, so that resuming a finished run returns what the uninterrupted one returned)
        last: dict[str, Any] = _last_logged(self.run_dir / "metrics.jsonl") if resume and self.is_main else {}
        t0, examples = time.perf_counter(), 0
        while self.step < cfg.max_steps:
            sums: dict[str, torch.Tensor] = {}
            for micro in range(cfg.grad_accum_steps):
                batch = send_to_device(next(batches), acc.device)
                sync = micro == cfg.grad_accum_steps - 1
                if self.sharded:  # FSDP2 keeps unsharded gradients until the last micro-batch reduce-scatters them
                    self.model.set_requires_gradient_sync(sync)
                ctx = contextlib.nullcontext() if sync or self.sharded or self.zero else acc.no_sync(self.model)
                with ctx:
                    with acc.autocast():
                        loss, metrics = self.loss_fn(self.model, batch)
                    if not torch.isfinite(loss):
                        raise FloatingPointError(f"loss is {loss.item()} at step {self.step} (micro-batch {micro})")
                    if self.zero:  # the engine divides by the accumulation steps and steps on the last micro-batch
                        self.model.backward(loss)
                        self.model.step()
                    else:
                        acc.backward(loss / cfg.grad_accum_steps)
                for k, v in {"train/loss": loss, **metrics}.items():
                    t = torch.as_tensor(v, dtype=torch.float32, device=acc.device).detach().reshape(-1)[:1]
                    sums[k] = sums.get(k, 0) + t / cfg.grad_accum_steps
                examples += cfg.batch_size * acc.num_processes
            if self.zero:  # clipped inside engine.step (gradient_clipping); the norm is the pre-clip one
                norm = self.model.get_global_grad_norm()
                if cfg.max_grad_norm > 0 and norm is not None:
                    sums["train/grad_norm"] = torch.as_tensor(float(norm), device=acc.device).reshape(-1)[:1]
            elif cfg.max_grad_norm > 0:
                if self.sharded:  # the norm of sharded gradients is a replicated DTensor
                    dnorm: Any = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.max_grad_norm)
                    norm = dnorm.full_tensor()
                else:
                    norm = acc.clip_grad_norm_(self.model.parameters(), cfg.max_grad_norm)
                sums["train/grad_norm"] = torch.as_tensor(norm, device=acc.device).float().reshape(-1)[:1]
            self._optimizer_step()
            self.step += 1
            bar.update(1)
            if self.step % cfg.log_every == 0 or self.step == cfg.max_steps:
                reduced = {k: acc.reduce(v, "mean").item() for k, v in sums.items()}
                reduced["train/lr"] = self.scheduler.get_last_lr()[0]
                reduced["perf/examples_per_s"] = examples / max(1e-9, time.perf_counter() - t0)
                t0, examples = time.perf_counter(), 0
                last = logger.log(self.step, reduced)
                bar.set_postfix(loss=f"{reduced['train/loss']:.4f}")
            # evaluate before saving: a checkpoint of this step must come after all of this step's rows, or a run
            # killed between the two resumes past the evaluation and never logs it
            if cfg.eval_every and self.step % cfg.eval_every == 0 and self.step < cfg.max_steps:
                last.update(logger.log(self.step, self._evaluate()))
            if cfg.save_every and self.step % cfg.save_every == 0 and self.step < cfg.max_steps:
                self.save()
        bar.close()
        if self._checkpointed_step != self.step:  # resuming a finished run: its checkpoint is already this step
            self.save()
        final_eval = logger.log(self.step, self._evaluate())
        last.update(final_eval)
        final = self.full_model_state()
        if self.is_main:
            assert final is not None
            save_run_weights(self.run_dir / "model.safetensors", final, self._frozen)  # LoRA: adapters only
            logger.close()
            if cfg.plots:
                plot_metrics(self.run_dir / "metrics.jsonl", self.run_dir / "plots")
        acc.wait_for_everyone()
        return {"step": self.step, **last}
