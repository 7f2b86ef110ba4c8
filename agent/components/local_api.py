"""The agent's unix-socket API (agent/api.py). The server object exists before any part starts, so
parts register their methods in start(); this part opens the socket, after the privilege drop."""
from __future__ import annotations

from .base import Component, Context


class LocalApi(Component):
    name = "local_api"

    def __init__(self) -> None:
        self.server = None

    def start(self, ctx: Context) -> None:
        self.server = ctx.api.start()

    def close(self) -> None:
        if self.server is not None:
            self.server.close()
