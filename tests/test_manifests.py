"""The manifest source: files → objects, errors named once, last good version kept."""
from pathlib import Path

import pytest

from agent.model.objects import ObjectKey
from agent.sources.manifests import ManifestSource
from agent.state import ClusterState
from tests.manifests import endpoint_slice, service, write


def test_reads_yaml_multidoc_json_and_lists(tmp_path: Path):
    (tmp_path / "a.yaml").write_text(
        "apiVersion: v1\nkind: Service\nmetadata: {name: a}\nspec: {clusterIP: 10.96.0.1, ports: [{port: 80}]}\n"
        "---\n"
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: ignored}\n")
    write(tmp_path / "b.json", service("b", ["10.96.0.2"]), endpoint_slice("b", ["10.0.0.1"]))
    (tmp_path / "notes.txt").write_text("not a manifest")
    src = ManifestSource(tmp_path, ClusterState())
    assert src.poll() is True
    assert set(src.state.services) == {ObjectKey("default", "a"), ObjectKey("default", "b")}
    assert set(src.state.slices) == {ObjectKey("default", "b-ipv4")}
    assert src.poll() is False  # nothing changed on disk


def test_bad_objects_are_reported_once_with_file_object_and_field(tmp_path: Path):
    reported = []
    good = service("good", ["10.96.0.1"])
    bad = service("bad", ["10.96.0.2"], protocol="SCTPX")
    f = write(tmp_path / "s.json", good, bad)
    src = ManifestSource(tmp_path, ClusterState(), on_errors=reported.extend)
    src.poll()
    src.poll()
    assert len(reported) == 1
    e = reported[0]
    assert (e.source, e.kind, e.key, e.field) == (str(f), "Service", "default/bad", "spec.ports[0].protocol")
    assert "SCTPX" in str(e)
    assert set(src.state.services) == {ObjectKey("default", "good")}


@pytest.mark.parametrize("name", ["s.json", "s.yaml"])  # both decoders (the JSON hook parses in place)
def test_a_slice_with_a_bad_port_is_applied_and_the_port_named(tmp_path: Path, name: str):
    reported = []
    sl = endpoint_slice("web", ["10.244.0.5"])
    sl["ports"].append({"name": "metrics", "protocol": "TCP"})  # no port: only this port is left out
    f = write(tmp_path / name, service("web", ["10.96.0.1"]), sl)
    src = ManifestSource(tmp_path, ClusterState(), on_errors=reported.extend)
    src.poll()
    assert [(e.source, e.kind, e.key, e.field) for e in reported] == [
        (str(f), "EndpointSlice", "default/web-ipv4", "ports[1].port")]
    assert "this port of the slice is ignored" in reported[0].message
    assert [p.port for p in src.state.slices[ObjectKey("default", "web-ipv4")].ports] == [8080, 0]


def test_broken_yaml_keeps_the_files_last_good_objects(tmp_path: Path):
    f = tmp_path / "s.yaml"
    f.write_text("apiVersion: v1\nkind: Service\nmetadata: {name: a}\nspec: {clusterIP: 10.96.0.1, ports: [{port: 80}]}\n")
    reported = []
    src = ManifestSource(tmp_path, ClusterState(), on_errors=reported.extend)
    src.poll()
    f.write_text("apiVersion: v1\nkind: Service\nmetadata: {name: a\nspec: [oops\n")
    assert src.poll() is True
    assert reported and reported[0].kind == "File" and "line" in reported[0].field
    assert set(src.state.services) == {ObjectKey("default", "a")}


def test_an_edit_that_breaks_an_object_keeps_its_last_good_version(tmp_path: Path):
    f = write(tmp_path / "s.json", service("a", ["10.96.0.1"], port=80))
    src = ManifestSource(tmp_path, ClusterState(), on_errors=lambda errs: None)
    src.poll()
    write(f, service("a", ["10.96.0.1"], port=70000))
    src.poll()
    assert src.state.services[ObjectKey("default", "a")].ports[0].port == 80
    assert "spec.ports[0].port" in str(src.errors[0])


def test_removing_a_file_removes_its_objects(tmp_path: Path):
    f = write(tmp_path / "s.json", service("a", ["10.96.0.1"]))
    src = ManifestSource(tmp_path, ClusterState())
    src.poll()
    f.unlink()
    assert src.poll() is True
    assert src.state.services == {}


def test_an_object_in_two_files_is_an_error_naming_both_and_the_first_stays(tmp_path: Path):
    reported = []
    a = write(tmp_path / "a.json", service("web", ["10.96.0.1"]))
    b = write(tmp_path / "b.json", service("web", ["10.96.0.2"]), service("other", ["10.96.0.3"]))
    src = ManifestSource(tmp_path, ClusterState(), on_errors=reported.extend)
    src.poll()
    web = ObjectKey("default", "web")
    assert src.state.services[web].cluster_ips == ("10.96.0.1",)
    assert ObjectKey("default", "other") in src.state.services
    [e] = reported
    assert e.source == str(b) and e.key == "default/web" and str(a) in e.message
    a.unlink()  # the first definition goes: the other file's takes its place
    src.poll()
    src.poll()
    assert src.state.services[web].cluster_ips == ("10.96.0.2",)


def test_only_the_changed_file_reaches_the_state(tmp_path: Path):
    write(tmp_path / "a.json", service("a", ["10.96.0.1"]), endpoint_slice("a", ["10.0.0.1"]))
    write(tmp_path / "b.json", service("b", ["10.96.0.2"]), endpoint_slice("b", ["10.0.0.2"]))
    state = ClusterState()
    src = ManifestSource(tmp_path, state)
    src.poll()
    assert set(state.take_dirty()) == {ObjectKey("default", "a"), ObjectKey("default", "b")}
    write(tmp_path / "b.json", service("b", ["10.96.0.2"]), endpoint_slice("b", ["10.0.0.3"]))
    src.poll()
    [(key, [fe])] = state.take_dirty().items()
    assert key == ObjectKey("default", "b") and [be.ip for be in fe.backends] == ["10.0.0.3"]


@pytest.mark.parametrize("inotify", [True, False], ids=["inotify", "poll"])
def test_the_source_thread_pushes_edits_into_the_state(tmp_path: Path, inotify: bool):
    from tests.conftest import wait_for

    write(tmp_path / "a.json", service("a", ["10.96.0.1"], port=80))
    state = ClusterState()
    src = ManifestSource(tmp_path, state, poll_interval=0.05, watch=inotify).start()
    try:
        assert src.wait_synced(10)
        assert state.services[ObjectKey("default", "a")].ports[0].port == 80
        write(tmp_path / "a.json", service("a", ["10.96.0.1"], port=81))
        wait_for(lambda: state.services[ObjectKey("default", "a")].ports[0].port == 81, what="edit applied")
        write(tmp_path / "sub.json", service("b", ["10.96.0.2"]))
        wait_for(lambda: ObjectKey("default", "b") in state.services, what="new file applied")
        assert src.watcher == ("inotify" if inotify else "poll")
    finally:
        src.stop()
