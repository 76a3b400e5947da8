"""Maps out: boxes, maps at image size (guided filter, calibration, dense CRF)."""
