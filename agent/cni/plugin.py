#!/usr/bin/python3 -IS
"""nodewire-cni: a chained CNI plugin (CNI spec 1.1.0; configs of 0.4.0, 1.0.0 and 1.1.0).

It runs after the node's primary plugin (bridge, flannel, Calico, …) and changes nothing on the pod's
network: ADD tells the nodewire agent who the pod is (container id, netns, interface, the IPs and
interfaces of prevResult, K8S_POD_* from CNI_ARGS) and prints prevResult unchanged as its own result.
The agent then names the pod's traffic and starts per-pod observation; DEL stops it.

One file, standard library only, no import from the agent: the container runtime starts it for every
pod, so start-up cost is the budget (`python3 -IS` skips site-packages). `nodewire cni install` puts
this file, compiled, under the CNI bin dir with a launcher named nodewire-cni. Keys of its entry in the conflist:

    {"type": "nodewire-cni", "socket": "/run/nodewire/…/api.sock", "failOpen": true,
     "timeout": 5, "logFile": "/var/log/nodewire-cni.log"}

failOpen (default true): when the agent cannot be reached, ADD and CHECK succeed with a logged
warning (the pod's network works without nodewire; the agent recovers the pod when it starts).
With failOpen false they fail with code 11 (try again later). DEL and GC always succeed.
"""
from __future__ import annotations

import os
import sys

# Start-up is the budget, and on a 2-core node under load `import json` and `import socket` cost
# 20-25 ms each (measured: both pull in `re` and `enum`), more than the rest of an ADD. Their C halves
# (_json, _socket) do the same work without those imports; the pure modules are the fallback.
try:
    import _json
    import _socket as socket
except ImportError:  # another interpreter: the ordinary modules
    _json = None
    import socket


class _DecoderSettings:
    """The attributes _json.make_scanner reads from a json.JSONDecoder, with its defaults."""
    strict = True
    object_hook = None
    object_pairs_hook = None
    parse_float = float
    parse_int = int
    parse_constant = {"-Infinity": float("-inf"), "Infinity": float("inf"), "NaN": float("nan")}.__getitem__


def json_loads(text):
    if _json is None:
        import json
        return json.loads(text)
    s = text.strip(" \t\n\r")
    try:
        obj, end = _json.make_scanner(_DecoderSettings())(s, 0)
        if end == len(s):
            return obj
    except Exception:  # StopIteration/SystemError: the C scanner reports errors only once json.decoder
        pass           # is loaded; anything else (another CPython's _json): json says what is wrong
    import json
    return json.loads(text)


def _not_json(o):
    raise TypeError("%s is not JSON serializable" % type(o).__name__)


def json_dumps(obj) -> str:
    if _json is None:
        import json
        return json.dumps(obj)
    try:
        enc = _json.make_encoder({}, _not_json, _json.encode_basestring_ascii, None, ": ", ", ", False, False, True)
        return "".join(enc(obj, 0))
    except Exception:  # another CPython's _json signature, or a value it refuses: json decides
        import json
        return json.dumps(obj)


def _now() -> str:
    import time
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())

SPEC_VERSION = "1.1.0"
# 0.3.x results have the same shape as 0.4.0's for what this plugin reads and echoes (flannel's
# conflist still says 0.3.1), so they are accepted too; CHECK does not exist before 0.4.0.
SUPPORTED_VERSIONS = ("0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0")
DEFAULT_SOCKET = "/run/nodewire/sys_fs_bpf_nodewire/api.sock"  # the agent's default (config.py)

# Error codes of the CNI spec ("Error" section); 100+ are this plugin's own.
ERR_INCOMPATIBLE_VERSION = 1
ERR_UNSUPPORTED_FIELD = 2
ERR_UNKNOWN_CONTAINER = 3
ERR_INVALID_ENV = 4
ERR_IO = 5
ERR_DECODE = 6
ERR_INVALID_CONFIG = 7
ERR_TRY_AGAIN_LATER = 11
ERR_NOT_AVAILABLE = 50
ERR_AGENT_REFUSED = 100


class CniError(Exception):
    def __init__(self, code: int, msg: str, details: str = ""):
        super().__init__(msg)
        self.code, self.msg, self.details = code, msg, details


class AgentUnavailable(Exception):
    pass


def _log(conf: dict, level: str, msg: str) -> None:
    line = "ts=%s level=%s plugin=nodewire-cni container=%s msg=%s\n" % (
        _now(), level, os.environ.get("CNI_CONTAINERID", "-"), msg)
    path = conf.get("logFile")
    try:
        if path:
            with open(path, "a") as f:
                f.write(line)
        else:
            sys.stderr.write(line)
    except OSError:
        pass


def _env(name: str) -> str:
    value = os.environ.get(name, "")
    if not value:
        raise CniError(ERR_INVALID_ENV, "%s is not set" % name)
    return value


def _cni_args() -> dict:
    """CNI_ARGS: "K1=V1;K2=V2" (kubelet passes K8S_POD_NAMESPACE, K8S_POD_NAME, K8S_POD_UID, …)."""
    out = {}
    for item in os.environ.get("CNI_ARGS", "").split(";"):
        k, sep, v = item.partition("=")
        if sep and k:
            out[k.strip()] = v.strip()
    return out


def _call(conf: dict, method: str, params: dict):
    """One JSON-lines request to the agent's API; AgentUnavailable when nobody answers."""
    path = conf.get("socket") or DEFAULT_SOCKET
    timeout = float(conf.get("timeout", 5))
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.settimeout(timeout)
        s.connect(path)
        s.sendall(json_dumps({"method": method, "params": params}).encode() + b"\n")
        buf = b""
        while not buf.endswith(b"\n"):
            chunk = s.recv(65536)
            if not chunk:
                break
            buf += chunk
    except OSError as e:  # _socket's timeout is an OSError too
        raise AgentUnavailable("agent at %s: %s" % (path, e.strerror or e)) from None
    finally:
        s.close()
    try:
        answer = json_loads(buf.decode())
    except ValueError:
        raise AgentUnavailable("agent at %s closed the connection without an answer" % path) from None
    if "error" in answer:
        err = answer["error"]
        if err.get("code") == "not_found":
            raise CniError(ERR_UNKNOWN_CONTAINER, err.get("message", ""))
        raise CniError(ERR_AGENT_REFUSED, "nodewire agent: %s" % err.get("message", ""), err.get("code", ""))
    return answer.get("result")


def _attachment(conf: dict, need_netns: bool) -> dict:
    args = _cni_args()
    netns = os.environ.get("CNI_NETNS", "")
    if need_netns and not netns:
        raise CniError(ERR_INVALID_ENV, "CNI_NETNS is not set")
    prev = conf.get("prevResult") or {}
    return {
        "containerID": _env("CNI_CONTAINERID"),
        "ifName": _env("CNI_IFNAME"),
        "netns": netns,
        "network": conf.get("name", ""),
        "cniVersion": conf["cniVersion"],
        "podNamespace": args.get("K8S_POD_NAMESPACE", ""),
        "podName": args.get("K8S_POD_NAME", ""),
        "podUID": args.get("K8S_POD_UID", ""),
        "ips": prev.get("ips") or [],
        "interfaces": prev.get("interfaces") or [],
    }


def _fail_open(conf: dict, what: str, err: Exception, code: int) -> None:
    if conf.get("failOpen", True):
        _log(conf, "warning", "%s: %s; passing through (failOpen)" % (what, err))
        return
    raise CniError(code, "%s: %s" % (what, err))


def cmd_add(conf: dict) -> dict:
    if not isinstance(conf.get("prevResult"), dict):
        raise CniError(ERR_INVALID_CONFIG, "nodewire-cni is a chained plugin: no prevResult "
                       "(list it after the primary plugin in a .conflist)")
    params = _attachment(conf, need_netns=True)
    try:
        _call(conf, "cni.add", params)
    except (AgentUnavailable, CniError) as e:
        _fail_open(conf, "ADD not recorded", e, ERR_TRY_AGAIN_LATER if isinstance(e, AgentUnavailable) else e.code)
    result = dict(conf["prevResult"])
    result["cniVersion"] = conf["cniVersion"]
    return result


def cmd_del(conf: dict) -> None:
    """Idempotent: succeeds when the agent, the netns or the pod's record is already gone."""
    params = _attachment(conf, need_netns=False)
    try:
        _call(conf, "cni.del", params)
    except (AgentUnavailable, CniError) as e:
        _log(conf, "info", "DEL: %s (nothing left to clean up here)" % e)


def cmd_check(conf: dict) -> None:
    params = _attachment(conf, need_netns=True)
    try:
        _call(conf, "cni.check", params)
    except AgentUnavailable as e:
        _fail_open(conf, "CHECK", e, ERR_TRY_AGAIN_LATER)


def cmd_status(conf: dict) -> None:
    try:
        _call(conf, "ping", {})
    except AgentUnavailable as e:
        if not conf.get("failOpen", True):
            raise CniError(ERR_NOT_AVAILABLE, "nodewire agent not available: %s" % e) from None


def cmd_gc(conf: dict) -> None:
    valid = conf.get("cni.dev/valid-attachments") or []
    try:
        _call(conf, "cni.gc", {"network": conf.get("name", ""), "validAttachments": valid})
    except (AgentUnavailable, CniError) as e:
        _log(conf, "info", "GC: %s (the agent collects at start)" % e)


COMMANDS = {"ADD": cmd_add, "DEL": cmd_del, "CHECK": cmd_check, "STATUS": cmd_status, "GC": cmd_gc}


def _read_conf(text: str) -> dict:
    try:
        conf = json_loads(text)
    except ValueError as e:
        raise CniError(ERR_DECODE, "network configuration on stdin is not JSON", str(e)) from None
    if not isinstance(conf, dict):
        raise CniError(ERR_DECODE, "network configuration on stdin is not a JSON object")
    version = conf.get("cniVersion")
    if version not in SUPPORTED_VERSIONS:
        raise CniError(ERR_INCOMPATIBLE_VERSION, "cniVersion %r is not supported" % (version,),
                       "supported: %s" % ", ".join(SUPPORTED_VERSIONS))
    for key, kind in (("failOpen", bool), ("socket", str), ("logFile", str), ("timeout", (int, float))):
        if key in conf and not isinstance(conf[key], kind):
            raise CniError(ERR_INVALID_CONFIG, "nodewire-cni config: %s has the wrong type" % key)
    return conf


def run(command: str, stdin: str) -> tuple[int, dict | None]:
    """(exit code, JSON to print) for one invocation; the seam tests call without a process."""
    version = SPEC_VERSION
    try:
        if command == "VERSION":
            return 0, {"cniVersion": SPEC_VERSION, "supportedVersions": list(SUPPORTED_VERSIONS)}
        if command not in COMMANDS:
            raise CniError(ERR_INVALID_ENV, "CNI_COMMAND %r is not one of ADD, DEL, CHECK, STATUS, GC, VERSION"
                           % command)
        conf = _read_conf(stdin)
        version = conf["cniVersion"]
        return 0, COMMANDS[command](conf)
    except CniError as e:
        err = {"cniVersion": version, "code": e.code, "msg": e.msg}
        if e.details:
            err["details"] = e.details
        return 1, err


def main() -> None:
    command = os.environ.get("CNI_COMMAND", "")
    stdin = "" if command == "VERSION" else sys.stdin.read()
    code, out = run(command, stdin)
    if out is not None:
        sys.stdout.write(json_dumps(out) + "\n")
    sys.exit(code)


if __name__ == "__main__":
    main()
