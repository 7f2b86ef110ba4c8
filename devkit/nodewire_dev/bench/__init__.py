"""Benchmarks of nodewire against kube-proxy's iptables and nftables rule layouts.

Everything runs in a Sandbox (network-namespace pods, no uplink): one client pod, a few backend
pods, and N Services that are written in each mode's own form from one Service list
(`services.py`). Results are always reported next to "direct" (connecting straight to a backend)
measured in the same run, because the machines are shared and noisy.
"""
