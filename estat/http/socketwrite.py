"""Writing an answer to a plain TCP connection with one `send`.

Twisted's `transport.write` always buffers: it registers the socket for
writability (one `epoll_ctl`), a later reactor iteration sends the buffer,
and it is unregistered again (another `epoll_ctl`). For the ingest
listener's small answers that is three system calls and a reactor
iteration where one `send` does. `write` sends at once when the transport
is a plain TCP connection with nothing buffered and still open for
writing, and hands whatever the socket did not take (or any other case:
TLS, the PROXY-protocol wrapper, a test's transport, an error) to
`transport.write`, which keeps the order of the bytes, pauses a producer
when its buffer fills and notices a broken connection.

It reads attributes of `twisted.internet.tcp.Connection` that are not
public (`dataBuffer`, `offset`, `_tempDataBuffer`, `_writeDisconnected`):
should a Twisted release rename them, every write takes the buffered path
again rather than failing.
"""

from __future__ import annotations

import errno
from typing import Any

from twisted.internet import tcp

_WOULD_BLOCK = frozenset((errno.EAGAIN, errno.EWOULDBLOCK, errno.ENOBUFS))


def write(transport: Any, data: bytes) -> None:
    """`transport.write(data)`, sent in one `send` when nothing is
    buffered (see the module docstring)."""
    try:
        unbuffered = (type(transport) is tcp.Server and not transport.TLS
                      and transport.connected and not transport.disconnecting
                      and not transport._writeDisconnected and not transport._tempDataBuffer
                      and transport.offset == len(transport.dataBuffer))
    except AttributeError:  # a Twisted whose Connection is not what this reads
        unbuffered = False
    if unbuffered:
        try:
            sent = transport.socket.send(data)
        except OSError as error:
            if error.errno not in _WOULD_BLOCK:
                # Buffered, the next write attempt meets the error again
                # and closes the connection the way Twisted does.
                transport.write(data)
                return
            sent = 0
        if sent == len(data):
            return
        data = data[sent:]
    transport.write(data)
