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
    for method in ("kde", "pca", "knn"):  # with the range-excess term too (each node's own units)
        together = {s.node: s.signal for s in baseline_signals(method, cfg, store, store, weight=10.0)}
        alone[method] = next(baseline_signals(method, cfg, store, store, nodes=[last], weight=10.0)).signal
        np.testing.assert_array_equal(alone[method], together[last], err_msg=method)
    cfg.baselines.seed = 1  # the subsample follows the seed: another seed, another fit
    assert not np.array_equal(next(baseline_signals("kde", cfg, store, store, nodes=[last])).signal, alone["kde"])


def test_a_rerun_keeps_baselines_fitted_from_the_same_data_and_settings(tmp_path):
    """Baselines cost about 46 s per node-year: a rerun of `hpcad run` (after a failed threshold step, a
    requeue) fitted them all again. Now a method's file written for the same data and settings is
    kept; one whose options changed is fitted again."""
    import json

    from conftest import FEW_PLOTS, hpcad

    args = ["data.synthetic.nodes=2", "data.synthetic.rows=300", "compute.progress=false", *FEW_PLOTS,
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
    # new data scored without fitting the baselines again: their files (of the old data) are left out of
    # metrics.json with a warning (they were evaluated beside the new scores as if they were this data's)
    for stage in ("train", "score", "threshold"):
        p = hpcad(stage, *args[:-2], "train.epochs=2", "data.synthetic.seed=3", f"hydra.run.dir={tmp_path}")
    said = p.stdout + p.stderr
    assert "pca.h5 was fitted on other data than errors.h5 was scored from" in said
    assert not json.loads((tmp_path / "metrics.json").read_text()).get("baselines")
    # a method dropped from baselines.methods: its file goes, so `hpcad threshold` does not report an earlier
    # run's figures as this run's (they stayed, and metrics.json listed them, whatever data they came from)
    hpcad("run", *args[:-2], "train.epochs=2", "baselines.methods=[kde]", f"hydra.run.dir={tmp_path}")
    assert not files["pca"].exists() and files["kde"].stat().st_mtime_ns == first["kde"]
    assert set(json.loads((tmp_path / "metrics.json").read_text())["baselines"]) == {"kde"}
    hpcad("run", *args[:-2], "train.epochs=2", "baselines.methods=[]", f"hydra.run.dir={tmp_path}")
    assert not files["kde"].exists() and not json.loads((tmp_path / "metrics.json").read_text()).get("baselines")


def test_range_is_the_autoencoders_excess_term_alone_and_the_baselines_add_it_at_the_autoencoders_weight(tmp_path):
    """On MSL and DAVIDE the range-excess term (the squared distance of a value outside its training
    range) made most of the autoencoder's lead over the baselines, which went without it. Now `range`
    is that term alone (no model), and PCA, the 1-NN and KDE (in its units) add it at the weight the
    autoencoder's errors.h5 was scored with (baselines.range_excess)."""
    import json

    import h5py

    from conftest import FEW_PLOTS, hpcad
    from hpcad.errorstore import ErrorStore
    from hpcad.preprocess import Scaler, fill_gaps, split_codes, training_rows
    from hpcad.signals import signal_level, smooth_signal

    run = tmp_path / "run"
    args = ["data.synthetic.nodes=2", "data.synthetic.rows=300", "train.epochs=2", "compute.progress=false",
            *FEW_PLOTS, "signal.excess_weight=10", f"hydra.run.dir={run}"]
    hpcad("run", *args, "baselines.methods=[pca,range]")
    assert ErrorStore(run / "errors.h5").recipe.weight == 10
    m = json.loads((run / "metrics.json").read_text())
    assert {"pca", "range"} <= set(m["baselines"]) and m["baselines"]["range"]["splits"]["eval"]["ranking"]["nodes"] >= 1
    # `range` by hand: the node's scaler on its normal training rows, the summed squared excess, smoothed
    register_configs()
    with initialize_config_dir(str(resource_dir("conf")), version_base="1.3"):
        cfg = compose("config", ["data.synthetic.nodes=2", "data.synthetic.rows=300"])
    store = TelemetryStore(run / "store.h5")
    node = store.nodes[0]
    nd = store.read(node)
    rows = training_rows(nd, split_codes(nd, cfg.split), cfg.split.normal_only, cfg.split.exclude_idle)
    vals = fill_gaps(nd.values, cfg.preprocess.nan_fill_limit)
    scaler = Scaler.fit(vals[rows], cfg.preprocess)
    excess = np.square(scaler.excess(scaler.transform(vals)[0])).sum(1)
    assert excess.max() > 0 and excess[rows].max() == 0  # outside the training range only
    level = signal_level(0.0, vals.shape[1], cfg.signal.scale_floor)
    with h5py.File(run / "baselines" / "range.h5") as f:
        np.testing.assert_allclose(f[f"nodes/{node}/signal"][:], smooth_signal(excess, cfg.signal.smooth, level),
                                   rtol=1e-5, atol=1e-6 * level)
    # PCA: its reconstruction error plus 10 x that excess (unsmoothed here); baselines.range_excess=false: bare
    cfg.signal.smooth = 1
    bare = next(baseline_signals("pca", cfg, store, store, nodes=[node]))
    added = next(baseline_signals("pca", cfg, store, store, nodes=[node], weight=10.0))
    np.testing.assert_allclose(added.signal - bare.signal, 10 * excess, rtol=1e-5, atol=1e-5)
    # KDE: the term in its units (a constant factor, 1 / 2h^2); IsolationForest's score has none: unchanged
    d = next(baseline_signals("kde", cfg, store, store, nodes=[node], weight=10.0)).signal - \
        next(baseline_signals("kde", cfg, store, store, nodes=[node])).signal
    out = excess > 0
    ratio = d[out] / excess[out]
    assert np.abs(d[~out]).max() < 1e-6 and ratio.min() > 0 and np.allclose(ratio, ratio[0], rtol=1e-4)
    np.testing.assert_array_equal(next(baseline_signals("iforest", cfg, store, store, nodes=[node], weight=10.0)).signal,
                                  next(baseline_signals("iforest", cfg, store, store, nodes=[node])).signal)
    # the weight a run gives them: the one errors.h5 was scored with; none with baselines.range_excess=false
    from hpcad.baselines import excess_weight

    assert excess_weight(cfg, run / "errors.h5") == 10 and excess_weight(cfg, None) == 1  # auto, before scoring
    cfg.baselines.range_excess = False
    assert excess_weight(cfg, run / "errors.h5") == 0
    # scoring other (shorter) data with the run's models (train_run): fitted on the run's rows, scored on the new ones
    other = tmp_path / "other"
    hpcad("run", "data.synthetic.nodes=2", "data.synthetic.rows=100", "data.synthetic.seed=1", "compute.progress=false",
          "baselines.methods=[pca,range]", f"train_run={run}", f"hydra.run.dir={other}")
    m = json.loads((other / "metrics.json").read_text())
    assert m["baselines"]["range"]["splits"]["eval"]["ranking"]["nodes"] >= 1 and "pca" in m["baselines"]


def test_each_baseline_chooses_its_own_range_excess_weight_on_its_validation_rows(tmp_path):
    """PCA, the 1-NN and KDE added the range-excess term at the weight the autoencoder's validation
    chose, so a training option that moved the autoencoder's choice moved the baselines' figures (a
    sweep of train.batch_size moved PCA's test cost on the synthetic cluster from 1193 to 1348), and a
    baseline was judged at a weight chosen for another detector. Now, with signal.excess_weight=auto,
    each chooses its own by the autoencoder's rule on its own signal; a fixed weight applies to all."""
    import json

    import h5py

    from conftest import FEW_PLOTS, hpcad
    from hpcad.baselines import run_baselines, validation_totals

    run = tmp_path / "run"
    args = ["data.synthetic.nodes=3", "data.synthetic.rows=600", "train.epochs=2", "compute.progress=false",
            *FEW_PLOTS, "baselines.methods=[pca,kde]", f"hydra.run.dir={run}"]
    hpcad("run", *args)
    m = json.loads((run / "metrics.json").read_text())["baselines"]
    register_configs()
    with initialize_config_dir(str(resource_dir("conf")), version_base="1.3"):
        cfg = compose("config", args[:-1])
    store = TelemetryStore(run / "store.h5")
    for method in ("pca", "kde"):
        choice = m[method]["excess_choice"]
        grid, ap = choice["candidates"], choice["validation_ap"]
        assert grid == [1.0, 10.0, 100.0, 1e3, 1e4, 1e5, 1e6] and choice["nodes"] >= 1  # the default grid
        assert m[method]["excess_weight"] == choice["chosen"] == next(w for w, a in zip(grid, ap) if a >= max(ap) - 0.005)
        totals = validation_totals(method, cfg, store, store, store.nodes, grid, False)  # by hand: the same figures
        np.testing.assert_allclose(totals[:-1] / totals[-1], ap, atol=1e-6)
    # the autoencoder's weight (here 1000 instead of what it chose) no longer changes a baseline; each
    # node is fitted once (its scores kept between the choice and the signals), no scratch file left
    from unittest import mock

    import hpcad.baselines as hb

    for w in (1.0, 1000.0):
        out = tmp_path / f"ae{w:g}"
        with mock.patch.object(hb, "_fit", side_effect=hb._fit) as fits:
            run_baselines(cfg, store, store, out, weight=w)
        assert fits.call_count == 2 * len(store.nodes) and sorted(p.name for p in out.iterdir()) == ["kde.h5", "pca.h5"]
        with h5py.File(out / "pca.h5") as f:
            got = {n: f[f"nodes/{n}/signal"][()] for n in f["nodes"]}
        with h5py.File(run / "baselines" / "pca.h5") as f:
            for n, sig in got.items():
                np.testing.assert_array_equal(sig, f[f"nodes/{n}/signal"][()])
    # a fixed weight: every baseline adds that one, nothing chosen
    hpcad("baselines", *args, "signal.excess_weight=10")
    with h5py.File(run / "baselines" / "pca.h5") as f:
        assert f.attrs["excess_weight"] == 10 and "signal_choice" not in f.attrs
