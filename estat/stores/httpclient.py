"""An HTTP connection pool whose connections do not log: Twisted's client
factory logs "Starting factory"/"Stopping factory" for every connection,
two lines per S3 upload when the store closes connections."""

from __future__ import annotations

from typing import Any

from twisted.web.client import HTTPConnectionPool, _HTTP11ClientFactory


class _QuietFactory(_HTTP11ClientFactory):
    noisy = False


def quiet_connection_pool(reactor: Any, persistent: bool) -> HTTPConnectionPool:
    pool = HTTPConnectionPool(reactor, persistent=persistent)
    pool._factory = _QuietFactory  # the documented way to choose the factory is none
    return pool
