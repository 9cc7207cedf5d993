"""batchmark.drift on constructed histories: exactly the expected alerts, and no others, for each check."""

from __future__ import annotations

import random
from datetime import date, timedelta

import pytest

from batchmark import drift
from batchmark.drift import Day, DriftSettings

START = date(2026, 10, 1)
TOL = 0.05  # a sketch metric: relative error within 5%


def history(errors: list[float], **per_day) -> list[Day]:
    """Days from START with these mean errors; other fields constant unless given as lists."""
    days = []
    for i, e in enumerate(errors):
        extra = {k: (v[i] if isinstance(v, list) else v) for k, v in per_day.items()}
        fields = {"windows": 24, "tolerance": TOL, "truth_events": 100_000, "late": 500, "lost": 0, "duplicate": 0}
        fields |= extra
        within = fields.pop("within_tolerance", e <= TOL)
        days.append(Day(day=START + timedelta(days=i), mean_error=e, max_error=e, within_tolerance=within, **fields))
    return days


def noise(n: int, level: float = 0.01, sd: float = 0.001, seed: int = 7) -> list[float]:
    rng = random.Random(seed)
    return [max(0.0, rng.gauss(level, sd)) for _ in range(n)]


def changes(days: list[Day], s: DriftSettings | None = None) -> list[tuple[int, str, str]]:
    """(day index, check, new state) of every transition."""
    found = drift.transitions("m", days, s or DriftSettings())
    return [((t.day - START).days, t.verdict.check, t.after) for t in found]


def test_noise_without_drift_never_alerts():
    for seed in range(20):
        assert changes(history(noise(60, seed=seed))) == [], seed


def test_a_step_inside_the_tolerance_is_a_trend_then_a_drift_until_it_is_the_new_baseline():
    errors = noise(20) + [0.03] * 20  # within the 5% tolerance: the tolerance check says nothing

    got = changes(history(errors))

    # day 20: the step scores far above 3.5 against 14 quiet days; day 25: six days of a capped CUSUM (+1 each)
    # pass h = 5; day 27: 7 of the 14 trailing days are at the new level, so the median moved and the trend
    # check sees no outlier any more (recovered), while the drift stays until the reference period moves on.
    assert got == [(20, "error_trend", "warning"), (25, "error_drift", "warning"), (27, "error_trend", "ok")]


def test_a_slow_rise_that_never_crosses_the_tolerance_is_found_by_the_drift_check_only():
    errors = noise(30) + [0.01 + 0.0006 * j for j in range(1, 31)]  # reaches 0.028: inside 0.05 throughout

    got = changes(history(errors))

    assert [c for c in got if c[1] != "error_drift"] == []  # no day is an outlier, no tolerance breach
    assert got[0][1:] == ("error_drift", "warning")
    assert 38 <= got[0][0] <= 50, got  # found within 8 to 20 days of the start of the rise


def test_a_breach_and_its_recovery_alert_once_each_and_a_short_spike_is_no_drift():
    errors = noise(20) + [0.06, 0.06, 0.06] + noise(17, seed=3)

    got = changes(history(errors))

    assert got == [
        (20, "tolerance", "error"),
        (20, "error_trend", "warning"),
        (23, "tolerance", "ok"),
        (23, "error_trend", "ok"),
    ]
    transitions = drift.transitions("m", history(errors))
    assert [t.severity for t in transitions] == ["error", "warning", "recovered", "recovered"]


def test_small_changes_on_a_quiet_metric_never_alert():
    # exactly zero error for weeks, then 1e-12: infinitely many MADs away, but far below a tenth of the tolerance
    assert changes(history([0.0] * 20 + [1e-12] * 5)) == []
    # and a real change of half the baseline does alert
    assert changes(history([0.0] * 20 + [0.01])) == [(20, "error_trend", "warning")]


def test_trend_waits_for_the_minimum_history():
    assert changes(history([0.01] * 5 + [0.04])) == []  # 5 days of history < 7: not judged
    assert changes(history([0.01] * 7 + [0.04])) == [(7, "error_trend", "warning")]


def test_rises_in_late_lost_and_duplicated_events_say_why():
    n = 30
    late = [500] * 20 + [3000] * 10  # 0.5% of events late, then 3%
    lost = [0] * 25 + [2000] * 5
    got = changes(history([0.01] * n, late=late, lost=lost, duplicate=[100] * n))

    assert (20, "late_rise", "warning") in got
    assert (25, "lost_rise", "warning") in got
    assert not [c for c in got if c[1] in ("duplicate_rise", "error_trend", "error_drift", "tolerance")]


def test_completeness_fails_a_lossy_stream_whatever_its_error():
    days = history([0.0] * 3, incomplete=[0, 2, 0], impossible=[0, 0, 1])
    assert changes(days) == [(1, "completeness", "error")]  # one alert: day 2 is still an error
    verdicts = {v.check: v for v in drift.evaluate(days)}
    assert verdicts["completeness"].level == "error"
    assert "1 with fewer bins than the truth's items need" in verdicts["completeness"].detail
    assert verdicts["tolerance"].level == "ok"


def test_rejected_records_are_a_dataset_check():
    days = [Day(day=START + timedelta(days=i), windows=0, truth_events=100_000, rejected=10) for i in range(20)]
    days.append(Day(day=START + timedelta(days=20), windows=0, truth_events=100_000, rejected=900))
    got = [(t.verdict.check, t.after) for t in drift.transitions(drift.DATASET, days, dataset=True)]
    assert got == [("rejected_rise", "warning")]


def test_cusum_caps_each_day():
    assert drift.cusum([10.0, 10.0, 0.0], mean=0.0, sd=1.0, k=0.5) == [1.0, 2.0, 1.5]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[alerts]\nz_threshold = 'high'\n", "z_threshold must be a number"),
        ("[alerts]\nmin_history = 2.5\n", "min_history must be a whole number"),
        ("[alerts]\nwindow = 3\n", "has no setting 'window'"),
        ("[alerts]\ntrailing_days = 3\n", "trailing_days must be at least min_history"),
        ("[alerts]\nmin_history = 0\n", "min_history must be above 0"),
        ("[alerts]\ncusum_h = 0\n", "cusum_h must be above 0"),
    ],
)
def test_bad_alert_settings_are_refused_with_what_to_fix(tmp_path, text, message):
    from batchmark.config import REPO_ROOT
    from batchmark.definitions import load_definitions
    from batchmark.errors import ConfigError

    path = tmp_path / "defs.toml"
    path.write_text((REPO_ROOT / "batchmark" / "metrics.toml").read_text() + "\n" + text)
    with pytest.raises(ConfigError, match=message):
        load_definitions(path)


def test_alert_settings_come_from_the_definitions(tmp_path):
    from batchmark.config import REPO_ROOT
    from batchmark.definitions import load_definitions

    path = tmp_path / "defs.toml"
    path.write_text((REPO_ROOT / "batchmark" / "metrics.toml").read_text() + "\n[alerts]\nsuppress_days = 5\n")
    assert load_definitions(path).alerts == DriftSettings(suppress_days=5)


def test_the_decision_rule_uses_the_kinds_bound_and_names_the_worst_day() -> None:
    def day(i: int, err: float, tol: float, ok: bool, incomplete: int = 0) -> dict:
        return {"day": date(2026, 5, 1) + timedelta(days=i), "max_error": err, "tolerance": tol,
                "within_tolerance": ok, "missing": 0, "incomplete": incomplete, "impossible": 0}  # fmt: skip

    # a sketch checked at its bound: GX's mostly lets a window over the bound pass, and the rule follows it
    rows = [day(i, 0.03 + 0.01 * (i == 2), 0.0488, True) for i in range(5)]
    verdict, evidence = drift.decision(rows, 5, 0.0488, "relative error")
    assert verdict == drift.ENOUGH
    assert evidence == (
        "5 of the last 5 validated days within the bound 0.0488 and complete; "
        "worst day 2026-05-03 (relative error 0.04)"
    )
    # a tolerance looser than the bound: a day passed its check, but its error is over the bound
    rows = [day(i, 0.02 + 0.05 * (i == 4), 0.5, True) for i in range(5)]
    assert drift.decision(rows, 5, 0.0488)[0] == drift.KEEP
    assert drift.decision(rows, 5, 0.0488)[1].startswith("4 of the last 5")
    rows = [day(i, 0.0, 0.0, True, incomplete=int(i == 1)) for i in range(5)]  # exact, but a window incomplete
    assert drift.decision(rows, 5, 0.0) == (
        drift.KEEP,
        "4 of the last 5 validated days within the bound 0 and complete; worst day 2026-05-01 (error 0)",
    )
    assert drift.decision(rows[2:], 5, 0.0)[1].startswith("only 3 days of history, 5 needed")
