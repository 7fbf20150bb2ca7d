"""Tests for pipeline.averaging: 2TA decision logic against the thesis (ch. 3), tensor bookkeeping
against averages recomputed from kept iterates, checkpoint round trips, TA / EMA / NT-ASGD baselines."""

from __future__ import annotations

import io
import math
import random

import pytest
import torch

from pipeline.averaging import (
    Averager,
    AveragingReport,
    ExponentialAveraging,
    NoAveraging,
    NonMonotonicAveraging,
    TailAveraging,
    TwoTailedAveraging,
    TwoTailedLogic,
    averaged_weights,
)

INF = math.inf
NAN = math.nan


# ------------------------------------------------------------------------------------------ helpers


def drive(logic: TwoTailedLogic, script: list[dict[str, float]], period: int):
    """Feed ``period`` iterates then one evaluation per script entry; the entry maps role -> loss.

    Returns the reports, the roles asked for at each evaluation and (S, L) after each evaluation.
    """
    reports, asked, lengths = [], [], []
    for losses in script:
        for _ in range(period):
            logic.add_weights()
        roles: list[str] = []

        def loss_of(role, losses=losses, roles=roles):
            roles.append(role)
            return losses[role]

        reports.append(logic.evaluate_and_adapt(loss_of))
        asked.append(roles)
        lengths.append((logic.short_length, logic.long_length))
    return reports, asked, lengths


def quadratic_f(delta_of):
    """f(n, delta) = (delta - Delta(n))^2 + 1/n: unimodal (convex) in delta with its minimum at Delta(n),
    so Assumptions 1 and 2 of §3.5 hold; f = +inf for an empty average (delta = 0)."""

    def f(n: int, delta: int) -> float:
        if delta == 0:
            return INF
        return float((delta - delta_of(n)) ** 2) + 1.0 / n

    return f


def run_algorithm_1(delta_of, period: int, steps: int):
    """Algorithm 1 driven by quadratic_f(delta_of); yields (n, S', L', S, L, report) per evaluation."""
    f = quadratic_f(delta_of)
    logic = TwoTailedLogic(period, reset_patience=None, raw_fallback=False)
    out = []
    for n in range(1, steps + 1):
        logic.add_weights()
        if n % period:
            continue
        s_pre, l_pre = logic.short_length, logic.long_length
        lengths = {"short": s_pre, "long": l_pre}
        report = logic.evaluate_and_adapt(lambda role: f(n, lengths[role]))
        out.append((n, s_pre, l_pre, logic.short_length, logic.long_length, report))
    return f, out


# ------------------------------------------------------------------------- Algorithm 1 (pure logic)


def test_algorithm_1_hand_trace():
    # E = 10, Delta(n) = 0.4 n, f = (delta - Delta)^2 (+1/n). Worked out by hand:
    #  n   Delta  S'  L'   f(S')  f(L')  -> S   L   event
    #  10    4    10  10     36     36      0  10   switch (first evaluation always switches)
    #  20    8    10  20      4    144      0  10   switch
    #  30   12    10  20      4     64      0  10   switch
    #  40   16    10  20     36     16     10  20   none
    #  50   20    20  30      0    100      0  20   switch
    #  60   24    10  30    196     36     10  30   none
    #  70   28    20  40     64    144      0  20   switch
    #  80   32    10  30    484      4     10  30   none
    #  90   36    20  40    256     16     20  40   none
    # 100   40    30  50    100    100      0  30   switch (tie: F^S <= F^L)
    expected = [
        (10, 10, 0, 10, "switch"), (20, 20, 0, 10, "switch"), (30, 20, 0, 10, "switch"),
        (40, 20, 10, 20, "none"), (50, 30, 0, 20, "switch"), (60, 30, 10, 30, "none"),
        (70, 40, 0, 20, "switch"), (80, 30, 10, 30, "none"), (90, 40, 20, 40, "none"),
        (100, 50, 0, 30, "switch"),
    ]
    f, out = run_algorithm_1(lambda n: 0.4 * n, 10, 100)
    got = [(n, l_pre, s, l, r.event) for n, s_pre, l_pre, s, l, r in out]
    assert got == expected
    for n, s_pre, l_pre, s, l, r in out:
        assert (r.short_length, r.long_length) == (s, l)
        assert r.source == "long" and r.length == l and r.raw_loss is None
        # Reported loss is F^L after adaptation: F^S at a switch (the short average became the long one).
        assert r.loss == f(n, l)
        assert r.long_loss == f(n, l_pre) and r.short_loss == f(n, s_pre)


def test_first_evaluation_evaluates_once_and_empty_averages_are_skipped():
    logic = TwoTailedLogic(2, raw_fallback=False)
    _, asked, lengths = drive(logic, [{"short": 1.0}, {"short": 0.5, "long": 0.7}], 2)
    assert asked == [["short"], ["short", "long"]]  # S == L: one evaluation; no raw without fallback
    assert lengths == [(0, 2), (0, 2)]
    # Evaluating with nothing accumulated: no average is evaluated, the raw weights are reported.
    logic = TwoTailedLogic(2, raw_fallback=False)
    roles = []
    r = logic.evaluate_and_adapt(lambda role: roles.append(role) or 3.0)
    assert roles == ["raw"] and (r.source, r.length, r.loss, r.event) == ("raw", 1, 3.0, "none")
    assert (r.short_loss, r.long_loss) == (None, None)
    # A switch needs a non-empty short average: right after a switch (S = 0) nothing changes.
    logic = TwoTailedLogic(2, raw_fallback=False)
    drive(logic, [{"short": 1.0}], 2)
    roles.clear()
    r = logic.evaluate_and_adapt(lambda role: roles.append(role) or float("nan"))
    assert roles == ["long"] and (logic.short_length, logic.long_length, r.event) == (0, 2, "none")


DELTAS = {
    "linear_0.4": lambda n: math.floor(0.4 * n) + 1,
    "linear_0.9": lambda n: math.floor(0.9 * n) + 1,
    "linear_0.15": lambda n: math.floor(0.15 * n) + 1,
    "sqrt": lambda n: min(n, math.floor(4 * math.sqrt(n)) + 1),
}


def _random_delta(period: int, seed: int):
    """A random monotone integer Delta(n) with increments in [0, E] per evaluation period."""
    rng = random.Random(seed)
    values = {}

    def delta(n: int) -> int:
        k = n // period
        while len(values) <= k:
            values[len(values)] = (values[len(values) - 1] if values else 1) + rng.randint(0, period)
        return values[k]

    return delta


@pytest.mark.parametrize("period", [1, 3, 10])
@pytest.mark.parametrize("delta_name", [*DELTAS, "random_a", "random_b"])
def test_algorithm_1_satisfies_propositions(delta_name, period):
    seeds = {"random_a": 11, "random_b": 12}
    delta_of = _random_delta(period, seeds[delta_name]) if delta_name in seeds else DELTAS[delta_name]
    steps = 400 * period
    f, out = run_algorithm_1(delta_of, period, steps)
    switches = []
    for n, s_pre, l_pre, s, l, r in out:
        d = delta_of(n)
        # Proposition 1: (i) E | S, E | L; (ii) S <= L <= n; (iii) f^S > f^L (f = +inf for length 0).
        assert s % period == 0 and l % period == 0, (n, s, l)
        assert s <= l <= n, (n, s, l)
        assert f(n, s) > f(n, l), (n, s, l)
        # Proposition 2: S < Delta(n) and L < 2 Delta(n) + E.
        assert s < d, (n, s, d)
        assert l < 2 * d + period, (n, l, d)
        # Switch exactly when the short average is at least as good (Algorithm 1, line 12).
        assert (r.event == "switch") == (f(n, s_pre) <= f(n, l_pre)), n
        assert r.event in ("switch", "none")
        if r.event == "switch":
            switches.append(n)
    # Proposition 3: switch points keep coming (Delta grows slower than 1 per step); with Delta close to
    # 0.9 n they come geometrically spaced (every ~6x the previous step), hence the loose bound.
    assert len(switches) >= 4 and switches[-1] >= steps // 8
    # Proposition 4: between consecutive switch points n1 < n2 there is n in [n1, n2 - E] where
    # L(n) = floor(Delta(n)/E) E or L(n) = ceil(Delta(n)/E) E.
    by_n = {n: l for n, _, _, _, l, _ in out}
    for n1, n2 in zip(switches, switches[1:]):
        hits = [
            n for n in range(n1, n2, period)
            if by_n[n] in ((delta_of(n) // period) * period, -(-delta_of(n) // period) * period)
        ]
        assert hits, (n1, n2, [(n, by_n[n], delta_of(n)) for n in range(n1, n2, period)])


# --------------------------------------------------------------------------- Algorithm 2 extensions


RESET_SCRIPT = [
    {"short": 5.0},                    # S=L=2: switch
    {"short": 6.0, "long": 4.0},       # long best 4
    {"short": 5.5, "long": 4.5},       # long: 1 evaluation without improvement
    {"short": 5.0, "long": 4.2},       # long: 2 -> stagnating -> stagnation switch
    {"short": 7.0, "long": 4.9},       # new short best 7; long (moved bookkeeping, best 5.0) improves
    {"short": 7.5, "long": 4.8},       # short: 1 without improvement
    {"short": 7.2, "long": 4.7},       # short: 2 -> short reset
    {"short": 8.0, "long": 4.6},       # fresh short: 8 is its first (best) loss, not stagnating
    {"short": 8.5, "long": 4.5},       # short: 1 without improvement (stale bookkeeping would say 3)
]


def test_reset_extension_scripted():
    logic = TwoTailedLogic(2, reset_patience=2, raw_fallback=False)
    reports, _, lengths = drive(logic, RESET_SCRIPT, 2)
    assert [r.event for r in reports] == [
        "switch", "none", "none", "stagnation_switch", "none", "none", "short_reset", "none", "none"
    ]
    assert lengths == [(0, 2), (2, 4), (4, 6), (0, 6), (2, 8), (4, 10), (0, 12), (2, 14), (4, 16)]
    # At the stagnation switch the reported loss is F^S (the short average is the long one now).
    assert reports[3].loss == 5.0 and reports[3].long_loss == 4.2 and reports[3].length == 6
    assert [r.loss for r in reports[4:]] == [4.9, 4.8, 4.7, 4.6, 4.5]


def test_reset_disabled_never_resets():
    logic = TwoTailedLogic(2, reset_patience=None, raw_fallback=False)
    reports, _, lengths = drive(logic, RESET_SCRIPT, 2)
    assert [r.event for r in reports] == ["switch"] + ["none"] * 8
    assert lengths == [(0, 2)] + [(2 * k, 2 * k + 2) for k in range(1, 9)]


def test_stagnation_bookkeeping_moves_with_the_switch():
    logic = TwoTailedLogic(1, reset_patience=2, raw_fallback=False)
    script = [
        {"short": 10.0},
        {"short": 9.0, "long": 8.0},
        {"short": 9.5, "long": 7.0},   # short: 1 evaluation without improving its best (9)
        {"short": 9.2, "long": 9.3},   # short: 2 (stagnating) but better -> switch has priority
        {"short": 12.0, "long": 9.1},  # the long one inherited best 9 / 2 evaluations -> now 3: stagnating
    ]
    reports, _, lengths = drive(logic, script, 1)
    assert [r.event for r in reports] == ["switch", "none", "none", "switch", "stagnation_switch"]
    assert lengths == [(0, 1), (1, 2), (2, 3), (0, 3), (0, 1)]
    assert reports[-1].loss == 12.0


def test_raw_fallback_scripted():
    script = [
        {"raw": 5.0, "short": 6.0, "long": 6.0},     # S=L=E: switch, L = E and raw better -> reinit
        {"raw": 4.0, "short": 3.0, "long": 2.9},     # S=L=E again: switch, long better
        {"raw": 2.5, "short": 3.5, "long": 3.0},     # raw better than long (L=4 > E): report raw
        {"raw": 3.0, "short": 2.9, "long": 2.8},     # long better
        {"raw": 2.0, "short": 2.5, "long": 2.6},     # switch, then raw better (L=6 != E): raw, no reinit
        {"raw": 2.4, "short": 2.6, "long": 2.4},     # tie F^1 == F^L: raw (F^1 <= F^L)
        {"raw": NAN, "short": 2.5, "long": 2.3},     # NaN raw is never better
    ]
    logic = TwoTailedLogic(2, raw_fallback=True)
    reports, asked, lengths = drive(logic, script, 2)
    assert [(r.source, r.loss, r.length, r.event) for r in reports] == [
        ("raw", 5.0, 1, "reinit"),
        ("long", 3.0, 2, "switch"),
        ("raw", 2.5, 1, "none"),
        ("long", 2.8, 6, "none"),
        ("raw", 2.0, 1, "switch"),
        ("raw", 2.4, 1, "none"),
        ("long", 2.3, 10, "none"),
    ]
    assert lengths == [(0, 0), (0, 2), (2, 4), (4, 6), (0, 6), (2, 8), (4, 10)]
    assert all("raw" in roles for roles in asked)
    assert reports[2].raw_loss == 2.5 and reports[2].long_loss == 3.0 and reports[2].long_length == 4

    # Without the fallback the raw weights are neither evaluated nor reported.
    logic = TwoTailedLogic(2, raw_fallback=False)
    reports, asked, lengths = drive(logic, script, 2)
    assert all("raw" not in roles for roles in asked)
    assert all(r.source == "long" and r.raw_loss is None for r in reports)
    assert [r.event for r in reports][:2] == ["switch", "none"]
    assert lengths[:2] == [(0, 2), (2, 4)]


def test_raw_fallback_needs_long_longer_than_one():
    # E = 1: L = 1 is the last iterate itself, so the "L > 1" guard keeps reporting it as the long average.
    logic = TwoTailedLogic(1, raw_fallback=True)
    reports, _, lengths = drive(logic, [{"raw": 1.0, "short": 2.0}], 1)
    assert (reports[0].source, reports[0].length, reports[0].event) == ("long", 1, "switch")
    assert lengths == [(0, 1)]


def test_nan_losses_are_never_better():
    logic = TwoTailedLogic(1, reset_patience=3, raw_fallback=False)
    script = [
        {"short": 5.0},
        {"short": NAN, "long": 4.0},   # NaN short: no switch
        {"short": 3.0, "long": NAN},   # NaN long: the short one is better
        {"short": NAN, "long": NAN},   # NaN vs NaN counts as inf <= inf
    ]
    reports, _, lengths = drive(logic, script, 1)
    assert [r.event for r in reports] == ["switch", "none", "switch", "switch"]
    assert lengths == [(0, 1), (1, 2), (0, 2), (0, 1)]
    assert reports[2].loss == 3.0
    # NaN never improves the best loss: a fresh short average with two NaNs in a row stagnates.
    logic = TwoTailedLogic(1, reset_patience=2, raw_fallback=False)
    reports, _, _ = drive(logic, [{"short": 1.0}, {"short": NAN, "long": 0.5}, {"short": NAN, "long": 0.4}], 1)
    assert [r.event for r in reports] == ["switch", "none", "short_reset"]


def test_logic_validates_arguments_and_round_trips():
    with pytest.raises(ValueError):
        TwoTailedLogic(0)
    with pytest.raises(ValueError):
        TwoTailedLogic(2, reset_patience=0)
    logic = TwoTailedLogic(2, reset_patience=2, raw_fallback=False)
    drive(logic, RESET_SCRIPT[:5], 2)
    state = logic.state_dict()
    other = TwoTailedLogic(2, reset_patience=2, raw_fallback=False)
    other.load_state_dict(state)
    assert other.state_dict() == state
    with pytest.raises(ValueError, match="eval_every"):
        TwoTailedLogic(3).load_state_dict(state)


# ------------------------------------------------------------------------------------ tensor path


def _set_params(model: torch.nn.Module, flat: torch.Tensor) -> None:
    with torch.no_grad():
        torch.nn.utils.vector_to_parameters(flat.to(next(model.parameters()).dtype), model.parameters())


def _flat(model: torch.nn.Module) -> torch.Tensor:
    return torch.nn.utils.parameters_to_vector(model.parameters()).detach().to(torch.float64).clone()


def _mean_last(history: list[torch.Tensor], k: int) -> torch.Tensor:
    return torch.stack(history[-k:]).mean(0)


@pytest.mark.parametrize("dtype,atol", [(torch.float64, 1e-12), (torch.float32, 1e-6)])
def test_two_tailed_tensors_match_exact_means(dtype, atol):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3, dtype=dtype)
    period = 3
    avg = TwoTailedAveraging(model.parameters(), period, reset_patience=2, raw_fallback=True)
    assert isinstance(avg, Averager)
    gen = torch.Generator().manual_seed(1)
    rng = random.Random(2)
    numel = sum(p.numel() for p in model.parameters())
    history: list[torch.Tensor] = []
    events = set()

    def expected(role: str) -> torch.Tensor | None:
        length = {"short": avg.short_length, "long": avg.long_length}[role]
        return _mean_last(history, length) if length else None

    def check_averages():
        for role, cm in (("short", avg.short_weights), ("long", avg.long_weights)):
            want = expected(role)
            if want is None:
                with pytest.raises(RuntimeError, match="empty"):
                    cm().__enter__()
            else:
                with cm():
                    torch.testing.assert_close(_flat(model), want, atol=atol, rtol=0)
            assert torch.equal(_flat(model), history[-1])  # restored exactly

    for step in range(1, 46 * period + 1):
        history.append(torch.rand(numel, generator=gen, dtype=torch.float64) * 2 - 1)
        _set_params(model, history[-1])
        history[-1] = _flat(model)  # what the model actually holds (rounded for float32)
        avg.update()
        check_averages()
        if step % period:
            continue
        s_pre, l_pre = avg.short_length, avg.long_length
        candidates = {"raw": history[-1], "short": expected("short"), "long": expected("long")}
        losses = {role: rng.random() for role in candidates}
        seen = []

        def evaluate():
            current = _flat(model)
            match = [r for r, w in candidates.items() if w is not None and torch.allclose(current, w, atol=1e-5, rtol=0)]
            assert match, "evaluate() called with weights that are neither raw nor an average"
            if len(match) > 1:
                assert match == ["short", "long"] and s_pre == l_pre
            seen.append(match[0])
            assert all(p.requires_grad and p.is_leaf for p in model.parameters())
            return torch.tensor(losses[match[0]])  # a 0-d tensor is accepted

        report = avg.evaluate_and_adapt(evaluate)
        events.add(report.event)
        assert torch.equal(_flat(model), history[-1])
        assert seen.count("raw") == 1
        assert seen.count("short") == (1 if s_pre else 0)
        assert seen.count("long") == (1 if l_pre and l_pre != s_pre else 0)
        assert avg.short_length % period == 0 and avg.long_length % period == 0
        assert avg.short_length <= avg.long_length
        check_averages()
        # The reported weights are those whose evaluation gave the reported loss.
        with avg.reported_weights():
            current = _flat(model)
        assert torch.equal(_flat(model), history[-1])
        match = [r for r, w in candidates.items() if w is not None and torch.allclose(current, w, atol=1e-5, rtol=0)]
        assert report.loss == pytest.approx(losses[match[0]])
        assert (report.source == "raw") == (match == ["raw"])
        assert report.length == (1 if report.source == "raw" else avg.long_length)
    assert events == {"none", "switch", "stagnation_switch", "short_reset", "reinit"}


def test_context_managers_restore_on_exception_and_failed_evaluation():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    avg = TwoTailedAveraging(model.parameters(), 2, reset_patience=2)
    for _ in range(2):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        avg.update()
    raw = _flat(model)
    with pytest.raises(KeyError):
        with avg.long_weights():
            assert not torch.equal(_flat(model), raw)
            raise KeyError("boom")
    assert torch.equal(_flat(model), raw)

    before = avg.logic.state_dict()
    slots_before = [t.clone() for slot in avg.state_dict()["slots"] for t in slot]

    def evaluate():
        raise ZeroDivisionError

    with pytest.raises(ZeroDivisionError):
        avg.evaluate_and_adapt(evaluate)
    assert torch.equal(_flat(model), raw)
    assert avg.logic.state_dict() == before
    assert all(torch.equal(a, b) for a, b in zip(slots_before, [t for s in avg.state_dict()["slots"] for t in s]))


def test_averaged_weights_swaps_in_place_without_autograd():
    params = [torch.nn.Parameter(torch.randn(3, 2)), torch.nn.Parameter(torch.randn(4))]
    raw = [p.detach().clone() for p in params]
    averages = [torch.randn(3, 2), torch.randn(4)]
    saved_averages = [a.clone() for a in averages]
    pointers = [p.data_ptr() for p in params]
    with torch.enable_grad():
        with averaged_weights(params, averages):
            assert all(torch.equal(p, a) for p, a in zip(params, averages))
            assert all(p.grad_fn is None and p.is_leaf and p.requires_grad for p in params)
            assert [p.data_ptr() for p in params] == pointers  # same storage: optimizer refs stay valid
        with pytest.raises(RuntimeError, match="inside"):
            with averaged_weights(params, averages):
                raise RuntimeError("inside")
    assert all(torch.equal(p, r) and p.grad_fn is None for p, r in zip(params, raw))
    assert all(torch.equal(a, s) for a, s in zip(averages, saved_averages))
    with pytest.raises(ValueError):
        with averaged_weights(params, averages[:1]):
            pass
    with pytest.raises(ValueError):
        with averaged_weights(params, [torch.zeros(2, 3), torch.zeros(4)]):
            pass


def test_restarted_average_forgets_non_finite_contents():
    # A diverged iterate poisons both averages; once an average restarts, its old contents must not leak.
    model = torch.nn.Linear(2, 2)
    avg = TwoTailedAveraging(model.parameters(), 1, raw_fallback=False)
    _set_params(model, torch.full((6,), float("nan")))
    avg.update()
    report = avg.evaluate_and_adapt(lambda: float("nan"))
    assert report.event == "switch" and (avg.short_length, avg.long_length) == (0, 1)
    _set_params(model, torch.arange(6.0))
    avg.update()
    with avg.short_weights():  # restarted slot: exactly the one iterate since the restart
        assert torch.equal(_flat(model), torch.arange(6.0, dtype=torch.float64))
    with avg.long_weights():
        assert torch.isnan(_flat(model)).all()


def test_low_precision_params_are_averaged_in_float32():
    model = torch.nn.Linear(3, 2).to(torch.bfloat16)
    avg = TwoTailedAveraging(model.parameters(), 1)
    assert all(t.dtype == torch.float32 for slot in avg.state_dict()["slots"] for t in slot)
    values = []
    for k in range(3):
        with torch.no_grad():
            model.weight.fill_(float(k))
        values.append(float(k))
        avg.update()
    with avg.long_weights():
        assert torch.all(model.weight == 1.0) and model.weight.dtype == torch.bfloat16
    assert torch.all(model.weight == 2.0)


def _check_plain(obj, path="state"):
    """state_dict must hold only what torch.load(weights_only=True) accepts."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            assert isinstance(k, str), path
            _check_plain(v, f"{path}.{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            _check_plain(v, f"{path}[{i}]")
    else:
        assert obj is None or isinstance(obj, (torch.Tensor, bool, int, float, str)), (path, type(obj))


def _roundtrip(state):
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def _nonlinear_loss(model: torch.nn.Module, direction: torch.Tensor) -> float:
    w = torch.nn.utils.parameters_to_vector(model.parameters()).detach()
    return float(torch.sin(5 * w @ direction) + (w ** 2).sum() * 0.1)


@pytest.mark.parametrize(
    "make",
    [
        lambda ps: TwoTailedAveraging(ps, 3, reset_patience=1, raw_fallback=True),
        lambda ps: TwoTailedAveraging(ps, 2, reset_patience=None, raw_fallback=False),
        lambda ps: TailAveraging(ps, start_step=7),
        lambda ps: ExponentialAveraging(ps, decay=0.8),
        lambda ps: NoAveraging(ps),
        lambda ps: NonMonotonicAveraging(ps, nonmono=2),  # saved after the trigger (at step 12)
        lambda ps: NonMonotonicAveraging(ps, nonmono=8),  # saved before the trigger (at step 30)
    ],
    ids=["2ta_alg2", "2ta_alg1", "tail", "ema", "none", "nt_asgd_triggered", "nt_asgd_waiting"],
)
def test_state_dict_round_trip_continues_bit_identically(make):
    torch.manual_seed(0)
    model_a = torch.nn.Linear(5, 4)
    avg_a = make(model_a.parameters())
    direction = torch.randn(sum(p.numel() for p in model_a.parameters()))
    gen = torch.Generator().manual_seed(3)
    iterates = [torch.randn(direction.numel(), generator=gen) for _ in range(60)]

    def step(model, averager, t, reports):
        _set_params(model, iterates[t])
        averager.update()
        if (t + 1) % 3 == 0:
            reports.append(averager.evaluate_and_adapt(lambda: _nonlinear_loss(model, direction)))

    reports_a: list[AveragingReport] = []
    for t in range(25):  # stop between evaluations (step 25 is not a multiple of 3)
        step(model_a, avg_a, t, reports_a)
    state = avg_a.state_dict()
    _check_plain(state)
    loaded = _roundtrip(state)

    torch.manual_seed(123)
    model_b = torch.nn.Linear(5, 4)
    model_b.load_state_dict(model_a.state_dict())  # the trainer restores the raw weights separately
    avg_b = make(model_b.parameters())
    avg_b.load_state_dict(loaded)
    reports_b: list[AveragingReport] = []
    cont_a: list[AveragingReport] = []
    for t in range(25, 60):
        step(model_a, avg_a, t, cont_a)
        step(model_b, avg_b, t, reports_b)
    assert cont_a == reports_b and len(cont_a) > 5
    state_a, state_b = avg_a.state_dict(), avg_b.state_dict()
    flat_a = torch.utils._pytree.tree_leaves(state_a)
    flat_b = torch.utils._pytree.tree_leaves(state_b)
    assert len(flat_a) == len(flat_b)
    for x, y in zip(flat_a, flat_b):
        assert torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y
    with avg_a.reported_weights(), avg_b.reported_weights():
        assert torch.equal(_flat(model_a), _flat(model_b))


def test_load_state_dict_rejects_foreign_state():
    model = torch.nn.Linear(2, 2)
    ema = ExponentialAveraging(model.parameters(), 0.9)
    two = TwoTailedAveraging(model.parameters(), 2)
    with pytest.raises(ValueError, match="kind"):
        two.load_state_dict(ema.state_dict())
    with pytest.raises(ValueError, match="eval_every"):
        TwoTailedAveraging(model.parameters(), 3).load_state_dict(two.state_dict())
    small = TwoTailedAveraging(torch.nn.Linear(2, 1).parameters(), 2)
    with pytest.raises(ValueError, match="shape"):
        small.load_state_dict(two.state_dict())


# ----------------------------------------------------------------------------------- TA and EMA


@pytest.mark.parametrize("start_step", [0, 1, 5])
def test_tail_averaging_is_mean_from_start_step(start_step):
    model = torch.nn.Linear(3, 2, dtype=torch.float64)
    history = [_flat(model)]  # theta_0: the weights at construction
    avg = TailAveraging(model.parameters(), start_step=start_step)
    gen = torch.Generator().manual_seed(0)
    for t in range(1, 13):
        history.append(torch.randn(history[0].numel(), generator=gen, dtype=torch.float64))
        _set_params(model, history[-1])
        avg.update()
        report = avg.evaluate_and_adapt(lambda: float(_flat(model).sum()))
        if t < start_step:
            want, source, length = history[-1], "raw", 1
        else:
            want = torch.stack(history[start_step:]).mean(0)
            source, length = "tail", t - start_step + 1
        with avg.reported_weights():
            torch.testing.assert_close(_flat(model), want, atol=1e-12, rtol=0)
        assert torch.equal(_flat(model), history[-1])
        assert (report.source, report.length) == (source, length)
        assert report.loss == pytest.approx(float(want.sum()), abs=1e-10)


def test_exponential_averaging_matches_recursion():
    beta = 0.7
    model = torch.nn.Linear(3, 2, dtype=torch.float64)
    ema = _flat(model)  # avg_0 = theta_0
    avg = ExponentialAveraging(model.parameters(), decay=beta)
    gen = torch.Generator().manual_seed(0)
    for t in range(1, 21):
        theta = torch.randn(ema.numel(), generator=gen, dtype=torch.float64)
        _set_params(model, theta)
        avg.update()
        ema = (1 - beta) * theta + beta * ema
        with avg.reported_weights():
            torch.testing.assert_close(_flat(model), ema, atol=1e-12, rtol=0)
        assert torch.equal(_flat(model), theta)
    report = avg.evaluate_and_adapt(lambda: float(_flat(model) @ ema))
    assert (report.source, report.length) == ("ema", 21)
    assert report.loss == pytest.approx(float(ema @ ema))
    with pytest.raises(ValueError):
        ExponentialAveraging(model.parameters(), decay=1.0)


def _awd_switch_evaluation(losses: list[float], nonmono: int) -> int | None:
    """AWD-LSTM's main.py: the index of the evaluation at which it switches from SGD to ASGD (or None)."""
    best_val_loss: list[float] = []
    for index, val_loss in enumerate(losses):
        if len(best_val_loss) > nonmono and val_loss > min(best_val_loss[:-nonmono]):
            return index
        best_val_loss.append(val_loss)
    return None


@pytest.mark.parametrize("nonmono", [1, 2, 5])
@pytest.mark.parametrize("seed", range(4))
def test_nt_asgd_triggers_like_awd_and_then_averages_every_later_iterate(nonmono, seed):
    rng = random.Random(seed)
    # A noisy, flattening validation curve: sooner or later a loss is worse than an old best.
    losses = [3.0 / (1 + 0.3 * k) + rng.uniform(0, 0.4) for k in range(30)]
    expected = _awd_switch_evaluation(losses, nonmono)
    assert expected is not None
    every = 3
    model = torch.nn.Linear(3, 2, dtype=torch.float64)
    avg = NonMonotonicAveraging(model.parameters(), nonmono=nonmono)
    gen = torch.Generator().manual_seed(seed)
    history: list[torch.Tensor] = []
    trigger_iterate = None
    for evaluation, loss in enumerate(losses):
        for _ in range(every):
            history.append(torch.randn(_flat(model).numel(), generator=gen, dtype=torch.float64))
            _set_params(model, history[-1])
            avg.update()
        seen = []

        def evaluate() -> float:
            seen.append(_flat(model))
            return loss

        report = avg.evaluate_and_adapt(evaluate)
        assert len(seen) == 1  # one evaluation: raw before the trigger, the average after it
        if evaluation < expected:
            assert (report.source, report.event, report.length, report.raw_loss) == ("raw", "none", 1, loss)
            assert torch.equal(seen[0], history[-1]) and not avg.triggered
        elif evaluation == expected:  # the trigger: theta_T (the weights just evaluated) starts the average
            assert (report.source, report.event, report.loss, report.long_length) == ("raw", "trigger", loss, 1)
            assert avg.trigger_step == len(history)
            trigger_iterate = len(history) - 1
        else:
            want = torch.stack(history[trigger_iterate:]).mean(0)
            torch.testing.assert_close(seen[0], want, atol=1e-12, rtol=0)
            assert (report.source, report.length, report.long_loss, report.event) == (
                "nt_asgd", len(history) - trigger_iterate, loss, "none")
        with avg.reported_weights():
            reported = _flat(model)
        if evaluation >= expected:
            torch.testing.assert_close(reported, torch.stack(history[trigger_iterate:]).mean(0), atol=1e-12, rtol=0)
        else:
            assert torch.equal(reported, history[-1])
        assert torch.equal(_flat(model), history[-1])  # the raw weights are always restored
    assert avg.logs == losses[: expected + 1]  # logged until (and including) the triggering evaluation


def test_nt_asgd_nan_is_worse_than_anything_and_the_state_survives_dcp(tmp_path):
    import torch.distributed.checkpoint as dcp

    from pipeline.checkpoint.dcp import SafeLoadPlanner

    model = torch.nn.Linear(2, 2)
    avg = NonMonotonicAveraging(model.parameters(), nonmono=2)
    for loss in (2.0, 1.0, 0.5):
        avg.update()
        assert avg.evaluate_and_adapt(lambda: loss).event == "none"  # t <= n, then improving
    avg.update()
    assert avg.evaluate_and_adapt(lambda: NAN).event == "trigger"  # NaN > min(logs[:-2]) = 2.0
    for _ in range(3):
        avg.update()
    # Through torch.distributed.checkpoint into a fresh averager's template (as the trainer restores): the
    # logs list and the trigger are not in the template's shape, they are loaded as saved.
    dcp.save({"averager": avg.state_dict()}, checkpoint_id=str(tmp_path / "ckpt"))
    fresh = NonMonotonicAveraging(model.parameters(), nonmono=2)
    template = {"averager": fresh.state_dict()}
    dcp.load(template, checkpoint_id=str(tmp_path / "ckpt"), planner=SafeLoadPlanner())
    fresh.load_state_dict(template["averager"])
    assert (fresh.step, fresh.trigger_step, fresh.count) == (7, 4, 4)
    assert fresh.logs[:3] == [2.0, 1.0, 0.5] and math.isnan(fresh.logs[3])
    with avg.reported_weights():
        saved = _flat(model)
    with fresh.reported_weights():
        assert torch.equal(_flat(model), saved)
    assert all(torch.equal(a, b) for a, b in zip(avg.state_dict()["average"], fresh.state_dict()["average"]))
    with pytest.raises(ValueError, match="nonmono"):
        NonMonotonicAveraging(model.parameters(), nonmono=0)
    bad = avg.state_dict() | {"count": 2}
    with pytest.raises(ValueError, match="inconsistent"):
        fresh.load_state_dict(bad)


def test_no_averaging_reports_raw():
    model = torch.nn.Linear(2, 2)
    avg = NoAveraging(model.parameters())
    avg.update()
    report = avg.evaluate_and_adapt(lambda: 1.5)
    assert (report.loss, report.source, report.length) == (1.5, "raw", 1)
    before = _flat(model)
    with avg.reported_weights():
        assert torch.equal(_flat(model), before)


# ------------------------------------------------------------------------------------ end to end


def test_two_tailed_beats_raw_iterate_on_noisy_least_squares():
    gen = torch.Generator().manual_seed(0)
    n, d = 200, 8
    x = torch.randn(n, d, generator=gen)
    w_true = torch.randn(d, generator=gen)
    y = x @ w_true + 0.5 * torch.randn(n, generator=gen)
    model = torch.nn.Linear(d, 1, bias=False)
    with torch.no_grad():
        model.weight.zero_()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.03)
    avg = TwoTailedAveraging(model.parameters(), 50, reset_patience=3, raw_fallback=True)

    def true_loss() -> float:  # f: the full-data least-squares loss
        with torch.no_grad():
            return float(((model(x).squeeze(1) - y) ** 2).mean())

    w_opt = torch.linalg.lstsq(x, y.unsqueeze(1)).solution.squeeze(1)
    f_opt = float(((x @ w_opt - y) ** 2).mean())
    reports = []
    for t in range(1, 3001):
        i = torch.randint(n, (1,), generator=gen)
        loss = ((model(x[i]).squeeze(1) - y[i]) ** 2).mean()  # one-sample stochastic gradient
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        avg.update()
        if t % 50 == 0:
            reports.append(avg.evaluate_and_adapt(true_loss))
    final = reports[-1]
    assert final.source == "long" and final.length >= 200
    assert final.raw_loss is not None
    # Averaging removes most of the SGD noise: the excess loss of the average is a fraction of the raw
    # one, at the end and over the last 20 evaluations (raw iterates fluctuate from one to the next).
    assert final.loss - f_opt < 0.25 * (final.raw_loss - f_opt)
    late = reports[-20:]
    assert all(r.source == "long" for r in late)
    assert sum(r.loss - f_opt for r in late) < 0.25 * sum(r.raw_loss - f_opt for r in late)
    with avg.reported_weights():
        assert true_loss() == pytest.approx(final.loss)
    # Early on the raw weights are reported (they improve faster than any average).
    assert reports[0].source == "raw"
