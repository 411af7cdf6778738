"""The analytics SDKs' wire protocols on the ingest listener: Segment's
(and RudderStack's) tracking API and PostHog's capture API, each element of
a batch stored as its own event.

`routes` gives the listener's extra paths and `body_limits` their body
limits; the server (estat.service) hands them to `estat.collect.Routes`
and to the listener's `Limits`. One recent-id window per worker is shared
by both protocols (its keys name the protocol)."""

from __future__ import annotations

from typing import Callable

from twisted.internet.interfaces import IReactorTime

from estat.collect import IngestState
from estat.config import Settings
from estat.http.request import IngestRequest
from estat.http.response import Answer
from estat.sdk import posthog, segment
from estat.sdk.idempotence import RecentIds


def routes(state: IngestState, settings: Settings, clock: IReactorTime
           ) -> dict[bytes, Callable[[IngestRequest], Answer]]:
    """Every SDK path and its handler."""
    recent = RecentIds(clock, settings.sdk_dedup_ids, settings.sdk_dedup_seconds)
    segment_handler = segment.Segment(state, recent, settings.segment_max_event_size,
                                      settings.max_batch_events)
    posthog_handler = posthog.PostHog(state, recent, settings.posthog_max_event_size,
                                      settings.max_batch_events,
                                      settings.posthog_max_batch_size)
    found: dict[bytes, Callable[[IngestRequest], Answer]] = {}
    found.update(dict.fromkeys(segment.PATHS, segment_handler))
    found.update(dict.fromkeys(posthog.PATHS, posthog_handler))
    return found


def body_limits(settings: Settings) -> dict[bytes, int]:
    """The body limit of each SDK path (inflated bytes; 413 above): a
    Segment single call is one event."""
    limits = dict.fromkeys(segment.PATHS, settings.segment_max_event_size)
    limits.update(dict.fromkeys(segment.BATCH_PATHS, settings.segment_max_batch_size))
    limits.update(dict.fromkeys(posthog.PATHS, settings.posthog_max_batch_size))
    return limits
