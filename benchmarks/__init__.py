"""The credit_guard benchmark harness: ``python benchmarks/run.py`` (see docs/benchmarks.md)."""
