"""Alert webhooks: JSON bodies with a Slack-compatible ``text`` field, posted in the background.

A few retries, from a thread of their own, so a slow or dead webhook never slows ingest.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Sequence
from typing import Any

import httpx

from monitor.schema import AlertValue

logger = logging.getLogger(__name__)

ATTEMPTS = 3


def webhook_body(project: str, run_id: str, run_name: str, alert: AlertValue) -> dict[str, Any]:
    """The JSON posted for one alert: ``text`` for Slack-style receivers, the rest for machines."""
    where = f" at site {alert.site}" if alert.site else ""
    title = run_name or run_id
    return {
        "text": (
            f"[apmon] {alert.severity.upper()} {alert.kind} in run {title} "
            f"(project {project}) at step {alert.step}{where}: {alert.message}"
        ),
        "project": project,
        "run_id": run_id,
        "alert": alert.model_dump(mode="json"),
    }


class WebhookSender:
    """Posts alert bodies to every configured URL.

    Undeliverable alerts are logged and dropped here; they stay stored in SQL and readable at
    /api/v1/runs/{id}/alerts.
    """

    def __init__(self, urls: Sequence[str], timeout: float = 5.0) -> None:
        self._urls = list(urls)
        self._timeout = timeout
        self._queue: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self.delivered = 0
        self.failed = 0
        self._thread: threading.Thread | None = None
        if self._urls:
            self._thread = threading.Thread(target=self._loop, name="apmon-webhooks", daemon=True)
            self._thread.start()

    def send(self, body: dict[str, Any]) -> None:
        """Queue one body for every URL."""
        if self._thread is not None:
            self._queue.put(body)

    @property
    def depth(self) -> int:
        """Bodies waiting to be posted."""
        return self._queue.qsize()

    def close(self, timeout: float = 5.0) -> None:
        """Post what is queued (bounded by ``timeout``) and stop."""
        if self._thread is None:
            return
        self._queue.put(None)
        self._thread.join(timeout)
        self._thread = None

    def _loop(self) -> None:
        with httpx.Client(timeout=self._timeout) as client:
            while True:
                body = self._queue.get()
                if body is None:
                    return
                for url in self._urls:
                    self._post(client, url, body)

    def _post(self, client: httpx.Client, url: str, body: dict[str, Any]) -> None:
        for attempt in range(ATTEMPTS):
            try:
                response = client.post(url, json=body)
                if response.status_code < 300:
                    self.delivered += 1
                    return
                problem = f"HTTP {response.status_code}"
                if 400 <= response.status_code < 500 and response.status_code != 429:
                    break  # the receiver refuses this body: retrying will not help
            except httpx.HTTPError as error:
                problem = str(error) or type(error).__name__
            time.sleep(0.5 * 2**attempt)
        self.failed += 1
        logger.warning("alert webhook %s failed: %s", url, problem)
