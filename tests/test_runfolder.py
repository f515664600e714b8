"""Run-folder integrity: one writer at a time, and what killed writers leave is cleared."""
import io
import re
import sys

import pytest

from conftest import FEW_PLOTS, hpcad, hpcad_on_terminal, small_site

from hpcad.runfolder import LOCK_NAME, exclusive_lock

SMALL_STORE = ["data.synthetic.nodes=2", "data.synthetic.rows=200", "compute.progress=false"]


def test_a_second_writer_gets_one_line_naming_the_holder_and_writes_nothing(tmp_path):
    run = tmp_path / "run"
    with exclusive_lock(run / LOCK_NAME, "hpcad run (the first writer)"):
        p = hpcad("ingest", *SMALL_STORE, f"hydra.run.dir={run}", check=False, process=True)  # another process
    assert p.returncode == 2, p.stderr
    err = [line for line in p.stderr.splitlines() if "error" in line]
    assert len(err) == 1 and "hpcad run (the first writer)" in err[0] and str(run) in err[0]
    assert "Traceback" not in p.stderr
    assert not (run / "store.h5").exists()
    hpcad("ingest", *SMALL_STORE, f"hydra.run.dir={run}")  # released: the stage runs
    assert (run / "store.h5").exists()


def test_the_next_writer_removes_what_killed_writers_left(tmp_path):
    run = tmp_path / "run"
    (run / "models").mkdir(parents=True)
    stale = [run / ".store.h5.k2j4l1.tmp", run / "models" / ".node0001.pt.x9a.tmp", run / ".ingest-grid-q1w2"]
    stale[0].write_bytes(b"\0" * 4096)  # what kill -9 during ingest leaves
    stale[1].write_bytes(b"\0" * 64)
    stale[2].mkdir()
    keep = run / "notes.tmp.txt"
    keep.write_text("not ours")
    p = hpcad("ingest", *SMALL_STORE, f"hydra.run.dir={run}")
    assert not any(s.exists() for s in stale) and keep.exists() and (run / "store.h5").exists()
    assert "removed 3 temporary file(s) left by an interrupted run" in p.stderr + p.stdout


def test_one_minimum_of_training_rows_for_models_and_baselines(tmp_path):
    """A node needs MIN_TRAINING_ROWS training inputs everywhere (a 3-row node was once trained on 2
    rows, with no held-out row, and alarmed on its only test row)."""
    import numpy as np
    import pandas as pd

    from hpcad.preprocess import MIN_TRAINING_ROWS

    src = tmp_path / "exports"
    src.mkdir()
    for node, rows in (("big", 400), ("tiny", 12)):  # tiny: 6 of its 12 rows train (split 45 %) < 10
        pd.DataFrame({"timestamp": 1_700_000_000 + 300 * np.arange(rows),
                      **{m: np.random.default_rng(1).normal(size=rows) for m in ("a", "b", "c")}}).to_csv(
            src / f"{node}.csv", index=False)
    for stage in ("train", "baselines"):  # on a terminal, with its progress bars, as a person runs it
        p = hpcad_on_terminal(stage, f"data.source={src}", "data.format=wide", "baselines.methods=[pca]",
                              f"hydra.run.dir={tmp_path / stage}")
        assert p.returncode == 2 and "node tiny: 6 training rows" in p.stderr, p.stderr
        assert f"fewer than the minimum of {MIN_TRAINING_ROWS}" in p.stderr
        assert "\r" in p.stderr and "node/s" in p.stderr  # the bar was drawn
        # the error is the last thing said: the bar the stage left open used to be printed after it
        assert p.stderr.rstrip().splitlines()[-1].startswith(f"hpcad {stage}: error: "), p.stderr[-500:]
    # stderr to a file (a SLURM or cron log): no bar, whose every update would add to one endless line
    p = hpcad("train", f"data.source={src}", "data.format=wide", f"hydra.run.dir={tmp_path / 'train'}", check=False)
    assert p.returncode == 2 and "node tiny: 6 training rows" in p.stderr
    assert "\r" not in p.stderr and "node/s" not in p.stderr, p.stderr[-500:]


def test_a_node_with_too_few_training_rows_is_left_untrained_with_skip_and_trained_once_it_has_them(tmp_path):
    """One node without enough training rows (down for most of the period, or listed as broken for all
    of it) stopped the whole cluster's training, even with data.on_bad_node=skip (what the SLURM script
    passes). Now, with skip, it is recorded as untrained, the others are trained, scored and compared,
    and the report lists it; a model of earlier settings is not used for it, and it is trained as soon
    as it has the rows."""
    import json

    import numpy as np
    import pandas as pd

    from hpcad.errorstore import ErrorStore

    src = tmp_path / "exports"
    src.mkdir()
    for node, rows in (("big", 400), ("big2", 300), ("tiny", 24)):  # tiny: 12 of 24 rows train (split.train=0.5); 7 at 0.3
        rng = np.random.default_rng(len(node))
        pd.DataFrame({"timestamp": 1_700_000_000 + 300 * np.arange(rows),
                      **{m: rng.normal(size=rows) for m in ("a", "b", "c")}}).to_csv(src / f"{node}.csv", index=False)
    run = tmp_path / "run"
    args = [f"data.source={src}", "data.format=wide", "train.epochs=2", "compute.progress=false", *FEW_PLOTS,
            "baselines.methods=[pca]", f"hydra.run.dir={run}"]
    models = run / "models"
    hpcad("run", *args, "report.enabled=false")  # the default split: every node has enough rows
    assert (models / "tiny.pt").exists() and not (models / "tiny.untrained.json").exists()
    fewer = ["split.train=0.3", "split.val=0.3"]
    p = hpcad("run", *args, *fewer, check=False)  # without skip: the clear error, naming the node and the way out
    assert p.returncode == 2 and "node tiny: 7 training rows" in p.stderr and "data.on_bad_node=skip" in p.stderr
    p = hpcad("run", *args, *fewer, "data.on_bad_node=skip")
    assert "node tiny: 7 training rows, fewer than the minimum of 10: left untrained" in p.stderr + p.stdout
    record = json.loads((models / "tiny.untrained.json").read_text())
    assert record["reason"] == "7 training rows, fewer than the minimum of 10" and record["node"] == "tiny"
    assert not (models / "tiny.pt").exists()  # the model of the earlier split is not scored in its place
    assert sorted(ErrorStore(run / "errors.h5").nodes) == ["big", "big2"]
    assert sorted(ErrorStore(run / "baselines" / "pca.h5").nodes) == ["big", "big2"]  # like for like
    assert sorted(json.loads((run / "thresholds.json").read_text())["nodes"]) == ["big", "big2"]
    page = (run / "report.html").read_text()
    assert "Untrained nodes (1)" in page and "7 training rows, fewer than the minimum of 10" in page
    summary = json.loads((models / "training.json").read_text())
    assert summary["untrained"] == 1 and summary["untrained_nodes"] == ["tiny"]
    stamp = (models / "tiny.untrained.json").stat().st_mtime_ns
    p = hpcad("train", *args, *fewer, "data.on_bad_node=skip")  # a rerun: nothing trained, the node not read again
    assert "resuming: 2 of 3 nodes already have a model (1 left untrained)" in p.stderr + p.stdout
    assert (models / "tiny.untrained.json").stat().st_mtime_ns == stamp
    hpcad("run", *args, "data.on_bad_node=skip")  # enough rows again: trained, and the record goes
    assert (models / "tiny.pt").exists() and not (models / "tiny.untrained.json").exists()
    assert sorted(ErrorStore(run / "errors.h5").nodes) == ["big", "big2", "tiny"]
    assert "Untrained nodes" not in (run / "report.html").read_text()


def test_the_fleet_model_leaves_out_a_node_with_too_few_training_rows_with_skip(tmp_path):
    """model.scope=fleet stopped the whole training on such a node even with data.on_bad_node=skip
    (the SLURM scripts' setting), where the per-node scope leaves it untrained. Now the fleet model
    trains on the others, the node is recorded the same way, a rerun does not train again, and it
    gets the fleet model's file once it has the rows."""
    import json

    import numpy as np
    import pandas as pd

    from hpcad.errorstore import ErrorStore

    src = tmp_path / "exports"
    src.mkdir()
    for node, rows in (("big", 400), ("big2", 300), ("tiny", 24)):
        rng = np.random.default_rng(len(node))
        pd.DataFrame({"timestamp": 1_700_000_000 + 300 * np.arange(rows),
                      **{m: rng.normal(size=rows) for m in ("a", "b", "c")}}).to_csv(src / f"{node}.csv", index=False)
    run = tmp_path / "run"
    args = [f"data.source={src}", "data.format=wide", "model.scope=fleet", "train.epochs=2", "compute.progress=false",
            "baselines.methods=[]", "report.enabled=false", "split.train=0.3", "split.val=0.3", f"hydra.run.dir={run}"]
    models = run / "models"
    p = hpcad("run", *args, check=False)  # without skip: the clear error, as in the per-node scope
    assert p.returncode == 2 and "node tiny: 7 training rows" in p.stderr and "data.on_bad_node=skip" in p.stderr
    p = hpcad("run", *args, "data.on_bad_node=skip")
    assert "node tiny: 7 training rows, fewer than the minimum of 10: left out of the fleet model" in p.stderr + p.stdout
    assert json.loads((models / "tiny.untrained.json").read_text())["node"] == "tiny"
    assert sorted(ErrorStore(run / "errors.h5").nodes) == ["big", "big2"]
    first = (models / "big.pt").stat().st_mtime_ns
    p = hpcad("train", *args, "data.on_bad_node=skip")  # a rerun: already trained, not trained again
    assert "fleet model already trained from the same data and settings" in p.stderr + p.stdout
    assert (models / "big.pt").stat().st_mtime_ns == first
    hpcad("run", *[a for a in args if not a.startswith("split.")], "data.on_bad_node=skip")  # enough rows again
    assert (models / "tiny.pt").exists() and not (models / "tiny.untrained.json").exists()
    assert sorted(ErrorStore(run / "errors.h5").nodes) == ["big", "big2", "tiny"]


def _corrupt_chunk(path, dataset):
    """Overwrite the middle of ``dataset``'s first chunk in place (what a bad disk or a stray write does)."""
    import h5py

    with h5py.File(path, "r") as f:
        info = f[dataset].id.get_chunk_info(0)
    with open(path, "r+b") as fh:
        fh.seek(info.byte_offset + info.size // 4)
        fh.write(bytes(range(256)) * max(1, info.size // 512))


def test_corrupt_outputs_are_errors_that_say_what_to_rerun(tmp_path):
    """HDF5 outputs carry Fletcher-32 checksums: garbage inside errors.h5 or store.h5 is an error
    naming the file, the node and the stage to rerun, never numbers read silently."""
    import h5py

    from conftest import SMALL

    run = tmp_path / "run"
    hpcad("run", *SMALL, f"hydra.run.dir={run}", "report.enabled=false")
    with h5py.File(run / "errors.h5") as f:
        node = sorted(f["nodes"])[0]
        assert f[f"nodes/{node}/signal"].fletcher32 and f[f"nodes/{node}/error"].fletcher32
    _corrupt_chunk(run / "errors.h5", f"nodes/{node}/signal")
    p = hpcad("threshold", *SMALL, f"hydra.run.dir={run}", check=False)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert f"errors.h5: node {node}: cannot read (corrupt file" in p.stderr and "rerun `hpcad score`" in p.stderr
    _corrupt_chunk(run / "store.h5", f"nodes/{node}/values")
    p = hpcad("score", *SMALL, f"hydra.run.dir={run}", check=False)
    assert p.returncode == 2 and f"store.h5: node {node}: cannot read (corrupt file" in p.stderr
    assert "rerun `hpcad ingest`" in p.stderr


def test_training_progress_moves_every_epoch_and_logs_a_long_chunk(monkeypatch, caplog):
    """A chunk of 32 CPU nodes can train for minutes: the bar moves each epoch, and a log line (SLURM
    logs, no bar) comes at least every EPOCH_LOG_S seconds."""
    from hpcad import train

    class Bar:
        postfix: list = []

        def set_postfix(self, **kw):
            self.postfix.append(kw)

    bar = Bar()
    report = train._epoch_reporter(bar, chunk=3, models=32, epochs=20)
    report(1, 32)
    monkeypatch.setattr(train, "EPOCH_LOG_S", 0.0)
    with caplog.at_level("INFO", logger="hpcad.train"):
        report(2, 30)
    assert bar.postfix == [{"chunk": 3, "epoch": "1/20", "training": "32/32"},
                           {"chunk": 3, "epoch": "2/20", "training": "30/32"}]
    assert "chunk 3: epoch 2/20, 30 of 32 models still training" in caplog.text


def test_scoring_in_a_log_file_says_how_far_it_got_every_minute(tmp_path, monkeypatch, caplog):
    """Scoring thousands of nodes takes minutes; in a SLURM log (no bar: stderr is no terminal) it
    says first on which device it scores how many nodes, then how far it got at most every
    LOG_EVERY_S seconds; with compute.progress=false, only where and what it did."""
    from hpcad import progress
    from hpcad.score import score_nodes
    from hpcad.train import train_nodes

    cfg, store = small_site(tmp_path, overrides=("compute.progress=true",))
    train_nodes(cfg, store, tmp_path / "models")
    monkeypatch.setattr(progress, "LOG_EVERY_S", 0.0)
    monkeypatch.setattr(sys, "stderr", io.StringIO())  # a log file, also under `pytest -s` on a terminal
    with caplog.at_level("INFO", logger="hpcad.score"):
        score_nodes(cfg, store, tmp_path / "models", tmp_path / "errors.h5")
    assert caplog.records[0].getMessage() == "scoring 5 node(s) on cpu"  # the GPU check looks for it (on cuda:N)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("score: ")]
    assert [line.split(" (")[0] for line in lines] == [f"score: {k}/5 nodes" for k in range(1, 5)], lines
    assert all(re.search(r" \([\d.]+ s, about [\d.]+ s left\)$", line) for line in lines), lines  # and time to go
    caplog.clear()
    cfg.compute.progress = False
    with caplog.at_level("INFO", logger="hpcad.score"):
        score_nodes(cfg, store, tmp_path / "models", tmp_path / "quiet.h5")
    assert [r.getMessage().split(" -> ")[0] for r in caplog.records] == ["scoring 5 node(s) on cpu", "scored 5 nodes"]


def test_a_file_system_without_file_locks_runs_without_them_and_says_so(tmp_path, monkeypatch, caplog):
    """Lustre mounted noflock (and some NFS): flock fails with ENOSYS and HDF5 fails every open with
    "unable to lock file, errno = 38". Stood in for by failing both as they fail there (no such file
    system here): `hpcad run` goes through without locks, with one warning for HDF5."""
    import errno
    import fcntl
    import subprocess
    import sys

    import h5py
    from hydra import compose, initialize_config_dir

    from hpcad.config import register_configs
    from hpcad.data import h5, store
    from hpcad.errors import StoreError
    from hpcad.pipeline import RUNNERS
    from hpcad.resources import resource_dir

    real_file = h5py.File

    def hdf5_without_locks(path, mode="r", *args, locking=None, **kw):
        if locking is not False:
            raise OSError(errno.ENOSYS, "Unable to synchronously open file (unable to lock file, errno = 38, "
                                        "error message = 'Function not implemented')")
        return real_file(path, mode, *args, locking=False, **kw)

    def flock_without_locks(fh, op):
        raise OSError(errno.ENOSYS, "Function not implemented")

    monkeypatch.setattr(h5py, "File", hdf5_without_locks)
    monkeypatch.setattr(fcntl, "flock", flock_without_locks)
    monkeypatch.setattr(h5, "_hdf5_locks", True)
    register_configs()
    with initialize_config_dir(str(resource_dir("conf")), version_base="1.3"):
        cfg = compose("config", [*SMALL_STORE, "compute.device=cpu", "train.epochs=2", "baselines.methods=[]",
                                 "report.enabled=false"])
    run = tmp_path / "run"
    RUNNERS["run"](cfg, run)
    assert (run / "thresholds.json").exists() and (run / "errors.h5").exists() and (run / "store.h5").exists()
    said = [r.getMessage() for r in caplog.records if "no file locks" in r.getMessage()]
    assert sum("HDF5 files are opened without them" in m for m in said) == 1, said
    assert any("going on without the run folder's lock" in m for m in said), said
    monkeypatch.undo()  # real locks again: a file another process holds for writing is still an error
    holder = subprocess.Popen([sys.executable, "-c", "import h5py, sys; f = h5py.File(sys.argv[1], 'a'); "
                               "print('open', flush=True); sys.stdin.read()", str(run / "store.h5")],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "open"
        with pytest.raises(StoreError, match="another process holds it open for writing"):
            store.TelemetryStore(run / "store.h5")
    finally:
        holder.communicate("")
    assert store.TelemetryStore(run / "store.h5").nodes  # released: readable again


def test_new_data_is_read_as_the_training_run_read_its_own_unless_the_run_says_otherwise(tmp_path, caplog):
    """Scoring with a training run's models (`train_run`: hpcad run, score, nightly), the options that
    say what timestamps and values mean come from the training run where this run leaves them unset."""
    from omegaconf import OmegaConf

    from hpcad.runfolder import inherit_reading

    trained, _ = small_site(tmp_path, overrides=("data.timezone=Europe/Rome", "data.epoch_unit=ms",
                                                 "data.counters=[energy_*]", "data.resample_s=300",
                                                 "data.format=long"))
    (tmp_path / "train" / ".hydra").mkdir(parents=True)
    OmegaConf.save(trained, tmp_path / "train" / ".hydra" / "config.yaml")
    given = ["data.epoch_unit=s", f"train_run={tmp_path / 'train'}"]
    cfg, _ = small_site(tmp_path, overrides=tuple(given))
    with caplog.at_level("INFO", logger="hpcad.runfolder"):
        taken = inherit_reading(cfg, given)
    assert taken == {"timezone": "Europe/Rome", "counters": ["energy_*"], "resample_s": 300}
    assert cfg.data.timezone == "Europe/Rome" and list(cfg.data.counters) == ["energy_*"] and cfg.data.resample_s == 300
    assert cfg.data.epoch_unit.name == "s"  # given: kept, with a warning naming both values
    assert str(cfg.data.format) != "long"  # the layout is the input's own (a wrong one stops the ingest, naming it)
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warned == ["data.epoch_unit=s (the training run read its input with ms): this input is read otherwise "
                      "than the data its models were trained on"], warned
    # a training run without a recorded config (hydra.output_subdir=null): nothing taken
    cfg, _ = small_site(tmp_path, overrides=(f"train_run={tmp_path}",))
    assert inherit_reading(cfg, []) == {} and cfg.data.timezone == "UTC"
