"""Latent variables of a sentence VAE: the posterior family q(z|x), its prior p(z) and their KL.

All three classes are ``nn.Module``s with one API (``P`` = :attr:`param_size`, ``K`` samples per
sentence, ``B`` sentences); the Gaussian and categorical ones are parameter-free, the VQ one holds its
codebook:

- ``sample(params [B, P], K) -> z [K, B, ...]``; ``prior_sample(K, B) -> z``
- ``log_prob(params [B, P], z) -> [K, B]`` and ``prior_log_prob(z, *, dtype=None) -> [K, B]`` (summed
  over dimensions / latents)
- ``kl_to_prior(params) -> [B]`` (analytic), ``kl_per_dim(params) -> [B, D or n]``
- ``posterior_mean(params) -> [B, D']`` (what active units are computed from)
- ``draw_noise(K, B, generator)`` -> the noise ``sample`` turns into ``z``

:class:`GaussianLatent`: ``D`` dimensions, ``q = N(μ, diag σ²)`` with ``(μ, raw) = params.chunk(2)`` and
``σ = softplus(raw) + min_std`` (bounded away from 0 and linear, not exponential, for large ``raw``, so
neither the KL nor the log density overflows); prior ``N(0, I)``; samples are reparameterised.

:class:`CategoricalLatent`: ``n`` independent categoricals of ``m`` categories, ``q_i = softmax(logits_i)``
with ``params`` = the ``n*m`` logits (latent-major: ``params.view(B, n, m)``); prior uniform ``1/m``;
``z`` holds category indices (int64 ``[K, B, n]``), sampled without a gradient path (score-function
estimators only).

:class:`VQLatent`: the VQ-VAE latent (van den Oord et al. 2017; thesis §5.A), ``n`` latents quantised to
one of ``m`` codes each. See its docstring for the point-mass posterior, ``z``'s layout, the straight-through
gradient, the commitment loss and the EMA codebook.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["CategoricalLatent", "GaussianLatent", "VQLatent"]

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


class VQLatent(nn.Module):
    """VQ-VAE latent (van den Oord et al. 2017; thesis §5.A): ``n`` latents, each quantised to one of ``m`` codes.

    **Encoder output and codebook.** ``params`` [B, n*e] are the encoder outputs ``z_e``, ``e`` =
    ``embedding_size`` per latent (latent-major: ``params.view(B, n, e)``). Each latent has its *own*
    codebook of ``m`` vectors (``codebook`` [n, m, e], not shared between latents), so the latent space is
    the same ``m^n`` configurations as :class:`CategoricalLatent`'s and the two are directly comparable.
    ``z_e,i`` is quantised to its nearest code ``c_i = argmin_j ||z_e,i - e_ij||²`` (exact squared
    distances; ties go to the lowest index).

    **Probabilistic reading** (what the importance-sampled evaluation sees): ``q(z|x)`` is a point mass on
    the nearest codes and the prior is uniform over the ``m`` codes of each latent, so
    ``ln q(z|x) = 0`` for the chosen codes and ``-inf`` for any other, ``ln p(z) = -n ln m``,
    ``KL(q(z|x) || p(z)) = n ln m`` exactly for every ``x`` (fixed by the latent space, not learned),
    ``ln p̂(x) = ln p(x|z_q) - n ln m`` whatever ``K``, and the aggregate-posterior mutual information of a
    batch is the entropy of its code usage. The thesis' ``Û^K - Ŝ^K`` estimate equals ``n ln m``.

    **Samples** ``z`` [K, B, n*e + n] (:attr:`sample_size`): the quantised vectors ``z_q`` (latent-major,
    ``n*e`` values; what the decoder reads, see :class:`~models.vae.decoder.LatentInput`) followed by the
    ``n`` code indices as floats (exact small integers; :meth:`codes_of` reads them back, so ``log_prob``
    never has to match vectors against the codebook). All ``K`` samples of a sentence are equal.
    In :meth:`sample` ``z_q = sg(e_c) + (z_e - sg(z_e))``: its value is exactly the code vector and its
    gradient w.r.t. ``z_e`` is the identity (the straight-through estimator), so the decoder's gradient
    w.r.t. ``z_q`` is copied to the encoder (and, as in the paper, never to the codebook). The class is
    therefore ``reparameterized`` and the estimators' path derivative through the decoder carries it.

    **Loss** (:meth:`auxiliary_loss`, per sentence, enters the encoder loss): ``β Σ_i ||z_e,i - sg(e_c_i)||²``
    (commitment; squared L2 norm summed over the ``n*e`` values, as in the paper's eq. 3), plus, when
    ``decay`` is None, the codebook term ``Σ_i ||sg(z_e,i) - e_c_i||²`` that trains ``codebook`` (then an
    ``nn.Parameter``) by gradient.

    **EMA codebook** (``decay`` not None, the paper's appendix A.1; ``codebook`` is then a buffer):
    :meth:`update_codebook` (called by the model in training mode only, after the batch was quantised with
    the old codebook) does, per latent ``i`` and code ``j``, with ``n_ij`` the batch's count of ``c_i = j``
    and ``s_ij`` the sum of those ``z_e,i``::

        N_ij <- d N_ij + (1 - d) n_ij                 (ema_cluster_size)
        S_ij <- d S_ij + (1 - d) s_ij                 (ema_embed_sum)
        Ñ_ij  = (N_ij + ε) / (Σ_j' N_ij' + m ε) · Σ_j' N_ij'   (Laplace smoothing: no division by 0)
        e_ij <- S_ij / Ñ_ij

    ``N`` starts at 1 and ``S`` at the initial codebook (one pseudo-observation at the initial code), so
    codes that are never chosen stay where they are instead of blowing up or collapsing to 0.

    **Initialisation**: ``codebook ~ N(0, init_std²)`` with a small ``init_std`` (0.05). The encoders' outputs
    start small (a Linear layer on tanh / recurrent states) and a code far from all of them is never
    chosen: with N(0, 1) codes every sentence picked the same smallest-norm code of each latent and the
    EMA only ever moved that one (a collapsed codebook, measured on the synthetic task: no code usage at
    all after 600 steps); codes near the origin split the initial encodings by direction instead.
    ``codebook``, ``ema_cluster_size`` and ``ema_embed_sum`` are persistent buffers: they are part of the
    ``state_dict``, so checkpoints and resume are exact.

    **Distributed training**: with ``sync_ema`` (default) and an initialised ``torch.distributed`` process
    group of more than one rank, the batch statistics ``(n, s)`` are all-reduced (summed) before the update,
    so every rank applies the same update computed from the global batch (DDP's default
    ``broadcast_buffers`` then re-sends rank 0's identical buffers, which changes nothing). Every rank must
    therefore run the same number of training-mode forward passes (the trainer does); set ``sync_ema =
    False`` when only some ranks run the model in training mode (then DDP's buffer broadcast from rank 0
    keeps the ranks consistent, with rank 0's statistics only).
    """

    reparameterized = True

    def __init__(
        self, num_latents: int, num_categories: int, embedding_size: int, *, beta: float = 0.25,
        decay: float | None = 0.99, epsilon: float = 1e-5, init_std: float = 0.05,
    ) -> None:
        super().__init__()
        if num_latents <= 0 or num_categories < 2 or embedding_size <= 0:
            raise ValueError(
                f"need num_latents > 0, num_categories >= 2, embedding_size > 0; got {num_latents}, "
                f"{num_categories}, {embedding_size}"
            )
        if not (math.isfinite(beta) and beta >= 0):
            raise ValueError(f"beta (the commitment weight) must be a finite number >= 0, got {beta}")
        if decay is not None and not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must be in [0, 1) (or None: codebook trained by gradient), got {decay}")
        if not (math.isfinite(epsilon) and epsilon > 0) or not (math.isfinite(init_std) and init_std > 0):
            raise ValueError(f"epsilon and init_std must be finite numbers > 0, got {epsilon}, {init_std}")
        self.num_latents = num_latents
        self.num_categories = num_categories
        self.embedding_size = embedding_size
        self.beta = float(beta)
        self.decay = None if decay is None else float(decay)
        self.epsilon = float(epsilon)
        self.init_std = float(init_std)
        self.sync_ema = True
        codebook = torch.empty(num_latents, num_categories, embedding_size)
        if self.decay is None:
            self.codebook = nn.Parameter(codebook)
        else:
            self.register_buffer("codebook", codebook)
            self.register_buffer("ema_cluster_size", torch.empty(num_latents, num_categories))
            self.register_buffer("ema_embed_sum", torch.empty(num_latents, num_categories, embedding_size))
        self.reset_parameters()

    @property
    def ema(self) -> bool:
        """Whether the codebook is updated by exponential moving averages (``decay`` is not None)."""
        return self.decay is not None

    def reset_parameters(self) -> None:
        """Codebook ~ N(0, init_std²) (small, see the class docstring); EMA state = one pseudo-observation at each
        initial code."""
        with torch.no_grad():
            self.codebook.normal_(0.0, self.init_std)
            if self.ema:
                self.ema_cluster_size.fill_(1.0)
                self.ema_embed_sum.copy_(self.codebook)

    @property
    def param_size(self) -> int:
        """``n e``: the encoder outputs ``z_e``."""
        return self.num_latents * self.embedding_size

    @property
    def decoder_input_size(self) -> int:
        """``n e``: the decoder reads the quantised vectors ``z_q``."""
        return self.num_latents * self.embedding_size

    @property
    def sample_size(self) -> int:
        """``n e + n``: a sample holds ``z_q`` and the ``n`` code indices (see the class docstring)."""
        return self.num_latents * (self.embedding_size + 1)

    # ------------------------------------------------------------------ quantisation
    def encodings(self, params: Tensor) -> Tensor:
        """``z_e``: [B, n*e] -> [B, n, e] (a view, graph kept)."""
        _check_params(params, self.param_size)
        return params.view(params.shape[0], self.num_latents, self.embedding_size)

    def quantize(self, params: Tensor) -> Tensor:
        """The nearest code of every latent, ``argmin_j ||z_e,i - e_ij||²``: [B, n*e] -> int64 [B, n]."""
        z_e = self.encodings(params).detach().to(self.codebook.dtype)
        distances = (z_e.unsqueeze(2) - self.codebook.detach()).square().sum(-1)  # [B, n, m]
        return distances.argmin(-1)

    def code_vectors(self, codes: Tensor) -> Tensor:
        """``e_{i, codes_i}``: int64 [..., n] -> [..., n, e] (graph to ``codebook`` when it is a parameter)."""
        latent_index = torch.arange(self.num_latents, device=codes.device)
        return self.codebook[latent_index, codes]

    def _pack(self, vectors: Tensor, codes: Tensor) -> Tensor:
        """[..., n, e] vectors and [..., n] codes -> [..., n*e + n]."""
        return torch.cat((vectors.flatten(-2), codes.to(vectors.dtype)), dim=-1)

    def samples_of(self, codes: Tensor) -> Tensor:
        """Samples ``[z_q ; codes]`` of given codes: int64 [..., n] -> [..., n*e + n] on the codebook's device
        (no graph to the codebook: a prior sample or a chosen code, not a training sample)."""
        codes = codes.to(self.codebook.device)
        return self._pack(self.code_vectors(codes).detach(), codes)

    def codes_of(self, z: Tensor) -> Tensor:
        """The code indices stored in samples ``z`` [..., n*e + n] -> int64 [..., n]."""
        if z.shape[-1] != self.sample_size:
            raise ValueError(f"VQ samples have {self.sample_size} values (n*e + n) in their last dimension, got "
                             f"{tuple(z.shape)}")
        return z[..., self.decoder_input_size:].detach().round().long()

    # ------------------------------------------------------------------ the latent API
    def sample(self, params: Tensor, num_samples: int, noise: Tensor | None = None) -> Tensor:
        """The point mass: ``K`` copies of ``[z_q ; codes]``, [K, B, n*e + n], ``z_q`` straight-through to ``params``.

        ``noise`` is ignored (nothing is random; :meth:`draw_noise` gives an empty tensor).
        """
        z_e = self.encodings(params)
        codes = self.quantize(params)
        e_q = self.code_vectors(codes).detach().to(z_e.dtype)
        z_q = e_q + (z_e - z_e.detach())  # value: exactly e_q; gradient w.r.t. z_e: identity
        z = self._pack(z_q, codes)
        return z.unsqueeze(0).expand(num_samples, *z.shape).contiguous()

    def draw_noise(self, num_samples: int, batch_size: int, generator: torch.Generator) -> Tensor:
        """An empty [K, B, 0] tensor: sampling a point mass needs no noise (``generator`` is not advanced)."""
        return torch.zeros(num_samples, batch_size, 0)

    def log_prob(self, params: Tensor, z: Tensor) -> Tensor:
        """``ln q(z|x)``: 0 where all ``n`` codes of ``z`` are ``params``' nearest codes, else ``-inf``.

        ``z`` [K, B, n*e + n] -> [K, B] in ``params``' dtype, no graph (a point mass has no gradient).
        """
        chosen = self.quantize(params)  # [B, n]
        match = (self.codes_of(z) == chosen).all(-1)  # [K, B]
        zero = torch.zeros((), device=params.device, dtype=params.dtype)
        return torch.where(match, zero, torch.full_like(zero, -math.inf))

    def prior_log_prob(self, z: Tensor, *, dtype: torch.dtype | None = None) -> Tensor:
        """``ln p(z) = -n ln m`` for every sample: ``z [K, B, ...] -> [K, B]`` (``dtype``, default: torch's
        default float dtype)."""
        value = -self.num_latents * math.log(self.num_categories)
        return torch.full(z.shape[:2], value, device=z.device, dtype=dtype)

    def kl_per_dim(self, params: Tensor) -> Tensor:
        """``KL(point mass || U(m)) = ln m`` per latent: [B, n] (constant, no graph)."""
        _check_params(params, self.param_size)
        return torch.full((params.shape[0], self.num_latents), math.log(self.num_categories),
                          device=params.device, dtype=params.dtype)

    def kl_to_prior(self, params: Tensor) -> Tensor:
        """``KL(q(z|x) || p(z)) = n ln m``: [B]."""
        return self.kl_per_dim(params).sum(-1)

    def posterior_mean(self, params: Tensor) -> Tensor:
        """The quantised vectors ``z_q`` (the mean of the point mass, as the decoder reads it): [B, n*e]."""
        return self.code_vectors(self.quantize(params)).detach().flatten(-2).to(params.dtype)

    def prior_sample(
        self, num_samples: int, batch_size: int, *, device: torch.device | None = None, dtype: torch.dtype | None = None
    ) -> Tensor:
        """Uniform codes per latent, as samples ``[z_q ; codes]``: [K, B, n*e + n]."""
        device = self.codebook.device if device is None else device
        codes = torch.randint(self.num_categories, (num_samples, batch_size, self.num_latents), device=device)
        z = self.samples_of(codes).to(device)
        return z if dtype is None else z.to(dtype)

    # ------------------------------------------------------------------ training
    def auxiliary_loss(self, params: Tensor) -> Tensor:
        """Per sentence [B]: ``β ||z_e - sg(e_c)||²`` (+ ``||sg(z_e) - e_c||²`` without EMA); graph to ``params``
        (and to ``codebook`` when it is a parameter)."""
        z_e = self.encodings(params)
        e_q = self.code_vectors(self.quantize(params)).to(z_e.dtype)
        loss = self.beta * (z_e - e_q.detach()).square().sum((-2, -1))
        if not self.ema:
            loss = loss + (z_e.detach() - e_q).square().sum((-2, -1))
        return loss

    @torch.no_grad()
    def update_codebook(self, params: Tensor) -> None:
        """One EMA step of the codebook from the batch's encoder outputs (see the class docstring).

        A no-op in eval mode and without EMA. All-reduces the batch statistics across ranks (``sync_ema``).
        """
        if not self.training or not self.ema:
            return
        z_e = self.encodings(params).detach().to(self.codebook.dtype)  # [B, n, e]
        codes = self.quantize(params)
        one_hot = F.one_hot(codes, self.num_categories).to(z_e.dtype)  # [B, n, m]
        counts = one_hot.sum(0)  # [n, m]
        sums = torch.einsum("bnm,bne->nme", one_hot, z_e)  # [n, m, e]
        if self.sync_ema and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            stats = torch.cat((counts.unsqueeze(-1), sums), dim=-1)
            dist.all_reduce(stats)
            counts, sums = stats[..., 0], stats[..., 1:]
        d = self.decay
        self.ema_cluster_size.mul_(d).add_(counts, alpha=1.0 - d)
        self.ema_embed_sum.mul_(d).add_(sums, alpha=1.0 - d)
        total = self.ema_cluster_size.sum(-1, keepdim=True)  # [n, 1]
        smoothed = (self.ema_cluster_size + self.epsilon) / (total + self.num_categories * self.epsilon) * total
        self.codebook.copy_(self.ema_embed_sum / smoothed.unsqueeze(-1))

    def extra_repr(self) -> str:
        return (f"num_latents={self.num_latents}, num_categories={self.num_categories}, "
                f"embedding_size={self.embedding_size}, beta={self.beta}, decay={self.decay}")
