"""The labelled corpora (typed readers, grouped folds) and the features computed from them, cached on disk."""
