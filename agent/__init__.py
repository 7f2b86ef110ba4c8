"""nodewire: a Kubernetes node agent with BPF socket load balancing and per-pod network telemetry."""
