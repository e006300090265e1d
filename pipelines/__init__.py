"""Offline work beside the monitor: data, training recipes, evaluation, benchmarks, torch rebuilds of encoders.

Nothing under `streamer/` imports this package (tests/test_architecture.py checks it). Each entry point runs as
`python -m pipelines.<package>.<module>`, the voice recipes as `python -m pipelines.train.voice`.
"""
