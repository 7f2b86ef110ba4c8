"""Where the agent keeps its files for a pin dir: one rule every command and module shares."""
from __future__ import annotations

import os
import re


def state_dir_for(pin_dir: str) -> str:
    """Where the agent writes status.json for a given pin dir (bpffs holds only pins, not files).
    Every command that takes --pin-dir finds the agent's status this way."""
    return os.path.join("/run/nodewire", re.sub(r"[^A-Za-z0-9_.-]", "_", pin_dir.strip("/")) or "root")
