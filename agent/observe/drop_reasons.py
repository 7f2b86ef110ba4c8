"""Names of the kernel's skb drop reasons, read from the running kernel's tracepoint format.

The numbers of `enum skb_drop_reason` change between kernel versions (this 6.18 kernel has ~128),
so they are never taken from headers: `skb:kfree_skb`'s format file lists them in its
`__print_symbolic(REC->reason, { 2, "NOT_SPECIFIED" }, ...)` clause.
"""
from __future__ import annotations

import re

FORMAT_PATH = "/sys/kernel/tracing/events/skb/kfree_skb/format"
_SYMBOLIC = re.compile(r"__print_symbolic\(REC->reason,(.*?)\)\s*$", re.S)
_PAIR = re.compile(r'\{\s*(\d+)\s*,\s*"([^"]+)"\s*\}')


def parse_drop_reasons(format_text: str) -> dict[int, str]:
    m = _SYMBOLIC.search(format_text)
    if not m:
        return {}
    return {int(n): name for n, name in _PAIR.findall(m.group(1))}


def load_drop_reasons(path: str = FORMAT_PATH) -> dict[int, str]:
    """{} when the tracepoint or its format is missing (reasons are then exported as numbers)."""
    try:
        with open(path) as f:
            return parse_drop_reasons(f.read())
    except OSError:
        return {}


def reason_name(reasons: dict[int, str], number: int) -> str:
    return reasons.get(number, f"REASON_{number}")
