"""The recent-id window: which client-chosen event ids (Segment's
`messageId`, PostHog's `uuid`) this worker has accepted lately, so that an
SDK's retry of a batch that was accepted (its answer lost or late) does not
store the same events twice.

The window is bounded twice: it holds at most `max_ids` ids (the oldest is
forgotten first) and forgets an id `max_age` seconds after it was accepted,
so its memory is bounded by the settings (about 150 bytes an id: each id is
kept as a 16-byte digest, whatever its length). It lives in one worker's
memory: it is empty after a restart and not shared between workers.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from typing import Iterable

from twisted.internet.interfaces import IReactorTime


def id_scope(protocol: str, writer: str) -> bytes:
    """What an id is unique within: the protocol and the writer (the
    write key's name, so that one writer's ids never hide another's
    events)."""
    return b"%s\0%s\0" % (protocol.encode(), writer.encode())


def id_key(scope: bytes, event_id: bytes) -> bytes:
    """The window's key for one id of `scope` (`id_scope`): a 16-byte
    digest, whatever the id's length."""
    return hashlib.blake2b(scope + event_id, digest_size=16).digest()


class RecentIds:
    """At most `max_ids` keys, each for at most `max_age` seconds of
    `clock`; `max_ids=0` keeps nothing (every event is stored)."""

    def __init__(self, clock: IReactorTime, max_ids: int, max_age: float) -> None:
        self.clock = clock
        self.max_ids = max_ids
        self.max_age = max_age
        self._seen: OrderedDict[bytes, float] = OrderedDict()  # key -> when accepted

    def __len__(self) -> int:
        self._expire(self.clock.seconds())
        return len(self._seen)

    def __contains__(self, key: bytes) -> bool:
        when = self._seen.get(key)
        return when is not None and when > self.clock.seconds() - self.max_age

    def add(self, keys: Iterable[bytes]) -> None:
        """Remember `keys` as accepted now (a key seen again starts over)."""
        if self.max_ids == 0:
            return
        now = self.clock.seconds()
        self._expire(now)
        seen = self._seen
        for key in keys:
            seen[key] = now
            seen.move_to_end(key)
        while len(seen) > self.max_ids:
            seen.popitem(last=False)

    def _expire(self, now: float) -> None:
        seen = self._seen
        oldest = now - self.max_age
        while seen:
            key, when = next(iter(seen.items()))
            if when > oldest:
                return
            del seen[key]
