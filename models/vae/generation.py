"""Text from a trained sentence VAE: decoding a latent, reconstructions, prior samples, interpolations.

Everything here runs the model in eval mode (no dropout, no word dropout) without gradients, on the
model's device, and restores the model's training flag afterwards. Shapes: ``B`` sentences, ``D``
Gaussian dimensions, ``n`` categorical latents of ``m`` categories, ``V`` the vocabulary.

A latent *per sentence* is ``z`` [B, D] float (Gaussian), [B, n] int64 category indices (categorical)
or [B, n e + n] float ``[z_q ; codes]`` (VQ, as ``VQLatent.sample`` lays it out), i.e. the model's
``[K, B, ...]`` latents without the sample axis. The VQ latent is recognised by its API
(``code_vectors`` / ``codes_of``), not by its class.

:func:`decode` turns ``z`` into token ids. The recurrent decoder runs incrementally: at step ``t`` its
input is ``[E[w_{t-1}] ; z_vec]`` (``w_{-1}`` = ``<bos>``), one step of its recurrent layer from the
previous state, then its output Linear: in eval mode this is exactly
:meth:`models.vae.decoder.RecurrentDecoder.forward` on the growing prefix (the tests check it against
that forward), in O(T) rather than O(T^2). The MLP decoder (synthetic task, one-symbol sentences)
returns the one symbol.

Greedy decoding takes the argmax of the next-token logits; sampled decoding draws from
``softmax(logits / temperature)`` with :func:`torch.multinomial` on the ``generator``'s device (a CPU
generator gives the same draws whatever device the model is on).

Categorical interpolation: :class:`~models.vae.decoder.LatentInput` embeds integer category codes
only, so :func:`interpolate` moves from ``z_a``'s codes to ``z_b``'s by switching the latents that
differ one at a time, in latent order (``round(t * #differing)`` of them switched at fraction ``t``).
:func:`interpolate_latents` does the same for VQ codes (each step decodes real code vectors).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor, nn

from .decoder import MLPDecoder, RecurrentDecoder
from .latents import CategoricalLatent, VQLatent

__all__ = [
    "Interpolation",
    "PriorSamples",
    "Reconstructions",
    "Sentences",
    "decode",
    "interpolate",
    "interpolate_latents",
    "interpolate_prior",
    "interpolate_sentences",
    "posterior_mode",
    "prior_latents",
    "prior_samples",
    "reconstruct",
]


@dataclass
class Reconstructions:
    """:func:`reconstruct` of ``B`` sentences: the inputs and two decodings, token ids per sentence."""

    inputs: list[list[int]]  # the sentences' targets (without padding)
    greedy: list[list[int]]  # greedy decoding of the posterior mode z
    sampled: list[list[int]]  # sampled decoding of a z drawn from q(z|x)
    z_mode: Tensor  # [B, D] float / [B, n] int64 / [B, n e + n] float (VQ)
    z_sampled: Tensor  # the same shape (VQ: equal to z_mode, q(z|x) is a point mass)


@dataclass
class PriorSamples:
    """:func:`prior_samples`: ``z`` [N, ...] drawn from the prior and its greedy / sampled decodings."""

    z: Tensor
    greedy: list[list[int]]
    sampled: list[list[int]]


@dataclass
class Interpolation:
    """An interpolation path: fractions ``t`` [S], latents ``z`` [S, ...] and their greedy decodings."""

    t: list[float]
    z: Tensor
    tokens: list[list[int]]


class Sentences(Protocol):
    """What is read of a batch of sentences (a :class:`~pipeline.data.sentences.SentenceBatch`)."""

    targets: Tensor  # [T, B] int64, padded
    lengths: Tensor  # [B] int64


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _float_dtype(model: nn.Module) -> torch.dtype:
    return next(p for p in model.parameters() if p.is_floating_point()).dtype


def _choose(logits: Tensor, greedy: bool, generator: torch.Generator | None, temperature: float) -> Tensor:
    """Next tokens [B] from ``logits`` [B, V]: argmax, or a draw from softmax(logits / temperature)."""
    if greedy:
        return logits.argmax(-1)
    device = generator.device if generator is not None else logits.device
    probs = (logits.to(device=device, dtype=torch.float64) / temperature).softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1).to(logits.device)


def _decode_recurrent(
    decoder: RecurrentDecoder, z: Tensor, max_length: int, bos_id: int, eos_id: int,
    choose: Callable[[Tensor], Tensor],
) -> list[list[int]]:
    """Incremental decoding: ``z`` [B, ...] -> up to ``max_length`` ids per sentence (``<eos>`` kept)."""
    batch = z.shape[0]
    z_vec = decoder.latent_input(z.unsqueeze(0))  # [1, B, D']
    zeros = z_vec.new_zeros(batch, decoder.hidden_size)
    state = (zeros, zeros)
    token = torch.full((1, batch), bos_id, dtype=torch.long, device=z_vec.device)
    steps: list[Tensor] = []
    done = torch.zeros(batch, dtype=torch.bool, device=z_vec.device)
    for _ in range(max_length):
        x = torch.cat((decoder.embedding(token), z_vec), dim=-1)  # [1, B, E + D']
        out, state = decoder.layer(x, state)  # [1, B, n]
        token = choose(decoder.output(out[0])).unsqueeze(0)  # [1, B]
        steps.append(token[0])
        done |= token[0] == eos_id
        if bool(done.all()):
            break
    ids = torch.stack(steps, dim=1).tolist()  # [B, T]
    return [row[: row.index(eos_id) + 1] if eos_id in row else row for row in ids]


def decode(
    model: nn.Module, z: Tensor, *, max_length: int, bos_id: int, eos_id: int, greedy: bool = True,
    generator: torch.Generator | None = None, temperature: float = 1.0,
) -> list[list[int]]:
    """Token ids of ``z`` [B, D] float / [B, n] int64 / [B, n e + n] VQ (one latent per sentence), one list
    per sentence.

    Recurrent decoder: starts from ``<bos>``, feeds the previous token and ``z`` at every step and stops
    after ``<eos>`` (kept as the last id) or ``max_length`` ids. MLP decoder: the one symbol ``[[s], ...]``.
    ``greedy``: argmax; else draws from ``softmax(logits / temperature)`` with ``generator`` (None: the
    global RNG of the logits' device).
    """
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")
    if not temperature > 0.0:
        raise ValueError(f"temperature must be > 0, got {temperature}")

    def choose(logits: Tensor) -> Tensor:
        return _choose(logits, greedy, generator, temperature)

    if z.shape[0] == 0:
        return []
    with _eval_mode(model):
        z = z.to(_device(model), _float_dtype(model)) if z.is_floating_point() else z.to(_device(model))
        decoder = model.decoder
        if isinstance(decoder, MLPDecoder):
            return [[int(s)] for s in choose(decoder(z.unsqueeze(0))[0]).tolist()]
        if not isinstance(decoder, RecurrentDecoder):
            raise TypeError(f"cannot decode with a {type(decoder).__name__}")
        return _decode_recurrent(decoder, z, max_length, bos_id, eos_id, choose)


def _sentence_ids(targets: Tensor, lengths: Tensor) -> list[list[int]]:
    """``targets`` [T, B], ``lengths`` [B] -> each sentence's ids without padding."""
    return [targets[: int(n), b].tolist() for b, n in enumerate(lengths)]


def _encode(model: nn.Module, batch: Sentences) -> Tensor:
    """``params`` [B, P] of q(z|x) (eval mode, no gradients)."""
    with _eval_mode(model):
        device = _device(model)
        return model.encoder(batch.targets.to(device), batch.lengths.to(device))


def _mode(model: nn.Module, params: Tensor) -> Tensor:
    if isinstance(model.latent, CategoricalLatent):
        return model.latent.log_probs(params).argmax(-1)  # [B, n]
    if isinstance(model.latent, VQLatent):
        return model.latent.sample(params, 1)[0].detach()  # the point mass [B, n e + n]
    return model.latent.posterior_mean(params)  # [B, D]


def posterior_mode(model: nn.Module, batch: Sentences) -> Tensor:
    """The mode of q(z|x) per sentence of ``batch`` (``targets`` [T, B], ``lengths`` [B]): the mean [B, D]
    (Gaussian) / the argmax per latent [B, n] int64 (categorical) / the nearest codes [B, n e + n] (VQ)."""
    return _mode(model, _encode(model, batch))


def reconstruct(
    model: nn.Module, batch: Sentences, *, max_length: int, bos_id: int, eos_id: int,
    generator: torch.Generator | None = None, temperature: float = 1.0,
) -> Reconstructions:
    """Encode ``batch`` (``targets`` [T, B], ``lengths`` [B]); greedy-decode the posterior mode, and
    sample-decode a ``z`` drawn from q(z|x) (ancestral sampling: ``generator`` draws the latent noise, then
    the tokens; None: the global RNG)."""
    params = _encode(model, batch)
    if generator is None:
        z_sampled = model.latent.sample(params, 1)[0]
    else:
        noise = model.latent.draw_noise(1, params.shape[0], generator)
        z_sampled = model.latent.sample(params, 1, noise)[0]
    z_mode = _mode(model, params)
    opts = {"max_length": max_length, "bos_id": bos_id, "eos_id": eos_id}
    return Reconstructions(
        inputs=_sentence_ids(batch.targets, batch.lengths),
        greedy=decode(model, z_mode, **opts),
        sampled=decode(model, z_sampled, greedy=False, generator=generator, temperature=temperature, **opts),
        z_mode=z_mode,
        z_sampled=z_sampled,
    )


def prior_latents(model: nn.Module, n: int, generator: torch.Generator | None = None) -> Tensor:
    """``n`` latents from the prior, drawn on CPU from ``generator``: N(0, I) [n, D] (in the model's float
    dtype), uniform categories [n, num_latents] int64 or uniform VQ codes [n, n e + n]; on the model's device."""
    latent = model.latent
    if isinstance(latent, (CategoricalLatent, VQLatent)):
        z = torch.randint(latent.num_categories, (n, latent.num_latents), generator=generator)
        if isinstance(latent, VQLatent):
            z = latent.samples_of(z).to(_float_dtype(model))
    else:
        z = torch.randn(n, latent.size, generator=generator).to(_float_dtype(model))
    return z.to(_device(model))


def prior_samples(
    model: nn.Module, n: int, generator: torch.Generator | None = None, *, max_length: int, bos_id: int,
    eos_id: int, temperature: float = 1.0,
) -> PriorSamples:
    """``n`` latents from the prior (:func:`prior_latents`), each decoded greedily and by sampling."""
    z = prior_latents(model, n, generator)
    opts = {"max_length": max_length, "bos_id": bos_id, "eos_id": eos_id}
    return PriorSamples(
        z=z,
        greedy=decode(model, z, **opts),
        sampled=decode(model, z, greedy=False, generator=generator, temperature=temperature, **opts),
    )


def _fractions(steps: int) -> list[float]:
    if steps < 2:
        raise ValueError(f"an interpolation needs steps >= 2, got {steps}")
    return [i / (steps - 1) for i in range(steps)]


def interpolate(z_a: Tensor, z_b: Tensor, steps: int) -> Tensor:
    """``steps`` latents from ``z_a`` to ``z_b`` (same shape ``[...]``) -> [steps, ...]; row 0 is ``z_a``
    and row ``steps - 1`` is ``z_b`` exactly.

    Float (Gaussian): ``(1 - t) z_a + t z_b`` at ``t = i / (steps - 1)``. Integer (categorical codes):
    the ``d`` entries where the codes differ switch from ``a``'s to ``b``'s one at a time, in order;
    ``round(t d)`` of them are switched at step ``i``.
    """
    if z_a.shape != z_b.shape:
        raise ValueError(f"z_a and z_b must have one shape, got {tuple(z_a.shape)} and {tuple(z_b.shape)}")
    fractions = _fractions(steps)
    if z_a.is_floating_point():
        t = torch.tensor(fractions, dtype=z_a.dtype, device=z_a.device).view(-1, *[1] * z_a.dim())
        return (1.0 - t) * z_a.unsqueeze(0) + t * z_b.unsqueeze(0)
    flat_a, flat_b = z_a.reshape(-1), z_b.reshape(-1)
    differ = torch.nonzero(flat_a != flat_b).flatten()
    rows = []
    for t in fractions:
        row = flat_a.clone()
        switched = differ[: round(t * differ.numel())]
        row[switched] = flat_b[switched]
        rows.append(row.view_as(z_a))
    return torch.stack(rows)


def interpolate_latents(model: nn.Module, z_a: Tensor, z_b: Tensor, steps: int) -> Tensor:
    """:func:`interpolate` for ``model``'s latents ``z_a``, ``z_b`` [...] -> [steps, ...]. VQ samples switch
    their codes one at a time (as categorical codes do), each step holding real code vectors."""
    latent = model.latent
    if not isinstance(latent, VQLatent):
        return interpolate(z_a, z_b, steps)
    codes = interpolate(latent.codes_of(z_a), latent.codes_of(z_b), steps)  # [steps, n]
    return latent.samples_of(codes).to(device=z_a.device, dtype=z_a.dtype)


def _interpolation(
    model: nn.Module, z_a: Tensor, z_b: Tensor, steps: int, max_length: int, bos_id: int, eos_id: int,
) -> Interpolation:
    z = interpolate_latents(model, z_a, z_b, steps)
    tokens = decode(model, z, max_length=max_length, bos_id=bos_id, eos_id=eos_id)
    return Interpolation(t=_fractions(steps), z=z, tokens=tokens)


def interpolate_sentences(
    model: nn.Module, batch: Sentences, index_a: int, index_b: int, steps: int, *,
    max_length: int, bos_id: int, eos_id: int,
) -> Interpolation:
    """Greedy decodings along :func:`interpolate_latents` between the posterior modes of sentences
    ``index_a`` and ``index_b`` of ``batch`` (``targets`` [T, B], ``lengths`` [B])."""
    z = posterior_mode(model, batch)
    return _interpolation(model, z[index_a], z[index_b], steps, max_length, bos_id, eos_id)


def interpolate_prior(
    model: nn.Module, steps: int, generator: torch.Generator | None = None, *, max_length: int, bos_id: int,
    eos_id: int,
) -> Interpolation:
    """Greedy decodings along :func:`interpolate_latents` between two latents drawn from the prior
    (Bowman et al. 2016; Leibowitz Table 2)."""
    z = prior_latents(model, 2, generator)
    return _interpolation(model, z[0], z[1], steps, max_length, bos_id, eos_id)
