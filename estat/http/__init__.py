"""The HTTP/1.1 layer of the ingest listener: protocol, request, response."""
