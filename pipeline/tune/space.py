"""A search space over any config fields: parsing, validation against a config, and a trial's values.

Pure functions apart from reading the YAML file (:func:`load_space`). A space file::

    # Thesis Table 2.4: ...           <- the first sentence of the leading comment is its purpose
    configs: [ptb_char_rlstm]         # the shipped configs it is meant for (tests validate it against them)
    objectives: [valid_nll]           # optional: final metrics to optimise (default: by the config's task)
    fixed:                            # optional: values every trial gets
      train.averaging.method: two_tailed
    params:                           # dotted config fields
      train.optimizer.lr: {type: float, low: 1.0e-3, high: 4.0e-3, log: true}
      model.mogrifier_rounds: {type: int, low: 0, high: 6}
      model.mogrifier_rank: {type: int, low: -20, high: 100, clamp_low: 0}
      model.cell: {choices: [lstm, rlstm]}

``float``: ``low``, ``high``, optional ``log`` or ``step``; ``int``: ``low``, ``high``, optional ``step`` or
``log``, and ``clamp_low``: a sampled value below it is set to it (the thesis samples the Mogrifier rank
from -20..100 and reads <= 0 as full rank; our full rank is 0, so ``clamp_low: 0`` keeps the thesis'
prior, about one trial in six at full rank, while Optuna records the sampled value); ``choices``: a
categorical parameter. Every field, endpoint, choice and fixed value is checked against the config's
schema (:func:`validate_space`), so a bad range fails before any trial runs, naming the field and the fix.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib.resources
import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from pipeline.config import ConfigError, PipelineConfig, config_purpose, flatten_config, set_dotted, validate_config

__all__ = [
    "CategoricalParam",
    "Direction",
    "FloatParam",
    "IntParam",
    "Param",
    "SearchSpace",
    "config_values",
    "default_objectives",
    "direction_of",
    "distributions",
    "load_space",
    "objective_values",
    "param_unit",
    "parse_space",
    "shipped_space_names",
    "shipped_space_purposes",
    "validate_space",
]

Direction = Literal["minimize", "maximize"]

_MINIMISED = ("nll", "bpc", "ppl", "loss", "kl_per_token", "kl_per_sentence")
_MAXIMISED = ("mutual_information", "active_units", "elbo")
_TOP_KEYS = {"configs", "objectives", "fixed", "params", "description"}


@dataclass(frozen=True)
class FloatParam:
    """A float field sampled in [low, high] (log-uniformly with ``log``; on a grid of ``step``)."""

    name: str
    low: float
    high: float
    log: bool = False
    step: float | None = None

    def describe(self) -> str:
        return f"float [{self.low:g}, {self.high:g}]" + (" log" if self.log else "") + (
            f" step {self.step:g}" if self.step else "")


@dataclass(frozen=True)
class IntParam:
    """An integer field sampled in [low, high] (``step``, or log-uniformly with ``log``); values below
    ``clamp_low`` are set to it in the trial's config."""

    name: str
    low: int
    high: int
    step: int = 1
    log: bool = False
    clamp_low: int | None = None

    def describe(self) -> str:
        text = f"int [{self.low}, {self.high}]" + (" log" if self.log else "") + (
            f" step {self.step}" if self.step != 1 else "")
        return text + (f" (< {self.clamp_low} -> {self.clamp_low})" if self.clamp_low is not None else "")


@dataclass(frozen=True)
class CategoricalParam:
    """A field taking one of ``choices``."""

    name: str
    choices: tuple[Any, ...]

    def describe(self) -> str:
        return "one of " + ", ".join(json.dumps(c) for c in self.choices)


Param = FloatParam | IntParam | CategoricalParam


@dataclass(frozen=True)
class SearchSpace:
    """A parsed space: its parameters in file order, fixed values, objectives and intended configs."""

    name: str
    params: tuple[Param, ...]
    fixed: dict[str, Any] = field(default_factory=dict)
    objectives: tuple[str, ...] | None = None
    configs: tuple[str, ...] = ()
    description: str = ""

    def param(self, name: str) -> Param:
        for p in self.params:
            if p.name == name:
                return p
        raise KeyError(name)

    def canonical(self) -> dict[str, Any]:
        """What makes the space this space (for the study key): parameters, fixed values, objectives."""
        return {"params": [[type(p).__name__, *_fields(p)] for p in self.params],
                "fixed": sorted(self.fixed.items()), "objectives": list(self.objectives or [])}

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.canonical(), sort_keys=True, default=str).encode()).hexdigest()


def _fields(param: Param) -> list[Any]:
    return [getattr(param, f) for f in param.__dataclass_fields__]


# ------------------------------------------------------------------------------------------------ parsing


def _number(value: Any, what: str, origin: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"search space {origin}: {what} must be a finite number, got {value!r}")
    return value


def _integer(value: Any, what: str, origin: str) -> int:
    if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, float) and value.is_integer())):
        raise ConfigError(f"search space {origin}: {what} must be an integer, got {value!r}")
    return int(value)


def _parse_param(name: str, spec: Any, origin: str) -> Param:
    where = f"params.{name}"
    if not isinstance(spec, Mapping):
        raise ConfigError(f"search space {origin}: {where} must be a mapping such as {{type: float, low: 0.001, "
                          f"high: 0.004, log: true}} or {{choices: [a, b]}}, got {spec!r}")
    kind = spec.get("type", "categorical" if "choices" in spec else None)
    allowed = {"float": {"type", "low", "high", "log", "step"}, "int": {"type", "low", "high", "step", "log", "clamp_low"},
               "categorical": {"type", "choices"}}
    if kind not in allowed:
        raise ConfigError(f"search space {origin}: {where} needs type: float or type: int (with low and high), or "
                          f"choices: [...]; got type {kind!r}")
    unknown = sorted(set(spec) - allowed[kind])
    if unknown:
        raise ConfigError(f"search space {origin}: {where}: unknown key(s) {', '.join(unknown)} for a {kind} parameter; "
                          f"it takes {', '.join(sorted(allowed[kind] - {'type'}))}")
    if kind == "categorical":
        choices = spec.get("choices")
        if not isinstance(choices, list) or not choices:
            raise ConfigError(f"search space {origin}: {where}.choices must be a non-empty list, got {choices!r}")
        if any(a == b for i, a in enumerate(choices) for b in choices[i + 1:]):
            raise ConfigError(f"search space {origin}: {where}.choices repeats a value ({choices}); give each once")
        return CategoricalParam(name, tuple(choices))
    for key in ("low", "high"):
        if key not in spec:
            raise ConfigError(f"search space {origin}: {where} needs {key} (a {kind} parameter takes low and high)")
    log = spec.get("log", False)
    if not isinstance(log, bool):
        raise ConfigError(f"search space {origin}: {where}.log must be true or false, got {log!r}")
    if kind == "float":
        low, high = _number(spec["low"], f"{where}.low", origin), _number(spec["high"], f"{where}.high", origin)
        step = spec.get("step")
        if step is not None and (_number(step, f"{where}.step", origin) <= 0 or log):
            raise ConfigError(f"search space {origin}: {where}.step must be > 0 and cannot go with log: true")
        param: Param = FloatParam(name, float(low), float(high), log, None if step is None else float(step))
    else:
        low, high = _integer(spec["low"], f"{where}.low", origin), _integer(spec["high"], f"{where}.high", origin)
        step = _integer(spec.get("step", 1), f"{where}.step", origin)
        if step < 1 or (log and step != 1):
            raise ConfigError(f"search space {origin}: {where}.step must be >= 1, and 1 with log: true")
        clamp = spec.get("clamp_low")
        clamp = None if clamp is None else _integer(clamp, f"{where}.clamp_low", origin)
        if clamp is not None and not low < clamp <= high:
            raise ConfigError(f"search space {origin}: {where}.clamp_low {clamp} must lie in ({low}, {high}]: "
                              "sampled values below it are set to it")
        param = IntParam(name, low, high, step, log, clamp)
    if not param.low < param.high:
        raise ConfigError(f"search space {origin}: {where}: low {param.low} must be below high {param.high} "
                          "(a fixed value goes under fixed:)")
    if param.log and param.low <= 0:
        raise ConfigError(f"search space {origin}: {where}: log spacing needs low > 0, got {param.low}; use a positive "
                          "low or drop log: true")
    return param


def parse_space(raw: Any, origin: str = "<space>", name: str | None = None) -> SearchSpace:
    """A :class:`SearchSpace` from a mapping as the YAML file holds it; :class:`ConfigError` naming the key."""
    if not isinstance(raw, Mapping):
        raise ConfigError(f"search space {origin}: the top level must be a mapping with params: (and optionally "
                          f"configs:, objectives:, fixed:), got {type(raw).__name__}")
    unknown = sorted(set(raw) - _TOP_KEYS)
    if unknown:
        raise ConfigError(f"search space {origin}: unknown key(s) {', '.join(unknown)}; a space has "
                          f"{', '.join(sorted(_TOP_KEYS))} (the fields to tune go under params:)")
    params = raw.get("params")
    if not isinstance(params, Mapping) or not params:
        raise ConfigError(f"search space {origin}: params: must map at least one dotted config field to its range, "
                          "e.g. params: {train.optimizer.lr: {type: float, low: 0.001, high: 0.004, log: true}}")
    fixed = raw.get("fixed") or {}
    if not isinstance(fixed, Mapping):
        raise ConfigError(f"search space {origin}: fixed: must map dotted config fields to values, got {fixed!r}")
    both = sorted(set(fixed) & set(params))
    if both:
        raise ConfigError(f"search space {origin}: {', '.join(both)} is both fixed and tuned; keep it in one place")
    objectives = raw.get("objectives")
    if objectives is not None:
        if isinstance(objectives, str):
            objectives = [objectives]
        if not isinstance(objectives, list) or not objectives or len(objectives) > 2:
            raise ConfigError(f"search space {origin}: objectives: must list one or two final metrics, e.g. [valid_nll] "
                              "or [valid_nll, valid_mutual_information]")
        for metric in objectives:
            direction_of(metric)
    configs = raw.get("configs") or []
    if isinstance(configs, str):
        configs = [configs]
    if not isinstance(configs, list) or not all(isinstance(c, str) for c in configs):
        raise ConfigError(f"search space {origin}: configs: must list config names, got {configs!r}")
    return SearchSpace(
        name=name or origin, params=tuple(_parse_param(str(k), v, origin) for k, v in params.items()),
        fixed=dict(fixed), objectives=None if objectives is None else tuple(objectives), configs=tuple(configs),
        description=str(raw.get("description") or ""))


def _spaces_dir() -> Path:
    return Path(str(importlib.resources.files("pipeline") / "configs" / "spaces"))


def shipped_space_names() -> list[str]:
    """Names of the search spaces shipped in ``pipeline/configs/spaces``."""
    return sorted(p.stem for p in _spaces_dir().glob("*.yaml"))


def shipped_space_purposes() -> dict[str, str]:
    """``{name: one-line purpose}`` of every shipped space (the first sentence of its leading comment)."""
    return {name: config_purpose((_spaces_dir() / f"{name}.yaml").read_text()) for name in shipped_space_names()}


def load_space(name_or_path: str | os.PathLike) -> SearchSpace:
    """A shipped space by name (``lm_small_data``) or a YAML file; :class:`ConfigError` naming the problem."""
    path = Path(name_or_path)
    if path.suffix not in (".yaml", ".yml") and not path.exists():
        shipped = _spaces_dir() / f"{name_or_path}.yaml"
        if not shipped.exists():
            raise ConfigError(f"unknown search space {str(name_or_path)!r}: give a YAML path or one of the shipped "
                              f"spaces: {', '.join(shipped_space_names())}")
        path = shipped
    if not path.exists():
        raise ConfigError(f"search space file {str(path)!r} does not exist")
    text = path.read_text()
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"search space file {str(path)!r} is not valid YAML: {err}") from None
    space = parse_space(raw, origin=str(path), name=path.stem)
    if not space.description:
        space = SearchSpace(space.name, space.params, space.fixed, space.objectives, space.configs, config_purpose(text))
    return space


# ------------------------------------------------------------------------------------------------ validation


def _first_problem(err: ConfigError) -> str:
    """The lines of a validation error after its header, without echoing long inputs (whole sections)."""
    lines = []
    for line in str(err).splitlines()[1:]:
        line = line.strip().replace("Value error, ", "")
        got = line.rfind(" (got ")
        if got >= 0 and len(line) - got > 60:
            line = line[:got]
        if line:
            lines.append(line)
    return "; ".join(lines) if lines else str(err)


def _check_value(base_raw: dict[str, Any], updates: Mapping[str, Any], origin: str) -> str | None:
    raw = json.loads(json.dumps(base_raw))
    for dotted, value in updates.items():
        set_dotted(raw, dotted, value)
    try:
        validate_config(raw, origin=origin)
    except ConfigError as err:
        return _first_problem(err)
    return None


def _endpoints(param: Param) -> list[Any]:
    if isinstance(param, CategoricalParam):
        return list(param.choices)
    if isinstance(param, IntParam):
        low = param.low if param.clamp_low is None else param.clamp_low
        return [low, param.low + (param.high - param.low) // param.step * param.step]
    return [param.low, param.high]


def validate_space(space: SearchSpace, base: PipelineConfig) -> None:
    """Check every field of ``space`` exists in ``base``'s schema and every endpoint, choice and fixed value
    makes a valid config of it (the fixed values and every parameter at its low end, then each parameter's
    high end and other choices in turn). :class:`ConfigError` names the field, the value and the fix."""
    flat = flatten_config(base)
    base_raw = base.model_dump(mode="json")
    origin = f"search space {space.name}"
    for name in [p.name for p in space.params] + list(space.fixed):
        if name in flat:
            continue
        if any(k.startswith(name + ".") for k in flat):
            raise ConfigError(f"{origin}: {name} is a section, not a field; tune its fields (e.g. "
                              f"{next(k for k in flat if k.startswith(name + '.'))})")
        close = difflib.get_close_matches(name, list(flat), n=1, cutoff=0.6)
        hint = f"; did you mean {close[0]}?" if close else "; `python -m pipeline train --help-all` lists every field"
        raise ConfigError(f"{origin}: {name} is not a config field{hint}")
    for param in space.params:
        current = flat[param.name]
        if isinstance(param, FloatParam) and isinstance(current, int) and not isinstance(current, bool):
            raise ConfigError(f"{origin}: {param.name} is an integer field ({current} in {base.name}): use type: int")
    # Fields depend on each other (kind power needs alpha): every check sets the fixed values and every
    # parameter, at its low end unless it is the one being checked.
    lows = {p.name: _endpoints(p)[0] for p in space.params}
    problem = _check_value(base_raw, {**space.fixed, **lows}, origin)
    if problem:
        raise ConfigError(f"{origin}: its fixed values with every parameter at its low end do not make a valid "
                          f"{base.name} config ({problem}); fix that range or fixed value")
    for param in space.params:
        ends = _endpoints(param)
        for value in ends[1:]:
            problem = _check_value(base_raw, {**space.fixed, **lows, param.name: value}, origin)
            if problem:
                which = "choice" if isinstance(param, CategoricalParam) else "high"
                raise ConfigError(f"{origin}: {param.name}: {which} {value!r} does not make a valid {base.name} config "
                                  f"({problem}); narrow the range (or fix the config the space is used with)")


# ------------------------------------------------------------------------------------------------ trials


def distributions(space: SearchSpace) -> dict[str, Any]:
    """The Optuna distributions of the space's parameters, by dotted field name."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    out: dict[str, Any] = {}
    for p in space.params:
        if isinstance(p, FloatParam):
            out[p.name] = FloatDistribution(p.low, p.high, log=p.log, step=p.step)
        elif isinstance(p, IntParam):
            out[p.name] = IntDistribution(p.low, p.high, log=p.log, step=p.step)
        else:
            out[p.name] = CategoricalDistribution(p.choices)
    return out


def config_values(space: SearchSpace, params: Mapping[str, Any]) -> dict[str, Any]:
    """The dotted config values of a trial: the fixed values, then its sampled ``params`` (clamped where the
    space says so). Raises ``KeyError`` naming a parameter the trial lacks."""
    values = dict(space.fixed)
    for p in space.params:
        if p.name not in params:
            raise KeyError(f"trial has no value for {p.name}")
        value = params[p.name]
        if isinstance(p, IntParam):
            value = int(value)
            if p.clamp_low is not None and value < p.clamp_low:
                value = p.clamp_low
        values[p.name] = value
    return values


def param_unit(param: Param, value: Any) -> float | None:
    """Where ``value`` lies in ``param``'s range, from 0 (low) to 1 (high), on the scale it is sampled on (log
    for log parameters); a categorical value's index over (choices - 1); None for a value outside the choices."""
    if isinstance(param, CategoricalParam):
        if value not in param.choices:
            return None
        return param.choices.index(value) / max(1, len(param.choices) - 1)
    low, high, x = float(param.low), float(param.high), float(value)
    if param.log:
        low, high, x = math.log(low), math.log(high), math.log(max(x, float(param.low)))
    return (x - low) / (high - low)


def direction_of(metric: str) -> Direction:
    """Whether a final metric is minimised (``*_nll``, ``*_bpc``, ``*_ppl``) or maximised (``*_mutual_information``,
    ``*_active_units``); :class:`ConfigError` for a metric the pipeline does not report."""
    split, _, name = metric.partition("_")
    if split in ("valid", "test") and name:
        if split == "test":
            raise ConfigError(f"objective {metric}: a study must not select on the test split; use valid_{name}")
        if any(name == m or name.startswith(m + "_") for m in _MINIMISED):
            return "minimize"
        if any(name == m for m in _MAXIMISED):
            return "maximize"
    raise ConfigError(f"objective {metric!r} is not a final metric the pipeline reports; use valid_nll, valid_bpc, "
                      "valid_ppl or (sentence VAEs) valid_mutual_information")


def default_objectives(task: str) -> tuple[str, ...]:
    """A language model minimises its final validation NLL; a sentence VAE trades NLL against mutual
    information (thesis §5.7: never one number), so its study has both objectives."""
    return ("valid_nll",) if task == "lm" else ("valid_nll", "valid_mutual_information")


def objective_values(objectives: Sequence[str], metrics: Mapping[str, float]) -> list[float] | None:
    """The trial's objective values from its final metrics; None when one is missing or not finite."""
    values = [metrics.get(m) for m in objectives]
    if any(v is None or not math.isfinite(v) for v in values):
        return None
    return [float(v) for v in values]  # type: ignore[arg-type]
