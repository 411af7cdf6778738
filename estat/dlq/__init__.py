"""The dead-letter queue: disk format, spool and drain, replay, CLI."""
