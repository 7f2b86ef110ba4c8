"""A container runtime's CNI half (a double for tests and benchmarks), with libcni's semantics written
from the CNI spec: each plugin of a .conflist executed with the spec's CNI_* environment and its network configuration
on stdin, ADD's result threaded through as the next plugin's prevResult, DEL in reverse order with the
cached ADD result, CHECK in order with it. Plugins run inside the "node" network namespace, as a
runtime on a node runs them in the host's.
"""
from __future__ import annotations

import json
import os
import subprocess
from dataclasses import dataclass, field


@dataclass
class Invocation:
    code: int
    out: dict | None
    stderr: str


def invoke(binary: str, command: str, conf: dict | str, env: dict, node_netns: str | None = None) -> Invocation:
    stdin = conf if isinstance(conf, str) else json.dumps(conf)
    argv = [binary] if node_netns is None else ["nsenter", f"--net={node_netns}", binary]
    full_env = {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"), "CNI_COMMAND": command, **env}
    r = subprocess.run(argv, input=stdin, capture_output=True, text=True, env=full_env, timeout=60)
    out = json.loads(r.stdout) if r.stdout.strip() else None
    return Invocation(r.returncode, out, r.stderr)


@dataclass
class Runtime:
    conflist: dict
    cni_path: list[str]
    node_netns: str | None = None
    cache: dict = field(default_factory=dict)  # (container, ifname) → ADD result, as libcni caches it

    def _binary(self, plugin_type: str) -> str:
        for d in self.cni_path:
            p = os.path.join(d, plugin_type)
            if os.access(p, os.X_OK):
                return p
        raise FileNotFoundError(f"plugin {plugin_type} not in {self.cni_path}")

    def _conf(self, plugin: dict, prev: dict | None, runtime_config: dict) -> dict:
        conf = {"cniVersion": self.conflist["cniVersion"], "name": self.conflist["name"], **plugin}
        caps = {k for k, v in plugin.get("capabilities", {}).items() if v}
        rc = {k: v for k, v in runtime_config.items() if k in caps}
        if rc:
            conf["runtimeConfig"] = rc
        if prev is not None:
            conf["prevResult"] = prev
        return conf

    def _env(self, command_env: dict) -> dict:
        return {"CNI_PATH": ":".join(self.cni_path), **command_env}

    def add(self, container: str, netns: str, pod: tuple[str, str, str], ifname: str = "eth0",
            runtime_config: dict | None = None) -> Invocation:
        env = self._env(pod_env(container, netns, pod, ifname))
        prev = None
        for plugin in self.conflist["plugins"]:
            r = invoke(self._binary(plugin["type"]), "ADD", self._conf(plugin, prev, runtime_config or {}), env,
                       self.node_netns)
            if r.code != 0:
                return r
            prev = r.out
        self.cache[(container, ifname)] = (prev, netns, pod, runtime_config or {})
        return Invocation(0, prev, "")

    def _each(self, command: str, container: str, ifname: str, order) -> Invocation:
        prev, netns, pod, rc = self.cache.get((container, ifname), (None, "", ("", "", ""), {}))
        env = self._env(pod_env(container, netns, pod, ifname))
        for plugin in order(self.conflist["plugins"]):
            r = invoke(self._binary(plugin["type"]), command, self._conf(plugin, prev, rc), env, self.node_netns)
            if r.code != 0:
                return r
        return Invocation(0, None, "")

    def check(self, container: str, ifname: str = "eth0") -> Invocation:
        return self._each("CHECK", container, ifname, list)

    def delete(self, container: str, ifname: str = "eth0") -> Invocation:
        r = self._each("DEL", container, ifname, lambda ps: list(reversed(ps)))
        if r.code == 0:
            self.cache.pop((container, ifname), None)
        return r


def pod_env(container: str, netns: str, pod: tuple[str, str, str], ifname: str = "eth0") -> dict:
    ns, name, uid = pod
    env = {"CNI_CONTAINERID": container, "CNI_IFNAME": ifname,
           "CNI_ARGS": f"IgnoreUnknown=1;K8S_POD_NAMESPACE={ns};K8S_POD_NAME={name};K8S_POD_UID={uid}"}
    if netns:
        env["CNI_NETNS"] = netns
    return env
