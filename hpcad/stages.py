"""The stages ``hpcad <stage>`` runs (hpcad/cli.py): the pipeline's (hpcad/pipeline.py), and ``bench``
(hpcad/bench/), which times the pipeline's own stages."""
from __future__ import annotations

from hpcad.bench import run_bench
from hpcad.pipeline import RUNNERS as PIPELINE
from hpcad.pipeline import one_writer

RUNNERS = {**PIPELINE, "bench": one_writer("bench", run_bench)}
