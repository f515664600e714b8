"""``hpcad nightly``: re-score one day (or a range of days) with a trained run, the way cron runs it.

Per day D (``nightly.date``, default yesterday in ``nightly.timezone``), under a lock on
``<out>/.nightly.lock``:

1. ingest the day's exports (``nightly.input`` with ``{date}``/strftime codes) into a hidden
   ``<out>/.D.tmp-<pid>/``; a missing or partial input (too few trained nodes, data not reaching
   the day's end) stops here with a message, and nothing under ``<out>`` changes;
2. score with the trained run's models (in process, or ``sbatch --wait slurm/score_all_nodes.sh``),
   applying each node's light map valid for that night;
3. apply the trained run's thresholds: ``alarms.csv`` and ``alarms.json`` (node, start, end, peak
   score, top metrics, jobs), ``metrics.json`` when the day is labelled; incidents across nights
   (hpcad.incidents: new, ongoing, resolved) -> ``incidents.json``, and ``alarms.jsonl`` (one alarm
   per line with its incident);
4. drift (hpcad.nightly.drift) -> ``levels.csv`` (with each node's share of missing values and its lost
   metrics), ``drift.json``; telemetry gaps (trained nodes without a row, nodes missing over
   ``report.max_missing_share`` of their values, nodes with a trained metric that sent no value)
   logged and reported; light retraining (hpcad.model.light) of drifted nodes on their last
   ``nightly.light_days`` nights -> ``<out>/light/<node>/`` (the training run is only read), ``light.json``;
5. ``report.html``; then tonight's light maps move into ``<out>/light``, the folder replaces ``<out>/D``
   by rename, and ``<out>/history.csv`` gains a line;
6. for the site's tools: the Prometheus textfile (hpcad.nightly.prometheus; newest night only) and, when
   the night has new incidents, ``nightly.notify`` (a command; its failure is logged and recorded in
   ``notify.json`` and the history, never fails the night); SLURM drain commands for confirmed
   incidents in ``drain.txt`` (hpcad.nightly.drain), run only with ``nightly.drain=true``.

A rerun of a day replaces its folder whole (no duplicated alarms); a failed day leaves the previous
outputs as they were and records ``failed`` in the history.

Modules: ``schedule`` (which days, the lock, history, publish, prune), ``night`` (one night: the
same stage functions ``hpcad run`` calls, steps 1-5), ``refit`` (light retraining on the last
nights), ``sections`` (the nightly report's own sections and node history), ``outlets`` (step 6).
"""
from hpcad.nightly.night import scoring_job_size
from hpcad.nightly.schedule import run_nightly

__all__ = ["run_nightly", "scoring_job_size"]
