"""RAPL: triplet loss, encoders, data/teacher, OT reward model and wrapper, pipeline smoke run."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from mmalign.robotics.encoders import build_encoder, calibrate_embedding_norm
from mmalign.robotics.rapl import (OTRewardModel, OTRewardWrapper, RaplConfig, _batches, num_train_steps,
                                   rapl_triplet_loss, run, spearman)
from mmalign.robotics.rapl_data import collect_trajectories, label_triplets, make_triplets


def test_triplet_loss_hand_computed_and_direction() -> None:
    s1, s2 = torch.tensor([-0.1, -0.3]), torch.tensor([-0.2, -0.1])
    loss, metrics = rapl_triplet_loss(s1, s2, torch.tensor([1.0, 0.0]), scale=10.0)
    # logits 10*(s1-s2) = [1, -2]; BCE with labels [1, 0]: [log(1+e^-1), log(1+e^-2)]
    expected = (math.log1p(math.exp(-1.0)) + math.log1p(math.exp(-2.0))) / 2
    assert float(loss) == pytest.approx(expected, rel=1e-6)
    assert float(metrics["train/pref_accuracy"]) == 1.0
    s1.requires_grad_(True)
    rapl_triplet_loss(s1, s2, torch.ones(2), scale=10.0)[0].backward()
    assert (s1.grad < 0).all()  # descending the loss raises the preferred candidate's similarity


@pytest.mark.parametrize("kind", ["tiny_cnn", "open_clip"])
def test_encoders_shapes(kind: str) -> None:
    enc = build_encoder(kind, embed_dim=16, image_size=32)
    z = enc(torch.randint(0, 255, (2, 3, 32, 32, 3), dtype=torch.uint8))
    assert z.shape == (2, 3, 16)


def _static_scene(n: int = 24, size: int = 32) -> torch.Tensor:
    """Frames of a mostly static scene: grey background, one small bright square moving along the diagonal."""
    frames = torch.full((n, size, size, 3), 90, dtype=torch.uint8)
    for i in range(n):
        p = i * (size - 4) // n
        frames[i, p : p + 4, p : p + 4] = torch.tensor([250, 40, 40], dtype=torch.uint8)
    return frames


def test_embed_norm_spreads_embeddings_of_a_static_scene_and_calibrates_exactly() -> None:
    frames = _static_scene()
    torch.manual_seed(1)
    plain = build_encoder("tiny_cnn", embed_dim=16, image_size=32).eval()
    torch.manual_seed(1)
    normed = build_encoder("tiny_cnn", embed_dim=16, image_size=32, embed_norm=True)
    assert "norm.running_mean" not in plain.state_dict()  # off by default: old checkpoints still load
    with torch.no_grad():
        zp = torch.nn.functional.normalize(plain(frames), dim=-1)
    assert (zp @ zp.T).min() > 0.95  # the collapse embed_norm exists for: every frame points the same way
    calibrate_embedding_norm(normed, frames)
    assert not normed.training
    with torch.no_grad():
        raw = normed.project(frames).double()
        z = normed(frames).double()
    assert torch.allclose(normed.norm.running_mean.double(), raw.mean(0), atol=1e-5)
    assert torch.allclose(z.mean(0), torch.zeros(16, dtype=torch.float64), atol=1e-4)
    assert torch.allclose(z.var(0, unbiased=False), torch.ones(16, dtype=torch.float64), atol=0.03)
    zn = torch.nn.functional.normalize(z, dim=-1)
    assert (zn @ zn.T).min() < 0.0  # centred: the first and last frames now point apart
    with pytest.raises(ValueError, match="at least 2 frames"):
        calibrate_embedding_norm(normed, frames[:1])


def test_resnet18_loads_local_weights(tmp_path) -> None:
    torchvision = pytest.importorskip("torchvision")
    from safetensors.torch import save_file

    net = torchvision.models.resnet18(weights=None)
    save_file(net.state_dict(), str(tmp_path / "r18.safetensors"))
    enc = build_encoder("resnet18", embed_dim=8, weights_path=str(tmp_path / "r18.safetensors"))
    assert torch.equal(enc.backbone.conv1.weight, net.conv1.weight)
    assert enc(torch.zeros(1, 2, 64, 64, 3, dtype=torch.uint8)).shape == (1, 2, 8)
    with pytest.raises(ValueError, match="weights_path"):
        build_encoder("resnet18", weights_path=str(tmp_path / "missing.pt"))
    with pytest.raises(ValueError, match="kind"):
        build_encoder("vit_h")


def _tiny_clip_checkpoint(tmp_path, name: str):  # type: ignore[no-untyped-def]
    """A registered tiny open_clip architecture ``name``, its seeded model, saved to tmp_path/clip.safetensors."""
    open_clip = pytest.importorskip("open_clip")
    from safetensors.torch import save_file

    cfg = {"embed_dim": 16, "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16,
                                           "patch_size": 16},
           "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 16, "heads": 2, "layers": 1}}
    (tmp_path / f"{name}.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(tmp_path / f"{name}.json")
    torch.manual_seed(3)
    model = open_clip.create_model(name)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "clip.safetensors"))
    return model


def test_open_clip_loads_local_weights(tmp_path) -> None:
    """A local open_clip checkpoint (safetensors) of a registered architecture is loaded into the image tower."""
    model = _tiny_clip_checkpoint(tmp_path, "mmalign-tiny-clip")
    torch.manual_seed(4)  # a different random init: equality below can only come from the file
    enc = build_encoder("open_clip", embed_dim=8, weights_path=str(tmp_path / "clip.safetensors"),
                        open_clip_model="mmalign-tiny-clip")
    assert enc.input_size == 32
    assert torch.equal(enc.backbone.conv1.weight, model.visual.conv1.weight)
    assert enc(torch.zeros(1, 2, 64, 64, 3, dtype=torch.uint8)).shape == (1, 2, 8)


def test_open_clip_normalises_pixels_with_the_checkpoints_own_statistics(tmp_path) -> None:
    """A pretrained CLIP tower sees pixels standardised with CLIP's mean/std (OpenAI's), not ImageNet's."""
    model = _tiny_clip_checkpoint(tmp_path, "mmalign-tiny-clip2")
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
    enc = build_encoder("open_clip", embed_dim=8, weights_path=str(tmp_path / "clip.safetensors"),
                        open_clip_model="mmalign-tiny-clip2").eval()
    frames = torch.randint(0, 256, (3, 32, 32, 3), dtype=torch.uint8)
    x = frames.permute(0, 3, 1, 2).float() / 255.0
    x = (x - torch.tensor(OPENAI_DATASET_MEAN).view(1, 3, 1, 1)) / torch.tensor(OPENAI_DATASET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        expected = enc.head(model.visual.eval()(x))
        assert torch.allclose(enc.project(frames), expected, atol=1e-5)


def test_simulated_human_triplets() -> None:
    returns = np.array([5.0, 4.0, 1.0, 2.0, 3.0, 0.0, 2.0])
    trip = make_triplets(returns, 50, np.random.default_rng(0), anchor_pool=2)
    assert set(trip[:, 0]) <= {0, 1}
    assert not np.isin(trip[:, 1:], [0, 1]).any() and (trip[:, 1] != trip[:, 2]).all()
    labels = label_triplets(returns, trip, np.random.default_rng(0))
    d = returns[trip[:, 1]] - returns[trip[:, 2]]
    assert np.array_equal(labels, np.where(d > 0, 1.0, np.where(d < 0, 0.0, 0.5)))
    noisy = label_triplets(returns, trip, np.random.default_rng(0), beta=1e-6)
    assert set(np.unique(noisy)) <= {0.0, 1.0} and 0.2 < noisy.mean() < 0.8


def test_rollouts_record_frames_positions_and_true_reward() -> None:
    tr = collect_trajectories("mmalign/PushAvoidArm-v0", 2, seed=0, steps=5, image_size=32)
    assert tr.frames.shape == (2, 5, 32, 32, 3) and tr.positions.shape == (2, 5, 4)
    assert (tr.true_rewards <= tr.task_rewards + 1e-6).all()
    assert spearman(np.arange(5.0), np.arange(5.0) ** 2) == pytest.approx(1.0)


def test_ot_reward_prefers_demo_like_rollouts_and_wrapper_serves_it() -> None:
    import gymnasium as gym

    import mmalign.envs  # noqa: F401

    torch.manual_seed(0)
    enc = build_encoder("tiny_cnn", embed_dim=8, image_size=32)
    tr = collect_trajectories("mmalign/PushAvoidPoint-v0", 3, seed=1, steps=6, image_size=32)
    model = OTRewardModel(enc, tr.frames[:1], reg=0.05, num_iters=50)
    r = model.rewards(tr.frames)
    assert r.shape == (3, 6)
    assert r[0].sum() >= r[1:].sum(axis=1).max()  # the demo itself scores best
    env = OTRewardWrapper(gym.make("mmalign/PushAvoidPoint-v0", episode_steps=4, image_size=32,
                                   render_mode="rgb_array"), enc, tr.frames[:2])
    env.reset(seed=0)
    for _ in range(4):
        _, reward, _, trunc, info = env.step(env.action_space.sample())
        assert np.isfinite(reward) and -2.0 <= reward <= 0.0 and "env_reward" in info
    assert trunc
    with pytest.raises(ValueError, match="render_mode"):
        OTRewardWrapper(gym.make("mmalign/PushAvoidPoint-v0"), enc, tr.frames[:1])


def test_policy_env_renders_at_the_config_image_size(monkeypatch: pytest.MonkeyPatch) -> None:
    """The policy's OT reward compares its frames with demos rendered at cfg.image_size: same size on both sides."""
    import stable_baselines3

    from mmalign.robotics.rapl import train_policy

    frames: list[np.ndarray] = []

    class _NoLearning:  # stands in for PPO: records the training env's frames, acts with zeros
        def __init__(self, policy: str, env, **kwargs) -> None:  # type: ignore[no-untyped-def]
            self.env = env

        def learn(self, total_timesteps: int) -> None:
            self.env.reset(seed=0)
            _, reward, _, _, _ = self.env.step(np.zeros(2, np.float32))
            assert np.isfinite(reward)
            frames.append(self.env.render())

        def predict(self, obs, deterministic: bool = True):  # type: ignore[no-untyped-def]
            return np.zeros(2, np.float32), None

    monkeypatch.setattr(stable_baselines3, "PPO", _NoLearning)
    cfg = RaplConfig(steps=3, image_size=32)
    torch.manual_seed(0)
    enc = build_encoder("tiny_cnn", embed_dim=8, image_size=32)
    demos = collect_trajectories("mmalign/PushAvoidPoint-v0", 1, seed=1, steps=3, image_size=32).frames
    train_policy(cfg, enc, demos, timesteps=1)
    assert frames[0].shape == demos.shape[2:] == (32, 32, 3)


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="encoder"):
        RaplConfig(encoder="vgg")
    with pytest.raises(ValueError, match="reg"):
        RaplConfig(reg=0.0)
    with pytest.raises(ValueError, match="n_train_traj"):
        RaplConfig(n_train_traj=5, anchor_pool=6)
    with pytest.raises(ValueError, match="train_length.*'iterations'"):
        RaplConfig(train_length="iterations")
    for bad in (0.0, -2.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match=f"train_epochs.*{bad!r}"):
            RaplConfig(train_epochs=bad)
    with pytest.raises(ValueError, match="run_rapl and run_bt_baseline"):
        RaplConfig(run_rapl=False, run_bt_baseline=False)
    with pytest.raises(ValueError, match="policy_timesteps=64"):
        RaplConfig(run_rapl=False, policy_timesteps=64)


def test_training_length_scales_with_data_in_epochs_mode() -> None:
    epochs = RaplConfig(train_length="epochs", train_epochs=32.0, batch_size=8)
    assert [num_train_steps(n, epochs) for n in (25, 50, 100, 200)] == [100, 200, 400, 800]
    assert num_train_steps(10, RaplConfig(train_epochs=0.3, batch_size=1)) == 3  # no float round-up to 4
    assert num_train_steps(3, RaplConfig(train_epochs=2.0, batch_size=8)) == 2  # batch capped at the data size
    assert num_train_steps(1, RaplConfig(train_epochs=0.01)) == 1
    fixed = RaplConfig(train_length="steps", train_steps=100)
    assert {num_train_steps(n, fixed) for n in (25, 200)} == {100}
    with pytest.raises(ValueError, match="num_items.*0"):
        num_train_steps(0, epochs)


def test_epoch_batches_use_every_triplet_equally_often() -> None:
    cfg = RaplConfig(train_length="epochs", train_epochs=3.0, batch_size=4)
    batches = list(_batches(12, cfg, torch.Generator().manual_seed(0)))
    assert len(batches) == 9 and all(len(b) == 4 for b in batches)
    assert torch.bincount(torch.cat(batches), minlength=12).tolist() == [3] * 12
    # each epoch is a permutation (no triplet twice before all were seen once)
    assert sorted(torch.cat(batches[:3]).tolist()) == list(range(12))


def test_fixed_step_batches_keep_the_old_with_replacement_stream() -> None:
    cfg = RaplConfig(train_length="steps", train_steps=5, batch_size=8)
    got = list(_batches(30, cfg, torch.Generator().manual_seed(3)))
    gen = torch.Generator().manual_seed(3)
    want = [torch.randint(30, (8,), generator=gen) for _ in range(5)]
    assert all(torch.equal(g, w) for g, w in zip(got, want)) and len(got) == 5


def _smoke(tmp_path, policy_timesteps: int) -> dict:
    # 12 triplets, batch 4, 1 epoch -> 3 steps for RAPL and for BT
    cfg = RaplConfig(n_train_traj=10, n_eval_traj=6, steps=6, image_size=32, num_prefs=12, anchor_pool=2,
                     train_length="epochs", train_epochs=1.0, batch_size=4, policy_timesteps=policy_timesteps)
    out = run(cfg, tmp_path)
    for split in ("heldout", "cross"):
        for m in ("rapl", "unaligned_ot", "bt_pixels", "task_reward"):
            assert -1.0 <= out[f"{split}/spearman_{m}"] <= 1.0
    assert (tmp_path / "rapl_encoder.safetensors").is_file()
    assert out["train/steps"] == 3
    for name in ("rapl_train.jsonl", "bt_train.jsonl"):
        assert len((tmp_path / name).read_text().splitlines()) == 3
    assert 0.0 <= out["rapl/final_pref_accuracy"] <= 1.0 and 0.0 <= out["bt/final_pref_accuracy"] <= 1.0
    assert json.loads((tmp_path / "metrics.json").read_text()) == out
    return out


def test_rapl_pipeline_smoke(tmp_path) -> None:
    _smoke(tmp_path, policy_timesteps=0)


def test_bt_only_run_skips_rapl(tmp_path) -> None:
    cfg = RaplConfig(n_train_traj=10, n_eval_traj=6, steps=6, image_size=32, num_prefs=12, anchor_pool=2,
                     cross_env_id="", train_length="steps", train_steps=2, batch_size=4, run_rapl=False)
    out = run(cfg, tmp_path)
    assert out["train/steps"] == 2 and "heldout/spearman_bt_pixels" in out
    assert not any("rapl" in k or "unaligned" in k for k in out)
    assert not (tmp_path / "rapl_train.jsonl").exists()


@pytest.mark.slow
def test_rapl_pipeline_with_ppo_policy_smoke(tmp_path) -> None:
    assert np.isfinite(_smoke(tmp_path, policy_timesteps=64)["policy/true_return"])


def test_bt_pixel_training_leaves_the_callers_global_rng_alone() -> None:
    """The BT baseline's seeded init must not reseed torch's global RNG (it did: torch.manual_seed inside)."""
    from mmalign.robotics.rapl import train_bt_pixels

    frames = np.random.default_rng(0).integers(0, 256, (4, 2, 16, 16, 3), dtype=np.uint8)
    cfg = RaplConfig(image_size=16, frame_stride=1, train_length="steps", train_steps=1, batch_size=2)
    torch.manual_seed(1234)
    before = torch.get_rng_state()
    train_bt_pixels(frames, np.array([[0, 1, 2], [0, 3, 1]]), np.array([1.0, 0.0], np.float32), cfg)
    assert torch.equal(torch.get_rng_state(), before)
