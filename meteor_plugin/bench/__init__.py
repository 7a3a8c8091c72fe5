"""Benchmarks: measured side by side in one run, printed with the model shapes and the machine."""
