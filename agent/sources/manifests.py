"""The embedded default source: a directory of Kubernetes manifests, watched for changes.

Every *.yaml / *.yml / *.json file is read (multi-document YAML and `kind: List` included). A file
whose text changes is parsed again; a bad object is reported once (file, object, field) and skipped.
An object that was good before and is now broken keeps its last good version, and a file that no
longer parses keeps all of its last good objects, so an editing mistake never takes a working Service
out of the datapath. Removing a file removes its objects.

Nothing one file holds can stop the others: whatever goes wrong reading or decoding it (too deep,
wrong types, not UTF-8, too big, not a regular file, gone mid-read, a dangling symlink) becomes one
error naming that file, and the next file is read as if nothing happened. Symlinks to files are
followed (a ConfigMap volume is symlinks into `..data/`); hidden entries (`..data`, `.swp`) are not read.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

from ..model.objects import EndpointSlice, ObjectError, ObjectKey, Objects, Pod, Service
from ..model.parse import PARSERS, InvalidObject

log = logging.getLogger("nodewire.manifests")
PARSED = (Service, EndpointSlice, Pod)
SUFFIXES = (".yaml", ".yml", ".json")
_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
# A 100k-Service × 5-endpoint JSON file is ~80 MiB; past this a file is refused, not read into memory.
MAX_FILE_BYTES = 256 << 20
# Kubernetes objects nest about ten levels deep. libyaml's composer recurses in C and crashes the
# process (SIGSEGV) near 50k levels, so YAML nesting is checked on the event stream before composing;
# JSON's decoder stops itself at the interpreter's recursion limit (RecursionError).
MAX_YAML_DEPTH = 256


class FileError(Exception):
    """A whole file could not be read or decoded; `where` says which part (content, line 3, …)."""

    def __init__(self, where: str, message: str):
        super().__init__(message)
        self.where, self.message = where, message


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
    parser = PARSERS.get(kind) if isinstance(kind, str) else None
    if parser is None or not isinstance(d.get("metadata"), dict):
        return d
    try:
        return parser(d)
    except Exception as e:  # InvalidObject, or a shape the parser did not foresee: this object only
        return _Rejected(_as_invalid(kind, d, e), kind, _ident(kind, d))


def _ident(kind: str, d: dict) -> tuple[str, ObjectKey] | None:
    meta = d.get("metadata") if isinstance(d.get("metadata"), dict) else {}
    name, ns = meta.get("name"), meta.get("namespace") or "default"
    return (kind, ObjectKey(ns, name)) if isinstance(name, str) and isinstance(ns, str) else None


def _as_invalid(kind: str, d: dict, e: Exception) -> InvalidObject:
    if isinstance(e, InvalidObject):
        return e
    ident = _ident(kind, d)
    return InvalidObject(kind, str(ident[1]) if ident else "?", "-", f"cannot decode: {type(e).__name__}: {e}")


def _documents(path: Path, text: str) -> list[Any]:
    if path.suffix == ".json":
        return [json.loads(text, object_hook=_parse_in_place)]
    _check_yaml_depth(text)
    return [d for d in yaml.load_all(text, Loader=_Loader) if d is not None]


def _check_yaml_depth(text: str) -> None:
    depth = 0
    for ev in yaml.parse(text, Loader=_Loader):
        if isinstance(ev, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
            depth += 1
            if depth > MAX_YAML_DEPTH:
                mark = ev.start_mark
                raise FileError(f"line {mark.line + 1}" if mark else "content",
                                f"nested deeper than {MAX_YAML_DEPTH} levels")
        elif isinstance(ev, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
            depth -= 1


def _expand(doc: Any, path: str = "") -> list[Any]:
    """The objects of one document: itself, or the items of a `kind: *List` (a List of Lists too)."""
    if isinstance(doc, dict) and isinstance(doc.get("kind"), str) and doc["kind"].endswith("List"):
        items = doc.get("items")
        if items is None:
            return []
        if not isinstance(items, list):
            raise FileError(f"{path}items", f"expected a list, got {type(items).__name__} {str(items)[:40]}")
        return [i for n, item in enumerate(items) for i in _expand(item, f"{path}items[{n}].")]
    return [doc]


def read_manifest(path: Path, limit: int) -> str:
    """The text of one manifest file. FileError when it is not a readable, regular, UTF-8 file under
    `limit` bytes; FileNotFoundError when it vanished (the caller treats it as removed)."""
    try:  # O_NONBLOCK: a FIFO put in the file's place must not block the source
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        if os.path.islink(path):
            raise FileError("content", f"dangling symlink to {os.readlink(path)}") from None
        raise
    except OSError as e:
        what = "symlink loop" if e.errno == errno.ELOOP else e.strerror
        raise FileError("content", f"cannot open: {what}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise FileError("content", "not a regular file")
        if st.st_size > limit:
            raise FileError("content", f"{st.st_size} bytes: larger than the limit of {limit} bytes; not read")
        chunks, size = [], 0
        while size <= limit:
            b = os.read(fd, min(1 << 24, limit + 1 - size))
            if not b:
                break
            chunks.append(b)
            size += len(b)
        if size > limit:  # grew while read
            raise FileError("content", f"larger than the limit of {limit} bytes; not read")
    except OSError as e:
        raise FileError("content", f"cannot read: {e.strerror or e}") from None
    finally:
        os.close(fd)
    try:
        return b"".join(chunks).decode("utf-8")
    except UnicodeDecodeError as e:
        raise FileError(f"byte {e.start}", "not valid UTF-8") from None


def parse_file(path: Path, text: str, previous: dict | None = None) -> tuple[dict, list[ObjectError]]:
    """Objects of one file keyed by (kind, key), and the errors found. Pure but for logging."""
    previous = previous or {}
    try:
        docs = [i for d in _documents(path, text) for i in _expand(d)]
    except FileError as e:
        return dict(previous), [ObjectError(str(path), "File", "-", e.where, e.message)]
    except (yaml.YAMLError, json.JSONDecodeError) as e:
        line = getattr(getattr(e, "problem_mark", None), "line", None)
        where = f"line {line + 1}" if line is not None else getattr(e, "msg", "syntax")
        msg = str(getattr(e, "problem", None) or e).splitlines()[0]
        return dict(previous), [ObjectError(str(path), "File", "-", where, f"cannot parse: {msg}")]
    except (RecursionError, MemoryError) as e:
        return dict(previous), [ObjectError(str(path), "File", "-", "content",
                                            f"cannot parse: {type(e).__name__} (nested too deep or too large)")]
    objs: dict = {}
    errors: list[ObjectError] = []
    for i, doc in enumerate(docs):
        if isinstance(doc, _Rejected):
            errors.append(doc.error.as_error(str(path)))
            if doc.ident in previous:
                objs[doc.ident] = previous[doc.ident]
            continue
        if isinstance(doc, PARSED):  # already parsed by the JSON hook
            objs[(type(doc).__name__, doc.key)] = doc
            continue
        if not isinstance(doc, dict):
            errors.append(ObjectError(str(path), "Object", f"document {i}", "-",
                                      f"expected an object, got {type(doc).__name__}"))
            continue
        kind = doc.get("kind")
        parser = PARSERS.get(kind) if isinstance(kind, str) else None
        if parser is None:
            if kind is None:
                errors.append(ObjectError(str(path), "Object", f"document {i}", "kind", "missing"))
            continue  # other kinds (Deployments, ConfigMaps, …) are not ours to read
        try:
            obj = parser(doc)
        except Exception as e:  # InvalidObject, or a shape the parser did not foresee: this object only
            errors.append(_as_invalid(kind, doc, e).as_error(str(path)))
            ident = _ident(kind, doc)
            if ident in previous:
                objs[ident] = previous[ident]
            continue
        objs[(kind, obj.key)] = obj
    return objs, errors


class ManifestSource:
    """Polls a directory (mtime + size per file; cheap) and re-parses only the files that changed."""

    def __init__(self, directory: str | os.PathLike, on_error: Callable[[ObjectError], None] | None = None,
                 max_file_bytes: int = MAX_FILE_BYTES):
        self.directory = Path(directory)
        self.max_file_bytes = max_file_bytes
        self.files: dict[Path, _FileState] = {}
        self.on_error = on_error or (lambda err: log.error("bad object: %s", err))
        if not self.directory.is_dir():
            raise FileNotFoundError(f"--manifests: {self.directory} is not a directory")

    def _scan(self) -> dict[Path, tuple[int, int, int]]:
        """Manifest files → (mtime, size, inode) of what they point to; (0, 0, 0) when that cannot
        be stat'ed (a dangling symlink: read_manifest names the problem)."""
        out = {}
        for root, dirs, names in os.walk(self.directory):
            dirs[:] = [d for d in dirs if not d.startswith(".")]  # ..data, ..2026_… of a ConfigMap volume
            for n in names:
                if n.endswith(SUFFIXES) and not n.startswith("."):
                    p = Path(root, n)
                    try:
                        st = p.stat()
                        out[p] = (st.st_mtime_ns, st.st_size, st.st_ino)
                    except FileNotFoundError:
                        if p.is_symlink():
                            out[p] = (0, 0, 0)
                    except OSError:  # a symlink loop, a permission problem: read_manifest says which
                        out[p] = (0, 0, 0)
        return out

    def _read(self, p: Path, stamp: tuple[int, int, int], previous: _FileState | None) -> _FileState | None:
        """The new state of one file (stamp: what the scan saw; a later change is seen by the next
        scan); None when it vanished before it could be read."""
        prev = previous.objects if previous else {}
        try:
            return _FileState(stamp, *parse_file(p, read_manifest(p, self.max_file_bytes), prev))
        except FileNotFoundError:
            return None
        except FileError as e:
            return _FileState(stamp, dict(prev), [ObjectError(str(p), "File", "-", e.where, e.message)])
        except Exception as e:  # never let one file stop the source: the file keeps its last good objects
            log.exception("unexpected error reading %s", p)
            return _FileState(stamp, dict(prev), [ObjectError(str(p), "File", "-", "content",
                                                              f"cannot read: {type(e).__name__}: {e}")])

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
            new = self._read(p, stamp, st)
            if new is None:  # gone between the scan and the read: removed, as the next scan will see
                if self.files.pop(p, None) is not None:
                    changed = True
                continue
            self.files[p] = new
            old_errors = set(st.errors) if st else set()
            for err in new.errors:
                if err not in old_errors:
                    self.on_error(err)
            changed = True
        return changed

    @property
    def errors(self) -> list[ObjectError]:
        return [e for st in self.files.values() for e in st.errors]

    def objects(self) -> Objects:
        out = Objects()
        by_kind = {"Service": out.services, "EndpointSlice": out.slices, "Pod": out.pods, "Node": out.nodes}
        for p in sorted(self.files):
            for (kind, key), obj in self.files[p].objects.items():
                by_kind[kind][key] = obj
        return out
