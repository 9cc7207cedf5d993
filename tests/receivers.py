"""Real alert receivers on 127.0.0.1 for tests: a webhook (HTTP) server and an SMTP server (aiosmtpd), and
the Airflow connections (AIRFLOW_CONN_* variables) that point batchmark's alert channels at them."""

from __future__ import annotations

import html
import json
import threading
from email import message_from_bytes
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from aiosmtpd.controller import Controller

from batchmark.broker import free_port


class Webhook:
    """An HTTP server on 127.0.0.1 that keeps every JSON body posted to it; stop() makes it unreachable."""

    def __init__(self, port: int) -> None:
        self.port, self.bodies = port, []
        self.server: ThreadingHTTPServer | None = None

    def start(self) -> Webhook:
        received = self.bodies

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self.server:
            self.server.shutdown()
            self.server.server_close()
            self.server = None


class Mailbox:
    """An SMTP server on 127.0.0.1 (aiosmtpd) that keeps (recipients, parsed message) of every email."""

    def __init__(self) -> None:
        self.messages: list[tuple[list[str], Any]] = []
        self.controller = Controller(self, hostname="127.0.0.1", port=free_port())

    @property
    def port(self) -> int:
        return self.controller.port

    def start(self) -> Mailbox:
        self.controller.start()
        return self

    def stop(self) -> None:
        self.controller.stop()

    def bodies(self) -> dict[str, str]:
        """{subject: the HTML part's text, unescaped}."""
        out = {}
        for _, m in self.messages:
            part = next(p for p in m.walk() if p.get_content_type() == "text/html")
            out[m["Subject"]] = html.unescape(part.get_payload(decode=True).decode())
        return out

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:  # noqa: N802
        self.messages.append((list(envelope.rcpt_tos), message_from_bytes(envelope.content)))
        return "250 OK"


def channel_env(hook: Webhook, mailbox: Mailbox) -> dict[str, str]:
    """Environment for two alert channels: bm_webhook (apprise, JSON webhook) and bm_email (smtp)."""
    webhook = {"conn_type": "apprise", "extra": {"config": {"path": f"json://127.0.0.1:{hook.port}/alerts"}}}
    email = {
        "conn_type": "smtp",
        "host": "127.0.0.1",
        "port": mailbox.port,
        "extra": {
            "disable_ssl": True,
            "disable_tls": True,
            "to": "oncall@example.com",
            "from_email": "batchmark@example.com",
            "retry_limit": 0,
            "timeout": 5,
        },
    }
    return {
        "AIRFLOW_CONN_BM_WEBHOOK": json.dumps(webhook),
        "AIRFLOW_CONN_BM_EMAIL": json.dumps(email),
        "BATCHMARK_ALERT_CHANNELS": "bm_webhook,bm_email",
        "BATCHMARK_REPORT_URL": "http://127.0.0.1:8080/batchmark/reports",
    }
