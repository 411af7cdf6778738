"""An SDK request's JSON, cut into its events without re-serializing them:
each element of a batch is kept as the exact bytes the client sent, and the
batch's shared members (`context`, `sentAt`, ...) as the exact bytes of
their values, so the stored line holds everything the client sent but its
write key.

The body is judged by orjson (strict RFC 8259, as `/collect` is); msgspec's
`Raw` then slices the same bytes, element by element, without building the
values. Pure functions: no I/O, no Twisted."""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import msgspec
import orjson

_members = msgspec.json.Decoder(dict[str, msgspec.Raw])
_elements = msgspec.json.Decoder(list[msgspec.Raw])


class EnvelopeError(ValueError):
    """The body is not what the protocol sends; `error` names why (the
    answer's `error`) and `details` says where."""

    def __init__(self, error: str, **details: object) -> None:
        super().__init__(error)
        self.error = error
        self.details = details


class Parsed(NamedTuple):
    """A request's body: its value (for reading ids and keys) and its
    bytes (for slicing)."""

    value: Any
    raw: bytes


def parse(body: bytes) -> Parsed:
    """The body's JSON value; raises EnvelopeError("invalid_json")."""
    raw = body.strip()
    try:
        return Parsed(orjson.loads(raw), raw)
    except orjson.JSONDecodeError:
        raise EnvelopeError("invalid_json", detail="invalid_json") from None


def members(raw: bytes) -> dict[str, bytes]:
    """The members of a JSON object, each value as its bytes as sent."""
    try:
        return {name: bytes(value) for name, value in _members.decode(raw).items()}
    except msgspec.DecodeError:
        raise EnvelopeError("invalid_json", detail="invalid_json") from None


def elements(raw: bytes) -> list[bytes]:
    """The elements of a JSON array, each as its bytes as sent."""
    try:
        return [bytes(value) for value in _elements.decode(raw)]
    except msgspec.DecodeError:
        raise EnvelopeError("invalid_json", detail="invalid_json") from None


def join_members(parts: dict[str, bytes]) -> bytes:
    """A JSON object of `parts` (values already JSON bytes). The names are
    written by orjson; the values stay as they were sent."""
    if not parts:
        return b"{}"
    return b"{" + b",".join(orjson.dumps(name) + b":" + value
                            for name, value in parts.items()) + b"}"


def without(parsed: Parsed, names: frozenset[str]) -> bytes:
    """The object's bytes as sent, or, when it has one of `names` (a write
    key), the object without those members: the other members' values stay
    as sent (only the whitespace between members is not kept)."""
    if not any(name in parsed.value for name in names):
        return parsed.raw
    kept = {name: value for name, value in members(parsed.raw).items() if name not in names}
    return join_members(kept)


def envelope_of(raw: bytes, leave_out: frozenset[str]) -> bytes:
    """A batch's shared members (all but `leave_out`: the batch itself and
    the write key), as one JSON object of the values as sent."""
    return join_members({name: value for name, value in members(raw).items()
                         if name not in leave_out})


def stored_body(protocol: bytes, call: bytes, message: bytes, envelope: bytes) -> bytes:
    """What is stored for one SDK event: `{"protocol":…,"call":…,
    "message":<the event as sent>,"envelope":<the batch's shared members>}`
    (`protocol` and `call` are plain ASCII names)."""
    return b"".join((b'{"protocol":"', protocol, b'","call":"', call, b'","message":',
                     message, b',"envelope":', envelope, b"}"))


def text_of(value: Any) -> Optional[bytes]:
    """A string member's value as UTF-8 bytes, None for anything else."""
    if isinstance(value, str) and value:
        return value.encode("utf-8", "surrogatepass")
    return None
