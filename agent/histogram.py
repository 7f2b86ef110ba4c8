"""The one histogram helper of nodewire: kernel log2 slots → OTel histograms, and their quantiles.

bpf/lib/hist.h counts a value v in slot s when 2^(s-1) < v <= 2^s (slot 0: v <= 1): upper-inclusive,
the same convention as OTel's explicit bucket boundaries. So slot s becomes the bucket whose upper
bound is 2^s (in the kernel's unit), and the kernel's counts pass through unchanged — no midpoint
guessing, no averages. The last kernel slot (a catch-all) becomes OTel's +Inf bucket.

The same slots are exactly an OTel base-2 exponential histogram of scale 0 in the kernel's unit:
bucket index i covers (2^i, 2^(i+1)], so slot s is index s-1 (slot 0, v <= 1, is index -1 for the
integer values the kernel records, v = 1; v = 0 is rare and lands there too).

HIST_SLOTS is defined here only and handed to every C program as -DNW_HIST_SLOTS (hist_cflags()).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Sequence

HIST_SLOTS = 28  # bounds up to 2^26 µs = 67 s (a connect gives up after ~127 s), then +Inf


def hist_cflags() -> list[str]:
    """The -D flags a program including bpf/lib/hist.h is compiled with."""
    return [f"-DNW_HIST_SLOTS={HIST_SLOTS}"]


def slot_of(value: int) -> int:
    """The slot the kernel puts an integer value in (mirror of nw_hist_slot, for tests and views)."""
    if value <= 1:
        return 0
    return min((value - 1).bit_length(), HIST_SLOTS - 1)


def bounds(scale: float = 1.0) -> tuple[float, ...]:
    """Upper bounds of slots 0..HIST_SLOTS-2 in the export unit (scale = export unit per kernel unit;
    1e-6 for µs → s). Slot HIST_SLOTS-1 is the +Inf bucket."""
    return tuple((1 << s) * scale for s in range(HIST_SLOTS - 1))


def bucket_quantile(buckets: Iterable[tuple[float, float]], q: float) -> float | None:
    """Upper bound of the bucket holding the q-quantile of (upper bound, count in that bucket)
    pairs in ascending order — exact to the bucket, which is all a bucketed histogram knows.
    None when the buckets are empty. The one quantile function of the project."""
    buckets = list(buckets)
    total = sum(n for _, n in buckets)
    if total <= 0:
        return None
    seen = 0.0
    for le, n in buckets:
        seen += n
        if n > 0 and seen >= q * total:
            return le
    return buckets[-1][0]


def slot_quantile(counts: Sequence[int], q: float) -> int:
    """bucket_quantile over kernel slots: the q-quantile's slot bound 2^s (kernel unit); 0 when empty."""
    v = bucket_quantile(((1 << s, c) for s, c in enumerate(counts)), q)
    return 0 if v is None else int(v)


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
        self.add_counts(other.counts, other.total)

    @property
    def count(self) -> int:
        return sum(self.counts)

    def quantile(self, q: float) -> float:
        """Upper bound (kernel unit) of the bucket holding the q-quantile; 0 when empty."""
        return float(slot_quantile(self.counts, q))

    def exponential(self) -> tuple[int, list[int], int]:
        """(offset, bucket counts, zero count) of the scale-0 exponential histogram with the same
        buckets: index s-1 for slot s, trimmed to the used range (the catch-all slot included)."""
        used = [s for s, c in enumerate(self.counts) if c]
        if not used:
            return 0, [], 0
        lo, hi = used[0], used[-1]
        return lo - 1, list(self.counts[lo:hi + 1]), 0
