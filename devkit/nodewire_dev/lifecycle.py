"""One context-manager shape for the devkit's set-ups (sandbox, multi-node sandbox, containerd): a failed
up() still closes what it had made, and close() runs on every exit, so a test never leaks namespaces,
cgroups or processes."""
from __future__ import annotations


class SetUp:
    def up(self) -> object:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self):
        try:
            self.up()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()
