"""Per-step reward networks: state / state-action MLP, pixel CNN, head over precomputed features.

Every model maps observations ``[N, H, *obs_shape]`` (and actions ``[N, H, act_dim]``) to per-step rewards
``[N, H]``; :meth:`RewardModel.segment_returns` sums them over valid steps, which is what the Bradley–Terry loss
compares. Reward normalisation (OpenRLHF-style: stored mean/std, applied on request at inference) is fitted on
data with :meth:`RewardModel.fit_normalization`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Sequence

import torch
from torch import Tensor, nn

from mmalign.core.reward_models.artifact import SavePretrainedMixin

__all__ = ["RewardModel", "MLPRewardModel", "CNNRewardModel", "FeatureRewardHead", "make_mlp"]

_ACTIVATIONS = {"relu": nn.ReLU, "leaky_relu": nn.LeakyReLU, "tanh": nn.Tanh, "gelu": nn.GELU, "silu": nn.SiLU}


def make_mlp(in_dim: int, hidden: Sequence[int], out_dim: int, activation: str = "leaky_relu") -> nn.Sequential:
    """``Linear → act`` for each hidden width, then a ``Linear`` to ``out_dim``."""
    if activation not in _ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(_ACTIVATIONS)}, got {activation!r}")
    layers: list[nn.Module] = []
    for width in hidden:
        if int(width) <= 0:
            raise ValueError(f"hidden widths must be > 0, got {list(hidden)}")
        layers += [nn.Linear(in_dim, int(width)), _ACTIVATIONS[activation]()]
        in_dim = int(width)
    layers.append(nn.Linear(in_dim, out_dim))
    return nn.Sequential(*layers)


class RewardModel(nn.Module, SavePretrainedMixin, ABC):
    """Base class: per-step reward ``r(o_t, a_t)``; subclasses implement :meth:`_rewards` on flat steps."""

    obs_ndim: int = 1  # trailing dims of one observation (1 for vectors, 3 for images)
    init_kwargs: dict  # JSON-able constructor arguments (save_pretrained writes them to config.json)
    reward_mean: Tensor
    reward_std: Tensor

    def __init__(self, act_dim: int = 0) -> None:
        super().__init__()
        if int(act_dim) < 0:
            raise ValueError(f"act_dim must be >= 0, got {act_dim}")
        self.act_dim = int(act_dim)
        self.register_buffer("reward_mean", torch.zeros(()))
        self.register_buffer("reward_std", torch.ones(()))

    @abstractmethod
    def _rewards(self, obs: Tensor, act: Tensor | None) -> Tensor:
        """Rewards ``[M]`` for ``M`` flat steps ``obs [M, *obs_shape]``, ``act [M, act_dim]``."""

    def step_rewards(self, obs: Tensor, act: Tensor | None = None, *, normalize: bool = False) -> Tensor:
        """Per-step rewards of shape ``obs.shape[:-obs_ndim]`` (e.g. ``[N, H]``); ``normalize`` applies the stats."""
        lead = obs.shape[: obs.dim() - self.obs_ndim]
        if len(lead) == 0:
            raise ValueError(f"obs must have at least one leading (batch) dim, got shape {tuple(obs.shape)}")
        if self.act_dim:
            if act is None or tuple(act.shape) != (*lead, self.act_dim):
                got = None if act is None else tuple(act.shape)
                raise ValueError(f"act must have shape {(*lead, self.act_dim)} for this model, got {got}")
            act = act.reshape(-1, self.act_dim)
        else:
            act = None
        r = self._rewards(obs.reshape(-1, *obs.shape[len(lead):]), act).reshape(lead)
        if normalize:
            r = (r - self.reward_mean) / self.reward_std
        return r

    forward = step_rewards

    def segment_returns(
        self, obs: Tensor, act: Tensor | None = None, mask: Tensor | None = None, *, normalize: bool = False
    ) -> Tensor:
        """Sum of per-step rewards over valid steps: ``[N, H, ...] -> [N]``."""
        r = self.step_rewards(obs, act, normalize=normalize)
        if mask is not None:
            r = r * mask.to(r.dtype)
        return r.sum(dim=-1)

    @torch.no_grad()
    def fit_normalization(self, obs: Tensor, act: Tensor | None = None, mask: Tensor | None = None) -> None:
        """Store mean and std of the per-step rewards on ``obs``/``act`` so ``normalize=True`` standardises them."""
        r = self.step_rewards(obs, act)
        if mask is not None:
            r = r[mask.to(torch.bool)]
        r = r.reshape(-1).to(torch.float64)
        if r.numel() < 2:
            raise ValueError(f"fit_normalization needs at least 2 valid steps, got {r.numel()}")
        self.reward_mean.fill_(float(r.mean()))
        self.reward_std.fill_(max(float(r.std(unbiased=False)), 1e-8))


class MLPRewardModel(RewardModel):
    """State (``act_dim=0``) or state-action MLP reward; PEBBLE's default is 3×256 LeakyReLU with a tanh output.

    Opt-in input processing (both off by default, which leaves the parameters and ``state_dict`` unchanged):

    - ``input_norm``: observations and actions are standardised with stored per-dimension statistics (buffers
      ``input_mean``/``input_std``/``input_act_weight``, saved with the model; identity until
      :meth:`fit_input_normalization`), and the standardised action block is multiplied by ``act_weight``.
    - ``action_squares``: the squared (standardised, weighted) actions are appended to the input, so a quadratic
      control cost ``−c·‖a‖²`` — part of every gymnasium MuJoCo locomotion/manipulation reward — is a linear
      function of the features instead of something a piecewise-linear MLP must assemble from few comparisons.

    Examples:
        >>> import torch
        >>> from mmalign.core.reward_models import MLPRewardModel
        >>> model = MLPRewardModel(obs_dim=3, act_dim=2, hidden=(16, 16))
        >>> obs, act = torch.zeros(4, 5, 3), torch.zeros(4, 5, 2)  # 4 segments of 5 steps
        >>> model.step_rewards(obs, act).shape, model.segment_returns(obs, act).shape
        (torch.Size([4, 5]), torch.Size([4]))
    """

    input_mean: Tensor
    input_std: Tensor
    input_act_weight: Tensor

    def __init__(
        self,
        obs_dim: int,
        act_dim: int = 0,
        hidden: Sequence[int] = (256, 256, 256),
        activation: str = "leaky_relu",
        output_activation: str | None = "tanh",
        *,
        input_norm: bool = False,
        action_squares: bool = False,
    ) -> None:
        super().__init__(act_dim)
        if int(obs_dim) <= 0:
            raise ValueError(f"obs_dim must be > 0, got {obs_dim}")
        if output_activation not in (None, "tanh", "sigmoid"):
            raise ValueError(f"output_activation must be None, 'tanh' or 'sigmoid', got {output_activation!r}")
        if action_squares and self.act_dim == 0:
            raise ValueError("action_squares=True needs act_dim > 0, got act_dim=0")
        self.obs_dim = int(obs_dim)
        # constructor arguments, written to config.json by save_pretrained
        self.init_kwargs = dict(obs_dim=int(obs_dim), act_dim=self.act_dim, hidden=[int(h) for h in hidden],
                                activation=activation, output_activation=output_activation,
                                input_norm=bool(input_norm), action_squares=bool(action_squares))
        self.input_norm = bool(input_norm)
        self.action_squares = bool(action_squares)
        extra = self.act_dim if self.action_squares else 0
        self.net = make_mlp(self.obs_dim + self.act_dim + extra, hidden, 1, activation)
        self.output_activation = output_activation
        if self.input_norm:
            self.register_buffer("input_mean", torch.zeros(self.obs_dim + self.act_dim))
            self.register_buffer("input_std", torch.ones(self.obs_dim + self.act_dim))
            self.register_buffer("input_act_weight", torch.ones(()))

    @torch.no_grad()
    def fit_input_normalization(
        self, obs: Tensor, act: Tensor | None = None, *, act_weight: float = 1.0, min_std: float = 1e-3
    ) -> None:
        """Store per-dimension mean/std of ``obs [..., obs_dim]`` and ``act [..., act_dim]`` (flattened over the
        leading dims; std floored at ``min_std``) and the action-block weight. Needs ``input_norm=True``."""
        if not self.input_norm:
            raise ValueError("fit_input_normalization needs a model built with input_norm=True")
        if not act_weight > 0:
            raise ValueError(f"act_weight must be > 0, got {act_weight}")
        if obs.shape[-1] != self.obs_dim:
            raise ValueError(f"obs must end with obs_dim={self.obs_dim}, got shape {tuple(obs.shape)}")
        parts = [obs.reshape(-1, self.obs_dim)]
        if self.act_dim:
            if act is None or act.shape[-1] != self.act_dim or act.shape[:-1] != obs.shape[:-1]:
                got = None if act is None else tuple(act.shape)
                raise ValueError(f"act must have shape {(*obs.shape[:-1], self.act_dim)}, got {got}")
            parts.append(act.reshape(-1, self.act_dim).to(obs.dtype))
        x = torch.cat(parts, dim=-1).to(torch.float64)
        if x.shape[0] < 2:
            raise ValueError(f"fit_input_normalization needs at least 2 rows, got {x.shape[0]}")
        self.input_mean.copy_(x.mean(0))
        self.input_std.copy_(x.std(0, unbiased=False).clamp_min(min_std))
        self.input_act_weight.fill_(float(act_weight))

    def _features(self, obs: Tensor, act: Tensor | None) -> Tensor:
        if act is not None:
            act = act.to(obs.dtype)
        if self.input_norm:
            obs = (obs - self.input_mean[: self.obs_dim]) / self.input_std[: self.obs_dim]
            if act is not None:
                act = self.input_act_weight * (act - self.input_mean[self.obs_dim:]) / self.input_std[self.obs_dim:]
        if act is None:
            return obs
        if self.action_squares:
            # / act_weight keeps the squared block on the same scale as the linear one
            sq = act.square() / (self.input_act_weight if self.input_norm else 1.0)
            return torch.cat([obs, act, sq], dim=-1)
        return torch.cat([obs, act], dim=-1)

    def _rewards(self, obs: Tensor, act: Tensor | None) -> Tensor:
        r = self.net(self._features(obs, act)).squeeze(-1)
        if self.output_activation == "tanh":
            r = torch.tanh(r)
        elif self.output_activation == "sigmoid":
            r = torch.sigmoid(r)
        return r


class FeatureRewardHead(MLPRewardModel):
    """Reward head over precomputed features (CLIP / VLM embeddings): LayerNorm, then a linear or MLP head.

    ``hidden=()`` is a linear probe. The LayerNorm makes one learning rate work across embedding scales.
    """

    def __init__(
        self,
        feature_dim: int,
        act_dim: int = 0,
        hidden: Sequence[int] = (),
        activation: str = "gelu",
        layer_norm: bool = True,
        output_activation: str | None = None,
    ) -> None:
        super().__init__(feature_dim, act_dim, hidden, activation, output_activation)
        self.init_kwargs = dict(feature_dim=int(feature_dim), act_dim=self.act_dim, hidden=[int(h) for h in hidden],
                                activation=activation, layer_norm=bool(layer_norm), output_activation=output_activation)
        self.norm = nn.LayerNorm(feature_dim) if layer_norm else nn.Identity()

    def _rewards(self, obs: Tensor, act: Tensor | None) -> Tensor:
        return super()._rewards(self.norm(obs), act)


class CNNRewardModel(RewardModel):
    """Pixel reward: conv encoder on ``[N, H, C, height, width]`` frames (uint8 scaled to [0, 1]), MLP head.

    Strides follow the DQN / CPL-image encoders (8/4, 4/2, 3/1) for 64×64 or larger frames; smaller frames use
    3×3 stride-2 convolutions.
    """

    obs_ndim = 3

    def __init__(
        self,
        in_channels: int = 3,
        image_size: int = 64,
        act_dim: int = 0,
        channels: Sequence[int] = (32, 64, 64),
        hidden: Sequence[int] = (256,),
        output_activation: str | None = "tanh",
    ) -> None:
        super().__init__(act_dim)
        if int(in_channels) <= 0 or int(image_size) < 8:
            raise ValueError(f"in_channels must be > 0 and image_size >= 8, got {in_channels}, {image_size}")
        if len(channels) == 0:
            raise ValueError("channels must name at least one conv layer, got ()")
        big = image_size >= 64 and len(channels) == 3
        kernels = [(8, 4), (4, 2), (3, 1)] if big else [(3, 2)] * len(channels)
        layers: list[nn.Module] = []
        c = int(in_channels)
        for out_c, (k, s) in zip(channels, kernels):
            layers += [nn.Conv2d(c, int(out_c), k, s), nn.ReLU()]
            c = int(out_c)
        self.encoder = nn.Sequential(*layers, nn.Flatten())
        with torch.no_grad():
            flat = self.encoder(torch.zeros(1, int(in_channels), image_size, image_size)).shape[1]
        self.in_channels, self.image_size = int(in_channels), int(image_size)
        self.init_kwargs = dict(in_channels=int(in_channels), image_size=int(image_size), act_dim=self.act_dim,
                                channels=[int(c) for c in channels], hidden=[int(h) for h in hidden],
                                output_activation=output_activation)
        self.head = MLPRewardModel(flat, act_dim, hidden, "relu", output_activation)

    def _rewards(self, obs: Tensor, act: Tensor | None) -> Tensor:
        x = obs.float() / 255.0 if obs.dtype == torch.uint8 else obs.float()
        return self.head._rewards(self.encoder(x), act)
