"""``split.exclude``: stretches a site lists (an earlier run's or the nightly job's alarms.csv, an
incident list) are kept out of training without becoming labels."""
import json

import h5py
import numpy as np
import pandas as pd
import torch

from conftest import SMALL, hpcad
from hpcad.data.synthetic import generate_cluster, node_frame

COMMON = [o for o in SMALL if not o.startswith(("data.synthetic", "baselines.methods"))] + [
    "data=files", "baselines.methods=[pca]", "signal.smooth=1"]
CUT = slice(50, 90)  # node0000's rows listed (inside its training rows)


def _exports(folder, nodes, drop_listed: bool = False):
    folder.mkdir()
    for nd in nodes:
        frame = node_frame(nd).drop(columns=["anomaly"])  # a site without labels
        if drop_listed and nd.name == "node0000":
            frame = frame.drop(index=frame.index[CUT])
        frame.to_csv(folder / f"{nd.name}.csv", index=False)
    return folder


def _iso(t) -> str:
    return pd.Timestamp(int(t), unit="s").isoformat() + "Z"


def _weights(run) -> dict:
    return {p.stem: torch.load(p, weights_only=True) for p in sorted((run / "models").glob("node*.pt"))}


def test_a_listed_stretch_trains_as_if_its_rows_were_not_there_and_labels_nothing(tmp_path):
    nodes = list(generate_cluster(3, 400, seed=0))
    ts = nodes[0].timestamp
    # a time split: the same boundaries whether the listed rows are in the files or not
    split = ["split.unit=time", f"split.train={_iso(ts[200])}", f"split.val={_iso(ts[300])}"]
    lists = tmp_path / "alarms"
    lists.mkdir()
    # the nightly job's alarms.csv of two nights: one alarm (its other columns ignored), one quiet night
    pd.DataFrame({"node": ["node0000"], "start": [_iso(ts[CUT.start])], "end": [_iso(ts[CUT.stop - 1])],
                  "rows": [40], "split": ["train"], "top_metrics": ["ips_0:12"]}).to_csv(lists / "night1.csv", index=False)
    pd.DataFrame(columns=["node", "start", "end", "rows"]).to_csv(lists / "night2.csv", index=False)
    run, plain = tmp_path / "run", tmp_path / "plain"
    src = _exports(tmp_path / "exports", nodes)
    args = [f"data.source={src}", *split, *COMMON]

    hpcad("train", f"hydra.run.dir={run}", *args)  # trained before the list existed
    before = {p.name: p.stat().st_mtime_ns for p in (run / "models").glob("*.pt")}
    hpcad("run", f"hydra.run.dir={run}", *args, f"split.exclude={lists}/*.csv")
    assert "split.exclude: 1 stretch(es) on 1 node(s), from 2 file(s), kept out of training" in (run / "run.log").read_text()
    after = {p.name: p.stat().st_mtime_ns for p in (run / "models").glob("*.pt")}
    # only the node the list names is retrained
    assert [n for n in before if after[n] != before[n]] == ["node0000.pt"]

    # ... and its model is the one trained on its telemetry without those rows, bit for bit
    hpcad("run", f"hydra.run.dir={plain}", f"data.source={_exports(tmp_path / 'cut', nodes, True)}", *split, *COMMON)
    for (name, a), (_, b) in zip(_weights(run).items(), _weights(plain).items()):
        assert a["history"] == b["history"], name
        for x, y in zip(a["members"][0], b["members"][0]):
            assert torch.equal(x, y), name
    # so is the baseline fitted on the same rows (scores of the rows both runs hold; to float32 rounding:
    # the rows are scored in blocks that start elsewhere)
    with h5py.File(run / "baselines/pca.h5") as fa, h5py.File(plain / "baselines/pca.h5") as fb:
        keep = np.ones(400, bool)
        keep[CUT] = False
        np.testing.assert_allclose(fa["nodes/node0000/signal"][:][keep], fb["nodes/node0000/signal"][:], rtol=1e-5)

    # not labels: no figures, thresholds fitted as without labels, the listed rows scored like any;
    # the report says what training left out
    assert f"training left out the stretches listed in <code>{lists}/*.csv</code>" in (run / "report.html").read_text()
    assert not (run / "metrics.json").exists()
    details = json.loads((run / "thresholds.json").read_text())["details"]
    assert details["unlabelled_nodes"] == 3 and details["fallback"]["rule"] == "level"
    with h5py.File(run / "errors.h5") as f:
        assert np.isfinite(f["nodes/node0000/signal"][:][CUT]).all()

    # a rerun with the same list retrains nothing
    kept = {p.name: p.stat().st_mtime_ns for p in (run / "models").glob("*.pt")}
    hpcad("train", f"hydra.run.dir={run}", *args, f"split.exclude={lists}/*.csv")
    assert {p.name: p.stat().st_mtime_ns for p in (run / "models").glob("*.pt")} == kept


def test_a_list_that_is_not_there_or_not_an_incident_list_is_refused_naming_it(tmp_path):
    bad = tmp_path / "notes.csv"
    bad.write_text("node,when\ncn01,2025-01-01\n")
    for value, says in ((f"{tmp_path}/nightly/*/alarms.csv", "split.exclude: the pattern"),
                        (str(tmp_path / "missing.csv"), "missing.csv does not exist"),
                        (str(bad), f"{bad}: the labels file lacks column(s) ['start', 'end']")):
        out = hpcad("train", f"hydra.run.dir={tmp_path / 'r'}", *SMALL, f"split.exclude={value}", check=False)
        assert out.returncode == 2 and says in out.stderr and "Traceback" not in out.stderr, out.stderr


def test_the_preflight_names_every_rank_that_cannot_read_the_list(tmp_path):
    """Every rank trains its share of the nodes, so every rank reads ``split.exclude``: the preflight
    of a SLURM job says which rank does not see it (here none does), before any step trains."""
    from hydra import compose, initialize_config_dir

    from hpcad.config import register_configs
    from hpcad.dist import World
    from hpcad.preflight import missing_inputs
    from hpcad.resources import resource_dir

    register_configs()
    with initialize_config_dir(str(resource_dir("conf")), version_base="1.3"):
        cfg = compose("config", [f"split.exclude={tmp_path}/nightly/*/alarms.csv"])
    said = missing_inputs(cfg, World(rank=3, size=4, source="slurm"))
    assert len(said) == 1 and said[0].startswith("rank 3 on ") and "split.exclude: the pattern" in said[0], said
