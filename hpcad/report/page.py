"""``report.html``: the run's (or a night's) report, one static page that opens offline, with a page
per alarmed node (:mod:`hpcad.report.nodes`)."""
from __future__ import annotations

import csv
import html
import json
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

from hpcad.atomic import write_text
from hpcad.data.store import TelemetryStore, run_store_path
from hpcad.errorstore import ErrorStore
from hpcad.incidents import cause_of
from hpcad.model.files import untrained_nodes
from hpcad.report.markup import (alarms_table, fallback_how, fmt, gap_text, html_table, multiple, page,
                                  report_zone, rule_named, sortable_table, telemetry_gaps, top_names)
from hpcad.report.nodes import node_pages
from hpcad.report.plots import curves, heatmap, overview, profile_plot, signal_plot
from hpcad.threshold.evaluate import top_metrics_of
from hpcad.threshold.rules import ALWAYS, Thresholds

if TYPE_CHECKING:
    from hpcad.config import HpcadConfig


MAX_UNTRAINED_LISTED = 200  # a site where half the cluster was down lists 200 and points at the files
_NODES_SLOT = "<!-- alarmed nodes -->"  # a place in the page kept while warnings are put before it


def _count(n: int, noun: str) -> str:
    """``1 node``, ``3 nodes``."""
    return f"{n:,} {noun}{'' if n == 1 else 's'}"


def _name_classes(alarms: list[dict], names: list[str]) -> None:
    """The label classes of alarms by their ``data.label_names`` (alarms.csv keeps the numbers)."""
    if not names:
        return
    for a in alarms:
        a["label_classes"] = " ".join("_".join(names[int(c)].split()) if c.isdigit() and int(c) < len(names) else c
                                      for c in str(a.get("label_classes") or "").split())


def _alarm_budget(th: Thresholds, budget: dict) -> str:
    """What other multiples of the nodes' normal level would raise on the validation rows (no labels)."""
    now = th.details.get("times", (th.details.get("fallback") or {}).get("times"))  # None under a quantile
    rows = [[f"{lv['times']:g}x" + (" (now)" if now is not None and float(now) == lv["times"] else ""),
             lv["alarm_events"], lv["nodes_alarmed"], lv["per_node_day"]] for lv in budget["levels"]]
    return (f"<h2>Alarm budget</h2><p>No labels: what a threshold at each multiple of the nodes' normal level "
            f"(threshold=level, and the cost rule's fallback: threshold.times) raises on the validation rows "
            f"({_count(budget['nodes'], 'node')}, {budget['node_days']:,.1f} node-days). Choose the one whose "
            f"alarms the site can follow up, then <code>hpcad threshold threshold.times=K</code> with the run's "
            f"options (seconds, no training).</p>"
            + html_table(rows, ["times normal", "alarm events", "nodes alarmed", "events per node-day"]))


def _signal_said(errors: ErrorStore, cfg: HpcadConfig) -> str:
    """How the alarm signal was made (the recipe errors.h5 was scored with, and how it was chosen)."""
    r = errors.recipe
    said = "alarm signal: " + ("whitened reconstruction error (the residual over its covariance in training)"
                               if r.whitened else "reconstruction error")
    if cfg.signal.range_excess:
        said += f" + {r.weight:g} x range excess"
    if r.scaled:
        said += ", each metric over its held-out error"
    choice = json.loads(errors.attrs.get("signal_choice") or "null")
    if choice and choice.get("validation_ap"):
        said += f" (chosen on the validation rows of {choice['nodes']} node(s))"
    elif choice and choice.get("rule", "").startswith("no labelled validation rows: the recipe"):
        said += " (the recipe the applied thresholds were fitted with)"
    smooth = errors.smooth
    return html.escape(said) + ("" if smooth is None else f", smoothed over {smooth} rows")


def _training_said(cfg: HpcadConfig) -> str:
    """What kept rows out of this run's training beyond the split and labels (``split.exclude``,
    ``train.trim``), as a clause of the report's first paragraph; "" when nothing did."""
    said = []
    if getattr(cfg.split, "exclude", None):
        said.append(f"training left out the stretches listed in <code>{html.escape(str(cfg.split.exclude))}</code> "
                    f"(split.exclude)")
    if float(getattr(cfg.train, "trim", 0) or 0) > 0:
        said.append(f"trimmed loss: each training step left out its {float(cfg.train.trim):.0%} worst-reconstructed "
                    f"rows (train.trim)")
    return "".join(f"; {s}" for s in said)


def write_report(cfg: HpcadConfig, run_dir: Path, errors: ErrorStore, models_dir: Path, title: str = "hpcad report",
                 extra: list[str] | None = None, folder: Path | None = None,
                 node_history: dict[str, list[list]] | None = None, node_summary: bool = True,
                 zone: str | None = None, list_unmodelled: bool = True,
                 light: tuple[Path | None, str | None] | None = None) -> Path:
    """The run's (or a night's) report; ``extra`` HTML sections go after the overview; ``folder`` is
    the folder named on the page when ``run_dir`` is a temporary one that will be renamed;
    ``node_summary``: the table of alarmed nodes after the overview (a night has its incidents instead);
    ``node_history`` (node -> rows of :data:`hpcad.report.nodes.HISTORY_HEADER`, newest first) goes on the node pages;
    times are shown in ``report.timezone``, else ``zone`` (the nightly's site zone), else ``data.timezone``;
    ``list_unmodelled``: a section for the input's nodes without a model (the nightly has its own);
    ``light``: the light maps' folder and night scoring read (default ``score.light_maps``,
    ``score.light_night``), for the node pages' expected values."""
    zone = report_zone(cfg, zone)
    th = Thresholds.load(run_dir / "thresholds.json")
    metrics = json.loads((run_dir / "metrics.json").read_text()) if (run_dir / "metrics.json").exists() else None
    alarms = list(csv.DictReader(open(run_dir / "alarms.csv"))) if (run_dir / "alarms.csv").exists() else []
    _name_classes(alarms, [str(x) for x in cfg.data.label_names or []])
    per_node_alarms: dict[str, int] = {}
    for a in alarms:
        per_node_alarms[a["node"]] = per_node_alarms.get(a["node"], 0) + 1
    ranked = sorted(errors.nodes, key=lambda n: (-per_node_alarms.get(n, 0), n))  # most alarms first
    shown = ranked[: cfg.report.max_nodes_plotted]
    unlabelled = th.details.get("unlabelled_nodes") or 0  # nodes whose thresholds the fallback set
    name, said = rule_named(th)
    parts = [f"<h1>{html.escape(title)}</h1><p>run folder: <code>{html.escape(str(folder or run_dir))}</code>; "
             f"{_count(len(errors.nodes), 'node')}, {_count(len(errors.metrics), 'metric')}; threshold rule "
             f"<b>{name}</b> ({said}); {_count(len(alarms), 'alarm event')} on {_count(len(per_node_alarms), 'node')}; "
             f"{_signal_said(errors, cfg)}"
             + (f"; labels from the incident list <code>{html.escape(str(cfg.data.labels))}</code>"
                if getattr(cfg.data, "labels", None) else "") + _training_said(cfg) + ".</p>"]
    if 0 < unlabelled < len(th.nodes):
        fb = th.details["fallback"]
        parts.append(f"<p>{unlabelled} of {len(th.nodes)} nodes have no labels: their thresholds are the {fb['rule']} "
                     f"rule's ({fallback_how(fb)}), not the {th.rule} rule's (threshold.fallback).</p>")
    exact = th.details.get("exact_optimum_nodes") or []  # hpcad.threshold.rules.CostRule: drift's choice alarmed always
    if exact:
        n = int(th.details.get("exact_optimum_node_count", len(exact)))
        parts.append(f"<p>On {_count(n, 'node')} ({html.escape(', '.join(exact[:10]))}{', ...' if n > 10 else ''}) "
                     f"the drift-smoothed threshold would alarm on {100 * ALWAYS:.0f}% or more of the validation rows: "
                     f"{'its threshold is' if n == 1 else 'their thresholds are'} the exact validation optimum "
                     f"(as threshold.drift=0).</p>")
    store_path = run_store_path(run_dir, cfg.data.source)
    time_unit = "s"
    store = None
    if store_path.exists():
        store = TelemetryStore(store_path)
        skipped = store.skipped
        time_unit = store.time_unit(store.nodes[0]) if store.nodes else "s"
        if skipped:
            parts.append(f"<h2>Skipped nodes ({len(skipped)})</h2><p>Bad input; these nodes were not scored.</p>"
                         + html_table(skipped, ["node", "reason"]))
        if store.skipped_files:
            parts.append(f"<h2>Skipped input files ({len(store.skipped_files)})</h2><p>Bad input (data.on_bad_node="
                         f"skip); every node's rows in these files are missing.</p>"
                         + html_table(store.skipped_files, ["file", "reason"]))
        parts.append(input_warnings_section(*store.warnings))
    untrained = untrained_nodes(models_dir)
    if untrained:
        rows = sorted(untrained.items())[:MAX_UNTRAINED_LISTED]
        parts.append(f"<h2>Untrained nodes ({len(untrained)})</h2><p>Too few training rows (data.on_bad_node=skip): "
                     f"these nodes have no model and were not scored"
                     + (f"; the first {len(rows)} listed (all in <code>models/*.untrained.json</code>)"
                        if len(rows) < len(untrained) else "") + ".</p>" + html_table(rows, ["node", "reason"]))
    unmodelled = sorted(set(store.nodes) - set(errors.nodes) - set(untrained) - {s[0] for s in store.skipped}) \
        if store is not None and list_unmodelled else []
    if unmodelled:  # scoring new data with a training run that has no model for them (train_run)
        parts.append(f"<h2>Nodes without a model ({len(unmodelled)})</h2><p>In the input, but the training run "
                     f"(<code>{html.escape(str(models_dir))}</code>) has no model for them (nodes added since it "
                     f"trained): not scored. Train them into that run (docs/operations.md).</p><p>"
                     + html.escape(", ".join(unmodelled[:MAX_UNTRAINED_LISTED]))
                     + (" ..." if len(unmodelled) > MAX_UNTRAINED_LISTED else "") + "</p>")
    in_overview = ranked[: cfg.report.max_nodes_overview]
    if in_overview:
        parts.append("<h2>Cluster overview</h2>" + overview(errors, th, sorted(in_overview), time_unit, zone))
        if len(in_overview) < len(errors.nodes):
            parts.append(f"<p>{len(in_overview)} of {len(errors.nodes)} nodes shown (most alarms first; "
                         f"report.max_nodes_overview).</p>")
    budget = th.details.get("by_level")
    if budget and metrics is None and node_summary:  # no labels: the site chooses threshold.times by alarm budget
        parts.append(_alarm_budget(th, budget))
    parts.append(_NODES_SLOT)  # the alarmed nodes' table goes here, once the node pages are known
    parts += extra or []
    if metrics:
        rows = []
        for name, res in [("autoencoder", metrics)] + [(k, v) for k, v in metrics.get("baselines", {}).items()]:
            for split in ("train", "val", "test"):
                s = res["splits"][split]
                if s.get("rows") == 0:  # e.g. a nightly run scores test rows only
                    continue
                rows.append([name, split, s["cost"], s["false_alarms"], s["missed"], s["precision"], s["recall"], s["f1"]])
        ranks = []
        for name, res in [("autoencoder", metrics)] + [(k, v) for k, v in metrics.get("baselines", {}).items()]:
            for split in ("val", "test", "eval"):
                r = res["splits"].get(split, {}).get("ranking")
                if r and r.get("nodes"):
                    ranks.append([name, "val + test" if split == "eval" else split, r["nodes"], r["ap"],
                                  r["roc_auc"], r["best_f1"]])
        parts.append("<h2>Detection quality</h2>" + comparison_table(metrics))
        parts.append("<details><summary>Every split</summary><p>Threshold-free (mean over nodes with both classes; "
                     "no point adjustment):</p>" + html_table(ranks, ["detector", "rows", "nodes",
                                                                      "average precision", "ROC-AUC", "best F1"])
                     + "<p>At the fitted thresholds:</p>" + html_table(rows, [
                         "detector", "split", "cost", "false alarms", "missed", "event precision", "event recall",
                         "event F1"]) + "</details>")
        cm = metrics["cost_model"]
        parts.append(f"<p>cost = {cm['c_alarm']} x false alarms + {cm['c_missed']} x missed anomalies, "
                     f"tolerance +-{cm['tolerance']} rows.</p>")
        if "range" in metrics.get("baselines", {}):
            parts.append("<p><b>range</b> is no model: how far each value lies outside its training range, the term "
                         "the autoencoder's signal adds (signal.range_excess). Where it matches the autoencoder, "
                         "the anomalies are values never seen in training; pca, knn and kde add the same term "
                         "(baselines.range_excess).</p>")
    check = th.details.get("check") or {}
    if check.get("verdict") in ("never_alarm", "always_alarm") or check.get("always_alarm_nodes"):
        what = {"never_alarm": "raises no alarm on any row it was fitted on: " + (  # a night may still alarm
                    "it may be set too high" if alarms else "it will probably never alarm"),
                "always_alarm": f"alarms on {100 * check.get('alarm_share', 0):.0f}% of the rows it was fitted on",
                }.get(check.get("verdict"), f"alarms on most rows of {check.get('always_alarm_node_count')} node(s): "
                                            + ", ".join(check.get("always_alarm_nodes", [])[:10]))
        parts.insert(1, f"<p class='warning'><b>Threshold warning:</b> the {th.rule} threshold "
                        f"({th.scope} scope) {html.escape(what)}.</p>")
    not_normal = check.get("not_normal_fit_nodes") or {}
    if not_normal:  # an unsupervised fit on a period that holds incidents (hpcad.threshold.rules.check_thresholds)
        named = ", ".join(f"{n} {v:g}x" for n, v in list(not_normal.items())[:10])
        parts.insert(1, f"<p class='warning'><b>Threshold warning:</b> on {check.get('not_normal_fit_node_count')} "
                        f"node(s) the rows the {th.rule} threshold took as normal (none labelled as anomalies) sit "
                        f"far above the node's normal level (median signal, times its held-out training level: "
                        f"{html.escape(named)}). That period likely holds incidents or a changed workload, and the "
                        f"threshold sits among them: label them (data.label_column, threshold=cost), use a rule that "
                        f"takes no rows as normal (threshold=level, or threshold.fallback=level with threshold=cost) "
                        f"or apply thresholds fitted on a quiet period (train_run=).</p>")
    paged = [n for n in ranked if per_node_alarms.get(n)][: int(cfg.report.max_node_pages)]
    pages = node_pages(run_dir, errors, th, paged, alarms, time_unit, title, store, models_dir,
                        history=node_history, zone=zone, fill_limit=int(cfg.preprocess.nan_fill_limit),
                        light=light or (cfg.score.light_maps, cfg.score.light_night))

    def link(node: str) -> str | None:
        return pages.get(node)

    parts[parts.index(_NODES_SLOT)] = ((alarmed_nodes(alarms, th, link) if alarms else "")
                                       + gaps_section(errors, cfg.report.max_missing_share)) if node_summary else ""
    parts.append("<h2>Alarm signal</h2>" + (f"<p>{len(pages)} alarmed node(s) have their own page (follow a node "
                                             f"in the alarms table).</p>" if pages else ""))
    sigs = {s.node: s for s in errors.signals(shown)}
    for n in shown:
        parts.append((f"<p><a href='{html.escape(pages[n])}'>{html.escape(n)}</a></p>" if n in pages else "")
                     + signal_plot(sigs[n], th, time_unit, zone))
    if shown:
        parts.append("<h2>Per-metric error</h2>" + heatmap(errors, sigs[shown[0]], th, time_unit, zone=zone))
    if metrics and metrics.get("class_profiles"):
        parts.append("<h2>Mean error profile per class</h2>")
        parts += [profile_plot(c, p) for c, p in metrics["class_profiles"].items()]
    parts.append("<h2>Training</h2>" + curves(models_dir, shown[:8]))
    if alarms:
        parts.append(f"<h2>Alarms ({len(alarms)})</h2>" + alarms_table(alarms, link, zone=zone))
    out = run_dir / "report.html"
    write_text(out, page(title, parts))
    return out


def alarmed_nodes(alarms: list[dict], th: Thresholds, link) -> str:
    """One row per alarmed node, the highest peak (signal / threshold) first: which nodes to look at,
    and why (the cause of each alarm: the metric family holding most of its error, as incidents use)."""
    by_node: dict[str, list[dict]] = {}
    for a in alarms:
        by_node.setdefault(a["node"], []).append(a)

    def ratio(a: dict) -> float:
        return float(a["peak_score"]) / max(th.threshold_for(a["node"]), 1e-12)

    labelled = any(a.get("label_classes") for a in alarms)
    with_jobs = any(a.get("jobs") for a in alarms)
    header = ["node", "alarms", "alarmed rows", "peak / threshold", "last alarm ends", "cause",
              "top metrics (highest alarm)"] + (["label classes"] if labelled else []) + (["jobs"] if with_jobs else [])
    rows = []
    for node, group in by_node.items():
        top = max(group, key=ratio)
        causes = Counter(cause_of({"top_metrics": top_metrics_of(a)}) for a in group)
        cause = ", ".join(c if n == 1 else f"{c} ({n})" for c, n in causes.most_common())
        names = top_names(top_metrics_of(top), 5)
        alarmed, last = sum(int(float(a["rows"])) for a in group), str(max(a["end"] for a in group))
        row = [(node, node, link(node)), (str(len(group)), str(len(group)), None), (str(alarmed), str(alarmed), None),
               (multiple(ratio(top)), repr(ratio(top)), None), (last, last, None), (cause, cause, None),
               (names, names, None)]
        if labelled:
            classes = " ".join(sorted({c for a in group for c in str(a.get("label_classes") or "").split()}))
            row.append((classes, classes, None))
        if with_jobs:
            jobs = " ".join(sorted({j for a in group for j in str(a.get("jobs") or "").split()}))
            row.append((jobs, jobs, None))
        rows.append((ratio(top), row))
    rows.sort(key=lambda r: -r[0])
    return (f"<h2>Alarmed nodes ({len(by_node)})</h2><p>One row per node, the highest peak first (peak signal / "
            f"its threshold); cause: the metric family holding most of an alarm's error (ips, power, temp...), "
            f"with its number of alarms. A node's page shows its signal and the metrics behind it.</p>"
            + sortable_table("alarmed-nodes", header, [r for _, r in rows], "nodes", "node, cause, metric, job..."))


# The comparison's columns: (header, split, where in the split's figures, higher is better)
COMPARE = [("AP val", "val", ("ranking", "ap"), True), ("AP test", "test", ("ranking", "ap"), True),
           ("ROC-AUC test", "test", ("ranking", "roc_auc"), True),
           ("best F1 test", "test", ("ranking", "best_f1"), True), ("cost val", "val", ("cost",), False),
           ("cost test", "test", ("cost",), False), ("event F1 test", "test", ("f1",), True)]


def comparison_table(metrics: dict) -> str:
    """One row per detector (the autoencoder, then the baselines), the figures that decide between
    them side by side: threshold-free first (chosen on validation, reported on test), then the cost
    model and events at the fitted thresholds; the best of each column in bold. Empty columns (a split
    without rows or labels) are left out."""
    detectors = [("autoencoder", metrics)] + list(metrics.get("baselines", {}).items())

    def value(res: dict, split: str, path: tuple) -> float | None:
        v = res.get("splits", {}).get(split, {})
        if v.get("rows") == 0:
            return None
        for key in path:
            v = v.get(key) if isinstance(v, dict) else None
        if isinstance(v, dict) or v is None:
            return None
        ok = path[0] != "ranking" or res["splits"][split].get("ranking", {}).get("nodes")
        return float(v) if ok else None

    cols = [(c, [value(res, split, path) for _, res in detectors], high) for c, split, path, high in COMPARE]
    cols = [c for c in cols if any(v is not None for v in c[1])]
    if not cols:
        return ""
    best = [(max if high else min)((v for v in vals if v is not None), default=None) for _, vals, high in cols]
    def cell(v: float | None, b: float | None) -> str:
        text = html.escape(fmt(v))
        return f"<td><b>{text}</b></td>" if v is not None and v == b else f"<td>{text}</td>"

    body = "".join(f"<tr><td>{html.escape(name)}</td>"
                   + "".join(cell(vals[i], b) for (_, vals, _), b in zip(cols, best)) + "</tr>"
                   for i, (name, _) in enumerate(detectors))
    head = "".join(f"<th>{html.escape(c)}</th>" for c, _, _ in cols)
    return ("<p>Each detector on the same rows, the best of each column in bold (AP: average precision, mean "
            "over nodes with both classes, no point adjustment; cost and events at the thresholds fitted on "
            "the validation split; defaults are chosen on validation figures, test figures are for "
            f"reporting):</p><table><tr><th>detector</th>{head}</tr>{body}</table>")


INPUT_WARNINGS_SHOWN = 3  # the input warnings listed open; the others the store kept are folded


def input_warnings_section(total: int, first: list[str]) -> str:
    """What the readers warned of while ingesting (a row cut short, repeated rows, rows without a
    node...; hpcad/data/notes.py): the first ones the store kept, and how many; "" without any."""
    if not total:
        return ""
    more = f" The first {len(first)} of {total}; the ingest's log has every one." if total > len(first) else ""

    def listed(messages: list[str]) -> str:
        return "<ul>" + "".join(f"<li><code>{html.escape(m)}</code></li>" for m in messages) + "</ul>"

    shown, rest = first[:INPUT_WARNINGS_SHOWN], first[INPUT_WARNINGS_SHOWN:]  # the rest folded: the alarms come next
    return (f"<h2>Input warnings ({total})</h2><p>What the readers left out or repaired while ingesting the "
            f"input (docs/data.md lists each case).{more}</p>" + listed(shown)
            + (f"<details><summary>{len(rest)} more</summary>{listed(rest)}</details>" if rest else ""))


def gaps_section(errors: ErrorStore, max_share: float) -> str:
    """The nodes with more than ``max_share`` of their input values missing (errors.h5's
    ``node_missing``), most first, then those with a metric they reported in training that sent no
    value in the scored input (``node_lost``): their models saw no error where they saw no value."""
    gaps = telemetry_gaps([{"node": n, "missing_share": errors.missing.get(n, 0.0),
                            "metrics_lost": errors.lost.get(n, [])} for n in errors.nodes], max_share)
    if not gaps:
        return ""
    return (f"<h2>Telemetry gaps ({len(gaps)})</h2><p>Nodes with more than {max_share:.0%} of their metric values "
            f"missing in the scored input (report.max_missing_share), and nodes with a metric they reported in "
            f"training that sent no value. A model sees no error where it sees no value: "
            f"these nodes cannot alarm on what is missing. Check the node and its collector.</p>"
            + html_table([[g["node"], gap_text(g, max_share), errors.rows[g["node"]]] for g in gaps[:500]],
                         ["node", "gap", "rows"]))
