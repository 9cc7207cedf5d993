"""Drift detection over a metric's daily accuracy history: which checks fire, and the alert state machine.

Pure functions over plain day series (no database, no Airflow): :mod:`batchmark.alerts` feeds them from
``quality.accuracy_history`` and records what they decide. Every check has a name, one severity and a method:

- ``tolerance`` (error): the GX tolerance expectation failed -- the kind's error was over the metric's tolerance
  in more windows than ``mostly`` allows.
- ``completeness`` (error): a batch-truth window has no stream result, or the stream did not fold every truth
  event of a window (events never landed plus events dropped as late), or -- bin packing -- the stream packed
  fewer bins than any packing of the truth's items can (First Fit Decreasing uses at most 11/9 OPT + 6/9 bins,
  so OPT >= 9 (FFD - 6/9) / 11, and a stream that saw every item cannot beat OPT). A lossy stream fails here
  whatever its kind's own measure says.
- ``error_trend`` (warning): the day's mean error against the metric's own trailing baseline, as the modified
  z-score of Iglewicz and Hoaglin: z = (x - median) / (1.4826 MAD) over the trailing ``trailing_days``, fires
  when z > ``z_threshold`` (3.5, their recommendation) and the change is at least ``min_abs`` and ``min_rel``
  of the baseline -- so a tiny change on a quiet metric never alerts. It judges only with ``min_history`` days.
- ``error_drift`` (warning): a slow rise that never crosses the tolerance nor looks like an outlier on any one
  day. Page's one-sided CUSUM of the standardized errors, S_t = max(0, S_t-1 + z_t - k), against a reference
  period (the ``trailing_days`` before the last ``trailing_days``); fires when S_t > h with k = 0.5 and h = 5
  (a shift of one standard deviation is found in about 10 days; in-control false alarms about once in 900
  days for normal data, Montgomery's tables), with the same minimum effect on the recent mean. Each day's z
  is capped at k + 1 (a robust CUSUM), so a short spike cannot make a drift: at least 6 elevated days can.
- ``late_rise``, ``lost_rise``, ``duplicate_rise``, ``rejected_rise`` (warning): the day's share of late, lost,
  duplicated (per metric) and rejected (per dataset) records against their own trailing baseline, by the same
  modified z-score and minimum effect: they say *why* accuracy moved.

States per (metric, check): ok, warning, error. A day whose level differs from the state is a transition,
and only transitions alert ("recovered" when it goes back to ok): one alert per change, not one per night.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from collections.abc import Iterable, Sequence
from datetime import date

OK, WARNING, ERROR = "ok", "warning", "error"
RECOVERED = "recovered"
MAD_SCALE = 1.4826  # MAD of a normal sample times this estimates its standard deviation
DATASET = "(dataset)"  # the metric name of dataset-wide checks (rejected records)


@dataclasses.dataclass(frozen=True)
class DriftSettings:
    """The knobs of the trend and drift checks; the defaults and their reasons are in the module docstring."""

    trailing_days: int = 14
    min_history: int = 7
    z_threshold: float = 3.5
    min_rel: float = 0.5  # a change must also be at least half the baseline ...
    min_abs_error: float = 0.0  # ... and at least this (0: a tenth of the metric's tolerance)
    min_abs_rate: float = 0.001  # ... and for late/lost/duplicate/rejected shares, 0.1 percentage point
    cusum_k: float = 0.5
    cusum_h: float = 5.0
    suppress_days: int = 2  # an alert equal to one of the last suppress_days days is recorded, not sent


@dataclasses.dataclass(frozen=True)
class Day:
    """One metric's figures for one day (the newest validation of that day)."""

    day: date
    windows: int
    missing: int = 0  # truth windows with no stream result
    incomplete: int = 0  # truth windows where the stream did not fold every truth event
    impossible: int = 0  # bin packing: windows where the stream used fewer bins than the truth's items need
    within_tolerance: bool = True
    over_tolerance: int = 0
    mean_error: float | None = None
    max_error: float | None = None
    tolerance: float = 0.0
    truth_events: int = 0
    late: int = 0
    lost: int = 0
    duplicate: int = 0
    rejected: int = 0  # dataset-wide records rejected that day (same on every metric's row)


@dataclasses.dataclass(frozen=True)
class Verdict:
    """What one check says about one day: its level (ok or the check's severity; None = not judged) and why."""

    check: str
    level: str | None
    observed: float | None = None
    baseline: float | None = None
    threshold: float | None = None
    detail: str = ""


@dataclasses.dataclass(frozen=True)
class Transition:
    """A change of a (metric, check) state on a day: what an alert is about."""

    metric: str
    day: date
    verdict: Verdict
    before: str
    after: str

    @property
    def severity(self) -> str:
        """warning, error, or recovered (back to ok)."""
        return RECOVERED if self.after == OK else self.after


CHECKS = ("tolerance", "completeness", "error_trend", "error_drift", "late_rise", "lost_rise", "duplicate_rise")
DATASET_CHECKS = ("rejected_rise",)
SEVERITY = {"tolerance": ERROR, "completeness": ERROR} | {c: WARNING for c in CHECKS[2:] + DATASET_CHECKS}


def robust_z(
    x: float, history: Sequence[float], min_effect: float, threshold: float = 3.5
) -> tuple[float, float, float]:
    """(z, median, effect) of x against history: the modified z-score, its scale floored so that a change
    of min_effect scores exactly the threshold on a history with no spread (a constant baseline)."""
    med = statistics.median(history)
    mad = statistics.median(abs(h - med) for h in history)
    scale = max(MAD_SCALE * mad, min_effect / threshold, 1e-300)
    return (x - med) / scale, med, x - med


def _rise(check: str, today: float, past: Sequence[float], s: DriftSettings, min_abs: float, what: str) -> Verdict:
    """The trailing-baseline rise check shared by error_trend and the *_rise checks."""
    if len(past) < s.min_history:
        return Verdict(check, None, today, detail=f"{len(past)} of {s.min_history} days of history: not judged")
    base = statistics.median(past)
    min_effect = max(min_abs, s.min_rel * abs(base))
    z, base, effect = robust_z(today, past, min_effect, s.z_threshold)
    fires = z > s.z_threshold and effect >= min_effect
    return Verdict(
        check,
        SEVERITY[check] if fires else OK,
        today,
        base,
        base + min_effect,
        f"{what} {_g(today)} against a {len(past)}-day median of {_g(base)} (modified z {_g(z)}, "
        f"fires above {s.z_threshold:g} with a change of at least {_g(min_effect)})",
    )


def cusum(values: Sequence[float], mean: float, sd: float, k: float) -> list[float]:
    """Page's one-sided upper CUSUM of values standardized by (mean, sd): S_t = max(0, S_t-1 + z_t - k), each
    z_t winsorized at k + 1 (Hawkins' robust CUSUM): a day adds at most 1, so a spike of a few days -- the
    trend check's business -- never makes a drift, while a sustained shift of 1.5 sd fires in h + 1 days."""
    s, out = 0.0, []
    for v in values:
        s = max(0.0, s + min((v - mean) / sd, k + 1) - k)
        out.append(s)
    return out


def _drift(today: float, past: Sequence[float], s: DriftSettings, min_abs: float) -> Verdict:
    """error_drift: CUSUM over the last trailing_days (today included) against the period before them."""
    n = s.trailing_days
    recent = [*past[-(n - 1) :], today] if n > 1 else [today]
    reference = past[: len(past) - (len(recent) - 1)][-n:]
    if len(reference) < s.min_history:
        return Verdict("error_drift", None, today, detail="not enough history for a reference period: not judged")
    mean = statistics.median(reference)
    min_effect = max(min_abs, s.min_rel * abs(mean))
    mad = statistics.median(abs(r - mean) for r in reference)
    sd = max(MAD_SCALE * mad, min_effect / s.cusum_h, 1e-300)  # a flat reference: min_effect sustained fires
    top = cusum(recent, mean, sd, s.cusum_k)[-1]
    recent_mean = statistics.fmean(recent)
    fires = top > s.cusum_h and recent_mean - mean >= min_effect
    return Verdict(
        "error_drift",
        WARNING if fires else OK,
        recent_mean,
        mean,
        mean + min_effect,
        f"mean error {_g(recent_mean)} over the last {len(recent)} days against {_g(mean)} before (CUSUM "
        f"{_g(top)}, fires above {s.cusum_h:g} with a change of at least {_g(min_effect)})",
    )


def _completeness(d: Day) -> Verdict:
    bad = d.missing + d.incomplete + d.impossible
    parts = [
        f"{n} {what}"
        for n, what in (
            (d.missing, "missing from the stream"),
            (d.incomplete, "with truth events the stream did not fold"),
            (d.impossible, "with fewer bins than the truth's items need"),
        )
        if n
    ]
    text = f"{bad} of {d.windows} truth windows incomplete" + (f" ({'; '.join(parts)})" if parts else "")
    return Verdict("completeness", ERROR if bad else OK, bad, 0, 0, text)


def _tolerance(d: Day) -> Verdict:
    text = f"{d.over_tolerance} of {d.windows} windows over tolerance {_g(d.tolerance)} (max error {_g(d.max_error)})"
    return Verdict("tolerance", OK if d.within_tolerance else ERROR, d.max_error, None, d.tolerance, text)


def _share(n: int, d: Day) -> float:
    return n / d.truth_events if d.truth_events else 0.0


def evaluate(days: Sequence[Day], s: DriftSettings = DriftSettings()) -> list[Verdict]:
    """Every per-metric check's verdict on the last day of a metric's history (days in date order)."""
    *past, d = days
    window = past[-s.trailing_days :]
    errors = [x.mean_error for x in past if x.mean_error is not None and math.isfinite(x.mean_error)]
    min_abs = s.min_abs_error or max(0.1 * d.tolerance, 1e-9)
    out = [_tolerance(d), _completeness(d)]
    if d.mean_error is None or not math.isfinite(d.mean_error):
        out += [Verdict(c, None, detail="no finite mean error that day") for c in ("error_trend", "error_drift")]
    else:
        out.append(_rise("error_trend", d.mean_error, errors[-s.trailing_days :], s, min_abs, "mean error"))
        out.append(_drift(d.mean_error, errors, s, min_abs))
    for check, attr, what in (
        ("late_rise", "late", "late events"),
        ("lost_rise", "lost", "lost events"),
        ("duplicate_rise", "duplicate", "duplicated events"),
    ):
        shares = [_share(getattr(x, attr), x) for x in window if x.truth_events]
        out.append(_rise(check, _share(getattr(d, attr), d), shares, s, s.min_abs_rate, f"share of {what}"))
    return out


def evaluate_dataset(days: Sequence[Day], s: DriftSettings = DriftSettings()) -> list[Verdict]:
    """The dataset-wide checks on the last day (rejected records as a share of records)."""
    *past, d = days

    def share(x: Day) -> float:
        return x.rejected / (x.truth_events + x.rejected) if x.truth_events + x.rejected else 0.0

    shares = [share(x) for x in past[-s.trailing_days :]]
    return [_rise("rejected_rise", share(d), shares, s, s.min_abs_rate, "share of rejected records")]


def transitions(
    metric: str, days: Sequence[Day], s: DriftSettings = DriftSettings(), dataset: bool = False
) -> list[Transition]:
    """Replay the state machine over a metric's whole history: every change of state, day by day.

    Deterministic: the same history always gives the same transitions, so recording them is idempotent. A
    check that does not judge a day (too little history) leaves its state as it was.
    """
    state: dict[str, str] = {}
    out = []
    for i in range(len(days)):
        verdicts = (evaluate_dataset if dataset else evaluate)(days[: i + 1], s)
        for v in verdicts:
            if v.level is None:
                continue
            before = state.get(v.check, OK)
            if v.level != before:
                out.append(Transition(metric, days[i].day, v, before, v.level))
                state[v.check] = v.level
    return out


def _g(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3g}"


def as_days(rows: Iterable[dict]) -> list[Day]:
    """Day records from dicts with Day's field names (extra keys ignored), sorted by day."""
    names = {f.name for f in dataclasses.fields(Day)}
    return sorted((Day(**{k: v for k, v in r.items() if k in names}) for r in rows), key=lambda d: d.day)


# -- the decision rule ------------------------------------------------------------------------------------------
ENOUGH, KEEP = "stream alone is enough", "keep the nightly batch"


def decision(rows: Sequence[dict], n: int, bound: float, error_name: str = "error") -> tuple[str, str]:
    """The chapter's decision rule for one metric: (verdict, evidence).

    When the metric's error stayed within its kind's known bound (competitive ratio or sketch error bound, the
    kind's ``bound()``) and every window was complete on each of the last `n` validated days, the stream alone is
    enough; otherwise keep the nightly batch. A day is within the bound when its tolerance check passed against a
    tolerance no looser than the bound (so a sketch's share of windows -- ``mostly`` -- is honoured), else when
    its largest window error is within the bound. The evidence names n, the worst day and the bound."""
    last = list(rows)[-n:]
    judged = [r for r in last if r.get("max_error") is not None]
    worst = max(judged, key=lambda r: r["max_error"], default=None)
    worst_text = f"; worst day {worst['day']} ({error_name} {worst['max_error']:.3g})" if worst else ""

    def within(r: dict) -> bool:
        if r.get("tolerance") is not None and r["tolerance"] <= bound + 1e-12:
            return bool(r["within_tolerance"])
        return r.get("max_error") is None or r["max_error"] <= bound + 1e-12

    good = [r for r in last if within(r) and not (r["missing"] or r["incomplete"] or r["impossible"])]
    evidence = f"{len(good)} of the last {len(last)} validated days within the bound {bound:.3g} and complete"
    if len(last) < n:
        return KEEP, f"only {len(last)} days of history, {n} needed; {evidence}{worst_text}"
    return (ENOUGH if len(good) == len(last) else KEEP), evidence + worst_text
