"""Latent variables of a sentence VAE: the posterior family q(z|x), its prior p(z) and their KL.

Both classes are parameter-free ``nn.Module``s with one API (``P`` = :attr:`param_size`, ``K`` samples
per sentence, ``B`` sentences):

- ``sample(params [B, P], K) -> z [K, B, ...]``; ``prior_sample(K, B) -> z``
- ``log_prob(params [B, P], z) -> [K, B]`` and ``prior_log_prob(z, *, dtype=None) -> [K, B]`` (summed
  over dimensions / latents)
- ``kl_to_prior(params) -> [B]`` (analytic), ``kl_per_dim(params) -> [B, D or n]``
- ``posterior_mean(params) -> [B, D']`` (what active units are computed from)

:class:`GaussianLatent`: ``D`` dimensions, ``q = N(μ, diag σ²)`` with ``(μ, raw) = params.chunk(2)`` and
``σ = softplus(raw) + min_std`` (bounded away from 0 and linear, not exponential, for large ``raw``, so
neither the KL nor the log density overflows); prior ``N(0, I)``; samples are reparameterised.

:class:`CategoricalLatent`: ``n`` independent categoricals of ``m`` categories, ``q_i = softmax(logits_i)``
with ``params`` = the ``n*m`` logits (latent-major: ``params.view(B, n, m)``); prior uniform ``1/m``;
``z`` holds category indices (int64 ``[K, B, n]``), sampled without a gradient path (score-function
estimators only).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["CategoricalLatent", "GaussianLatent"]

_HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)


def _check_params(params: Tensor, size: int) -> None:
    if params.dim() != 2 or params.shape[1] != size:
        raise ValueError(f"params must be [B, {size}], got {tuple(params.shape)}")


class GaussianLatent(nn.Module):
    """Diagonal Gaussian posterior over ``size`` dimensions with a standard normal prior."""

    reparameterized = True

    def __init__(self, size: int, min_std: float = 1e-4) -> None:
        super().__init__()
        if size <= 0 or not min_std > 0:
            raise ValueError(f"size must be > 0 and min_std > 0, got {size}, {min_std}")
        self.size = size
        self.min_std = min_std

    @property
    def param_size(self) -> int:
        """``2 D``: the mean and the raw (pre-softplus) scale."""
        return 2 * self.size

    @property
    def decoder_input_size(self) -> int:
        """``D``: the decoder reads ``z`` itself."""
        return self.size

    def mean_std(self, params: Tensor) -> tuple[Tensor, Tensor]:
        """``params [B, 2D] -> (μ [B, D], σ [B, D])`` with ``σ = softplus(raw) + min_std``."""
        _check_params(params, self.param_size)
        mean, raw = params.chunk(2, dim=1)
        return mean, F.softplus(raw) + self.min_std

    def sample(self, params: Tensor, num_samples: int, noise: Tensor | None = None) -> Tensor:
        """Reparameterised ``z = μ + σ ε``, ``ε ~ N(0, I)``: [K, B, D] with a graph to ``params``.

        ``noise``: ``ε`` itself ([K, B, D], from :meth:`draw_noise`); None draws it from the global RNG.
        """
        mean, std = self.mean_std(params)
        if noise is None:
            eps = torch.randn((num_samples, *mean.shape), device=mean.device, dtype=mean.dtype)
        else:
            eps = noise.to(device=mean.device, dtype=mean.dtype)
        return torch.addcmul(mean, std, eps)

    def draw_noise(self, num_samples: int, batch_size: int, generator: torch.Generator) -> Tensor:
        """The standard normal ``ε`` [K, B, D] :meth:`sample` turns into ``z`` (CPU, from ``generator``)."""
        return torch.randn(num_samples, batch_size, self.size, generator=generator)

    def log_prob(self, params: Tensor, z: Tensor) -> Tensor:
        """``ln q(z|x)`` summed over dimensions: ``z [K, B, D] -> [K, B]``."""
        mean, std = self.mean_std(params)
        scaled = (z - mean) / std
        return -(0.5 * scaled.square() + std.log() + _HALF_LOG_2PI).sum(-1)

    def prior_log_prob(self, z: Tensor, *, dtype: torch.dtype | None = None) -> Tensor:
        """``ln N(z; 0, I)``: ``z [K, B, D] -> [K, B]`` (in ``z``'s dtype, or ``dtype`` when given)."""
        out = -(0.5 * z.square() + _HALF_LOG_2PI).sum(-1)
        return out if dtype is None else out.to(dtype)

    def kl_per_dim(self, params: Tensor) -> Tensor:
        """``KL(N(μ_d, σ_d²) || N(0, 1)) = (σ² + μ² - 1)/2 - ln σ`` per dimension: [B, D]."""
        mean, std = self.mean_std(params)
        return 0.5 * (std.square() + mean.square() - 1.0) - std.log()

    def kl_to_prior(self, params: Tensor) -> Tensor:
        """Analytic ``KL(q(z|x) || p(z))``: [B]."""
        return self.kl_per_dim(params).sum(-1)

    def posterior_mean(self, params: Tensor) -> Tensor:
        """``μ``: [B, D]."""
        return self.mean_std(params)[0]

    def prior_sample(
        self, num_samples: int, batch_size: int, *, device: torch.device | None = None, dtype: torch.dtype | None = None
    ) -> Tensor:
        """``z ~ N(0, I)``: [K, B, D]."""
        return torch.randn(num_samples, batch_size, self.size, device=device, dtype=dtype)

    def extra_repr(self) -> str:
        return f"size={self.size}, min_std={self.min_std}"


class CategoricalLatent(nn.Module):
    """``num_latents`` independent categoricals of ``num_categories`` each, with a uniform prior.

    ``embedding_size`` is the size of the decoder's embedding of one latent's value (the decoder owns
    those embeddings); it only sets :attr:`decoder_input_size` = ``n * embedding_size``.
    """

    reparameterized = False

    def __init__(self, num_latents: int, num_categories: int, embedding_size: int) -> None:
        super().__init__()
        if num_latents <= 0 or num_categories < 2 or embedding_size <= 0:
            raise ValueError(
                f"need num_latents > 0, num_categories >= 2, embedding_size > 0; got {num_latents}, "
                f"{num_categories}, {embedding_size}"
            )
        self.num_latents = num_latents
        self.num_categories = num_categories
        self.embedding_size = embedding_size

    @property
    def param_size(self) -> int:
        """``n m`` logits."""
        return self.num_latents * self.num_categories

    @property
    def decoder_input_size(self) -> int:
        """``n e``: the concatenated embeddings of the ``n`` latents' values."""
        return self.num_latents * self.embedding_size

    def log_probs(self, params: Tensor) -> Tensor:
        """Per-latent log-probabilities ``log_softmax(logits)``: [B, n*m] -> [B, n, m]."""
        _check_params(params, self.param_size)
        return params.view(params.shape[0], self.num_latents, self.num_categories).log_softmax(-1)

    def sample(self, params: Tensor, num_samples: int, noise: Tensor | None = None) -> Tensor:
        """Category indices ``z ~ q(z|x)``: int64 [K, B, n], no gradient path.

        ``noise``: uniform(0, 1) draws [K, B, n] (from :meth:`draw_noise`) turned into categories by the
        inverse CDF; None samples from the global RNG.
        """
        if noise is not None:
            probs = self.log_probs(params.detach()).exp()  # [B, n, m]
            cdf = probs.cumsum(-1)
            below = (cdf.unsqueeze(0) < noise.to(cdf.device, cdf.dtype).unsqueeze(-1)).sum(-1)  # [K, B, n]
            return below.clamp_max(self.num_categories - 1)
        log_p = self.log_probs(params.detach())
        flat = log_p.reshape(-1, self.num_categories).exp()  # [B*n, m]
        draws = torch.multinomial(flat, num_samples, replacement=True)  # [B*n, K]
        return draws.t().reshape(num_samples, params.shape[0], self.num_latents)

    def draw_noise(self, num_samples: int, batch_size: int, generator: torch.Generator) -> Tensor:
        """Uniform(0, 1) draws [K, B, n] that :meth:`sample` turns into categories (CPU, from ``generator``)."""
        return torch.rand(num_samples, batch_size, self.num_latents, generator=generator, dtype=torch.float64)

    def log_prob(self, params: Tensor, z: Tensor) -> Tensor:
        """``ln q(z|x)`` summed over latents: ``z [K, B, n] -> [K, B]`` (graph to ``params``)."""
        log_p = self.log_probs(params)
        picked = log_p.unsqueeze(0).expand(z.shape[0], -1, -1, -1).gather(-1, z.unsqueeze(-1))
        return picked.squeeze(-1).sum(-1)

    def prior_log_prob(self, z: Tensor, *, dtype: torch.dtype | None = None) -> Tensor:
        """``ln p(z) = -n ln m`` for every sample: ``z [K, B, n] -> [K, B]`` (``dtype``, default: torch's
        default float dtype)."""
        value = -self.num_latents * math.log(self.num_categories)
        return torch.full(z.shape[:2], value, device=z.device, dtype=dtype)

    def kl_per_dim(self, params: Tensor) -> Tensor:
        """``KL(q_i || U(m)) = Σ_c q_ic ln q_ic + ln m`` per latent: [B, n]."""
        log_p = self.log_probs(params)
        return (log_p.exp() * log_p).sum(-1) + math.log(self.num_categories)

    def kl_to_prior(self, params: Tensor) -> Tensor:
        """Analytic ``KL(q(z|x) || p(z))``: [B]."""
        return self.kl_per_dim(params).sum(-1)

    def posterior_mean(self, params: Tensor) -> Tensor:
        """The probabilities, flattened: [B, n*m]."""
        return self.log_probs(params).exp().reshape(params.shape[0], -1)

    def prior_sample(
        self, num_samples: int, batch_size: int, *, device: torch.device | None = None, dtype: torch.dtype | None = None
    ) -> Tensor:
        """Uniform category indices: int64 [K, B, n] (``dtype`` is ignored: indices are int64)."""
        return torch.randint(self.num_categories, (num_samples, batch_size, self.num_latents), device=device)

    def extra_repr(self) -> str:
        return f"num_latents={self.num_latents}, num_categories={self.num_categories}"
