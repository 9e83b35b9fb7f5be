"""A simulated MAST archive: a real HTTP server on 127.0.0.1 that unmodified astroquery talks to.

Used by the test suite, the benchmarks, ``--simulate`` and by users who want to test their own
pipelines offline. Nothing in the rest of the package imports it except for ``--simulate``.
"""
