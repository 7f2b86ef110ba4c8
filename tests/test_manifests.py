"""The manifest source: files → objects, errors named once, last good version kept."""
from pathlib import Path

from agent.model.objects import ObjectKey
from agent.sources.manifests import ManifestSource
from tests.manifests import endpoint_slice, service, write


def test_reads_yaml_multidoc_json_and_lists(tmp_path: Path):
    (tmp_path / "a.yaml").write_text(
        "apiVersion: v1\nkind: Service\nmetadata: {name: a}\nspec: {clusterIP: 10.96.0.1, ports: [{port: 80}]}\n"
        "---\n"
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: ignored}\n")
    write(tmp_path / "b.json", service("b", ["10.96.0.2"]), endpoint_slice("b", ["10.0.0.1"]))
    (tmp_path / "notes.txt").write_text("not a manifest")
    src = ManifestSource(tmp_path)
    assert src.poll() is True
    objs = src.objects()
    assert set(objs.services) == {ObjectKey("default", "a"), ObjectKey("default", "b")}
    assert set(objs.slices) == {ObjectKey("default", "b-ipv4")}
    assert src.poll() is False  # nothing changed on disk


def test_bad_objects_are_reported_once_with_file_object_and_field(tmp_path: Path):
    reported = []
    good = service("good", ["10.96.0.1"])
    bad = service("bad", ["10.96.0.2"], protocol="SCTPX")
    f = write(tmp_path / "s.json", good, bad)
    src = ManifestSource(tmp_path, on_error=reported.append)
    src.poll()
    src.poll()
    assert len(reported) == 1
    e = reported[0]
    assert (e.source, e.kind, e.key, e.field) == (str(f), "Service", "default/bad", "spec.ports[0].protocol")
    assert "SCTPX" in str(e)
    assert set(src.objects().services) == {ObjectKey("default", "good")}


def test_broken_yaml_keeps_the_files_last_good_objects(tmp_path: Path):
    f = tmp_path / "s.yaml"
    f.write_text("apiVersion: v1\nkind: Service\nmetadata: {name: a}\nspec: {clusterIP: 10.96.0.1, ports: [{port: 80}]}\n")
    reported = []
    src = ManifestSource(tmp_path, on_error=reported.append)
    src.poll()
    f.write_text("apiVersion: v1\nkind: Service\nmetadata: {name: a\nspec: [oops\n")
    assert src.poll() is True
    assert reported and reported[0].kind == "File" and "line" in reported[0].field
    assert set(src.objects().services) == {ObjectKey("default", "a")}


def test_an_edit_that_breaks_an_object_keeps_its_last_good_version(tmp_path: Path):
    f = write(tmp_path / "s.json", service("a", ["10.96.0.1"], port=80))
    src = ManifestSource(tmp_path, on_error=lambda e: None)
    src.poll()
    write(f, service("a", ["10.96.0.1"], port=70000))
    src.poll()
    assert src.objects().services[ObjectKey("default", "a")].ports[0].port == 80
    assert "spec.ports[0].port" in str(src.errors[0])


def test_removing_a_file_removes_its_objects(tmp_path: Path):
    f = write(tmp_path / "s.json", service("a", ["10.96.0.1"]))
    src = ManifestSource(tmp_path)
    src.poll()
    f.unlink()
    assert src.poll() is True
    assert src.objects().services == {}
