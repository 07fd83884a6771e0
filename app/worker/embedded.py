"""The worker that runs inside the API process on the embedded default (`memory://` broker).

Same Celery app, same tasks; only the transport differs. A thread pool keeps it in this
process, which is what makes an in-memory broker possible. Work pending in the database is
re-enqueued at start-up by the sweeper, so a restart loses nothing the broker held.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from app.broker import celery_for
from app.config import get_settings
from app.worker.runtime import get_runtime

log = logging.getLogger("srft.worker")


class EmbeddedWorker:
    def __init__(self, concurrency: int = 8) -> None:
        self.concurrency = concurrency
        self._worker: Any = None
        self._thread: threading.Thread | None = None
        self._sweeper: threading.Thread | None = None
        self._stopping = threading.Event()

    def start(self) -> None:
        from celery.worker import WorkController

        self._worker = WorkController(
            app=celery_for(get_settings().broker_url),
            pool_cls="threads",
            concurrency=self.concurrency,
            hostname="embedded@localhost",
            without_heartbeat=True,
            without_mingle=True,
            without_gossip=True,
            loglevel="WARNING",
        )
        self._thread = threading.Thread(target=self._worker.start, name="srft-worker", daemon=True)
        self._thread.start()
        log.warning("embedded worker started (%d threads, in-memory broker)", self.concurrency)

        self._stopping.clear()
        self._sweeper = threading.Thread(
            target=self._sweep_forever, name="srft-sweeper", daemon=True
        )
        self._sweeper.start()

    def _sweep_forever(self) -> None:
        """The embedded stand-in for beat: resume open work at start, then sweep periodically."""
        interval = get_settings().sweep_interval_s
        try:
            resumed = get_runtime().resume()
            if resumed:
                log.warning("resumed %d units of open labeling work", resumed)
        except Exception:
            log.exception("could not resume open labeling work")
        while not self._stopping.wait(interval):
            try:
                get_runtime().sweep()
            except Exception:
                log.exception("sweep failed; trying again in %.0f s", interval)

    def stop(self) -> None:
        self._stopping.set()
        if self._worker is not None:
            self._worker.stop(in_sighandler=False)
        if self._thread is not None:
            self._thread.join(timeout=10)
