"""Calibrated maps: a map in [0, 1] read through the knots stored with the weights, as P(foreground).

The knots are fitted by `c2am calibrate` (c2am_cli.eval.calibrate); this is the part every prediction uses."""
from __future__ import annotations

import numpy as np


def apply_calibration(scoremap: np.ndarray, knots) -> np.ndarray:
    """Foreground probability of each pixel of a map in [0, 1], by linear interpolation between the knots."""
    k = np.asarray(knots, dtype=np.float32)
    return np.interp(scoremap, np.linspace(0.0, 1.0, len(k), dtype=np.float32), k).astype(np.float32)
