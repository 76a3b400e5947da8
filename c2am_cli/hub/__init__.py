"""Weights: the registry, downloads and uploads, model cards, backbone weight import."""
