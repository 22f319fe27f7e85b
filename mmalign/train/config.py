"""Configuration of the generic trainer (light module: dataclasses only)."""

from __future__ import annotations

from dataclasses import dataclass

from mmalign.config import Config, check_choice, check_nonnegative, check_positive, check_range, option


@dataclass
class LoraOptions(Config):
    """Optional LoRA adapters through peft (applied by the trainer before ``accelerator.prepare``)."""

    enabled: bool = option(False, "wrap the model with peft LoRA adapters and train only them")
    r: int = option(8, "LoRA rank")
    alpha: float = option(16.0, "LoRA scaling alpha")
    dropout: float = option(0.0, "dropout on the LoRA branch, in [0, 1)")
    target_modules: list[str] = option(
        ["q_proj", "k_proj", "v_proj", "o_proj"], "module names (suffixes) that receive adapters"
    )

    def __post_init__(self) -> None:
        # bare field names: Config.from_dict prefixes the nested path (trainer.lora.dropout must be ...)
        check_positive("r", self.r)
        check_positive("alpha", self.alpha)
        check_range("dropout", self.dropout, 0.0, 1.0, high_open=True)  # 1 would zero the LoRA branch: no training
        if self.enabled and not self.target_modules:
            raise ValueError("target_modules must name at least one module when enabled is true, got []")


@dataclass
class TrainerConfig(Config):
    """Everything the generic accelerate trainer needs; one optimizer step = batch_size x grad_accum x processes."""

    seed: int = option(0, "seed for model init, data order, dropout and every RNG the trainer owns")
    max_steps: int = option(100, "number of optimizer steps to run")
    batch_size: int = option(8, "examples per process per micro-batch")
    grad_accum_steps: int = option(1, "micro-batches accumulated into one optimizer step")
    lr: float = option(1e-4, "peak learning rate (AdamW)")
    weight_decay: float = option(0.0, "AdamW weight decay")
    adam_betas: list[float] = option([0.9, 0.999], "AdamW betas")
    lr_schedule: str = option("constant", "learning-rate schedule after warmup: constant, linear or cosine decay")
    warmup_steps: int = option(0, "linear warmup steps from 0 to lr")
    max_grad_norm: float = option(1.0, "clip the global gradient norm to this value; 0 disables clipping")
    mixed_precision: str = option("auto", "auto (bf16 on GPUs that support it, else fp32), no, bf16 or fp16")
    log_every: int = option(10, "log metrics every N optimizer steps")
    eval_every: int = option(0, "run eval_fn every N optimizer steps (0: only at the end)")
    save_every: int = option(0, "write a checkpoint every N optimizer steps (0: only at the end)")
    keep_checkpoints: int = option(2, "how many complete checkpoints to keep (older ones are deleted)")
    num_workers: int = option(0, "DataLoader worker processes")
    cpu: bool = option(False, "force CPU even when a GPU is present")
    progress: bool = option(True, "show a progress bar on the main process")
    plots: bool = option(True, "write PNG plots of the logged curves at the end of training")
    lora: LoraOptions = option(factory=LoraOptions, help="optional LoRA adapters (peft)")
    distributed: str = option(
        "ddp",
        "how several processes share the work: ddp (every process holds the whole model, gradients are averaged) "
        "or fsdp (parameters, gradients and optimizer state sharded over processes with torch FSDP2) or deepspeed "
        "(DeepSpeed ZeRO at zero_stage; needs the deepspeed extra). Checkpoints are written consolidated either way, "
        "so a run resumes under any of them. A single process trains plainly",
    )
    fsdp_wrap: list[str] = option(
        [], "with distributed=fsdp: class names of submodules sharded as their own unit (e.g. LlamaDecoderLayer); "
        "empty: the model's _no_split_modules if it declares them, else the whole model is one unit"
    )
    zero_stage: int = option(
        2, "with distributed=deepspeed: ZeRO stage 1 (optimizer state sharded), 2 (+ gradients) or 3 (+ parameters)"
    )
    zero_offload_optimizer: bool = option(
        False, "with distributed=deepspeed: keep the fp32 masters and AdamW state in CPU memory and step them there "
        "(ZeRO-Offload): less accelerator memory, slower steps; the trajectory is unchanged"
    )
    gradient_checkpointing: bool = option(
        False, "keep only each layer's inputs in the forward pass and recompute the layer in the backward pass "
        "(transformers and diffusers models, non-reentrant): activation memory of about one layer instead of all, "
        "for about one more forward pass per step; the same trajectory (bitwise without dropout)"
    )
    optimizer_in_backward: bool = option(
        False, "apply each parameter's AdamW update as soon as its gradient is complete in the backward pass and "
        "free that gradient, so the gradients of the whole model never exist at once (full fine-tuning: peak memory "
        "less by about the model's size); the trajectory is unchanged. One process, grad_accum_steps 1 and "
        "max_grad_norm 0 (no clipping: no global norm exists before every parameter has stepped)"
    )

    def __post_init__(self) -> None:
        check_positive("max_steps", self.max_steps)
        check_positive("batch_size", self.batch_size)
        check_positive("grad_accum_steps", self.grad_accum_steps)
        check_positive("lr", self.lr)
        check_nonnegative("weight_decay", self.weight_decay)
        if len(self.adam_betas) != 2 or not all(0.0 <= b < 1.0 for b in self.adam_betas):
            raise ValueError(f"adam_betas must be two numbers in [0, 1), got {self.adam_betas!r}")
        check_choice("lr_schedule", self.lr_schedule, ["constant", "linear", "cosine"])
        check_nonnegative("warmup_steps", self.warmup_steps)
        check_nonnegative("max_grad_norm", self.max_grad_norm)
        check_choice("mixed_precision", self.mixed_precision, ["auto", "no", "bf16", "fp16"])
        check_positive("log_every", self.log_every)
        check_nonnegative("eval_every", self.eval_every)
        check_nonnegative("save_every", self.save_every)
        check_positive("keep_checkpoints", self.keep_checkpoints)
        check_nonnegative("num_workers", self.num_workers)
        check_choice("distributed", self.distributed, ["ddp", "fsdp", "deepspeed"])
        check_choice("zero_stage", self.zero_stage, [1, 2, 3])
        if self.zero_offload_optimizer and self.distributed != "deepspeed":
            raise ValueError(f"zero_offload_optimizer is only used with distributed 'deepspeed', got distributed "
                             f"{self.distributed!r}")
        if self.distributed in ("fsdp", "deepspeed") and self.mixed_precision == "fp16":
            # with ddp the loss scaler is accelerate's, checkpointed by the trainer
            why = ("accelerate's loss scaler does not handle the sharded gradients" if self.distributed == "fsdp"
                   else "the engine's loss-scaler state is not part of the checkpoints")
            raise ValueError(f"mixed_precision 'fp16' is not supported with distributed {self.distributed!r} ({why}); "
                             "use 'bf16', 'auto' or 'no'")
        if self.optimizer_in_backward:
            # each parameter steps inside backward, so nothing can happen between the last gradient and the update
            why = {"grad_accum_steps": (self.grad_accum_steps != 1, "gradients cannot be summed over micro-batches: "
                                        "set grad_accum_steps 1"),
                   "max_grad_norm": (self.max_grad_norm > 0, "no global gradient norm exists before the parameters "
                                     "step: set max_grad_norm 0 (no clipping)"),
                   "mixed_precision": (self.mixed_precision == "fp16", "fp16's loss scaler must unscale and check "
                                       "every gradient before any update: use 'bf16', 'auto' or 'no'"),
                   "distributed": (self.distributed != "ddp", "it runs in one process, where there is nothing to "
                                   "shard: use 'ddp'")}
            for name, (bad, fix) in why.items():
                if bad:
                    raise ValueError(f"optimizer_in_backward applies each parameter's update inside the backward "
                                     f"pass; with {name} {getattr(self, name)!r} {fix}")
        if self.fsdp_wrap and self.distributed != "fsdp":
            raise ValueError(f"fsdp_wrap {self.fsdp_wrap!r} is only used with distributed 'fsdp', got distributed "
                             f"{self.distributed!r}")
