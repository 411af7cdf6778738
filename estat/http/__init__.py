"""The HTTP/1.1 layer of the ingest listener: protocol (channel), limits,
request parsing, response writing. It knows nothing of what is answered:
the handler is given to the listener."""
