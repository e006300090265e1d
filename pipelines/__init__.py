"""Offline work beside the monitor: data, training recipes, evaluation, benchmarks, torch rebuilds of encoders.

Nothing under `streamer/` imports this package; each entry point is `python -m pipelines.<package>.<module>`.
"""
