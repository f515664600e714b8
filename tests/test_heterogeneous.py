"""Nodes that report different metrics (real clusters: per-core temperatures, GPU counters): each node
is stored, trained and scored on its own metrics (data.on_missing_metric=union, the default)."""
import h5py
import numpy as np
import pandas as pd

from conftest import hpcad, small_exports
from hpcad.data.store import TelemetryStore
from hpcad.errorstore import ErrorStore
from hpcad.model.files import NodeModel


def test_nodes_with_different_metric_sets_train_score_and_rescore(tmp_path):
    exports = small_exports(tmp_path, nodes=3)
    files = sorted(exports.glob("*.csv"))
    a = pd.read_csv(files[0])
    lost = [c for c in a.columns if c.startswith("temp_")][:4]  # node 0 lacks four sensors
    a.drop(columns=lost).to_csv(files[0], index=False)
    c = pd.read_csv(files[2])
    gpu = pd.DataFrame({"gpu_util": np.random.default_rng(0).uniform(0, 100, len(c))})
    pd.concat([c, gpu], axis=1).to_csv(files[2], index=False)  # node 2 has a GPU counter
    run = tmp_path / "run"
    hpcad("run", f"data.source={exports}", "train.epochs=2", "compute.progress=false", "baselines.methods=[pca]",
          "report.enabled=false", f"hydra.run.dir={run}")
    said = [line for line in (run / "run.log").read_text().splitlines() if "without any training value" in line]
    # nodes 0 and 1 lack the GPU counter: said once each, by training, named (the baselines' fit said it
    # again, naming the metric by its column number)
    assert len(said) == 2 and all(line.endswith("gpu_util") for line in said), said
    store = TelemetryStore(run / "store.h5")
    assert set(lost) < set(store.metrics) and "gpu_util" in store.metrics
    n0, n2 = files[0].stem, files[2].stem
    model = NodeModel.load(run / "models" / f"{n0}.pt")
    absent = {m for m, x in zip(model.metrics, model.scaler.absent) if x}
    assert absent == {*lost, "gpu_util"}  # node 0's model leaves out what node 0 does not report...
    assert {m for m, x in zip(model.metrics, NodeModel.load(run / "models" / f"{n2}.pt").scaler.absent) if x} == set()
    with h5py.File(run / "errors.h5") as f:
        names = [m.decode() for m in f["metrics"][()]]
        err0, err2 = f[f"nodes/{n0}/error"][()], f[f"nodes/{n2}/error"][()]
    cols = [names.index(m) for m in lost]
    assert (err0[:, cols] == 0).all() and (err2[:, cols] > 0).any()  # ...and they never add to its error
    assert (err0[:, names.index("gpu_util")] == 0).all() and (err2[:, names.index("gpu_util")] > 0).any()

    # a later export without the GPU counter at all: scored with the trained models, the metric as missing
    later = tmp_path / "later"
    later.mkdir()
    for f in files:
        pd.read_csv(f).drop(columns=["gpu_util"], errors="ignore").to_csv(later / f.name, index=False)
    p = hpcad("score", f"data.source={later}", f"train_run={run}", "compute.progress=false",
              f"hydra.run.dir={tmp_path / 'later-run'}")
    assert "lacks 1 of the models' metrics" in p.stdout + p.stderr + (tmp_path / "later-run" / "score.log").read_text()
    with h5py.File(tmp_path / "later-run" / "errors.h5") as f:
        assert [m.decode() for m in f["metrics"][()]] == names
        assert (f[f"nodes/{n2}/error"][:, names.index("gpu_util")] == 0).all()
    # node 2 trained on it: a telemetry gap of that node (its report lists it), not of the others
    assert ErrorStore(tmp_path / "later-run" / "errors.h5").lost == {n2: ["gpu_util"]}

    strict = hpcad("ingest", f"data.source={exports}", "data.on_missing_metric=error",
                   f"hydra.run.dir={tmp_path / 'strict'}", check=False)
    assert strict.returncode == 2 and "metric set differs" in strict.stderr and "union" in strict.stderr
