"""Noisy batch normalization (Santurkar, Tsipras, Ilyas & Madry 2018, Sec. 2.1, App. A.2.1, Algorithm 1).

After batch normalization (after BN's gamma and beta, the "possibly learnable" mean and variance the
paper mentions), every training step injects a time-varying, non-zero-mean, non-unit-variance noise
that differs between units:

    for each unit j, at step t:      mu_t[j]    ~ U(-n_mu, n_mu)           (n_mu    = 0.5)
                                     sigma_t[j] ~ U(1, n_sigma)            (n_sigma = 1.25)
    for each element i of unit j:    m[i, j]    ~ U(mu_t[j] - r_mu, mu_t[j] + r_mu)      (r_mu    = 0.1)
                                     s[i, j]    ~ N(sigma_t[j], r_sigma^2)               (r_sigma = 0.1, a std)
                                     a[i, j]   <- s[i, j] * a[i, j] + m[i, j]

A unit is a feature of an (N, C) input or a channel of an (N, C, *spatial) input: spatial positions
count as batch elements, the usual convolutional convention, so ``m`` and ``s`` have the shape of the
activation and ``mu_t``, ``sigma_t`` one value per channel. The noise is a constant with respect to
the parameters; gradients flow through the multiplication by ``s``.

Randomness comes from the layer's own ``torch.Generator``, never from the global RNG, so a forward
pass leaves ``torch.get_rng_state()`` unchanged and switching noise on does not change dropout masks,
data order or initialization elsewhere. The generator state is saved in ``state_dict`` (as the
module's extra state) so a resumed run draws the noise an uninterrupted run would; a plain BN
``state_dict`` without it loads too (the generator keeps its state). The seed: ``seed=`` when given,
otherwise one integer drawn from the global generator when the layer is built, which makes the noise
a deterministic function of the run's seed and different in every layer (``seed_noise`` reseeds all
noisy layers of a model from one seed and their names).

Noise is applied in training mode only by default (``noise_in_eval=False``); the paper does not say
what happens at evaluation, and a deployed network is deterministic.

Fig. 2's fourth arm, "the standard network + the same noise", is :class:`NoiseOnly`
(``make_norm("noise_only", ...)``): the same noise at the position of the BN layer, no normalization.
"""
from __future__ import annotations

import dataclasses
import hashlib
from typing import NamedTuple

import torch
from torch import Tensor, nn

from bnlab.errors import ConfigError, ShapeError
from bnlab.norm.modules import BatchNorm1d, BatchNorm2d, BatchNorm3d

__all__ = [
    "NoiseConfig", "NoiseSample", "sample_noise", "apply_noise", "NoisyBatchNorm1d", "NoisyBatchNorm2d",
    "NoisyBatchNorm3d", "NoiseOnly", "seed_noise",
]


@dataclasses.dataclass(frozen=True)
class NoiseConfig:
    """Magnitudes of Santurkar's Algorithm 1 (defaults: the paper's constants)."""

    n_mu: float = 0.5  # mu_t ~ U(-n_mu, n_mu)
    n_sigma: float = 1.25  # sigma_t ~ U(1, n_sigma)
    r_mu: float = 0.1  # m ~ U(mu_t - r_mu, mu_t + r_mu)
    r_sigma: float = 0.1  # s ~ N(sigma_t, r_sigma^2); r_sigma is a standard deviation

    def __post_init__(self) -> None:
        for name in ("n_mu", "r_mu", "r_sigma"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0:
                raise ConfigError(f"noise {name} must be a number >= 0, got {v!r}; the paper uses "
                                  f"{getattr(NoiseConfig, name)}")
        if isinstance(self.n_sigma, bool) or not isinstance(self.n_sigma, (int, float)) or not self.n_sigma >= 1:
            raise ConfigError(f"noise n_sigma must be >= 1 (sigma_t ~ U(1, n_sigma)), got {self.n_sigma!r}; "
                              f"the paper uses 1.25")


class NoiseSample(NamedTuple):
    mu_t: Tensor  # (C,) per unit
    sigma_t: Tensor  # (C,) per unit
    m: Tensor  # shape of the activation: additive noise
    s: Tensor  # shape of the activation: multiplicative noise


def _per_channel(t: Tensor, ndim: int) -> Tensor:
    return t.view(1, -1, *([1] * (ndim - 2)))


def sample_noise(shape: torch.Size | tuple[int, ...], *, generator: torch.Generator,
                 config: NoiseConfig = NoiseConfig(), dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None) -> NoiseSample:
    """Draw one step's noise for an activation of ``shape`` (N, C, *spatial) from ``generator``.

    The draws happen on the generator's device, in float32 or float64 (half precision has too few
    bits for N(sigma, 0.1)), and are returned on ``device`` (default: the generator's) in ``dtype``.
    Order of draws (fixed, part of the reproducibility contract): mu_t, sigma_t, m, s.
    """
    if len(shape) < 2:
        raise ShapeError(f"noise needs an activation of shape (N, C, ...), got shape {tuple(shape)}")
    c = shape[1]
    gdev = generator.device
    sdt = torch.float64 if dtype == torch.float64 else torch.float32
    mu_t = (torch.rand(c, generator=generator, device=gdev, dtype=sdt) * 2 - 1) * config.n_mu  # (C,)
    sigma_t = 1 + torch.rand(c, generator=generator, device=gdev, dtype=sdt) * (config.n_sigma - 1)  # (C,)
    # In place on the draws: the same operations in the same order as mu + (u * 2 - 1) * r_mu and
    # sigma + z * r_sigma (bit-identical), without four activation-sized temporaries per layer and step.
    u = torch.rand(tuple(shape), generator=generator, device=gdev, dtype=sdt)  # (N, C, ...)
    m = u.mul_(2).sub_(1).mul_(config.r_mu).add_(_per_channel(mu_t, len(shape)))
    z = torch.randn(tuple(shape), generator=generator, device=gdev, dtype=sdt)  # (N, C, ...)
    s = z.mul_(config.r_sigma).add_(_per_channel(sigma_t, len(shape)))
    device = gdev if device is None else device
    return NoiseSample(*(t.to(device=device, dtype=dtype) for t in (mu_t, sigma_t, m, s)))


def apply_noise(a: Tensor, noise: NoiseSample) -> Tensor:
    """``s * a + m`` (Algorithm 1's last line); differentiable in ``a``, the noise is constant."""
    return torch.addcmul(noise.m, noise.s, a)


def _seed_from(*parts: object) -> int:
    digest = hashlib.sha256("\0".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


class _NoiseMixin:
    """The generator, its state in state_dict, and the train/eval switch shared by the noisy layers."""

    noise: NoiseConfig
    noise_in_eval: bool
    generator: torch.Generator
    last_noise: NoiseSample | None

    def _init_noise(self, config: NoiseConfig | None, noise_in_eval: bool, seed: int | None,
                    keep_last: bool) -> None:
        if config is None:
            config = NoiseConfig()
        if not isinstance(config, NoiseConfig):
            raise ConfigError(f"noise must be a NoiseConfig, got {type(config).__name__}; "
                              f"e.g. NoiseConfig(n_mu=0.5, n_sigma=1.25, r_mu=0.1, r_sigma=0.1)")
        self.noise = config
        self.noise_in_eval = bool(noise_in_eval)
        self.keep_last = bool(keep_last)
        self.last_noise = None
        if seed is None:
            # One draw from the global generator at construction: the noise follows the run's seed
            # and differs between layers. Forward passes never touch the global generator.
            seed = int(torch.randint(0, 2**62, (), dtype=torch.int64))
        self.generator = torch.Generator().manual_seed(int(seed))

    def reseed(self, seed: int) -> None:
        """Restart the noise stream from ``seed``."""
        self.generator = torch.Generator(device=self.generator.device).manual_seed(int(seed))

    def _noise_active(self) -> bool:
        return self.training or self.noise_in_eval

    def _add_noise(self, a: Tensor) -> Tensor:
        if a.device != self.generator.device and not (a.device.type == "cpu" and self.generator.device.type == "cpu"):
            # First call on another device: continue the stream on a generator there, seeded from
            # this one (deterministic), so the noise is drawn where the activation lives.
            seed = int(torch.randint(0, 2**62, (), generator=self.generator, dtype=torch.int64))
            self.generator = torch.Generator(device=a.device).manual_seed(seed)
        noise = sample_noise(a.shape, generator=self.generator, config=self.noise, dtype=a.dtype, device=a.device)
        if self.keep_last:
            self.last_noise = noise
        return apply_noise(a, noise)

    # The generator state travels with the model (checkpoints, resume).
    def get_extra_state(self) -> dict:
        return {"generator_state": self.generator.get_state(), "generator_device": str(self.generator.device)}

    def set_extra_state(self, state: dict) -> None:
        if not isinstance(state, dict) or "generator_state" not in state:
            raise ConfigError("noise extra state must be the dict saved by a noisy layer's state_dict()")
        device = torch.device(state.get("generator_device", "cpu"))
        if device.type != "cpu" and not torch.cuda.is_available():
            device = torch.device("cpu")  # a CUDA stream cannot continue on CPU; restart from its state's hash
            self.generator = torch.Generator().manual_seed(_seed_from(bytes(state["generator_state"].tolist())))
            return
        gen = torch.Generator(device=device)
        gen.set_state(state["generator_state"].clone())
        self.generator = gen

    def _load_noise_state(self, state_dict, prefix) -> None:
        # A plain BN state_dict has no generator state: keep the current stream instead of failing.
        key = prefix + "_extra_state"
        if key not in state_dict:
            state_dict[key] = self.get_extra_state()


def _noisy_extra_repr(self) -> str:
    n = self.noise
    return (f"noise=(n_mu={n.n_mu}, n_sigma={n.n_sigma}, r_mu={n.r_mu}, r_sigma={n.r_sigma}), "
            f"noise_in_eval={self.noise_in_eval}")


class _NoisyBatchNorm(_NoiseMixin):
    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, device=None, dtype=None, *, noise: NoiseConfig | None = None,
                 noise_in_eval: bool = False, seed: int | None = None, keep_last: bool = False) -> None:
        super().__init__(num_features, eps=eps, momentum=momentum, affine=affine,
                         track_running_stats=track_running_stats, device=device, dtype=dtype)
        self._init_noise(noise, noise_in_eval, seed, keep_last)

    def forward(self, x: Tensor) -> Tensor:
        a = super().forward(x)  # BN with gamma, beta (and the running-statistics update in training)
        return self._add_noise(a) if self._noise_active() else a

    def extra_repr(self) -> str:
        return super().extra_repr() + ", " + _noisy_extra_repr(self)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        self._load_noise_state(state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class NoisyBatchNorm1d(_NoisyBatchNorm, BatchNorm1d):
    """BatchNorm1d followed by Santurkar's Algorithm 1 noise; (N, C) or (N, C, L) inputs.

    Same constructor as ``BatchNorm1d`` plus ``noise`` (a :class:`NoiseConfig`), ``noise_in_eval``,
    ``seed`` (of the layer's own generator) and ``keep_last`` (keep the last noise drawn in
    ``last_noise``, for inspection). Same parameters, buffers and state_dict keys as BN, plus the
    generator state.
    """


class NoisyBatchNorm2d(_NoisyBatchNorm, BatchNorm2d):
    """BatchNorm2d followed by Algorithm 1 noise; per channel, spatial positions count as batch."""


class NoisyBatchNorm3d(_NoisyBatchNorm, BatchNorm3d):
    """BatchNorm3d followed by Algorithm 1 noise; per channel, spatial positions count as batch."""


class NoiseOnly(_NoiseMixin, nn.Module):
    """The noise of Algorithm 1 without normalization: Santurkar Fig. 2's "standard network + the
    same noise" (the unnormalized activation takes the place of the BN output). No parameters.

    ``num_features`` (C) is checked against the input's dim 1.
    """

    def __init__(self, num_features: int, *, noise: NoiseConfig | None = None, noise_in_eval: bool = False,
                 seed: int | None = None, keep_last: bool = False) -> None:
        super().__init__()
        if isinstance(num_features, bool) or not isinstance(num_features, int) or num_features < 1:
            raise ShapeError(f"num_features must be a positive int (the number of channels C), got {num_features!r}")
        self.num_features = num_features
        self._init_noise(noise, noise_in_eval, seed, keep_last)

    def forward(self, x: Tensor) -> Tensor:
        if not isinstance(x, Tensor) or x.dim() < 2 or x.shape[1] != self.num_features:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ShapeError(f"NoiseOnly({self.num_features}) expects an input of shape (N, {self.num_features}, ...), "
                             f"got {shape}; use num_features equal to the channel dimension (dim 1)")
        return self._add_noise(x) if self._noise_active() else x

    def extra_repr(self) -> str:
        return f"{self.num_features}, " + _noisy_extra_repr(self)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        self._load_noise_state(state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def seed_noise(model: nn.Module, seed: int) -> int:
    """Reseed every noisy layer of ``model`` from ``seed`` and its qualified name (independent
    streams per layer, reproducible whatever the construction order). Returns how many were seeded."""
    n = 0
    for name, m in model.named_modules():
        if isinstance(m, _NoiseMixin):
            m.reseed(_seed_from(int(seed), name))
            n += 1
    return n
