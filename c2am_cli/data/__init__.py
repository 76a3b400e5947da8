"""Images in: folder scanning, robust decoding, transforms, dataset adapters."""
