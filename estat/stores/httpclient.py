"""An HTTP connection pool whose connections do not log.

Twisted's client factory logs "Starting factory"/"Stopping factory" at
info for every connection it opens (twisted/twisted#9235, #9330): two
lines per S3 upload when connections are not kept alive. The factory
class is private and the pool offers no public way to choose it, and a
log filter would have to be installed on observers twistd owns. What is
public: `HTTPConnectionPool.getConnection(key, endpoint)`, through which
every new connection is made with `endpoint.connect(factory)`, and the
`noisy` flag of `twisted.internet.protocol.Factory`. So the pool hands
out an endpoint that switches `noisy` off on the factory it connects.
"""

from __future__ import annotations

from typing import Hashable

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import (
    IProtocol,
    IProtocolFactory,
    IReactorTime,
    IStreamClientEndpoint,
)
from twisted.internet.protocol import Factory
from twisted.web.client import HTTP11ClientProtocol, HTTPConnectionPool
from zope.interface import implementer


@implementer(IStreamClientEndpoint)
class _QuietEndpoint:
    """`endpoint`, connecting with factories that do not log."""

    def __init__(self, endpoint: IStreamClientEndpoint) -> None:
        self._endpoint = endpoint

    def connect(self, protocolFactory: IProtocolFactory) -> "Deferred[IProtocol]":
        if isinstance(protocolFactory, Factory):
            protocolFactory.noisy = False
        return self._endpoint.connect(protocolFactory)


class QuietConnectionPool(HTTPConnectionPool):
    """An HTTPConnectionPool whose new connections log nothing."""

    def getConnection(self, key: Hashable,
                      endpoint: IStreamClientEndpoint) -> "Deferred[HTTP11ClientProtocol]":
        return super().getConnection(key, _QuietEndpoint(endpoint))


def quiet_connection_pool(reactor: IReactorTime, persistent: bool) -> HTTPConnectionPool:
    return QuietConnectionPool(reactor, persistent=persistent)
