"""deliver_alerts: sends accuracy alerts that are still pending -- the outbox of quality.alerts.

`validate_accuracy` records alerts and sends them at once; a channel that was down then keeps them pending
(quality.alert_deliveries, with exponential backoff from BATCHMARK_ALERT_RETRY_SECONDS, at most 6 hours).
This DAG retries what is due every 15 minutes, so an alert reaches people soon after the channel is back.
A delivered alert is never sent again.

    send_pending_alerts

Channels are Airflow connections of type apprise (webhooks, Slack, email, ... by URL) or smtp, named in
BATCHMARK_ALERT_CHANNELS; with none configured there is nothing to send and the alerts are only recorded.
"""

from __future__ import annotations

from datetime import UTC, datetime

from airflow.sdk import DAG, task

from batchmark import orchestration

with DAG(
    dag_id="deliver_alerts",
    description="Retry accuracy alerts whose channel was down (the quality.alerts outbox)",
    schedule="*/15 * * * *",
    start_date=datetime(2026, 1, 1, tzinfo=UTC),
    catchup=False,
    max_active_runs=1,
    is_paused_upon_creation=False,  # an outbox that is paused loses nothing, but delivers nothing either
    tags=["batchmark", "alerts"],
    default_args=orchestration.default_args("deliver_alerts"),
    doc_md=__doc__,
) as dag:

    @task(retries=0)  # the next run (15 minutes later) is the retry
    def send_pending_alerts() -> str:
        """Send every pending alert delivery that is due; failures stay pending."""
        from batchmark import alerts, config

        line = alerts.deliver_pending(config.load()).line()
        print(line)
        return line

    send_pending_alerts()
