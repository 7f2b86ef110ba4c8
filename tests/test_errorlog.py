"""Errors that repeat per object are summarized: a count and the first names, not a line each."""
from __future__ import annotations

import logging

from agent.errorlog import ErrorLog


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_a_batch_of_many_errors_is_one_line_with_the_count_and_first_names(caplog):
    elog = ErrorLog(logging.getLogger("t"), "sync refused", first=3)
    with caplog.at_level(logging.ERROR):
        elog.add([f"Service default/s{i}: map full" for i in range(475_000)])
    [rec] = caplog.records
    assert "475000 errors" in rec.getMessage() and "default/s0" in rec.getMessage() and "default/s3" not in rec.getMessage()
    assert elog.count == 475_000 and len(elog.recent) == 200 and elog.recent[-1] == "Service default/s474999: map full"


def test_errors_one_at_a_time_are_rate_limited_then_summarized(caplog):
    clock = Clock()
    elog = ErrorLog(logging.getLogger("t"), "bad object", burst=5, window=10.0, first=2, clock=clock)
    with caplog.at_level(logging.ERROR):
        for i in range(1000):
            elog.add([f"api: Service default/b{i}: spec: wrong"])
        assert len(caplog.records) == 5
        elog.flush()  # the window has not passed: still held
        assert len(caplog.records) == 5
        clock.t = 11.0
        elog.flush()
    assert len(caplog.records) == 6
    msg = caplog.records[-1].getMessage()
    assert "995 more errors" in msg and "default/b5" in msg and "default/b6" in msg and "default/b7" not in msg
    assert elog.count == 1000


def test_few_errors_are_logged_each(caplog):
    elog = ErrorLog(logging.getLogger("t"), "bad object")
    with caplog.at_level(logging.ERROR):
        elog.add(["a", "b"])
    assert [r.getMessage() for r in caplog.records] == ["bad object: a", "bad object: b"]
