"""The bytes of every answer on the ingest listener.

A handler returns an `Answer`; `response` turns it into one HTTP/1.1
response with a JSON body, a Date (formatted once per second) and a
Content-Length, in one `bytes` the channel writes at once. `raw_error` is
the answer the channel itself gives when it refuses a request (and closes
the connection).
"""

from __future__ import annotations

import json
import time
from email.utils import formatdate
from http import HTTPStatus
from typing import NamedTuple

Headers = tuple[tuple[bytes, bytes], ...]

# Every status's reason phrase, from the standard library's table.
PHRASES = {status.value: status.phrase.encode() for status in HTTPStatus}


class Answer(NamedTuple):
    """What a handler answers: status, JSON body, extra headers, and
    whether the connection closes after it."""

    code: int
    body: bytes
    headers: Headers = ()
    close: bool = False


def error_body(error: str, **details: object) -> bytes:
    """The short JSON body of every error answer."""
    return json.dumps({"error": error, **details}, separators=(",", ":")).encode() + b"\n"


class _HttpDate:
    """The Date header's value, formatted once per second."""

    second = -1
    value = b""

    def __call__(self) -> bytes:
        now = int(time.time())
        if now != self.second:
            self.value = formatdate(now, usegmt=True).encode()
            self.second = now
        return self.value


http_date = _HttpDate()


class _Plain:
    """The bytes of answers without extra headers (the common 202s), built
    once per second (the Date changes) and at most `size` of them."""

    size = 64

    def __init__(self) -> None:
        self.date = b""
        self.answers: dict[tuple[int, bytes], bytes] = {}


_plain = _Plain()


def response(code: int, body: bytes, headers: Headers = (),
             close: bool = False, head_only: bool = False) -> bytes:
    """A whole HTTP/1.1 response with a JSON body (without the body itself
    when answering HEAD). A 204 has neither body nor length."""
    if headers or close or head_only:
        return _build(code, body, headers, close, head_only)
    date = http_date()
    if date is not _plain.date:
        _plain.date = date
        _plain.answers.clear()
    answer = _plain.answers.get((code, body))
    if answer is None:
        answer = _build(code, body)
        if len(_plain.answers) < _plain.size:
            _plain.answers[code, body] = answer
    return answer


def _build(code: int, body: bytes, headers: Headers = (),
           close: bool = False, head_only: bool = False) -> bytes:
    head = [b"HTTP/1.1 %d %s\r\nDate: %s\r\n" % (code, PHRASES.get(code, b"Unknown"),
                                                  http_date())]
    if code != 204:
        head.append(b"Content-Type: application/json\r\nContent-Length: %d\r\n" % len(body))
    for name, value in headers:
        head.append(b"%s: %s\r\n" % (name, value))
    if close:
        head.append(b"Connection: close\r\n")
    head.append(b"\r\n")
    if not head_only:
        head.append(body)
    return b"".join(head)


def raw_error(code: int, error: str, headers: Headers = (), **details: object) -> bytes:
    """A complete JSON error response that closes the connection."""
    return response(code, error_body(error, **details), headers, close=True)
