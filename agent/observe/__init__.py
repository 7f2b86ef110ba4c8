"""Per-pod network observability: kernel counters and histograms → pod identities → OTel metrics."""
