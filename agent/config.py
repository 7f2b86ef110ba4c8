"""One typed configuration for the agent: a YAML file, NODEWIRE_* environment variables and flags, in
that order of precedence (a flag beats the environment, which beats the file), validated at start-up
with errors naming the key and where its value came from.

Every key is one field of AgentConfig below; its file key, environment variable and flag derive
from the field: `max_series` is `max-series:` in the file, NODEWIRE_MAX_SERIES, and --max-series.
Adding a key is adding one `key(...)` field (and, when it has rules, a line in `check_values`):

    zone: str | None = key(None, "This node's topology zone [default: the Node's label].")
"""
from __future__ import annotations

import difflib
import ipaddress
import os
import re
from dataclasses import MISSING, dataclass, field, fields, replace
from typing import Any, Mapping

from .mapsizes import MapSizes
from .paths import state_dir_for

DEFAULT_PIN_DIR = "/sys/fs/bpf/nodewire"
DEFAULT_CONFIG_FILE = "/etc/nodewire/config.yaml"
# Not Hubble's 9965 (nor Cilium's agent/operator/envoy 9962-9964): the next port up.
DEFAULT_METRICS_PORT = 9966
ENV_PREFIX = "NODEWIRE_"
LOG_LEVELS = ("debug", "info", "warning", "error")


def key(default: Any = None, help: str = "", *, kind: str | None = None, name: str | None = None,
        choices: tuple[str, ...] = (), factory=None, command: str = "run"):
    """A config key. kind: str | int | float | bool | list | mapsizes (derived from the default when
    omitted); name: its file key/flag when not the field's name in kebab case; command: which
    command's flags it appears on ("" for file and environment only)."""
    if kind is None:
        kind = {bool: "bool", int: "int", float: "float"}.get(type(default), "str")
    meta = {"help": help, "kind": kind, "name": name, "choices": choices, "command": command}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


class ConfigError(ValueError):
    def __init__(self, key_name: str, source: str, message: str):
        shown = key_name if key_name and key_name.isprintable() and " " not in key_name else repr(key_name)
        super().__init__(f"config key {shown} ({source}): {message}")  # '' or 'a b' shown quoted (fuzzer)
        self.key, self.source, self.message = key_name, source, message


@dataclass
class AgentConfig:
    manifests: str | None = key(None, "Directory of Service/EndpointSlice/Pod manifests (watched).")
    kube: bool = key(False, "List+watch the Kubernetes API [default when in a pod and no manifests].")
    kubeconfig: str | None = key(None, "kubeconfig file for kube [default: $KUBECONFIG, else in-cluster].")
    api_server: str | None = key(None, "API server URL, e.g. https://10.0.0.1:6443 (kube-proxy replacement: "
                                       "the `kubernetes` ClusterIP is served by nodewire itself).")
    cgroup: str | None = key(None, "cgroup v2 directory to attach to [default: the node's cgroup v2 root].")
    pin_dir: str = key(DEFAULT_PIN_DIR, "bpffs directory where nodewire pins its maps.")
    metrics_addr: str = key(f":{DEFAULT_METRICS_PORT}", "HOST:PORT of /metrics, /healthz, /readyz (\"\" turns it off).")
    sizes: MapSizes = key(None, "Map capacity, MAP=N (maps: services, backends, revnat, lb_stats, ct, ct_halfopen).",
                          kind="mapsizes", name="map-size", factory=MapSizes)
    poll_interval: float = key(0.2, "Seconds between manifest directory polls.", command="")
    node_name: str = key(None, "This node's name [default: $NODE_NAME or the hostname].",
                         factory=lambda: os.environ.get("NODE_NAME") or os.uname().nodename)
    zone: str = key("", "This node's zone for topology hints [default: its Node object's "
                        "topology.kubernetes.io/zone label].")
    observe: bool = key(True, "Per-pod network observability.")
    veth_netns: str | None = key(None, "Network namespace holding the pods' node-side veths [default: the agent's].")
    max_series: int = key(10000, "Cap on per-pod/peer series the observer exports.")
    aggregate_by: str = key("pod", "Name peers and Service backends by pod, or by workload (bounded under IP "
                                   "churn).", choices=("pod", "workload"))
    pod_tc: bool = key(False, "Count pod traffic with a tc program on each veth (adds per-segment counts of "
                              "GSO frames) instead of the veth's own counters.")
    tcp_probe: bool = key(False, "Smoothed RTT at every ACK from tcp:tcp_probe (a program per ACK).")
    peer_cidrs: tuple[str, ...] = key((), "Label unknown remote peers by these CIDRs [default: the private ranges].",
                                      kind="list", name="peer-cidr")
    rdma: bool = key(True, "RDMA port counters and GPU↔NIC topology metrics (sysfs, read at scrape time).")
    rdma_trace: bool = key(False, "Verbs latency tracing for pods annotated nodewire.io/rdma-trace=\"true\".")
    devices: tuple[str, ...] = key((), "Serve NodePort, externalIPs and LoadBalancer IPs (tc) on these node "
                                       "devices; 'auto': every interface with a node address or a default "
                                       "route [default: off].", kind="list")
    nodeport_range: str = key("30000-32767", "NodePort range LO-HI (as kube-apiserver's --service-node-port-range).")
    maglev_table_size: int = key(16381, "Maglev lookup table size per Service port (a prime).")
    healthz_port: int = key(10256, "kube-proxy's node /healthz port, served with devices (0: off).")
    # north-south conntrack lifetimes by state (bpf/lib/ct.h; defaults: conntrack.Lifetimes, Cilium's)
    ct_timeout_syn: float = key(60.0, "Seconds a TCP flow whose handshake is not complete lives idle.")
    ct_timeout_established: float = key(21600.0, "Seconds an established TCP flow lives idle.")
    ct_timeout_close: float = key(10.0, "Seconds a TCP flow lives idle after a FIN or RST.")
    ct_timeout_other: float = key(60.0, "Seconds a UDP flow lives idle.")
    ct_gc_interval: float = key(30.0, "Longest time between two conntrack collections (shorter as the maps fill).")
    netns_dir: str = key("/var/run/netns", "Where pods' network namespaces are mounted (recovery of pods "
                                           "that started before the agent).")
    api_socket: str | None = key(None, "The agent's unix-socket API [default: api.sock in the state dir].")
    check_interval: float = key(30.0, "Seconds between the agent's own drift checks of a sample of Services "
                                      "(0 turns them off; `nodewire check` checks everything).")
    check_sample: int = key(512, "Services sampled by each of the agent's drift checks.")
    log_level: str = key("info", "Log level.", choices=LOG_LEVELS, command="")
    # Read by `nodewire cni install` (the DaemonSet's init container), so one file configures both.
    cni_bin_dir: str = key("/opt/cni/bin", "Where the runtime finds CNI plugins.", command="cni")
    cni_conf_dir: str = key("/etc/cni/net.d", "The node's CNI network configurations.", command="cni")
    cni_fail_open: bool = key(True, "ADD passes through (with a warning) while the agent is down.", command="cni")
    cni_log_file: str | None = key(None, "nodewire-cni's log file [default: stderr, which the runtime logs].",
                                   command="cni")

    @property
    def state_dir(self) -> str:
        return state_dir_for(self.pin_dir)

    @property
    def device_list(self) -> tuple[str, ...]:
        return tuple(d.strip() for item in self.devices for d in item.split(",") if d.strip())

    @property
    def nodeport_bounds(self) -> tuple[int, int]:
        lo, _, hi = self.nodeport_range.partition("-")
        return int(lo), int(hi)

    @property
    def api_socket_path(self) -> str:
        return self.api_socket or os.path.join(self.state_dir, "api.sock")

    def validate(self) -> None:
        """Everything, including what the host must have (directories, netns)."""
        check_values(self)
        self._check_host()

    def _check_host(self) -> None:
        err = lambda k, m: ConfigError(k, _source(self, k), m)  # noqa: E731
        if self.manifests is not None and not os.path.isdir(self.manifests):
            raise err("manifests", f"{self.manifests} is not a directory")
        if self.cgroup is not None and not os.path.isfile(os.path.join(self.cgroup, "cgroup.procs")):
            raise err("cgroup", f"{self.cgroup} is not a cgroup v2 directory")
        if self.veth_netns is not None and not os.path.exists(
                self.veth_netns if "/" in self.veth_netns else f"/var/run/netns/{self.veth_netns}"):
            raise err("veth-netns", f"network namespace {self.veth_netns} not found")


# -- the table -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Key:
    attr: str       # AgentConfig field
    name: str       # file key and flag (without --)
    kind: str
    help: str
    default: Any
    choices: tuple[str, ...]
    command: str

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.name.upper().replace("-", "_")


def keys() -> dict[str, Key]:
    """Every config key by its file/flag name."""
    out = {}
    for f in fields(AgentConfig):
        m = f.metadata
        default = f.default if f.default is not MISSING else None
        name = m["name"] or f.name.replace("_", "-")
        out[name] = Key(f.name, name, m["kind"], m["help"], default, m["choices"], m["command"])
    return out


# -- reading values --------------------------------------------------------------------------------
_TRUE, _FALSE = {"true", "yes", "on", "1"}, {"false", "no", "off", "0"}


def coerce(k: Key, value: Any, source: str) -> Any:
    """A value from YAML (typed) or the environment (text) → the key's type."""
    bad = lambda what: ConfigError(k.name, source, f"{value!r} is not {what}")  # noqa: E731
    if value is None:  # `key:` with no value in YAML; only keys whose default is None may be null
        if k.default is None and k.kind not in ("list", "mapsizes"):
            return None
        raise ConfigError(k.name, source, f"null is not allowed (default: {k.default!r})")
    if k.kind == "bool":
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
        raise bad("a boolean (true/false)")
    if k.kind in ("int", "float"):
        if isinstance(value, bool):
            raise bad(f"a number ({k.kind})")
        try:
            number = int(value) if k.kind == "int" else float(value)
        except (TypeError, ValueError, OverflowError):
            raise bad(f"a number ({k.kind})") from None
        if number != number or number in (float("inf"), float("-inf")):  # nan / inf (the fuzzer)
            raise bad("a finite number")
        return number
    if k.kind == "list":
        items = value.split(",") if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)) or not all(isinstance(i, str) for i in items):
            raise bad("a list of strings")
        return tuple(i.strip() for i in items if i.strip())
    if k.kind == "mapsizes":
        return _map_sizes(k, value, source)
    if not isinstance(value, str):
        raise bad("a string")
    if k.choices and value not in k.choices:
        raise ConfigError(k.name, source, f"{value!r} is not one of {', '.join(k.choices)}")
    return value


def _map_sizes(k: Key, value: Any, source: str) -> MapSizes:
    """{services: N, ...} in the file; "services=N,backends=M" (or a list of MAP=N) elsewhere."""
    if isinstance(value, str):
        value = [v for v in value.split(",") if v.strip()]
    if isinstance(value, (list, tuple)):
        pairs = {}
        for item in value:
            name, sep, n = str(item).partition("=")
            if not sep or not n.strip().isdigit():
                raise ConfigError(k.name, source, f"{item!r}: expected MAP=N")
            pairs[name.strip()] = int(n)
        value = pairs
    if not isinstance(value, dict):
        raise ConfigError(k.name, source, f"{value!r}: expected a mapping of map name to capacity")
    known = set(MapSizes.__dataclass_fields__)
    for name, n in value.items():
        if name not in known:
            raise ConfigError(k.name, source, f"unknown map {name!r} (maps: {', '.join(sorted(known))})")
        if isinstance(n, bool) or not isinstance(n, int):
            raise ConfigError(k.name, source, f"{name}: {n!r} is not an integer")
    return replace(MapSizes(), **value)


def _unknown(name: str, source: str) -> ConfigError:
    close = difflib.get_close_matches(name, list(keys()), n=1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    return ConfigError(name, source, f"unknown key{hint}")


def read_file(path: str) -> dict[str, Any]:
    """The file's keys, checked against the table (an unknown key is an error naming it)."""
    import yaml

    try:
        with open(path) as f:
            data = yaml.load(f, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    except yaml.YAMLError as e:
        raise ConfigError("-", f"file {path}", f"not YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError("-", f"file {path}", "the config file is a mapping of key: value")
    table = keys()
    out = {}
    for name, value in data.items():
        if name not in table:
            raise _unknown(str(name), f"file {path}")
        out[name] = coerce(table[name], value, f"file {path}")
    return out


def read_env(env: Mapping[str, str]) -> dict[str, Any]:
    table = keys()
    out = {}
    by_env = {k.env: k for k in table.values()}
    for var, value in env.items():
        if not var.startswith(ENV_PREFIX) or var == ENV_PREFIX + "CONFIG":
            continue
        if var not in by_env:
            if var in ("NODEWIRE_BPF_DIR",):  # read by the loader itself, not a key
                continue
            raise _unknown(var[len(ENV_PREFIX):].lower().replace("_", "-"), f"env {var}")
        out[by_env[var].name] = coerce(by_env[var], value, f"env {var}")
    return out


def load(path: str | None = DEFAULT_CONFIG_FILE, flags: Mapping[str, Any] | None = None,
         env: Mapping[str, str] = os.environ, path_required: bool = False) -> AgentConfig:
    """defaults < file < NODEWIRE_* < flags (flags keyed by file/flag name, only those given)."""
    layers: list[tuple[str, dict]] = []
    if path and (path_required or os.path.exists(path)):
        if not os.path.isfile(path):
            raise ConfigError("config", "flag --config", f"{path} does not exist")
        layers.append((f"file {path}", read_file(path)))
    layers.append(("env", read_env(env)))
    table = keys()
    given = {}
    for name, value in (flags or {}).items():
        if name not in table:
            raise _unknown(name, "flag")
        given[name] = coerce(table[name], value, f"flag --{name}")
    layers.append(("flag", given))
    values, sources = {}, {}
    for source, layer in layers:
        for name, value in layer.items():
            values[table[name].attr] = value
            sources[name] = f"env {table[name].env}" if source == "env" else (
                f"flag --{name}" if source == "flag" else source)
    cfg = AgentConfig(**values)
    cfg._sources = sources  # for error messages: where each key's value came from
    return cfg


def _source(cfg: AgentConfig, name: str) -> str:
    return getattr(cfg, "_sources", {}).get(name, "default")


def check_values(cfg: AgentConfig) -> None:
    """The rules that need no host: ranges, formats, keys that exclude each other."""
    err = lambda k, m: ConfigError(k, _source(cfg, k), m)  # noqa: E731
    if cfg.kube and cfg.manifests is not None:
        raise err("manifests", "manifests and kube are two sources of the same objects: pass one")
    if cfg.max_series < 1:
        raise err("max-series", f"{cfg.max_series} must be at least 1")
    if cfg.poll_interval <= 0:
        raise err("poll-interval", f"{cfg.poll_interval} must be above 0")
    for c in cfg.peer_cidrs:
        try:
            ipaddress.ip_network(c, strict=False)
        except ValueError as e:
            raise err("peer-cidr", f"{c!r}: {e}") from None
    if not cfg.pin_dir.startswith("/sys/fs/bpf"):
        raise err("pin-dir", f"{cfg.pin_dir} must be under /sys/fs/bpf (a bpffs mount)")
    if cfg.metrics_addr:
        _check_addr(cfg.metrics_addr, err)
    if cfg.api_server is not None and not re.match(r"^https?://[^/\s]+", cfg.api_server):
        raise err("api-server", f"{cfg.api_server!r} is not an http(s) URL")
    _check_northsouth(cfg, err)
    for name in ("services", "backends", "revnat", "lb_stats", "ct", "ct_halfopen"):
        v = getattr(cfg.sizes, name)
        if not 1 <= v <= 1 << 26:
            raise err("map-size", f"{name}: {v} out of range (1..{1 << 26})")


def _check_northsouth(cfg: AgentConfig, err) -> None:
    lo, sep, hi = cfg.nodeport_range.partition("-")
    if not sep or not lo.strip().isdigit() or not hi.strip().isdigit():
        raise err("nodeport-range", f"{cfg.nodeport_range!r} is not LO-HI, e.g. 30000-32767")
    if not 1 <= int(lo) <= int(hi) < 61000:
        raise err("nodeport-range", f"{cfg.nodeport_range} must lie within 1-60999 "
                                    "(61000-65535 are the north-south SNAT ports)")
    from .model.maglev import is_prime
    if not is_prime(cfg.maglev_table_size) or not 3 <= cfg.maglev_table_size <= 1 << 20:
        raise err("maglev-table-size", f"{cfg.maglev_table_size} is not a prime in 3..{1 << 20} (e.g. 16381)")
    if not 0 <= cfg.healthz_port <= 65535:
        raise err("healthz-port", f"{cfg.healthz_port} out of range (0-65535)")
    if "auto" in cfg.device_list and len(cfg.device_list) > 1:
        raise err("devices", "'auto' or a list of devices, not both")
    for name in ("ct_timeout_syn", "ct_timeout_established", "ct_timeout_close", "ct_timeout_other"):
        if not 0 < getattr(cfg, name) <= 30 * 86400:
            raise err(name.replace("_", "-"), f"{getattr(cfg, name)} must be in (0, {30 * 86400}] seconds")
    if not 0 < cfg.ct_gc_interval <= 86400:
        raise err("ct-gc-interval", f"{cfg.ct_gc_interval} must be in (0, 86400] seconds")


def _check_addr(addr: str, err) -> None:
    host, sep, port = addr.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise err("metrics-addr", f"{addr!r} is not HOST:PORT (port 0..65535)")
    host = host.strip("[]")
    if host and host != "localhost":
        try:
            ipaddress.ip_address(host)
        except ValueError:
            raise err("metrics-addr", f"{addr!r}: host {host!r} is not an address") from None


def as_file(cfg: AgentConfig) -> dict[str, Any]:
    """The config as file keys (what `nodewire config view` prints; read back by read_file)."""
    out = {}
    for k in keys().values():
        v = getattr(cfg, k.attr)
        if isinstance(v, MapSizes):
            v = {n: getattr(v, n) for n in MapSizes.__dataclass_fields__}
        elif isinstance(v, tuple):
            v = list(v)
        out[k.name] = v
    return out
