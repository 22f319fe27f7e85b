"""DeepSpeed ZeRO stages 1-3 on CPU/gloo: exact resume, equality with 1-process runs, consolidated checkpoints."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch
from _sharded import assert_weights_equal, launch, weights

from mmalign.config import load_config
from mmalign.train.checkpoint import latest_checkpoint, read_checkpoint
from mmalign.train.config import TrainerConfig
from mmalign.train.demo import DemoConfig, run

# found, not imported: DeepSpeed loads only in the worker processes, as in a real launch
pytestmark = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                                reason="DeepSpeed is not installed (pip install 'mmalign[deepspeed]')")

WORKER = Path(__file__).with_name("_zero_worker.py")
# the worker's plain runs take 2 processes x 2 micro-batches x 8 examples per step; one process takes all 32 at once
ONE_PROCESS = ["trainer.progress=false", "trainer.plots=false", "trainer.batch_size=32", "trainer.save_every=4",
               "trainer.log_every=2", "trainer.eval_every=4", "n_pairs=256", "hidden=33", "dropout=0.0",
               "trainer.max_grad_norm=0.05"]


@pytest.fixture(scope="module")
def zero_runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return launch(WORKER, tmp_path_factory.mktemp("zero"))


@pytest.fixture(scope="module")
def zero_bf16_runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return launch(WORKER, tmp_path_factory.mktemp("zero_bf16"), "bf16")


@pytest.fixture(scope="module")
def one_process(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("one") / "run"
    run(load_config(DemoConfig, None, [*ONE_PROCESS, "trainer.max_steps=8"]), out)
    return out


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_stop_and_resume_is_bitwise_identical(zero_runs: Path, stage: int) -> None:
    result = json.loads((zero_runs / "result.json").read_text())
    assert result["resumed"][str(stage)] == 8
    # dropout draws from each process's own RNG stream: both streams must have been restored
    assert_weights_equal(weights(zero_runs / f"z{stage}-full"), weights(zero_runs / f"z{stage}-stop"), exact=True)


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_offload_resumes_exactly_and_follows_the_same_trajectory(zero_runs: Path, stage: int) -> None:
    assert json.loads((zero_runs / "result.json").read_text())["resumed"][f"o{stage}"] == 8
    offloaded = weights(zero_runs / f"o{stage}-full")
    assert_weights_equal(offloaded, weights(zero_runs / f"o{stage}-stop"), exact=True)
    assert_weights_equal(offloaded, weights(zero_runs / f"z{stage}-full"), exact=True)


def test_zero_partitions_masters_and_stage3_parameters(zero_runs: Path) -> None:
    sizes = json.loads((zero_runs / "result.json").read_text())["sizes"]
    for stage in ("1", "2", "3"):
        total, masters, held = sizes[stage]["total"], sizes[stage]["masters"], sizes[stage]["held"]
        assert total == 16 * 33 + 33 + 33 * 32 + 32
        # each rank optimises half of the fp32 masters (and AdamW moments), up to alignment padding
        assert total / 2 <= masters <= total / 2 + 64, sizes[stage]
        # ZeRO-1/2 keep every parameter on every rank; ZeRO-3 keeps a half of each (last partitions padded)
        assert held == total if stage != "3" else total / 2 <= held <= total / 2 + 4, sizes[stage]


def test_zero_stages_equal_each_other_and_a_one_process_run(zero_runs: Path, one_process: Path) -> None:
    z2, z3 = weights(zero_runs / "z2-plain"), weights(zero_runs / "z3-plain")
    assert_weights_equal(z2, z3, exact=False)
    assert_weights_equal(z2, weights(one_process), exact=False)
    # the ZeRO-2 checkpoint resumed under ZeRO-3 ends where the ZeRO-2 run ends
    assert_weights_equal(z2, weights(zero_runs / "z2-to-z3"), exact=False)
    # grad accumulation and clipping happen inside the engine: the logged norm is the global pre-clip norm
    zero_log = [json.loads(x) for x in (zero_runs / "z2-plain" / "metrics.jsonl").read_text().splitlines()]
    one_log = [json.loads(x) for x in (one_process / "metrics.jsonl").read_text().splitlines()]
    norms = [(a["train/grad_norm"], b["train/grad_norm"]) for a, b in zip(zero_log, one_log) if "train/grad_norm" in a]
    assert len(norms) == 4
    for a, b in norms:
        assert a == pytest.approx(b, rel=1e-4) and a > 0.05  # the clip was active


def test_zero_checkpoint_holds_the_full_adamw_state_of_a_plain_run(zero_runs: Path, one_process: Path) -> None:
    for name in ("z2-plain", "z3-plain"):
        ckpt = zero_runs / name / "checkpoints" / "step-00000004"
        state = json.loads((ckpt / "trainer_state.json").read_text())
        assert state["distributed"] == "deepspeed" and state["zero_stage"] == int(name[1])
        got = read_checkpoint(ckpt, scheduler=False)
        want = read_checkpoint(one_process / "checkpoints" / "step-00000004", scheduler=False)
        assert got.param_names == want.param_names == ["0.weight", "0.bias", "3.weight", "3.bias"]
        assert got.optimizer_state is not None and want.optimizer_state is not None
        for i, expected in want.optimizer_state["state"].items():
            entry = got.optimizer_state["state"][i]
            assert float(entry["step"]) == float(expected["step"]) == 4.0
            for key in ("exp_avg", "exp_avg_sq"):
                assert float(entry[key].abs().max()) > 0
                torch.testing.assert_close(entry[key], expected[key], atol=1e-7, rtol=1e-4)
        groups = got.optimizer_state["param_groups"]
        assert [g["params"] for g in groups] == [[0, 1, 2, 3]]
        assert groups[0].keys() == want.optimizer_state["param_groups"][0].keys()


def test_zero_checkpoint_resumes_in_one_process(zero_runs: Path, tmp_path: Path) -> None:
    resumed = tmp_path / "resumed"
    shutil.copytree(zero_runs / "z3-plain", resumed)
    shutil.rmtree(resumed / "checkpoints" / "step-00000008")
    (resumed / "checkpoints" / "latest").write_text("step-00000004")
    out = run(load_config(DemoConfig, None, [*ONE_PROCESS, "trainer.max_steps=8"]), resumed, resume=True)
    assert out["step"] == 8
    assert_weights_equal(weights(zero_runs / "z3-plain"), weights(resumed), exact=False)


def test_zero3_lora_partitions_the_frozen_base_and_resumes_exactly(zero_runs: Path) -> None:
    lora = weights(zero_runs / "lora-full")  # a LoRA run's final weights: the adapters, gathered, without the base
    assert any("lora_A" in k for k in lora) and not any("base_layer" in k for k in lora)
    assert all(v.numel() > 0 for v in lora.values())  # gathered from their partitions, not the empty placeholders
    assert_weights_equal(lora, weights(zero_runs / "lora-stop"), exact=True)


def test_zero3_saves_tied_weights_under_each_name_and_resumes_exactly(zero_runs: Path) -> None:
    full = weights(zero_runs / "tied-full")
    assert {"wte.weight", "lm_head.weight"} <= full.keys()
    assert torch.equal(full["wte.weight"], full["lm_head.weight"])  # still one weight, saved under both names
    assert_weights_equal(full, weights(zero_runs / "tied-stop"), exact=True)


def test_a_corrupt_file_on_one_rank_stops_every_rank(zero_runs: Path) -> None:
    errors = json.loads((zero_runs / "result.json").read_text())["corrupt_errors"]
    assert "rng-1.safetensors is corrupt or truncated" in errors[1]
    assert "another process failed to read checkpoint" in errors[0] and "step-00000004" in errors[0]


def test_zero_bf16_keeps_fp32_masters_and_resumes_exactly(zero_runs: Path, zero_bf16_runs: Path) -> None:
    result = json.loads((zero_bf16_runs / "result_bf16.json").read_text())
    assert result["resumed"] == {"1": 8, "2": 8, "3": 8}
    assert result["forward_dtypes"] == ["torch.bfloat16"]  # the engine trained a bf16 module
    fp32 = weights(zero_runs / "z2-plain")
    for stage in (1, 2, 3):
        full = weights(zero_bf16_runs / f"b{stage}-full")
        assert all(t.dtype == torch.float32 for t in full.values())  # the checkpoint holds the fp32 masters
        assert_weights_equal(full, weights(zero_bf16_runs / f"b{stage}-stop"), exact=True)
        diff = max(float((full[k] - fp32[k]).abs().max()) for k in fp32)
        assert 0.0 < diff < 2e-2, diff  # bf16 compute: close to the fp32 run, not equal to it


def test_deepspeed_on_one_process_trains_plainly(tmp_path: Path) -> None:
    base = ["trainer.max_steps=3", "trainer.progress=false", "trainer.plots=false", "n_pairs=128", "hidden=16"]
    run(load_config(DemoConfig, None, base), tmp_path / "ddp")
    run(load_config(DemoConfig, None, [*base, "trainer.distributed=deepspeed", "trainer.zero_stage=3"]),
        tmp_path / "zero")
    assert_weights_equal(weights(tmp_path / "ddp"), weights(tmp_path / "zero"), exact=True)


def test_zero_settings_are_validated() -> None:
    with pytest.raises(ValueError, match="zero_stage"):
        TrainerConfig(distributed="deepspeed", zero_stage=4)
    with pytest.raises(ValueError, match="fp16.*'deepspeed'"):
        TrainerConfig(distributed="deepspeed", mixed_precision="fp16")
    with pytest.raises(ValueError, match="zero_offload_optimizer is only used with distributed 'deepspeed'"):
        TrainerConfig(zero_offload_optimizer=True)
    TrainerConfig(distributed="deepspeed", zero_stage=3, mixed_precision="bf16")


def test_deepspeed_config_follows_the_trainer_settings() -> None:
    from mmalign.train.zero import deepspeed_config

    cfg = deepspeed_config(batch_size=4, grad_accum_steps=3, max_grad_norm=0.5, zero_stage=3, mixed_precision="bf16")
    assert cfg["train_micro_batch_size_per_gpu"] == 4 and cfg["gradient_accumulation_steps"] == 3
    assert cfg["gradient_clipping"] == 0.5 and cfg["zero_optimization"] == {"stage": 3}
    assert cfg["bf16"] == {"enabled": True} and "optimizer" not in cfg and "scheduler" not in cfg
    offload = deepspeed_config(batch_size=1, grad_accum_steps=1, max_grad_norm=0, zero_stage=2, mixed_precision="no",
                               offload_optimizer=True)
    assert offload["zero_optimization"] == {"stage": 2, "offload_optimizer": {"device": "cpu"}}
    with pytest.raises(ValueError, match="mixed_precision must be 'no' or 'bf16'.*'fp16'"):
        deepspeed_config(batch_size=1, grad_accum_steps=1, max_grad_norm=0, zero_stage=1, mixed_precision="fp16")


def test_a_checkpoint_with_unequal_adam_steps_is_refused_by_zero() -> None:
    from mmalign.train.zero import saved_step

    saved = [{"step": torch.tensor(3.0), "exp_avg": torch.zeros(2)}, {"step": torch.tensor(5.0)}]
    with pytest.raises(ValueError, match=r"step counts differ between parameters \(\[3.0, 5.0\]\)"):
        saved_step(saved)
    assert saved_step([{}, {}]) is None  # saved before the first step: no state yet
    assert saved_step([{"step": torch.tensor(4.0), "exp_avg": torch.zeros(2)}, {}]) == 4.0


def test_latest_checkpoint_of_a_zero_run_names_its_stage(zero_runs: Path) -> None:
    ckpt = latest_checkpoint(zero_runs / "z1-full" / "checkpoints")
    assert ckpt is not None and ckpt.name == "step-00000008"
    assert json.loads((ckpt / "trainer_state.json").read_text())["zero_stage"] == 1


ROUNDTRIP = Path(__file__).with_name("_zero_roundtrip.py")


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[
    pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")])])
@pytest.mark.parametrize("stage", [2, 3])
def test_zero_state_round_trip_on_one_process_per_device(tmp_path: Path, device: str, stage: int) -> None:
    """gather_full_state -> plain model + AdamW -> initialize continues bitwise (on CUDA: NCCL, one GPU a process)."""
    import subprocess

    from _sharded import ENV, TORCHRUN

    nproc = str(min(2, torch.cuda.device_count())) if device == "cuda" else "1"
    cmd = [*TORCHRUN[:-1], nproc, str(ROUNDTRIP), str(tmp_path), str(stage), device]
    proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    result = json.loads((tmp_path / "roundtrip.json").read_text())
    assert result["device"].startswith(device) and result["saved_step"] == 3.0
    assert result["bitwise"], result


def test_bench_sharding_counts_what_each_process_holds() -> None:
    """The benchmark's table: DDP holds everything, ZeRO-3 half of parameters, masters and moments; same weights."""
    import subprocess
    import sys

    from _sharded import ENV

    script = Path(__file__).resolve().parents[2] / "scripts" / "bench_sharding.py"
    proc = subprocess.run([sys.executable, str(script), "--width", "32", "--layers", "2", "--batch", "8", "--steps",
                           "3", "--warmup", "1", "--strategies", "ddp", "zero3", "--no-doc"],
                          env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = {json.loads(line)["strategy"]: json.loads(line) for line in proc.stdout.splitlines()
            if line.startswith("{")}
    n = 2 * (32 * 32 + 32)
    assert rows["ddp"]["held"] == {"params": n, "masters": 0, "moments": 2 * n}
    z3 = rows["zero3"]["held"]
    assert n / 2 <= z3["params"] <= n / 2 + 4 and n / 2 <= z3["masters"] <= n / 2 + 4
    assert z3["moments"] == 2 * z3["masters"]
    assert "| zero3 |" in proc.stdout and "0.0e+00 |" in proc.stdout.splitlines()[-1]


def test_deepspeed_on_another_device_than_the_trainer_is_a_clear_error() -> None:
    import subprocess
    import sys

    code = ("from mmalign.train.zero import _import_deepspeed\n"
            "_import_deepspeed('cpu')\n"
            "try:\n    _import_deepspeed('cuda')\nexcept RuntimeError as e:\n    print('ERR', e)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "ERR DeepSpeed's accelerator in this process is 'cpu' but the trainer runs on 'cuda'" in proc.stdout
