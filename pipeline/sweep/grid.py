"""A sweep's grid: which config fields take which values, and the validated config of every point.

Pure functions, no I/O. A sweep is one base config and a grid of overrides (the thesis traces a
frontier by sweeping λ, ``vae.objective.mi_weight``, and α, ``vae.objective.alpha``); its *key* is a
hash of both, so that the same sweep started again finds its runs, checkpoints and MLflow sweep run
again, and each point is a pipeline run of its own (own work dir, checkpoints and run key) nested under
the sweep run (``tracking.sweep_key``). The Optuna trials of a study (:mod:`pipeline.tune`) nest the same way,
laid out by :class:`PointLayout`.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.cli_options import parse_value
from pipeline.config import ConfigError, PipelineConfig, set_dotted, validate_config

__all__ = [
    "SHORTHANDS",
    "SWEEP_LAYOUT",
    "PointLayout",
    "SweepAxis",
    "SweepPoint",
    "expand_grid",
    "parse_axis",
    "point_config",
    "sweep_dir",
    "sweep_key",
]

SHORTHANDS = {"lambda": "vae.objective.mi_weight", "alpha": "vae.objective.alpha"}
"""``--lambda`` and ``--alpha`` of the sweep command: the two fields the thesis sweeps."""

_SLUG = re.compile(r"[^A-Za-z0-9.]+")


@dataclass(frozen=True)
class SweepAxis:
    """One swept field (dotted, e.g. ``vae.objective.mi_weight``) and its values in order."""

    field: str
    values: tuple[Any, ...]

    @property
    def short(self) -> str:
        """The field's last part (``mi_weight``), or its shorthand name (``lambda``)."""
        for name, dotted in SHORTHANDS.items():
            if dotted == self.field:
                return name
        return self.field.rsplit(".", 1)[-1]


@dataclass(frozen=True)
class SweepPoint:
    """One point of the grid: its index (from 0) and the value of every axis."""

    index: int
    overrides: dict[str, Any]
    slug: str  # "lambda0.25-alpha0.9": readable, names the point's runs

    def describe(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.overrides.items())


def parse_axis(text: str) -> SweepAxis:
    """``"vae.objective.mi_weight=0,0.25,0.5"`` (or ``lambda=...``) -> :class:`SweepAxis`; values are YAML
    scalars. Raises :class:`~pipeline.config.ConfigError` naming the expected form."""
    field, sep, values = text.partition("=")
    field = SHORTHANDS.get(field.strip(), field.strip())
    items = [v.strip() for v in values.split(",")] if sep else []
    if not field or not items or any(not v for v in items):
        raise ConfigError(f"grid axis {text!r} is not FIELD=V1,V2,...; e.g. vae.objective.mi_weight=0,0.25,0.5 "
                          "(or lambda=0,0.5 / alpha=0.9,1.1)")
    return SweepAxis(field, tuple(parse_value(v) for v in items))


def expand_grid(axes: Sequence[SweepAxis]) -> list[SweepPoint]:
    """Every combination of the axes' values (the first axis varies slowest), numbered from 0.

    Raises :class:`~pipeline.config.ConfigError` when no axis is given, a field is swept twice, or a value
    repeats on an axis.
    """
    if not axes:
        raise ConfigError("a sweep needs at least one axis: --lambda V1 V2 ..., --alpha ..., or --grid FIELD=V1,V2")
    fields = [a.field for a in axes]
    for axis in axes:
        if fields.count(axis.field) > 1:
            raise ConfigError(f"{axis.field} is swept twice; give all its values in one axis")
        if any(a == b for i, a in enumerate(axis.values) for b in axis.values[i + 1:]):  # 0 == 0.0 too
            raise ConfigError(f"{axis.field} has repeated values {list(axis.values)}; give each value once")
    points = []
    for index, values in enumerate(itertools.product(*(a.values for a in axes))):
        slug = "-".join(f"{a.short}{_SLUG.sub('_', str(v))}" for a, v in zip(axes, values))
        points.append(SweepPoint(index, dict(zip(fields, values)), slug))
    return points


def sweep_key(base: PipelineConfig, axes: Sequence[SweepAxis]) -> str:
    """A 10-hex-digit hash of the resolved base config and the grid: the same sweep gets the same key."""
    grid = [[a.field, list(a.values)] for a in axes]
    digest = hashlib.sha256((base.to_yaml() + json.dumps(grid, sort_keys=True, default=str)).encode())
    return digest.hexdigest()[:10]


def sweep_dir(base: PipelineConfig, key: str) -> Path:
    """Where a local sweep keeps its points' work dirs, configs and logs: ``<run dir>/sweep-<key>``."""
    return base.run_dir / f"sweep-{key}"


@dataclass(frozen=True)
class PointLayout:
    """Where the runs of a sweep's points (or a study's trials) live and how they are named: work dirs
    ``<run dir>/<folder>-<key>/<prefix>-<i>``, checkpoints ``<checkpoint.url>/<folder>-<key>/<prefix>-<i>``,
    Kubernetes run names ``<name>-<key[:6]>-<short><i>``; ``what`` names a point in error messages."""

    folder: str = "sweep"
    prefix: str = "point"
    short: str = "p"
    what: str = "sweep point"


SWEEP_LAYOUT = PointLayout()


def point_config(base: PipelineConfig, point: SweepPoint, key: str, *, tracking_uri: str | None = None,
                 layout: PointLayout = SWEEP_LAYOUT) -> PipelineConfig:
    """The validated config of one point: the base config with the point's values, named
    ``<base name>-<slug>``, logging into the base config's experiment, nested under the sweep run,
    with its own work dir, checkpoint location and Kubernetes run name. ``tracking_uri`` pins the
    MLflow store (a local sweep: the store of the base config's work root, which the points' own work
    dirs would not find); None leaves ``tracking.uri`` as the base has it (Kubernetes: the pods' env).
    ``layout``: a sweep's (the default) or a study's (:mod:`pipeline.tune`: trials).

    Raises :class:`~pipeline.config.ConfigError` naming the point when a value is invalid.
    """
    raw = base.model_dump(mode="json")
    for field, value in point.overrides.items():
        set_dotted(raw, field, value)
    where = f"{layout.folder}-{key}"
    raw["name"] = f"{base.name}-{point.slug}"
    raw["work_dir"] = str(base.run_dir / where / f"{layout.prefix}-{point.index}")
    tracking = raw.setdefault("tracking", {})
    tracking["experiment"] = base.tracking.experiment or base.name
    tracking["sweep_key"] = key
    tracking["run_key"] = f"{key}-{point.index}"
    if tracking_uri is not None:
        tracking["uri"] = tracking_uri
    if base.checkpoint.url:
        raw["checkpoint"]["url"] = f"{base.checkpoint.url.rstrip('/')}/{where}/{layout.prefix}-{point.index}"
    from pipeline.k8s.builders import dns_name

    raw["cluster"]["run_name"] = f"{dns_name(base.cluster.run_name or base.name, 30)}-{key[:6]}-{layout.short}{point.index}"
    return validate_config(raw, origin=f"{layout.what} {point.index} ({point.describe()})")
