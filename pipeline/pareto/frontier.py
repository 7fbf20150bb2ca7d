"""Pareto frontiers of data fit against latent usage (thesis §5.7): pure functions, no I/O.

A sentence VAE is judged on the tradeoff between its negative log-likelihood (lower is better) and
how much information its latents carry about the data (mutual information, higher is better), never
on one number. A point is *dominated* when another point of its group is at least as good on both
axes and strictly better on one; a group's *frontier* is its non-dominated points, ordered by latent
usage.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

__all__ = ["FrontierPoint", "frontier_mask", "group_frontiers", "pareto_frontier"]


@dataclass(frozen=True)
class FrontierPoint:
    """One finished run: its group (e.g. ``"DReG 16 / KL"``), latent usage (MI, nats) and NLL.

    ``label`` names the run (a run id or name); ``extra`` carries what a table or CSV shows beside it
    (λ, α, perplexity, ...).
    """

    group: str
    mutual_information: float
    nll: float
    label: str = ""
    extra: dict[str, float | str] = field(default_factory=dict, compare=False, hash=False)


def frontier_mask(usage: Sequence[float], nll: Sequence[float]) -> list[bool]:
    """Which points are on the Pareto frontier: maximise ``usage``, minimise ``nll``.

    ``usage`` and ``nll`` have one value per point. Points with a non-finite coordinate are never on
    it. Equal points are all kept (none dominates the other). O(N log N).
    """
    if len(usage) != len(nll):
        raise ValueError(f"usage has {len(usage)} values but nll has {len(nll)}")
    finite = [i for i in range(len(usage)) if math.isfinite(usage[i]) and math.isfinite(nll[i])]
    # Highest usage first, and at equal usage lowest NLL first: a point is on the frontier iff its NLL
    # is below every NLL seen at strictly higher usage, and not above the best NLL at its own usage.
    order = sorted(finite, key=lambda i: (-usage[i], nll[i]))
    mask = [False] * len(usage)
    best_higher = math.inf  # best NLL among points of strictly higher usage
    index = 0
    while index < len(order):
        same = [order[index]]
        while index + len(same) < len(order) and usage[order[index + len(same)]] == usage[order[index]]:
            same.append(order[index + len(same)])
        best_here = nll[same[0]]
        for i in same:
            mask[i] = nll[i] == best_here and nll[i] < best_higher
        best_higher = min(best_higher, best_here)
        index += len(same)
    return mask


def pareto_frontier(points: Iterable[FrontierPoint]) -> list[FrontierPoint]:
    """The non-dominated points of ``points`` (one group), by increasing mutual information."""
    points = list(points)
    mask = frontier_mask([p.mutual_information for p in points], [p.nll for p in points])
    return sorted((p for p, keep in zip(points, mask) if keep), key=lambda p: (p.mutual_information, p.nll))


def group_frontiers(points: Iterable[FrontierPoint]) -> dict[str, list[FrontierPoint]]:
    """Each group's frontier (see :func:`pareto_frontier`), groups in sorted order."""
    groups: dict[str, list[FrontierPoint]] = {}
    for point in points:
        groups.setdefault(point.group, []).append(point)
    return {name: pareto_frontier(groups[name]) for name in sorted(groups)}
