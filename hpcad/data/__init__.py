"""Ingest: telemetry readers, the HDF5 store, and the synthetic cluster generator."""
