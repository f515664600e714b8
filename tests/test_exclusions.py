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


def _exports(folder, nodes, drop: dict | None = None):
    """The nodes as a site's wide exports without labels; ``drop``: node -> rows left out of its file."""
    folder.mkdir()
    for nd in nodes:
        frame = node_frame(nd).drop(columns=["anomaly"])
        if drop and nd.name in drop:
            frame = frame.drop(index=frame.index[drop[nd.name]])
        frame.to_csv(folder / f"{nd.name}.csv", index=False)
    return folder


def _iso(t) -> str:
    return pd.Timestamp(int(t), unit="s").isoformat() + "Z"


def _weights(run) -> dict:
    return {p.stem: torch.load(p, weights_only=True) for p in sorted((run / "models").glob("node*.pt"))}


def _mtimes(run) -> dict:
    return {p.name: p.stat().st_mtime_ns for p in (run / "models").glob("*.pt")}


def test_retraining_with_an_earlier_runs_alarms_left_out_trains_as_if_those_rows_were_not_there(tmp_path):
    """The docs' retraining: a run's alarms.csv (the nightly job writes the same file each night) is
    the list for the next training, whose longer training period now holds those stretches."""
    nodes = list(generate_cluster(3, 400, seed=0))
    ts = nodes[0].timestamp  # the split's times (node0000 has a row at every step)
    src = _exports(tmp_path / "exports", nodes)
    first = tmp_path / "first"
    hpcad("run", f"hydra.run.dir={first}", f"data.source={src}", "split.unit=time", f"split.train={_iso(ts[200])}",
          f"split.val={_iso(ts[300])}", *COMMON)
    alarms = pd.read_csv(first / "alarms.csv")
    nights = tmp_path / "nights"
    nights.mkdir()
    (nights / "night1.csv").write_text((first / "alarms.csv").read_text())
    (nights / "night2.csv").write_text((first / "alarms.csv").read_text().splitlines()[0] + "\n")  # a quiet night
    # the retraining: a later split, so that the alarmed stretches are training rows now
    later = ["split.unit=time", f"split.train={_iso(ts[360])}", f"split.val={_iso(ts[380])}", *COMMON]
    inside = {}
    own = {nd.name: nd.timestamp for nd in nodes}  # a node's own rows (node0001 has idle gaps: 370 of 400)
    for a in alarms.itertuples():
        t0, t1 = (pd.Timestamp(x).value // 10**9 for x in (a.start, a.end))
        t = own[a.node]
        rows = np.flatnonzero((t >= t0) & (t <= t1) & (t < ts[360]))
        inside[a.node] = np.union1d(inside.get(a.node, []), rows).astype(int)
    assert sum(map(len, inside.values())) > 0, alarms  # the list does reach training rows

    run = tmp_path / "run"
    hpcad("train", f"hydra.run.dir={run}", f"data.source={src}", *later)  # trained before the list existed
    before = _mtimes(run)
    hpcad("run", f"hydra.run.dir={run}", f"data.source={src}", *later, f"split.exclude={nights}/*.csv")
    log = (run / "run.log").read_text()
    assert f"split.exclude: {len(alarms)} stretch(es) on {alarms.node.nunique()} node(s), from 2 file(s)" in log
    # only the nodes the list names are retrained
    assert sorted(n for n, t in _mtimes(run).items() if t != before[n]) == sorted(f"{n}.pt" for n in inside)

    # ... and each model is the one trained on the node's telemetry without those rows, bit for bit
    plain = tmp_path / "plain"
    hpcad("run", f"hydra.run.dir={plain}", f"data.source={_exports(tmp_path / 'cut', nodes, inside)}", *later)
    for (name, a), (_, b) in zip(_weights(run).items(), _weights(plain).items()):
        assert a["history"] == b["history"], name
        for x, y in zip(a["members"][0], b["members"][0]):
            assert torch.equal(x, y), name
    # so is the baseline fitted on the same rows (scores of the rows both runs hold; to float32 rounding:
    # the rows are scored in blocks that start elsewhere)
    with h5py.File(run / "baselines/pca.h5") as fa, h5py.File(plain / "baselines/pca.h5") as fb:
        for node, rows in inside.items():
            keep = np.ones(len(own[node]), bool)
            keep[rows] = False
            np.testing.assert_allclose(fa[f"nodes/{node}/signal"][:][keep], fb[f"nodes/{node}/signal"][:], rtol=1e-5)

    # not labels: no figures, thresholds fitted as without labels, the listed rows scored like any;
    # the report says what training left out
    assert f"training left out the stretches listed in <code>{nights}/*.csv</code>" in (run / "report.html").read_text()
    assert not (run / "metrics.json").exists()
    details = json.loads((run / "thresholds.json").read_text())["details"]
    assert details["unlabelled_nodes"] == 3 and details["fallback"]["rule"] == "level"
    with h5py.File(run / "errors.h5") as f:
        for node, rows in inside.items():
            assert np.isfinite(f[f"nodes/{node}/signal"][:][rows]).all()

    # a rerun with the same list retrains nothing
    kept = _mtimes(run)
    hpcad("train", f"hydra.run.dir={run}", f"data.source={src}", *later, f"split.exclude={nights}/*.csv")
    assert _mtimes(run) == kept


def test_a_list_that_is_not_there_or_not_an_incident_list_is_refused_naming_it(tmp_path):
    bad = tmp_path / "notes.csv"
    bad.write_text("node,when\ncn01,2025-01-01\n")
    for value, says in ((f"{tmp_path}/nightly/*/alarms.csv", "split.exclude: the pattern"),
                        (str(tmp_path / "missing.csv"), "missing.csv does not exist"),
                        (str(tmp_path), f"split.exclude: {tmp_path} is a folder: give a file or a glob pattern"),
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
