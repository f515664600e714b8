"""Pipeline stages over one run folder: ingest -> train -> score -> baselines -> threshold -> report.

Every stage reads what the previous ones left in the run folder (Hydra's output folder, set with
``hydra.run.dir``), writes its outputs atomically, and can be rerun: a rerun skips a store that is
up to date and nodes that already have a model. A writing stage holds the run folder's lock
(one writer at a time) and first removes what interrupted runs left (hpcad/runfolder.py).
"""
from __future__ import annotations

import functools
import json
import logging
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import OmegaConf

from hpcad import dist, runfolder, signal_choice
from hpcad.atomic import remove_unreferenced, write_json
from hpcad.config import build
from hpcad.data.ingest import ingest, wanted_signature
from hpcad.data.ranks import ingest_ranks
from hpcad.data.store import TelemetryStore, is_store_path, run_store_path
from hpcad.errors import ConfigError, InputError, StoreError
from hpcad.explain import ExpectedQuotes, profile_sums, profiles_from_sums
from hpcad.errorstore import FORMAT, ErrorStore, NodeSignal, remove_other_signal_files, signal_files, write_index
from hpcad.model.files import UNTRAINED_SUFFIX, model_digest, model_nodes, model_path, models_stamp, untrained_nodes
from hpcad.progress import tracked
from hpcad.threshold.evaluate import alarm_record, alarms_by_level, apply_thresholds, evaluate
from hpcad.threshold.reduce import Reducer, reducer
from hpcad.threshold.rules import Thresholds

if TYPE_CHECKING:
    from hpcad.config import HpcadConfig
    import torch

log = logging.getLogger(__name__)


def models_dir(cfg: HpcadConfig, run_dir: Path) -> Path:
    tr = runfolder.train_run(cfg)
    return (tr if tr is not None else run_dir) / "models"


def stage_ingest(cfg: HpcadConfig, run_dir: Path) -> TelemetryStore:
    return TelemetryStore(ingest(cfg.data, run_dir / "store.h5", cfg.compute.progress))


@contextmanager
def ranked_share(cfg: HpcadConfig, run_dir: Path, gpu_collectives: bool = False, monitored: bool = False
                 ) -> Iterator[tuple[dist.World, torch.device, TelemetryStore, list[str]]]:
    """This process's rank, device, the store and its share of the nodes (all of them in one process).

    Across ranks: each rank ingests its share of a folder of node files (any other input: rank 0
    while the others wait; hpcad/data/ranks.py), the nodes are split balanced by rows.
    ``gpu_collectives``: the stage all-reduces tensors on the GPU (NCCL on CUDA; otherwise gloo, ``dist.backend``). The process group outlives the stage: the command's next
    stage uses it too, and the command tears it down at its end (``hpcad.dist``).
    """
    from hpcad.device import describe, resolve_device  # the stages that train or score load torch, the others do not

    w = dist.world()
    device = resolve_device(cfg.compute.device, w.local_rank)
    if not w.distributed:
        store = stage_ingest(cfg, run_dir)
        yield w, device, store, _monitored(cfg, run_dir, store.nodes) if monitored else list(store.nodes)
        return
    dist.init(device, gpu_collectives)
    with dist.peers_watched():  # another rank stopped mid-stage: one line, not a traceback
        runfolder.check_shared(run_dir)  # one folder for every rank, not a node-local copy per node
        ingest_ranks(cfg.data, run_dir / "store.h5", cfg.compute.progress)
        store = stage_ingest(cfg, run_dir)
        # rank 0 lists the models folder for every rank (one listing on a shared file system, not one per rank)
        nodes = dist.from_rank_zero(lambda: _monitored(cfg, run_dir, store.nodes)) if monitored else store.nodes
        mine = dist.shard({n: store.rows(n) for n in nodes}, w.size)[w.rank]
        threads = dist.share_cpu_threads()
        log.info("rank %d of %d on %s: %d of %d nodes, device %s%s", w.rank, w.size, socket.gethostname(), len(mine),
                 len(store.nodes), describe(device),
                 "" if threads is None else f", {threads} CPU thread(s) (its share of the CPUs it shares with "
                 f"other ranks of the node: no CPU binding)")
        yield w, device, store, mine


def _monitored(cfg: HpcadConfig, run_dir: Path, nodes: list[str]) -> list[str]:
    """``nodes`` less those training left untrained (``data.on_bad_node=skip``: too few training rows):
    they have no model to score with, and the baselines leave them out too (like for like). Scoring
    new data with ``train_run``, nodes the training run has no model for (added since) are left out
    too, as the nightly job leaves them; in the run that trained, a missing model is an error."""
    md = models_dir(cfg, run_dir)
    left = untrained_nodes(md)  # none where there is no models folder
    out = [n for n in nodes if n not in left]
    if nodes and not out:  # under ranks: rank 0 (dist.from_rank_zero), and every rank stops
        raise InputError(f"every node ({len(nodes)}) was left untrained by training, the first: {nodes[0]} "
                         f"({left[nodes[0]]}): nothing to score; check the data, split.* and the labels")
    if len(out) < len(nodes):
        first = next(n for n in nodes if n in left)
        log.warning("%d node(s) were left untrained by training (%s/<node>%s) and are not scored, the first: %s (%s)",
                    len(nodes) - len(out), md, UNTRAINED_SUFFIX, first, left[first])
    if runfolder.train_run(cfg) is not None:
        trained = set(model_nodes(md))
        new = [n for n in out if n not in trained]
        if new and len(new) < len(out):  # none trained at all: score_nodes names them
            log.warning("%d node(s) have no model in the training run (%s; nodes added since it trained?) and "
                        "are not scored: %s", len(new), md, ", ".join(new[:10]) + (" ..." if len(new) > 10 else ""))
            out = [n for n in out if n in trained]
    return out


def stage_train(cfg: HpcadConfig, run_dir: Path) -> dict:
    """Train every node's model; under srun/torchrun each rank trains its balanced share of nodes."""
    if cfg.train_run:
        raise ConfigError("train_run is set: this run scores with existing models; drop it to train")
    fleet = cfg.model.get("scope", "node") == "fleet"  # one model all-reduced over the ranks (DDP)
    with ranked_share(cfg, run_dir, gpu_collectives=fleet) as (w, device, store, mine):
        if fleet:
            from hpcad.fleet import train_fleet

            out = train_fleet(cfg, store, run_dir / "models", mine, device, w.rank)
        else:
            name = f"training-rank{w.rank}.json" if w.distributed else "training.json"
            from hpcad.train import train_nodes

            out = train_nodes(cfg, store, run_dir / "models", mine, device, name)
        if w.distributed:
            out.update(rank=w.rank, world_size=w.size, nodes=len(mine), cluster_nodes=len(store.nodes))
            dist.barrier("for the other ranks to finish training")
        if w.rank == 0:  # every chunk has ended: a checkpoint left is of an earlier chunking
            from hpcad.model.checkpoint import remove_checkpoints

            remove_checkpoints(run_dir / "models")
        return out


def stage_score(cfg: HpcadConfig, run_dir: Path) -> Path:
    """Score every node; under srun/torchrun each rank writes ``errors-rank<r>.h5`` for its share and
    rank 0 then writes ``errors.h5`` as an index of external links (one writer per file)."""
    from hpcad.score import built_from, score_nodes

    out = run_dir / "errors.h5"
    fallback = signal_choice.recorded(runfolder.train_run(cfg))  # the recipe its thresholds were fitted with
    with ranked_share(cfg, run_dir, monitored=True) as (w, device, store, mine):
        if not w.distributed:
            score_nodes(cfg, store, models_dir(cfg, run_dir), out, mine, device, recipe_fallback=fallback)
            _drop_rank_files(run_dir, [])
            return out
        parts = [run_dir / f"errors-rank{r}.h5" for r in range(w.size)]
        md = models_dir(cfg, run_dir)
        built = dist.from_rank_zero(lambda: built_from(store, md))  # the models' stamp: a stat per model file
        score_nodes(cfg, store, md, parts[w.rank], mine, device, recipe_fallback=fallback, built=built)
        dist.barrier("for the other ranks to finish scoring")
        if w.rank == 0:
            scored = [e for e in map(ErrorStore, parts) if e.nodes] or [ErrorStore(parts[0])]
            metrics = scored[0].metrics  # the models' metrics (the store may hold others)
            # every rank wrote the same store, models, signature, stamp and weight: copy them
            write_index(out, parts, {"hpcad_format": FORMAT, "format_version": 1, **scored[0].attrs}, metrics)
            _drop_rank_files(run_dir, parts)
        dist.barrier()
        return out


def _drop_rank_files(run_dir: Path, parts: list[Path]) -> None:
    """Remove the per-rank error files that the errors.h5 just written no longer links to (an earlier
    scoring on more ranks, or on several ranks before a single-process one): unreferenced, and as
    large as the scores themselves."""
    remove_unreferenced(run_dir, "errors-rank*.h5", [p.name for p in parts], "per-rank error", "errors.h5")


def _left_to_rank_zero(stage: str) -> bool:
    """True on ranks other than 0 under several ranks, for the stage that one process does for the
    whole run folder (the report): those ranks leave it to rank 0 (one writer per file; ingest,
    training, scoring and baselines are shared out instead, each rank writing its own files)."""
    w = dist.world()
    if w.rank == 0:
        return False
    log.info("%s: done by rank 0 of %d", stage, w.size)
    return True


def stage_ingest_once(cfg: HpcadConfig, run_dir: Path) -> TelemetryStore | None:
    """`hpcad ingest`; under several ranks (``srun -n 32 hpcad ingest`` on a CPU node) each rank
    ingests its share of a folder of node files over a gloo process group (hpcad/data/ranks.py)."""
    w = dist.world()
    if not w.distributed:
        return stage_ingest(cfg, run_dir)
    import torch

    dist.init(torch.device("cpu"))
    with dist.peers_watched():
        runfolder.check_shared(run_dir)
        ingest_ranks(cfg.data, run_dir / "store.h5", cfg.compute.progress)
    return TelemetryStore(run_dir / "store.h5") if w.rank == 0 else None


def stage_baselines(cfg: HpcadConfig, run_dir: Path) -> dict:
    """Fit the baselines; under several ranks each rank fits its share of the nodes (hpcad.baselines).
    Signal files of methods this run does not fit are removed (they are not its figures)."""
    out_dir = run_dir / "baselines"
    remove_other_signal_files(out_dir, list(cfg.baselines.methods))
    if not cfg.baselines.methods:
        return {}
    from hpcad.baselines import excess_weight, index_ranks, run_baselines, skipped

    with ranked_share(cfg, run_dir, monitored=True) as (w, _device, store, mine):
        if skipped(cfg, store):
            remove_other_signal_files(out_dir, [])
            return {}
        fit_store = _fit_store(cfg, store)
        weight = excess_weight(cfg, run_dir / "errors.h5")  # the autoencoder's, as it was scored
        if not w.distributed:
            return run_baselines(cfg, fit_store, store, out_dir, mine, weight=weight)
        run_baselines(cfg, fit_store, store, out_dir, mine, w.rank, weight)
        dist.barrier("for the other ranks to finish their baselines")
        out = index_ranks(out_dir, list(cfg.baselines.methods), w.size, store.signature) if w.rank == 0 else {}
        dist.barrier()
        return out


def _fit_store(cfg: HpcadConfig, store: TelemetryStore) -> TelemetryStore:
    """The store the baselines fit on: the training run's (``train_run``), else this run's."""
    tr = runfolder.train_run(cfg)
    if tr is None:
        return store
    tcfg = runfolder.load_run_config(tr)
    src = tr / "store.h5"
    if tcfg is not None and is_store_path(tcfg.data.source):
        src = Path(tcfg.data.source)
    return TelemetryStore(src)


def _errors(run_dir: Path) -> ErrorStore:
    path = run_dir / "errors.h5"
    if not path.exists():
        raise StoreError(f"{path}: not found; run `hpcad score` with hydra.run.dir={run_dir} first")
    return ErrorStore(path)


def stage_threshold(cfg: HpcadConfig, run_dir: Path) -> dict:
    """Fit thresholds, then write alarms and scores. Under several ranks every rank fits on its share
    of the nodes and the ranks reduce, over MPI (mpiexec, ``srun --mpi=pmi2``) or else their
    torch.distributed group (docs/cluster.md); applying them is shared out the same way (each rank
    reads its own nodes' signals and per-metric errors: alarms, figures, class profiles, the
    baselines' fits) and rank 0 writes the outputs."""
    errors = _errors(run_dir)
    w = dist.world()
    red = reducer(w)
    if red.rank == 0:  # once, not once per rank: the models folder's listing (and, in a copied run folder,
        # every model file's digest) would otherwise hit the file system from hundreds of ranks at once
        with red.all_or_none("threshold"):  # a refusal stops every rank
            _same_models(cfg, run_dir, errors)
    share = dist.shard(errors.rows, red.size)[red.rank]
    mine = partial(errors.signals, nodes=share)
    labelled = any(s.labels is not None for s in errors.signals(errors.nodes[:1])) if errors.nodes else False
    tr = runfolder.train_run(cfg)
    rule = build(cfg.threshold, "threshold")
    if tr is not None and not labelled and (tr / "thresholds.json").exists():
        th = Thresholds.load(tr / "thresholds.json")
        signal_choice.check_applies(signal_choice.from_details(th.details), errors.recipe, tr / "thresholds.json",
                                    errors.path)
        log.info("unlabelled data: using the thresholds fitted by %s", tr, extra=dist.CLUSTER_WIDE)
        fitted_here = False
    else:
        fitted_here = True
        with red.all_or_none("threshold"):
            th = rule.fit(mine, red)
        th.details.update(errors.recipe.to_dict())  # the signal they were fitted on
    with red.all_or_none("threshold"):  # in node order: one process adds the class profiles as it always did
        result = _apply(cfg, run_dir, errors, th, rule, red, sorted(share), fitted_here)
    if not fitted_here:
        result["thresholds_from"] = str(tr / "thresholds.json")
    return result if red.rank == 0 else {"thresholds": th.to_dict(), "rank": red.rank}


def _checked_store(cfg: HpcadConfig, run_dir: Path, errors: ErrorStore) -> TelemetryStore:
    """Rank 0, before anything is written: the run's store, refusing errors scored from other data."""
    scored = errors.attrs.get("store_signature")
    if scored and scored != wanted_signature(cfg.data):  # before the run's store is ingested again (replaced)
        made = TelemetryStore(run_dir / "store.h5").source if (run_dir / "store.h5").exists() else None
        raise StoreError(f"{errors.path} was scored from other data than the data.* options now give ("
                         + (f"the run's store holds {made}; " if made else "")
                         + f"data.source, data.labels, data.jobs or another data.* option differs from the run's): "
                           f"give `hpcad threshold` the options the run was made with, or rerun `hpcad score` (or "
                           f"`hpcad run`) with hydra.run.dir={run_dir} for the new ones; nothing was changed")
    store = stage_ingest(cfg, run_dir)
    if scored and scored != store.signature:
        raise StoreError(f"{errors.path} was scored from other data than {store.path} now holds (data.source or "
                         f"data.* changed since): rerun `hpcad score` with hydra.run.dir={run_dir}, or `hpcad run`")
    return store


def _apply(cfg: HpcadConfig, run_dir: Path, errors: ErrorStore, th: Thresholds, rule: Any, red: Reducer,
           share: list[str], fitted_here: bool) -> dict:
    """The threshold stage after the fit, on every rank: each rank works on its ``share`` of the
    nodes, rank 0 writes thresholds, alarms and metrics."""
    t0 = time.perf_counter()
    store = _checked_store(cfg, run_dir, errors) if red.rank == 0 else None
    if red.rank == 0:
        th.details["applied_to"] = errors.attrs.get("created", "")  # the errors.h5 these thresholds belong to
        th.save(run_dir / "thresholds.json")
    where = red.bcast(None if store is None else str(store.path))  # the other ranks wait for the checks
    store = store or TelemetryStore(Path(where))
    cm = rule.cost_model
    time_unit = store.time_unit(store.nodes[0]) if store.nodes else "s"

    def mine() -> Iterator[NodeSignal]:  # this rank's nodes, a progress line a minute in a log (a bar on a terminal)
        return tracked(errors.signals(share), len(share), "threshold: alarms", "node", cfg.compute.progress, log)

    from hpcad.model.light import LightMaps  # torch: imported where a model is read

    md = models_dir(cfg, run_dir)
    quotes = ExpectedQuotes(errors, store, md, LightMaps(cfg.score.light_maps, md), cfg.score.light_night,
                            int(cfg.preprocess.nan_fill_limit))
    records, metrics = apply_thresholds(errors, th, cm, cfg.report.top_k, time_unit, store.jobs(),
                                        run_dir / "alarms.csv", signals=mine, red=red, quote=quotes)
    if red.rank == 0:  # the same alarms with their top metrics' observed and expected values (as a night's)
        write_json(run_dir / "alarms.json", [alarm_record(r, split=True) for r in records])
    labelled = red.bcast(metrics.get("labelled"))
    if fitted_here and not labelled:  # no labels: what other multiples of the normal level raise
        budget = alarms_by_level(errors.signals(share), cm, time_unit, red=red)
        if budget is not None and red.rank == 0:
            th.details["by_level"] = budget
            th.save(run_dir / "thresholds.json")
    result = {"alarms": len(records), "alarmed_nodes": len({r["node"] for r in records}),
              "nodes": len(errors.nodes), "thresholds": th.to_dict()}
    if not labelled:
        _said_share(share, errors, "alarms, alarm budget" if fitted_here else "alarms", t0)
        return result
    out = {"detector": "autoencoder", "cost_model": vars(cm), "threshold_rule": th.rule,
           "signal": {**OmegaConf.to_container(cfg.signal), "used": errors.recipe.to_dict(),
                      "choice": json.loads(errors.attrs.get("signal_choice", "null"))},
           "scope": th.scope, "threshold_check":
           th.details.get("check"), "splits": metrics.get("splits"), "baselines": {}, "nodes": metrics.get("nodes")}
    for path in signal_files(run_dir / "baselines"):
        base = ErrorStore(path)
        made = base.attrs.get("store_signature")  # files before it was recorded: kept, as before
        if made and made != store.signature:
            log.warning("%s was fitted on other data than errors.h5 was scored from (data changed since `hpcad "
                        "baselines` ran): left out of metrics.json; rerun `hpcad baselines` with "
                        "hydra.run.dir=%s", path, run_dir, extra=dist.CLUSTER_WIDE)
            continue
        bshare = dist.shard(base.rows, red.size)[red.rank]
        bsource = partial(base.signals, nodes=bshare)
        bth = rule.fit(bsource, red, detector=f"baseline {path.stem}")
        figures = evaluate(tracked(bsource(), len(bshare), f"threshold: baseline {path.stem}", "node",
                                   cfg.compute.progress, log), bth, cm, time_unit, red=red)
        out["baselines"][path.stem] = {"splits": figures.get("splits"), "thresholds": bth.to_dict()}
        if "excess_weight" in base.attrs:  # the range-excess weight it added, and how it was chosen
            out["baselines"][path.stem]["excess_weight"] = float(base.attrs["excess_weight"])
            out["baselines"][path.stem]["excess_choice"] = json.loads(base.attrs.get("signal_choice", "null"))
    parts = red.gather(profile_sums(errors, share))
    out["class_profiles"] = profiles_from_sums(parts, errors.metrics) if red.rank == 0 else {}
    _said_share(share, errors, f"alarms, figures, class profiles, {len(out['baselines'])} baseline(s)", t0)
    if red.rank == 0:
        write_json(run_dir / "metrics.json", out)
        result["metrics"] = out
    return result


def threshold_summary(result: dict, run_dir: Path) -> list[str]:
    """What ``hpcad run`` and ``hpcad threshold`` print at their end (rank 0's ``stage_threshold``
    result): the alarms; with labels the cost of the test split (else the validation split) as the
    cost model counts it, the labelled anomalies found, the average precision and the baselines' cost
    under the same rule (metrics.json and the report hold every figure); without, the alarm budget."""
    n, k, total = result.get("alarms", 0), result.get("alarmed_nodes", 0), result.get("nodes", 0)
    lines = [f"hpcad: {n} alarm event{'s' * (n != 1)} on {k} of {total} node{'s' * (total != 1)} -> "
             f"{run_dir / 'alarms.csv'}"]
    m = result.get("metrics") or {}
    splits = m.get("splits") or {}
    name = next((x for x in ("test", "val") if (splits.get(x) or {}).get("rows")), None)
    if name is None:
        return lines + _unlabelled_lines(result)
    sp, cm = splits[name], m["cost_model"]
    line = (f"hpcad: {'test' if name == 'test' else 'validation'} split: cost {sp['cost']:,.0f} ("
            f"{sp['false_alarms']:,} false-alarm rows x {cm['c_alarm']:g} + {sp['missed']:,} missed rows x "
            f"{cm['c_missed']:g}), {sp['events_detected']} of {sp['events']} labelled anomalies found, "
            f"{sp['false_alarm_events']} false-alarm event{'s' * (sp['false_alarm_events'] != 1)}")
    ap = ((splits.get("eval") or {}).get("ranking") or {}).get("ap")
    lines.append(line + ("" if ap is None else f"; average precision {ap:.3f} (validation and test rows)"))
    base = {b: v["splits"][name]["cost"] for b, v in (m.get("baselines") or {}).items()
            if ((v.get("splits") or {}).get(name) or {}).get("rows")}
    if base:
        lines.append("hpcad: the baselines' cost there, same rule: " + ", ".join(f"{b} {c:,.0f}" for b, c in base.items())
                     + f" ({run_dir / 'metrics.json'})")
    return lines


def _unlabelled_lines(result: dict) -> list[str]:
    """Without labels: the thresholds' rule and the alarm budget (what other multiples of the normal
    level raise on the validation rows), where this run fitted them; else whose they are."""
    if result.get("thresholds_from"):
        return [f"hpcad: no labels: the thresholds {result['thresholds_from']} holds (fitted by the training run)"]
    d = (result.get("thresholds") or {}).get("details") or {}
    budget = d.get("by_level")
    if not budget:
        return []
    fb = d.get("fallback") or ({"times": d["times"]} if "times" in d else {})
    how = (f": thresholds at {fb['times']:g}x each node's normal level (threshold.times)" if "times" in fb else
           f": thresholds at the {fb['q']:g} quantile of each node's validation signal (threshold.q)" if "q" in fb
           else "")
    times = " / ".join(f"{x['times']:g}x" for x in budget["levels"])
    events = " / ".join(str(x["alarm_events"]) for x in budget["levels"])
    return [f"hpcad: no labels{how}; on the validation rows {times} raise {events} alarm events (the alarm "
            f"budget: thresholds.json, the report)"]


def _said_share(share: list[str], errors: ErrorStore, what: str, t0: float) -> None:
    """One line per rank (its own log under several ranks): what it applied the thresholds to, and how long."""
    of = f" of {len(errors.nodes)}" if len(share) < len(errors.nodes) else ""
    log.info("thresholds applied to %d%s nodes here (%s) in %.1f s", len(share), of, what, time.perf_counter() - t0)


def stage_report(cfg: HpcadConfig, run_dir: Path) -> Path | None:
    if not cfg.report.enabled:
        stale = run_dir / "report.html"
        if stale.exists() and (run_dir / "thresholds.json").exists() and \
                stale.stat().st_mtime < (run_dir / "thresholds.json").stat().st_mtime:
            log.warning("report.enabled=false: %s is an earlier report, written before this run folder's "
                        "thresholds.json; left as it was, not updated", stale, extra=dist.CLUSTER_WIDE)
        return None
    if _left_to_rank_zero("report"):
        return None
    from hpcad.report.page import write_report

    errors = _errors(run_dir)
    path = run_dir / "thresholds.json"
    if not path.exists():
        raise StoreError(f"{path}: not found; run `hpcad threshold` with hydra.run.dir={run_dir} first")
    applied = Thresholds.load(path).details.get("applied_to")
    if applied and errors.attrs.get("created") and applied != errors.attrs["created"]:
        raise StoreError(f"{path} and alarms.csv belong to an earlier errors.h5 (scored {applied}; errors.h5 now: "
                         f"{errors.attrs['created']}): rerun `hpcad threshold` with hydra.run.dir={run_dir}")
    store_path = run_store_path(run_dir, cfg.data.source)
    scored = errors.attrs.get("store_signature")
    if scored and store_path.exists() and TelemetryStore(store_path).signature != scored:
        raise StoreError(f"{store_path} holds other data than {errors.path} was scored from (ingested again since, "
                         f"with other data.* options): its node pages would plot the new data's values beside the old "
                         f"scores; rerun `hpcad score` and `hpcad threshold` (or `hpcad run`) with hydra.run.dir={run_dir}")
    return write_report(cfg, run_dir, errors, models_dir(cfg, run_dir))


def _same_models(cfg: HpcadConfig, run_dir: Path, errors: ErrorStore) -> None:
    """Refuse errors scored with other model files than the run's models folder now holds. The stamp
    (names, sizes, file times) is cheap; where it differs, the files' contents decide: a run folder
    copied or moved (``cp -r`` off a purged scratch file system) keeps its contents, not its times."""
    md = models_dir(cfg, run_dir)
    stamp = errors.attrs.get("models_stamp")
    if not stamp or not md.is_dir() or stamp == models_stamp(md):
        return
    scored = errors.models()
    changed = [n for n in errors.nodes if n not in scored or not model_path(md, n).exists()
               or model_digest(model_path(md, n)) != scored[n]]
    if changed:
        said = "" if len(scored) < len(errors.nodes) else \
            f": {len(changed)} node(s) changed since, e.g. {', '.join(changed[:5])}"
        raise StoreError(f"{errors.path} was scored with other models than {md} now holds (retrained since?){said}; "
                         f"rerun `hpcad score` with hydra.run.dir={run_dir}, or `hpcad run`")
    log.info("%s: the model files' times changed since scoring (copied or moved?), their contents did not", md)


def stage_run(cfg: HpcadConfig, run_dir: Path) -> dict:
    """All stages in order (training is skipped when ``train_run`` provides the models). Training and
    scoring ingest first (under several ranks each rank its share: hpcad/data/ranks.py)."""
    out: dict = {}
    if not cfg.train_run:
        out["train"] = stage_train(cfg, run_dir)
    stage_score(cfg, run_dir)
    stage_baselines(cfg, run_dir)
    out["threshold"] = stage_threshold(cfg, run_dir)
    out["report"] = stage_report(cfg, run_dir)
    return out


def stage_generate(cfg: HpcadConfig, run_dir: Path) -> list[Path]:
    """Write the synthetic data set as export files (``generate.out``, default: the run folder)."""
    from hpcad.data.synthetic import write_exports

    s = cfg.data.synthetic
    default = run_dir / ("davide.csv" if s.profile == "davide" else "exports")
    out = Path(cfg.generate.out) if cfg.generate.out else default
    try:
        files = write_exports(out, s, cfg.generate.format)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    log.info("wrote %d synthetic export files under %s", len(files), out)
    return files


def stage_nightly(cfg: HpcadConfig, run_dir: Path) -> dict:
    """Re-score a night (or a range) with a trained run: hpcad/nightly/, jobs/nightly_rescore.sh."""
    from hydra.core.hydra_config import HydraConfig

    from hpcad.nightly import run_nightly

    overrides = list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []
    return run_nightly(cfg, run_dir, overrides)


def stage_preflight(cfg: HpcadConfig, run_dir: Path) -> dict:
    """What every rank of the allocation sees, and whether the ranks meet (hpcad/preflight.py)."""
    from hpcad.preflight import preflight

    return preflight(cfg, run_dir)


def one_writer(stage: str, fn: Callable[[Any, Path], Any]) -> Callable[[Any, Path], Any]:
    """``fn`` holding the run folder's writer lock (hpcad/runfolder.py)."""
    @functools.wraps(fn)
    def locked(cfg: HpcadConfig, run_dir: Path):
        with runfolder.writer(run_dir, stage):
            return fn(cfg, run_dir)
    return locked


# generate writes generate.out, nightly its own locked output folder, preflight only preflight.json:
# none of them writes the run folder's outputs
RUNNERS = {"generate": stage_generate, "ingest": stage_ingest_once, "train": stage_train,
           "score": stage_score, "baselines": stage_baselines, "threshold": stage_threshold, "report": stage_report,
           "run": stage_run, "nightly": stage_nightly, "preflight": stage_preflight}
RUNNERS.update({k: one_writer(k, fn) for k, fn in RUNNERS.items() if k not in ("generate", "nightly", "preflight")})
