"""`bulkhead run --metrics PATH`: one JSON record per line every `--metrics-interval` seconds
(Firecracker's metrics file, for orchestrators and log shippers), plus a last one at exit.

A record: `{"ts": unix seconds, "vm": name, "uptime_s": s, "devices": [per-device stats, as
`bulkhead stats` shows them]}`.  The file is opened once (appended to, created 0600, never through
a symlink); a write that fails is logged once and the VM runs on.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from typing import Any, Callable

from .errors import ConfigError

log = logging.getLogger(__name__)


class MetricsWriter:
    def __init__(self, path: str, interval: float, vm_name: str,
                 sample: Callable[[], list[dict[str, Any]]]) -> None:
        try:
            self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW
                              | os.O_CLOEXEC, 0o600)
        except OSError as e:
            raise ConfigError(f"--metrics {path}: cannot open: {e.strerror}") from None
        self.path, self.interval, self.vm_name, self.sample = path, interval, vm_name, sample
        self.started = time.monotonic()
        self._stop = threading.Event()
        self._failed = False
        self._thread = threading.Thread(target=self._run, name="bulkhead-metrics", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.write()

    def write(self) -> None:
        try:
            devices = self.sample()
        except Exception as e:  # noqa: BLE001 - metrics never take the VM down
            devices = [{"error": str(e)}]
        record = {"ts": round(time.time(), 3), "vm": self.vm_name,
                  "uptime_s": round(time.monotonic() - self.started, 3), "devices": devices}
        try:
            os.write(self.fd, (json.dumps(record, default=str, separators=(",", ":")) + "\n").encode())
        except OSError as e:
            if not self._failed:
                log.warning("--metrics %s: write failed: %s (no more warnings)", self.path, e.strerror)
                self._failed = True

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5)
        if self.fd >= 0:
            self.write()  # the last counters, at exit
            os.close(self.fd)
            self.fd = -1
