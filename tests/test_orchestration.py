"""What the DAGs share (batchmark/orchestration.py, batchmark/airflow_plugin.py): which day a run checks, the
day Param, run names, retries. No services: the timetable and the Param are Airflow's own objects."""

from __future__ import annotations

import json
from datetime import UTC, date, datetime, timedelta

import pytest
from airflow.sdk.definitions.param import ParamsDict
from airflow.sdk.exceptions import ParamValidationError
from airflow.timetables.base import DataInterval, TimeRestriction
from airflow.utils.types import DagRunType

from batchmark import orchestration
from batchmark.airflow_plugin import NightlyTimetable, name_manual_run
from batchmark.errors import ConfigError, ServiceUnavailable


def _utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)


@pytest.mark.parametrize(
    ("param", "interval_start", "run_after", "expected"),
    [
        ("2026-02-28", _utc(2026, 11, 25), _utc(2026, 11, 26), date(2026, 2, 28)),  # the Param wins
        (None, _utc(2026, 11, 25), _utc(2026, 11, 26, 0, 0, 5), date(2026, 11, 25)),  # the data interval's day
        ("", _utc(2024, 2, 29), None, date(2024, 2, 29)),
        (None, None, _utc(2026, 3, 1, 14, 30), date(2026, 2, 28)),  # no interval: the day before the run
    ],
)
def test_day_for_run(param: str | None, interval_start: datetime | None, run_after: datetime | None, expected: date):
    assert orchestration.day_for_run(param, interval_start, run_after) == expected


def test_day_for_run_refuses_a_date_that_is_not_a_day() -> None:
    with pytest.raises(ConfigError, match="2026-02-30.*YYYY-MM-DD"):
        orchestration.day_for_run("2026-02-30", None, None)


@pytest.mark.parametrize("now", [_utc(2026, 11, 26, 9, 15), _utc(2026, 3, 1, 0, 0, 1), _utc(2024, 3, 1, 23, 59)])
def test_the_nightly_run_checks_the_day_that_has_ended(now: datetime) -> None:
    """The run the scheduler creates at midnight of day D covers [D-1, D): it checks D-1 and is named after it."""
    tt = NightlyTimetable(orchestration.NIGHTLY_CRON, timezone="UTC")
    midnight = now.replace(hour=0, minute=0, second=0, microsecond=0)
    last = DataInterval(start=midnight - timedelta(days=2), end=midnight - timedelta(days=1))
    info = tt.next_dagrun_info(
        last_automated_data_interval=last,
        restriction=TimeRestriction(earliest=_utc(2024, 1, 1), latest=None, catchup=True),
    )
    assert info.run_after == midnight  # runs at midnight of the day that is starting ...
    day = orchestration.day_for_run(None, info.data_interval.start, info.run_after)
    assert day == now.date() - timedelta(days=1)  # ... and checks the day that has ended
    assert tt.generate_run_id(run_type=DagRunType.SCHEDULED, run_after=midnight, data_interval=info.data_interval) == (
        f"scheduled__{day.isoformat()}"
    )
    assert tt.generate_run_id(
        run_type=DagRunType.BACKFILL_JOB, run_after=midnight, data_interval=info.data_interval
    ) == (f"backfill__{day.isoformat()}")


def test_without_catchup_the_scheduler_takes_yesterday() -> None:
    """catchup=False: the one run the scheduler creates on the real clock is yesterday's (UTC)."""
    tt = NightlyTimetable(orchestration.NIGHTLY_CRON, timezone="UTC")
    info = tt.next_dagrun_info(
        last_automated_data_interval=None,
        restriction=TimeRestriction(earliest=_utc(2024, 1, 1), latest=None, catchup=False),
    )
    today = datetime.now(tz=UTC).date()
    assert orchestration.day_for_run(None, info.data_interval.start, info.run_after) == today - timedelta(days=1)
    assert info.run_after.date() == today


def test_next_scheduled_run_after_a_given_run() -> None:
    tt = NightlyTimetable(orchestration.NIGHTLY_CRON, timezone="UTC")
    last = DataInterval(start=_utc(2026, 11, 23), end=_utc(2026, 11, 24))
    info = tt.next_dagrun_info(
        last_automated_data_interval=last,
        restriction=TimeRestriction(earliest=_utc(2026, 1, 1), latest=None, catchup=True),
    )
    assert info.run_after == _utc(2026, 11, 25)
    assert info.data_interval == DataInterval(start=_utc(2026, 11, 24), end=_utc(2026, 11, 25))
    assert orchestration.day_for_run(None, info.data_interval.start, info.run_after) == date(2026, 11, 24)
    # A manual run without a date, triggered during the 26th, infers the day that ended before it.
    manual = tt.infer_manual_data_interval(run_after=_utc(2026, 11, 26, 10, 30))
    assert orchestration.day_for_run(None, manual.start, _utc(2026, 11, 26, 10, 30)) == date(2026, 11, 25)


def test_timetable_survives_serialization() -> None:
    """The scheduler and API server rebuild the timetable from the serialized DAG (the plugin registers it)."""
    from airflow.serialization.decoders import decode_timetable
    from airflow.serialization.encoders import encode_timetable

    tt = NightlyTimetable(orchestration.NIGHTLY_CRON, timezone="UTC")
    back = decode_timetable(encode_timetable(tt))
    assert type(back) is NightlyTimetable
    assert back.summary == tt.summary


def test_manual_run_is_named_after_its_day() -> None:
    now = _utc(2026, 11, 26, 0, 43, 57, 352193)
    body = json.dumps({"conf": {"date": "2026-03-02"}, "logical_date": None}).encode()
    assert json.loads(name_manual_run(body, now))["dag_run_id"] == "manual__2026-03-02__20261126T004357.352Z"
    # A run id the person gave is kept; anything that is not a real day is left for Airflow to refuse.
    given = json.dumps({"conf": {"date": "2026-03-02"}, "dag_run_id": "mine"}).encode()
    assert name_manual_run(given, now) == given
    for untouched in (
        b'{"conf": {"date": "2026-02-30"}}',
        b'{"conf": {}}',
        b'{"conf": {"date": 20260302}}',
        b"not json",
        b"",
        b"[1, 2]",
    ):
        assert name_manual_run(untouched, now) == untouched, untouched


def test_days_from_asset_events_sorted_once() -> None:
    events = [{"day": "2026-03-03"}, {"day": "2026-03-02"}, {}, None, {"day": "2026-03-03"}]
    assert orchestration.days_from_asset_events(events) == [date(2026, 3, 2), date(2026, 3, 3)]
    assert orchestration.run_note("validate_accuracy", [date(2026, 3, 3), date(2026, 3, 2)]) == (
        "validates 2026-03-02, 2026-03-03 · accuracy report: [2026-03-02](/batchmark/accuracy?day=2026-03-02), "
        "[2026-03-03](/batchmark/accuracy?day=2026-03-03)"
    )
    assert orchestration.run_note("nightly_recompute", [date(2026, 3, 2)]) == "recomputes 2026-03-02"


def test_date_param_accepts_only_real_days() -> None:
    params = ParamsDict({"date": orchestration.date_param("d")})
    for good in (None, "2026-02-28", "2024-02-29"):
        params["date"] = good
        assert params.validate() == {"date": good}
    for bad in ("2026-02-30", "2025-02-29", "2026-13-01", "24/11/2026", "2026-11-24\n", "2026-11-24'; --", 20261124):
        with pytest.raises(ParamValidationError):
            params["date"] = bad
            params.validate()
    schema = orchestration.date_param("d").schema
    assert schema["format"] == "date"  # what makes the trigger form a date picker


def test_configuration_errors_fail_at_once_and_outages_retry() -> None:
    from airflow.sdk import RetryAction

    policy = orchestration.retry_policy()
    assert policy.evaluate(ConfigError("unknown metric"), 1, 3).action is RetryAction.FAIL
    assert policy.evaluate(ServiceUnavailable("no broker"), 1, 3).action is RetryAction.RETRY
    assert policy.evaluate(RuntimeError("spark exit 1"), 1, 3).action is RetryAction.DEFAULT
