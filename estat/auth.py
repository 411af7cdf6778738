"""Write keys: which clients may post events, read from AUTH_TOKENS_FILE.

One key per line: `<key> <name> [<prefix segment>]`; `#` starts a comment.
The name labels the writer in logs; the optional segment (such as
`source=web`) puts that writer's objects under `{PREFIX}/<segment>/dt=…`.
A segment is Hive partitions (`name=value`, `/` between several), and
every segment of a file names the same partitions: a writer without one
gets each partition as `__HIVE_DEFAULT_PARTITION__` (what Hive, Spark,
Athena and DuckDB read as NULL), so every object under the prefix has the
same partition keys and readers see one table.
Keys are looked up by their SHA-256 digest, so the time a lookup takes says
nothing about the keys, and they are never logged.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Optional

from estat.model import unsafe_key_reason

_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")
DEFAULT_PARTITION = "__HIVE_DEFAULT_PARTITION__"


class TokensFileError(ValueError):
    """The tokens file cannot be used; the message names the line."""


@dataclass(frozen=True)
class Writer:
    """Who a key belongs to, and where their objects go."""

    name: str
    segment: str = ""


def _digest(key: bytes) -> bytes:
    return hashlib.sha256(key).digest()


def _partitions(segment: str, where: str) -> tuple[str, ...]:
    """The partition names of a segment (`source=web/team=a` → source, team)."""
    names = []
    for part in segment.split("/"):
        name, equals, value = part.partition("=")
        if not (name and equals and value) or "=" in value:
            raise TokensFileError(f"{where}: the prefix segment must be Hive partitions "
                                  "name=value, such as source=web.")
        names.append(name)
    return tuple(names)


def parse_tokens(text: str, source: str = "AUTH_TOKENS_FILE") -> dict[bytes, Writer]:
    """Parse a tokens file; raise TokensFileError naming the first bad line.
    Writers without a segment get the default partitions (module docstring)."""
    writers: dict[bytes, Writer] = {}
    layout: Optional[tuple[tuple[str, ...], int]] = None  # partition names, first line
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) > 3:
            raise TokensFileError(f"{source} line {number} has more than key, name and segment.")
        key = parts[0]
        if len(key) < 16:
            raise TokensFileError(f"{source} line {number}: a key must be at least 16 characters.")
        name = parts[1] if len(parts) > 1 else f"key{number}"
        if not _NAME.fullmatch(name):
            raise TokensFileError(f"{source} line {number}: the name must be 1-64 letters, "
                                  "digits, '.', '_' or '-'.")
        segment = parts[2].strip("/") if len(parts) > 2 else ""
        unsafe = unsafe_key_reason(segment) if segment else None
        if unsafe is not None:
            raise TokensFileError(f"{source} line {number}: the prefix segment {segment!r} "
                                  f"is not safe in an object key: {unsafe}.")
        if segment:
            names = _partitions(segment, f"{source} line {number}")
            if layout is None:
                layout = names, number
            elif names != layout[0]:
                raise TokensFileError(
                    f"{source} line {number}: the segment's partitions ({'/'.join(names)}) "
                    f"differ from line {layout[1]}'s ({'/'.join(layout[0])}); every segment "
                    "must name the same partitions so that readers see one layout.")
        digest = _digest(key.encode())
        if digest in writers:
            raise TokensFileError(f"{source} line {number} repeats a key.")
        writers[digest] = Writer(name, segment)
    if not writers:
        raise TokensFileError(f"{source} holds no keys.")
    if layout is not None:
        default = "/".join(f"{name}={DEFAULT_PARTITION}" for name in layout[0])
        writers = {digest: writer if writer.segment else Writer(writer.name, default)
                   for digest, writer in writers.items()}
    return writers


def partitions_of(writers: dict[bytes, Writer]) -> tuple[str, ...]:
    """The partition names every writer's segment has (none without segments)."""
    for writer in writers.values():
        return _partitions(writer.segment, "") if writer.segment else ()
    return ()


def read_tokens_file(path: str) -> dict[bytes, Writer]:
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    except OSError as error:
        raise TokensFileError(f"AUTH_TOKENS_FILE {path!r} cannot be read: "
                              f"{error.strerror}.") from None
    except UnicodeDecodeError:
        raise TokensFileError(f"AUTH_TOKENS_FILE {path!r} is not UTF-8 text.") from None
    return parse_tokens(text)


class WriteKeys:
    """The accepted keys; `reload` swaps them in at once (SIGHUP)."""

    def __init__(self, path: str, writers: dict[bytes, Writer]) -> None:
        self.path = path
        self._writers = writers

    @classmethod
    def from_file(cls, path: str) -> "WriteKeys":
        return cls(path, read_tokens_file(path))

    def reload(self) -> int:
        """Read the file again; on error keep the old keys and raise. A
        file whose segments name other partitions is refused too: the
        objects already written would no longer match the new ones."""
        writers = read_tokens_file(self.path)
        before, after = partitions_of(self._writers), partitions_of(writers)
        if before != after:
            raise TokensFileError(
                f"AUTH_TOKENS_FILE now names the partitions ({'/'.join(after) or 'none'}) "
                f"instead of ({'/'.join(before) or 'none'}): restart the server to change "
                "the object layout.")
        self._writers = writers
        return len(self._writers)

    def writer_for(self, authorization: Optional[bytes],
                   write_key: Optional[bytes]) -> tuple[Optional[Writer], str]:
        """(writer, "") when a key is valid, else (None, reason) with reason
        `auth_missing`, `auth_invalid` or `auth_conflict`.

        The key is the first non-empty one of `X-Write-Key` and a Bearer
        `Authorization`: an empty header is no key (a client library that
        always sends the header must not hide a valid Bearer token), and two
        different keys are refused rather than one picked silently."""
        key = write_key.strip() if write_key is not None else b""
        bearer = b""
        if authorization is not None:
            scheme, _, value = authorization.strip().partition(b" ")
            if scheme.lower() == b"bearer":
                bearer = value.strip()
        if key and bearer and key != bearer:
            return None, "auth_conflict"
        key = key or bearer
        if not key:
            return None, "auth_missing"
        writer = self._writers.get(_digest(key))
        if writer is None:
            return None, "auth_invalid"
        return writer, ""
