"""`hpcad bench` runs as users run it and reports what docs/benchmarks.md records (no timing asserts)."""
import json

from conftest import hpcad


def test_bench_train_reports_speedup_throughput_and_memory(tmp_path):
    out = hpcad("bench", "bench.nodes=3", "bench.rows=300", "bench.metrics=40", "bench.epochs=1",
                "bench.pool=2", "train.progress=false", f"hydra.run.dir={tmp_path}").stdout
    assert "speedup_vs_naive=" in out
    b = json.loads((tmp_path / "bench.json").read_text())
    for key in ("speedup_vs_naive", "node_epochs_per_s", "samples_per_s", "peak_rss_mb", "naive_s", "batched_s"):
        assert b[key] > 0, key
    assert b["nodes"] == 3 and b["metrics"] == 40 and b["naive_nodes"] == 3 and b["device"] == "cpu"


def test_bench_score_times_the_real_score_stage(tmp_path):
    hpcad("bench", "bench.mode=score", "bench.nodes=4", "bench.rows=288", "bench.metrics=160",
          "train.progress=false", f"hydra.run.dir={tmp_path}")
    b = json.loads((tmp_path / "bench.json").read_text())
    assert b["mode"] == "score" and b["nodes_per_s"] > 0 and (tmp_path / "bench_errors.h5").exists()
    bad = hpcad("bench", "bench.mode=fast", f"hydra.run.dir={tmp_path / 'x'}", check=False)
    assert bad.returncode == 2 and "bench.mode" in bad.stderr
