"""Benchmarks for segq: model export for speed work (``bench.export_models``) and timings
measured side by side in one run (``bench.raw_models``). Not imported by the service."""
