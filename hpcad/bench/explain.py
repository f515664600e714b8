"""``hpcad bench bench.mode=explain train_run=RUN``: how often an alarm's cause names the fault.

On a run over the synthetic cluster (``hpcad run``; its faults move known metric families,
:data:`hpcad.data.synthetic.FAULT_FAMILIES`), every alarm of the run's thresholds that overlaps rows of
exactly one labelled class counts as right when its cause (:func:`hpcad.incidents.cause_of`: the family
with the most weight among its top ``report.top_k`` metrics) is one of that fault's families. Both
rankings of the top metrics are measured on the same errors: by times-normal error (what alarms use)
and by mean error (before 2026-12-02). Per split and class: ``[right, alarms]``, in ``bench.json``.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from hpcad.atomic import write_json
from hpcad.data.store import TelemetryStore
from hpcad.data.synthetic import FAULT_FAMILIES
from hpcad.errors import ConfigError
from hpcad.errorstore import ErrorStore
from hpcad.incidents import cause_of
from hpcad.runfolder import train_run
from hpcad.threshold.evaluate import alarm_events
from hpcad.threshold.rules import Thresholds

if TYPE_CHECKING:
    from hpcad.config import HpcadConfig


def explanation_hits(errors: ErrorStore, th: Thresholds, top_k: int, merge_gap: int) -> dict:
    """``{ranking: {split: {class: [right, alarms]}}}`` for the two rankings (see the module)."""
    out: dict = {"times_normal": {}, "error": {}}
    for s in errors.signals():
        if s.labels is None:
            continue
        for ranking, scale_of in (("times_normal", errors.explain_scale), ("error", None)):
            for rec in alarm_events(s, th, errors.errors_at, errors.metrics, top_k, "row", merge_gap, None, scale_of):
                classes = rec.get("label_classes", [])
                if len(classes) != 1 or classes[0] not in FAULT_FAMILIES:
                    continue
                c = classes[0]
                tally = out[ranking].setdefault(rec["split"], {}).setdefault(str(c), [0, 0])
                tally[0] += cause_of(rec) in FAULT_FAMILIES[c]
                tally[1] += 1
    return out


def bench_explain(cfg: HpcadConfig, run_dir: Path) -> dict:
    run = train_run(cfg)
    if run is None:
        raise ConfigError("bench.mode=explain: set train_run to a run folder of `hpcad run` on the synthetic cluster")
    errors = ErrorStore(run / "errors.h5")
    if TelemetryStore(errors.attrs["store"]).source != "synthetic":
        raise ConfigError(f"bench.mode=explain: {run} was not run on the synthetic cluster (data.source unset): only "
                          f"its faults' metric families are known")
    hits = explanation_hits(errors, Thresholds.load(run / "thresholds.json"), int(cfg.report.top_k),
                            int(cfg.threshold.tolerance))
    result = {"mode": "explain", "run": str(run), "top_k": int(cfg.report.top_k), **hits}
    write_json(run_dir / "bench.json", result)
    return result
