"""Kernel log2 histograms as OTel explicit-bucket histograms, bucket for bucket.

bpf/lib/obs.h counts a value v in slot s when 2^(s-1) < v <= 2^s (slot 0: v <= 1): upper-inclusive,
the same convention as OTel's explicit bucket boundaries. So slot s becomes the bucket whose upper
bound is 2^s (in the kernel's unit), and the kernel's counts pass through unchanged — no midpoint
guessing, no averages. The last kernel slot (a catch-all) becomes OTel's +Inf bucket.
"""
from __future__ import annotations

from dataclasses import dataclass, field

HIST_SLOTS = 28      # NW_HIST_SLOTS in bpf/lib/obs.h


def slot_of(value: int) -> int:
    """The slot the kernel puts an integer value in (mirror of nw_hist_slot, for tests and views)."""
    if value <= 1:
        return 0
    return min((value - 1).bit_length(), HIST_SLOTS - 1)


def bounds(scale: float = 1.0) -> tuple[float, ...]:
    """Upper bounds of slots 0..HIST_SLOTS-2 in the export unit (scale = export unit per kernel unit;
    1e-6 for µs → s). Slot HIST_SLOTS-1 is the +Inf bucket."""
    return tuple((1 << s) * scale for s in range(HIST_SLOTS - 1))


@dataclass
class Log2Histogram:
    """One kernel histogram: per-slot counts and the sum of the recorded values (kernel unit)."""

    counts: list[int] = field(default_factory=lambda: [0] * HIST_SLOTS)
    total: int = 0

    def add_slot(self, slot: int, n: int) -> None:
        if 0 <= slot < HIST_SLOTS:
            self.counts[slot] += n

    def add_counts(self, counts, total: int) -> None:
        """Add a kernel histogram (per-slot counts, sum) to this one."""
        for i, n in enumerate(counts.tolist() if hasattr(counts, "tolist") else counts):
            if n:
                self.counts[i] += n
        self.total += int(total)

    def merge(self, other: "Log2Histogram") -> None:
        for i, n in enumerate(other.counts):
            self.counts[i] += n
        self.total += other.total

    @property
    def count(self) -> int:
        return sum(self.counts)

    def quantile(self, q: float) -> float:
        """Upper bound (kernel unit) of the bucket holding the q-quantile; 0 when empty."""
        n = self.count
        if n == 0:
            return 0.0
        rank, seen = q * n, 0
        for s, c in enumerate(self.counts):
            seen += c
            if seen >= rank and c:
                return float(1 << s)
        return float(1 << (HIST_SLOTS - 1))
