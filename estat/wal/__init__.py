"""The write-ahead log of `ACK_MODE=durable`: the segment format, the
group-commit writer, the ledger that says when a segment may go, recovery
on start, and the `estat-wal` operator command."""
