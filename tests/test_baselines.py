"""Baselines: a node's fit does not depend on the nodes fitted beside it (so ranks can share them)."""
import numpy as np
from hydra import compose, initialize_config_dir

from hpcad.baselines import baseline_signals
from hpcad.config import register_configs
from hpcad.data.store import TelemetryStore
from hpcad.pipeline import stage_ingest
from hpcad.resources import resource_dir


def test_a_nodes_subsampled_fit_is_the_same_alone_and_among_the_others(tmp_path):
    """With more training rows than ``baselines.max_train_rows`` each fit draws a subsample. Drawn from
    one stream over the nodes in order (before), a node's draw depended on the nodes before it, so a
    rank fitting its share got other baseline figures than one process fitting all; now each node draws
    from its own seed."""
    register_configs()
    with initialize_config_dir(str(resource_dir("conf")), version_base="1.3"):
        cfg = compose("config", ["data.synthetic.nodes=3", "data.synthetic.rows=400", "compute.progress=false",
                                 "baselines.max_train_rows=50", "baselines.methods=[kde,pca,knn]"])
    store: TelemetryStore = stage_ingest(cfg, tmp_path)
    last = store.nodes[-1]
    alone = {}
    for method in ("kde", "pca", "knn"):
        together = {s.node: s.signal for s in baseline_signals(method, cfg, store, store)}
        alone[method] = next(baseline_signals(method, cfg, store, store, nodes=[last])).signal
        np.testing.assert_array_equal(alone[method], together[last], err_msg=method)
    cfg.baselines.seed = 1  # the subsample follows the seed: another seed, another fit
    assert not np.array_equal(next(baseline_signals("kde", cfg, store, store, nodes=[last])).signal, alone["kde"])


def test_a_rerun_keeps_baselines_fitted_from_the_same_data_and_settings(tmp_path):
    """Baselines cost about 46 s per node-year: a rerun of `hpcad run` (after a failed threshold step, a
    requeue) fitted them all again. Now a method's file written for the same data and settings is
    kept; one whose options changed is fitted again."""
    from conftest import hpcad

    args = ["data.synthetic.nodes=2", "data.synthetic.rows=300", "compute.progress=false",
            "baselines.methods=[kde,pca]", f"hydra.run.dir={tmp_path}"]
    hpcad("baselines", *args)
    files = {m: tmp_path / "baselines" / f"{m}.h5" for m in ("kde", "pca")}
    first = {m: p.stat().st_mtime_ns for m, p in files.items()}
    again = hpcad("baselines", *args)
    said = again.stdout + again.stderr
    assert "baseline kde: kde.h5 is up to date" in said and "baseline pca: pca.h5 is up to date" in said
    assert {m: p.stat().st_mtime_ns for m, p in files.items()} == first
    changed = hpcad("baselines", *args, "baselines.pca_variance=0.8")
    said = changed.stdout + changed.stderr
    assert "baseline kde: kde.h5 is up to date" in said and f"baseline pca -> {files['pca']}" in said
    assert files["pca"].stat().st_mtime_ns != first["pca"] and files["kde"].stat().st_mtime_ns == first["kde"]
