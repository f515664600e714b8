"""Detectors: the per-node autoencoder ensemble and its on-disk model files."""
