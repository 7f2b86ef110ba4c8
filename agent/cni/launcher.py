"""`nodewire-cni` as a console script (what pip makes of the entry point): a thin wrapper that runs
the static plugin the package carries, so a path users' scripts call keeps working with the one
implementation. scripts/install.sh replaces .venv/bin/nodewire-cni with a link to the binary itself
(no interpreter start); the CNI bin dir gets a copy of the binary (`nodewire cni install`)."""
from __future__ import annotations

import os
import subprocess
import sys

BINARY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bin", "nodewire-cni")  # = build.BINARY


def main() -> None:
    """Run the plugin with our argv, environment (CNI_*) and stdio; exit with its code. (A child, not
    os.execv: the agent package runs no exec*; see tests/test_security.py.)"""
    try:
        sys.exit(subprocess.run([BINARY, *sys.argv[1:]], check=False).returncode)
    except OSError as e:  # not built: answer as the plugin would, with a CNI error
        import json
        print(json.dumps({"cniVersion": "1.1.0", "code": 5,
                          "msg": f"nodewire-cni: {BINARY}: {e.strerror} (build it: python -m agent.cni.build)"}))
        sys.exit(1)
