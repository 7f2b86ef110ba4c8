"""Errors an object carries although it was applied (an EndpointSlice port without a valid `port`,
dropped alone: model/parse.py), turned into the ObjectErrors every source reports, so they are
counted and shown beside those of the objects skipped whole."""
from __future__ import annotations

from ..model.objects import ObjectError


def carried_errors(source: str, obj) -> list[ObjectError]:
    """One ObjectError per message in obj.errors ("Kind ns/name: field: message"), naming the field."""
    kind, key = type(obj).__name__, str(obj.key)
    out = []
    for msg in getattr(obj, "errors", ()) or ():
        rest = msg.removeprefix(f"{kind} {key}: ")
        field, sep, message = rest.partition(": ")
        out.append(ObjectError(source, kind, key, field, message) if sep else ObjectError(source, kind, key, "-", rest))
    return out
