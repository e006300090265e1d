"""Scoring shared by the training recipes (metrics, calibration), report writing and the fusion evaluation."""
