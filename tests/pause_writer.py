"""Run `nodewire` with the map writer pausing for good between two write phases (tests/test_faults.py).

    python tests/pause_writer.py ARM:PHASE:MARKER NODEWIRE-ARGV...

The first write that starts while the file ARM exists stops after its PHASE-th phase (1-based), once
MARKER is written: a SIGKILL then lands between two phases, deterministically, however the source
delivered the objects. The hook is injected here, around the datapath's calls of the writer; the
agent's own modules carry none. AgentProcess(prefix=[sys.executable, this file, spec]) runs it: the
argument after the spec is the nodewire script's path, which is dropped.
"""
from __future__ import annotations

import os
import sys
import time


def install(spec: str) -> None:
    from agent.datapath import datapath, reconciler

    arm, phase, marker = spec.split(":", 2)
    stop_after, write = int(phase), datapath.write

    def paused_write(phases, maps, *args, **kw):
        if not os.path.exists(arm):
            return write(phases, maps, *args, **kw)

        def one_by_one():  # the writer asks for phase n+1 only once phase n is written
            for n, ph in enumerate(phases, 1):
                yield ph
                if n == stop_after:
                    with open(marker + ".tmp", "w") as f:
                        f.write(f"paused after phase {n} ({ph.name}, {len(ph)} rows)\n")
                    os.rename(marker + ".tmp", marker)  # whole when it appears
                    while True:
                        time.sleep(3600)

        return write(one_by_one(), maps, *args, **kw)

    datapath.write = reconciler.write = paused_write  # the one writer's callers (a large full sync: reconciler's)


if __name__ == "__main__":
    install(sys.argv[1])
    from agent.cli import main

    main(sys.argv[3:], prog_name="nodewire")
