"""`--workers N`: the supervising parent and its worker processes."""
