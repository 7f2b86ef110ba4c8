"""The pure core: typed Kubernetes objects and the functions that turn them into datapath entries.

Nothing in this package does I/O, so it is tested without root in microseconds.
"""
