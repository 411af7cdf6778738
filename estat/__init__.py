"""Estat Ingest: an HTTP event-ingest server that batches events into gzip'd
JSON Lines objects on S3 or a local directory."""

__version__ = "0.1.0"
