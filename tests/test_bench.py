"""`hpcad bench` runs as users run it and reports what docs/benchmarks.md records (no timing asserts)."""
import csv
import json
import re

import pytest

from conftest import hpcad


def test_bench_train_reports_speedup_throughput_and_memory(tmp_path):
    out = hpcad("bench", "bench.nodes=3", "bench.rows=300", "bench.metrics=40", "bench.epochs=2",
                "bench.pool=2", "compute.max_nodes_per_chunk=2", "compute.progress=false", "bench.rows_spread=0.5",
                f"hydra.run.dir={tmp_path}").stdout
    assert "speedup_vs_naive=" in out
    b = json.loads((tmp_path / "bench.json").read_text())
    for key in ("speedup_vs_naive", "node_epochs_per_s", "samples_per_s", "peak_rss_mb", "naive_s", "batched_s",
                "whitening_s"):  # the whitening's pass after each chunk, timed apart from the epochs
        assert b[key] > 0, key
    from hpcad.device import resolve_device

    assert b["nodes"] == 3 and b["metrics"] == 40 and b["naive_nodes"] == 3
    from hpcad.bench.train import node_lengths

    assert node_lengths(3, 300, 0.5).tolist() == [300, 208, 265]  # nodes of different lengths, every run alike
    assert b["rows_mean"] == pytest.approx(773 / 3) and b["rows_spread"] == 0.5
    assert b["device"] == str(resolve_device("auto"))  # the CPU here, a GPU where there is one
    assert b["nodes_per_chunk"] == 2 and len(b["speedup_by_chunk"]) == 2  # naive nodes timed beside each chunk
    # both sides do the same work from the same initial weights: their models end up as good
    assert abs(b["batched_final_val_loss_mean"] / b["naive_final_val_loss_mean"] - 1) < 0.1


def test_bench_score_times_the_real_score_stage(tmp_path):
    hpcad("bench", "bench.mode=score", "bench.nodes=4", "bench.rows=288", "bench.metrics=160",
          "compute.progress=false", f"hydra.run.dir={tmp_path}")
    b = json.loads((tmp_path / "bench.json").read_text())
    assert b["mode"] == "score" and b["nodes_per_s"] > 0 and (tmp_path / "bench_errors.h5").exists()
    assert not b["labelled"] and b["signal_choice"]["nodes"] == 0  # no labels: no choice pass
    # labelled (a week, so validation rows hold anomalies): the time includes auto's choice pass
    hpcad("bench", "bench.mode=score", "bench.nodes=4", "bench.rows=2016", "bench.metrics=160", "bench.labelled=true",
          "compute.progress=false", f"hydra.run.dir={tmp_path}")
    b = json.loads((tmp_path / "bench.json").read_text())
    from hpcad.config import SignalConfig

    assert b["labelled"] and b["signal_choice"]["nodes"] >= 1
    assert b["signal_choice"]["candidates"] == 2 * len(SignalConfig().excess_grid)  # each weight, whitened and not
    bad = hpcad("bench", "bench.mode=fast", f"hydra.run.dir={tmp_path / 'x'}", check=False)
    assert bad.returncode != 0 and "bench.mode" in bad.stderr  # refused when the config is composed
    assert "expected one of [train, score, ingest, drift, report, baselines, explain, nightly, threshold]" in bad.stderr


def test_bench_threshold_times_fitting_and_applying_the_thresholds(tmp_path):
    """The threshold stage had no bench mode: its figures in docs/benchmarks.md were timed by hand."""
    p = hpcad("bench", "bench.mode=threshold", "bench.nodes=3", "bench.rows=600", "bench.metrics=160",
              "compute.progress=false", f"hydra.run.dir={tmp_path}")
    b = json.loads((tmp_path / "bench.json").read_text())
    assert b["mode"] == "threshold" and b["nodes"] == 3 and b["rule"] == "CostRule" and b["scope"] == "node"
    assert b["fit_s"] > 0 and b["threshold_s"] > 0 and b["peak_rss_mb"] > 0 and b["errors_mb"] > 0
    assert "threshold_s=" in p.stdout
    # what the stage wrote, as `hpcad threshold` writes it: labelled errors give figures for every node
    metrics = json.loads((tmp_path / "bench_run" / "metrics.json").read_text())
    assert len(metrics["nodes"]) == 3 and (tmp_path / "bench_run" / "alarms.csv").exists()


def test_bench_ingest_measures_the_out_of_core_pivot(tmp_path):
    hpcad("bench", "bench.mode=ingest", "bench.nodes=6", "bench.days=2", "bench.metrics=12",
          "data.scratch_buckets=4", "compute.progress=false", f"hydra.run.dir={tmp_path}")
    b = json.loads((tmp_path / "bench.json").read_text())
    assert b["rows"] == 6 * 2 * 288 * 12 and b["peak_rss_mb"] > 0 and b["scratch_buckets"] == 4
    assert not (tmp_path / "bench_store.h5").exists() and not list(tmp_path.glob(".ingest-*"))
    one = b["store_mb"]
    # the same input over two local ranks (torchrun's variables): the same store, written in parts
    hpcad("bench", "bench.mode=ingest", "bench.nodes=6", "bench.days=2", "bench.metrics=12", "bench.ranks=2",
          "data.scratch_buckets=4", "compute.progress=false", f"hydra.run.dir={tmp_path}")
    b = json.loads((tmp_path / "bench.json").read_text())
    assert b["ranks"] == 2 and b["ingest_s"] > 0 and b["store_mb"] == pytest.approx(one, abs=0.1)
    log = (tmp_path / "bench_ingest_ranks" / "logs" / "ingest-rank1.log").read_text()
    assert "rank 1: ingested 3 node(s) of its 2 scratch bucket(s)" in log, log
    assert not list((tmp_path / "bench_ingest_ranks").glob("store*.h5")) and not list(tmp_path.rglob(".ingest-*"))
    # daily exports of every node (a node column): staged and converted by both ranks
    hpcad("bench", "bench.mode=ingest", "bench.input=days", "bench.nodes=6", "bench.days=3", "bench.metrics=12",
          "bench.ranks=2", "compute.progress=false", f"hydra.run.dir={tmp_path}")
    b = json.loads((tmp_path / "bench.json").read_text())
    assert b["input"] == "days" and b["rows"] == 6 * 3 * 288 * 12 and b["store_mb"] > 0
    log = (tmp_path / "bench_ingest_ranks" / "logs" / "ingest-rank0.log").read_text()
    assert "staging 3 files of many nodes' rows over 2 ranks" in log and "rank 0: ingested 3 node(s)" in log, log
    assert not list(tmp_path.rglob(".ingest-*"))
    # a CSV file per node, the most common export (each file's end and header checks included)
    hpcad("bench", "bench.mode=ingest", "bench.input=nodes", "bench.nodes=5", "bench.days=2", "bench.metrics=12",
          "compute.progress=false", f"hydra.run.dir={tmp_path}")
    b = json.loads((tmp_path / "bench.json").read_text())
    assert b["input"] == "nodes" and b["rows"] == 5 * 2 * 288 * 12 and b["input_mb"] > b["store_mb"] > 0
    assert len(list((tmp_path / "bench_nodes_5x2dx12_seed0").glob("node*.csv"))) == 5


def test_bench_drift_light_retraining_beats_doing_nothing(tmp_path):
    hpcad("bench", "bench.mode=drift", "bench.nodes=2", "train.epochs=5", "compute.progress=false",
          f"hydra.run.dir={tmp_path}")
    s = json.loads((tmp_path / "bench.json").read_text())["strategies"]
    assert set(s) == {"none", "light_1d", "light_3d", "light_7d", "full_7d"}
    # the shifted levels make the frozen model alarm on normal rows; a week of light maps fixes most of it
    assert s["light_7d"]["false_alarms"] < 0.5 * s["none"]["false_alarms"]
    assert s["light_7d"]["roc_auc"] > s["none"]["roc_auc"]


def test_bench_report_mode_renders_a_night_with_node_pages(tmp_path):
    hpcad("bench", "bench.mode=report", "bench.nodes=30", "bench.rows=100", "bench.metrics=40", "bench.alarms=3",
          "compute.progress=false", f"hydra.run.dir={tmp_path}")
    b = json.loads((tmp_path / "bench.json").read_text())
    assert b["mode"] == "report" and b["alarmed_nodes"] == 3 and b["node_pages"] == 3 and b["alarms"] >= 3
    assert (tmp_path / "report.html").exists() and len(list((tmp_path / "nodes").glob("*.html"))) == 3
    assert all(p.read_text().count("<img ") == 3 for p in (tmp_path / "nodes").glob("*.html"))
    assert b["report_mb"] > 0 and b["report_s"] > 0


def test_bench_baselines_times_each_method_in_its_own_process(tmp_path):
    """The baselines' per-node cost (time and the memory one rank needs) for each method, each in its own
    process, as docs/cluster.md sizes a comparison run at scale from it."""
    hpcad("bench", "bench.mode=baselines", "bench.nodes=2", "bench.rows=600", "bench.metrics=12",
          "baselines.methods=[kde,knn]", "baselines.max_train_rows=100", "compute.progress=false",
          f"hydra.run.dir={tmp_path}")
    b = json.loads((tmp_path / "bench.json").read_text())
    assert b["mode"] == "baselines" and list(b["methods"]) == ["kde", "knn"] and b["nodes"] == 2
    assert all(m["s"] > 0 and m["peak_rss_mb"] > 0 for m in b["methods"].values())
    assert b["peak_rss_mb"] == max(m["peak_rss_mb"] for m in b["methods"].values())
    bad = hpcad("bench", "bench.mode=baselines", "baselines.methods=[]", f"hydra.run.dir={tmp_path / 'x'}", check=False)
    assert bad.returncode == 2 and "bench.mode=baselines: baselines.methods is empty" in bad.stderr


def test_bench_nightly_scores_a_night_as_cron_does_and_says_where_its_time_went(tmp_path):
    """The nightly job's own time at a site's scale, by phase (the log line every night also carries)."""
    p = hpcad("bench", "bench.mode=nightly", "bench.nodes=3", "bench.days=2", "bench.alarms=1", "train.epochs=1",
              "compute.progress=false", f"hydra.run.dir={tmp_path}")
    b = json.loads((tmp_path / "bench.json").read_text())
    assert b["mode"] == "nightly" and b["nodes"] == 3 and b["night"] == "2025-01-08"
    assert list(b["seconds_by_phase"]) == ["ingest", "scoring", "alarms", "drift and light", "report"]
    assert b["night_s"] >= sum(b["seconds_by_phase"].values()) - 0.05 and b["peak_rss_mb"] > 0
    night = tmp_path / "nightly" / "2025-01-08"
    assert len([r for r in csv.DictReader(open(night / "levels.csv"))]) == 3 and (night / "report.html").exists()
    assert re.search(r"nightly 2025-01-08: 3 nodes, .* s: ingest \d+ s, scoring \d+ s, alarms", p.stdout + p.stderr)
