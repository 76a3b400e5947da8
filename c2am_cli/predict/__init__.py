"""Prediction: the localiser and the folder job (manifest, resume)."""
