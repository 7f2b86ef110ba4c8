"""PATCH for the fake API server, as kube-apiserver answers it (a double of the protocol, not of a client).

JSON merge patch (RFC 7386, Content-Type application/merge-patch+json): objects merge key by key, `null`
removes a key, anything else (lists included) replaces. On top of the RFC, what the API server does
with the result (k8s.io/apiserver's patch handler and the resources' update strategies):
  - `metadata.resourceVersion` in the patch is a precondition: a different one is 409 Conflict;
  - the patched object must keep its name and namespace (400 otherwise);
  - `status` is a subresource for Services, Nodes and Pods: a patch of the main resource leaves it as it
    was; identity fields (uid, creationTimestamp) are the stored ones;
  - a patch that changes nothing is answered with the stored object, without a new resourceVersion or
    a watch event; otherwise the resourceVersion is bumped and watchers get MODIFIED;
  - `generation` moves only when something other than metadata and status changed.
Other patch types (JSON patch, strategic merge, server-side apply) get 415: this double does not speak them.
"""
from __future__ import annotations

import copy
from typing import Any

MERGE_PATCH = "application/merge-patch+json"
ACCEPTED = ("application/json-patch+json", MERGE_PATCH, "application/apply-patch+yaml",
            "application/strategic-merge-patch+json")  # what a real server lists in its 415 answer
STATUS_SUBRESOURCE = ("Service", "Node", "Pod")


class PatchError(Exception):
    """A patch the server refuses: the HTTP code and the Status reason and message."""

    def __init__(self, code: int, reason: str, message: str):
        super().__init__(message)
        self.code, self.reason, self.message = code, reason, message


def merge(target: Any, patch: Any) -> Any:
    """RFC 7386 section 2, MergePatch(Target, Patch)."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = merge(out.get(key), value)
    return out


def check_content_type(header: str | None) -> None:
    ctype = (header or "").split(";")[0].strip().lower()
    if ctype != MERGE_PATCH:
        if ctype in ACCEPTED:
            raise PatchError(415, "UnsupportedMediaType",
                             f"{ctype}: the fake API server implements only {MERGE_PATCH}")
        raise PatchError(415, "UnsupportedMediaType",
                         f"the body of the request was in an unknown format - accepted media types include: "
                         f"{', '.join(ACCEPTED)}")


def patched(kind: str, old: dict, patch: Any) -> dict:
    """The stored object `old` (no kind/apiVersion) after `patch`, with the server's rules applied."""
    if not isinstance(patch, dict):
        raise PatchError(400, "BadRequest", "the patch is not a JSON object")
    meta_patch = patch.get("metadata") if isinstance(patch.get("metadata"), dict) else {}
    want_rv = meta_patch.get("resourceVersion")
    if want_rv is not None and want_rv != old["metadata"]["resourceVersion"]:
        name = old["metadata"]["name"]
        raise PatchError(409, "Conflict", f'Operation cannot be fulfilled on {kind.lower()}s "{name}": the object '
                                          f"has been modified; please apply your changes to the latest version and try again")
    new = merge(old, {k: v for k, v in patch.items() if k not in ("kind", "apiVersion")})
    meta = new.get("metadata")
    if not isinstance(meta, dict):
        raise PatchError(400, "BadRequest", "metadata: the patch removed it or made it not an object")
    for field in ("name", "namespace"):
        if meta.get(field) != old["metadata"].get(field):
            raise PatchError(400, "BadRequest", f"metadata.{field}: the patch cannot change it "
                                                f"({old['metadata'].get(field)!r} → {meta.get(field)!r})")
    for field in ("uid", "creationTimestamp", "resourceVersion", "generation"):
        if field in old["metadata"]:
            meta[field] = old["metadata"][field]
    for field in ("annotations", "labels"):  # an emptied map is not stored (omitempty)
        if meta.get(field) == {}:
            del meta[field]
    if kind in STATUS_SUBRESOURCE:
        if "status" in old:
            new["status"] = copy.deepcopy(old["status"])
        else:
            new.pop("status", None)
    return new


def spec_changed(old: dict, new: dict) -> bool:
    """Whether anything but metadata and status changed (generation then moves)."""
    strip = lambda o: {k: v for k, v in o.items() if k not in ("metadata", "status")}  # noqa: E731
    return strip(old) != strip(new)
