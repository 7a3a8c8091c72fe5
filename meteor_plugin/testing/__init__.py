"""Tiny random models built in code, for tests, the demo and the benchmarks (no downloads)."""
