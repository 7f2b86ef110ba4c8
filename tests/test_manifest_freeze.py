"""One bad manifest file never freezes the source: it is one error naming that file, recorded once;
that file keeps its last good objects, every other file still applies, and later edits still apply."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from agent.model.objects import ObjectKey
from agent.sources import manifests
from agent.sources.manifests import ManifestSource
from agent.state import ClusterState
from tests.manifests import endpoint_slice, service, write

GOOD = ObjectKey("default", "good")


def _good(d: Path, port: int = 80) -> Path:
    return write(d / "good.json", service("good", ["10.96.0.1"], port=port), endpoint_slice("good", ["10.0.0.1"]))


def _deep_json(p: Path) -> None:
    p.write_text("[" * 200_000)


def _deep_yaml_flow(p: Path) -> None:  # libyaml's composer would crash the process (SIGSEGV) on this
    p.write_text("[" * 200_000 + "]" * 200_000)


def _deep_yaml_block(p: Path) -> None:
    p.write_text("- " * 60_000 + "x\n")


def _list_items_not_a_list(p: Path) -> None:
    p.write_text(json.dumps({"apiVersion": "v1", "kind": "List", "items": 5}))


def _nested_list_items_not_a_list(p: Path) -> None:
    p.write_text(json.dumps({"kind": "List", "items": [{"kind": "ServiceList", "items": "x"}]}))


def _wrong_types_in_a_list(p: Path) -> None:
    p.write_text(json.dumps({"kind": "List", "items": [
        5, "text", None, [1, 2], {"kind": ["Service"]}, {"kind": "Service", "metadata": {"name": 5}},
        {"kind": "Service", "metadata": {"name": "t", "labels": [1]}, "spec": {"ports": 7}},
        {"kind": "EndpointSlice", "metadata": {"name": "s", "labels": {"kubernetes.io/service-name": "t"}},
         "addressType": "IPv4", "endpoints": [{"addresses": "10.0.0.1"}], "ports": {"a": 1}},
        {"kind": "Pod", "metadata": {"name": "p", "annotations": "x"}, "status": {"podIPs": [5]}},
    ]}))


def _wrong_types_yaml(p: Path) -> None:
    p.write_text("kind: List\nitems:\n- 5\n- kind: Service\n  metadata: {name: [x]}\n- kind: {a: b}\n")


def _invalid_utf8(p: Path) -> None:
    p.write_bytes(b'{"kind": "Service", "metadata": {"name": "\xff\xfe"}}')


def _fifo(p: Path) -> None:
    os.mkfifo(p)


def _huge(p: Path) -> None:  # sparse: refused by its size, never read
    with open(p, "wb") as f:
        f.truncate(manifests.MAX_FILE_BYTES + 1)


def _dangling_symlink(p: Path) -> None:
    p.symlink_to(p.parent / "nowhere.json")


def _symlink_loop(p: Path) -> None:
    p.symlink_to(p)


def _top_level_scalar(p: Path) -> None:
    p.write_text("5")


BAD = {f.__name__.lstrip("_"): f for f in (
    _deep_json, _deep_yaml_flow, _deep_yaml_block, _list_items_not_a_list, _nested_list_items_not_a_list,
    _wrong_types_in_a_list, _wrong_types_yaml, _invalid_utf8, _fifo, _huge, _dangling_symlink, _symlink_loop,
    _top_level_scalar)}
SUFFIX = {"deep_yaml_flow": ".yaml", "deep_yaml_block": ".yaml", "wrong_types_yaml": ".yaml", "fifo": ".yaml"}


@pytest.mark.parametrize("case", sorted(BAD))
def test_a_bad_file_is_one_error_and_edits_of_other_files_still_apply(tmp_path: Path, case: str):
    reported = []
    _good(tmp_path)
    write(tmp_path / "other.json", service("other", ["10.96.0.2"]))
    bad = tmp_path / f"x{SUFFIX.get(case, '.json')}"
    BAD[case](bad)
    src = ManifestSource(tmp_path, ClusterState(), on_errors=reported.extend)
    assert src.poll() is True
    assert {GOOD, ObjectKey("default", "other")} <= set(src.state.services)
    from_bad = [e for e in reported if e.source == str(bad)]
    assert from_bad, f"no error names {bad}: {reported}"
    assert all(e.source == str(bad) for e in reported), reported
    assert src.poll() is False and len(reported) == len(from_bad)  # recorded once, not re-read

    _good(tmp_path, port=81)  # a later edit of a good file still applies
    assert src.poll() is True
    assert src.state.services[GOOD].ports[0].port == 81
    assert len(reported) == len(from_bad)


@pytest.mark.parametrize("case", ["deep_json", "list_items_not_a_list", "invalid_utf8", "huge"])
def test_a_file_that_turns_bad_keeps_its_last_good_objects(tmp_path: Path, case: str):
    f = write(tmp_path / "x.json", service("mine", ["10.96.0.9"]))
    _good(tmp_path)
    src = ManifestSource(tmp_path, ClusterState(), on_errors=lambda errs: None)
    src.poll()
    f.unlink()
    BAD[case](f)
    assert src.poll() is True
    assert ObjectKey("default", "mine") in src.state.services
    assert [e.source for e in src.errors] == [str(f)]


def test_wrong_types_name_the_object_and_field(tmp_path: Path):
    reported = []
    _wrong_types_in_a_list(tmp_path / "x.json")
    ManifestSource(tmp_path, ClusterState(), on_errors=reported.extend).poll()
    text = "\n".join(map(str, reported))
    assert "Service default/t: spec.ports: expected list, got int 7" in text
    assert "document 0: -: expected an object, got int" in text
    assert "EndpointSlice default/s: endpoints[0].addresses: expected list" in text


def test_huge_file_error_says_its_size_and_the_limit(tmp_path: Path):
    reported = []
    (tmp_path / "big.json").write_text(json.dumps({"kind": "List", "items": [service("a", ["10.96.0.1"])]}))
    ManifestSource(tmp_path, ClusterState(), on_errors=reported.extend, max_file_bytes=100).poll()
    (e,) = reported
    assert e.source.endswith("big.json") and "larger than the limit of 100 bytes" in e.message


def test_a_file_vanishing_between_scan_and_read_is_treated_as_removed(tmp_path: Path, monkeypatch):
    _good(tmp_path)
    f = write(tmp_path / "gone.json", service("gone", ["10.96.0.3"]))
    src = ManifestSource(tmp_path, ClusterState(), on_errors=lambda errs: pytest.fail(f"unexpected errors {errs}"))
    real_scan = src._scan

    def scan_then_delete():
        seen = real_scan()
        f.unlink(missing_ok=True)
        return seen

    monkeypatch.setattr(src, "_scan", scan_then_delete)
    src.poll()
    assert set(src.state.services) == {GOOD}


def test_symlinked_files_are_followed_and_a_configmap_volume_is_read_once(tmp_path: Path):
    """A ConfigMap volume: files are symlinks to ..data/, ..data a symlink to a timestamped dir,
    swapped atomically on update."""
    v1 = tmp_path / "..2026_12_01_v1"
    v1.mkdir()
    _good(v1)
    (tmp_path / "..data").symlink_to(v1.name)
    (tmp_path / "good.json").symlink_to("..data/good.json")
    src = ManifestSource(tmp_path, ClusterState(), on_errors=lambda errs: pytest.fail(f"unexpected errors {errs}"))
    src.poll()
    assert set(src.state.services) == {GOOD}
    assert list(src.files) == [tmp_path / "good.json"]

    v2 = tmp_path / "..2026_12_01_v2"
    v2.mkdir()
    _good(v2, port=82)
    (tmp_path / "..data_tmp").symlink_to(v2.name)
    os.replace(tmp_path / "..data_tmp", tmp_path / "..data")
    assert src.poll() is True
    assert src.state.services[GOOD].ports[0].port == 82


@pytest.mark.root
def test_real_agent_keeps_applying_edits_next_to_bad_files(sandbox, agent_factory, tmp_path_factory):
    """The freeze as a user met it: bad files next to a good one in a running agent; an edit of the
    good file still moves connects to the new backend, and the agent names each bad file once."""
    import time

    from tests.conftest import wait_for

    client = sandbox.add_pod("fz-client")
    b1, b2 = sandbox.add_pod("fz-b1"), sandbox.add_pod("fz-b2")
    for b in (b1, b2):
        b.serve(tcp_ports=[8080])
    d = tmp_path_factory.mktemp("freeze")
    write(d / "web.json", service("web", ["10.96.7.1"]), endpoint_slice("web", [b1.ip4]))
    for case, suffix in (("deep_json", ".json"), ("list_items_not_a_list", ".json"), ("deep_yaml_flow", ".yaml"),
                         ("invalid_utf8", ".json"), ("fifo", ".yaml")):
        BAD[case](d / f"bad-{case}{suffix}")
    agent = agent_factory(d).start()
    assert client.probe("tcp", "10.96.7.1", 80, count=5)["replies"] == {"fz-b1": 5}

    t = time.time()
    write(d / "web.json", service("web", ["10.96.7.1"]), endpoint_slice("web", [b2.ip4]))
    wait_for(lambda: agent.synced_after(t), 10, what="sync after editing web.json")
    assert client.probe("tcp", "10.96.7.1", 80, count=5)["replies"] == {"fz-b2": 5}
    assert agent.proc.poll() is None
    errors = agent.status().object_errors
    for case in ("deep_json", "list_items_not_a_list", "deep_yaml_flow", "invalid_utf8", "fifo"):
        assert sum(f"bad-{case}" in e for e in errors) == 1, errors


@pytest.mark.root
def test_idle_agent_does_not_rewrite_its_status_and_names_come_from_its_api(sandbox, agent_factory, tmp_path_factory):
    """Status is written when something in it changed (not every second, not with every Service's
    name); `nodewire services` asks the running agent for the names."""
    import time

    from agent.status import status_path
    from tests.conftest import wait_for

    d = tmp_path_factory.mktemp("idle")
    write(d / "a.json", *[o for i in range(50) for o in (service(f"s{i}", [f"10.96.8.{i + 1}"]),
                                                           endpoint_slice(f"s{i}", ["10.0.0.1"]))])
    # --check-interval 0: the sampled drift check, when on, changes the status (its run count) every 30 s
    agent = agent_factory(d, pin_suffix="-idle", extra=["--check-interval", "0"]).start()
    path = Path(status_path(agent.pin_dir))
    wait_for(lambda: agent.status().services == 50, what="50 services in the status")
    assert "s49" not in path.read_text()  # no per-Service names in the status
    before = path.stat().st_mtime_ns
    time.sleep(7)  # longer than the status check interval (5 s): nothing changed, nothing written
    assert path.stat().st_mtime_ns == before
    rows = {r["frontend"]: r["service"] for r in agent.services()}
    assert rows["10.96.8.50:80"] == "default/s49" and len(rows) == 50
    t = time.time()
    write(d / "a.json", service("s0", ["10.96.8.1"]), endpoint_slice("s0", ["10.0.0.2"]))
    wait_for(lambda: agent.synced_after(t) and agent.status().services == 1, what="the edit in the status")
    assert path.stat().st_mtime_ns != before
