"""One night, built in a scratch folder: ingest the day's exports, score them with the trained run's
models, apply its thresholds, follow incidents and drift, refit light maps, write the report
(hpcad.nightly.schedule publishes the folder; hpcad.nightly.outlets hands it to the site's tools).

Each step calls the stage functions ``hpcad run`` calls (``ingest``, ``score_nodes``,
``apply_thresholds``, ``write_report``); what is nightly's own (incidents across nights, drift,
light maps, the site's outlets) lives in the modules beside this one.
"""
from __future__ import annotations

import datetime as dt
import json
import logging
import subprocess
import time
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING
from zoneinfo import ZoneInfo

import numpy as np
from omegaconf import OmegaConf, open_dict

from hpcad import signal_choice
from hpcad.atomic import atomic_path, write_json
from hpcad.config import JOB_LEAST, check_at_least
from hpcad.data.ingest import ingest
from hpcad.data.store import TelemetryStore
from hpcad.nightly.drain import candidates as drain_candidates
from hpcad.nightly.drain import lines as drain_lines
from hpcad.nightly.drift import assess, night_levels, write_levels
from hpcad.errors import ConfigError, InputError
from hpcad.errorstore import ErrorStore
from hpcad.explain import ExpectedQuotes, class_profiles
from hpcad.incidents import FILE as INCIDENTS
from hpcad.incidents import incident_of, night_incidents, previous_incidents
from hpcad.model.light import LIGHT_FOLDER, STAGED, LightMaps
from hpcad.model.files import UNTRAINED_SUFFIX, model_nodes, model_path, untrained_nodes
from hpcad.nightly.changes import Change, change_for, hold, read_changes
from hpcad.nightly.days import day_bounds, input_for
from hpcad.nightly.events import EVENTS, cluster_events, continue_from, mark, read_groups
from hpcad.nightly.refit import light_retrain, recent_nights
from hpcad.nightly.sections import nightly_sections, node_history, trend
from hpcad.report.markup import gap_text, telemetry_gaps
from hpcad.resources import resource_dir
from hpcad.score import score_nodes
from hpcad.threshold.evaluate import alarm_record, apply_thresholds
from hpcad.threshold.rules import Thresholds

if TYPE_CHECKING:
    from hpcad.config import HpcadConfig, NightlyConfig

log = logging.getLogger(__name__)


@dataclass
class Tonight:
    """What the steps of one night share."""

    cfg: object  # the job's config
    dcfg: object  # the night's: its input, every row a test row
    day: dt.date
    out: Path  # the nightly output folder
    tmp: Path  # the night's scratch folder (published as out / day)
    train_run: Path
    src: Path  # the day's exports
    rows_expected: dict[str, int] = field(default_factory=dict)  # node -> the rows it should send tonight (_ingest)

    @property
    def iso(self) -> str:
        return self.day.isoformat()

    @property
    def models_dir(self) -> Path:
        return self.train_run / "models"

    @cached_property
    def maps(self) -> LightMaps:
        """The job's light maps: its own (``<out>/light``), and any an older hpcad wrote beside the
        models; written to the former only (the training run stays as trained)."""
        return LightMaps(self.out / LIGHT_FOLDER, self.models_dir)

    @cached_property
    def changes(self) -> dict[str, list[Change]]:
        """The site's maintenance log (``nightly.changes``): node -> its changes."""
        return read_changes(self.cfg.nightly.changes)

    @cached_property
    def groups(self) -> dict[str, str]:
        """``nightly.groups``: node -> its rack (or chassis, PDU) for cluster-wide events."""
        return read_groups(self.cfg.nightly.groups)

    def change(self, node: str) -> Change | None:
        """The node's latest change on or before tonight."""
        return change_for(self.changes, node, self.iso)

    def retired(self) -> set[str]:
        """The nodes the maintenance log says are out of service tonight (``kind`` retired)."""
        return {node for node in self.changes if (c := self.change(node)) and c.retired}

    def settling(self, nodes: list[str]) -> dict[str, Change]:
        """The nodes changed on or before tonight that no light map fitted since the change scores yet:
        their alarms open no incident (hpcad.nightly.changes)."""
        return {node: c for node in nodes if (c := self.change(node))
                and not c.settled_by(self.maps.for_night(node, self.iso), self.cfg.nightly.light_days)}


class Stopwatch:
    """Seconds per phase of a night (``lap`` ends the phase named), for the log and ``hpcad bench``."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._t = time.perf_counter()

    def lap(self, phase: str) -> None:
        now = time.perf_counter()
        self.seconds[phase] = round(now - self._t, 2)
        self._t = now


@dataclass
class Built:
    """What a built night hands on to its publication and the site's tools."""

    src: Path
    nodes: list[str]  # scored
    new: list[str]  # without a trained model: not scored
    records: list[dict]  # alarms
    incidents: list[dict]
    confirmed: list[dict]  # incidents confirmed for draining
    levels: list[dict]
    drifted: list[str]
    refits: list[dict]
    silent: list[str] = field(default_factory=list)  # trained nodes without a row tonight
    retired: list[str] = field(default_factory=list)  # out of service (nightly.changes): not expected, not scored
    settling: dict[str, Change] = field(default_factory=dict)  # changed nodes whose alarms open no incident
    events: list[dict] = field(default_factory=list)  # cluster-wide events (hpcad.nightly.events)
    seconds: dict[str, float] = field(default_factory=dict)  # where the night's time went, by phase
    input_warnings: int = 0  # what the readers warned of ingesting the night's input (hpcad/data/notes.py)


def build_night(cfg: HpcadConfig, day: dt.date, src: Path, out: Path, tmp: Path, train_run: Path,
                overrides: list[str]) -> Built:
    """Steps 1-5 of the module docstring of hpcad.nightly, written into the scratch folder ``tmp``."""
    n = cfg.nightly
    t = Tonight(cfg, _day_cfg(cfg, src, _jobs_file(n, day)), day, out, tmp, train_run, src)
    t.changes, t.groups  # a bad maintenance log or group file stops the night before its ingest
    clock = Stopwatch()
    store, nodes, new, silent, retired = _ingest(t)
    clock.lap("ingest")
    unknown = sorted(set(t.changes) - set(nodes) - set(silent) - t.retired())
    if unknown:
        log.warning("nightly %s: nightly.changes names %d node(s) without a trained model: %s (the names the "
                    "models carry: SLURM's, after data.node_names)", t.iso, len(unknown), ", ".join(unknown[:10]))
    th = Thresholds.load(train_run / "thresholds.json")  # read once: the night's signal must match it
    fitted = signal_choice.from_details(th.details)
    errors = _score(t, store, nodes, overrides, fitted)
    clock.lap("scoring")
    signal_choice.check_applies(fitted, errors.recipe, train_run / "thresholds.json", errors.path)
    th.save(tmp / "thresholds.json")
    signals = list(errors.signals())  # alarms, evaluation and drift all read them
    settling = t.settling(list(errors.nodes))
    records, incidents, confirmed, events, held = _alarms(t, store, errors, th, signals, settling, silent)
    clock.lap("alarms")
    levels, verdicts, drifted, refits = _drift_and_light(t, errors, th, signals, settling, held)
    clock.lap("drift and light")
    max_share = cfg.report.max_missing_share
    gaps = telemetry_gaps(levels, max_share)
    if gaps:
        log.warning("nightly %s: %d node(s) with telemetry gaps: %s", t.iso, len(gaps),
                    ", ".join(f"{g['node']} ({gap_text(g, max_share)})" for g in gaps[:10]))
    if cfg.report.enabled:
        from hpcad.report.markup import report_zone
        from hpcad.report.page import write_report

        zone = report_zone(t.dcfg, n.timezone)  # report.timezone, else the site's
        write_report(t.dcfg, tmp, errors, t.models_dir, title=f"hpcad nightly {t.iso}",
                     light=(t.maps.folder, t.iso),  # the maps that scored tonight, for the expected values
                     extra=nightly_sections(t.iso, src, new, verdicts, refits, n, incidents,
                                            trend(out, t.iso, len(nodes), len(records), incidents), silent, gaps,
                                            max_share, _changes_seen(t, nodes, settling, refits), events, zone,
                                            retired),
                     folder=out / t.iso,
                     node_history=node_history(out, t.iso, levels, incidents, {r["node"] for r in records}),
                     node_summary=False, zone=zone,  # the Incidents section is the night's node view
                     list_unmodelled=False)  # its own sections list new and retired nodes
        clock.lap("report")
    return Built(src, nodes, new, records, incidents, confirmed, levels, drifted, refits, silent, retired, settling,
                 events, clock.seconds, store.warnings[0])


def _jobs_file(n: NightlyConfig, day: dt.date) -> Path | None:
    jobs_file = input_for(n.jobs, day) if n.jobs else None
    if jobs_file is not None and not jobs_file.exists():
        log.warning("nightly %s: no job file at %s (nightly.jobs); scoring without job context", day, jobs_file)
        return None
    return jobs_file


def _day_cfg(cfg: HpcadConfig, source: Path, jobs: Path | None):
    dcfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=False))
    with open_dict(dcfg):
        dcfg.data.source = str(source)
        if jobs is not None:
            dcfg.data.jobs = str(jobs)
        dcfg.split.unit, dcfg.split.train, dcfg.split.val = "rows", 0, 0  # every row of a night is "test"
    return dcfg


def _ingest(t: Tonight) -> tuple[TelemetryStore, list[str], list[str], list[str], list[str]]:
    """Step 1: the day's store; the nodes with a trained model, those without (not scored), the
    trained nodes without a row tonight (silent: down, or their collector is), and the nodes retired
    in the maintenance log that have a model or sent rows (none of the others: not expected, not scored)."""
    store = TelemetryStore(ingest(t.dcfg.data, t.tmp / "store.h5", t.cfg.compute.progress))
    retired, trained = t.retired(), model_nodes(t.models_dir)
    expected = [x for x in trained if x not in retired]
    nodes = [x for x in store.nodes if x not in retired and model_path(t.models_dir, x).exists()]
    new = sorted(set(store.nodes) - set(nodes) - retired)
    silent = sorted(set(expected) - set(store.nodes))
    back = sorted(retired & set(store.nodes))
    if back:
        log.info("nightly %s: %d node(s) retired in nightly.changes sent rows tonight, not scored: %s (a row of "
                 "kind changed brings a node back)", t.iso, len(back), ", ".join(back[:10]))
    t.rows_expected = _check_complete(store, nodes, expected, t.day, t.src, t.cfg.nightly)
    if new:
        left = untrained_nodes(t.models_dir)  # training left them without a model (too few training rows)
        log.warning("nightly %s: %d node(s) without a trained model are not scored: %s%s", t.iso, len(new), new[:10],
                    f" ({sum(n in left for n in new)} of them left untrained by training: models/<node>"
                    f"{UNTRAINED_SUFFIX})" if any(n in left for n in new) else "")
    if silent:
        log.warning("nightly %s: %d trained node(s) sent no telemetry: %s", t.iso, len(silent), silent[:10])
    return store, nodes, new, silent, sorted(retired & (set(trained) | set(store.nodes)))


def _score(t: Tonight, store: TelemetryStore, nodes: list[str], overrides: list[str],
           recipe: signal_choice.Recipe | None) -> ErrorStore:
    """Step 2: errors.h5, each node with its light map valid tonight; ``recipe``: the signal's recipe
    the applied thresholds were fitted with."""
    if t.cfg.nightly.slurm:  # the job scores every node with a model: retired ones that sent rows too
        _score_slurm(t, overrides)
        return ErrorStore(t.tmp / "errors.h5").keep(nodes)
    score_nodes(t.dcfg, store, t.models_dir, t.tmp / "errors.h5", nodes,
                light=lambda node: t.maps.for_night(node, t.iso), recipe_fallback=recipe)
    return ErrorStore(t.tmp / "errors.h5")


def _alarms(t: Tonight, store: TelemetryStore, errors: ErrorStore, th: Thresholds, signals: list,
            settling: dict[str, Change], silent: list[str]):
    """Step 3: alarms (csv, json, jsonl), cluster-wide events, incidents across nights (not of the
    ``settling`` nodes' alarms, nor of alarms within an event; the ``silent`` nodes' open ones stay
    open), drain candidates, metrics when labelled."""
    from hpcad.config import build

    n, tmp = t.cfg.nightly, t.tmp
    cm = build(t.cfg.threshold, "threshold").cost_model
    quotes = ExpectedQuotes(errors, store, t.models_dir, t.maps, t.iso, int(t.dcfg.preprocess.nan_fill_limit))
    records, metrics = apply_thresholds(errors, th, cm, t.cfg.report.top_k, "s", store.jobs(), tmp / "alarms.csv",
                                        signals=lambda: iter(signals), quote=quotes)
    alarms = [alarm_record(r) for r in records]
    held = hold(alarms, settling)
    if settling:
        log.warning("nightly %s: %d node(s) changed (nightly.changes) settle on a light map fitted on the nights "
                    "since the change; their %d alarm(s) tonight open no incident: %s", t.iso, len(settling), held,
                    ", ".join(f"{c.node} (since {c.since}{': ' + c.note if c.note else ''})"
                              for c in list(settling.values())[:10]))
    previous = previous_incidents(t.out, t.day, n.incident_gap_days)
    events = cluster_events([a for a in alarms if "settling" not in a], list(errors.nodes), n.event_share,
                            n.event_min_nodes, t.groups)
    continue_from(events, t.out, t.day)
    mark(alarms, events, previous)
    for e in events:
        log.warning("nightly %s: %s event %s to %s%s: %d of %d scored nodes%s alarmed (causes: %s); their alarms "
                    "within it open no node incident (nightly.event_share=%s)", t.iso,
                    "cluster-wide" if e["scope"] == "cluster" else "group", e["start"], e["end"],
                    f" (continued from the night before: since {e['first_start']})" if e.get("continues") else "",
                    e["nodes"], e["scored"], "" if e["scope"] == "cluster" else f" of group {e['scope']}",
                    ", ".join(f"{c} {k}" for c, k in e["causes"].items()), n.event_share)
    write_json(tmp / EVENTS, events)
    write_json(tmp / "alarms.json", alarms)
    incidents = night_incidents(t.day, [a for a in alarms if not held_because(a)], previous, silent)
    write_json(tmp / INCIDENTS, incidents)
    _write_jsonl(tmp / "alarms.jsonl", t.iso, alarms, incidents)
    confirmed = drain_candidates(incidents, n.drain_after_nights)
    (tmp / "drain.txt").write_text(drain_lines(confirmed))
    if metrics["labelled"]:
        write_json(tmp / "metrics.json", {"detector": "autoencoder", "cost_model": vars(cm), "splits":
                                          metrics["splits"], "class_profiles": class_profiles(errors)})
    held: dict[str, set[str]] = {}  # node -> why its alarms opened no incident (levels.csv, the node pages)
    for a in alarms:
        held.setdefault(a["node"], set()).update(held_because(a))
    return records, incidents, confirmed, events, {node: "; ".join(sorted(r)) for node, r in held.items() if r}


def held_because(alarm: dict) -> list[str]:
    """Why an alarm opened no incident (settling after its node's change, a cluster-wide event);
    empty when it did not (it belongs to an incident)."""
    why = []
    if "settling" in alarm:
        why.append(f"settling after its change of {alarm['settling']['since']}")
    if "cluster_event" in alarm:
        why.append(f"event {alarm['cluster_event']}")
    return why


def _drift_and_light(t: Tonight, errors: ErrorStore, th: Thresholds, signals: list, settling: dict[str, Change],
                     held: dict[str, str]):
    """Step 4: tonight's levels and drift verdicts; light maps refitted for the nodes asked for (drifted
    or all) on their rows under their threshold, but not for those alarmed on most of tonight's rows
    (a verdict's ``light`` says so), and for the nodes changed on one of the last
    ``nightly.light_days`` nights (hpcad.nightly.changes), each on its nights since its change only."""
    n, tmp = t.cfg.nightly, t.tmp
    scored_by = errors.models()  # each node's model digest, recorded as it was scored: no model file read again
    levels = [{**lv, "model": scored_by.get(lv["node"]) or t.maps.digest(lv["node"]),  # model: drift.assess
               "held": held.get(lv["node"], "")}
              for lv in night_levels(signals, th, errors.missing, errors.lost, t.rows_expected)]
    write_levels(tmp / "levels.csv", levels)
    verdicts = assess(t.out, t.day, levels, n.drift_ratio, n.drift_days, n.drift_reference_nights)
    drifted = [v["node"] for v in verdicts if v["drifted"]]
    targets = {"drifted": drifted, "all": list(errors.nodes), "off": []}.get(n.light_retrain)
    if targets is None:
        raise ConfigError(f"nightly.light_retrain={n.light_retrain!r}: drifted, all or off")
    changed = [node for node in errors.nodes if _refits_for_change(t, node, settling)]
    asked = [x for x in targets if x not in changed]  # the maintenance log's refits are never withheld
    withheld = {**_untrusted(th, asked), **_alarming(levels, asked)}
    for v in verdicts:
        if v["node"] in withheld:
            v["light"] = f"withheld: {withheld[v['node']]}"
    if withheld:
        log.warning("nightly %s: %d node(s) get no light map: alarmed on most of their rows tonight, or under a "
                    "threshold fitted on rows that were not normal (a fault is not learned as normal; a node whose new "
                    "behaviour is normal goes in nightly.changes): %s", t.iso,
                    len(withheld), ", ".join(f"{x} ({why})" for x, why in list(withheld.items())[:10]))
    order = [x for x in targets if x not in withheld] + [x for x in changed if x not in targets]
    nights = recent_nights(t.day, t.out, tmp, n.light_days) if order else []
    refits = [r for r in (light_retrain(t.cfg, node, t.day, _since_change(t, node, nights), t.maps, tmp / STAGED,
                                        under=None if node in changed else th) for node in order) if r]
    write_json(tmp / "light.json", refits)
    write_json(tmp / "drift.json", {"ratio": n.drift_ratio, "days": n.drift_days,
                                    "reference_nights": n.drift_reference_nights, "nodes": verdicts})
    return levels, verdicts, drifted, refits


def _untrusted(th: Thresholds, nodes: list[str]) -> dict[str, str]:
    """Of ``nodes``, those whose threshold the training run fitted on rows far above their normal
    level, taken as normal for want of labels (``details.check.not_normal_fit_nodes``: a period that
    held incidents). Such a threshold sits among the faults, so rows under it may be a fault too: maps
    fitted on them learned the real DAVIDE node's governor fault (its level, the fault's only sign
    there, fell from ~146x its baseline to ~7x) and hid its next one (docs/operations.md)."""
    named = (th.details.get("check") or {}).get("not_normal_fit_nodes") or {}
    return {x: f"its threshold was fitted on rows {named[x]:g}x its normal level, taken as normal for want of "
               f"labels" for x in nodes if x in named}


def _alarming(levels: list[dict], nodes: list[str]) -> dict[str, str]:
    """Of ``nodes``, those alarmed on most of tonight's rows (their level is over their threshold),
    with the count: drift's or ``light_retrain=all``'s map would learn their alarms as normal."""
    want = set(nodes)
    return {lv["node"]: f"{lv['alarmed_rows']} of {lv['rows']} rows alarmed tonight" for lv in levels
            if lv["node"] in want and 2 * lv["alarmed_rows"] > lv["rows"]}


def _refits_for_change(t: Tonight, node: str, settling: dict[str, Change]) -> bool:
    """Settling, or changed on one of the last ``nightly.light_days`` nights: the map is refitted on
    more of the nights since the change each night until it has that many."""
    c = t.change(node)
    return node in settling or (c is not None and t.iso <= c.window_end(t.cfg.nightly.light_days))


def _since_change(t: Tonight, node: str, nights: list) -> list:
    """The nights a node's light map may be fitted on: those since its latest change (all without one)."""
    c = t.change(node)
    return nights if c is None else [x for x in nights if x[0] >= c.since]


def _changes_seen(t: Tonight, nodes: list[str], settling: dict[str, Change], refits: list[dict]) -> list[list]:
    """The report's rows for the nodes changed recently: node, since, note, what tonight did."""
    refit = {r["node"]: r for r in refits}
    rows = []
    for node in nodes:
        c = t.change(node)
        if c is None or not (node in settling or node in refit):
            continue
        state = "settling: its alarms open no incident" if node in settling else "settled"
        if node in refit:
            r = refit[node]
            state += f"; light map refitted on {len(r['days'])} night(s) since, scores from {r['valid_from']}"
        rows.append([node, c.since, c.note, state])
    return rows


def _write_jsonl(path: Path, iso: str, alarms: list[dict], incidents: list[dict]) -> None:
    """One JSON object per alarm and line (log shippers read it as it is), with its incident."""
    with atomic_path(path) as tmp, open(tmp, "w") as fh:
        for a in alarms:
            inc = None if held_because(a) else incident_of(a, incidents)
            fh.write(json.dumps({"night": iso, **a, "incident": inc["id"] if inc else None,
                                 "incident_state": inc["state"] if inc else None}) + "\n")


def _check_complete(store: TelemetryStore, nodes: list[str], trained: list[str], day: dt.date, src: Path,
                    n: NightlyConfig) -> dict[str, int]:
    """Stop on a partial input (too few nodes, or a night whose newest row is too early); return the
    rows each node should have sent tonight: the night's length over its sampling step (the median
    spacing of its rows, or the nodes' median where it sent under three), so that a node whose
    collector stopped part-way is a telemetry gap too, not a node that looks normal."""
    iso = day.isoformat()
    if len(nodes) < n.min_node_fraction * max(len(trained), 1):
        raise InputError(f"nightly {iso}: partial input: {len(nodes)} of {len(trained)} trained nodes in {src} "
                         f"(nightly.min_node_fraction={n.min_node_fraction}); nothing changed")
    start, end = day_bounds(day, n.timezone)
    newest, outside, steps = -1, 0, {}
    for node in nodes:
        ts = store.timestamps(node)
        newest = max(newest, int(ts[-1]))
        outside += int(((ts < start) | (ts >= end)).sum())
        if len(ts) >= 3:
            steps[node] = float(np.median(np.diff(ts)))
    if newest < end - n.max_end_gap_s:
        last = dt.datetime.fromtimestamp(newest, ZoneInfo(n.timezone)).isoformat()
        raise InputError(f"nightly {iso}: partial input: the newest sample in {src} is {last}, more than "
                         f"{n.max_end_gap_s} s before the day ends (midnight in nightly.timezone={n.timezone}; "
                         f"still being exported?); nothing changed")
    if outside:
        log.warning("nightly %s: %d rows of %s lie outside the day (%s); they are scored too", iso, outside, src,
                    n.timezone)
    typical = float(np.median(list(steps.values()))) if steps else 0.0
    return {node: round((end - start) / step) for node in nodes if (step := steps.get(node, typical)) > 0}


def _score_slurm(t: Tonight, overrides: list[str]) -> None:
    """Step 2 as a SLURM job (slurm/score_all_nodes.sh): the same models, and the light maps valid
    tonight (``score.light_maps``, ``score.light_night``), as in this process."""
    dcfg, tmp = t.dcfg, t.tmp
    script = resource_dir("slurm") / "score_all_nodes.sh"
    keep = [o for o in overrides if not o.split("=")[0].lstrip("+~").startswith(("nightly.", "hydra.", "train_run"))]
    t.maps.folder.mkdir(parents=True, exist_ok=True)
    cmd = ["sbatch", "--wait", "--parsable", f"--export=ALL,HPCAD_RUN_DIR={tmp},HPCAD_SCORE_ONLY=1",
           "-o", str(tmp / "slurm-%j.out"), *scoring_job_size(dcfg), *dcfg.nightly.sbatch_args,
           str(script), f"train_run={t.train_run}", f"data.source={t.src}", "split.unit=rows", "split.train=0",
           "split.val=0", *keep, f"score.light_maps={t.maps.folder}", f"score.light_night={t.iso}"]
    log.info("nightly: %s", " ".join(cmd))
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0 or not (tmp / "errors.h5").exists():
        logs = "".join(p.read_text(errors="replace") for p in tmp.glob("slurm-*.out"))
        raise InputError(f"nightly: scoring job failed (sbatch exit {proc.returncode}): "
                         f"{(proc.stderr.strip() + ' ' + logs)[-800:]}")


def scoring_job_size(cfg: HpcadConfig) -> list[str]:
    """sbatch options sizing the nightly scoring job (``nightly.job_*``), not the training script's
    4 tasks x 4 GPUs x 8 CPUs; with ``--mem`` (scoring's memory budget follows it: hpcad/model/budget.py)."""
    n = cfg.nightly
    check_at_least("nightly", n, JOB_LEAST)
    mem, tasks = int(n.job_mem_mb), int(n.job_tasks)
    return ["--nodes=1", f"--ntasks-per-node={tasks}", f"--gpus-per-node={int(n.job_gpus_per_node)}",
            f"--cpus-per-task={int(n.job_cpus_per_task)}", f"--mem={mem * tasks}M", f"--time={n.job_time}"]
