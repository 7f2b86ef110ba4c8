"""Dropping the capabilities the agent no longer needs (agent/privileges.py), as a part: it runs
right after the socket LB is attached and before any part starts a thread of its own
(capabilities are per thread)."""
from __future__ import annotations

from .base import Component, Context


class Privileges(Component):
    name = "privileges"

    def __init__(self) -> None:
        self.dropped: dict = {}

    def start(self, ctx: Context) -> None:
        from ..privileges import drop

        self.dropped = drop()

    def status(self, st) -> None:
        st.privileges = self.dropped
