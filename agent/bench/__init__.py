"""Benchmarks run in the sandbox: `nodewire bench ...`. Figures are reported, never asserted."""
