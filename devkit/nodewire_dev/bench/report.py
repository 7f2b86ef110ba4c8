"""Results → bench/results/: results.json (every row), results.md (the table), results.png (chart)."""
from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path


def machine() -> dict:
    cpu = ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "")
    except OSError:
        pass
    return {"kernel": platform.release(), "cpu": cpu, "cores": os.cpu_count(),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def _fmt(v, unit: str = "", nd: int = 1) -> str:
    if v is None or v == "":
        return "–"
    if isinstance(v, str):
        return f"{v} {unit}".strip()
    return f"{v:.{nd}f}{(' ' + unit) if unit else ''}"


def _vs(row: dict, key: str, direct_key: str, ratio_key: str, nd: int = 1) -> str:
    """"mode / direct = ratio×", or "–" when the mode has no figure."""
    v, d, x = row.get(key), row.get(direct_key), row.get(ratio_key)
    if not isinstance(v, (int, float)):
        return "–"
    return f"{v:.{nd}f} / {d:.{nd}f} = **{x:.2f}×**" if isinstance(x, (int, float)) else _fmt(v, nd=nd)


def _memory(row: dict) -> str:
    parts = []
    if row.get("agent_rss_mib") is not None:
        parts.append(f"RSS {row['agent_rss_mib']:.0f} MiB")
    if row.get("bpf_memlock_mib") is not None:
        parts.append(f"maps {row['bpf_memlock_mib']:.1f} MiB")
    if row.get("kernel_mem_mib") is not None:
        parts.append(f"kernel {row['kernel_mem_mib']:.1f} MiB")
    if row.get("rules") is not None:
        parts.append(f"{row['rules']} rules")
    return ", ".join(parts) or "–"


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [
        f"# nodewire bench compare — {meta['date']}",
        "",
        f"Machine: {meta['cores']} cores, {meta['cpu']}, Linux {meta['kernel']}. "
        f"Settings: {meta.get('settings', '')}.",
        "",
        "Connect latency is the time of one TCP connect() from the client pod (p50 / p99, µs), shown as",
        "*mode / direct = ratio*: direct connects straight to the same backend pods from a second pod with",
        "no rules and outside nodewire's cgroup, in rounds alternating with the mode's, so both see the",
        "same noise. *last* dials the last-added Service, *random* a random one per connect.",
        "req/s: one short request/response per new connection, one client thread. Full sync: N Services",
        "written from nothing (iptables-restore / nft -f wall time and CPU; nodewire: the agent's own",
        "reported full-sync time, i.e. model + batched map writes; *ready* is agent start → first sync",
        "done, including BCC compile and parsing the manifests). Sync CPU: CPU seconds of the loader",
        "process (for nodewire: of the agent from start to ready). Change: one endpoint of the last",
        "Service replaced (iptables: the partial-sync restore kube-proxy writes; nftables: the minimal",
        "transaction; nodewire: the agent's reported sync, *e2e* = manifest file written → a client",
        "looping connects through the VIP reaches the new endpoint, including the 0.2 s poll).",
        "Memory: kernel = kernel memory charged to the loader's memory cgroup (the rules, chains and",
        "set elements it created); maps = bpftool memlock of nodewire's pinned",
        "maps (sized by capacity, not fill); RSS = agent resident memory after the first sync.",
        "`> cap` marks a load that did not finish (or, extrapolated from the previous N, could not)",
        "within the cap.",
        "",
        "| mode | N | E | connect p50, last Service | p99 last | p50, random Service | req/s | full sync | sync CPU | change | memory | status |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- |",
    ]
    for r in rows:
        if r["mode"] == "direct":
            continue  # direct's figures are in each row, next to the mode's
        lines.append("| " + " | ".join([
            r["mode"], str(r["services"]), str(r["endpoints"]),
            _vs(r, "lat_last_p50_us", "direct_last_p50_us", "lat_last_p50_x"),
            _fmt(r.get("lat_last_p99_us")),
            _vs(r, "lat_rand_p50_us", "direct_rand_p50_us", "lat_rand_p50_x"),
            _vs(r, "rps", "direct_rps", "rps_x", nd=0),
            _fmt(r.get("sync_s"), "s", 2) + (f" (ready {r['ready_s']:.1f} s)" if r.get("ready_s") else ""),
            _fmt(r.get("sync_cpu_s"), "s", 2),
            _fmt(r.get("change_ms"), "ms", 1)
            + (f" (e2e {r['change_e2e_ms']:.0f} ms)" if isinstance(r.get("change_e2e_ms"), (int, float)) else ""),
            _memory(r),
            str(r.get("status", "")).replace("|", "/"),
        ]) + " |")
    return "\n".join(lines) + "\n"


def chart(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    series: dict[tuple[str, int], list[dict]] = {}
    for r in rows:
        if r["mode"] != "direct" and r.get("status") == "ok":
            series.setdefault((r["mode"], r["endpoints"]), []).append(r)
    for (mode, e), rs in sorted(series.items()):
        rs = sorted(rs, key=lambda r: r["services"])
        ns = [r["services"] for r in rs]
        lat = [r.get("lat_last_p50_x") for r in rs]
        if any(v is not None for v in lat):
            ax1.plot(ns, lat, marker="o", label=f"{mode}, {e} ep")
        sync = [r.get("sync_s") if isinstance(r.get("sync_s"), (int, float)) else None for r in rs]
        if any(v is not None for v in sync):
            ax2.plot(ns, sync, marker="o", label=f"{mode}, {e} ep")
    ax1.set(xscale="log", yscale="log", xlabel="Services", ylabel="connect p50, last Service (× direct)",
            title="Connect latency vs Services")
    ax1.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax2.set(xscale="log", yscale="log", xlabel="Services", ylabel="seconds", title="Full sync time vs Services")
    capped = [f"{r['mode']} N={r['services']:,} E={r['endpoints']}" for r in rows
              if str(r.get("status", "")).startswith("> cap")]
    if capped:
        ax2.text(0.02, 0.98, "did not finish within the cap:\n" + "\n".join(capped), transform=ax2.transAxes,
                 va="top", fontsize=7, color="dimgrey")
    for ax in (ax1, ax2):
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(rows: list[dict], out_dir: str | os.PathLike, settings: dict) -> dict[str, Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    meta = {**machine(), "settings": ", ".join(f"{k}={v}" for k, v in settings.items())}
    paths = {"json": out / "results.json", "md": out / "results.md", "png": out / "results.png"}
    paths["json"].write_text(json.dumps({"machine": meta, "settings": settings, "rows": rows}, indent=1) + "\n")
    paths["md"].write_text(markdown(rows, meta))
    chart(rows, paths["png"])
    return paths
