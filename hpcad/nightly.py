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
4. drift (hpcad.drift) -> ``levels.csv``, ``drift.json``; light retraining (hpcad.light) of drifted
   nodes on their last ``nightly.light_days`` nights -> maps beside the models, ``light.json``;
5. ``report.html``; then the folder replaces ``<out>/D`` by rename, and ``<out>/history.csv`` gains a line;
6. for the site's tools: the Prometheus textfile (hpcad.prometheus; newest night only) and, when
   the night has new incidents, ``nightly.notify`` (a command; its failure is logged and recorded in
   ``notify.json`` and the history, never fails the night); SLURM drain commands for confirmed
   incidents in ``drain.txt`` (hpcad.drain), run only with ``nightly.drain=true``.

A rerun of a day replaces its folder whole (no duplicated alarms); a failed day leaves the previous
outputs as they were and records ``failed`` in the history.
"""
from __future__ import annotations

import csv
import datetime as dt
import html
import json
import logging
import os
import shlex
import shutil
import subprocess
import time
from pathlib import Path
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import numpy as np
from omegaconf import OmegaConf, open_dict

from hpcad import excess
from hpcad.atomic import atomic_path, write_json
from hpcad.data.ingest import ingest
from hpcad.data.store import TelemetryStore
from hpcad.drift import NIGHT_DIR, assess, level_rows, night_levels, write_levels
from hpcad.drain import candidates as drain_candidates
from hpcad.drain import drain
from hpcad.drain import lines as drain_lines
from hpcad.errors import ConfigError, HpcadError, InputError
from hpcad.errorstore import ErrorStore
from hpcad.explain import class_profiles
from hpcad.incidents import FILE as INCIDENTS
from hpcad.incidents import STATES, incident_of, night_incidents, previous_incidents, read_night
from hpcad.light import LightMap, fit_light_map, light_path, map_for_night, save_version
from hpcad.model.files import NodeModel, model_nodes, model_path
from hpcad.preprocess import fill_gaps, windows
from hpcad.prometheus import render, write_textfile
from hpcad.resources import resource_dir
from hpcad.runfolder import exclusive_lock
from hpcad.score import score_nodes
from hpcad.threshold.evaluate import apply_thresholds
from hpcad.threshold.rules import Thresholds

log = logging.getLogger(__name__)
HISTORY_FIELDS = ["run_at", "date", "status", "nodes", "alarms", "new_incidents", "drifted", "light_refits", "notify",
                  "seconds", "message"]


def run_nightly(cfg, run_dir: Path, overrides: list[str] | None = None) -> dict:
    n = cfg.nightly
    for opt in ("input", "out"):
        if not getattr(n, opt):
            raise ConfigError(f"nightly.{opt} is required (see jobs/nightly.env.example)")
    if not cfg.train_run:
        raise ConfigError("train_run is required: the run folder whose models and thresholds score the nights")
    train_run = Path(cfg.train_run).expanduser().resolve()
    for need in ("models", "thresholds.json"):
        if not (train_run / need).exists():
            raise ConfigError(f"train_run={train_run}: no {need} (train and threshold that run first)")
    if n.keep_data_days < max(n.light_days, 1):
        raise ConfigError(f"nightly.keep_data_days={n.keep_data_days} < nightly.light_days={n.light_days}: light "
                          f"retraining reads the telemetry of its last nights")
    days = parse_days(n.date, n.timezone)
    out = Path(n.out).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    results = []
    with exclusive_lock(out / ".nightly.lock", "hpcad nightly", others="another nightly run"):
        for stale in out.glob(".*.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)  # a crashed run's leftovers (we hold the lock)
        for day in days:
            t0 = time.time()
            try:
                res = _night(cfg, day, out, train_run, overrides or [])
            except HpcadError as exc:
                _history(out, day, "failed", {"message": str(exc)}, t0)
                raise
            _history(out, day, "ok", res, t0)
            log.info("nightly %s: %d nodes, %d alarms, %d drifted, %d light refits -> %s", day, res["nodes"],
                     res["alarms"], res["drifted"], res["light_refits"], out / day.isoformat())
            results.append(res)
    return {"days": results, "out": str(out)}


def parse_days(spec: str | None, timezone: str) -> list[dt.date]:
    """``None`` (yesterday in the site's zone), ``YYYY-MM-DD`` or ``FROM..TO`` (inclusive)."""
    try:
        tz = ZoneInfo(timezone)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise ConfigError(f"nightly.timezone={timezone!r}: not a time zone name (e.g. Europe/Rome)") from exc
    if spec in (None, "", "yesterday"):
        return [dt.datetime.now(tz).date() - dt.timedelta(days=1)]
    try:
        a, _, b = str(spec).partition("..")
        first = dt.date.fromisoformat(a.strip())
        last = dt.date.fromisoformat(b.strip()) if b else first
    except ValueError as exc:
        raise ConfigError(f"nightly.date={spec!r}: YYYY-MM-DD or YYYY-MM-DD..YYYY-MM-DD") from exc
    if last < first:
        raise ConfigError(f"nightly.date={spec!r}: the range ends before it starts")
    return [first + dt.timedelta(days=k) for k in range((last - first).days + 1)]


def input_for(pattern: str, day: dt.date) -> Path:
    text = pattern.replace("{date}", day.isoformat())
    if "%" in text:
        text = dt.datetime.combine(day, dt.time()).strftime(text)
    return Path(text).expanduser()


def day_bounds(day: dt.date, timezone: str) -> tuple[int, int]:
    tz = ZoneInfo(timezone)
    start = dt.datetime.combine(day, dt.time(), tz)
    end = dt.datetime.combine(day + dt.timedelta(days=1), dt.time(), tz)
    return int(start.timestamp()), int(end.timestamp())


def _day_cfg(cfg, source: Path, jobs: Path | None):
    dcfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=False))
    with open_dict(dcfg):
        dcfg.data.source = str(source)
        if jobs is not None:
            dcfg.data.jobs = str(jobs)
        dcfg.split.unit, dcfg.split.train, dcfg.split.val = "rows", 0, 0  # every row of a night is "test"
    return dcfg


def _night(cfg, day: dt.date, out: Path, train_run: Path, overrides: list[str]) -> dict:
    n = cfg.nightly
    iso = day.isoformat()
    src = input_for(n.input, day)
    if not src.exists():
        raise InputError(f"nightly {iso}: no exports at {src} (nightly.input={n.input!r}); nothing changed")
    models_dir = train_run / "models"
    tmp = out / f".{iso}.tmp-{os.getpid()}"
    tmp.mkdir()
    try:
        jobs_file = input_for(n.jobs, day) if n.jobs else None
        if jobs_file is not None and not jobs_file.exists():
            log.warning("nightly %s: no job file at %s (nightly.jobs); scoring without job context", iso, jobs_file)
            jobs_file = None
        dcfg = _day_cfg(cfg, src, jobs_file)
        store = TelemetryStore(ingest(dcfg.data, tmp / "store.h5"))
        trained = model_nodes(models_dir)
        nodes = [x for x in store.nodes if model_path(models_dir, x).exists()]
        new = sorted(set(store.nodes) - set(nodes))
        _check_complete(store, nodes, trained, day, src, n)
        if new:
            log.warning("nightly %s: %d node(s) without a trained model are not scored: %s", iso, len(new), new[:10])
        th = Thresholds.load(train_run / "thresholds.json")  # read once: the night's signal must match it
        if n.slurm:
            _score_slurm(dcfg, tmp, train_run, src, overrides)
        else:
            score_nodes(dcfg, store, models_dir, tmp / "errors.h5", nodes,
                        light=lambda node: map_for_night(models_dir, node, iso),
                        excess_fallback=th.details.get("excess_weight"))
        errors = ErrorStore(tmp / "errors.h5")
        excess.check_applies(th.details.get("excess_weight"), errors.excess_weight, train_run / "thresholds.json",
                             errors.path)
        th.save(tmp / "thresholds.json")
        from hydra.utils import instantiate

        cm = instantiate(cfg.threshold, _convert_="all").cost_model
        signals = list(errors.signals())  # alarms, evaluation and drift all read them
        records, metrics = apply_thresholds(errors, th, cm, cfg.report.top_k, "s", store.jobs(), tmp / "alarms.csv",
                                            signals=lambda: iter(signals))
        alarms = [_alarm_json(r) for r in records]
        write_json(tmp / "alarms.json", alarms)
        incidents = night_incidents(day, alarms, previous_incidents(out, day, n.incident_gap_days))
        write_json(tmp / INCIDENTS, incidents)
        _write_jsonl(tmp / "alarms.jsonl", iso, alarms, incidents)
        confirmed = drain_candidates(incidents, n.drain_after_nights)
        (tmp / "drain.txt").write_text(drain_lines(confirmed))
        if metrics["labelled"]:
            write_json(tmp / "metrics.json", {"detector": "autoencoder", "cost_model": vars(cm), "splits":
                                              metrics["splits"], "class_profiles": class_profiles(errors)})
        levels = night_levels(signals, th)
        write_levels(tmp / "levels.csv", levels)
        verdicts = assess(out, day, levels, n.drift_ratio, n.drift_days, n.drift_reference_nights)
        write_json(tmp / "drift.json", {"ratio": n.drift_ratio, "days": n.drift_days,
                                        "reference_nights": n.drift_reference_nights, "nodes": verdicts})
        drifted = [v["node"] for v in verdicts if v["drifted"]]
        targets = {"drifted": drifted, "all": list(errors.nodes), "off": []}.get(n.light_retrain)
        if targets is None:
            raise ConfigError(f"nightly.light_retrain={n.light_retrain!r}: drifted, all or off")
        nights = _recent_nights(day, out, tmp, n.light_days) if targets else []
        refits = [r for r in (_light_retrain(cfg, node, day, nights, models_dir) for node in targets) if r]
        write_json(tmp / "light.json", refits)
        if cfg.report.enabled:
            from hpcad.report import write_report

            write_report(dcfg, tmp, errors, models_dir, title=f"hpcad nightly {iso}",
                         extra=_nightly_sections(iso, src, new, verdicts, refits, n, incidents,
                                                 _trend(out, iso, len(nodes), len(records), incidents)),
                         folder=out / iso,
                         node_history=node_history(out, iso, levels, incidents, {r["node"] for r in records}))
        _publish(tmp, out / iso)
        _prune(out, day, n.keep_data_days)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    fresh = [i for i in incidents if i["state"] == "new"]
    _export_prometheus(n, out, day, levels, incidents, len(new))
    notified = _notify(n, out / iso, iso, fresh) if fresh else ""
    if n.drain and confirmed:
        write_json(out / iso / "drain.json", drain(confirmed, n.drain_max_nodes))
    return {"date": iso, "nodes": len(nodes), "alarms": len(records), "new_incidents": len(fresh),
            "drifted": len(drifted), "light_refits": len(refits), "notify": notified, "message": f"{src}"}


def _write_jsonl(path: Path, iso: str, alarms: list[dict], incidents: list[dict]) -> None:
    """One JSON object per alarm and line (log shippers read it as it is), with its incident."""
    with atomic_path(path) as tmp, open(tmp, "w") as fh:
        for a in alarms:
            inc = incident_of(a, incidents)
            fh.write(json.dumps({"night": iso, **a, "incident": inc["id"] if inc else None,
                                 "incident_state": inc["state"] if inc else None}) + "\n")


def _export_prometheus(n, out: Path, day: dt.date, levels: list[dict], incidents: list[dict], unscored: int) -> None:
    """The textfile (``nightly.prometheus``, default ``<out>/hpcad.prom``) for the newest night only."""
    newest = max((p.name for p in out.iterdir() if p.is_dir() and NIGHT_DIR.fullmatch(p.name)), default="")
    if day.isoformat() < newest:
        log.info("nightly %s: not the newest night (%s); %s left as it is", day, newest, n.prometheus or "hpcad.prom")
        return
    path = Path(n.prometheus).expanduser() if n.prometheus else out / "hpcad.prom"
    write_textfile(path, render(levels, incidents, day_bounds(day, n.timezone)[0], unscored))


def _notify(n, night_dir: Path, iso: str, fresh: list[dict]) -> str:
    """Run ``nightly.notify`` with the night's ``alarms.jsonl`` as its last argument. Returns "ok",
    "failed" or "" (not configured); the outcome is kept in ``<night>/notify.json``."""
    if not n.notify:
        return ""
    cmd = [*shlex.split(n.notify), str(night_dir / "alarms.jsonl")]
    env = dict(os.environ, HPCAD_NIGHT=iso, HPCAD_NIGHT_DIR=str(night_dir), HPCAD_NEW_INCIDENTS=str(len(fresh)))
    t0 = time.time()
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=n.notify_timeout_s)
        ok, detail = proc.returncode == 0, f"exit {proc.returncode}: {(proc.stderr or proc.stdout).strip()[-500:]}"
    except (OSError, subprocess.TimeoutExpired) as exc:
        ok, detail = False, f"{type(exc).__name__}: {exc}"
    write_json(night_dir / "notify.json", {"command": cmd, "ok": ok, "detail": detail, "new_incidents": len(fresh),
                                          "seconds": round(time.time() - t0, 2)})
    if ok:
        log.info("nightly %s: notified (%d new incidents): %s", iso, len(fresh), " ".join(cmd))
    else:
        log.warning("nightly %s: nightly.notify failed (%s); the night's outputs are complete", iso, detail)
    return "ok" if ok else "failed"


def _check_complete(store: TelemetryStore, nodes: list[str], trained: list[str], day: dt.date, src: Path, n) -> None:
    iso = day.isoformat()
    if len(nodes) < n.min_node_fraction * max(len(trained), 1):
        raise InputError(f"nightly {iso}: partial input: {len(nodes)} of {len(trained)} trained nodes in {src} "
                         f"(nightly.min_node_fraction={n.min_node_fraction}); nothing changed")
    start, end = day_bounds(day, n.timezone)
    newest, outside = -1, 0
    for node in nodes:
        ts = store.timestamps(node)
        newest = max(newest, int(ts[-1]))
        outside += int(((ts < start) | (ts >= end)).sum())
    if newest < end - n.max_end_gap_s:
        last = dt.datetime.fromtimestamp(newest, ZoneInfo(n.timezone)).isoformat()
        raise InputError(f"nightly {iso}: partial input: the newest sample in {src} is {last}, more than "
                         f"{n.max_end_gap_s} s before the day ends (still being exported?); nothing changed")
    if outside:
        log.warning("nightly %s: %d rows of %s lie outside the day (%s); they are scored too", iso, outside, src,
                    n.timezone)


def _score_slurm(dcfg, tmp: Path, train_run: Path, src: Path, overrides: list[str]) -> None:
    script = resource_dir("slurm") / "score_all_nodes.sh"
    keep = [o for o in overrides if not o.split("=")[0].lstrip("+~").startswith(("nightly.", "hydra.", "train_run"))]
    cmd = ["sbatch", "--wait", "--parsable", f"--export=ALL,HPCAD_RUN_DIR={tmp},HPCAD_SCORE_ONLY=1",
           "-o", str(tmp / "slurm-%j.out"), *scoring_job_size(dcfg), *dcfg.nightly.sbatch_args,
           str(script), f"train_run={train_run}", f"data.source={src}", "split.unit=rows", "split.train=0",
           "split.val=0", *keep]
    log.info("nightly: %s", " ".join(cmd))
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0 or not (tmp / "errors.h5").exists():
        logs = "".join(p.read_text(errors="replace") for p in tmp.glob("slurm-*.out"))
        raise InputError(f"nightly: scoring job failed (sbatch exit {proc.returncode}): "
                         f"{(proc.stderr.strip() + ' ' + logs)[-800:]}")


def scoring_job_size(cfg) -> list[str]:
    """sbatch options sizing the nightly scoring job (``nightly.job_*``), not the training script's
    4 tasks x 4 GPUs x 8 CPUs; with ``--mem`` (scoring's memory budget follows it: hpcad/model/budget.py)."""
    n = cfg.nightly
    for key in ("job_tasks", "job_cpus_per_task", "job_mem_mb"):
        if int(n[key]) < 1:
            raise ConfigError(f"nightly.{key}={n[key]}: must be >= 1")
    if int(n.job_gpus_per_node) < 0:
        raise ConfigError(f"nightly.job_gpus_per_node={n.job_gpus_per_node}: must be >= 0")
    mem, tasks = int(n.job_mem_mb), int(n.job_tasks)
    return ["--nodes=1", f"--ntasks-per-node={tasks}", f"--gpus-per-node={int(n.job_gpus_per_node)}",
            f"--cpus-per-task={int(n.job_cpus_per_task)}", f"--mem={mem * tasks}M", f"--time={n.job_time}"]


def _alarm_json(r: dict) -> dict:
    out = {k: r[k] for k in ("node", "start", "end", "rows", "peak_score", "peak_time", "threshold") if k in r}
    out.update(top_metrics=r.get("top_metrics", []), jobs=r.get("jobs", []), users=r.get("users", []))
    if "label_classes" in r:
        out["label_classes"] = r["label_classes"]
    return out


def _recent_nights(day: dt.date, out: Path, tmp: Path, count: int) -> list[tuple[str, TelemetryStore, ErrorStore]]:
    """Tonight (still in ``tmp``) and the published nights before it that kept their data."""
    nights = []
    for k in range(max(count, 1)):
        d = tmp if k == 0 else out / (day - dt.timedelta(days=k)).isoformat()
        if (d / "store.h5").exists() and (d / "errors.h5").exists():
            nights.append(((day - dt.timedelta(days=k)).isoformat(), TelemetryStore(d / "store.h5"),
                           ErrorStore(d / "errors.h5")))
    return nights


def _light_retrain(cfg, node: str, day: dt.date, nights: list[tuple[str, TelemetryStore, ErrorStore]],
                   models_dir: Path) -> dict | None:
    """Fit the node's light map on its last nights' rows, less the night's worst 10 % of the signal
    (possible incidents) and, when labelled, the anomalous rows."""
    n = cfg.nightly
    model = NodeModel.load(model_path(models_dir, node))
    xs, used = [], []
    for night, store, errors in nights:
        if node not in errors.nodes:
            continue
        s = next(errors.signals([node]))
        ok = s.signal <= np.quantile(s.signal, 0.9)
        if s.labels is not None:
            ok &= s.labels == 0
        nd = store.read(node)
        z = model.scaler.transform(fill_gaps(nd.values, cfg.preprocess.nan_fill_limit))[0]
        xs.append(windows(z, model.spec.window)[ok])
        used.append(night)
    x = np.concatenate(xs) if xs else np.empty((0, len(model.metrics) * model.spec.window), np.float32)
    if len(x) == 0:
        log.warning("nightly %s: node %s has no normal rows to refit its light map on", day, node)
        return None
    t0 = time.perf_counter()
    prev = LightMap.load(light_path(models_dir, node)) if light_path(models_dir, node).exists() else None
    lm = fit_light_map(model.members, len(model.spec.hidden), x, n.light_ridge, sorted(used), prev,
                       valid_from=(day + dt.timedelta(days=1)).isoformat(), n_out=len(model.metrics))
    save_version(models_dir, node, lm)
    return {"node": node, "version": lm.version, "rows": lm.rows, "days": lm.fitted_on, "valid_from": lm.valid_from,
            "fit_ms": round(1000 * (time.perf_counter() - t0), 1)}


REPORT_NIGHTS = 14  # nights the report's trend and the node pages' history show


def _trend(out: Path, iso: str, nodes: int, alarms: int, incidents: list[dict],
           nights: int = REPORT_NIGHTS) -> list[list]:
    """This night and the last ``nights`` - 1 successful nights before it (latest run of each, from
    history.csv): date, nodes, alarms, new incidents."""
    rows: dict[str, list] = {}
    if (out / "history.csv").exists():
        with open(out / "history.csv") as fh:
            for r in csv.DictReader(fh):
                if r["status"] == "ok" and r["date"] < iso:
                    rows[r["date"]] = [r["date"], r["nodes"], r["alarms"], r.get("new_incidents", "")]
    rows[iso] = [iso, nodes, alarms, sum(i["state"] == "new" for i in incidents)]
    return [rows[d] for d in sorted(rows)[-nights:]][::-1]


def node_history(out: Path, iso: str, levels: list[dict], incidents: list[dict], nodes: set[str],
                 nights: int = REPORT_NIGHTS) -> dict[str, list[list]]:
    """For each of ``nodes``: this night and the last ``nights`` - 1 published nights before it,
    newest first: night, level (median normalised signal, levels.csv), alarmed rows, incident
    state and cause that night (incidents.json)."""
    earlier = sorted(p.parent.name for p in out.glob("*/levels.csv")
                     if NIGHT_DIR.fullmatch(p.parent.name) and p.parent.name < iso)[-(nights - 1):] if nights > 1 else []
    per_night = [(d, level_rows(out / d / "levels.csv"), read_night(out / d) or []) for d in earlier]
    per_night.append((iso, {r["node"]: r for r in levels}, incidents))
    out_rows: dict[str, list[list]] = {}
    for node in nodes:
        rows = []
        for night, lv, inc in reversed(per_night):
            r = lv.get(node)
            state = "; ".join(f"{i['state']} ({i['cause']})" for i in inc if i["node"] == node)
            if r is not None or state:
                rows.append([night, None if r is None else float(r["level"]),
                             None if r is None else int(r["alarmed_rows"]), state])
        out_rows[node] = rows
    return out_rows


def _nightly_sections(iso: str, src: Path, new: list[str], verdicts: list[dict], refits: list[dict], n,
                      incidents: list[dict], trend: list[list] | None = None) -> list[str]:
    from hpcad.report import _table, trend_plot

    parts = [f"<p>night {iso} (site time zone {html.escape(n.timezone)}); input <code>{html.escape(str(src))}</code>.</p>"]
    if trend:
        parts.append("<h2>Last nights</h2>" + (trend_plot(trend) if len(trend) > 1 else "")
                     + _table(trend, ["night", "nodes scored", "alarms", "new incidents"]))
    if new:
        parts.append(f"<p>{len(new)} node(s) without a trained model were not scored: "
                     f"{html.escape(', '.join(new[:50]))}</p>")
    counts = {st: sum(i["state"] == st for i in incidents) for st in STATES}
    parts.append(f"<h2>Incidents</h2><p>{counts['new']} new, {counts['ongoing']} ongoing, {counts['resolved']} "
                 f"resolved (repeated alarms on one node with one cause are one incident; docs/operations.md). "
                 f"{len(drain_candidates(incidents, n.drain_after_nights))} confirmed (open for "
                 f"{n.drain_after_nights} nights or more): their SLURM drain commands are in drain.txt"
                 f"{' and were run (drain.json)' if n.drain else ' (nightly.drain=false: not run)'}.</p>")
    if incidents:
        parts.append(_table([[i["state"], i["node"], i["cause"], i["first_night"], i["nights"], i["alarms"],
                              f"{i['peak_score']:.4g}", " ".join(m["metric"] for m in i["top_metrics"][:3]),
                              " ".join(i["jobs"][:5])] for i in incidents[:200]],
                            ["state", "node", "cause", "since", "nights", "alarms tonight", "peak", "top metrics",
                             "jobs"]))

    def rel(v):
        return v["level"] / v["baseline"] if v["baseline"] and v["level"] == v["level"] else None

    ranked = sorted(((rel(v), v) for v in verdicts), key=lambda rv: 1.0 if rv[0] is None else -rv[0])[:50]
    rows = [[v["node"], v["level"], v["baseline"], r, v["streak"],
             "DRIFT" if v["drifted"] else ("no baseline yet" if v["baseline"] is None else "")] for r, v in ranked]
    parts.append(f"<h2>Drift</h2><p>level = the night's median signal_norm; baseline = median level of the node's "
                 f"first {n.drift_reference_nights} nights; drift = level / baseline >= {n.drift_ratio} on "
                 f"{n.drift_days} consecutive nights (docs/operations.md).</p>"
                 + _table(rows, ["node", "level", "baseline", "level / baseline", "nights >= ratio", "verdict"]))
    if refits:
        parts.append("<h2>Light retraining</h2>" + _table(
            [[r["node"], r["version"], r["rows"], " ".join(r["days"]), r["valid_from"], r["fit_ms"]] for r in refits],
            ["node", "map version", "rows", "nights", "scores from", "fit ms"]))
    return parts


def _publish(tmp: Path, final: Path) -> None:
    """Replace ``final`` by ``tmp`` (two renames; the lock keeps other nightly runs out)."""
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        final.rename(old)
    tmp.rename(final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _prune(out: Path, day: dt.date, keep_days: int) -> None:
    """Drop the bulky telemetry and error files of nights older than ``keep_days`` before ``day``;
    what people read (alarms, report, drift, history) stays."""
    cutoff = (day - dt.timedelta(days=keep_days)).isoformat()
    for night in out.iterdir():
        if night.is_dir() and NIGHT_DIR.fullmatch(night.name) and night.name < cutoff:
            for f in (*night.glob("store.h5"), *night.glob("errors*.h5")):
                f.unlink()


def _history(out: Path, day: dt.date, status: str, res: dict, t0: float) -> None:
    path = out / "history.csv"
    rows = list(csv.DictReader(open(path))) if path.exists() else []
    rows.append({"run_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "date": day.isoformat(),
                 "status": status, "nodes": res.get("nodes", ""), "alarms": res.get("alarms", ""),
                 "new_incidents": res.get("new_incidents", ""), "drifted": res.get("drifted", ""),
                 "light_refits": res.get("light_refits", ""), "notify": res.get("notify", ""),
                 "seconds": round(time.time() - t0, 1), "message": res.get("message", "")})
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=HISTORY_FIELDS)
        w.writeheader()
        w.writerows(rows)
