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
    deadline = time.time() + 900  # a guard only: the loop leaves at the first checkpoint of step >= 60
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


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_fp16_on_a_gpu_resumes_exactly_with_its_loss_scaler(tmp_path: Path) -> None:
    """fp16 with accelerate's loss scaler (one GPU): stop + resume equals an uninterrupted run, scaler included."""
    env = {**ENV, "CUBLAS_WORKSPACE_CONFIG": ":4096:8"}
    common = ["trainer.mixed_precision=fp16", "trainer.save_every=4", "trainer.progress=false", "trainer.plots=false",
              "dropout=0.1", "n_pairs=512", "hidden=64"]
    script = ("import sys; from pathlib import Path; from mmalign.config import load_config; "
              "from mmalign.train.demo import DemoConfig, run; "
              "run(load_config(DemoConfig, None, sys.argv[3:]), Path(sys.argv[1]), resume=sys.argv[2] == 'resume')")
    for name, mode, steps in [("full", "new", 8), ("stop", "new", 4), ("stop", "resume", 8)]:
        out = subprocess.run([sys.executable, "-c", script, str(tmp_path / name), mode, f"trainer.max_steps={steps}",
                              *common], env=env, capture_output=True, text=True)
        assert out.returncode == 0, out.stderr[-3000:]
        assert "loss-scaler state" not in out.stdout
    info = json.loads((tmp_path / "full" / "run_info.json").read_text())["starts"][0]
    assert info["device"].startswith("cuda") and info["mixed_precision"] == "fp16"
    ckpts = {name: tmp_path / name / "checkpoints" for name in ("full", "stop")}
    assert (ckpts["stop"] / "step-00000004" / "scaler.json").is_file()  # the state the resume starts from
    for file in ("scaler.json", "scheduler.json"):
        assert (json.loads((ckpts["full"] / "step-00000008" / file).read_text())
                == json.loads((ckpts["stop"] / "step-00000008" / file).read_text())), file
    a, b = _weights(tmp_path / "full"), _weights(tmp_path / "stop")
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


def _tiny(run_dir: Path, resume: bool = False, dataset=None, eval_fn=None, scaler=None, overflow_at=(),
          **overrides) -> "Trainer":  # noqa: F821
    """A small CPU run. ``scaler`` stands in for accelerate's fp16 loss scaler (CPU runs have none); at the steps in
    ``overflow_at`` the loss is scaled to 1e37, finite itself but overflowing float32 once the scaler multiplies it."""
    from mmalign.train.config import TrainerConfig
    from mmalign.train.trainer import Trainer

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Dropout(0.2), torch.nn.Linear(4, 1))
    cfg = TrainerConfig.from_dict({"batch_size": 2, "lr": 0.05, "progress": False, "plots": False, "log_every": 1,
                                   "cpu": True, **overrides})
    data = dataset if dataset is not None else [torch.randn(3, generator=torch.Generator().manual_seed(i))
                                                for i in range(12)]

    def loss_fn(m: torch.nn.Module, b: torch.Tensor) -> tuple[torch.Tensor, dict]:
        loss = (m(b) ** 2).mean()
        return (loss / loss.detach() * 1e37 if trainer.step in overflow_at else loss), {}

    trainer = Trainer(cfg, model, data, loss_fn, run_dir, eval_fn=eval_fn)
    if scaler is not None:
        trainer.accelerator.scaler = scaler  # before train(): a resume restores it, prepare hands it to the optimizer
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


def _weight_sum(m: torch.nn.Module) -> dict[str, float]:
    return {"eval/weight_sum": float(sum(p.detach().sum() for p in m.parameters()))}


def test_resuming_a_finished_run_does_not_rewrite_its_checkpoint(tmp_path: Path, monkeypatch) -> None:
    """Nor its metrics: the final evaluation, run again, is not logged a second time for the same step."""
    import mmalign.train.trainer as trainer_mod

    first = _tiny(tmp_path / "r", max_steps=3, save_every=2, eval_fn=_weight_sum)
    metrics = (tmp_path / "r" / "metrics.jsonl").read_text()
    assert [json.loads(x)["step"] for x in metrics.splitlines() if "eval/weight_sum" in x] == [3]
    saved: list[int] = []
    real = trainer_mod.save_checkpoint
    monkeypatch.setattr(trainer_mod, "save_checkpoint", lambda root, step, **kw: saved.append(step) or real(
        root, step, **kw))
    again = _tiny(tmp_path / "r", resume=True, max_steps=3, save_every=2, eval_fn=_weight_sum)
    assert again.step == 3 and saved == []
    assert latest_checkpoint(tmp_path / "r" / "checkpoints").name == "step-00000003"
    assert (tmp_path / "r" / "model.safetensors").is_file()
    assert (tmp_path / "r" / "metrics.jsonl").read_text() == metrics
    assert _weight_sum(again.unwrapped_model()) == _weight_sum(first.unwrapped_model())
    _tiny(tmp_path / "r", resume=True, max_steps=5, save_every=2, eval_fn=_weight_sum)  # continuing saves and logs
    assert saved == [4, 5]
    rows = [json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "eval/weight_sum" in r] == [3, 5]
    assert [r["step"] for r in rows if "train/loss" in r] == [1, 2, 3, 4, 5]


def test_metrics_are_logged_once_per_step_and_names(tmp_path: Path) -> None:
    from mmalign.train.logging import MetricsLogger, read_metrics

    log = MetricsLogger(tmp_path, tensorboard=False)
    log.log(1, {"train/loss": 0.5})
    log.log(1, {"eval/acc": float("nan")})
    log.log(1, {"train/loss": 0.5})
    again = MetricsLogger(tmp_path, tensorboard=False)  # a later start of the run reads what the file holds
    again.log(1, {"eval/acc": float("nan")})
    with pytest.warns(UserWarning, match=r"already holds step 1's \['train/loss'\] with other values; the first row "
                                         r"is kept: \{'step': 1, 'train/loss': 0.5\} \(now \{'train/loss': 0.7\}\)"):
        assert again.log(1, {"train/loss": 0.7}) == {"train/loss": 0.7}
    again.log(2, {"train/loss": 0.5})
    again.truncate_after(1)
    again.log(2, {"train/loss": 0.25})  # dropped by the truncation, so logged anew
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [(r["step"], sorted(r)) for r in rows] == [(1, ["step", "train/loss"]), (1, ["eval/acc", "step"]),
                                                      (2, ["step", "train/loss"])]
    assert rows[2]["train/loss"] == 0.25


def test_an_eval_fn_drawing_random_numbers_does_not_change_training(tmp_path: Path) -> None:
    """Evaluation runs under forked torch RNGs and restored numpy/python states (dropout and loading draw from them)."""
    import random

    import numpy as np

    def noisy_eval(m: torch.nn.Module) -> dict[str, float]:
        return {"eval/noise": float(torch.rand(()) + torch.nn.functional.dropout(torch.ones(3), 0.5).sum())
                + float(np.random.rand()) + random.random()}

    from mmalign.train.trainer import seed_everything

    seed_everything(0)  # _Augmented loads from the global numpy and python RNGs, which _tiny leaves as they are
    plain = _tiny(tmp_path / "plain", dataset=_Augmented(), max_steps=4)
    seed_everything(0)
    evaluated = _tiny(tmp_path / "eval", dataset=_Augmented(), max_steps=4, eval_every=1, eval_fn=noisy_eval)
    assert _same_weights(plain, evaluated)
    rows = (tmp_path / "eval" / "metrics.jsonl").read_text().splitlines()
    assert len([r for r in rows if "eval/noise" in r]) == 4


def test_evaluation_forks_the_cuda_rngs_once_cuda_is_in_use(tmp_path: Path, monkeypatch) -> None:
    """A GPU is simulated: evaluation forks every CUDA device's RNG when CUDA is initialised, and none before."""
    trainer = _tiny(tmp_path / "r", max_steps=1, eval_fn=_weight_sum)
    forked: list[list[int]] = []
    real = torch.random.fork_rng

    def spy(devices=None, enabled=True, **kw):
        forked.append(list(devices))
        return real(devices=[], enabled=enabled)  # the simulated devices have no RNG to fork

    monkeypatch.setattr(torch.random, "fork_rng", spy)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    for initialised in (True, False):
        monkeypatch.setattr(torch.cuda, "is_initialized", lambda: initialised)
        assert trainer._evaluate() == _weight_sum(trainer.unwrapped_model())
    assert forked == [[0, 1], []]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_an_eval_fn_drawing_from_the_cuda_rng_does_not_change_training_on_a_gpu(tmp_path: Path) -> None:
    def cuda_eval(m: torch.nn.Module) -> dict[str, float]:
        return {"eval/noise": float(torch.rand((), device="cuda") + torch.randn(3, device="cuda").sum())}

    plain = _tiny(tmp_path / "plain", max_steps=4, cpu=False)
    evaluated = _tiny(tmp_path / "eval", max_steps=4, cpu=False, eval_every=1, eval_fn=cuda_eval)
    assert next(evaluated.unwrapped_model().parameters()).device.type == "cuda"
    assert _same_weights(plain, evaluated)


def _cpu_scaler(growth_interval: int = 2) -> torch.amp.GradScaler:
    return torch.amp.GradScaler("cpu", init_scale=2.0**16, growth_interval=growth_interval)


def test_a_step_the_loss_scaler_skips_leaves_the_lr_schedule_alone(tmp_path: Path) -> None:
    """fp16: an update skipped for overflowing gradients must not advance the schedule either."""
    scaler = _cpu_scaler(growth_interval=100)
    trainer = _tiny(tmp_path / "r", scaler=scaler, overflow_at={1}, max_steps=4, max_grad_norm=0.0,
                    lr_schedule="linear", warmup_steps=8)
    assert scaler.get_scale() == 2.0**15  # the overflow at step 1 halved the scale, two good steps since
    assert trainer.scheduler.last_epoch == 3  # three updates applied
    lrs = [json.loads(x)["train/lr"] for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()
           if "train/lr" in x]
    assert lrs == pytest.approx([0.05 * k / 8 for k in (2, 2, 3, 4)])


def test_stop_and_resume_restores_the_loss_scaler(tmp_path: Path, capsys) -> None:
    """The scale and growth tracker continue from the checkpoint instead of restarting at the defaults."""
    common = {"overflow_at": {1}, "max_grad_norm": 0.0, "lr_schedule": "linear", "warmup_steps": 8}
    full_scaler, resumed_scaler = _cpu_scaler(), _cpu_scaler()
    full = _tiny(tmp_path / "full", scaler=full_scaler, max_steps=5, **common)
    _tiny(tmp_path / "stop", scaler=_cpu_scaler(), max_steps=3, **common)
    saved = json.loads((latest_checkpoint(tmp_path / "stop" / "checkpoints") / "scaler.json").read_text())
    assert (saved["scale"], saved["_growth_tracker"]) == (2.0**15, 1)
    resumed = _tiny(tmp_path / "stop", resume=True, scaler=resumed_scaler, max_steps=5, **common)
    assert resumed_scaler.state_dict() == full_scaler.state_dict() == {
        "scale": 2.0**16, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 2, "_growth_tracker": 1}
    assert _same_weights(full, resumed)
    assert resumed.scheduler.state_dict() == full.scheduler.state_dict()
    # a checkpoint written without a loss scaler: the scale restarts from its default, and the run says so
    common = {k: v for k, v in common.items() if k != "overflow_at"}
    _tiny(tmp_path / "plain", max_steps=2, **common)
    _tiny(tmp_path / "plain", resume=True, scaler=_cpu_scaler(), max_steps=3, **common)
    assert "holds no fp16 loss-scaler state" in capsys.readouterr().out


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


def test_resuming_a_finished_run_returns_what_the_run_returned(tmp_path: Path) -> None:
    """A phase of a multi-phase job that finished before a kill is resumed as a no-op: it must still report its
    final training metrics (a job's results table reads them)."""
    base = ["trainer.progress=false", "trainer.plots=false", "n_pairs=256", "hidden=16", "trainer.max_steps=4",
            "trainer.log_every=1", "trainer.eval_every=2"]
    first = run(load_config(DemoConfig, None, base), tmp_path / "r")
    again = run(load_config(DemoConfig, None, base), tmp_path / "r", resume=True)
    assert "train/loss" in first
    drop = {"perf/examples_per_s"}
    assert {k: v for k, v in again.items() if k not in drop} == {k: v for k, v in first.items() if k not in drop}


def test_a_run_stopped_between_a_checkpoint_and_its_evaluation_logs_that_evaluation(tmp_path: Path) -> None:
    """At a step with both, the evaluation comes before the checkpoint: a run stopped in its evaluation resumes from
    the step before and logs every row an uninterrupted run logs."""
    common = {"max_steps": 4, "save_every": 2, "eval_every": 2}
    _tiny(tmp_path / "full", eval_fn=_weight_sum, **common)
    calls: list[int] = []

    def stopped_at_first(m: torch.nn.Module) -> dict[str, float]:
        calls.append(1)
        if len(calls) == 1:
            raise KeyboardInterrupt  # stands in for a kill during the step-2 evaluation
        return _weight_sum(m)

    with pytest.raises(KeyboardInterrupt):
        _tiny(tmp_path / "stop", eval_fn=stopped_at_first, **common)
    _tiny(tmp_path / "stop", resume=True, eval_fn=_weight_sum, **common)

    def rows(run: Path) -> list[dict]:
        return [{k: v for k, v in json.loads(x).items() if not k.startswith("perf/")}
                for x in (run / "metrics.jsonl").read_text().splitlines()]

    assert rows(tmp_path / "stop") == rows(tmp_path / "full")
    assert [r["step"] for r in rows(tmp_path / "full") if "eval/weight_sum" in r] == [2, 4]


def test_a_fresh_run_seeds_the_global_rngs_from_cfg_seed(tmp_path: Path) -> None:
    """Dropout and augmentation loaded in the main process draw from the global torch/numpy/python RNGs: whatever the
    job drew before, a fresh run starts them from cfg.seed (as a resumed run restores them)."""
    import random

    import numpy as np

    np.random.seed(1), random.seed(1)
    a = _tiny(tmp_path / "a", dataset=_Augmented(), max_steps=4)
    np.random.seed(2), random.seed(2), torch.rand(5)  # the job drew something else before training
    b = _tiny(tmp_path / "b", dataset=_Augmented(), max_steps=4)
    assert _same_weights(a, b)
    # a run killed before its first checkpoint and resumed starts the same way
    (tmp_path / "early").mkdir()
    np.random.seed(3), random.seed(3)
    assert _same_weights(a, _tiny(tmp_path / "early", resume=True, dataset=_Augmented(), max_steps=4))


def test_the_global_rngs_of_a_resumed_run_are_the_checkpointed_ones(tmp_path: Path) -> None:
    """The fresh-run seeding leaves a resume from a checkpoint alone: it continues the checkpointed streams."""
    import random

    import numpy as np

    full = _tiny(tmp_path / "full", dataset=_Augmented(), max_steps=4)
    _tiny(tmp_path / "stop", dataset=_Augmented(), max_steps=2)
    np.random.seed(9), random.seed(9)
    assert _same_weights(full, _tiny(tmp_path / "stop", resume=True, dataset=_Augmented(), max_steps=4))


class _Stop(Exception):
    pass


@pytest.mark.parametrize("where", ["final evaluation", "final weights", "plots"])
def test_a_run_stopped_in_its_final_writes_finishes_them_on_resume(tmp_path: Path, monkeypatch, where: str) -> None:
    """Stopped after its last checkpoint (in the final evaluation, the model.safetensors write or the plots), the
    resumed run ends with the uninterrupted run's weights, metrics rows and files."""
    import safetensors.torch

    import mmalign.train.trainer as trainer_mod

    common = dict(max_steps=3, save_every=2, eval_every=2, eval_fn=_weight_sum, plots=True)
    _tiny(tmp_path / "full", **common)
    calls = {"eval": 0}

    def final_eval(m: torch.nn.Module) -> dict[str, float]:
        calls["eval"] += 1
        if calls["eval"] == 2:  # the evaluations run at step 2 and at the end
            raise _Stop
        return _weight_sum(m)

    real_save = safetensors.torch.save_file
    with monkeypatch.context() as patch:
        if where == "final evaluation":
            common_stop = {**common, "eval_fn": final_eval}
        else:
            common_stop = common
            if where == "final weights":
                patch.setattr(safetensors.torch, "save_file", lambda tensors, path, **kw: real_save(
                    tensors, path, **kw) if ".model.safetensors.tmp" not in str(path) else (_ for _ in ()).throw(_Stop))
            else:
                patch.setattr(trainer_mod, "plot_metrics", lambda *a, **kw: (_ for _ in ()).throw(_Stop))
        with pytest.raises(_Stop):
            _tiny(tmp_path / "stop", **common_stop)
    assert latest_checkpoint(tmp_path / "stop" / "checkpoints").name == "step-00000003"
    _tiny(tmp_path / "stop", resume=True, **common)

    def rows(run: Path) -> list[dict]:
        return [{k: v for k, v in json.loads(x).items() if not k.startswith("perf/")}
                for x in (run / "metrics.jsonl").read_text().splitlines()]

    assert rows(tmp_path / "stop") == rows(tmp_path / "full")
    full, stop = _weights(tmp_path / "full"), _weights(tmp_path / "stop")
    assert full.keys() == stop.keys() and all(torch.equal(full[k], stop[k]) for k in full)
    assert sorted(p.name for p in (tmp_path / "stop" / "plots").iterdir()) == sorted(
        p.name for p in (tmp_path / "full" / "plots").iterdir())
    assert not list((tmp_path / "stop").glob(".*.tmp"))
