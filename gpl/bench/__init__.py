"""Benchmarks as commands (`gpl bench ...`), never as timed tests: medians and ratios measured side by side."""
