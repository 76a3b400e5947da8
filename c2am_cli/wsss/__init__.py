"""Weakly supervised segmentation: classifier CAMs, background cues, pseudo-masks."""
