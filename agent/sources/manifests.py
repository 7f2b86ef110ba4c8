"""The embedded default source: a directory of Kubernetes manifests, watched for changes.

Every *.yaml / *.yml / *.json file is read (multi-document YAML and `kind: List` included). A file
whose text changes is parsed again; a bad object is reported once (file, object, field) and skipped.
An object that was good before and is now broken keeps its last good version, and a file that no
longer parses keeps all of its last good objects, so an editing mistake never takes a working Service
out of the datapath. Removing a file removes its objects.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

from ..model.objects import ObjectError, ObjectKey, Objects
from ..model.parse import PARSERS, InvalidObject

log = logging.getLogger("nodewire.manifests")
SUFFIXES = (".yaml", ".yml", ".json")
_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


@dataclass
class _FileState:
    stamp: tuple[int, int, int]
    objects: dict[tuple[str, ObjectKey], Any] = field(default_factory=dict)
    errors: list[ObjectError] = field(default_factory=list)


@dataclass
class _Rejected:
    """An object the parser refused, standing in its place in the decoded document."""
    error: InvalidObject
    kind: str
    ident: tuple[str, ObjectKey] | None


def _parse_in_place(d: dict) -> Any:
    """json object_hook: turn each Kubernetes object into its typed form as soon as it is decoded.

    The decoded dicts of an object are freed right away instead of living until the whole file is
    decoded; for a 100k-Service file this keeps the agent's heap from growing to several times the
    size of what it keeps (freed dicts would pin the allocator's arenas).
    """
    kind = d.get("kind")
    parser = PARSERS.get(kind)
    if parser is None or not isinstance(d.get("metadata"), dict):
        return d
    try:
        return parser(d)
    except InvalidObject as e:
        name = d["metadata"].get("name")
        ident = (kind, ObjectKey(d["metadata"].get("namespace") or "default", name)) if isinstance(name, str) else None
        return _Rejected(e, kind, ident)


def _documents(path: Path, text: str) -> list[Any]:
    if path.suffix == ".json":
        return [json.loads(text, object_hook=_parse_in_place)]
    return [d for d in yaml.load_all(text, Loader=_Loader) if d is not None]


def _expand(doc: Any) -> list[Any]:
    if isinstance(doc, dict) and isinstance(doc.get("kind"), str) and doc["kind"].endswith("List"):
        items = doc.get("items") or []
        return [i for item in items for i in _expand(item)]
    return [doc]


def parse_file(path: Path, text: str, previous: dict | None = None) -> tuple[dict, list[ObjectError]]:
    """Objects of one file keyed by (kind, key), and the errors found. Pure but for logging."""
    previous = previous or {}
    try:
        docs = _documents(path, text)
    except (yaml.YAMLError, json.JSONDecodeError) as e:
        line = getattr(getattr(e, "problem_mark", None), "line", None)
        where = f"line {line + 1}" if line is not None else getattr(e, "msg", "syntax")
        msg = str(getattr(e, "problem", None) or e).splitlines()[0]
        return dict(previous), [ObjectError(str(path), "File", "-", where, f"cannot parse: {msg}")]
    objs: dict = {}
    errors: list[ObjectError] = []
    for i, doc in enumerate(i for d in docs for i in _expand(d)):
        if isinstance(doc, _Rejected):
            errors.append(doc.error.as_error(str(path)))
            if doc.ident in previous:
                objs[doc.ident] = previous[doc.ident]
            continue
        if not isinstance(doc, dict):  # already parsed by the JSON hook
            objs[(type(doc).__name__, doc.key)] = doc
            continue
        kind = doc.get("kind")
        parser = PARSERS.get(kind)
        if parser is None:
            if kind is None:
                errors.append(ObjectError(str(path), "Object", f"document {i}", "kind", "missing"))
            continue  # other kinds (Deployments, ConfigMaps, …) are not ours to read
        try:
            obj = parser(doc)
        except InvalidObject as e:
            errors.append(e.as_error(str(path)))
            meta = doc.get("metadata") if isinstance(doc.get("metadata"), dict) else {}
            if isinstance(meta.get("name"), str):
                ident = (kind, ObjectKey(meta.get("namespace") or "default", meta["name"]))
                if ident in previous:
                    objs[ident] = previous[ident]
            continue
        objs[(kind, obj.key)] = obj
    return objs, errors


class ManifestSource:
    """Polls a directory (mtime + size per file; cheap) and re-parses only the files that changed."""

    def __init__(self, directory: str | os.PathLike, on_error: Callable[[ObjectError], None] | None = None):
        self.directory = Path(directory)
        self.files: dict[Path, _FileState] = {}
        self._reported: set[ObjectError] = set()
        self.on_error = on_error or (lambda err: log.error("bad object: %s", err))
        if not self.directory.is_dir():
            raise FileNotFoundError(f"--manifests: {self.directory} is not a directory")

    def _scan(self) -> dict[Path, tuple[int, int, int]]:
        out = {}
        for root, _dirs, names in os.walk(self.directory):
            for n in names:
                if n.endswith(SUFFIXES) and not n.startswith("."):
                    p = Path(root, n)
                    try:
                        st = p.stat()
                    except FileNotFoundError:
                        continue
                    out[p] = (st.st_mtime_ns, st.st_size, st.st_ino)
        return out

    def poll(self) -> bool:
        """Read what changed on disk. Returns True when the set of objects may have changed."""
        seen = self._scan()
        changed = False
        for p in set(self.files) - set(seen):
            del self.files[p]
            changed = True
        for p, stamp in seen.items():
            st = self.files.get(p)
            if st is not None and st.stamp == stamp:
                continue
            try:
                text = p.read_text()
            except (FileNotFoundError, UnicodeDecodeError) as e:
                text = None
                err = ObjectError(str(p), "File", "-", "content", f"cannot read: {e}")
                objs, errors = (st.objects if st else {}), [err]
            if text is not None:
                objs, errors = parse_file(p, text, st.objects if st else None)
            self.files[p] = _FileState(stamp, objs, errors)
            for err in errors:
                if err not in self._reported:
                    self._reported.add(err)
                    self.on_error(err)
            changed = True
        return changed

    @property
    def errors(self) -> list[ObjectError]:
        return [e for st in self.files.values() for e in st.errors]

    def objects(self) -> Objects:
        out = Objects()
        by_kind = {"Service": out.services, "EndpointSlice": out.slices, "Pod": out.pods}
        for p in sorted(self.files):
            for (kind, key), obj in self.files[p].objects.items():
                by_kind[kind][key] = obj
        return out
