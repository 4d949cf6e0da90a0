"""pytest-benchmark suite: `pytest benchmarks/ --benchmark-only`; `python -m benchmarks.report RESULTS.json`."""
