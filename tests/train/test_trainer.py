"""The trainer: exact resume after SIGKILL, multi-process equivalence, accumulation, error paths."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mmalign.config import load_config
from mmalign.train.checkpoint import latest_checkpoint
from mmalign.train.demo import DemoConfig, run

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "mmalign.cli", "train", "demo", *args]


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "model.safetensors"))


def test_sigkill_then_resume_is_bitwise_identical(tmp_path: Path) -> None:
    common = ["trainer.max_steps=400", "trainer.save_every=20", "trainer.progress=false", "trainer.eval_every=50",
              "trainer.log_every=5", "dropout=0.1", "n_pairs=2048", "hidden=256"]
    full = tmp_path / "full"
    subprocess.run(_cli("--output-dir", str(full), *common), check=True, env=ENV, capture_output=True)

    killed = tmp_path / "killed"
    proc = subprocess.Popen(_cli("--output-dir", str(killed), *common), env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    ckpts = killed / "checkpoints"
    while time.time() < deadline:
        ckpt = latest_checkpoint(ckpts) if (ckpts / "latest").exists() else None
        if ckpt is not None and int(ckpt.name.split("-")[1]) >= 60:
            break
        if proc.poll() is not None:
            pytest.fail("training finished before it could be killed; make the run longer")
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "model.safetensors").exists(), "the run was not killed mid-way"
    resumed_from = latest_checkpoint(ckpts)
    assert resumed_from is not None and int(resumed_from.name.split("-")[1]) < 400

    subprocess.run(_cli("--output-dir", str(killed), "--resume", *common), check=True, env=ENV, capture_output=True)
    a, b = _weights(full), _weights(killed)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key} differs after resume"
    # the metrics file holds each logged step once, as in the uninterrupted run
    steps_full = [line for line in (full / "metrics.jsonl").read_text().splitlines()]
    steps_resumed = [line for line in (killed / "metrics.jsonl").read_text().splitlines()]
    assert len(steps_full) == len(steps_resumed)


def test_two_process_gloo_matches_one_process(tmp_path: Path) -> None:
    common = ["trainer.max_steps=4", "trainer.progress=false", "trainer.plots=false", "n_pairs=512"]
    one, two = tmp_path / "one", tmp_path / "two"
    subprocess.run(_cli("--output-dir", str(one), "trainer.batch_size=64", *common), check=True, env=ENV,
                   capture_output=True)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29561",
                "-m", "mmalign.cli", "train", "demo"]
    out = subprocess.run([*torchrun, "--output-dir", str(two), "trainer.batch_size=32", *common], env=ENV,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    a, b = _weights(one), _weights(two)
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=1e-5)


def test_grad_accumulation_matches_larger_batch(tmp_path: Path) -> None:
    base = ["trainer.max_steps=3", "trainer.progress=false", "trainer.plots=false", "n_pairs=256"]
    big = run(load_config(DemoConfig, None, [*base, "trainer.batch_size=32"]), tmp_path / "big")
    acc = run(load_config(DemoConfig, None, [*base, "trainer.batch_size=8", "trainer.grad_accum_steps=4"]),
              tmp_path / "acc")
    assert big["step"] == acc["step"] == 3
    a, b = _weights(tmp_path / "big"), _weights(tmp_path / "acc")
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=1e-5)


def test_training_improves_the_demo_policy(tmp_path: Path) -> None:
    cfg = load_config(DemoConfig, None, ["trainer.max_steps=150", "trainer.progress=false", "n_pairs=2048"])
    out = run(cfg, tmp_path / "r")
    rows = (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()
    assert out["eval/pref_accuracy"] > 0.75
    assert out["eval/true_utility"] > 0.5 * out["eval/best_utility"]
    assert (tmp_path / "r" / "plots" / "train.png").exists() and len(rows) >= 10
    assert any((tmp_path / "r" / "tensorboard").iterdir())


def test_dataset_smaller_than_a_batch_fails_before_training(tmp_path: Path) -> None:
    cfg = load_config(DemoConfig, None, ["n_pairs=10", "trainer.batch_size=64"])
    with pytest.raises(ValueError, match="fewer than one global batch"):
        run(cfg, tmp_path / "r")
    assert not (tmp_path / "r" / "checkpoints").exists()


def test_resume_refuses_changed_settings(tmp_path: Path) -> None:
    cfg = load_config(DemoConfig, None, ["trainer.max_steps=4", "trainer.progress=false", "trainer.plots=false"])
    run(cfg, tmp_path / "r")
    changed = load_config(DemoConfig, None, ["trainer.max_steps=8", "trainer.lr=0.1", "trainer.progress=false"])
    with pytest.raises(RuntimeError, match="different training settings"):
        run(changed, tmp_path / "r", resume=True)
    longer = load_config(DemoConfig, None, ["trainer.max_steps=8", "trainer.progress=false", "trainer.plots=false"])
    assert run(longer, tmp_path / "r", resume=True)["step"] == 8
    shutil.rmtree(tmp_path / "r")


def test_resume_may_split_the_global_batch_differently(tmp_path: Path) -> None:
    base = ["trainer.progress=false", "trainer.plots=false", "trainer.save_every=3", "n_pairs=256", "hidden=16"]
    run(load_config(DemoConfig, None, [*base, "trainer.max_steps=6", "trainer.batch_size=32"]), tmp_path / "full")
    run(load_config(DemoConfig, None, [*base, "trainer.max_steps=3", "trainer.batch_size=32"]), tmp_path / "split")
    split = load_config(DemoConfig, None, [*base, "trainer.max_steps=6", "trainer.batch_size=8",
                                           "trainer.grad_accum_steps=4"])
    assert run(split, tmp_path / "split", resume=True)["step"] == 6
    a, b = _weights(tmp_path / "full"), _weights(tmp_path / "split")
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=1e-5)
    other_global = load_config(DemoConfig, None, [*base, "trainer.max_steps=9", "trainer.batch_size=16"])
    with pytest.raises(RuntimeError, match="different training settings"):
        run(other_global, tmp_path / "split", resume=True)


def test_resume_accepts_checkpoints_with_the_earlier_fingerprint(tmp_path: Path) -> None:
    from mmalign.train.trainer import _legacy_fingerprint

    base = ["trainer.progress=false", "trainer.plots=false", "n_pairs=256", "hidden=16"]
    cfg = load_config(DemoConfig, None, [*base, "trainer.max_steps=2"])
    run(cfg, tmp_path / "r")
    ckpt = latest_checkpoint(tmp_path / "r" / "checkpoints")
    state_file = ckpt / "trainer_state.json"
    state = json.loads(state_file.read_text())
    state["config_fingerprint"] = _legacy_fingerprint(cfg.trainer)  # as session-1 checkpoints hold it
    state_file.write_text(json.dumps(state))
    manifest = json.loads((ckpt / "manifest.json").read_text())
    manifest["trainer_state.json"] = state_file.stat().st_size
    (ckpt / "manifest.json").write_text(json.dumps(manifest))
    assert run(load_config(DemoConfig, None, [*base, "trainer.max_steps=4"]), tmp_path / "r", resume=True)["step"] == 4


def test_lora_adapters_start_from_cfg_seed_whatever_the_global_rng(tmp_path: Path) -> None:
    """peft initialises lora_A from the global RNG: the trainer must seed it, or runs are not reproducible."""
    from mmalign.train.config import TrainerConfig
    from mmalign.train.trainer import Trainer

    def adapters(global_seed: int, seed: int) -> dict[str, torch.Tensor]:
        torch.manual_seed(global_seed)
        model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
        cfg = TrainerConfig.from_dict({"seed": seed, "batch_size": 2, "progress": False,
                                       "lora": {"enabled": True, "target_modules": ["0", "2"]}})
        trainer = Trainer(cfg, model, [0, 1, 2, 3], lambda m, b: (torch.zeros(()), {}), tmp_path / f"{global_seed}")
        return {k: v.detach().clone() for k, v in trainer.unwrapped_model().named_parameters() if "lora_A" in k}

    before = torch.random.get_rng_state()
    a, b, c = adapters(1, seed=0), adapters(2, seed=0), adapters(1, seed=1)
    assert a.keys() == b.keys() and len(a) == 2
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)
    torch.random.set_rng_state(before)


def test_run_info_records_what_each_start_resolved(tmp_path: Path) -> None:
    base = ["trainer.progress=false", "trainer.plots=false", "n_pairs=128", "hidden=16"]
    run(load_config(DemoConfig, None, [*base, "trainer.max_steps=2"]), tmp_path / "r")
    run(load_config(DemoConfig, None, [*base, "trainer.max_steps=4"]), tmp_path / "r", resume=True)
    starts = json.loads((tmp_path / "r" / "run_info.json").read_text())["starts"]
    assert [s["resumed_at_step"] for s in starts] == [0, 2]
    assert all(s["device"] == "cpu" and s["mixed_precision"] == "no" and s["num_processes"] == 1
               and s["distributed"] == "ddp" for s in starts)


@pytest.mark.parametrize("available,bf16,cpu,expected", [
    (True, True, False, "bf16"),   # Ampere or newer
    (True, False, False, "no"),    # e.g. V100 / T4: fp16 would need loss scaling, so auto stays in fp32
    (True, True, True, "no"),      # trainer.cpu=true on a GPU machine
    (False, False, False, "no"),   # CPU / MPS machine
])
def test_auto_precision_decision(monkeypatch, available, bf16, cpu, expected) -> None:
    """The ``auto`` rule, with the GPU's presence and bf16 support simulated (the real GPU run is a gpu test)."""
    from mmalign.train.trainer import resolve_mixed_precision

    monkeypatch.setattr(torch.cuda, "is_available", lambda: available)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    assert resolve_mixed_precision("auto", cpu=cpu) == expected
    assert resolve_mixed_precision("fp16", cpu=cpu) == "fp16"  # an explicit setting is never changed


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_auto_precision_on_a_gpu_trains_in_bf16_and_resumes_exactly(tmp_path: Path) -> None:
    """On a bf16 GPU ``mixed_precision=auto`` resolves to bf16; stop + resume equals an uninterrupted run there too.

    Each run is a subprocess: accelerate fixes device and precision once per process.
    """
    env = {**ENV, "CUBLAS_WORKSPACE_CONFIG": ":4096:8"}
    common = ["trainer.save_every=4", "trainer.progress=false", "trainer.plots=false", "dropout=0.1",
              "n_pairs=512", "hidden=64"]
    script = ("import sys; from pathlib import Path; from mmalign.config import load_config; "
              "from mmalign.train.demo import DemoConfig, run; "
              "run(load_config(DemoConfig, None, sys.argv[3:]), Path(sys.argv[1]), resume=sys.argv[2] == 'resume')")
    for name, mode, steps in [("full", "new", 8), ("stop", "new", 4), ("stop", "resume", 8)]:
        subprocess.run([sys.executable, "-c", script, str(tmp_path / name), mode, f"trainer.max_steps={steps}",
                        *common], check=True, env=env, capture_output=True)
    info = json.loads((tmp_path / "full" / "run_info.json").read_text())["starts"][0]
    assert info["device"].startswith("cuda")
    assert info["mixed_precision"] == ("bf16" if torch.cuda.is_bf16_supported() else "no")
    a, b = _weights(tmp_path / "full"), _weights(tmp_path / "stop")
    assert all(t.dtype == torch.float32 for t in a.values())  # autocast computes in bf16, weights stay fp32
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key} differs after resume on {info['device_name']}"


class _Augmented(torch.utils.data.Dataset):
    """Each item drawn with torch, numpy and python random augmentation (as image pipelines do)."""

    def __len__(self) -> int:
        return 12

    def __getitem__(self, i: int) -> torch.Tensor:
        import random

        import numpy as np

        jitter = torch.rand(3) + float(np.random.rand()) + random.random()
        return torch.full((3,), float(i)) + jitter


def _tiny(run_dir: Path, resume: bool = False, dataset=None, **overrides) -> "Trainer":  # noqa: F821
    from mmalign.train.config import TrainerConfig
    from mmalign.train.trainer import Trainer

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Dropout(0.2), torch.nn.Linear(4, 1))
    cfg = TrainerConfig.from_dict({"batch_size": 2, "lr": 0.05, "progress": False, "plots": False, "log_every": 1,
                                   "cpu": True, **overrides})
    data = dataset if dataset is not None else [torch.randn(3, generator=torch.Generator().manual_seed(i))
                                                for i in range(12)]
    trainer = Trainer(cfg, model, data, lambda m, b: ((m(b) ** 2).mean(), {}), run_dir)
    trainer.train(resume=resume)
    return trainer


def _same_weights(a: "Trainer", b: "Trainer") -> bool:  # noqa: F821
    pa, pb = a.unwrapped_model().state_dict(), b.unwrapped_model().state_dict()
    return pa.keys() == pb.keys() and all(torch.equal(pa[k], pb[k]) for k in pa)


def test_stop_and_resume_with_dataloader_workers_is_exact(tmp_path: Path) -> None:
    """Random augmentation in worker processes continues its streams after a resume instead of restarting them."""
    common = {"num_workers": 1, "grad_accum_steps": 2}
    full = _tiny(tmp_path / "full", dataset=_Augmented(), max_steps=4, **common)
    _tiny(tmp_path / "stop", dataset=_Augmented(), max_steps=2, **common)
    resumed = _tiny(tmp_path / "stop", resume=True, dataset=_Augmented(), max_steps=4, **common)
    assert _same_weights(full, resumed)


def test_worker_batches_are_seeded_by_their_position_in_the_run() -> None:
    from mmalign.train.trainer import _SeededBatches, _StepBatches

    plain = _StepBatches(12, 2, 2, 1, 0, seed=0, start=1, stop=3)
    keyed = _StepBatches(12, 2, 2, 1, 0, seed=0, start=1, stop=3, keyed=True)
    # the same micro-batches, keyed by (step, micro) for the workers; num_workers=0 loads plain lists, as before
    assert list(keyed) == [(s, m, i) for (s, m), i in zip([(1, 0), (1, 1), (2, 0), (2, 1)], plain, strict=True)]
    assert all(type(i) is list for i in plain)
    data = _SeededBatches(_Augmented(), seed=0, rank=0)
    first = data.__getitems__((5, 1, [0, 1]))
    torch.rand(7)  # whatever ran in the worker before
    assert all(torch.equal(a, b) for a, b in zip(first, data.__getitems__((5, 1, [0, 1]))))
    assert not torch.equal(first[0], data.__getitems__((6, 1, [0, 1]))[0])
    assert not torch.equal(first[0], _SeededBatches(_Augmented(), seed=0, rank=1).__getitems__((5, 1, [0, 1]))[0])


def test_resuming_a_finished_run_does_not_rewrite_its_checkpoint(tmp_path: Path, monkeypatch) -> None:
    import mmalign.train.trainer as trainer_mod

    _tiny(tmp_path / "r", max_steps=3, save_every=2)
    saved: list[int] = []
    real = trainer_mod.save_checkpoint
    monkeypatch.setattr(trainer_mod, "save_checkpoint", lambda root, step, **kw: saved.append(step) or real(
        root, step, **kw))
    again = _tiny(tmp_path / "r", resume=True, max_steps=3, save_every=2)
    assert again.step == 3 and saved == []
    assert latest_checkpoint(tmp_path / "r" / "checkpoints").name == "step-00000003"
    assert (tmp_path / "r" / "model.safetensors").is_file()
    _tiny(tmp_path / "r", resume=True, max_steps=5, save_every=2)  # continuing still saves (step 4 and the end)
    assert saved == [4, 5]


def test_resume_refuses_a_max_steps_that_changes_the_lr_schedule(tmp_path: Path) -> None:
    from mmalign.train.checkpoint import CheckpointError

    _tiny(tmp_path / "cos", max_steps=3, lr_schedule="cosine")
    with pytest.raises(CheckpointError, match=r"max_steps=3; resuming with max_steps=6 would change the learning "
                                              r"rate the 'cosine' schedule gave step 1"):
        _tiny(tmp_path / "cos", resume=True, max_steps=6, lr_schedule="cosine")
    assert _tiny(tmp_path / "cos", resume=True, max_steps=3, lr_schedule="cosine").step == 3
    # while every step taken was in warmup, max_steps did not matter yet: extending equals an uninterrupted run
    warm = {"lr_schedule": "linear", "warmup_steps": 4}
    _tiny(tmp_path / "warm", max_steps=3, **warm)
    resumed = _tiny(tmp_path / "warm", resume=True, max_steps=6, **warm)
    assert _same_weights(resumed, _tiny(tmp_path / "full", max_steps=6, **warm))
    # a constant schedule never depends on it (with or without warmup)
    _tiny(tmp_path / "const", max_steps=3, lr_schedule="constant", warmup_steps=2)
    assert _tiny(tmp_path / "const", resume=True, max_steps=6, lr_schedule="constant", warmup_steps=2).step == 6


@pytest.mark.parametrize("dropout", [1.0, 1.5, -0.1])
def test_lora_dropout_must_be_below_one(dropout: float) -> None:
    """1.5 failed later inside peft and 1.0 silently trained nothing; the error names the nested field once."""
    from mmalign.train.config import LoraOptions

    with pytest.raises(ValueError, match=rf"^trainer\.lora\.dropout must be in \[0.0, 1.0\), got {dropout}$"):
        load_config(DemoConfig, None, [f"trainer.lora.dropout={dropout}"])
    assert LoraOptions(dropout=0.99).dropout == 0.99
