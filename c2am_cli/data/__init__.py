"""Images in: folder scanning, robust decoding, transforms, dataset adapters."""
from .._legacy import package_getattr

__getattr__ = package_getattr(__name__)  # the names of the old c2am_cli/data.py, deprecated
