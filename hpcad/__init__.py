"""hpcad: per-node autoencoder anomaly detection for HPC telemetry.

Pipeline: ingest (:mod:`hpcad.data`) -> train (:mod:`hpcad.train`) -> score (:mod:`hpcad.score`)
-> threshold (:mod:`hpcad.threshold`) -> explain/report (:mod:`hpcad.explain`, :mod:`hpcad.report`).
"""
__version__ = "0.1.0"
