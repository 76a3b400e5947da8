"""Evaluation: metrics, map sources, the protocol, reports, calibration fitting."""
