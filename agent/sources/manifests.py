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
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

from ..model.objects import EndpointSlice, Node, ObjectError, ObjectKey, Pod, Service
from ..model.parse import PARSERS, InvalidObject
from .. import memory
from ..state import ClusterState

log = logging.getLogger("nodewire.manifests")
try:
    from ..model import decode
except ImportError:  # a venv made before msgspec was pinned: every file goes the general way (slower, same result)
    decode = None  # type: ignore[assignment]
PARSED = (Service, EndpointSlice, Pod, Node)
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


@dataclass
class ParsedFile:
    """What one read of a file yields: its objects, the objects it names but that failed to parse
    (each keeps its last good version), and the errors."""
    objects: dict[tuple[str, ObjectKey], Any] = field(default_factory=dict)
    rejected: set[tuple[str, ObjectKey]] = field(default_factory=set)
    errors: list[ObjectError] = field(default_factory=list)


def parse_file(path: Path, text: str) -> ParsedFile:
    """The objects of one file, keyed by (kind, key). Raises FileError when the file as a whole
    cannot be decoded."""
    fast = decode.documents(text) if decode is not None and path.suffix == ".json" else None
    try:
        docs = fast if fast is not None else [i for d in _documents(path, text) for i in _expand(d)]
    except (yaml.YAMLError, json.JSONDecodeError) as e:
        line = getattr(getattr(e, "problem_mark", None), "line", None)
        where = f"line {line + 1}" if line is not None else getattr(e, "msg", "syntax")
        msg = str(getattr(e, "problem", None) or e).splitlines()[0]
        raise FileError(where, f"cannot parse: {msg}") from None
    except (RecursionError, MemoryError) as e:
        raise FileError("content", f"cannot parse: {type(e).__name__} (nested too deep or too large)") from None
    out = ParsedFile()
    for i, doc in enumerate(docs):
        if isinstance(doc, _Rejected):
            out.errors.append(doc.error.as_error(str(path)))
            if doc.ident is not None:
                out.rejected.add(doc.ident)
            continue
        if isinstance(doc, PARSED):  # already parsed by the JSON hook
            out.objects[(type(doc).__name__, doc.key)] = doc
            continue
        if not isinstance(doc, dict):
            out.errors.append(ObjectError(str(path), "Object", f"document {i}", "-",
                                          f"expected an object, got {type(doc).__name__}"))
            continue
        kind = doc.get("kind")
        parser = PARSERS.get(kind) if isinstance(kind, str) else None
        if parser is None:
            if kind is None:
                out.errors.append(ObjectError(str(path), "Object", f"document {i}", "kind", "missing"))
            continue  # other kinds (Deployments, ConfigMaps, …) are not ours to read
        try:
            obj = parser(doc)
        except Exception as e:  # InvalidObject, or a shape the parser did not foresee: this object only
            out.errors.append(_as_invalid(kind, doc, e).as_error(str(path)))
            ident = _ident(kind, doc)
            if ident is not None:
                out.rejected.add(ident)
            continue
        out.objects[(kind, obj.key)] = obj
    for (kind, key), obj in out.objects.items():  # parts of an object left out (a slice's bad port): named
        out.errors.extend(ObjectError(str(path), kind, str(key), field, msg) for field, msg in getattr(obj, "errors", ()))
    return out


@dataclass
class _FileState:
    stamp: tuple[int, int, int]
    keys: dict[str, list[ObjectKey]] = field(default_factory=dict)  # kind → keys this file holds in the state
    errors: list[ObjectError] = field(default_factory=list)


class ManifestSource:
    """Pushes a directory's objects into ClusterState from its own thread; re-reads only changed files.

    Changes are noticed through inotify (watchfiles) when it works, else by polling mtime/size/inode
    every poll_interval; a full scan (stat of each file, cheap) decides what is re-read either way.
    An object defined by two files is an error naming both: the definition read first stays.
    """

    def __init__(self, directory: str | os.PathLike, state: ClusterState,
                 on_errors: Callable[[list[ObjectError]], None] | None = None,
                 max_file_bytes: int = MAX_FILE_BYTES, poll_interval: float = 0.2, watch: bool = True):
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise FileNotFoundError(f"--manifests: {self.directory} is not a directory")
        self.state = state
        self.max_file_bytes = max_file_bytes
        self.poll_interval = poll_interval
        self.use_inotify = watch
        self.files: dict[Path, _FileState] = {}
        self.on_errors = on_errors or (lambda errs: [log.error("bad object: %s", e) for e in errs])
        self.watcher = "none"  # inotify | poll, once started
        self.synced = threading.Event()  # the first complete scan is in the state
        self.last_change = 0.0  # wall-clock time a file change last reached the state
        self._shadowed: dict[tuple[str, ObjectKey], list[Path]] = {}  # duplicate definitions ignored
        self._owner: dict[tuple[str, ObjectKey], Path] = {}  # every object this source put in the state → its file
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- one pass -------------------------------------------------------------------------------
    def poll(self) -> bool:
        """Read what changed on disk into the state. True when some file was (re)read or removed."""
        seen = self._scan()
        changed = False
        for p in sorted(set(self.files) - set(seen)):
            self._forget(p)
            changed = True
        for p in sorted(seen):
            if self._stop.is_set():  # stopped mid-read (the agent's start failed): no use reading the rest
                break
            st = self.files.get(p)
            if st is not None and st.stamp == seen[p]:
                continue
            self._read(p, seen[p], st)
            changed = True
        if changed:
            self.last_change = time.time()
            self.state.wake()  # the agent loop looks even when only errors changed
        return changed

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

    def _read(self, p: Path, stamp: tuple[int, int, int], previous: _FileState | None) -> None:
        """Parse one file and push the difference into the state; never raises."""
        old_errors = set(previous.errors) if previous else set()
        try:
            parsed = parse_file(p, read_manifest(p, self.max_file_bytes))
        except FileNotFoundError:  # gone between the scan and the read: removed, as the next scan will see
            self._forget(p)
            return
        except FileError as e:  # the whole file: it keeps every object it had
            parsed = None
            errors = [ObjectError(str(p), "File", "-", e.where, e.message)]
        except Exception as e:  # never let one file stop the source
            log.exception("unexpected error reading %s", p)
            parsed = None
            errors = [ObjectError(str(p), "File", "-", "content", f"cannot read: {type(e).__name__}: {e}")]
        if parsed is None:
            self.files[p] = _FileState(stamp, previous.keys if previous else {}, errors)
        else:
            errors = parsed.errors
            self.files[p] = _FileState(stamp, self._push(p, parsed, previous), errors)
        new = [e for e in errors if e not in old_errors]
        if new:
            self.on_errors(new)

    def _push(self, p: Path, parsed: ParsedFile, previous: _FileState | None) -> dict[str, list[ObjectKey]]:
        """Apply one file's new objects and removals to the state; returns the keys it now holds."""
        had = {kind: set(keys) for kind, keys in (previous.keys if previous else {}).items()}
        holds: dict[str, list[ObjectKey]] = {}
        changes: list[tuple[str, ObjectKey, Any]] = []
        dups: list[tuple[str, ObjectKey]] = []
        for (kind, key), obj in parsed.objects.items():
            owner = self._owner.get((kind, key))  # (no Path comparison for a new object: 200k at start-up)
            if owner is not None and owner != p:  # another file defines it
                dups.append((kind, key))
                continue
            holds.setdefault(kind, []).append(key)
            changes.append((kind, key, obj))
        for kind, key in parsed.rejected:  # a broken edit keeps the object's last good version
            if key in had.get(kind, ()) and (kind, key) not in parsed.objects:
                holds.setdefault(kind, []).append(key)
        kept = {kind: set(keys) for kind, keys in holds.items()}
        for kind, keys in had.items():
            changes.extend((kind, key, None) for key in keys - kept.get(kind, set()))
        self.state.apply_all(changes)
        gone = [(kind, key) for kind, key, obj in changes if obj is None]
        self._own(p, holds, gone)
        if dups:
            self._duplicates(p, dups)
        self._release(gone)
        return holds

    def _forget(self, p: Path) -> None:
        """A removed file: its objects leave the state."""
        st = self.files.pop(p, None)
        if st is None:
            return
        changes = [(kind, key, None) for kind, keys in st.keys.items() for key in keys]
        self.state.apply_all(changes)
        gone = [(kind, key) for kind, key, _ in changes]
        self._own(p, {}, gone)
        self._release(gone)

    def _own(self, p: Path, holds: dict[str, list[ObjectKey]], gone: list[tuple[str, ObjectKey]]) -> None:
        """Which file each object came from: what this source knows, not what the state holds."""
        for ident in gone:
            if self._owner.get(ident) == p:
                del self._owner[ident]
        for kind, keys in holds.items():
            for key in keys:
                self._owner[(kind, key)] = p

    def _duplicates(self, p: Path, dups: list[tuple[str, ObjectKey]]) -> None:
        errs = []
        for ident in dups:
            self._shadowed.setdefault(ident, []).append(p)
            other = self._owner.get(ident, "another file")
            errs.append(ObjectError(str(p), ident[0], str(ident[1]), "metadata.name",
                                    f"also defined in {other}; ignored here while that definition exists"))
        self.on_errors(errs)

    def _release(self, gone: list[tuple[str, ObjectKey]]) -> None:
        """Objects that left the state: a file whose duplicate definition was ignored is read again."""
        if not self._shadowed:
            return
        for ident in gone:
            for q in self._shadowed.pop(ident, ()):
                if q in self.files:
                    self.files[q].stamp = (-1, -1, -1)  # re-read at the next pass
                    self.state.wake()

    # -- the thread -----------------------------------------------------------------------------
    def start(self) -> "ManifestSource":
        self._thread = threading.Thread(target=self._run, name="manifests", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)

    def wait_synced(self, timeout: float | None = None) -> bool:
        return self.synced.wait(timeout)

    def _run(self) -> None:
        first = True
        while not self._stop.is_set():
            try:
                if self.use_inotify and self._watch(first):
                    continue
                self.watcher = "poll"
                if first:
                    self._first_read()
                    first = False
                self._stop.wait(self.poll_interval)
                self._safe_poll()
            except Exception:  # pragma: no cover - a bug: keep the source alive
                log.exception("manifest source error; polling again")
                self._stop.wait(1.0)

    def _first_read(self) -> None:
        t0, c0 = time.perf_counter(), time.thread_time()
        with memory.bulk():  # the big one
            self._safe_poll()
        log.info("manifests read files=%d objects=%d seconds=%.3f cpu_seconds=%.3f watcher=%s", len(self.files),
                 sum(len(k) for st in self.files.values() for k in st.keys.values()), time.perf_counter() - t0,
                 time.thread_time() - c0, self.watcher)
        self.synced.set()

    def _watch(self, first: bool) -> bool:
        """inotify (watchfiles' notify binding): the watch is set up before the directory is scanned,
        so no change can fall between the two; each batch of events is followed by a scan. False
        when inotify is not available (then the caller polls)."""
        try:
            from watchfiles._rust_notify import RustNotify  # what watchfiles.watch() wraps
        except ImportError:
            return False
        try:
            with RustNotify([str(self.directory)], False, False, 0, True, True) as notify:
                self.watcher = "inotify"
                self._first_read() if first else self._safe_poll()
                while not self._stop.is_set():
                    # step: a batch ends 20 ms after its last event; debounce: at most 200 ms of
                    # grouping; every 30 s without events a scan anyway (a safety net).
                    got = notify.watch(200, 20, 30_000, self._stop)
                    if got == "stop":
                        break
                    self._safe_poll()
            return True
        except Exception as e:  # inotify limits, an unwatchable filesystem: fall back to polling
            log.warning("manifests: inotify watch failed, polling every %.1fs err=%s", self.poll_interval, e)
            self.use_inotify = False
            if not self.synced.is_set():
                self._first_read()
            return False

    def _safe_poll(self) -> None:
        try:
            self.poll()
        except Exception:
            log.exception("manifest poll failed; trying again at the next change")

    @property
    def errors(self) -> list[ObjectError]:
        return [e for st in self.files.values() for e in st.errors]
