"""The report stage in process (hpcad/report/): what the page says, the node pages it links, the
escaping of names from the data, and the warnings it must not drop."""
import csv
import re

import numpy as np
import pytest

from hpcad.data.store import TelemetryStore
from hpcad.errorstore import FORMAT, ErrorStore
from hpcad.report.markup import alarms_table, html_table
from hpcad.report.page import INPUT_WARNINGS_SHOWN, write_report
from hpcad.score import score_nodes
from hpcad.threshold.evaluate import parse_top_metrics, write_alarms_csv
from hpcad.threshold.rules import Thresholds

from test_score import _site


def _run(tmp_path, alarms: list[dict], details: dict | None = None, max_pages: int = 10, whiten: object = "auto"):
    """A scored two-node run folder (nodes a and b) with the given alarms and per-node thresholds."""
    cfg, store, models, _ = _site(tmp_path)
    cfg.signal.whiten = whiten
    score_nodes(cfg, store, models, tmp_path / "errors.h5")
    Thresholds("cost", "node", None, {"a": 1.0, "b": 2.0}, details or {}).save(tmp_path / "thresholds.json")
    cols = ["node", "start", "end", "rows", "split", "peak_score", "label_classes", "top_metrics"]
    with open(tmp_path / "alarms.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=cols)
        w.writeheader()
        w.writerows(alarms)
    cfg.report.max_node_pages = max_pages
    return cfg, ErrorStore(tmp_path / "errors.h5"), models


ALARM_B = {"node": "b", "start": 45000, "end": 48000, "rows": 11, "split": "test", "peak_score": 12.3456,
           "top_metrics": "power:0.91 ips:0.05"}


def test_the_page_counts_alarms_and_links_each_alarmed_node_to_its_page(tmp_path):
    cfg, errors, models = _run(tmp_path, [ALARM_B, {**ALARM_B, "start": 51000, "end": 52000}], whiten=False)
    page = write_report(cfg, tmp_path, errors, models, title="nightly <test>").read_text()
    assert "<title>nightly &lt;test&gt;</title>" in page  # the title is escaped
    assert "2 nodes, 3 metrics" in page and "2 alarm events on 1 node;" in page
    # how the signal was made: the recipe errors.h5 was scored with (both options fixed here)
    assert "alarm signal: reconstruction error + 10 x range excess, smoothed over 25 rows." in page
    cfg.signal.whiten = True  # the residuals whitened (hpcad/model/whiten.py): said so
    score_nodes(cfg, TelemetryStore(tmp_path / "store.h5"), models, tmp_path / "errors.h5")
    page = write_report(cfg, tmp_path, ErrorStore(tmp_path / "errors.h5"), models).read_text()
    assert ("alarm signal: whitened reconstruction error (the residual over its covariance in training) + 10 x "
            "range excess, smoothed over 25 rows.") in page


def test_label_classes_are_shown_by_the_names_the_labels_were_read_with(tmp_path):
    cfg, errors, models = _run(tmp_path, [{**ALARM_B, "label_classes": "1 2"}])
    cfg.data.label_names = ["normal", "power save", "performance"]
    page = write_report(cfg, tmp_path, errors, models).read_text()
    assert "power_save performance" in page and "power_save performance" in (tmp_path / "nodes" / "b.html").read_text()
    assert "1 2" in (tmp_path / "alarms.csv").read_text()  # the file keeps the class numbers
    assert "<a href='nodes/b.html'>b</a>" in page  # the alarmed node's page, linked from the table
    assert sorted(p.name for p in (tmp_path / "nodes").glob("*.html")) == ["b.html"]  # a has no alarm: no page
    node_page = (tmp_path / "nodes" / "b.html").read_text()
    assert node_page.count("<img ") == 3  # signal, per-metric errors, values
    assert "power" in re.sub(r"<img[^>]*>", "", node_page)  # the top metric is named on it


def test_the_alarmed_nodes_come_first_one_row_each_highest_peak_first_with_their_causes(tmp_path):
    """An operator's first question: which nodes, and why. The table follows the overview, ranks the
    nodes by peak signal over their own threshold (a's 1.0, b's 2.0) and names each alarm's cause."""
    a = {**ALARM_B, "node": "a", "rows": 3, "peak_score": 3.0, "end": 47000, "top_metrics": "temp_p0_1:0.5 power:0.1"}
    b2 = {**ALARM_B, "start": 51000, "end": 52000, "peak_score": 4.0, "top_metrics": "ips_p0_1:0.8 ips_p0_2:0.3"}
    cfg, errors, models = _run(tmp_path, [a, ALARM_B, b2])
    page = write_report(cfg, tmp_path, errors, models).read_text()
    assert page.index("Cluster overview") < page.index("<h2>Alarmed nodes (2)</h2>") < page.index("Alarm signal")
    table = page.split("id='alarmed-nodes'>")[1].split("</table>")[0]
    rows = [re.findall(r"<td[^>]*>(.*?)</td>", r) for r in table.split("<tr>")[2:]]
    assert [r[0] for r in rows] == ["<a href='nodes/b.html'>b</a>", "<a href='nodes/a.html'>a</a>"]  # 6.17x, 3x
    assert rows[0][1:7] == ["2", "22", "6.2x", "52000", "power, ips", "power, ips"]
    assert rows[1][1:7] == ["1", "3", "3x", "47000", "temp", "temp_p0_1, power"]
    assert "<span id='alarmed-nodes-count'>2</span> of 2 nodes shown" in page
    cfg, errors, models = _run(tmp_path, [a, ALARM_B, b2], details={"check": {"verdict": "never_alarm"}})
    page = write_report(cfg, tmp_path, errors, models).read_text()  # warnings go first; the table stays put
    assert page.index("Threshold warning") < page.index("Cluster overview") < page.index("<h2>Alarmed nodes (2)")
    assert "<!--" not in page


def test_a_rerun_removes_pages_of_nodes_no_longer_alarmed_and_respects_the_page_cap(tmp_path):
    cfg, errors, models = _run(tmp_path, [ALARM_B])
    write_report(cfg, tmp_path, errors, models)
    assert (tmp_path / "nodes" / "b.html").exists()
    cfg, errors, models = _run(tmp_path, [ALARM_B], max_pages=0)
    page = write_report(cfg, tmp_path, errors, models).read_text()
    assert not list((tmp_path / "nodes").glob("*.html"))  # the stale page is gone
    assert "nodes/b.html" not in page


def test_a_threshold_that_will_never_alarm_is_said_at_the_top(tmp_path):
    cfg, errors, models = _run(tmp_path, [], details={"check": {"verdict": "never_alarm"}})
    page = write_report(cfg, tmp_path, errors, models).read_text()
    warning = page.index("Threshold warning")
    assert warning < page.index("Cluster overview") and "will probably never alarm" in page


def test_thresholds_of_unlabelled_nodes_are_said_to_be_the_fallbacks(tmp_path):
    """An unlabelled site: the page named only the cost rule, whose thresholds none of its nodes had.
    Where no node has labels the headline names the fallback; where some have, a line counts them."""
    details = {"unlabelled_nodes": 2, "fallback": {"rule": "level", "times": 5.0}}  # the default fallback
    cfg, errors, models = _run(tmp_path, [ALARM_B], details=details)
    page = write_report(cfg, tmp_path, errors, models).read_text()
    assert "threshold rule <b>level</b> (5 times each node's normal level; no node has labels: the cost rule's " \
           "threshold.fallback);" in page and "have no labels" not in page
    assert "Alarm budget" not in page  # no budget counted
    budget = {"nodes": 2, "node_days": 8.0, "levels": [{"times": k, "alarm_events": e, "nodes_alarmed": m,
                                                        "per_node_day": e / 8} for k, e, m in ((3.0, 6, 2), (5.0, 2, 1))]}
    cfg, errors, models = _run(tmp_path, [ALARM_B], details={**details, "by_level": budget})
    page = write_report(cfg, tmp_path, errors, models).read_text()
    assert "<h2>Alarm budget</h2>" in page and "(2 nodes, 8.0 node-days)" in page
    assert "<td>3x</td><td>6</td><td>2</td><td>0.75</td>" in page and "<td>5x (now)</td><td>2</td>" in page
    assert "Alarm budget" not in write_report(cfg, tmp_path, errors, models, node_summary=False).read_text()
    node_page = next((tmp_path / "nodes").glob("*.html")).read_text()
    assert "on the signal (level, 5 times each node's normal level; no node has labels: the cost rule's " \
           "threshold.fallback)." in node_page
    details = {"unlabelled_nodes": 1, "fallback": {"rule": "quantile", "q": 0.995}}
    cfg, errors, models = _run(tmp_path, [ALARM_B], details=details)
    page = write_report(cfg, tmp_path, errors, models).read_text()
    assert "threshold rule <b>cost</b> (node scope);" in page
    assert "1 of 2 nodes have no labels: their thresholds are the quantile rule's (q=0.995 of the signal), " \
           "not the cost rule's (threshold.fallback)" in page
    cfg, errors, models = _run(tmp_path, [ALARM_B])
    page = write_report(cfg, tmp_path, errors, models).read_text()
    assert "have no labels" not in page and "threshold rule <b>cost</b> (node scope);" in page
    assert "on the signal (cost, node scope)." in next((tmp_path / "nodes").glob("*.html")).read_text()


def test_a_scope_chosen_on_the_validation_rows_is_said_so(tmp_path):
    choice = {"chosen": "node", "labelled_nodes": 2, "second_half_cost": {"node": 10.0, "cluster": 30.0}}
    cfg, errors, models = _run(tmp_path, [ALARM_B], details={"scope_choice": choice})
    page = write_report(cfg, tmp_path, errors, models).read_text()
    assert "threshold rule <b>cost</b> (node scope, chosen on the validation rows (threshold.scope=auto));" in page
    one = {"chosen": "node", "labelled_nodes": 1, "how": "fewer than two labelled nodes"}  # nothing was compared
    cfg, errors, models = _run(tmp_path, [ALARM_B], details={"scope_choice": one})
    assert "threshold rule <b>cost</b> (node scope);" in write_report(cfg, tmp_path, errors, models).read_text()


def test_nodes_given_the_exact_optimum_instead_of_an_always_alarm_are_named(tmp_path):
    details = {"exact_optimum_nodes": ["b"], "exact_optimum_node_count": 1}  # hpcad.threshold.rules.CostRule
    cfg, errors, models = _run(tmp_path, [ALARM_B], details=details)
    page = write_report(cfg, tmp_path, errors, models).read_text()
    assert "On 1 node (b) the drift-smoothed threshold would alarm on 90% or more of the validation rows: its " \
           "threshold is the exact validation optimum (as threshold.drift=0)." in page
    many = {"exact_optimum_nodes": [f"n{i:02d}" for i in range(12)], "exact_optimum_node_count": 12}
    cfg, errors, models = _run(tmp_path, [ALARM_B], details=many)
    assert "On 12 nodes (n00, n01, n02, n03, n04, n05, n06, n07, n08, n09, ...) the drift-smoothed threshold would " \
           "alarm on 90% or more of the validation rows: their thresholds are" in write_report(cfg, tmp_path, errors,
                                                                                           models).read_text()
    cfg, errors, models = _run(tmp_path, [ALARM_B])
    assert "drift-smoothed" not in write_report(cfg, tmp_path, errors, models).read_text()


def test_a_threshold_fitted_on_a_period_that_is_not_normal_is_a_warning_at_the_top(tmp_path):
    """Without labels a rule takes the validation period as normal; on DAVIDE over half of it scores
    like the anomalies, and the threshold lands among them: the operator is told, with the nodes."""
    check = {"fit_rows": 20, "alarm_share": 0.005, "verdict": "ok", "not_normal_fit_nodes": {"b": 51.4, "a": 12.0},
             "not_normal_fit_node_count": 2}
    cfg, errors, models = _run(tmp_path, [ALARM_B], details={"check": check})
    page = write_report(cfg, tmp_path, errors, models).read_text()
    warning = page.split("<p class='warning'>")[1].split("</p>")[0]
    assert "on 2 node(s) the rows the cost threshold took as normal" in warning and "b 51.4x, a 12x" in warning
    assert "train_run=" in warning and page.index("<p class='warning'>") < page.index("<h2>")
    cfg, errors, models = _run(tmp_path, [ALARM_B], details={"check": {**check, "not_normal_fit_nodes": {},
                                                                      "not_normal_fit_node_count": 0}})
    assert "took as normal" not in write_report(cfg, tmp_path, errors, models).read_text()


def test_tables_escape_what_comes_from_the_data():
    t = html_table([["<b>x</b>", 0.123456, None, 1378.4]], ["node & rack", "value", "empty", "cost"])
    assert "<th>node &amp; rack</th>" in t and "&lt;b&gt;x&lt;/b&gt;" in t and "<td>0.123</td>" in t
    assert "<td>1,378</td>" in t  # a cost as operators read it (was 1.38e+03)
    assert "<td></td>" in t
    a = alarms_table([{**ALARM_B, "node": "n<1>", "jobs": "42 43"}], lambda n: "nodes/n%3C1%3E.html")
    assert "<a href='nodes/n%3C1%3E.html'>n&lt;1&gt;</a>" in a and "data-v='power, ips'>power, ips</td>" in a  # names only
    assert "1</span> of 1 alarms" in a


def test_the_alarms_table_leaves_out_columns_that_say_nothing():
    """A night's alarms are all one split, unlabelled, and without job context at many sites: the
    table showed split, label_classes, jobs and users columns of "test" and blanks, which squeezed
    the top metrics. A column is there where an alarm has a value, the split where there are two."""
    def header(alarms):
        return re.findall(r"<th title='click to sort'>(.*?)</th>", alarms_table(alarms, lambda n: None))

    night = [ALARM_B, {**ALARM_B, "start": 51000, "end": 52000, "label_classes": "", "jobs": None}]
    assert header(night) == ["node", "start", "end", "rows", "peak_score", "top_metrics"]
    run = [{**ALARM_B, "split": "val", "label_classes": "1"}, {**ALARM_B, "users": "dana"}]
    assert header(run) == ["node", "start", "end", "rows", "split", "peak_score", "label_classes", "top_metrics",
                           "users"]


def test_metric_names_with_spaces_and_colons_come_back_whole_from_alarms_csv(tmp_path):
    """IPMI sensor names hold spaces ("CPU1 Temp", "Fan 1A"): alarms.csv writes the top metrics as
    space-separated ``name:error``; reading them back split such names in two, so a table showed
    "CPU1" and "Temp" and the cause was "Temp"."""
    top = [{"metric": "CPU1 Temp", "error": 0.0105}, {"metric": "mem:used", "error": 0.0122},
           {"metric": "Fan 1A", "error": 3.89e-05}, {"metric": "ips_p0_0", "error": 586.0}]
    write_alarms_csv(tmp_path / "alarms.csv", [{**ALARM_B, "top_metrics": top}])
    cell = next(csv.DictReader(open(tmp_path / "alarms.csv")))["top_metrics"]
    assert cell == "CPU1 Temp:0.0105 mem:used:0.0122 Fan 1A:3.89e-05 ips_p0_0:586"
    assert parse_top_metrics(cell) == top
    assert "data-v='CPU1 Temp, mem:used, Fan 1A, ips_p0_0'" in alarms_table([{**ALARM_B, "top_metrics": cell}],
                                                                          lambda n: None)


def test_nodes_whose_input_values_are_missing_are_listed_as_telemetry_gaps(tmp_path):
    """A node whose collector sent rows without values scores as normal (no value, no error), and so
    does a node whose collector lost a metric it had in training (here a third of its values, under
    report.max_missing_share): the run's report lists both, from errors.h5's node_missing and
    node_lost (kept by the index over per-rank error files), beside the alarmed nodes."""
    from hpcad.data.store import TelemetryStore, write_store
    from hpcad.errorstore import write_index

    from test_score import METRICS

    cfg, errors, models = _run(tmp_path, [ALARM_B])
    store = TelemetryStore(tmp_path / "store.h5")
    nodes = [store.read(n) for n in store.nodes]
    nodes[0].values[:140] = np.nan  # node a: 70 % of its rows without any value
    nodes[1].values[:, 2] = np.nan  # node b: its third metric lost
    write_store(tmp_path / "store.h5", METRICS, nodes, "test")
    score_nodes(cfg, TelemetryStore(tmp_path / "store.h5"), models, tmp_path / "errors.h5")
    errors = ErrorStore(tmp_path / "errors.h5")
    assert errors.missing["a"] > 0.69 and errors.missing["b"] == pytest.approx(1 / 3)
    assert errors.lost == {"b": [METRICS[2]]}  # a's metrics each have a value in its last rows
    page = write_report(cfg, tmp_path, errors, models).read_text()
    gaps = page.split("<h2>Telemetry gaps (2)</h2>")[1].split("</table>")[0]
    assert "<td>a</td><td>70% of its values missing</td><td>200</td>" in gaps
    assert f"<td>b</td><td>1 metric(s) reported in training sent no value: {METRICS[2]}</td>" in gaps
    assert page.index("<h2>Alarmed nodes (1)</h2>") < page.index("<h2>Telemetry gaps (2)</h2>")
    for node in ("a", "b"):  # the same nodes scored as two ranks would, then indexed
        score_nodes(cfg, TelemetryStore(tmp_path / "store.h5"), models, tmp_path / f"errors-{node}.h5", nodes=[node])
    write_index(tmp_path / "index.h5", [tmp_path / "errors-a.h5", tmp_path / "errors-b.h5"], {"hpcad_format": FORMAT},
                METRICS)
    index = ErrorStore(tmp_path / "index.h5")
    assert index.lost == errors.lost and index.missing == errors.missing


def test_what_the_readers_warned_of_while_ingesting_is_listed(tmp_path):
    """A row cut short, repeated rows dropped, rows without a node...: the readers' warnings were in
    the ingest's log only. The store keeps the first ``notes.KEPT`` and the count (the readers' own
    warnings: not other modules', nor the skipped files' errors, listed apart), and the report lists
    them, escaped; none, no section."""
    import logging

    from hpcad.data.notes import KEPT, input_warnings
    from hpcad.data.store import TelemetryStore, write_store

    cfg, errors, models = _run(tmp_path, [])
    assert "Input warnings" not in write_report(cfg, tmp_path, errors, models).read_text()
    store = TelemetryStore(tmp_path / "store.h5")
    nodes = [store.read(n) for n in store.nodes]
    with input_warnings() as said:
        for i in range(KEPT + 3):
            logging.getLogger("hpcad.data.tables").warning("exports/<cn%02d>.csv: the last line has 3 of 9 fields", i)
        logging.getLogger("hpcad.score").warning("not the readers'")
        logging.getLogger("hpcad.data.rows").error("skipping a file: listed on its own")
        write_store(tmp_path / "store.h5", store.metrics, nodes, "test", warnings=said)
    assert TelemetryStore(tmp_path / "store.h5").warnings[0] == KEPT + 3
    page = write_report(cfg, tmp_path, errors, models).read_text()
    assert f"<h2>Input warnings ({KEPT + 3})</h2>" in page and f"The first {KEPT} of {KEPT + 3}" in page
    assert "exports/&lt;cn00&gt;.csv: the last line has 3 of 9 fields" in page
    assert f"<details><summary>{KEPT - INPUT_WARNINGS_SHOWN} more</summary>" in page  # folded: the alarms come next
    assert f"&lt;cn{KEPT:02d}&gt;" not in page and "not the readers'" not in page and "on its own" not in page


def test_detection_quality_opens_with_one_row_per_detector_and_the_best_in_bold():
    """The report's first detection table compares the detectors side by side (before: two tables of
    18 rows each, one per detector and split, to read across). Costs: lower is better; a split the
    run did not score (a night: no validation rows) leaves its columns out."""
    from hpcad.report.page import comparison_table

    def split(ap, cost, f1, rows=100):
        return {"rows": rows, "ranking": {"ap": ap, "roc_auc": ap + 0.1, "best_f1": ap, "nodes": 3}, "cost": cost,
                "f1": f1}

    metrics = {"splits": {"val": split(0.8, 600.0, 0.7), "test": split(0.7, 1400.0, 0.6)},
               "baselines": {"pca": {"splits": {"val": split(0.75, 500.0, 0.8), "test": split(0.72, 1200.0, 0.5)}}}}
    table = comparison_table(metrics)
    rows = re.findall(r"<tr><td>(\w+)</td>(.*?)</tr>", table)
    assert [r[0] for r in rows] == ["autoencoder", "pca"]
    bold = {name: re.findall(r"<b>(.*?)</b>", cells) for name, cells in rows}
    assert bold == {"autoencoder": ["0.8", "0.6"], "pca": ["0.72", "0.82", "0.72", "500", "1,200"]}
    night = {"splits": {"val": {"rows": 0}, "test": split(0.7, 1400.0, 0.6)}}
    assert "AP val" not in comparison_table(night) and "cost test" in comparison_table(night)


def test_a_font_cache_written_by_another_matplotlib_does_not_flood_the_report_log(tmp_path):
    """A shared $HOME holds one matplotlib font cache for every install that uses it (a system
    matplotlib without the STIX fonts, another venv). Read by hpcad, a cache without them made every
    report log say "findfont: Font family ['STIXGeneral'] not found" about twenty times (the log
    colour bar's labels): noise in each job log, with nothing for the operator to do. The report is
    still drawn, in DejaVu Sans."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    cache = tmp_path / "mpl"
    env = dict(os.environ, MPLCONFIGDIR=str(cache))
    subprocess.run([sys.executable, "-c", "import matplotlib.font_manager"], env=env, check=True)
    (fontlist,) = cache.glob("fontlist-*.json")
    fonts = json.loads(fontlist.read_text())
    fonts["ttflist"] = [f for f in fonts["ttflist"] if f["name"].startswith("DejaVu")]  # no STIX, no cm
    fontlist.write_text(json.dumps(fonts))
    script = ("import logging, sys; from pathlib import Path; sys.path.insert(0, sys.argv[2]); "
              "logging.basicConfig(level=logging.INFO); "  # every logger's warnings reach stderr, as in a job log
              "from test_report import _run, ALARM_B; from hpcad.report.page import write_report; "
              "cfg, errors, models = _run(Path(sys.argv[1]), [ALARM_B]); "
              "print(write_report(cfg, Path(sys.argv[1]), errors, models))")
    run = tmp_path / "run"
    run.mkdir()
    proc = subprocess.run([sys.executable, "-c", script, str(run), str(Path(__file__).parent)], env=env,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "findfont" not in proc.stderr, proc.stderr[-2000:]
    assert "data:image/png;base64," in (run / "report.html").read_text()  # the plots are there


def test_report_times_are_shown_on_the_sites_clock_across_summer_time():
    """A report's plots and alarm tables show times in report.timezone (the nightly's site zone):
    the offset follows the date (CET in winter, CEST in summer); alarms.csv's UTC stays as it is."""
    import numpy as np

    from hpcad.report.markup import in_zone
    from hpcad.report.plots import local_times

    t = np.array([1736467200, 1752105600])  # 2025-01-10 and 2025-07-10, 00:00 UTC
    assert [str(x) for x in local_times(t, "Europe/Rome")] == ["2025-01-10T01:00:00", "2025-07-10T02:00:00"]
    assert [str(x) for x in local_times(t, "UTC")] == ["2025-01-10T00:00:00", "2025-07-10T00:00:00"]
    assert in_zone("2025-07-10T00:00:00+00:00", "Europe/Rome") == "2025-07-10T02:00:00+02:00"
    assert in_zone("2025-01-10T00:00:00+00:00", "UTC") == "2025-01-10T00:00:00+00:00"
    assert in_zone("1432", "Europe/Rome") == "1432"  # row numbers (input without timestamps) as they are


def test_plots_draw_no_line_or_shading_across_hours_without_data_and_name_only_what_they_show(monkeypatch):
    """A node that sent nothing for six hours (down, or idle rows left out, as in the real DAVIDE
    node's file, which has weeks of them): before, its signal and metrics were drawn as a straight
    line across those hours, an alarm on either side was shaded over them as if the node had been
    measured there, and a node page's "day either side" of its strongest alarm was 288 rows, which
    across such gaps spanned over a week."""
    from types import SimpleNamespace

    import matplotlib.dates as mdates

    import hpcad.report.plots as plots

    figs = []
    monkeypatch.setattr(plots, "_png", lambda fig, *a, **k: figs.append(fig) or "")
    t0 = 1_700_000_000
    ts = np.r_[np.arange(0, 3 * 3600, 300), np.arange(9 * 3600, 12 * 3600, 300)] + t0  # 36 rows, 6 h, 36 rows
    sig = np.ones(len(ts))
    sig[30:42] = 5.0  # alarmed from 2:30 to 9:25, across the gap
    s = SimpleNamespace(node="n", timestamp=ts, signal=sig, labels=(sig > 2).astype(np.int8),
                        split=np.zeros(len(ts), np.int8))
    th = Thresholds("cost", "node", None, {"n": 2.0}, {})
    plots.signal_plot(s, th)
    ax = figs[-1].axes[0]
    y = ax.lines[0].get_ydata()
    assert len(y) == len(ts) + 1 and np.flatnonzero(np.isnan(y)).tolist() == [36]  # one break, at the gap
    gap = mdates.date2num(np.datetime64(t0 + 6 * 3600, "s"))  # 06:00, in the middle of the hours without data
    spans = [p.get_path().get_extents(p.get_patch_transform()) for p in ax.patches]
    assert len(spans) == 4 and not [b for b in spans if b.x0 < gap < b.x1]  # alarmed and labelled, each side
    assert ax.get_title().endswith("(orange = labelled anomaly; red = alarmed; no line = no data)")
    # a night's rows are all one split, without labels: the title names neither (it said "dashed = test
    # start", and a dashed line stood at the night's first row)
    plots.signal_plot(SimpleNamespace(**{**vars(s), "labels": np.zeros(len(ts), np.int8),
                                         "split": np.full(len(ts), 2, np.int8)}), th)
    assert [ln.get_linestyle() for ln in figs[-1].axes[0].lines] == ["-", "-"]  # the signal and the threshold
    assert figs[-1].axes[0].get_title().endswith("(red = alarmed; no line = no data)")
    plots.signal_plot(SimpleNamespace(**{**vars(s), "split": (np.arange(len(ts)) >= 50).astype(np.int8) * 2}), th)
    assert [ln.get_linestyle() for ln in figs[-1].axes[0].lines] == ["-", "-", "--"]
    assert "dashed = test start" in figs[-1].axes[0].get_title()
    plots.signal_plot(SimpleNamespace(**{**vars(s), "timestamp": np.arange(len(ts)) * 300 + t0}), th)
    assert not np.isnan(figs[-1].axes[0].lines[0].get_ydata()).any() and "no data" not in figs[-1].axes[0].get_title()
    # the rows of the node page's plots: a day of time either side of the strongest alarm
    long = np.r_[np.arange(0, 86400, 300), np.arange(5 * 86400, 6 * 86400, 300)] + t0  # 288 rows, 4 days, 288
    peak = np.ones(len(long))
    peak[300] = 9.0  # an hour into the fifth day
    from hpcad.signals import Recipe

    errs = SimpleNamespace(errors=lambda node, rows: np.zeros((rows.stop - rows.start, 2)),
                           explain_scale=lambda node: None, recipe=Recipe(1.0))
    win = plots.AlarmWindow(errs, SimpleNamespace(node="n", timestamp=long, signal=peak), th, "s")
    assert (win.a, win.b) == (288, 576)  # that day's rows, none of the day four days before
    errs.metrics = ["power", "ips"]
    near = plots.AlarmWindow(errs, s, th, "s")  # the six-hour gap's node: every row is within a day
    scaler = SimpleNamespace(training_range=lambda: (np.zeros(2), np.ones(2)))
    plots.values_plot(errs, s, th, np.ones((len(ts), 2)), scaler, "s", near)
    assert [np.flatnonzero(np.isnan(a.lines[0].get_ydata())).tolist() for a in figs[-1].axes] == [[36], [36]]
    plots.heatmap(errs, s, th, "s", near)
    assert [round(ln.get_xdata()[0], 1) for ln in figs[-1].axes[0].lines[2:]] == [35.5]  # between rows 35 and 36
    assert len(figs[-1].axes[0].lines[0].get_xdata()) == 12  # the labelled rows' ticks
    assert figs[-1].axes[0].get_title().endswith("(orange ticks = labelled anomaly, red = alarmed rows, cyan line = "
                                                 "no data between)")
    plots.heatmap(errs, SimpleNamespace(**{**vars(s), "labels": None}), th, "s", near)
    assert figs[-1].axes[0].get_title().endswith("(red = alarmed rows, cyan line = no data between)")
    rows = plots.AlarmWindow(errs, SimpleNamespace(node="n", timestamp=np.arange(576), signal=peak), th, "row")
    assert (rows.a, rows.b) == (100, 500)  # no timestamps: 200 rows either side


def test_the_report_says_what_kept_rows_out_of_training():
    """A run trained with ``split.exclude`` or ``train.trim`` says so in the report's first paragraph
    (an operator comparing two runs' alarms sees why their models differ); a default run says nothing."""
    from hydra import compose, initialize_config_dir

    from hpcad.config import register_configs
    from hpcad.report.page import _training_said
    from hpcad.resources import resource_dir

    register_configs()
    with initialize_config_dir(str(resource_dir("conf")), version_base="1.3"):
        plain = compose("config", [])
        both = compose("config", ["split.exclude=/srv/nightly/*/alarms.csv", "train.trim=0.3"])
    assert _training_said(plain) == ""
    assert _training_said(both) == ("; training left out the stretches listed in <code>/srv/nightly/*/alarms.csv</code> "
                                    "(split.exclude); trimmed loss: each training step left out its 30% "
                                    "worst-reconstructed rows (train.trim)")


def test_a_node_page_shows_what_the_model_expected_only_where_that_model_scored_the_node(tmp_path):
    """At the strongest alarm's peak the page quotes each top metric's observed and expected value
    (the model's reconstruction, in the metric's units) beside its training range. Where the model
    file is no longer the one that scored the node (retrained since), or the node was scored with a
    light map the report cannot find, it quotes no expectation rather than another model's."""
    import h5py

    from hpcad.model.autoencoder import glorot_init
    from hpcad.model.files import NodeModel, model_path

    cfg, errors, models = _run(tmp_path, [ALARM_B])
    write_report(cfg, tmp_path, errors, models)
    page = (tmp_path / "nodes" / "b.html").read_text()
    table = page.split("The strongest alarm's loudest row (")[1]
    # the smoothed signal peaks at row 160, after the fault; the quoted row is one of the fault's
    assert table.startswith("1970-01-01 12:")  # rows 150-159: 12:30-13:15
    row = int(table[11:13]) * 12 + int(table[14:16]) // 5
    assert 150 <= row < 160 and int(np.argmax(next(errors.signals(["b"])).signal)) == 160
    rows = [re.findall(r"<td>(.*?)</td>", r) for r in table.split("</table>")[0].split("<tr>")[2:]]
    assert rows[0][0] == "power"  # node b's rows 150-159: power far outside what training saw (+8)
    b = NodeModel.load(model_path(models, "b"))
    lo, hi = b.scaler.training_range()
    observed = TelemetryStore(tmp_path / "store.h5").read("b").values
    assert float(rows[0][1]) == pytest.approx(float(observed[row, 0]), rel=1e-2)  # 3 significant digits
    assert float(rows[0][1]) > hi[0] and rows[0][3] == f"{lo[0]:.4g} .. {hi[0]:.4g}"
    assert float(rows[0][2]) != pytest.approx(float(rows[0][1]), rel=0.1)  # the model did not expect it
    # alarms.csv names the alarm's loudest row (as the nightly alarms.json quotes it): the page quotes that row
    cols = ["node", "start", "end", "rows", "split", "peak_score", "top_metrics", "loudest_time"]
    with open(tmp_path / "alarms.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=cols)
        w.writeheader()
        w.writerows([{**ALARM_B, "loudest_time": "1970-01-01T12:40:00+00:00"},  # row 152 of the strongest
                     {**ALARM_B, "start": 51000, "peak_score": 1.5, "loudest_time": "1970-01-01T14:10:00+00:00"}])
    write_report(cfg, tmp_path, errors, models)
    assert "The strongest alarm's loudest row (1970-01-01 12:40:00 UTC)" in (tmp_path / "nodes" / "b.html").read_text()
    # node b's model retrained since it was scored: no expectation quoted
    NodeModel(b.node, b.spec, b.metrics, [glorot_init(b.spec, 3, 99)], b.scaler, {}, 1.0).save(model_path(models, "b"))
    write_report(cfg, tmp_path, errors, models)
    assert "loudest row" not in (tmp_path / "nodes" / "b.html").read_text()
    # scored again with this model, but recorded as scored with a light map the report does not find
    score_nodes(cfg, TelemetryStore(tmp_path / "store.h5"), models, tmp_path / "errors.h5")
    write_report(cfg, tmp_path, ErrorStore(tmp_path / "errors.h5"), models)
    assert "loudest row" in (tmp_path / "nodes" / "b.html").read_text()
    with h5py.File(tmp_path / "errors.h5", "r+") as f:
        f["nodes/b"].attrs["light_version"] = 2
    write_report(cfg, tmp_path, ErrorStore(tmp_path / "errors.h5"), models)
    assert "loudest row" not in (tmp_path / "nodes" / "b.html").read_text()


def test_a_node_page_plots_and_quotes_each_metric_under_its_own_name_when_the_store_orders_them_otherwise(tmp_path):
    """Tonight's exports may list the metrics in another order than the training run's (a new
    collector version; the store keeps the first file's order): scoring aligns them by name, and so
    must the node page, or it plots and quotes one metric's values under another's name."""
    from hpcad.data.node import NodeData
    from hpcad.data.store import write_store

    cfg, errors, models = _run(tmp_path, [ALARM_B])
    store = TelemetryStore(tmp_path / "store.h5")
    names = list(store.metrics)
    order = [2, 0, 1]  # ips, power, temp: every metric elsewhere
    nodes = [store.read(n) for n in store.nodes]
    write_store(tmp_path / "store.h5", [names[j] for j in order],
                [NodeData(nd.name, nd.timestamp, nd.values[:, order], nd.labels) for nd in nodes], "test")
    score_nodes(cfg, TelemetryStore(tmp_path / "store.h5"), models, tmp_path / "errors.h5")
    write_report(cfg, tmp_path, ErrorStore(tmp_path / "errors.h5"), models)
    table = (tmp_path / "nodes" / "b.html").read_text().split("The strongest alarm's loudest row (")[1]
    row = int(table[11:13]) * 12 + int(table[14:16]) // 5
    quoted = {r[0]: float(r[1]) for r in (re.findall(r"<td>(.*?)</td>", x)
                                         for x in table.split("</table>")[0].split("<tr>")[2:])}
    b = nodes[1].values[row]
    assert quoted == {m: pytest.approx(float(b[names.index(m)]), rel=1e-2, abs=1e-3) for m in names}


def test_node_pages_drawn_by_forked_workers_finish_after_the_parent_computed_with_torch(tmp_path):
    """`hpcad run` trains and scores with torch, then forks the workers that draw the node pages; a
    page that computed its expected values with torch there waited forever on the parent's OpenMP
    threads (2026-12-05, caught in a sweep before it shipped). Run as a separate process, killed with
    everything it forked if it has not finished after ten minutes (it takes seconds)."""
    import os
    import signal
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent(f"""
        from pathlib import Path
        import numpy as np
        import torch
        from omegaconf import OmegaConf
        from hpcad.config import HpcadConfig
        from hpcad.data.node import NodeData
        from hpcad.data.store import TelemetryStore, write_store
        from hpcad.errorstore import ErrorStore
        from hpcad.model.autoencoder import AutoencoderSpec, glorot_init
        from hpcad.model.files import NodeModel, model_path
        from hpcad.preprocess import Scaler
        from hpcad.report.nodes import node_pages
        from hpcad.score import score_nodes
        from hpcad.threshold.rules import Thresholds
        torch.set_num_threads(2)
        p, M = Path({str(tmp_path)!r}), 160  # a real node's size: the pages' matmuls are large enough to thread
        metrics, rng = [f"m{{j}}" for j in range(M)], np.random.default_rng(0)
        nodes = [NodeData(n, np.arange(600, dtype=np.int64) * 300, rng.normal(size=(600, M)).astype(np.float32), None)
                 for n in "ab"]
        for nd in nodes:
            nd.values[400:420, :8] += 8.0
        write_store(p / "store.h5", metrics, nodes, "test")
        cfg = OmegaConf.structured(HpcadConfig)
        cfg.compute.device, cfg.compute.progress = "cpu", False
        spec = AutoencoderSpec(hidden=[64])
        for i, nd in enumerate(nodes):
            NodeModel(nd.name, spec, metrics, [glorot_init(spec, M, i)], Scaler.fit(nd.values[:300], cfg.preprocess),
                      {{}}, 1.0).save(model_path(p / "models", nd.name))
        score_nodes(cfg, TelemetryStore(p / "store.h5"), p / "models", p / "errors.h5")  # torch in this process
        print(float((np.ones((512, 512)) @ np.ones((512, 512))).sum()))  # and NumPy's BLAS threads
        errors = ErrorStore(p / "errors.h5")
        th = Thresholds("cost", "node", None, {{n: float(np.median(s.signal)) for n, s in
                                                zip("ab", errors.signals())}}, {{}})
        alarms = [{{"node": n, "start": 120000, "end": 126000, "rows": 20, "peak_score": 9.0}} for n in "ab"]
        node_pages(p, errors, th, ["a", "b"], alarms, "s", "t", TelemetryStore(p / "store.h5"), p / "models",
                   workers=2)
        print("pages", sorted(x.name for x in (p / "nodes").iterdir()))
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=600)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail("the node pages' forked workers never finished")
    assert proc.returncode == 0, err[-2000:]
    assert "pages ['a.html', 'b.html']" in out
    assert all("loudest row" in (tmp_path / "nodes" / f"{n}.html").read_text() for n in "ab")
