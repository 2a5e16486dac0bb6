"""Test support shared by every real-process test: a mock Kuaishou endpoint, a harness that runs
the real ``ks-collector`` commands as subprocesses, and a throwaway PostgreSQL server.

The pytest fixtures built on them live in ``tests/conftest.py``.
"""
