"""The on-disk format of the dead-letter directory, as plain blocking
functions shared by the server (which runs them on its thread pool) and the
`estat-dlq` CLI. No Twisted here.

Layout (see docs/dlq.md)::

    DLQ_DIR/<created ms>-<kind>-<batch id>-<random>/data.gz    the object
    DLQ_DIR/<created ms>-<kind>-<batch id>-<random>/meta.json  what it is
    DLQ_DIR/.tmp-*        an entry being written or deleted (never an entry)
    DLQ_DIR/quarantine/   entries that could not be read, kept for a human

Names sort by creation time, so sorting them gives oldest first. An entry is
created by renaming a complete, fsync'd temporary directory into place, so a
crash leaves either a whole entry or a `.tmp-` leftover. Whoever uploads or
deletes an entry first takes a non-blocking `flock` on the entry directory,
so the server's drain and the CLI never work on the same entry at once.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import secrets
import shutil
from dataclasses import dataclass, field
from typing import Any, Optional

from estat.codec import verify_gzip
from estat.model import EncodedObject
from estat.stores.base import StoreError
from estat.stores import fsutil

DATA = "data.gz"
META = "meta.json"
QUARANTINE = "quarantine"
TMP_PREFIX = ".tmp-"
FORMAT = 1
MAX_MESSAGE = 1000

_INT_FIELDS = ("event_count", "uncompressed_bytes", "compressed_bytes", "first_ts_ms",
               "last_ts_ms", "created_at_ms", "attempts")
_STR_FIELDS = ("key", "batch_id", "kind")


class EntryError(ValueError):
    """An entry cannot be used: the message says why, in a few words."""


def entry_name(created_ms: int, obj: EncodedObject) -> str:
    """A new entry's directory name: sorts by time, unique, filename-safe."""
    batch = re.sub(r"[^A-Za-z0-9_-]", "_", obj.batch_id)[:40] or "batch"
    kind = re.sub(r"[^A-Za-z0-9_-]", "_", obj.kind)[:16] or "events"
    return f"{created_ms:013d}-{kind}-{batch}-{secrets.token_hex(3)}"


def error_record(error: StoreError, now_ms: int) -> dict[str, Any]:
    return {
        "reason": error.reason,
        "code": error.code,
        "message": error.message[:MAX_MESSAGE],
        "retryable": bool(error.retryable),
        "at_ms": now_ms,
    }


def make_meta(obj: EncodedObject, error: StoreError, created_ms: int,
              version: str) -> dict[str, Any]:
    """meta.json of a new entry; `attempts` counts the store.put calls so
    far (the uploader's one, whatever its app-level retries)."""
    return {
        "format": FORMAT,
        "key": obj.key,
        "batch_id": obj.batch_id,
        "kind": obj.kind,
        "event_count": obj.event_count,
        "uncompressed_bytes": obj.uncompressed_bytes,
        "compressed_bytes": len(obj.data),
        "first_ts_ms": obj.first_ts_ms,
        "last_ts_ms": obj.last_ts_ms,
        "created_at_ms": created_ms,
        "attempts": 1,
        "last_error": error_record(error, created_ms),
        "server_version": version,
    }


def encode_meta(meta: dict[str, Any]) -> bytes:
    return json.dumps(meta, indent=1, sort_keys=True).encode() + b"\n"


def record_failure(meta: dict[str, Any], error: StoreError, now_ms: int) -> dict[str, Any]:
    """meta after one more failed upload."""
    updated = dict(meta)
    updated["attempts"] = int(meta.get("attempts", 0)) + 1
    updated["last_error"] = error_record(error, now_ms)
    return updated


def entry_size(data: bytes, meta: bytes) -> int:
    """Bytes an entry takes on disk (its data.gz and meta.json), as the
    budget and the gauges count them."""
    return len(data) + len(meta)


def write_entry(root: str, name: str, data: bytes, meta: bytes) -> None:
    """Commit one entry: temp dir, fsync each file and the dir, rename into
    place, fsync DLQ_DIR. Raises OSError (nothing is left behind then)."""
    os.makedirs(root, exist_ok=True)
    temporary = os.path.join(root, TMP_PREFIX + name)
    os.mkdir(temporary)
    try:
        fsutil.write_file(os.path.join(temporary, DATA), data)
        fsutil.write_file(os.path.join(temporary, META), meta)
        fsutil.fsync_directory(temporary)
        os.rename(temporary, os.path.join(root, name))
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    fsutil.fsync_directory(root)


def entry_names(root: str) -> list[str]:
    """Committed entry names, oldest first (temporaries and the quarantine
    folder are not entries; stray files are, and fail to read)."""
    try:
        names = os.listdir(root)
    except FileNotFoundError:
        return []
    return sorted(n for n in names if not n.startswith(".") and n != QUARANTINE)


def check_meta(meta: Any) -> dict[str, Any]:
    if not isinstance(meta, dict):
        raise EntryError("meta.json is not a JSON object")
    for name in _INT_FIELDS:
        if not isinstance(meta.get(name), int) or isinstance(meta.get(name), bool):
            raise EntryError(f"meta.json has no whole number {name!r}")
    for name in _STR_FIELDS:
        if not isinstance(meta.get(name), str) or not meta[name]:
            raise EntryError(f"meta.json has no {name!r}")
    key = meta["key"]
    if key.startswith("/") or any(part in ("", ".", "..") for part in key.split("/")):
        raise EntryError(f"meta.json has an unsafe key {key!r}")
    return meta


def read_meta(root: str, name: str) -> dict[str, Any]:
    """Parse and check meta.json; EntryError if it is unusable."""
    path = os.path.join(root, name)
    if not os.path.isdir(path):
        raise EntryError("not an entry directory")
    try:
        with open(os.path.join(path, META), "rb") as handle:
            raw = handle.read()
    except FileNotFoundError:
        raise EntryError("meta.json is missing") from None
    try:
        meta = json.loads(raw)
    except ValueError as error:
        raise EntryError(f"meta.json is not valid JSON ({error})") from None
    return check_meta(meta)


@dataclass
class Entry:
    """One readable entry: its name, checked meta and verified data."""

    name: str
    meta: dict[str, Any]
    data: bytes
    lock_fd: Optional[int] = field(default=None, repr=False)

    def as_object(self) -> EncodedObject:
        """The object to re-upload: same key, so a re-upload overwrites."""
        m = self.meta
        return EncodedObject(
            key=m["key"], data=self.data, event_count=m["event_count"],
            uncompressed_bytes=m["uncompressed_bytes"], first_ts_ms=m["first_ts_ms"],
            last_ts_ms=m["last_ts_ms"], batch_id=m["batch_id"], kind=m["kind"])


def read_entry(root: str, name: str) -> Entry:
    """Read an entry and verify its gzip; EntryError if anything is off."""
    meta = read_meta(root, name)
    try:
        with open(os.path.join(root, name, DATA), "rb") as handle:
            data = handle.read()
    except FileNotFoundError:
        raise EntryError("data.gz is missing") from None
    if len(data) != meta["compressed_bytes"]:
        raise EntryError(f"data.gz holds {len(data)} bytes, meta.json says "
                         f"{meta['compressed_bytes']}")
    try:
        verify_gzip(data, meta["uncompressed_bytes"])
    except ValueError as error:
        raise EntryError(f"data.gz does not verify: {error}") from None
    return Entry(name, meta, data)


def remove_temporaries(root: str) -> list[str]:
    """Delete leftovers of interrupted writes, updates and deletes: `.tmp-*`
    in DLQ_DIR and `.*.tmp` files inside entries. Returns what went."""
    removed = []
    for name in os.listdir(root):
        path = os.path.join(root, name)
        if name.startswith(TMP_PREFIX):
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path)
            else:
                os.unlink(path)
            removed.append(name)
        elif not name.startswith(".") and name != QUARANTINE and os.path.isdir(path):
            for inner in os.listdir(path):
                if inner.startswith(".") and inner.endswith(".tmp"):
                    os.unlink(os.path.join(path, inner))
                    removed.append(f"{name}/{inner}")
    return removed


def quarantine(root: str, name: str, reason: str) -> str:
    """Move an unreadable entry to quarantine/ (never delete it) with a
    QUARANTINED.txt saying why. Returns where it went."""
    folder = os.path.join(root, QUARANTINE)
    os.makedirs(folder, exist_ok=True)
    target = os.path.join(folder, name)
    if os.path.lexists(target):
        target = f"{target}.{secrets.token_hex(3)}"
    os.rename(os.path.join(root, name), target)
    fsutil.fsync_directory(root)
    if os.path.isdir(target):
        try:
            with open(os.path.join(target, "QUARANTINED.txt"), "w") as handle:
                handle.write(reason + "\n")
        except OSError:
            pass
    return target


@dataclass
class Scan:
    """What `open_directory` found."""

    entries: dict[str, tuple[int, int]]  # name -> (bytes, created_at_ms)
    removed: list[str]
    quarantined: list[tuple[str, str, str]]  # (name, reason, where, or error)


def open_directory(root: str) -> Scan:
    """Start-up: create DLQ_DIR, remove temporaries, read and verify every
    entry, quarantine what cannot be read. Problems with one entry never
    stop the scan."""
    os.makedirs(root, exist_ok=True)
    removed = remove_temporaries(root)
    entries: dict[str, tuple[int, int]] = {}
    quarantined = []
    for name in entry_names(root):
        try:
            entry = read_entry(root, name)
            size = entry_size(entry.data, encode_meta(entry.meta))
            entries[name] = (size, entry.meta["created_at_ms"])
        except (EntryError, OSError) as error:
            reason = str(error) if isinstance(error, EntryError) else f"unreadable: {error}"
            try:
                where = quarantine(root, name, reason)
            except OSError as move_error:
                where = f"(not moved: {move_error.strerror})"
            quarantined.append((name, reason, where))
    return Scan(entries, removed, quarantined)


class Busy(Exception):
    """Another process holds the entry's lock (an upload or purge is under
    way there)."""


def lock_entry(root: str, name: str) -> int:
    """Take the entry's lock without waiting. Returns the fd to pass to
    `unlock`; raises Busy, or FileNotFoundError when the entry is gone."""
    path = os.path.join(root, name)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as error:
        os.close(fd)
        if error.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise Busy(name) from None
        raise
    # Whoever held the lock before may have deleted (renamed away) it.
    try:
        same = os.stat(path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        same = False
    if not same or not os.path.exists(os.path.join(path, META)):
        os.close(fd)
        raise FileNotFoundError(errno.ENOENT, "entry is gone", path)
    return fd


def unlock(fd: Optional[int]) -> None:
    if fd is not None:
        os.close(fd)


def claim(root: str, name: str) -> Entry:
    """Lock and read an entry for upload or deletion. Raises Busy,
    FileNotFoundError or EntryError (the lock is released then)."""
    fd = lock_entry(root, name)
    try:
        entry = read_entry(root, name)
    except BaseException:
        unlock(fd)
        raise
    entry.lock_fd = fd
    return entry


def remove_locked(root: str, name: str, fd: Optional[int]) -> None:
    """Delete an entry whose lock we hold: rename it to a temporary name
    first, so a crash mid-delete never leaves a half entry; then unlock."""
    try:
        doomed = os.path.join(root, f"{TMP_PREFIX}del-{name}")
        os.rename(os.path.join(root, name), doomed)
        fsutil.fsync_directory(root)
        shutil.rmtree(doomed, ignore_errors=True)
    finally:
        unlock(fd)


def remove_entry(root: str, entry: Entry) -> None:
    """Delete a claimed entry (see remove_locked)."""
    fd, entry.lock_fd = entry.lock_fd, None
    remove_locked(root, entry.name, fd)


def update_meta(root: str, entry: Entry, meta: dict[str, Any]) -> None:
    """Replace a claimed entry's meta.json atomically, then release it."""
    try:
        fsutil.write_atomically(os.path.join(root, entry.name, META), encode_meta(meta))
        entry.meta = meta
    finally:
        unlock(entry.lock_fd)
        entry.lock_fd = None


def release(entry: Entry) -> None:
    unlock(entry.lock_fd)
    entry.lock_fd = None


@dataclass
class Pick:
    """What `claim_oldest` found: the claimed entry (or None), entries that
    vanished (purged or replayed by the CLI) and entries quarantined."""

    entry: Optional[Entry]
    gone: list[str]
    quarantined: list[tuple[str, str, str]]


def claim_oldest(root: str, known: list[str]) -> Pick:
    """Claim the oldest of `known` that is readable and not locked by
    another process; forget the ones no longer on disk."""
    on_disk = set(entry_names(root))
    gone = [name for name in known if name not in on_disk]
    quarantined: list[tuple[str, str, str]] = []
    for name in known:
        if name not in on_disk:
            continue
        try:
            return Pick(claim(root, name), gone, quarantined)
        except Busy:
            continue
        except FileNotFoundError:
            gone.append(name)
        except EntryError as error:
            try:
                where = quarantine(root, name, str(error))
            except OSError as move_error:
                where = f"(not moved: {move_error.strerror})"
            quarantined.append((name, str(error), where))
    return Pick(None, gone, quarantined)
