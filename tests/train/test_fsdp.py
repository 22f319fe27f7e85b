"""FSDP (torch FSDP2 on CPU/gloo): exact resume, equality with 1-process runs, consolidated checkpoints, errors."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from _sharded import ENV, TORCHRUN, assert_weights_equal, launch, weights

from mmalign.config import load_config
from mmalign.train.checkpoint import latest_checkpoint, load_checkpoint
from mmalign.train.config import TrainerConfig
from mmalign.train.demo import DemoConfig, run
from mmalign.train.trainer import check_launch

WORKER = Path(__file__).with_name("_fsdp_worker.py")
# the worker's settings with 2 x 16 examples per step; one process takes the same global batch of 32
ONE_PROCESS = ["trainer.progress=false", "trainer.plots=false", "trainer.batch_size=32", "trainer.save_every=4",
               "trainer.log_every=2", "n_pairs=256", "hidden=32", "dropout=0.0"]


def _process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants (Linux /proc), children before parents."""
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        for child in (task / "children").read_text().split():
            out.extend(_process_tree(int(child)))
    return [*out, pid]


@pytest.fixture(scope="module")
def fsdp_runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return launch(WORKER, tmp_path_factory.mktemp("fsdp"))


@pytest.fixture(scope="module")
def fsdp_bf16_runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return launch(WORKER, tmp_path_factory.mktemp("fsdp_bf16"), "bf16")


def test_fsdp_bf16_policy_computes_in_bf16_keeps_fp32_state_and_resumes_exactly(
    fsdp_runs: Path, fsdp_bf16_runs: Path
) -> None:
    result = json.loads((fsdp_bf16_runs / "result_bf16.json").read_text())
    assert result["resumed"] == 8
    assert result["forward_dtypes"] == ["torch.bfloat16"]  # every unit all-gathered bf16 copies for compute
    full, stopped = weights(fsdp_bf16_runs / "bf16-full"), weights(fsdp_bf16_runs / "bf16-stop")
    assert all(t.dtype == torch.float32 for t in full.values())  # sharded master weights stay fp32
    assert_weights_equal(full, stopped, exact=True)
    fp32 = weights(fsdp_runs / "plain-full")
    diff = max(float((full[k] - fp32[k]).abs().max()) for k in fp32)
    assert 0.0 < diff < 2e-2, diff  # bf16 compute: close to the fp32 run (8 steps of lr 3e-3), not equal to it


def test_fsdp_stop_and_resume_is_bitwise_identical(fsdp_runs: Path) -> None:
    result = json.loads((fsdp_runs / "result.json").read_text())
    assert result["resumed"] == 8
    # dropout draws from each process's own RNG stream: both streams must have been restored
    assert_weights_equal(weights(fsdp_runs / "drop-full"), weights(fsdp_runs / "drop-stop"), exact=True)
    lora = weights(fsdp_runs / "lora-full")  # a LoRA run's final weights: the adapters, gathered, without the base
    assert any("lora_A" in k for k in lora) and not any("base_layer" in k for k in lora)
    assert_weights_equal(lora, weights(fsdp_runs / "lora-stop"), exact=True)


def test_fsdp_equals_one_process_run(fsdp_runs: Path, tmp_path: Path) -> None:
    run(load_config(DemoConfig, None, [*ONE_PROCESS, "trainer.max_steps=8"]), tmp_path / "one")
    assert_weights_equal(weights(fsdp_runs / "plain-full"), weights(tmp_path / "one"), exact=False)


def test_fsdp_checkpoint_is_consolidated_and_resumes_in_one_process(fsdp_runs: Path, tmp_path: Path) -> None:
    ckpt = latest_checkpoint(fsdp_runs / "plain-stop" / "checkpoints")
    assert ckpt is not None and ckpt.name == "step-00000004"
    assert json.loads((ckpt / "trainer_state.json").read_text())["distributed"] == "fsdp"
    # full (unsharded) tensors a plain model and optimizer accept as they are
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Dropout(0.0),
                                torch.nn.Linear(32, 32))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    load_checkpoint(ckpt, model=model, optimizer=opt, scheduler=None)
    assert all(opt.state[p]["exp_avg"].shape == p.shape for p in model.parameters())
    assert json.loads((ckpt / "optimizer.json").read_text())["param_names"] == [n for n, _ in model.named_parameters()]

    # resumed by one process with the same global batch, it ends where the uninterrupted FSDP run ends
    resumed = tmp_path / "resumed"
    shutil.copytree(fsdp_runs / "plain-stop", resumed)
    out = run(load_config(DemoConfig, None, [*ONE_PROCESS, "trainer.max_steps=8"]), resumed, resume=True)
    assert out["step"] == 8
    assert_weights_equal(weights(fsdp_runs / "plain-full"), weights(resumed), exact=False)


def test_a_corrupt_file_on_one_rank_stops_every_rank_with_a_clear_error(fsdp_runs: Path) -> None:
    errors = json.loads((fsdp_runs / "result.json").read_text())["corrupt_errors"]
    assert "rng-1.safetensors is corrupt or truncated" in errors[1]
    assert "another process failed to read checkpoint" in errors[0] and "step-00000004" in errors[0]


def test_fsdp_on_one_process_trains_plainly(tmp_path: Path) -> None:
    base = ["trainer.max_steps=3", "trainer.progress=false", "trainer.plots=false", "n_pairs=128", "hidden=16"]
    run(load_config(DemoConfig, None, base), tmp_path / "ddp")
    run(load_config(DemoConfig, None, [*base, "trainer.distributed=fsdp"]), tmp_path / "fsdp")
    assert_weights_equal(weights(tmp_path / "ddp"), weights(tmp_path / "fsdp"), exact=True)


def test_fsdp_settings_are_validated() -> None:
    with pytest.raises(ValueError, match="distributed"):
        TrainerConfig(distributed="zero3")
    with pytest.raises(ValueError, match="fp16"):
        TrainerConfig(distributed="fsdp", mixed_precision="fp16")
    with pytest.raises(ValueError, match="fsdp_wrap"):
        TrainerConfig(fsdp_wrap=["Linear"])
    TrainerConfig(distributed="fsdp", fsdp_wrap=["Linear"], mixed_precision="bf16")


def test_unknown_fsdp_wrap_class_is_a_clear_error() -> None:
    from mmalign.train.fsdp import shard_model

    with pytest.raises(ValueError, match=r"fsdp_wrap names \['LlamaDecoderLayer'\].*'Linear'"):
        shard_model(torch.nn.Sequential(torch.nn.Linear(2, 2)), ["LlamaDecoderLayer"], torch.device("cpu"))


@pytest.mark.parametrize("launch", ["FSDP", "DEEPSPEED"])
def test_accelerate_sharding_plugins_are_refused(launch: str) -> None:
    with pytest.raises(ValueError, match=f"accelerate launch configured {launch}.*trainer.distributed=fsdp.*"
                                         "trainer.distributed=deepspeed"):
        check_launch(TrainerConfig(), launch)
    check_launch(TrainerConfig(), "MULTI_CPU")


@pytest.mark.slow
@pytest.mark.parametrize("strategy", [
    "trainer.distributed=fsdp",
    pytest.param("trainer.distributed=deepspeed trainer.zero_stage=3", marks=pytest.mark.skipif(
        importlib.util.find_spec("deepspeed") is None, reason="DeepSpeed is not installed")),
])
def test_sharded_sigkill_then_resume_is_bitwise_identical(tmp_path: Path, strategy: str) -> None:
    cli = [*TORCHRUN, "-m", "mmalign.cli", "train", "demo"]
    common = [*strategy.split(), "trainer.max_steps=300", "trainer.save_every=10", "trainer.batch_size=32",
              "trainer.progress=false", "trainer.plots=false", "trainer.eval_every=50", "dropout=0.1",
              "n_pairs=1024", "hidden=128"]
    full = tmp_path / "full"
    subprocess.run([*cli, "--output-dir", str(full), *common], check=True, env=ENV, capture_output=True, timeout=600)

    killed = tmp_path / "killed"
    proc = subprocess.Popen([*cli, "--output-dir", str(killed), *common], env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    ckpts, deadline = killed / "checkpoints", time.time() + 300
    while time.time() < deadline:
        ckpt = latest_checkpoint(ckpts) if (ckpts / "latest").exists() else None
        if ckpt is not None and int(ckpt.name.split("-")[1]) >= 40:
            break
        if proc.poll() is not None:
            pytest.fail("training finished before it could be killed; make the run longer")
        time.sleep(0.01)
    # torchrun starts each worker in its own session: kill launcher and workers by id, as a crashed node would
    for pid in _process_tree(proc.pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()
    assert not (killed / "model.safetensors").exists(), "the run was not killed mid-way"
    resumed_from = latest_checkpoint(ckpts)
    assert resumed_from is not None and int(resumed_from.name.split("-")[1]) < 300

    subprocess.run([*cli, "--output-dir", str(killed), "--resume", *common], check=True, env=ENV,
                   capture_output=True, timeout=600)
    assert_weights_equal(weights(full), weights(killed), exact=True)
    assert len((full / "metrics.jsonl").read_text().splitlines()) == len(
        (killed / "metrics.jsonl").read_text().splitlines())
