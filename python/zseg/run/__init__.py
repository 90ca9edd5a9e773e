"""Orchestration: which function runs each stage (tasks), scheduling over a process pool (pool), and
the entry points of ``zseg run`` and of one stage on a set of chunks (entry)."""
