"""Benchmarks beside their peers; run from the repository root as python -m bench.NAME."""
