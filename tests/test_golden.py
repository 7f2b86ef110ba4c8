"""Golden tests, no root: manifests → ManifestSource → ClusterState → views → one plan → the maps
double, and the dump of every map equals the expected text checked in under tests/golden/.

One file per case, input and expected maps side by side (after Cilium's
pkg/loadbalancer/tests/testdata/*.txtar): `-- node --` (name, zone, north-south addresses or none),
`-- input.yaml --` (the manifests, or `@<glob>` naming files of the repository: examples.txt reads the
demo's examples/*.yaml themselves), then one `-- <map> --` section per map. After a deliberate change:
NW_GOLDEN_UPDATE=1 pytest tests/test_golden.py rewrites the expected sections, to be reviewed in the diff.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from agent.model.northsouth import NodeInfo
from agent.sources.manifests import ManifestSource
from agent.state import ClusterState
from nodewire_dev.mapsdouble import MapsDouble, dump_text

GOLDEN = Path(__file__).parent / "golden"
REPO = Path(__file__).parent.parent
UPDATE = os.environ.get("NW_GOLDEN_UPDATE") == "1"
MAGLEV_M = 251  # a small prime: the table's spread stays readable


def sections(text: str) -> list[tuple[str, str]]:
    """`-- name --` sections in order (text before the first is the comment)."""
    out, name, lines = [], "comment", []
    for line in text.splitlines(keepends=True):
        if line.startswith("-- ") and line.rstrip().endswith(" --"):
            out.append((name, "".join(lines)))
            name, lines = line.strip()[3:-3], []
        else:
            lines.append(line)
    return out + [(name, "".join(lines))]


def manifests(section: str) -> str:
    """The input section's manifests; `@examples/*.yaml`: those files, as YAML documents of one stream."""
    if not section.startswith("@"):
        return section
    return "".join(f"{p.read_text()}\n---\n" for p in sorted(REPO.glob(section[1:].strip())))


def node_of(spec: str) -> tuple[NodeInfo, bool]:
    """`name=n1 zone=z addresses=a,b` (no addresses: north-south off)."""
    kv = dict(w.split("=", 1) for w in spec.split())
    addrs = tuple(a for a in kv.get("addresses", "").split(",") if a)
    return NodeInfo(kv["name"], addrs, kv.get("zone", "")), bool(addrs)


def run(node_spec: str, manifests: str, tmp: Path) -> str:
    (tmp / "input.yaml").write_text(manifests)
    node, northsouth = node_of(node_spec)
    state = ClusterState(node.name, node.zone)
    errors = []
    ManifestSource(tmp, state, on_errors=errors.extend, watch=False).poll()
    assert errors == [], errors
    d = MapsDouble(northsouth=northsouth, maglev_size=MAGLEV_M, check=lambda m: gaps.extend(m.dangling()))
    gaps: list = []
    res = d.datapath().apply(state.take_views(True, node if northsouth else None), full=True)
    assert (res.errors, gaps) == ([], [])
    return dump_text(d)


@pytest.mark.parametrize("case", sorted(p.name for p in GOLDEN.glob("*.txt")))
def test_golden(case, tmp_path):
    path = GOLDEN / case
    parts = sections(path.read_text())
    head = {n: t for n, t in parts if n in ("comment", "node", "input.yaml")}
    got = run(head["node"].strip(), manifests(head["input.yaml"]), tmp_path)
    want = "".join(f"-- {n} --\n{t}" for n, t in parts if n not in head)
    if UPDATE and got != want:
        path.write_text(head["comment"] + f"-- node --\n{head['node']}-- input.yaml --\n{head['input.yaml']}" + got)
        want = got
    assert got == want, f"{case}: the maps differ from the golden file (NW_GOLDEN_UPDATE=1 rewrites it)"


@pytest.mark.root
def test_the_golden_cases_pass_as_nobody():
    """No root needed: the same cases run as the unprivileged user `nobody`."""
    if shutil.which("runuser") is None:
        pytest.skip("no runuser")
    r = subprocess.run(["runuser", "-u", "nobody", "--", sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                        "-k", "not nobody", str(Path(__file__))], cwd=REPO, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "NW_GOLDEN_UPDATE": ""})
    assert r.returncode == 0 and " passed" in r.stdout, r.stdout[-3000:] + r.stderr[-2000:]
