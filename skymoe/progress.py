"""Progress lines with rate and ETA for long work, written to the logger (so Prefect shows them)."""

from __future__ import annotations

import contextvars
import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager


class Progress:
    """Counts units of work and logs ``done/total, rate, ETA`` at most every ``every_s`` seconds."""

    def __init__(self, what: str, total: int | None, unit: str = "items", logger: logging.Logger | None = None,
                 every_s: float = 10.0):
        self.what = what
        self.total = total
        self.unit = unit
        self.logger = logger or logging.getLogger("skymoe")
        self.every_s = every_s
        self.done = 0
        self.started = time.monotonic()
        self._last_log = self.started

    def update(self, n: int = 1) -> None:
        self.done += n
        now = time.monotonic()
        if now - self._last_log >= self.every_s:
            self._last_log = now
            self.logger.info(self.line())

    def line(self) -> str:
        elapsed = max(time.monotonic() - self.started, 1e-9)
        rate = self.done / elapsed
        if self.total:
            remaining = (self.total - self.done) / rate if rate > 0 else float("inf")
            eta = f"ETA {_fmt_duration(remaining)}"
            return f"{self.what}: {self.done}/{self.total} {self.unit} ({rate:,.1f} {self.unit}/s, {eta})"
        return f"{self.what}: {self.done} {self.unit} ({rate:,.1f} {self.unit}/s)"

    @contextmanager
    def watching(self, count: Callable[[], int]) -> Iterator["Progress"]:
        """Poll ``count()`` in the background and log progress, for work done by other processes
        (executor workers) that report completion through storage.

        The thread runs in a copy of the caller's context: Prefect finds the flow run it logs to
        there, and a thread without it has its lines refused by Prefect's API handler with a warning.
        """
        stop = threading.Event()

        def poll() -> None:
            while not stop.wait(self.every_s):
                try:
                    self.done = count()
                except OSError:
                    continue  # a transient storage error only delays the next progress line
                self.logger.info(self.line())

        context = contextvars.copy_context()
        thread = threading.Thread(target=context.run, args=(poll,), name=f"progress-{self.what}", daemon=True)
        thread.start()
        try:
            yield self
        finally:
            stop.set()
            thread.join()

    def close(self) -> None:
        elapsed = max(time.monotonic() - self.started, 1e-9)
        self.logger.info(f"{self.what}: done, {self.done} {self.unit} in {_fmt_duration(elapsed)} "
                         f"({self.done / elapsed:,.1f} {self.unit}/s)")


def _fmt_duration(seconds: float) -> str:
    if seconds == float("inf"):
        return "?"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"
