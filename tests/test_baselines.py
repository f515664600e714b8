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
