"""Voice-head recipes on the speaker-grouped UEM folds: inputs, torch models, stream normalisation, the runner,
its costs, shipping and the report (`python -m pipelines.train.voice`)."""
