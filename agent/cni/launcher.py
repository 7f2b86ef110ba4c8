"""`nodewire-cni` as a console script (.venv/bin/nodewire-cni, the image's /usr/local/bin/nodewire-cni):
a thin wrapper that execs the static plugin the package carries, so scripts that call that path keep
working with the one implementation. The CNI bin dir gets the binary itself (`nodewire cni install`)."""
from __future__ import annotations

import json
import os
import sys

from .build import BINARY


def main() -> None:
    path = str(BINARY)
    try:
        os.execv(path, [path, *sys.argv[1:]])
    except OSError as e:  # not built: answer as the plugin would, with a CNI error
        print(json.dumps({"cniVersion": "1.1.0", "code": 5,
                          "msg": f"nodewire-cni: {path}: {e.strerror} (build it: python -m agent.cni.build)"}))
        sys.exit(1)
