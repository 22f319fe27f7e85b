"""Reward models: shapes, masks, ensembles (bootstrapping, aggregation), normalisation, BT fit on a linear task."""

from __future__ import annotations

import pytest
import torch

from mmalign.core.reward_models import (
    CNNRewardModel,
    FeatureRewardHead,
    MLPRewardModel,
    RewardEnsemble,
    RewardFitConfig,
    SegmentPairs,
    aggregate,
    fit_reward_model,
)
from mmalign.core.reward_models import fit as fit_module
from mmalign.core.teachers import SimulatedHuman
from mmalign.registry import REWARD_MODELS



def _linear_task(n: int, seed: int, h: int = 8, d: int = 4, a: int = 2) -> SegmentPairs:
    g = torch.Generator().manual_seed(seed)
    w = torch.tensor([1.0, -2.0, 0.5, 1.5, -1.0, 0.7])
    o1, o2 = torch.randn(n, h, d, generator=g), torch.randn(n, h, d, generator=g)
    a1, a2 = torch.randn(n, h, a, generator=g), torch.randn(n, h, a, generator=g)
    reward = lambda o, act: torch.cat([o, act], -1) @ w  # noqa: E731
    out = SimulatedHuman()(reward(o1, a1), reward(o2, a2))
    return SegmentPairs.from_teacher(out, o1, o2, a1, a2)


def test_shapes_and_masked_segment_returns() -> None:
    torch.manual_seed(0)
    m = MLPRewardModel(4, 2, hidden=(8,))
    obs, act = torch.randn(3, 5, 4), torch.randn(3, 5, 2)
    r = m.step_rewards(obs, act)
    assert r.shape == (3, 5)
    mask = torch.tensor([[True] * 5, [True, True, False, False, False], [False] * 5])
    ret = m.segment_returns(obs, act, mask)
    assert torch.allclose(ret, (r * mask).sum(1)) and ret[2] == 0
    with pytest.raises(ValueError, match="act"):
        m.step_rewards(obs)
    cnn = CNNRewardModel(3, 16, channels=(4, 4), hidden=(8,))
    assert cnn.segment_returns(torch.randint(0, 256, (2, 3, 3, 16, 16), dtype=torch.uint8)).shape == (2,)
    assert FeatureRewardHead(6).step_rewards(torch.randn(2, 3, 6)).shape == (2, 3)
    assert set(REWARD_MODELS.names()) >= {"mlp", "cnn", "feature_head", "ensemble"}


def test_normalization_standardises_rewards() -> None:
    torch.manual_seed(0)
    m = MLPRewardModel(4, hidden=(8,), output_activation=None)
    obs = torch.randn(50, 6, 4) * 3 + 1
    m.fit_normalization(obs)
    r = m.step_rewards(obs, normalize=True)
    assert r.mean().abs() < 1e-5 and (r.std(unbiased=False) - 1).abs() < 1e-4
    assert not torch.allclose(m.step_rewards(obs), r)


def test_ensemble_mean_std_disagreement_and_aggregation() -> None:
    ens = RewardEnsemble.build(lambda: MLPRewardModel(3, hidden=(8,)), 4, seed=1)
    again = RewardEnsemble.build(lambda: MLPRewardModel(3, hidden=(8,)), 4, seed=1)
    obs = torch.randn(5, 2, 3)
    r = ens.segment_returns(obs)
    assert r.shape == (4, 5) and torch.equal(r, again.segment_returns(obs))
    mean, std = ens.mean_std(obs)
    assert torch.allclose(mean, r.mean(0)) and torch.allclose(std, r.std(0, unbiased=False))
    vals = torch.tensor([[1.0, 4.0], [3.0, 0.0]])
    assert aggregate(vals, "mean").tolist() == [2.0, 2.0]
    assert aggregate(vals, "min").tolist() == [1.0, 0.0]
    assert aggregate(vals, "mean_minus_std", 0.5).tolist() == [1.5, 1.0]
    assert aggregate(vals, "mean_minus_var").tolist() == [1.0, -2.0]
    with pytest.raises(ValueError, match="mode"):
        aggregate(vals, "max")
    logits = torch.tensor([[0.0, 100.0], [0.0, -100.0]])
    assert torch.allclose(RewardEnsemble.disagreement(logits), torch.tensor([0.0, 0.5]))


def test_fit_reaches_high_heldout_accuracy_on_linear_reward() -> None:
    torch.manual_seed(0)
    train, val = _linear_task(300, seed=0), _linear_task(300, seed=1)
    model = FeatureRewardHead(4, act_dim=2, layer_norm=False)
    res = fit_reward_model(model, train, val, RewardFitConfig(epochs=25, lr=3e-2, batch_size=64, device="cpu"))
    assert res.metrics["eval/pref_accuracy"] > 0.95
    assert res.history[0]["train/loss"] > res.history[-1]["train/loss"]


def test_fit_ensemble_bootstraps_members(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[torch.Tensor] = []
    real = torch.randint

    def spy(*args, **kwargs):  # type: ignore[no-untyped-def]
        out = real(*args, **kwargs)
        seen.append(out)
        return out

    monkeypatch.setattr(fit_module.torch, "randint", spy)
    torch.manual_seed(0)
    data = _linear_task(60, seed=2)
    ens = RewardEnsemble.build(lambda: MLPRewardModel(4, 2, hidden=(8,)), 3, seed=0)
    res = fit_reward_model(ens, data, config=RewardFitConfig(epochs=1, batch_size=16, val_fraction=0.0))
    index_sets = seen[:3]  # drawn once per member before training
    assert all(len(s) == 60 for s in index_sets)
    assert all(len(torch.unique(s)) < 60 for s in index_sets)  # resampled with replacement
    assert not torch.equal(index_sets[0], index_sets[1])
    assert res.metrics["train/num_pairs"] == 60.0


def test_fit_is_deterministic_given_seed() -> None:
    data = _linear_task(80, seed=3)
    results = []
    for _ in range(2):
        torch.manual_seed(0)
        m = MLPRewardModel(4, 2, hidden=(8,))
        results.append(fit_reward_model(m, data, config=RewardFitConfig(epochs=2, seed=5)).metrics)
    assert results[0] == results[1]


def test_segment_pairs_validation() -> None:
    with pytest.raises(ValueError, match="labels"):
        SegmentPairs(torch.zeros(2, 3, 1), torch.zeros(2, 3, 1), torch.tensor([0.5, 1.5]))
    with pytest.raises(ValueError, match="obs_second"):
        SegmentPairs(torch.zeros(2, 3, 1), torch.zeros(2, 4, 1), torch.tensor([0.5, 1.0]))
    with pytest.raises(ValueError, match="act_first"):
        obs = torch.zeros(2, 3, 1)
        SegmentPairs(obs, obs, torch.tensor([0.5, 1.0]), act_second=torch.zeros(2, 3, 1))
    with pytest.raises(ValueError, match="lr"):
        RewardFitConfig(lr=0.0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fit_and_teachers_run_on_cuda() -> None:
    torch.manual_seed(0)
    train = _linear_task(200, seed=0)
    model = FeatureRewardHead(4, act_dim=2, layer_norm=False)
    res = fit_reward_model(model, train, config=RewardFitConfig(epochs=10, lr=3e-2, device="cuda"))
    assert next(model.parameters()).is_cuda and res.metrics["eval/pref_accuracy"] > 0.8
    r = torch.randn(100, 5, device="cuda")
    out = SimulatedHuman(beta=1.0, eps_mistake=0.1)(r, r.flip(0), rng=0)
    assert out.labels.is_cuda and out.answered.is_cuda


def test_segment_pairs_from_teacher_drops_skipped_pairs() -> None:
    rewards = torch.tensor([[5.0], [-5.0], [1.0]])
    teacher = SimulatedHuman(eps_skip=1.0, return_scale=0.0)  # skip iff both returns <= 0
    out = teacher(rewards, torch.zeros(3, 1))
    obs = torch.arange(3.0).reshape(3, 1, 1)
    pairs = SegmentPairs.from_teacher(out, obs, obs + 10)
    assert len(pairs) == 2 and pairs.obs_first[:, 0, 0].tolist() == [0.0, 2.0]
    assert pairs.labels.tolist() == [1.0, 1.0]


def _fitted_ensemble():
    from mmalign.core.reward_models import MLPRewardModel, RewardEnsemble

    ens = RewardEnsemble.build(lambda: MLPRewardModel(5, 2, hidden=(8, 8), input_norm=True, action_squares=True),
                               size=3, seed=0)
    g = torch.Generator().manual_seed(0)
    obs, act = torch.randn(40, 4, 5, generator=g), torch.randn(40, 4, 2, generator=g)
    for m in ens._models():
        m.fit_input_normalization(obs, act, act_weight=1.5)
    ens.fit_normalization(obs, act)
    return ens, obs, act


def test_save_pretrained_reloads_bitwise_with_every_normalisation(tmp_path):
    from mmalign.core.reward_models import RewardEnsemble, load_pretrained

    ens, obs, act = _fitted_ensemble()
    mean, std = torch.arange(5.0), torch.full((5,), 2.0)
    folder = ens.save_pretrained(tmp_path / "rm", obs_mean=mean, obs_std=std, env_id="Toy-v0")
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]  # nothing pickled
    again = RewardEnsemble.from_pretrained(folder)
    for (k, a), (k2, b) in zip(ens.state_dict().items(), again.state_dict().items()):
        assert k == k2 and torch.equal(a, b), k
    assert any("reward_std" in k for k in again.state_dict()) and any("input_mean" in k for k in again.state_dict())
    with torch.no_grad():
        assert torch.equal(ens.step_rewards(obs, act, normalize=True), again.step_rewards(obs, act, normalize=True))
    _, extras = load_pretrained(folder)
    assert torch.equal(extras["obs_mean"], mean) and torch.equal(extras["obs_std"], std)
    assert extras["meta"] == {"env_id": "Toy-v0"}


def test_single_pixel_model_round_trip(tmp_path):
    from mmalign.core.reward_models import CNNRewardModel, RewardEnsemble

    model = CNNRewardModel(in_channels=6, image_size=16, act_dim=2, channels=(4, 4), hidden=(8,))
    model.save_pretrained(tmp_path / "cnn")
    again = CNNRewardModel.from_pretrained(tmp_path / "cnn")
    frames = torch.randint(0, 255, (2, 3, 6, 16, 16), dtype=torch.uint8)
    act = torch.randn(2, 3, 2)
    with torch.no_grad():
        assert torch.equal(model.step_rewards(frames, act), again.step_rewards(frames, act))
    with pytest.raises(ValueError, match="not a RewardEnsemble"):
        RewardEnsemble.from_pretrained(tmp_path / "cnn")


def test_bad_reward_model_folders_name_the_file(tmp_path):
    import json

    from mmalign.core.reward_models import load_pretrained

    ens, _, _ = _fitted_ensemble()
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_pretrained(tmp_path / "missing")
    folder = ens.save_pretrained(tmp_path / "rm")
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "members": [{"name": "transformer", "kwargs": {}}]}))
    with pytest.raises(ValueError, match=r"config.json: members\[0\].name must be one of"):
        load_pretrained(folder)
    cfg["members"][0]["kwargs"]["hidden"] = [16, 16]  # the tensors no longer fit the config
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="model.safetensors does not match"):
        load_pretrained(folder)
    (folder / "model.safetensors").write_bytes(b"\x00" * 10)
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        load_pretrained(folder)
    (folder / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_pretrained(folder)
