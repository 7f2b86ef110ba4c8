"""Fuzzed manifest decoding (hypothesis): the object parsers with one wrong field anywhere, and whole
files of random bytes, random JSON/YAML, deep nesting, huge lists, truncated writes, symlinks, FIFOs.
Properties: nothing raises out of the source, every rejection names the file, the object and a field,
the other files' objects stay, and a later good write of the same file is applied."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import yaml
from hypothesis import given, strategies as st

from agent.model.objects import ObjectKey
from agent.model.parse import PARSERS, InvalidObject
from agent.sources.manifests import ManifestSource
from agent.state import ClusterState
from tests.fuzz_strategies import JSON, dotted, one_wrong_field, paths, replace_at, valid_objects
from tests.manifests import endpoint_slice, service, write

GOOD, MINE = ObjectKey("default", "good"), ObjectKey("default", "mine")


@given(one_wrong_field())
def test_parsers_reject_a_wrong_field_by_name(case):
    obj, path, kind = case
    try:
        PARSERS[kind](obj)
    except InvalidObject as e:
        assert e.field not in ("", "-"), f"{dotted(path)}: {e}"
        assert e.kind == kind
        if path[:2] not in (("metadata", "name"), ("metadata", "namespace")) and path != ("metadata",):
            assert e.key == f"default/{obj['metadata']['name']}", e
    # anything else raising is the bug this test is for


WRONG_CONSTANTS = [None, True, 1.5, -1, 0, 65536, 2 ** 63, "", "None", "10.96.0.1/33", "::1::", "a" * 300,
                   "10.0.0.1\x00", "\udcff", [], {}, [None], {"": None}, [[]], {"a": []}, 5, "x"]


def test_every_field_with_every_wrong_constant_is_rejected_by_name():
    """The exhaustive companion of the test above: each path of each kind × a table of wrong values."""
    escaped = []
    for obj in valid_objects():
        for path in paths(obj):
            for value in WRONG_CONSTANTS:
                try:
                    PARSERS[obj["kind"]](replace_at(obj, path, value))
                except InvalidObject as e:
                    if e.field in ("", "-"):
                        escaped.append((obj["kind"], dotted(path), value, str(e)))
                except Exception as e:
                    escaped.append((obj["kind"], dotted(path), value, f"{type(e).__name__}: {e}"))
    assert escaped == []


def test_regression_nul_or_surrogate_in_an_address_names_the_field(tmp_path):
    """Found by the fuzzer: inet_pton raised ValueError for "\u0000"/"\udcff" (valid JSON escapes),
    so the rejection said "-: cannot decode" instead of the field."""
    eps = endpoint_slice("good", ["10.0.0.1"])
    eps["endpoints"][0]["addresses"] = ["10.0.0.1\x00"]
    reported = []
    write(tmp_path / "x.json", service("good", ["10.96.0.1"]), eps)
    ManifestSource(tmp_path, ClusterState(), on_errors=reported.extend).poll()
    assert [str(e).split(": ", 1)[1] for e in reported] == [
        "EndpointSlice default/good-ipv4: endpoints[0].addresses[0]: '10.0.0.1\\x00' is not a valid IP address"]


def _deep(depth: int, yaml_block: bool) -> str:
    return ("- " * depth + "x\n") if yaml_block else "[" * depth + "]" * depth


def _huge_list(n: int) -> str:
    return json.dumps({"kind": "List", "items": [{"kind": "Service", "metadata": {"name": f"h{i}"}} for i in range(n)]})


def _mine() -> str:
    return json.dumps(service("mine", ["10.96.5.5"]))


FILE_TEXT = st.one_of(
    st.binary(max_size=3000).map(lambda b: b.decode("latin-1")),
    st.text(max_size=2000),
    JSON.map(json.dumps),
    JSON.map(lambda v: yaml.safe_dump(v)),
    st.lists(JSON, max_size=6).map(lambda vs: yaml.safe_dump_all(vs)),
    st.tuples(st.integers(1, 100_000), st.booleans()).map(lambda a: _deep(*a)),
    st.integers(0, 20_000).map(_huge_list),
    st.sampled_from([json.dumps(o) for o in valid_objects()]).flatmap(
        lambda t: st.integers(0, len(t)).map(lambda n: t[:n])),  # a write cut short
    st.sampled_from(valid_objects()).flatmap(lambda o: st.just(yaml.safe_dump(o))).flatmap(
        lambda t: st.integers(0, len(t)).map(lambda n: t[:n])),
)


def _check_poll(d: Path, bad: Path, make_bad) -> None:
    reported = []
    write(d / "good.json", service("good", ["10.96.0.1"]), endpoint_slice("good", ["10.0.0.1"]))
    make_bad(bad)
    src = ManifestSource(d, ClusterState(), on_errors=reported.extend)
    src.poll()
    assert GOOD in src.state.services
    for e in reported:
        assert e.source == str(bad), e  # the good file is never blamed
        assert e.field and e.key, e
    # The file is fixed: its objects appear and the other file is untouched.
    if bad.is_dir() and not bad.is_symlink():
        shutil.rmtree(bad)
    elif bad.is_symlink() or not bad.is_file():
        bad.unlink()
    bad.write_text(_mine())
    os.utime(bad, ns=(1, 1))  # a new stamp even within the same timestamp tick
    src.poll()
    objs = src.state.services
    assert GOOD in objs and MINE in objs


@given(FILE_TEXT, st.sampled_from(["x.yaml", "x.yml", "x.json"]))
def test_any_file_content_is_named_and_never_stops_the_source(text, name):
    with tempfile.TemporaryDirectory() as d:
        _check_poll(Path(d), Path(d, name), lambda p: p.write_text(text))


def _fifo(p: Path) -> None:
    os.mkfifo(p)


def _dangling(p: Path) -> None:
    p.symlink_to(p.parent / "missing.json")


def _loop(p: Path) -> None:
    p.symlink_to(p)


def _to_good(p: Path) -> None:  # a second name for good.json's objects: same objects, no conflict
    p.symlink_to(p.parent / "good.json")


def _dir(p: Path) -> None:
    p.mkdir()
    write(p / "inner.json", service("inner", ["10.96.0.3"]))


def _unreadable(p: Path) -> None:
    p.write_text(_mine())
    p.chmod(0)


@given(st.sampled_from([_fifo, _dangling, _loop, _to_good, _dir, _unreadable]), st.sampled_from(["x.yaml", "x.json"]))
def test_symlinks_fifos_and_directories_named_like_manifests(make, name):
    with tempfile.TemporaryDirectory() as d:
        _check_poll(Path(d), Path(d, name), make)
