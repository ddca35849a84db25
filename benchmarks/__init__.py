"""Benchmarks for jaxbce: ``python -m benchmarks.bench --help``."""
