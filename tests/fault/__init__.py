"""Fault injection: real collector and relay processes, the mock Kuaishou, real databases.

Each scenario breaks one thing (upstream, relay, web worker, store), lets it recover, and then
counts what reached the mock: every scenario records ``sent, delivered, duplicated, lost`` in
``test-output/fault-figures.json`` and asserts that nothing was lost.
"""
