"""Errors that repeat per object, logged as a count and the first names instead of one line each.

A full map refusing 475k Services, or a list of thousands of malformed objects, must not become
hundreds of thousands of log lines. A batch (one sync's refusals, one file's bad objects) of more
than `first` errors is one line: the count and the first ones. Errors that arrive one at a time
(watch events) are logged as they come up to `burst` per `window` seconds; the rest are counted and
summarized by the next line once the window has passed (or by flush()).
"""
from __future__ import annotations

import logging
import threading
import time
from collections import deque


class ErrorLog:
    def __init__(self, logger: logging.Logger, what: str, keep: int = 200, first: int = 5,
                 burst: int = 20, window: float = 10.0, clock=time.monotonic):
        self.log, self.what = logger, what
        self.first, self.burst, self.window, self.clock = first, burst, window, clock
        self.recent: deque[str] = deque(maxlen=keep)  # newest last
        self.count = 0
        self._lock = threading.Lock()
        self._window_start = -window
        self._logged = 0  # lines in the current window
        self._held: list[str] = []  # the first few errors not logged in this window
        self._held_count = 0

    def add(self, errors: list[str], logged: bool = True) -> None:
        """Record errors; log them (summarized) unless logged=False (their producer already did)."""
        if not errors:
            return
        with self._lock:
            self.count += len(errors)
            self.recent.extend(errors[-(self.recent.maxlen or len(errors)):])
            if not logged:
                return
            now = self.clock()
            if now - self._window_start >= self.window:
                self._flush_locked()
                self._window_start, self._logged = now, 0
            if self._logged >= self.burst:
                self._held.extend(errors[:self.first - len(self._held)] if len(self._held) < self.first else [])
                self._held_count += len(errors)
                return
            self._logged += 1 if len(errors) > self.first else len(errors)
            self._emit(errors, len(errors))

    def flush(self) -> None:
        """Log what was held back (the agent loop calls this as it turns)."""
        with self._lock:
            if self._held_count and self.clock() - self._window_start >= self.window:
                self._flush_locked()
                self._window_start, self._logged = self.clock(), 0

    def _flush_locked(self) -> None:
        if self._held_count:
            self._emit(self._held, self._held_count, more=True)
            self._held, self._held_count = [], 0

    def _emit(self, errors: list[str], count: int, more: bool = False) -> None:
        if count <= self.first and not more:
            for e in errors:
                self.log.error("%s: %s", self.what, e)
        else:
            shown = "; ".join(errors[:self.first])
            self.log.error("%s: %d %s (first %d: %s)", self.what, count, "more errors" if more else "errors",
                           min(self.first, len(errors)), shown)
