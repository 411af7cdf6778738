"""`--workers N`: the supervising parent (supervisor), its admin pages
over every worker (admin), and the worker process (child)."""
