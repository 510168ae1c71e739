"""Benchmarks are pytest-benchmark suites: `pytest benchmarks/ --benchmark-only`."""
