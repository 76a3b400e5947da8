"""Weights: the registry, downloads and uploads, model cards, backbone weight import."""
from .._legacy import package_getattr

__getattr__ = package_getattr(__name__)  # the names of the old c2am_cli/hub.py, deprecated
