"""Benchmarks of the running monitor (latency, CPU, memory, workers, windows, endpointing) and the bundle that
runs them on a lent GPU machine; `python -m pipelines.bench.all` runs them and writes docs/bench/RESULTS.md."""
